//! The encoder half of diffusers' `AutoencoderKL`: pixels to the latent distribution that
//! image-to-image and inpainting start from (`vae.encode(image).latent_dist`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::VaeConfig;
use crate::model::nn::{Conv2d, GroupNorm};
use crate::model::resnet::{Downsample2D, ResnetBlock2D};
use crate::model::vae::{check_vae_config, vae_resnet, VaeMidBlock};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// `DownEncoderBlock2D`: resnets, then (except at the last level) a stride-2 downsampler
/// that pads one zero row and column after the map (diffusers' `padding=0`).
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

/// diffusers' `DiagonalGaussianDistribution`: a mean and a log-variance per latent.
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `exp(0.5 * logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        self.logvar.scale(0.5)?.exp()
    }

    /// `latent_dist.sample(generator)` given the generator's draw `noise` (the shape of
    /// the mean): `mean + std * noise`.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.std()?.mul(noise)?.add(&self.mean)
    }
}

impl VaeEncoder {
    /// Builds the encoder from the VAE's config and the weights of `vae/`.
    pub fn new(config: &VaeConfig, w: &Weights, config_path: &Path) -> Result<Self> {
        let c = config;
        check_vae_config(c, config_path)?;
        let levels = c.block_out_channels.len();
        if c.down_block_types.len() != levels {
            return Err(Error::config(
                config_path,
                "block_out_channels and down_block_types must have the same length",
            ));
        }
        if let Some(kind) = c
            .down_block_types
            .iter()
            .find(|k| *k != "DownEncoderBlock2D")
        {
            return Err(Error::config(
                config_path,
                format!("unsupported down block type {kind:?}"),
            ));
        }
        let e = w.pp("encoder");
        let first = c.block_out_channels[0];
        let top = c.block_out_channels[levels - 1];
        let mut down_blocks = Vec::with_capacity(levels);
        let mut out_ch = first;
        for i in 0..levels {
            let prev = out_ch;
            out_ch = c.block_out_channels[i];
            let bw = e.pp("down_blocks").pp(i);
            down_blocks.push(DownEncoderBlock {
                resnets: (0..c.layers_per_block)
                    .map(|j| {
                        let cin = if j == 0 { prev } else { out_ch };
                        ResnetBlock2D::new(&bw.pp("resnets").pp(j), vae_resnet(c, cin, out_ch))
                    })
                    .collect::<Result<_>>()?,
                downsampler: if i + 1 < levels {
                    Some(Downsample2D::new(&bw.pp("downsamplers").pp(0), out_ch, 0)?)
                } else {
                    None
                },
            });
        }
        // double_z: a mean and a log-variance per latent channel.
        let moments = 2 * c.latent_channels;
        Ok(VaeEncoder {
            conv_in: Conv2d::new(&e.pp("conv_in"), c.in_channels, first, 3, 1, 1)?,
            down_blocks,
            mid: VaeMidBlock::new(&e.pp("mid_block"), c, top)?,
            conv_norm_out: GroupNorm::new(&e.pp("conv_norm_out"), c.norm_num_groups, top, 1e-6)?,
            conv_out: Conv2d::new(&e.pp("conv_out"), top, moments, 3, 1, 1)?,
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::new(&w.pp("quant_conv"), moments, moments, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `vae.encode(image).latent_dist` for an image in [-1, 1], `[B, in_channels, H, W]`
    /// with H and W multiples of the VAE's factor.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let _span = tracing::debug_span!("vae_encode").entered();
        let mut h = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        h = self.mid.forward(&h)?;
        h = self.conv_norm_out.forward_silu(&h)?;
        h = self.conv_out.forward(&h)?;
        if let Some(conv) = &self.quant_conv {
            h = conv.forward(&h)?;
        }
        let half = h.dim(1) / 2;
        Ok(LatentDistribution {
            mean: h.narrow(1, 0, half)?,
            logvar: h.narrow(1, half, half)?.clamp(-30.0, 20.0)?,
        })
    }
}
