//! LoRA files: safetensors in the layouts people download, read into low-rank pairs per
//! layer with each pair's alpha / rank scale.
//!
//! - kohya / AUTOMATIC1111 (sd-scripts, LoCon): `lora_unet_<module, _ for .>.lora_down.weight`
//!   `[r, in(, kh, kw)]`, `.lora_up.weight` `[out, r(, 1, 1)]`, `.alpha` (a scalar; scale
//!   alpha / r, 1 without it); `lora_te_` / `lora_te1_` the text encoder, `lora_te2_` SDXL's
//!   second one.
//! - PEFT / diffusers: `unet.<module>.lora_A.weight` (down), `.lora_B.weight` (up), and
//!   `text_encoder.` / `text_encoder_2.`; a key without a component prefix is the UNet's, as
//!   diffusers reads it. Alpha from diffusers' `lora_adapter_metadata` in the header (the
//!   LoraConfig per component: `lora_alpha`, `r`, `alpha_pattern`, `rank_pattern`,
//!   `use_rslora`), else a `<module>.alpha` tensor, else alpha = rank. Older diffusers
//!   spellings of the pair (`.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`,
//!   `attn1.processor.to_q_lora.down.weight`) are read too.
//!
//! Anything else in the file is an error naming the tensor (DoRA and LyCORIS's LoHa/LoKr by
//! name), as is a pair with a half missing: a key is never skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::lora::{layer_key, LoraComponent};
use crate::model::weights::Weights;
use crate::tensor::Device;

/// One layer's low-rank change: `scale * up @ down` (times the user's weight).
pub struct LoraLayer {
    pub component: LoraComponent,
    /// The module's name as [`layer_key`] writes it.
    pub module: String,
    /// The stored name of the down tensor, for messages.
    pub key: String,
    pub down: Vec<f32>,
    pub down_shape: Vec<usize>,
    pub up: Vec<f32>,
    pub up_shape: Vec<usize>,
    /// alpha / rank (alpha / sqrt(rank) for rsLoRA).
    pub scale: f32,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.down_shape[0]
    }

    /// Whether the pair makes a change of `weight`'s shape (`[out, in]`, `[out, in, kh, kw]`):
    /// down `[r, in(, kh, kw)]` (a linear layer's may carry `1, 1`), up `[out, r(, 1, 1)]`.
    pub(crate) fn check_fits(&self, weight: &[usize], lora: &LoraFile) -> Result<()> {
        let fan_in: usize = weight[1..].iter().product();
        let down_in: usize = self.down_shape[1..].iter().product();
        let kernel_matches = match (self.down_shape.len(), weight.len()) {
            (4, 4) => self.down_shape[2..] == weight[2..],
            _ => true,
        };
        if self.up_shape[0] != weight[0] || down_in != fan_in || !kernel_matches {
            return Err(lora.error(format!(
                "`{}` {:?} with its up {:?} does not fit the model's {} weight {weight:?}: the LoRA is for another model",
                self.key,
                self.down_shape,
                self.up_shape,
                self.component.name(),
            )));
        }
        Ok(())
    }
}

/// A LoRA file read into its layers.
pub struct LoraFile {
    path: PathBuf,
    name: String,
    layers: Vec<LoraLayer>,
}

