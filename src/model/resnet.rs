//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use crate::error::Result;
use crate::model::bands::FeatureMap;
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// `ResnetBlock2D` with the default time-embedding handling (added after conv1).
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f32,
}

/// Sizes of a `ResnetBlock2D`.
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(w: &Weights, c: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (c.in_channels, c.out_channels);
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(&w.pp("norm1"), c.groups, cin, c.eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: c
                .temb_channels
                .map(|t| Linear::new(&w.pp("time_emb_proj"), t, cout, true))
                .transpose()?,
            norm2: GroupNorm::new(&w.pp("norm2"), c.groups, cout, c.eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: c.output_scale_factor as f32,
        })
    }

    /// `temb_silu` is `silu(temb)`, `[B, temb_channels]`, computed once per UNet call
    /// (diffusers applies the SiLU inside every block; the result is the same).
    /// Takes `x` so that its memory is reused or freed as soon as the block has read it
    /// ([`FeatureMap::resnet_entry`]: a whole map is normalised in place after the shortcut
    /// is taken, row bands are consumed one by one). At the VAE decoder's 1024x1024 levels
    /// a map is 0.5-1 GiB, and holding the input, its norm and the convolutions' outputs at
    /// once was 1 GiB more than this order (measured on SDXL's decoder, `VmHWM`).
    pub fn forward<M: FeatureMap>(&self, x: M, temb_silu: Option<&Tensor>) -> Result<M> {
        let _span = tracing::trace_span!("resnet").entered();
        let (mut h, shortcut) =
            x.resnet_entry(&self.norm1, &self.conv1, self.conv_shortcut.as_ref())?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_silu) {
            let t = proj.forward(temb)?;
            let (b, c) = (t.dim(0), t.dim(1));
            h = h.add_per_channel(&t.reshape(&[b, c, 1, 1])?)?;
        }
        let out = h
            .group_norm(&self.norm2, true)?
            .conv(&self.conv2)?
            .add(&shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out.scale(1.0 / self.output_scale_factor)
        }
    }
}

/// `Downsample2D` with a convolution: 3x3, stride 2.
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers' `padding=0` case: one zero row and column after the input instead of a
    /// symmetric padding (the VAE encoder's layout).
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(w: &Weights, channels: usize, padding: usize) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_bottom_right: padding == 0,
        })
    }

    /// Halves a whole map, or (the encoder's padding only) a map in row bands.
    pub fn forward<M: FeatureMap>(&self, x: &M) -> Result<M> {
        if self.pad_bottom_right {
            x.downsample_padded_after(&self.conv)
        } else {
            x.clone().conv(&self.conv)
        }
    }
}

/// `Upsample2D` with a convolution: nearest-neighbour resize, then 3x3 conv.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Resizes to `size` (the skip connection's size in the UNet; 2x in the VAE).
    /// Takes `x` to free it as the resized map is convolved (in the VAE decoder the resized
    /// map is four times as large, and the convolution's output as large again).
    pub fn forward<M: FeatureMap>(&self, x: M, size: (usize, usize)) -> Result<M> {
        x.upsample_conv(size.0, size.1, &self.conv)
    }
}
