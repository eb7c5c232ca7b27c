//! The diffusers / transformers config files, as plain structs with the same field names
//! and the same defaults as the Python classes' `__init__` arguments.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Reads and parses a JSON config; errors name the file and serde's reason (field, line).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// A component config that is checked where it is parsed, so that folder loads,
/// single-file presets and `--model-config` folders all go through the same checks.
pub trait ComponentConfig: DeserializeOwned {
    /// Rejects values the model code cannot work with (zero sizes, channel counts that
    /// do not split into the groups or heads, non-finite factors...), naming the field;
    /// `path` is the file the config came from.
    fn validate(&self, path: &Path) -> Result<()>;
}

/// `Ok` when `ok`, else a config error on `path` with `message` (which names the field).
fn require(path: &Path, ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(path, message()))
    }
}

fn nonzero(path: &Path, field: &str, value: usize) -> Result<()> {
    require(path, value > 0, || {
        format!("`{field}` must be at least 1, got 0")
    })
}

fn each_nonzero(path: &Path, field: &str, values: &[usize]) -> Result<()> {
    require(path, !values.contains(&0), || {
        format!("every entry of `{field}` must be at least 1, got {values:?}")
    })
}

fn has_levels(path: &Path, block_out_channels: &[usize]) -> Result<()> {
    require(path, !block_out_channels.is_empty(), || {
        "`block_out_channels` is empty: a model needs at least one level".into()
    })
}

/// A norm's epsilon: added to a variance, so finite and not negative.
fn epsilon(path: &Path, field: &str, value: f64) -> Result<()> {
    require(path, value.is_finite() && value >= 0.0, || {
        format!("`{field}` must be a finite number >= 0, got {value}")
    })
}

/// GroupNorm splits every channel count of these blocks into `groups` equal groups.
fn groups_divide(path: &Path, groups: usize, channels: &[usize]) -> Result<()> {
    nonzero(path, "norm_num_groups", groups)?;
    require(
        path,
        channels.iter().all(|c| c.is_multiple_of(groups)),
        || {
            format!(
                "`norm_num_groups` {groups} does not divide every entry of `block_out_channels` {channels:?}"
            )
        },
    )
}

/// A field diffusers reads by truthiness, where `null` means the default.
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A value diffusers accepts either once for all levels or as one entry per level.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    /// One value per level, `levels` of them (the list must have that length).
    pub fn expand(&self, levels: usize, field: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            PerLevel::One(v) => Ok(vec![v.clone(); levels]),
            PerLevel::Each(v) if v.len() == levels => Ok(v.clone()),
            PerLevel::Each(v) => Err(Error::config(
                path,
                format!("`{field}` has {} entries for {levels} blocks", v.len()),
            )),
        }
    }
}

/// `text_encoder/config.json` (transformers' CLIPTextConfig).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// "quick_gelu" (SD 1.x) or "gelu" (SD 2.x).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// The end-of-text id that marks the pooled position; the legacy value 2 (SDXL's second
    /// encoder) means "the largest id", as transformers reads it.
    pub eos_token_id: i64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    pub projection_dim: usize,
}

impl ComponentConfig for ClipTextConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            nonzero(path, field, value)?;
        }
        require(
            path,
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            || {
                format!(
                    "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                    self.hidden_size, self.num_attention_heads
                )
            },
        )?;
        epsilon(path, "layer_norm_eps", self.layer_norm_eps)
    }
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            projection_dim: 512,
        }
    }
}

