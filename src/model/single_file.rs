//! Single-file checkpoints in the original Stable Diffusion layout (CompVis / Stability:
//! `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, or SDXL's
//! `conditioner.embedders.{0,1}.*` from Stability's generative-models), the files
//! AUTOMATIC1111 and ComfyUI load (v1-5-pruned-emaonly.safetensors,
//! v2-1_512-ema-pruned.safetensors, sd_turbo.safetensors, sd_xl_base_1.0.safetensors,
//! sd_xl_turbo_1.0_fp16.safetensors).
//!
//! Nothing is converted: each component gets a [`Weights`] over the one memory-mapped file
//! whose `get(diffusers_name)` finds the original tensor by the inverse of diffusers' own
//! mapping (`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`) and reads it as it is, as a row block of a fused q/k/v
//! weight, transposed (OpenCLIP's `text_projection`), or without a 1x1 convolution's
//! trailing dimensions. One map per kind of component, whatever prefix the family keeps it
//! under ([`Weights::mapped`]): SDXL's text encoders are SD 1.x's CLIP and SD 2.x's
//! OpenCLIP under other names. Tensors keep their stored precision and are copied out one
//! at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::config::{ClipTextConfig, PerLevel, UNetConfig, VaeConfig};
use crate::model::presets::{self, Preset};
use crate::model::weights::{Located, Part, TensorMap, Weights};
use crate::tensor::Device;

