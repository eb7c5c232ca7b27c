//! LoRA: low-rank changes to a model's Linear and Conv2d weights, from the files people
//! download (see [`file`] for the formats), applied as diffusers' `load_lora_weights` +
//! `set_adapters` do: each layer's weight plus `scale * alpha / rank * up @ down`, summed
//! over the LoRAs in use.
//!
//! Every Linear and Conv2d weight is a [`LayerWeight`]. The model's text encoders and UNet
//! enter theirs in a [`LayerRegistry`] as they are built (through
//! [`Weights::registering`](crate::model::weights::Weights::registering)), by diffusers'
//! names, which is how a LoRA's keys find them. [`Adapters::activate`] merges a set of
//! LoRAs into copies of the weights they change and leaves the loaded tensors as they are,
//! so going back to the base model is dropping the copies: a failed or cancelled request
//! cannot corrupt it. The merged set stays while requests keep asking for it.

pub mod file;
pub mod library;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::model::config::{PerLevel, UNetConfig};
pub use crate::model::lora::file::{LoraFile, LoraLayer};
use crate::model::single_file::original_unet_module;
use crate::tensor::{Device, Tensor};

/// The part of a model a LoRA layer belongs to, named as diffusers' pipeline attributes
/// (and PEFT files' key prefixes) are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraComponent {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl LoraComponent {
    pub fn name(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
            LoraComponent::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// The weight of a Linear or Conv2d layer: the loaded tensor, or while a LoRA set is
/// active, a merged copy of it. The loaded tensor is never written.
#[derive(Clone)]
pub struct LayerWeight(Arc<LayerSlot>);

struct LayerSlot {
    base: Tensor,
    merged: RwLock<Option<Tensor>>,
}

impl LayerWeight {
    pub fn new(base: Tensor) -> Self {
        LayerWeight(Arc::new(LayerSlot {
            base,
            merged: RwLock::new(None),
        }))
    }

    /// The weight to compute with now (a cheap handle: tensors share their storage).
    pub fn current(&self) -> Tensor {
        let merged = self.0.merged.read().unwrap_or_else(|p| p.into_inner());
        merged.as_ref().unwrap_or(&self.0.base).clone()
    }

    /// The weight as loaded.
    pub fn base(&self) -> &Tensor {
        &self.0.base
    }

    pub fn shape(&self) -> &[usize] {
        self.0.base.shape()
    }

    fn set_merged(&self, merged: Option<Tensor>) {
        *self.0.merged.write().unwrap_or_else(|p| p.into_inner()) = merged;
    }
}

/// The layers of one component, by diffusers' module names (`down_blocks.0.resnets.1.conv1`,
/// `encoder.layers.3.self_attn.q_proj`), entered as the component is built.
#[derive(Clone, Default)]
pub struct LayerRegistry(Arc<Mutex<Vec<(String, LayerWeight)>>>);

impl LayerRegistry {
    pub fn enter(&self, name: &str, weight: &LayerWeight) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), weight.clone()));
    }

    fn layers(&self) -> Vec<(String, LayerWeight)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How a module name is compared between a model and a LoRA file: kohya writes module
/// names with `_` for `.`, and text encoders are named with or without transformers 4's
/// `text_model.` level (transformers 5 saves them without it; diffusers strips it too).
/// No module name of these models has an `_` where another has a `.`, so this is exact.
pub fn layer_key(module: &str) -> String {
    let key = module.replace('.', "_");
    match key.strip_prefix("text_model_") {
        Some(rest) => rest.to_string(),
        None => key,
    }
}

/// One LoRA in use and the user's weight for it (A1111's `<lora:name:scale>`, diffusers'
/// `set_adapters(..., adapter_weights)`).
#[derive(Clone)]
pub struct LoraChoice {
    pub lora: Arc<LoraFile>,
    pub scale: f32,
}

impl PartialEq for LoraChoice {
    /// The same loaded file (not just the same name) at the same scale.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.lora, &other.lora) && self.scale == other.scale
    }
}

