//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x and SDXL: time embedding (plus
//! SDXL's `text_time` conditioning), down blocks, the cross-attention mid block and up
//! blocks with skip connections.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::attention::{Transformer2DConfig, Transformer2DModel};
use crate::model::config::UNetConfig;
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// `TimestepEmbedding`: linear → SiLU → linear.
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(w: &Weights, in_features: usize, out_features: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(&w.pp("linear_1"), in_features, out_features, true)?,
            linear_2: Linear::new(&w.pp("linear_2"), out_features, out_features, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// SDXL's `addition_embed_type: "text_time"`: each micro-conditioning id (original size,
/// crop corner, target size) gets a sinusoidal embedding (`add_time_proj`), joined after
/// the pooled text embedding and projected by `add_embedding` onto the time embedding.
struct TextTimeEmbedding {
    time_dim: usize,
    pooled_dim: usize,
    add_embedding: TimestepEmbedding,
}

/// What the UNet is conditioned on besides the timestep, one entry per batch sample.
pub struct Conditioning {
    /// `encoder_hidden_states` `[B, L, cross_attention_dim]`: the prompt embeddings.
    pub context: Tensor,
    /// SDXL's `added_cond_kwargs`; `None` for SD 1.x/2.x.
    pub text_time: Option<TextTime>,
}

/// `added_cond_kwargs` of a `text_time` UNet.
pub struct TextTime {
    /// `text_embeds` `[B, pooled width]`: the pooled prompt embedding.
    pub text_embeds: Tensor,
    /// `time_ids`, `B` rows: original height and width, crop top and left, target height
    /// and width (diffusers' order).
    pub time_ids: Vec<Vec<f32>>,
}

/// The per-level settings that diffusers resolves from the config before building blocks.
#[derive(Clone, Copy, Debug)]
struct LevelConfig {
    layers: usize,
    transformer_layers: usize,
    heads: usize,
    cross_attention_dim: usize,
    only_cross_attention: bool,
}

/// Everything a block needs besides its own sizes.
#[derive(Clone, Copy, Debug)]
struct BlockShared {
    temb_channels: usize,
    groups: usize,
    eps: f64,
    use_linear_projection: bool,
}

impl BlockShared {
    fn resnet(&self, cin: usize, cout: usize, output_scale_factor: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }

    fn transformer(&self, channels: usize, level: &LevelConfig) -> Transformer2DConfig {
        Transformer2DConfig {
            channels,
            heads: level.heads,
            layers: level.transformer_layers,
            cross_attention_dim: level.cross_attention_dim,
            norm_groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: level.only_cross_attention,
        }
    }
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

/// `CrossAttnUpBlock2D` (with attentions) or `UpBlock2D` (without).
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn unsupported(path: &Path, what: String) -> Error {
    Error::config(path, format!("unsupported UNet option: {what}"))
}

/// Rejects config options that would change the computation in ways not implemented here.
fn check_supported(c: &UNetConfig, path: &Path) -> Result<()> {
    let checks: [(bool, String); 10] = [
        (c.act_fn != "silu", format!("act_fn = {:?}", c.act_fn)),
        (c.center_input_sample, "center_input_sample = true".into()),
        (c.dual_cross_attention, "dual_cross_attention = true".into()),
        (
            c.class_embed_type.is_some(),
            format!("class_embed_type = {:?}", c.class_embed_type),
        ),
        (
            c.addition_embed_type
                .as_ref()
                .is_some_and(|kind| kind != "text_time"),
            format!("addition_embed_type = {:?}", c.addition_embed_type),
        ),
        (
            c.resnet_time_scale_shift != "default",
            format!("resnet_time_scale_shift = {:?}", c.resnet_time_scale_shift),
        ),
        (
            c.time_embedding_type != "positional",
            format!("time_embedding_type = {:?}", c.time_embedding_type),
        ),
        (
            c.time_cond_proj_dim.is_some() || c.timestep_post_act.is_some(),
            "time_cond_proj_dim / timestep_post_act".into(),
        ),
        (
            c.attention_type != "default",
            format!("attention_type = {:?}", c.attention_type),
        ),
        (
            c.conv_in_kernel.is_multiple_of(2) || c.conv_out_kernel.is_multiple_of(2),
            "even conv_in_kernel / conv_out_kernel".into(),
        ),
    ];
    match checks.into_iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(unsupported(path, what)),
        None => Ok(()),
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet from its config and the weights of `unet/`.
    pub fn new(config: &UNetConfig, w: &Weights, config_path: &Path) -> Result<Self> {
        check_supported(config, config_path)?;
        let c = config;
        let levels = c.block_out_channels.len();
        if levels == 0 || c.down_block_types.len() != levels || c.up_block_types.len() != levels {
            return Err(Error::config(
                config_path,
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length",
            ));
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = c
            .num_attention_heads
            .clone()
            .or_else(|| c.attention_head_dim.clone())
            .ok_or_else(|| {
                Error::config(
                    config_path,
                    "neither num_attention_heads nor attention_head_dim is set",
                )
            })?
            .expand(levels, "num_attention_heads", config_path)?;
        let layers = c
            .layers_per_block
            .expand(levels, "layers_per_block", config_path)?;
        let transformer_layers = c.transformer_layers_per_block.expand(
            levels,
            "transformer_layers_per_block",
            config_path,
        )?;
        let cross = c
            .cross_attention_dim
            .expand(levels, "cross_attention_dim", config_path)?;
        let only_cross =
            c.only_cross_attention
                .expand(levels, "only_cross_attention", config_path)?;
        let level = |i: usize| LevelConfig {
            layers: layers[i],
            transformer_layers: transformer_layers[i],
            heads: heads[i],
            cross_attention_dim: cross[i],
            only_cross_attention: only_cross[i],
        };
        let groups = c
            .norm_num_groups
            .ok_or_else(|| unsupported(config_path, "norm_num_groups = null".into()))?;
        let ch0 = c.block_out_channels[0];
        let temb_channels = ch0 * 4;
        let shared = BlockShared {
            temb_channels,
            groups,
            eps: c.norm_eps,
            use_linear_projection: c.use_linear_projection,
        };

        let mut down_blocks = Vec::with_capacity(levels);
        let mut channels = ch0;
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let (cin, cout, lv) = (channels, c.block_out_channels[i], level(i));
            let with_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(unsupported(
                        config_path,
                        format!("down block type {other:?}"),
                    ))
                }
            };
            let bw = w.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock {
                resnets: (0..lv.layers)
                    .map(|j| {
                        let cin = if j == 0 { cin } else { cout };
                        ResnetBlock2D::new(&bw.pp("resnets").pp(j), shared.resnet(cin, cout, 1.0))
                    })
                    .collect::<Result<_>>()?,
                attentions: if with_attention {
                    (0..lv.layers)
                        .map(|j| {
                            Transformer2DModel::new(
                                &bw.pp("attentions").pp(j),
                                shared.transformer(cout, &lv),
                            )
                        })
                        .collect::<Result<_>>()?
                } else {
                    Vec::new()
                },
                downsampler: if i + 1 < levels {
                    Some(Downsample2D::new(
                        &bw.pp("downsamplers").pp(0),
                        cout,
                        c.downsample_padding,
                    )?)
                } else {
                    None
                },
            });
            channels = cout;
        }

        let mid_block = match c.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let lv = level(levels - 1);
                let mw = w.pp("mid_block");
                let scale = c.mid_block_scale_factor;
                Some(MidBlock {
                    resnets: (0..2)
                        .map(|j| {
                            ResnetBlock2D::new(
                                &mw.pp("resnets").pp(j),
                                shared.resnet(channels, channels, scale),
                            )
                        })
                        .collect::<Result<_>>()?,
                    attentions: vec![Transformer2DModel::new(
                        &mw.pp("attentions").pp(0),
                        shared.transformer(channels, &lv),
                    )?],
                })
            }
            Some(other) => {
                return Err(unsupported(
                    config_path,
                    format!("mid block type {other:?}"),
                ))
            }
        };

        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_ch = reversed[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = reversed[i];
            let skip_in = reversed[(i + 1).min(levels - 1)];
            let lv = level(levels - 1 - i);
            let with_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(unsupported(config_path, format!("up block type {other:?}"))),
            };
            let n = lv.layers + 1;
            let bw = w.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock {
                resnets: (0..n)
                    .map(|j| {
                        let skip = if j == n - 1 { skip_in } else { out_ch };
                        let cin = if j == 0 { prev_out } else { out_ch };
                        ResnetBlock2D::new(
                            &bw.pp("resnets").pp(j),
                            shared.resnet(cin + skip, out_ch, 1.0),
                        )
                    })
                    .collect::<Result<_>>()?,
                attentions: if with_attention {
                    (0..n)
                        .map(|j| {
                            Transformer2DModel::new(
                                &bw.pp("attentions").pp(j),
                                shared.transformer(out_ch, &lv),
                            )
                        })
                        .collect::<Result<_>>()?
                } else {
                    Vec::new()
                },
                upsampler: if i + 1 < levels {
                    Some(Upsample2D::new(&bw.pp("upsamplers").pp(0), out_ch)?)
                } else {
                    None
                },
            });
        }

        let time_embedding = TimestepEmbedding::new(&w.pp("time_embedding"), ch0, temb_channels)?;
        let text_time = match c.addition_embed_type.as_deref() {
            Some("text_time") => Some(TextTimeEmbedding::new(c, w, temb_channels, config_path)?),
            _ => None,
        };
        Ok(UNet2DConditionModel {
            conv_in: Conv2d::new(
                &w.pp("conv_in"),
                c.in_channels,
                ch0,
                c.conv_in_kernel,
                1,
                c.conv_in_kernel / 2,
            )?,
            time_embedding,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, ch0, c.norm_eps)?,
            conv_out: Conv2d::new(
                &w.pp("conv_out"),
                ch0,
                c.out_channels,
                c.conv_out_kernel,
                1,
                c.conv_out_kernel / 2,
            )?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The pooled text width a `text_time` UNet expects, `None` for SD 1.x/2.x UNets.
    pub fn text_time_pooled_dim(&self) -> Option<usize> {
        self.text_time.as_ref().map(|t| t.pooled_dim)
    }

    /// diffusers' `get_timestep_embedding` (`Timesteps` with the config's
    /// `flip_sin_to_cos` and `freq_shift`) of each value, `dim` features each, computed in
    /// f32 like torch.
    fn sinusoidal_features(&self, values: &[f32], dim: usize) -> Vec<f32> {
        let half = dim / 2;
        let exponents: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = -(10000f64.ln() as f32) * i as f32
                    / (half as f32 - self.config.freq_shift as f32);
                exponent.exp()
            })
            .collect();
        let mut features = Vec::with_capacity(dim * values.len());
        for &value in values {
            let args = exponents.iter().map(|e| value * e);
            let sin = args.clone().map(|a| (a as f64).sin() as f32);
            let cos = args.map(|a| (a as f64).cos() as f32);
            if self.config.flip_sin_to_cos {
                features.extend(cos);
                features.extend(sin);
            } else {
                features.extend(sin);
                features.extend(cos);
            }
            if dim % 2 == 1 {
                features.push(0.0); // odd dims are zero-padded, as diffusers does
            }
        }
        features
    }

    /// Predicts the noise (or v) for latents `sample` `[B, C, H, W]` at `timestep`, given
    /// the prompt's conditioning (`B` entries of each).
    pub fn forward(&self, sample: &Tensor, timestep: f32, cond: &Conditioning) -> Result<Tensor> {
        let _span = tracing::debug_span!("unet").entered();
        sample.expect_rank("unet sample", 4)?;
        let batch = sample.dim(0);
        let dim = self.config.block_out_channels[0];
        let t = Tensor::from_vec(
            self.sinusoidal_features(&[timestep], dim).repeat(batch),
            &[batch, dim],
            &sample.device(),
        )?;
        let mut emb = self.time_embedding.forward(&t)?;
        match (&self.text_time, &cond.text_time) {
            (Some(embedding), Some(added)) => {
                emb = emb.add(&self.text_time_embedding(embedding, added, batch)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "this UNet (addition_embed_type \"text_time\") needs pooled text embeddings and time ids".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "this UNet takes no pooled text embeddings or time ids".into(),
                ))
            }
        }
        // Every ResNet block applies SiLU to the embedding first; do it once.
        let temb = emb.silu()?;
        let ctx = &cond.context;

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let _span = tracing::trace_span!("down_block").entered();
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(h, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, ctx)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            let _span = tracing::trace_span!("mid_block").entered();
            h = mid.resnets[0].forward(h, Some(&temb))?;
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                h = attn.forward(&h, ctx)?;
                h = resnet.forward(h, Some(&temb))?;
            }
        }
        for block in &self.up_blocks {
            let _span = tracing::trace_span!("up_block").entered();
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
                let input = Tensor::cat(&[&h, &skip], 1)?;
                h = resnet.forward(input, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, ctx)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Resize to the next skip connection's size: 2x when the latent size divides
                // evenly, otherwise the size diffusers passes as `upsample_size`.
                let next = skips
                    .last()
                    .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
                h = up.forward(h, (next.dim(2), next.dim(3)))?;
            }
        }
        let h = self.conv_norm_out.forward_silu(h)?;
        self.conv_out.forward(&h)
    }
}

