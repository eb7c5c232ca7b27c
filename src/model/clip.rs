//! transformers' `CLIPTextModel`: token ids to the per-token embeddings the UNet attends to
//! (`last_hidden_state`, after the final layer norm).

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
    activation: Activation,
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
            activation,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Embeddings `[1, L, hidden_size]` for one sequence of token ids.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
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
        for layer in &self.layers {
            let _span = tracing::trace_span!("clip_layer").entered();
            let a = &layer.self_attn;
            let x = layer.layer_norm1.forward(&h)?;
            let (q, k, v) = (
                a.q_proj.forward(&x)?,
                a.k_proj.forward(&x)?,
                a.v_proj.forward(&x)?,
            );
            let attn = Tensor::attention(&q, &k, &v, a.heads, true)?;
            h = a.out_proj.forward(&attn)?.add(&h)?;
            let x = layer.fc1.forward(&layer.layer_norm2.forward(&h)?)?;
            let x = match self.activation {
                Activation::QuickGelu => x.quick_gelu()?,
                Activation::Gelu => x.gelu()?,
            };
            h = layer.fc2.forward(&x)?.add(&h)?;
        }
        self.final_layer_norm.forward(&h)
    }
}
