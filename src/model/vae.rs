//! The decoder half of diffusers' `AutoencoderKL`: latents back to pixels; and the mid
//! block both halves share.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::attention::Attention;
use crate::model::bands::{FeatureMap, RowBands};
use crate::model::config::VaeConfig;
use crate::model::nn::{Conv2d, GroupNorm};
use crate::model::resnet::{ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// The mid block's single-head self-attention over pixels, with its own group norm and a
/// residual connection (diffusers' `Attention` with `residual_connection=True`).
struct SpatialAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl SpatialAttention {
    fn new(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        Ok(SpatialAttention {
            group_norm: GroupNorm::new(&w.pp("group_norm"), groups, channels, 1e-6)?,
            // diffusers builds it with attention_head_dim = channels: one head.
            attention: Attention::new(w, channels, channels, 1, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("vae_attention").entered();
        let [b, c, h, w] = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
        let tokens = self
            .group_norm
            .forward(x.clone())?
            .reshape(&[b, c, h * w])?
            .permute(&[0, 2, 1])?;
        let out = self.attention.forward(&tokens, None)?;
        out.permute(&[0, 2, 1])?
            .reshape(&[b, c, h, w])?
            .add_owned(x)
    }
}

/// `UNetMidBlock2D` as the VAE builds it: resnet, optional self-attention, resnet.
pub(crate) struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialAttention>,
}

impl VaeMidBlock {
    /// The mid block at `w` (`encoder.mid_block` or `decoder.mid_block`).
    pub(crate) fn new(w: &Weights, config: &VaeConfig, channels: usize) -> Result<Self> {
        let resnet = |j: usize| {
            ResnetBlock2D::new(
                &w.pp("resnets").pp(j),
                vae_resnet(config, channels, channels),
            )
        };
        Ok(VaeMidBlock {
            resnets: [resnet(0)?, resnet(1)?],
            attention: if config.mid_block_add_attention {
                Some(SpatialAttention::new(
                    &w.pp("attentions").pp(0),
                    channels,
                    config.norm_num_groups,
                )?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, x: Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnets[1].forward(h, None)
    }
}

/// The VAE's resnets: no time embedding, eps 1e-6, the config's groups.
pub(crate) fn vae_resnet(config: &VaeConfig, cin: usize, cout: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups: config.norm_num_groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

/// Checks what both halves of the VAE need of its config.
pub(crate) fn check_vae_config(c: &VaeConfig, config_path: &Path) -> Result<()> {
    if c.block_out_channels.is_empty() {
        return Err(Error::config(config_path, "block_out_channels is empty"));
    }
    if c.act_fn != "silu" {
        return Err(Error::config(
            config_path,
            format!("unsupported act_fn {:?}", c.act_fn),
        ));
    }
    Ok(())
}

/// `UpDecoderBlock2D`: resnets, then an optional 2x upsampler.
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock {
    fn forward<M: FeatureMap>(&self, mut h: M) -> Result<M> {
        for resnet in &self.resnets {
            h = resnet.forward(h, None)?;
        }
        if let Some(up) = &self.upsampler {
            let [_, _, height, width] = h.dims();
            h = up.forward(h, (2 * height, 2 * width))?;
        }
        Ok(h)
    }
}

pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Builds the decoder from the VAE's config and the weights of `vae/` (the encoder's
    /// weights are not read).
    pub fn new(config: &VaeConfig, w: &Weights, config_path: &Path) -> Result<Self> {
        let c = config;
        check_vae_config(c, config_path)?;
        let levels = c.block_out_channels.len();
        if c.up_block_types.len() != levels {
            return Err(Error::config(
                config_path,
                "block_out_channels and up_block_types must have the same length",
            ));
        }
        if let Some(kind) = c.up_block_types.iter().find(|k| *k != "UpDecoderBlock2D") {
            return Err(Error::config(
                config_path,
                format!("unsupported up block type {kind:?}"),
            ));
        }
        let groups = c.norm_num_groups;
        let resnet = |cin, cout| vae_resnet(c, cin, cout);
        let d = w.pp("decoder");
        let top = c.block_out_channels[levels - 1];
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_ch = top;
        for i in 0..levels {
            let prev = out_ch;
            out_ch = c.block_out_channels[levels - 1 - i];
            let bw = d.pp("up_blocks").pp(i);
            up_blocks.push(UpDecoderBlock {
                resnets: (0..c.layers_per_block + 1)
                    .map(|j| {
                        ResnetBlock2D::new(
                            &bw.pp("resnets").pp(j),
                            resnet(if j == 0 { prev } else { out_ch }, out_ch),
                        )
                    })
                    .collect::<Result<_>>()?,
                upsampler: if i + 1 < levels {
                    Some(Upsample2D::new(&bw.pp("upsamplers").pp(0), out_ch)?)
                } else {
                    None
                },
            });
        }
        let lc = c.latent_channels;
        Ok(VaeDecoder {
            post_quant_conv: if c.use_post_quant_conv {
                Some(Conv2d::new(&w.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
            } else {
                None
            },
            conv_in: Conv2d::new(&d.pp("conv_in"), lc, top, 3, 1, 1)?,
            mid: VaeMidBlock::new(&d.pp("mid_block"), c, top)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &d.pp("conv_norm_out"),
                groups,
                c.block_out_channels[0],
                1e-6,
            )?,
            conv_out: Conv2d::new(
                &d.pp("conv_out"),
                c.block_out_channels[0],
                c.out_channels,
                3,
                1,
                1,
            )?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `vae.decode(latents).sample`: latents (already divided by `scaling_factor`) to an
    /// image in [-1, 1] (roughly), `[B, out_channels, H * factor, W * factor]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_within(latents, latents.device().max_buffer_bytes())
    }

    /// [`VaeDecoder::decode`] keeping every activation under `max_buffer_bytes`: from the
    /// first up block whose maps would be larger, the rest runs in row bands (the same
    /// result up to rounding; see `model::bands`).
    pub fn decode_within(&self, latents: &Tensor, max_buffer_bytes: Option<u64>) -> Result<Tensor> {
        let _span = tracing::debug_span!("vae_decode").entered();
        let mut h = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        h = self.conv_in.forward(&h)?;
        h = self.mid.forward(h)?;
        let Some(banding) = self.banding(h.dims(), max_buffer_bytes)? else {
            return self.up(h, 0);
        };
        tracing::debug!(
            "decoding from up block {} in {} row bands",
            banding.from_block,
            banding.bands
        );
        for block in &self.up_blocks[..banding.from_block] {
            h = block.forward(h)?;
        }
        let bands = RowBands::split(&h, banding.bands)?;
        drop(h);
        self.up(bands, banding.from_block)?.join()
    }

    /// The up blocks from `first` on and the output layers, on a whole map or on row bands.
    fn up<M: FeatureMap>(&self, mut h: M, first: usize) -> Result<M> {
        for block in &self.up_blocks[first..] {
            h = block.forward(h)?;
        }
        h.group_norm(&self.conv_norm_out, true)?
            .conv(&self.conv_out)
    }

    /// Whether and from where the up blocks run in row bands, for a device whose largest
    /// buffer is under twice the largest map: bands of at most half of `max_buffer_bytes`
    /// (the other half covers a band's halo rows and the copies a convolution makes of
    /// them), from the first block with a map over that (the blocks before it run whole:
    /// fewer, larger launches). `mid` is the mid block's output `[N, C, H, W]`.
    fn banding(&self, mid: [usize; 4], max_buffer_bytes: Option<u64>) -> Result<Option<Banding>> {
        let Some(limit) = max_buffer_bytes else {
            return Ok(None);
        };
        let [n, mut channels, rows, width] = mid;
        // Each block's largest map (the upsampler's output included), in bytes per row of
        // the mid block's output.
        let mut scale = 1;
        let mut largest_per_block = Vec::with_capacity(self.up_blocks.len());
        for (i, block) in self.up_blocks.iter().enumerate() {
            let out = self.config.block_out_channels[self.up_blocks.len() - 1 - i];
            let mut largest = channels.max(out) * scale * scale;
            channels = out;
            if block.upsampler.is_some() {
                scale *= 2;
                largest = largest.max(channels * scale * scale);
            }
            largest_per_block.push((n * largest * width * 4) as u64);
        }
        let per_row = largest_per_block.iter().copied().max().unwrap_or(0);
        let budget = (limit / 2).max(1);
        let bands = (per_row * rows as u64).div_ceil(budget);
        if per_row > budget || bands > rows as u64 {
            return Err(Error::InvalidArgument(format!(
                "a {}x{} image needs {} MiB per latent row in the VAE decoder, over half of this \
                 device's largest buffer ({} MiB); ask for a smaller image",
                width * scale,
                rows * scale,
                per_row >> 20,
                limit >> 20
            )));
        }
        let first_over = largest_per_block
            .iter()
            .position(|&bytes| bytes * rows as u64 > budget);
        Ok(first_over.filter(|_| bands > 1).map(|from_block| Banding {
            from_block,
            bands: bands as usize,
        }))
    }
}

/// Where the decoder's up blocks switch to row bands, and how many: see
/// [`VaeDecoder::banding`].
#[derive(Debug, PartialEq, Eq)]
struct Banding {
    from_block: usize,
    bands: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    /// The real SD VAE's up blocks at 2048x2048 hold a 4 GiB map (256 channels at full
    /// size): on an adapter allocating at most 2 GiB they take 4 bands from the second
    /// block (the first with a map over 1 GiB: its upsampler's 2 GiB output), at 256 MiB 32
    /// from the first (its 512 MiB upsampled map); a 512x512 image needs none, nor does any
    /// image without a buffer limit; 2 MiB buffers cannot hold a 2048x2048 image's rows.
    #[test]
    fn sd_vae_band_counts() {
        let config = VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            ..VaeConfig::default()
        };
        let vae = VaeDecoder::new(
            &config,
            &Weights::random(0, &Device::Cpu),
            Path::new("sd-vae"),
        )
        .unwrap();
        let gib = 1u64 << 30;
        let banding = |mid: [usize; 4], limit: Option<u64>| {
            vae.banding(mid, limit)
                .unwrap()
                .map(|b| (b.from_block, b.bands))
        };
        assert_eq!(banding([1, 512, 256, 256], Some(2 * gib)), Some((1, 4)));
        assert_eq!(banding([1, 512, 256, 256], Some(gib / 4)), Some((0, 32)));
        assert_eq!(banding([1, 512, 64, 64], Some(2 * gib)), None);
        assert_eq!(banding([1, 512, 256, 256], None), None);
        assert!(vae.banding([1, 512, 256, 256], Some(gib / 512)).is_err());
    }
}