impl std::fmt::Debug for LoraChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.lora.name(), self.scale)
    }
}

/// Another name a LoRA may give a module (kohya's SDXL files use the original UNet's).
type Alias = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A model's LoRA-changeable layers, per component, and the set merged into them now.
#[derive(Default)]
pub struct Adapters {
    components: Vec<(LoraComponent, LayerRegistry)>,
    aliases: Vec<(LoraComponent, Alias)>,
    active: Mutex<Vec<LoraChoice>>,
}

impl Adapters {
    /// Lets LoRAs name the UNet's modules as the original (LDM / sgm) UNet does
    /// (`input_blocks.4.1.proj_in`), as kohya writes SDXL LoRAs and diffusers'
    /// `_maybe_map_sgm_blocks_to_diffusers` reads them. Only for one `layers_per_block`
    /// (every real model), as that conversion needs.
    pub fn accept_original_unet_names(&mut self, config: &UNetConfig) {
        let PerLevel::One(layers_per_block) = config.layers_per_block else {
            return;
        };
        let attends: Vec<bool> = config
            .up_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        self.aliases.push((
            LoraComponent::Unet,
            Box::new(move |module| {
                let attends = |b: usize| attends.get(b).copied().unwrap_or(false);
                original_unet_module(module, layers_per_block, &attends)
            }),
        ));
    }

    /// The registry `component`'s layers enter themselves in (made on first call).
    pub fn registry(&mut self, component: LoraComponent) -> LayerRegistry {
        if let Some((_, r)) = self.components.iter().find(|(c, _)| *c == component) {
            return r.clone();
        }
        let registry = LayerRegistry::default();
        self.components.push((component, registry.clone()));
        registry
    }

    /// Makes `choices` the LoRAs in effect: nothing to do when they already are (`None`),
    /// else the base weights are restored and the new set merged (`Some(time taken)`). On
    /// an error the model is left as loaded, with no LoRA.
    pub fn activate(&self, choices: &[LoraChoice]) -> Result<Option<Duration>> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.as_slice() == choices {
            return Ok(None);
        }
        let start = Instant::now();
        self.restore();
        active.clear();
        // The GPU's cached bind groups hold the replaced copies' buffers alive.
        if let Some(device) = self.device() {
            device.forget_cached_bindings();
        }
        if !choices.is_empty() {
            if let Err(e) = self.merge(choices) {
                self.restore();
                return Err(e);
            }
            *active = choices.to_vec();
        }
        Ok(Some(start.elapsed()))
    }

    /// The LoRAs merged now.
    pub fn active(&self) -> Vec<LoraChoice> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The device the layers live on (all on one).
    fn device(&self) -> Option<Device> {
        let (_, registry) = self.components.first()?;
        let layers = registry.0.lock().unwrap_or_else(|p| p.into_inner());
        layers.first().map(|(_, w)| w.base().device())
    }

    fn restore(&self) {
        for (_, registry) in &self.components {
            for (_, weight) in registry.layers() {
                weight.set_merged(None);
            }
        }
    }

    /// Finds every layer of every choice in the model (all of them, or an error naming the
    /// ones that are not there), then merges each changed layer once.
    fn merge(&self, choices: &[LoraChoice]) -> Result<()> {
        // Each layer by its key, and by its aliases' keys.
        let registries: HashMap<LoraComponent, HashMap<String, LayerWeight>> = self
            .components
            .iter()
            .map(|(c, r)| {
                let mut keys = HashMap::new();
                for (name, weight) in r.layers() {
                    for (_, alias) in self.aliases.iter().filter(|(a, _)| a == c) {
                        if let Some(other) = alias(&name) {
                            keys.insert(layer_key(&other), weight.clone());
                        }
                    }
                    keys.insert(layer_key(&name), weight);
                }
                (*c, keys)
            })
            .collect();
        // Per changed layer: its weight and each LoRA's part with its full scale.
        let mut changes: Vec<(LayerWeight, Vec<LayerChange>)> = Vec::new();
        // By the layer itself: two LoRAs may name one layer differently (kohya's original
        // UNet names, PEFT's diffusers names), and its change must sum both.
        let mut index: HashMap<*const LayerSlot, usize> = HashMap::new();
        for choice in choices {
            let lora = &choice.lora;
            let mut unmatched = Vec::new();
            for layer in lora.layers() {
                let Some(layers) = registries.get(&layer.component) else {
                    return Err(lora.error(format!(
                        "it changes the model's {}, which this model does not have: the LoRA is for another model family",
                        layer.component.name()
                    )));
                };
                let Some(weight) = layers.get(&layer.module) else {
                    unmatched.push(layer.key.as_str());
                    continue;
                };
                let at = *index.entry(Arc::as_ptr(&weight.0)).or_insert_with(|| {
                    changes.push((weight.clone(), Vec::new()));
                    changes.len() - 1
                });
                changes[at].1.push(LayerChange {
                    lora,
                    layer,
                    scale: choice.scale * layer.scale,
                });
            }
            if !unmatched.is_empty() {
                let shown: Vec<String> =
                    unmatched.iter().take(5).map(|k| format!("`{k}`")).collect();
                return Err(lora.error(format!(
                    "{} of its {} layers name no layer of this model ({}{}): the LoRA is for another model family or architecture",
                    unmatched.len(),
                    lora.layers().len(),
                    shown.join(", "),
                    if unmatched.len() > shown.len() { ", ..." } else { "" },
                )));
            }
        }
        for (weight, parts) in &changes {
            let merged = merged_weight(weight.base(), parts)?;
            weight.set_merged(Some(merged));
        }
        Ok(())
    }
}