/// `unet/config.json` (diffusers' UNet2DConditionModel). Only the fields that change the
/// computation of SD 1.x / 2.x UNets are read; options of other model families are
/// rejected by the UNet with a clear error when set.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerLevel<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerLevel<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerLevel<usize>,
    pub transformer_layers_per_block: PerLevel<usize>,
    /// Legacy: in SD 1.x/2.x configs this is really the number of heads.
    pub attention_head_dim: Option<PerLevel<usize>>,
    pub num_attention_heads: Option<PerLevel<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    /// Only changes precision under f16 math; this engine computes in f32. SDXL's repos
    /// write `null`, which diffusers takes as false.
    #[serde(deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    pub class_embed_type: Option<String>,
    /// `"text_time"` (SDXL): the pooled text embedding and the size/crop ids condition the
    /// time embedding.
    pub addition_embed_type: Option<String>,
    /// Width of each `text_time` id's sinusoidal embedding.
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text width + 6 x `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Latent side the model was trained at; the pipeline's default image side is this
    /// times the VAE factor.
    pub sample_size: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_cond_proj_dim: Option<usize>,
    pub timestep_post_act: Option<String>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub resnet_out_scale_factor: f64,
    pub attention_type: String,
}

impl ComponentConfig for UNetConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        let channels = &self.block_out_channels;
        let levels = channels.len();
        has_levels(path, channels)?;
        for (field, types) in [
            ("down_block_types", &self.down_block_types),
            ("up_block_types", &self.up_block_types),
        ] {
            require(path, types.len() == levels, || {
                format!(
                    "`{field}` has {} entries but `block_out_channels` has {levels}",
                    types.len()
                )
            })?;
        }
        each_nonzero(path, "block_out_channels", channels)?;
        nonzero(path, "in_channels", self.in_channels)?;
        nonzero(path, "out_channels", self.out_channels)?;
        // `null` is an unsupported option, which the UNet rejects as such.
        if let Some(groups) = self.norm_num_groups {
            groups_divide(path, groups, channels)?;
        }
        for (field, per_level) in [
            ("layers_per_block", &self.layers_per_block),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
            ("cross_attention_dim", &self.cross_attention_dim),
        ] {
            each_nonzero(path, field, &per_level.expand(levels, field, path)?)?;
        }
        self.only_cross_attention
            .expand(levels, "only_cross_attention", path)?;
        // diffusers: `num_attention_heads or attention_head_dim` (in SD configs the latter
        // is the head count); each level's channels split evenly into its heads.
        let heads = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => Some(("num_attention_heads", h)),
            (None, Some(h)) => Some(("attention_head_dim", h)),
            (None, None) => None,
        };
        if let Some((field, heads)) = heads {
            let heads = heads.expand(levels, field, path)?;
            each_nonzero(path, field, &heads)?;
            require(
                path,
                channels
                    .iter()
                    .zip(&heads)
                    .all(|(c, h)| c.is_multiple_of(*h)),
                || {
                    format!(
                        "`{field}` {heads:?} does not divide `block_out_channels` {channels:?} into whole heads"
                    )
                },
            )?;
        }
        epsilon(path, "norm_eps", self.norm_eps)?;
        for (field, value) in [
            ("freq_shift", self.freq_shift),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
        ] {
            require(path, value.is_finite(), || {
                format!("`{field}` must be a finite number, got {value}")
            })?;
        }
        Ok(())
    }
}

impl Default for UNetConfig {
    /// SD 1.5's UNet.
    fn default() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            only_cross_attention: PerLevel::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerLevel::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerLevel::One(768),
            transformer_layers_per_block: PerLevel::One(1),
            attention_head_dim: Some(PerLevel::One(8)),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            sample_size: Some(64),
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_cond_proj_dim: None,
            timestep_post_act: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            resnet_out_scale_factor: 1.0,
            attention_type: "default".into(),
        }
    }
}

/// `vae/config.json` (diffusers' AutoencoderKL).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Read by the encoder only (image-to-image); text-to-image never builds it.
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_post_quant_conv: bool,
    pub use_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_post_quant_conv: true,
            use_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl ComponentConfig for VaeConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        let channels = &self.block_out_channels;
        has_levels(path, channels)?;
        require(path, self.up_block_types.len() == channels.len(), || {
            format!(
                "`up_block_types` has {} entries but `block_out_channels` has {}",
                self.up_block_types.len(),
                channels.len()
            )
        })?;
        each_nonzero(path, "block_out_channels", channels)?;
        nonzero(path, "latent_channels", self.latent_channels)?;
        nonzero(path, "out_channels", self.out_channels)?;
        groups_divide(path, self.norm_num_groups, channels)?;
        // The latents are divided by it before decoding.
        require(
            path,
            self.scaling_factor.is_finite() && self.scaling_factor > 0.0,
            || {
                format!(
                    "`scaling_factor` must be a finite number > 0, got {}",
                    self.scaling_factor
                )
            },
        )
    }
}

impl VaeConfig {
    /// Pixels per latent along each side: 2^(number of levels - 1).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}
