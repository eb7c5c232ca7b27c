//! The encoder half of diffusers' `AutoencoderKL`: pixels to the latent distribution that
//! image-to-image and inpainting start from (`vae.encode(image).latent_dist`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::bands::{FeatureMap, RowBands};
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
    /// `block_out_channels`: each level's width, which sizes its maps.
    level_channels: Vec<usize>,
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
    /// conv_in and the down blocks, on a whole map or on row bands.
    fn down<M: FeatureMap>(&self, image: M) -> Result<M> {
        let mut h = image.conv(&self.conv_in)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        Ok(h)
    }

    /// How many row bands the down blocks need so that no band's activation exceeds half of
    /// `max_buffer_bytes` (the rest covers halo rows and a convolution's copies), for an
    /// image `[N, C, H, W]`: the largest map is the widest level's, counted per image row.
    pub fn bands_needed(&self, image: [usize; 4], max_buffer_bytes: Option<u64>) -> Result<usize> {
        let Some(limit) = max_buffer_bytes else {
            return Ok(1);
        };
        let [n, _, rows, width] = image;
        // Level i holds maps of (W / 2^i) columns per 2^i image rows, as wide as its own
        // channels or (in its first resnet and the downsampler it receives) the level
        // above's.
        let per_row = (0..self.level_channels.len())
            .map(|i| {
                let channels = self.level_channels[i].max(self.level_channels[i.saturating_sub(1)]);
                (n * channels * 4 * width) as u64 >> (2 * i)
            })
            .max()
            .unwrap_or(0);
        let factor = 1usize << (self.down_blocks.len() - 1);
        let budget = limit / 2;
        let bands = (per_row * rows as u64).div_ceil(budget.max(1)) as usize;
        if bands > rows / factor || per_row * factor as u64 > budget {
            return Err(Error::InvalidArgument(format!(
                "a {width}x{rows} image needs {} MiB per row in the VAE encoder, over half of \
                 this device's largest buffer ({} MiB); send a smaller image",
                per_row >> 20,
                limit >> 20
            )));
        }
        Ok(bands.max(1))
    }

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
            level_channels: c.block_out_channels.clone(),
        })
    }

    /// `vae.encode(image).latent_dist` for an image in [-1, 1], `[B, in_channels, H, W]`
    /// with H and W multiples of the VAE's factor.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        self.encode_within(image, image.device().max_buffer_bytes())
    }

    /// [`VaeEncoder::encode`] keeping every activation under `max_buffer_bytes`: where the
    /// down blocks' full-size maps would be larger, they run in row bands (the same result;
    /// see `model::bands`), joined before the mid block, which works at latent size.
    pub fn encode_within(
        &self,
        image: &Tensor,
        max_buffer_bytes: Option<u64>,
    ) -> Result<LatentDistribution> {
        let _span = tracing::debug_span!("vae_encode").entered();
        image.expect_rank("VaeEncoder", 4)?;
        let dims = [image.dim(0), image.dim(1), image.dim(2), image.dim(3)];
        let bands = self.bands_needed(dims, max_buffer_bytes)?;
        let mut h = if bands == 1 {
            self.down(image.clone())?
        } else {
            tracing::debug!(
                "encoding in {bands} row bands to stay within the device's buffer limit"
            );
            // Bands a multiple of the downscale factor high halve evenly at every level.
            let factor = 1 << (self.down_blocks.len() - 1);
            self.down(RowBands::split_aligned(image, bands, factor)?)?
                .join()?
        };
        h = self.mid.forward(h)?;
        h = self.conv_norm_out.forward_silu(h)?;
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