/// One LoRA's part in one layer's change, with its whole scale (user's x alpha / rank).
struct LayerChange<'a> {
    lora: &'a LoraFile,
    layer: &'a LoraLayer,
    scale: f32,
}

/// `base + sum(scale * up @ down)`, in f32 on `base`'s device whatever `base`'s precision:
/// diffusers adds the LoRA's product to the layer's f32 output, and rounding the merged
/// weight to f16 put sd2's fixture (fp16 files) 14 levels off diffusers' image, where f32
/// copies are within 1. So a LoRA costs f32 copies of the layers it changes, not f16 ones.
fn merged_weight(base: &Tensor, parts: &[LayerChange]) -> Result<Tensor> {
    let shape = base.shape().to_vec();
    let (out, fan_in) = (shape[0], shape[1..].iter().product::<usize>());
    // Every LoRA's factors side by side along the rank: one product for the layer.
    let rank: usize = parts.iter().map(|p| p.layer.rank()).sum();
    let mut up = vec![0f32; out * rank];
    let mut down_t = vec![0f32; fan_in * rank];
    let mut at = 0;
    for LayerChange { lora, layer, scale } in parts {
        layer.check_fits(&shape, lora)?;
        let r = layer.rank();
        for o in 0..out {
            for k in 0..r {
                up[o * rank + at + k] = scale * layer.up[o * r + k];
            }
        }
        for k in 0..r {
            for i in 0..fan_in {
                down_t[i * rank + at + k] = layer.down[k * fan_in + i];
            }
        }
        at += r;
    }
    // [out, rank] x [fan_in, rank]^T on the CPU backend's GEMM.
    let up = Tensor::from_vec(up, &[out, rank], &Device::Cpu)?;
    let down_t = Tensor::from_vec(down_t, &[fan_in, rank], &Device::Cpu)?;
    let delta = up.linear(&down_t, None)?.to_vec()?;
    let mut merged = base.to_vec()?;
    for (w, d) in merged.iter_mut().zip(&delta) {
        *w += d;
    }
    Tensor::from_vec(merged, &shape, &base.device())
}