impl TextTimeEmbedding {
    fn new(c: &UNetConfig, w: &Weights, temb_channels: usize, path: &Path) -> Result<Self> {
        let missing = |field: &str| {
            Error::config(
                path,
                format!("addition_embed_type \"text_time\" needs `{field}`"),
            )
        };
        let time_dim = c
            .addition_time_embed_dim
            .ok_or_else(|| missing("addition_time_embed_dim"))?;
        let input_dim = c
            .projection_class_embeddings_input_dim
            .ok_or_else(|| missing("projection_class_embeddings_input_dim"))?;
        // Six ids: original size, crop corner and target size, two values each.
        let pooled_dim = input_dim.checked_sub(6 * time_dim).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "`projection_class_embeddings_input_dim` {input_dim} is less than the six time ids' 6 x {time_dim} features"
                ),
            )
        })?;
        Ok(TextTimeEmbedding {
            time_dim,
            pooled_dim,
            add_embedding: TimestepEmbedding::new(
                &w.pp("add_embedding"),
                input_dim,
                temb_channels,
            )?,
        })
    }
}

impl UNet2DConditionModel {
    /// `add_embedding(cat(text_embeds, add_time_proj(time_ids)))`, `[B, temb]`.
    fn text_time_embedding(
        &self,
        embedding: &TextTimeEmbedding,
        added: &TextTime,
        batch: usize,
    ) -> Result<Tensor> {
        let ids = &added.time_ids;
        let features_per_row = embedding.pooled_dim + 6 * embedding.time_dim;
        if ids.len() != batch || ids.iter().any(|row| row.len() != 6) {
            return Err(Error::shape(
                "unet time_ids",
                format!("{batch} rows of 6 ids expected, got {ids:?}"),
            ));
        }
        if added.text_embeds.shape() != [batch, embedding.pooled_dim] {
            return Err(Error::shape(
                "unet text_embeds",
                format!(
                    "{:?}, not [{batch}, {}]",
                    added.text_embeds.shape(),
                    embedding.pooled_dim
                ),
            ));
        }
        let flat: Vec<f32> = ids.iter().flatten().copied().collect();
        let time_embeds = Tensor::from_vec(
            self.sinusoidal_features(&flat, embedding.time_dim),
            &[batch, 6 * embedding.time_dim],
            &added.text_embeds.device(),
        )?;
        let joined = Tensor::cat(&[&added.text_embeds, &time_embeds], 1)?;
        debug_assert_eq!(joined.shape(), [batch, features_per_row]);
        embedding.add_embedding.forward(&joined)
    }
}
