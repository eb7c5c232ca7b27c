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
use crate::tensor::{Device, Tensor};

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
    /// image in [-1, 1] (roughly), `[B, out_channels, H * factor, W * factor]`, in row
    /// bands where the device's [`BandPolicy`] says so.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_within(latents, Some(BandPolicy::for_device(&latents.device())))
    }

    /// [`VaeDecoder::decode`] under `policy` (`None`: every map whole): from the first up
    /// block whose maps are over the policy's size, the rest runs in row bands (the same
    /// result up to rounding; see `model::bands`).
    pub fn decode_within(&self, latents: &Tensor, policy: Option<BandPolicy>) -> Result<Tensor> {
        let _span = tracing::debug_span!("vae_decode").entered();
        let mut h = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        h = self.conv_in.forward(&h)?;
        h = self.mid.forward(h)?;
        let banding = match policy {
            Some(policy) => self.banding(h.dims(), policy)?,
            None => None,
        };
        let Some(banding) = banding else {
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

    /// Whether and from where the up blocks run in row bands under `policy`, and how many:
    /// bands of at most `policy.band_bytes` of the largest map, from the first block with a
    /// map over `policy.band_maps_over` (the blocks before it run whole: fewer, larger
    /// launches). `mid` is the mid block's output `[N, C, H, W]`.
    fn banding(&self, mid: [usize; 4], policy: BandPolicy) -> Result<Option<Banding>> {
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
        let band_bytes = policy.band_bytes.max(1);
        let mut bands = (per_row * rows as u64).div_ceil(band_bytes);
        if per_row > band_bytes || bands > rows as u64 {
            if policy.strict {
                return Err(Error::InvalidArgument(format!(
                    "a {}x{} image needs {} MiB per latent row in the VAE decoder, over half \
                     of this device's largest buffer ({} MiB); ask for a smaller image",
                    width * scale,
                    rows * scale,
                    per_row >> 20,
                    (2 * band_bytes) >> 20
                )));
            }
            bands = rows as u64;
        }
        let first_over = largest_per_block
            .iter()
            .position(|&bytes| bytes * rows as u64 > policy.band_maps_over);
        Ok(first_over.filter(|_| bands > 1).map(|from_block| Banding {
            from_block,
            bands: bands as usize,
        }))
    }
}

/// When the decoder's up blocks run in row bands (`model::bands`), and how large a band
/// may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandPolicy {
    /// From the first up block with a map over this many bytes, the rest runs in bands.
    pub band_maps_over: u64,
    /// The most bytes a band of the largest map may hold.
    pub band_bytes: u64,
    /// Whether a latent row over `band_bytes` is an error (a buffer limit) rather than
    /// bands of one latent row (a memory saving).
    pub strict: bool,
}

impl BandPolicy {
    /// For a device whose largest buffer is `max_buffer_bytes`: bands of at most half of it
    /// (the other half covers a band's halo rows and the copies a convolution makes of
    /// them), from the first block with a map over that.
    pub fn within_buffer(max_buffer_bytes: u64) -> Self {
        let half = (max_buffer_bytes / 2).max(1);
        BandPolicy {
            band_maps_over: half,
            band_bytes: half,
            strict: true,
        }
    }

    /// For memory (the CPU's, and a GPU's with large buffers): a whole decode holds two
    /// large maps at once (a convolution's input and output, a ResNet block's input and
    /// shortcut) plus the convolution's workspace, so a map over 512 MiB (SD's VAE over
    /// about 724x724 pixels) makes the peak; in bands each input band is freed as its
    /// output band is made, and the peak becomes about one whole map (group norm needs all
    /// of a map's rows before it can normalise the first). SDXL's VAE at 1024x1024 (random
    /// weights, 2-core EPYC family 25, AVX2 level, 2026-12-06; `VmHWM` less the 193 MiB of
    /// weights): whole 2,251 MiB in 38.9 s; these bands (16 from the third block) 1,387 MiB
    /// in 41.7 s; 32 MiB bands 1,411 MiB, and banding from the first block 1,373 MiB, both
    /// slower: the largest map (1 GiB, the third block's upsampled output) sets the floor,
    /// not the band size.
    pub const MEMORY: BandPolicy = BandPolicy {
        band_maps_over: 512 << 20,
        band_bytes: 64 << 20,
        strict: false,
    };

    /// `device`'s policy: [`Self::MEMORY`], or on a GPU whose largest buffer is under
    /// twice that policy's threshold, bands within the buffer limit. Measured on a GPU
    /// (the bench's `--memory-only`, random fp16 SDXL at 1024x1024 on llvmpipe, whose
    /// buffers go to 2 GiB; 2026-12-07): the decode's peak went from 8,674 MiB with the
    /// weights to 7,780, under the UNet step's 7,986, now a whole image's peak. (One
    /// latent row of the largest map passes 512 MiB, where [`Self::MEMORY`] would band
    /// past a buffer limit of 1 GiB or more, only beyond 65,536 pixels wide.)
    pub fn for_device(device: &Device) -> Self {
        Self::for_buffer_limit(device.max_buffer_bytes())
    }

    /// [`Self::for_device`] for a device whose largest buffer is `limit` (`None`: the CPU).
    fn for_buffer_limit(limit: Option<u64>) -> Self {
        match limit {
            Some(limit) if limit / 2 < Self::MEMORY.band_maps_over => Self::within_buffer(limit),
            _ => Self::MEMORY,
        }
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
    /// For memory (the CPU, and GPUs), 1024x1024 takes 16 bands from the third block (the
    /// first with a map over 512 MiB: its 1 GiB upsampled map), 512x512 none, and a latent
    /// row over the band size bands row by row rather than failing.
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
        let banding = |mid: [usize; 4], policy: BandPolicy| {
            vae.banding(mid, policy)
                .unwrap()
                .map(|b| (b.from_block, b.bands))
        };
        let buffer = BandPolicy::within_buffer;
        assert_eq!(banding([1, 512, 256, 256], buffer(2 * gib)), Some((1, 4)));
        assert_eq!(banding([1, 512, 256, 256], buffer(gib / 4)), Some((0, 32)));
        assert_eq!(banding([1, 512, 64, 64], buffer(2 * gib)), None);
        assert!(vae.banding([1, 512, 256, 256], buffer(gib / 512)).is_err());
        let cpu = BandPolicy::MEMORY;
        assert_eq!(banding([1, 512, 128, 128], cpu), Some((2, 16)));
        assert_eq!(banding([1, 512, 64, 64], cpu), None);
        let tiny_bands = BandPolicy {
            band_bytes: 1 << 20,
            ..cpu
        };
        assert_eq!(banding([1, 512, 128, 128], tiny_bands), Some((2, 128)));
        // GPUs band for memory as the CPU does, unless their buffer limit is stricter.
        let policy = BandPolicy::for_buffer_limit;
        assert_eq!(policy(None), cpu);
        assert_eq!(policy(Some(2 * gib)), cpu);
        assert_eq!(policy(Some(gib / 4)), buffer(gib / 4));
    }
}
