//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`: token ids to the
//! per-token embeddings the UNet attends to (`last_hidden_state` after the final layer norm
//! for SD 1.x/2.x, the penultimate layer's `hidden_states[-2]` for SDXL) and, with a
//! projection, the pooled `text_embeds` SDXL's UNet also reads.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::{ClipTextConfig, ComponentConfig};
use crate::model::nn::{LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    Gelu,
}

/// `CLIPAttention`: causal multi-head self-attention.
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each residual.
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias), when the weights have it.
    text_projection: Option<Linear>,
    activation: Activation,
}

/// Which per-token states [`ClipTextModel::encode`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenLayer {
    /// `last_hidden_state`: every layer, then the final layer norm (SD 1.x/2.x).
    Last,
    /// `hidden_states[-2]`: the output of the next-to-last layer, no final norm (SDXL).
    Penultimate,
}

/// What [`ClipTextModel::encode`] computes for one sequence.
pub struct ClipOutput {
    /// `[1, L, hidden_size]` at the requested layer.
    pub hidden: Tensor,
    /// `text_embeds` `[1, projection_dim]`: the end-of-text token's final state through
    /// `text_projection`; `None` for a model without a projection.
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    pub fn new(config: &ClipTextConfig, w: &Weights, config_path: &Path) -> Result<Self> {
        let c = config;
        let activation = match c.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::config(
                    config_path,
                    format!("unsupported hidden_act {other:?}"),
                ))
            }
        };
        // Also checked where configs are read; a config built in code comes straight here.
        c.validate(config_path)?;
        let d = c.hidden_size;
        let eps = c.layer_norm_eps;
        // transformers up to 4.x names the weights `text_model.embeddings...` (every SD
        // repo); 5.x saves `CLIPTextModel` without that level (`embeddings...`).
        let flat = !w.contains("text_model.embeddings.token_embedding.weight")
            && w.contains("embeddings.token_embedding.weight");
        let t = if flat { w.clone() } else { w.pp("text_model") };
        let layer = |i: usize| -> Result<ClipEncoderLayer> {
            let lw = t.pp("encoder").pp("layers").pp(i);
            let aw = lw.pp("self_attn");
            Ok(ClipEncoderLayer {
                layer_norm1: LayerNorm::new(&lw.pp("layer_norm1"), d, eps)?,
                self_attn: ClipAttention {
                    q_proj: Linear::new(&aw.pp("q_proj"), d, d, true)?,
                    k_proj: Linear::new(&aw.pp("k_proj"), d, d, true)?,
                    v_proj: Linear::new(&aw.pp("v_proj"), d, d, true)?,
                    out_proj: Linear::new(&aw.pp("out_proj"), d, d, true)?,
                    heads: c.num_attention_heads,
                },
                layer_norm2: LayerNorm::new(&lw.pp("layer_norm2"), d, eps)?,
                fc1: Linear::new(&lw.pp("mlp").pp("fc1"), d, c.intermediate_size, true)?,
                fc2: Linear::new(&lw.pp("mlp").pp("fc2"), c.intermediate_size, d, true)?,
            })
        };
        let emb = t.pp("embeddings");
        Ok(ClipTextModel {
            token_embedding: emb
                .pp("token_embedding")
                .get("weight", &[c.vocab_size, d])?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", &[c.max_position_embeddings, d])?,
            layers: (0..c.num_hidden_layers).map(layer).collect::<Result<_>>()?,
            final_layer_norm: LayerNorm::new(&t.pp("final_layer_norm"), d, eps)?,
            // Beside `text_model`, not in it, in every transformers version.
            text_projection: if w.contains("text_projection.weight") {
                Some(Linear::new(
                    &w.pp("text_projection"),
                    d,
                    c.projection_dim,
                    false,
                )?)
            } else {
                None
            },
            activation,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The pooled embedding's width, when the model has a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection
            .as_ref()
            .map(|_| self.config.projection_dim)
    }

    /// `last_hidden_state` `[1, L, hidden_size]` for one sequence of token ids.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.encode(ids, HiddenLayer::Last)?.hidden)
    }

    /// The per-token states at `layer` and, with a projection, the pooled embedding.
    pub fn encode(&self, ids: &[u32], layer: HiddenLayer) -> Result<ClipOutput> {
        let _span = tracing::debug_span!("text_encoder").entered();
        let len = ids.len();
        if len > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let d = self.config.hidden_size;
        let positions: Vec<u32> = (0..len as u32).collect();
        let mut h = self
            .token_embedding
            .embedding(ids)?
            .add(&self.position_embedding.embedding(&positions)?)?
            .reshape(&[1, len, d])?;
        let mut penultimate = None;
        let count = self.layers.len();
        for (i, layer_weights) in self.layers.iter().enumerate() {
            if i + 1 == count && layer == HiddenLayer::Penultimate {
                // The last layer only matters for the pooled embedding.
                if self.text_projection.is_none() {
                    return Ok(ClipOutput {
                        hidden: h,
                        pooled: None,
                    });
                }
                penultimate = Some(h.clone());
            }
            h = self.layer_forward(layer_weights, &h)?;
        }
        let last = self.final_layer_norm.forward(&h)?;
        let pooled = match &self.text_projection {
            Some(projection) => {
                let row = last
                    .narrow(1, self.eos_position(ids), 1)?
                    .reshape(&[1, d])?;
                Some(projection.forward(&row)?)
            }
            None => None,
        };
        Ok(ClipOutput {
            // Only a model without layers has no penultimate state; it has its embeddings.
            hidden: match layer {
                HiddenLayer::Last => last,
                HiddenLayer::Penultimate => penultimate.unwrap_or(h),
            },
            pooled,
        })
    }

    /// transformers' `CLIPTextTransformer`: the position of the first `eos_token_id`, or
    /// with the legacy id 2 the first position of the largest id (the real end-of-text id
    /// is the vocabulary's last); 0 when there is none (`argmax` of all-false).
    fn eos_position(&self, ids: &[u32]) -> usize {
        let eos = self.config.eos_token_id;
        if eos == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            ids.iter().position(|&id| i64::from(id) == eos).unwrap_or(0)
        }
    }

    fn layer_forward(&self, layer: &ClipEncoderLayer, h: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("clip_layer").entered();
        let a = &layer.self_attn;
        let x = layer.layer_norm1.forward(h)?;
        let (q, k, v) = (
            a.q_proj.forward(&x)?,
            a.k_proj.forward(&x)?,
            a.v_proj.forward(&x)?,
        );
        let attn = Tensor::attention(&q, &k, &v, a.heads, true)?;
        let h = a.out_proj.forward(&attn)?.add_owned(h)?;
        let x = layer.fc1.forward(&layer.layer_norm2.forward(&h)?)?;
        let x = match self.activation {
            Activation::QuickGelu => x.quick_gelu()?,
            Activation::Gelu => x.gelu()?,
        };
        layer.fc2.forward(&x)?.add_owned(&h)
    }
}