const UNET: &str = "model.diffusion_model.";
/// SD 1.x's CLIP ViT-L text encoder, in transformers' names.
const CLIP: &str = "cond_stage_model.transformer.";
/// SD 2.x's OpenCLIP ViT-H text tower.
const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL's first text encoder, CLIP ViT-L as in SD 1.x (diffusers' `clip_sdxl`).
const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second, OpenCLIP ViT-bigG (diffusers' `open_clip_sdxl`; its `xl_base` key is a
/// tensor of the tower's tenth layer, which tiny test towers lack, so the prefix decides).
const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder, OpenCLIP ViT-bigG (diffusers' `xl_refiner`).
const REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";
/// Playground v2.5 (SDXL-shaped, EDM schedule): diffusers' `playground-v2-5` key.
const PLAYGROUND_KEY: &str = "edm_mean";
/// diffusers' `LDM_VAE_KEYS`: the last one any tensor starts with is the VAE's prefix.
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
/// diffusers' `CHECKPOINT_KEY_NAMES["v2"]`: 1024 wide in SD 2.x (OpenCLIP-H context).
const V2_KEY: &str =
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
const IN_CONV_KEY: &str = "model.diffusion_model.input_blocks.0.0.weight";
const LAYOUT: &str = "the original Stable Diffusion layout";

/// Extensions of PyTorch pickle files, refused before they are opened.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// SD 1.x, SD 2.x or SDXL, as told by the text encoders in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.*`), 768 wide.
    Sd1,
    /// OpenCLIP ViT-H/14 text tower (`cond_stage_model.model.*`), 1024 wide.
    Sd2,
    /// CLIP ViT-L/14 (`conditioner.embedders.0.transformer.*`) and OpenCLIP ViT-bigG/14
    /// with its projection (`conditioner.embedders.1.model.*`).
    Sdxl,
}

/// A text encoder in the file: where, and in which of the two namings.
#[derive(Clone, Copy, Debug)]
enum TextTower {
    /// transformers' own names under the prefix.
    Clip(&'static str),
    /// OpenCLIP's; `projection`: the model reads `text_projection` (SDXL's
    /// `CLIPTextModelWithProjection`; SD 2.x's `CLIPTextModel` has none, and diffusers
    /// ignores the stored one).
    OpenClip {
        prefix: &'static str,
        projection: bool,
    },
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// What the text encoders are, for logs.
    pub fn text_encoders(self) -> &'static str {
        match self {
            Family::Sd1 => "CLIP text encoder",
            Family::Sd2 => "OpenCLIP text encoder",
            Family::Sdxl => "CLIP and OpenCLIP text encoders",
        }
    }

    fn text_encoder(self) -> TextTower {
        match self {
            Family::Sd1 => TextTower::Clip(CLIP),
            Family::Sd2 => TextTower::OpenClip {
                prefix: OPEN_CLIP,
                projection: false,
            },
            Family::Sdxl => TextTower::Clip(SDXL_CLIP),
        }
    }

    fn text_encoder_2(self) -> Option<TextTower> {
        (self == Family::Sdxl).then_some(TextTower::OpenClip {
            prefix: SDXL_OPEN_CLIP,
            projection: true,
        })
    }
}

/// A UNet norm bias whose spread tells SD 2.x v_prediction checkpoints (2.0-v, 2.1) from
/// epsilon ones (2.x-base, SD-Turbo): ComfyUI's test, std above [`V_PREDICTION_STD`].
const V_PREDICTION_PROBE: &str =
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
const V_PREDICTION_STD: f64 = 0.09;

/// The refusal for a pickle checkpoint, with how to convert it.
pub fn pickle_refusal(path: &Path) -> Error {
    let p = path.display();
    let out = path.with_extension("safetensors");
    let out = out.display();
    Error::InvalidArgument(format!(
        "{p}: PyTorch pickle checkpoints (.ckpt, .pt, .pth, .bin) are not loaded: unpickling can run \
         arbitrary code from the file. Convert it to safetensors once, in Python: \
         python -c \"import torch, safetensors.torch as st; sd = torch.load('{p}', map_location='cpu', weights_only=True); \
         sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{out}')\" \
         (or with diffusers: StableDiffusionPipeline.from_single_file(path).save_pretrained(dir, safe_serialization=True)), \
         and pass the .safetensors file"
    ))
}

/// A single `.safetensors` file, mapped; a PyTorch pickle, by its extension or its first
/// bytes, is refused with how to convert it.
fn open_safetensors(path: &Path, device: &Device) -> Result<Weights> {
    if is_pickle_path(path) {
        return Err(pickle_refusal(path));
    }
    Weights::open(path, device).map_err(|e| {
        // A pickle under another name: torch.save's zip, or a bare pickle stream.
        let mut head = [0u8; 4];
        let sniffed = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok();
        if sniffed && (head == *b"PK\x03\x04" || head[0] == 0x80) {
            pickle_refusal(path)
        } else {
            e
        }
    })
}

/// A VAE on its own in one file (`--vae`), read under `config` (the model's VAE config: a
/// file carries none): diffusers' names (`decoder.up_blocks.*`, a VAE folder's weights
/// file) or the original layout (`decoder.up.*`, AUTOMATIC1111's VAE files such as
/// `sdxl_vae.safetensors` and `vae-ft-mse-840000-ema-pruned.safetensors`), bare or under a
/// checkpoint's `first_stage_model.` / `vae.` prefix.
pub fn vae_file(path: &Path, config: &VaeConfig, device: &Device) -> Result<Weights> {
    let file = open_safetensors(path, device)?;
    for prefix in std::iter::once("").chain(VAE_PREFIXES) {
        let has = |name: &str| file.file_shape(&format!("{prefix}{name}")).is_some();
        if has("decoder.up_blocks.0.resnets.0.conv1.weight") {
            return Ok(match prefix.strip_suffix('.') {
                Some(component) => file.pp(component),
                None => file,
            });
        }
        if has("decoder.up.0.block.0.conv1.weight") {
            return file.mapped(
                prefix,
                Arc::new(VaeMap {
                    up_blocks: config.up_block_types.len(),
                }),
            );
        }
    }
    Err(layout_error(
        path,
        format!(
            "not a VAE: no decoder tensors in diffusers' names (`decoder.up_blocks.*`) or the original layout \
             (`decoder.up.*`), bare or under `first_stage_model.` / `vae.`. Found: {}",
            summarize(&file.file_names())
        ),
    ))
}

/// Whether `path` names a PyTorch pickle by its extension.
pub fn is_pickle_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A single-file checkpoint, opened and recognised.
pub struct SingleFile {
    path: PathBuf,
    file: Weights,
    family: Family,
    vae_prefix: &'static str,
}

fn layout_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl SingleFile {
    /// Maps the file and recognises what it holds; anything but an SD 1.x / 2.x
    /// text-to-image checkpoint with all three components is an error saying what was found.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = open_safetensors(path, device)?;
        let names = file.file_names();
        let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
        let found = || summarize(&names);

        // diffusers' infer_diffusers_model_type: the base's OpenCLIP at embedders.1 wins.
        if has(REFINER_OPEN_CLIP) && !has(SDXL_OPEN_CLIP) {
            return Err(layout_error(
                path,
                format!(
                    "this is the SDXL refiner (its one text encoder, OpenCLIP ViT-bigG, is at `{REFINER_OPEN_CLIP}*`): \
                     the SDXL refiner is not supported yet; load an SDXL base checkpoint"
                ),
            ));
        }
        if has(PLAYGROUND_KEY) {
            return Err(layout_error(
                path,
                "this is a Playground v2.5 checkpoint (`edm_mean`: an EDM schedule), which is not supported",
            ));
        }
        if has("control_model.") {
            return Err(layout_error(
                path,
                format!(
                    "this is a ControlNet checkpoint, which is not supported. Found: {}",
                    found()
                ),
            ));
        }
        if !has(UNET) {
            let hint = if has("down_blocks.") || has("text_model.") || has("decoder.up_blocks.") {
                " (its names are diffusers' own: this looks like one component of a diffusers model \
                 folder; pass the folder, the one holding model_index.json)"
            } else {
                ""
            };
            return Err(layout_error(
                path,
                format!(
                    "not a Stable Diffusion checkpoint in {LAYOUT}: no UNet (no `{UNET}*` tensors){hint}. Found: {}",
                    found()
                ),
            ));
        }
        match file.file_shape(IN_CONV_KEY) {
            // 4 latent channels, or 9 for an inpainting model.
            Some(s) if s.len() == 4 && (s[1] == 4 || s[1] == 9) => {}
            Some(s) => {
                return Err(layout_error(
                    path,
                    format!("tensor `{IN_CONV_KEY}` has shape {s:?}: expected a UNet taking 4 latent channels (9 for inpainting)"),
                ))
            }
            None => {
                return Err(layout_error(
                    path,
                    format!("tensor `{IN_CONV_KEY}` (the UNet's conv_in) is missing"),
                ))
            }
        }
        if file
            .file_shape("model.diffusion_model.input_blocks.10.0.skip_connection.bias")
            .is_some()
            && file.file_shape(V2_KEY).and_then(|s| s.last()) != Some(&1024)
        {
            return Err(layout_error(
                path,
                "this is the x4 upscaler's checkpoint, which is not supported",
            ));
        }
        let family = if has(SDXL_OPEN_CLIP) {
            if !has(SDXL_CLIP) {
                return Err(layout_error(
                    path,
                    format!(
                        "this SDXL checkpoint has OpenCLIP ViT-bigG (`{SDXL_OPEN_CLIP}*`) but not its first text \
                         encoder, CLIP ViT-L (`{SDXL_CLIP}*`). Found: {}",
                        found()
                    ),
                ));
            }
            let projection = format!("{SDXL_OPEN_CLIP}text_projection");
            if file.file_shape(&projection).is_none() {
                return Err(layout_error(
                    path,
                    format!(
                        "this SDXL checkpoint has no `{projection}` (OpenCLIP's projection, diffusers' \
                         `text_projection.weight`, which makes the pooled text embedding SDXL's UNet reads)"
                    ),
                ));
            }
            Family::Sdxl
        } else if has("conditioner.embedders.") {
            return Err(layout_error(
                path,
                format!(
                    "SDXL-style text encoders (`conditioner.embedders.*`) without SDXL's OpenCLIP ViT-bigG \
                     (`{SDXL_OPEN_CLIP}*`): not an SDXL base checkpoint. Found: {}",
                    found()
                ),
            ));
        } else if has(CLIP) {
            Family::Sd1
        } else if has(OPEN_CLIP) {
            Family::Sd2
        } else {
            return Err(layout_error(
                path,
                format!(
                    "the checkpoint has no text encoder: neither CLIP (`{CLIP}*`, SD 1.x), OpenCLIP \
                     (`{OPEN_CLIP}*`, SD 2.x) nor SDXL's (`{SDXL_OPEN_CLIP}*`). Found: {}",
                    found()
                ),
            ));
        };
        let Some(vae_prefix) = VAE_PREFIXES.iter().rev().copied().find(|p| has(p)) else {
            return Err(layout_error(
                path,
                format!(
                    "the checkpoint has no VAE (no `first_stage_model.*` or `vae.*` tensors). Found: {}",
                    found()
                ),
            ));
        };
        // diffusers recognises SD 2.x by the UNet's cross-attention width instead (1024;
        // SD 1.x: 768); say so when the two disagree.
        let by_unet = match file.file_shape(V2_KEY).and_then(|s| s.last()) {
            Some(1024) => Some(Family::Sd2),
            Some(768) => Some(Family::Sd1),
            _ => None,
        };
        if let Some(by_unet) = by_unet.filter(|&f| f != family) {
            tracing::warn!(
                "{}: the text encoder says {} but the UNet's cross-attention width (`{V2_KEY}`) says {}",
                path.display(),
                family.name(),
                by_unet.name()
            );
        }
        Ok(SingleFile {
            path: path.to_path_buf(),
            file,
            family,
            vae_prefix,
        })
    }

    /// The built-in preset for this checkpoint: SD 1.5 for SD 1.x; for SD 2.x, 2.1
    /// (768, v_prediction) or 2.1-base (512, epsilon) as the probe bias says, and 2.1 (what
    /// diffusers' `from_single_file` assumes for every 2.x file) when it is absent; for
    /// SDXL, SDXL-Turbo when the file name says "turbo" (its weights are the base's
    /// architecture), else SDXL 1.0 base (diffusers' `xl_base`).
    pub fn default_preset(&self) -> Result<&'static Preset> {
        match self.family {
            Family::Sd1 => return Ok(&presets::SD15),
            Family::Sdxl => return Ok(self.sdxl_preset()),
            Family::Sd2 => {}
        }
        let Some(shape) = self
            .file
            .file_shape(V_PREDICTION_PROBE)
            .map(<[usize]>::to_vec)
        else {
            tracing::info!(
                "{}: no `{V_PREDICTION_PROBE}` to tell v_prediction from epsilon; assuming SD 2.1 \
                 (768x768, v_prediction) like diffusers' from_single_file; for a 2.x-base, SD-Turbo \
                 or other epsilon checkpoint pass --model-config sd2.1-base",
                self.path.display()
            );
            return Ok(&presets::SD21);
        };
        let values = self.file.get(V_PREDICTION_PROBE, &shape)?.to_vec()?;
        let n = values.len().max(1) as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let v_prediction = std > V_PREDICTION_STD;
        tracing::info!(
            "{}: SD 2.x, {} (std of `{V_PREDICTION_PROBE}` is {std:.3}; over {V_PREDICTION_STD} means \
             v_prediction); pass --model-config to choose otherwise",
            self.path.display(),
            if v_prediction { "v_prediction: SD 2.1 768x768" } else { "epsilon: SD 2.1-base 512x512" },
        );
        Ok(if v_prediction {
            &presets::SD21
        } else {
            &presets::SD21_BASE
        })
    }

    fn sdxl_preset(&self) -> &'static Preset {
        let turbo = self
            .path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().to_lowercase().contains("turbo"));
        let (preset, why) = if turbo {
            (&presets::SDXL_TURBO, "the file name contains \"turbo\"")
        } else {
            (
                &presets::SDXL_BASE,
                "the file name does not contain \"turbo\" (which picks sdxl-turbo)",
            )
        };
        tracing::info!(
            "{}: SDXL, preset {} ({}) because {why}; pass --model-config to choose otherwise",
            self.path.display(),
            preset.name,
            preset.description,
        );
        preset
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The UNet's weights, laid out for `config` (its `layers_per_block` places the blocks).
    pub fn unet(&self, config: &UNetConfig, config_path: &Path) -> Result<Weights> {
        let layers_per_block = match &config.layers_per_block {
            PerLevel::One(n) => *n,
            PerLevel::Each(_) => {
                return Err(Error::config(
                    config_path,
                    "single-file checkpoints need one `layers_per_block` for all blocks (as diffusers' conversion does)",
                ))
            }
        };
        self.file
            .mapped(UNET, Arc::new(UnetMap { layers_per_block }))
    }

    /// The UNet's input channels as its first convolution stores them: 9 for an inpainting
    /// checkpoint (latents, mask, masked-image latents), which is how diffusers'
    /// `from_single_file` tells one (`infer_diffusers_model_type`).
    pub fn unet_in_channels(&self) -> Option<usize> {
        self.file
            .file_shape(IN_CONV_KEY)
            .and_then(|s| s.get(1).copied())
    }

    /// The VAE's weights, laid out for `config` (its number of up blocks).
    pub fn vae(&self, config: &VaeConfig) -> Result<Weights> {
        self.file.mapped(
            self.vae_prefix,
            Arc::new(VaeMap {
                up_blocks: config.up_block_types.len(),
            }),
        )
    }

    /// The (first) text encoder's weights.
    pub fn text_encoder(&self, config: &ClipTextConfig) -> Result<Weights> {
        self.text_tower(self.family.text_encoder(), config)
    }

    /// SDXL's second text encoder's weights (`CLIPTextModelWithProjection`).
    pub fn text_encoder_2(&self, config: &ClipTextConfig, config_path: &Path) -> Result<Weights> {
        match self.family.text_encoder_2() {
            Some(tower) => self.text_tower(tower, config),
            None => Err(Error::config(
                config_path,
                format!(
                    "{}: an {} checkpoint has one text encoder; these configs are for two (SDXL)",
                    self.path.display(),
                    self.family.name()
                ),
            )),
        }
    }

    fn text_tower(&self, tower: TextTower, config: &ClipTextConfig) -> Result<Weights> {
        match tower {
            TextTower::Clip(prefix) => self.file.mapped(prefix, Arc::new(ClipMap)),
            TextTower::OpenClip { prefix, projection } => {
                // diffusers splits the fused q/k/v at text_projection's first dimension,
                // or at the text encoder's width when there is none.
                let split = self
                    .file
                    .file_shape(&format!("{prefix}text_projection"))
                    .and_then(|s| s.first().copied())
                    .unwrap_or(config.hidden_size);
                self.file
                    .mapped(prefix, Arc::new(OpenClipMap { split, projection }))
            }
        }
    }
}