/// Which half of a pair (or which extra) a tensor is.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// The pair spellings: (suffix, role), longest first where one ends another.
const ROLES: [(&str, Role); 9] = [
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// The tensors one layer's change is made of.
#[derive(Default)]
struct Pair {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

impl LoraFile {
    /// Reads a LoRA `.safetensors` file; `name` is what requests and messages call it.
    pub fn open(path: &Path, name: &str) -> Result<LoraFile> {
        let error = |message: String| lora_error(path, name, message);
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if extension != "safetensors" {
            return Err(error(format!(
                "only .safetensors LoRA files are read (a .{extension} file may be a pickle, which can run code when loaded)"
            )));
        }
        let weights = Weights::open(path, &Device::Cpu)?;
        let config = PeftConfigs::read(&weights).map_err(error)?;

        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        for stored in weights.file_names() {
            let Some((stem, role)) = ROLES
                .iter()
                .find_map(|(suffix, role)| stored.strip_suffix(suffix).map(|s| (s, *role)))
            else {
                return Err(error(unknown_tensor(stored)));
            };
            let pair = pairs.entry(stem.to_string()).or_default();
            let slot = match role {
                Role::Down => &mut pair.down,
                Role::Up => &mut pair.up,
                Role::Alpha => &mut pair.alpha,
            };
            *slot = Some(stored.to_string());
        }

        let mut layers = Vec::with_capacity(pairs.len());
        for (stem, pair) in &pairs {
            let (Some(down_key), Some(up_key)) = (&pair.down, &pair.up) else {
                let (has, lacks) = match (&pair.down, &pair.up, &pair.alpha) {
                    (Some(d), None, _) => (d.clone(), "up tensor"),
                    (None, Some(u), _) => (u.clone(), "down tensor"),
                    (None, None, Some(a)) => (a.clone(), "down and up tensors"),
                    // A stem exists only because some tensor had one of the three roles.
                    (_, _, _) => (stem.clone(), "tensors"),
                };
                return Err(error(format!(
                    "tensor `{has}` has no matching {lacks} in the file"
                )));
            };
            let (component, module) = component_and_module(stem);
            let read = |key: &str| -> Result<(Vec<f32>, Vec<usize>)> {
                let shape = weights.file_shape(key).unwrap_or_default().to_vec();
                let values = weights.get(key, &shape)?.to_vec()?;
                Ok((values, shape))
            };
            let (down, down_shape) = read(down_key)?;
            let (up, up_shape) = read(up_key)?;
            let rank = down_shape.first().copied().unwrap_or(0);
            let pair_ok = matches!(down_shape.len(), 2 | 4)
                && matches!(up_shape.len(), 2 | 4)
                && up_shape[2..].iter().all(|&d| d == 1)
                && up_shape[1] == rank
                && rank > 0;
            if !pair_ok {
                return Err(error(format!(
                    "`{down_key}` {down_shape:?} and `{up_key}` {up_shape:?} are not a low-rank pair (down [rank, in(, kh, kw)], up [out, rank(, 1, 1)])"
                )));
            }
            let alpha = match &pair.alpha {
                Some(key) => {
                    let (values, _) = read(key)?;
                    match values.as_slice() {
                        [a] => Some(*a),
                        _ => return Err(error(format!("`{key}` is not a single number"))),
                    }
                }
                None => None,
            };
            let scale = config
                .scale(component, &module_name(stem), rank, alpha)
                .map_err(error)?;
            if !scale.is_finite() {
                return Err(error(format!(
                    "`{down_key}`: its alpha / rank is not finite"
                )));
            }
            layers.push(LoraLayer {
                component,
                module: layer_key(&module),
                key: down_key.clone(),
                down,
                down_shape,
                up,
                up_shape,
                scale,
            });
        }
        if layers.is_empty() {
            return Err(error("the file holds no LoRA layers".into()));
        }
        Ok(LoraFile {
            path: path.to_path_buf(),
            name: name.to_string(),
            layers,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn layers(&self) -> &[LoraLayer] {
        &self.layers
    }

    /// An error about this file.
    pub(crate) fn error(&self, message: String) -> Error {
        lora_error(&self.path, &self.name, message)
    }
}

fn lora_error(path: &Path, name: &str, message: String) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: format!("LoRA `{name}`: {message}"),
    }
}

/// Why a tensor is not read, with the formats that are.
fn unknown_tensor(stored: &str) -> String {
    let what = if stored.contains("dora_scale") || stored.contains("lora_magnitude_vector") {
        "is a DoRA magnitude; DoRA LoRAs are not supported"
    } else if stored.contains("hada_") || stored.contains("lokr_") {
        "is LyCORIS LoHa/LoKr, which is not supported"
    } else if stored.contains(".lora_A.") || stored.contains(".lora_B.") {
        "is a LoRA bias or a named PEFT adapter's tensor, which is not supported"
    } else {
        "is not part of a LoRA in a known layout (kohya lora_down/lora_up/alpha, PEFT lora_A/lora_B)"
    };
    format!("tensor `{stored}` {what}")
}

/// The component and dotted module name of a pair's stem.
fn component_and_module(stem: &str) -> (LoraComponent, String) {
    (component_of(stem), module_name(stem))
}

fn component_of(stem: &str) -> LoraComponent {
    let stem = stem.strip_prefix("base_model.model.").unwrap_or(stem);
    if stem.starts_with("lora_te2_") || stem.starts_with("text_encoder_2.") {
        LoraComponent::TextEncoder2
    } else if stem.starts_with("lora_te_")
        || stem.starts_with("lora_te1_")
        || stem.starts_with("text_encoder.")
    {
        LoraComponent::TextEncoder
    } else {
        LoraComponent::Unet
    }
}

/// The module a stem names, without its component prefix, in dots where the file used dots
/// (kohya's underscores stay; [`layer_key`] compares the two forms).
fn module_name(stem: &str) -> String {
    let stem = stem.strip_prefix("base_model.model.").unwrap_or(stem);
    for prefix in [
        "lora_unet_",
        "lora_te1_",
        "lora_te2_",
        "lora_te_",
        "unet.",
        "text_encoder_2.",
        "text_encoder.",
    ] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return diffusers_processor_name(rest);
        }
    }
    diffusers_processor_name(stem)
}

/// diffusers' old attention-processor spelling, `attn1.processor.to_q_lora`, as the module
/// it changes, `attn1.to_q` (`to_out_lora`: `to_out.0`).
fn diffusers_processor_name(module: &str) -> String {
    let module = module.replace(".processor.", ".");
    match module.rsplit_once('.') {
        Some((parent, "to_out_lora")) => format!("{parent}.to_out.0"),
        Some((parent, last)) if last.ends_with("_lora") => {
            format!("{parent}.{}", last.trim_end_matches("_lora"))
        }
        _ => module,
    }
}

/// diffusers' `lora_adapter_metadata`: the PEFT LoraConfig of each component.
#[derive(Default)]
struct PeftConfigs(HashMap<String, Value>);

impl PeftConfigs {
    fn read(weights: &Weights) -> std::result::Result<PeftConfigs, String> {
        let Some(text) = weights.file_metadata("lora_adapter_metadata") else {
            return Ok(PeftConfigs::default());
        };
        let map: HashMap<String, Value> = serde_json::from_str(text)
            .map_err(|e| format!("its lora_adapter_metadata is not a JSON object: {e}"))?;
        for (key, value) in &map {
            if key.ends_with(".use_dora") && value.as_bool() == Some(true) {
                return Err(format!(
                    "its metadata says {key}: DoRA LoRAs are not supported"
                ));
            }
        }
        Ok(PeftConfigs(map))
    }

    fn get(&self, component: LoraComponent, field: &str) -> Option<&Value> {
        self.0.get(&format!("{}.{field}", component.name()))
    }

    /// PEFT's `scaling`: alpha / r (alpha / sqrt(r) with rsLoRA), alpha and r from the
    /// component's config (its patterns first), else the file's alpha tensor over the
    /// tensors' rank, else 1.
    fn scale(
        &self,
        component: LoraComponent,
        module: &str,
        rank: usize,
        alpha_tensor: Option<f32>,
    ) -> std::result::Result<f32, String> {
        let Some(lora_alpha) = self.get(component, "lora_alpha").and_then(Value::as_f64) else {
            return Ok(alpha_tensor.map_or(1.0, |a| a / rank as f32));
        };
        let alpha = self
            .pattern(component, "alpha_pattern", module)?
            .unwrap_or(lora_alpha);
        let r = match self.pattern(component, "rank_pattern", module)? {
            Some(r) => r,
            None => self
                .get(component, "r")
                .and_then(Value::as_f64)
                .unwrap_or(rank as f64),
        };
        if r != rank as f64 {
            return Err(format!(
                "its metadata gives {} `{module}` rank {r}, but its tensors have rank {rank}",
                component.name()
            ));
        }
        let rslora = self.get(component, "use_rslora").and_then(Value::as_bool) == Some(true);
        Ok((alpha / if rslora { r.sqrt() } else { r }) as f32)
    }

    /// The value of the first `alpha_pattern` / `rank_pattern` entry naming `module` (PEFT
    /// matches a pattern against the end of the module's dotted name).
    fn pattern(
        &self,
        component: LoraComponent,
        field: &str,
        module: &str,
    ) -> std::result::Result<Option<f64>, String> {
        let Some(Value::Object(patterns)) = self.get(component, field) else {
            return Ok(None);
        };
        for (pattern, value) in patterns {
            if pattern.contains(|c: char| "*+?[](){}|^$\\".contains(c)) {
                return Err(format!(
                    "its metadata's {field} `{pattern}` is a regular expression, which is not supported"
                ));
            }
            let dotted = pattern.replace('_', ".");
            let matches = module == pattern
                || module.ends_with(&format!(".{pattern}"))
                || layer_key(module).ends_with(&layer_key(&dotted));
            if matches {
                return value
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("its metadata's {field} `{pattern}` is not a number"));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_name_their_component_and_module() {
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                LoraComponent::Unet,
                "down_blocks_0_attentions_0_proj_in",
            ),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1",
                LoraComponent::TextEncoder,
                "encoder_layers_0_mlp_fc1",
            ),
            (
                "lora_te2_text_model_encoder_layers_3_self_attn_q_proj",
                LoraComponent::TextEncoder2,
                "encoder_layers_3_self_attn_q_proj",
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
                LoraComponent::Unet,
                "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
            ),
            (
                "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_k_lora",
                LoraComponent::Unet,
                "up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
            ),
            (
                "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
                LoraComponent::TextEncoder,
                "encoder_layers_1_self_attn_v_proj",
            ),
            (
                "down_blocks.1.resnets.0.conv1",
                LoraComponent::Unet,
                "down_blocks_1_resnets_0_conv1",
            ),
        ];
        for (stem, component, key) in cases {
            let (c, module) = component_and_module(stem);
            assert_eq!((c, layer_key(&module).as_str()), (component, key), "{stem}");
        }
    }

    #[test]
    fn peft_scales_follow_the_config_and_its_patterns() {
        let configs = PeftConfigs(
            serde_json::from_str(
                r#"{"unet.lora_alpha": 8, "unet.r": 4, "unet.use_rslora": false,
                    "unet.alpha_pattern": {"down_blocks.0.attentions.0.proj_in": 2},
                    "unet.rank_pattern": {"conv1": 2},
                    "text_encoder.lora_alpha": 9, "text_encoder.r": 9, "text_encoder.use_rslora": true}"#,
            )
            .unwrap(),
        );
        let unet = LoraComponent::Unet;
        assert_eq!(
            configs.scale(unet, "mid_block.attn1.to_q", 4, None),
            Ok(2.0)
        );
        assert_eq!(
            configs.scale(unet, "down_blocks.0.attentions.0.proj_in", 4, None),
            Ok(0.5)
        );
        assert_eq!(
            configs.scale(unet, "down_blocks.0.resnets.0.conv1", 2, None),
            Ok(4.0)
        );
        let err = configs
            .scale(unet, "mid_block.attn1.to_q", 3, None)
            .unwrap_err();
        assert!(err.contains("rank 4, but its tensors have rank 3"), "{err}");
        // rsLoRA: alpha / sqrt(r).
        assert_eq!(
            configs.scale(LoraComponent::TextEncoder, "x", 9, None),
            Ok(3.0)
        );
        // No config for the component: the alpha tensor over the rank, else 1.
        let none = PeftConfigs::default();
        assert_eq!(none.scale(unet, "x", 4, Some(2.0)), Ok(0.5));
        assert_eq!(none.scale(unet, "x", 4, None), Ok(1.0));
    }
}