/// "1234 tensors: 600 under model.diffusion_model., ..." for layout errors.
fn summarize(names: &[&str]) -> String {
    let mut groups: Vec<(String, usize)> = Vec::new();
    for n in names {
        let parts: Vec<&str> = n.split('.').collect();
        let depth = if parts.len() > 2 { 2 } else { parts.len() - 1 };
        let group = if depth == 0 {
            n.to_string()
        } else {
            format!("{}.*", parts[..depth].join("."))
        };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, count)) => *count += 1,
            None => groups.push((group, 1)),
        }
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = groups
        .iter()
        .take(6)
        .map(|(g, c)| format!("{c} x {g}"))
        .collect();
    let more = if groups.len() > 6 { ", ..." } else { "" };
    format!("{} tensors ({}{more})", names.len(), shown.join(", "))
}

/// A ResnetBlock2D's diffusers names in the original UNet's `ResBlock`.
fn unet_resnet(rest: &str) -> Option<String> {
    let (head, tail) = rest.split_once('.')?;
    let old = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{old}.{tail}"))
}

/// The original (LDM / sgm) name of a UNet module, which kohya's SDXL LoRAs use:
/// `down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in` (`layers_per_block`
/// places the blocks); `up_block_attends(b)` says whether up block `b` has attentions,
/// which puts its upsampler at `.2` rather than `.1`.
pub fn original_unet_module(
    module: &str,
    layers_per_block: usize,
    up_block_attends: &dyn Fn(usize) -> bool,
) -> Option<String> {
    let up_block = module
        .strip_prefix("up_blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|b| b.parse().ok());
    // The map asks `exists` only for an up block's upsampler at `.2`.
    let exists = |_: &str| up_block.is_some_and(up_block_attends);
    let name = UnetMap { layers_per_block }.original(&format!("{module}.weight"), &exists)?;
    name.strip_suffix(".weight").map(str::to_string)
}

/// `down_blocks.0.resnets.1.conv1.weight` → (0, "resnets", 1, "conv1.weight").
fn block_parts(rest: &str) -> Option<(usize, &str, usize, &str)> {
    let mut it = rest.splitn(4, '.');
    let block = it.next()?.parse().ok()?;
    let kind = it.next()?;
    let index = it.next()?.parse().ok()?;
    Some((block, kind, index, it.next()?))
}

/// The UNet: diffusers' `convert_ldm_unet_checkpoint`, inverted.
struct UnetMap {
    layers_per_block: usize,
}

impl UnetMap {
    fn original(&self, name: &str, exists: &dyn Fn(&str) -> bool) -> Option<String> {
        let lpb = self.layers_per_block;
        for (new, old) in [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            // SDXL's text_time conditioning (`addition_embed_type`).
            ("add_embedding.linear_1.", "label_emb.0.0."),
            ("add_embedding.linear_2.", "label_emb.0.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
        ] {
            if let Some(rest) = name.strip_prefix(new) {
                return Some(format!("{old}{rest}"));
            }
        }
        if let Some(rest) = name.strip_prefix("down_blocks.") {
            let (b, kind, j, rest) = block_parts(rest)?;
            let first = 1 + b * (lpb + 1);
            return match kind {
                "resnets" if j < lpb => Some(format!(
                    "input_blocks.{}.0.{}",
                    first + j,
                    unet_resnet(rest)?
                )),
                "attentions" if j < lpb => Some(format!("input_blocks.{}.1.{rest}", first + j)),
                "downsamplers" if j == 0 => {
                    let rest = rest.strip_prefix("conv.")?;
                    Some(format!("input_blocks.{}.0.op.{rest}", first + lpb))
                }
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("mid_block.") {
            let (kind, rest) = rest.split_once('.')?;
            let (k, rest) = rest.split_once('.')?;
            return match (kind, k) {
                ("resnets", "0") => Some(format!("middle_block.0.{}", unet_resnet(rest)?)),
                ("attentions", "0") => Some(format!("middle_block.1.{rest}")),
                ("resnets", "1") => Some(format!("middle_block.2.{}", unet_resnet(rest)?)),
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("up_blocks.") {
            let (b, kind, j, rest) = block_parts(rest)?;
            let first = b * (lpb + 1);
            return match kind {
                "resnets" if j <= lpb => Some(format!(
                    "output_blocks.{}.0.{}",
                    first + j,
                    unet_resnet(rest)?
                )),
                "attentions" if j <= lpb => Some(format!("output_blocks.{}.1.{rest}", first + j)),
                "upsamplers" if j == 0 => {
                    // After the resnet (.0) and, in a cross-attention block, the attention
                    // (.1): diffusers takes `.2.conv` when there is one, else `.1.conv`.
                    let rest = rest.strip_prefix("conv.")?;
                    let i = first + lpb;
                    let two = format!("output_blocks.{i}.2.conv.{rest}");
                    Some(if exists(&two) {
                        two
                    } else {
                        format!("output_blocks.{i}.1.conv.{rest}")
                    })
                }
                _ => None,
            };
        }
        None
    }
}

impl TensorMap for UnetMap {
    fn locate(&self, name: &str, exists: &dyn Fn(&str) -> bool) -> Option<Located> {
        self.original(name, exists).map(Located::whole)
    }

    fn layout(&self) -> &str {
        LAYOUT
    }
}

/// The VAE (decoder and post_quant_conv; the encoder too, though generation never reads
/// it): diffusers' `convert_ldm_vae_checkpoint`, inverted.
struct VaeMap {
    up_blocks: usize,
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(tail) => format!("nin_shortcut.{tail}"),
        None => rest.to_string(),
    }
}

impl VaeMap {
    fn original(&self, name: &str) -> Option<(String, Part)> {
        let whole = |n: String| Some((n, Part::Whole));
        if name.starts_with("post_quant_conv.") || name.starts_with("quant_conv.") {
            return whole(name.to_string());
        }
        let (side, rest) = name.split_once('.')?;
        if side != "decoder" && side != "encoder" {
            return None;
        }
        if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            return whole(name.to_string());
        }
        if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
            return whole(format!("{side}.norm_out.{tail}"));
        }
        if let Some(mid) = rest.strip_prefix("mid_block.") {
            if let Some(r) = mid.strip_prefix("resnets.") {
                let (k, tail) = r.split_once('.')?;
                let k: usize = k.parse().ok()?;
                return (k < 2).then(|| {
                    (
                        format!("{side}.mid.block_{}.{}", k + 1, vae_resnet(tail)),
                        Part::Whole,
                    )
                });
            }
            let tail = mid.strip_prefix("attentions.0.")?;
            let (module, param) = tail.rsplit_once('.')?;
            let old = match module {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out.0" => "proj_out",
                _ => return None,
            };
            // The original attention's projections are 1x1 convolutions.
            let part = if module == "group_norm" {
                Part::Whole
            } else {
                Part::DropTrailingOnes
            };
            return Some((format!("{side}.mid.attn_1.{old}.{param}"), part));
        }
        if side == "decoder" {
            let (i, kind, j, tail) = block_parts(rest.strip_prefix("up_blocks.")?)?;
            let level = self.up_blocks.checked_sub(i + 1)?;
            return match kind {
                "resnets" => whole(format!("decoder.up.{level}.block.{j}.{}", vae_resnet(tail))),
                "upsamplers" if j == 0 => whole(format!("decoder.up.{level}.upsample.{}", tail)),
                _ => None,
            };
        }
        let (i, kind, j, tail) = block_parts(rest.strip_prefix("down_blocks.")?)?;
        match kind {
            "resnets" => whole(format!("encoder.down.{i}.block.{j}.{}", vae_resnet(tail))),
            "downsamplers" if j == 0 => whole(format!("encoder.down.{i}.downsample.{tail}")),
            _ => None,
        }
    }
}

impl TensorMap for VaeMap {
    fn locate(&self, name: &str, _exists: &dyn Fn(&str) -> bool) -> Option<Located> {
        self.original(name)
            .map(|(name, part)| Located { name, part })
    }

    fn layout(&self) -> &str {
        LAYOUT
    }
}

/// The CLIP ViT-L text encoder of SD 1.x and SDXL: stored with transformers' own names
/// (diffusers' `convert_ldm_clip_checkpoint`).
struct ClipMap;

impl TensorMap for ClipMap {
    fn locate(&self, name: &str, _exists: &dyn Fn(&str) -> bool) -> Option<Located> {
        name.starts_with("text_model.")
            .then(|| Located::whole(name))
    }

    fn layout(&self) -> &str {
        LAYOUT
    }
}

/// The OpenCLIP text tower of SD 2.x (ViT-H) and SDXL (ViT-bigG) as diffusers'
/// `convert_open_clip_checkpoint` reads it: renamed layers, q/k/v fused in `in_proj_*`, and
/// for SDXL the projection stored the other way round. SD 2.x's last layer (it conditions
/// on the penultimate one) has no diffusers counterpart and is never asked for.
struct OpenClipMap {
    /// Rows per q, k, v block of `in_proj_weight`.
    split: usize,
    /// Whether `text_projection.weight` is read (SDXL's second encoder).
    projection: bool,
}

impl TensorMap for OpenClipMap {
    fn locate(&self, name: &str, _exists: &dyn Fn(&str) -> bool) -> Option<Located> {
        if name == "text_projection.weight" {
            return self.projection.then(|| Located {
                name: "text_projection".into(),
                part: Part::Transposed,
            });
        }
        let rest = name.strip_prefix("text_model.")?;
        let whole = |n: String| Some(Located::whole(n));
        match rest {
            "embeddings.token_embedding.weight" => return whole("token_embedding.weight".into()),
            "embeddings.position_embedding.weight" => return whole("positional_embedding".into()),
            "final_layer_norm.weight" => return whole("ln_final.weight".into()),
            "final_layer_norm.bias" => return whole("ln_final.bias".into()),
            _ => {}
        }
        let rest = rest.strip_prefix("encoder.layers.")?;
        let (i, tail) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let block = format!("transformer.resblocks.{i}.");
        let (module, param) = tail.rsplit_once('.')?;
        if param != "weight" && param != "bias" {
            return None;
        }
        let qkv = match module {
            "self_attn.q_proj" => Some(0),
            "self_attn.k_proj" => Some(1),
            "self_attn.v_proj" => Some(2),
            _ => None,
        };
        if let Some(k) = qkv {
            return Some(Located {
                name: format!("{block}attn.in_proj_{param}"),
                part: Part::Rows {
                    start: k * self.split,
                    // diffusers' `weight[2 * dim:]`: v runs to the end.
                    len: (k < 2).then_some(self.split),
                },
            });
        }
        let old = match module {
            "self_attn.out_proj" => "attn.out_proj",
            "layer_norm1" => "ln_1",
            "layer_norm2" => "ln_2",
            "mlp.fc1" => "mlp.c_fc",
            "mlp.fc2" => "mlp.c_proj",
            _ => return None,
        };
        whole(format!("{block}{old}.{param}"))
    }

    fn layout(&self) -> &str {
        LAYOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(name: &str) -> Option<String> {
        UnetMap {
            layers_per_block: 2,
        }
        .locate(name, &|_| false)
        .map(|l| l.name)
    }

    #[test]
    fn unet_names_follow_diffusers() {
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            (
                "down_blocks.0.resnets.0.norm1.weight",
                "input_blocks.1.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.attentions.1.proj_in.weight",
                "input_blocks.2.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.bias",
                "input_blocks.4.0.skip_connection.bias",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.weight",
                "input_blocks.11.0.emb_layers.1.weight",
            ),
            // SDXL: more than one transformer block per attention.
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight",
                "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight",
            ),
            (
                "mid_block.resnets.1.conv2.weight",
                "middle_block.2.out_layers.3.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv1.weight",
                "output_blocks.2.0.in_layers.2.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.norm.bias",
                "output_blocks.11.1.norm.bias",
            ),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (d, o) in cases {
            assert_eq!(unet(d).as_deref(), Some(o), "{d}");
        }
        assert_eq!(unet("down_blocks.0.resnets.2.norm1.weight"), None);
        assert_eq!(unet("up_blocks.0.upsamplers.0.weight"), None);
        // `exists` is asked about names under the UNet's prefix, prefix left out.
        let with_attention = UnetMap {
            layers_per_block: 2,
        }
        .locate("up_blocks.1.upsamplers.0.conv.bias", &|n| {
            n == "output_blocks.5.2.conv.bias"
        });
        assert_eq!(with_attention.unwrap().name, "output_blocks.5.2.conv.bias");
    }

    #[test]
    fn vae_and_text_names_follow_diffusers() {
        let vae = VaeMap { up_blocks: 4 };
        let v = |n: &str| vae.locate(n, &|_| false).unwrap();
        assert_eq!(
            v("decoder.up_blocks.0.resnets.1.conv_shortcut.weight").name,
            "decoder.up.3.block.1.nin_shortcut.weight"
        );
        assert_eq!(
            v("decoder.up_blocks.2.upsamplers.0.conv.bias").name,
            "decoder.up.1.upsample.conv.bias"
        );
        let q = v("decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(q.name, "decoder.mid.attn_1.proj_out.weight");
        assert_eq!(q.part, Part::DropTrailingOnes);
        assert_eq!(
            v("decoder.mid_block.resnets.1.norm2.bias").name,
            "decoder.mid.block_2.norm2.bias"
        );
        assert_eq!(
            v("decoder.conv_norm_out.weight").name,
            "decoder.norm_out.weight"
        );

        let clip = ClipMap.locate("text_model.final_layer_norm.bias", &|_| false);
        assert_eq!(clip.unwrap().name, "text_model.final_layer_norm.bias");
        assert!(ClipMap
            .locate("text_projection.weight", &|_| false)
            .is_none());

        let sd2 = OpenClipMap {
            split: 1024,
            projection: false,
        };
        let k = sd2
            .locate("text_model.encoder.layers.3.self_attn.k_proj.bias", &|_| {
                false
            })
            .unwrap();
        assert_eq!(k.name, "transformer.resblocks.3.attn.in_proj_bias");
        assert_eq!(
            k.part,
            Part::Rows {
                start: 1024,
                len: Some(1024)
            }
        );
        assert_eq!(
            sd2.locate("text_model.encoder.layers.0.mlp.fc2.weight", &|_| false)
                .unwrap()
                .name,
            "transformer.resblocks.0.mlp.c_proj.weight"
        );
        assert!(sd2
            .locate("embeddings.token_embedding.weight", &|_| false)
            .is_none());
        // SD 2.x's CLIPTextModel has no projection (diffusers ignores the stored one).
        assert!(sd2.locate("text_projection.weight", &|_| false).is_none());

        let sdxl = OpenClipMap {
            split: 1280,
            projection: true,
        };
        let p = sdxl.locate("text_projection.weight", &|_| false).unwrap();
        assert_eq!(p.name, "text_projection");
        assert_eq!(p.part, Part::Transposed);
        let v = sdxl
            .locate(
                "text_model.encoder.layers.31.self_attn.v_proj.weight",
                &|_| false,
            )
            .unwrap();
        assert_eq!(v.name, "transformer.resblocks.31.attn.in_proj_weight");
        assert_eq!(
            v.part,
            Part::Rows {
                start: 2560,
                len: None
            }
        );
    }

    #[test]
    fn families_keep_their_text_encoders_where_diffusers_looks() {
        let prefix = |t: TextTower| match t {
            TextTower::Clip(p) => (p, false, false),
            TextTower::OpenClip { prefix, projection } => (prefix, true, projection),
        };
        assert_eq!(prefix(Family::Sd1.text_encoder()), (CLIP, false, false));
        assert_eq!(prefix(Family::Sd2.text_encoder()), (OPEN_CLIP, true, false));
        assert_eq!(
            prefix(Family::Sdxl.text_encoder()),
            ("conditioner.embedders.0.transformer.", false, false)
        );
        assert_eq!(
            Family::Sdxl.text_encoder_2().map(prefix),
            Some(("conditioner.embedders.1.model.", true, true))
        );
        assert!(Family::Sd1.text_encoder_2().is_none() && Family::Sd2.text_encoder_2().is_none());
        assert_eq!(Family::Sdxl.name(), "SDXL");
    }
}
