//! diffusers' `Attention`, `FeedForward` (GEGLU), `BasicTransformerBlock` and
//! `Transformer2DModel`: the cross-attention half of the UNet.

use crate::error::{Error, Result};
use crate::model::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::model::weights::Weights;
use crate::tensor::Tensor;

/// Multi-head attention with `to_q`, `to_k`, `to_v` and `to_out.0`.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is the width of the keys' source (the text embeddings for
    /// cross-attention, `query_dim` for self-attention). `qkv_bias` is diffusers' `bias`.
    pub fn new(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::new(&w.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::new(&w.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::new(&w.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x` is `[B, L, query_dim]`; `context` (`[B, Lc, context_dim]`) defaults to `x`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _span = tracing::trace_span!("attention").entered();
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = Tensor::attention(&q, &k, &v, self.heads, false)?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with the GEGLU activation: `net.0.proj` → GEGLU → `net.2`.
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(w: &Weights, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(FeedForward {
            proj_in: Linear::new(&w.pp("net").pp(0).pp("proj"), dim, 2 * inner, true)?,
            proj_out: Linear::new(&w.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// `x` is `[B, L, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_within(x, x.device().max_buffer_bytes())
    }

    /// [`FeedForward::forward`] keeping the GEGLU projection (`[B, L, 8 dim]` f32, the
    /// largest activation of a UNet: 1.34 GB at 2048x2048 in SD 1.5) under half of
    /// `max_buffer_bytes`: tokens are independent here, so they run in chunks (diffusers'
    /// `_chunked_feed_forward`), with the same result.
    pub fn forward_within(&self, x: &Tensor, max_buffer_bytes: Option<u64>) -> Result<Tensor> {
        let &[batch, tokens, _] = x.shape() else {
            return Err(Error::shape(
                "feed-forward",
                format!("{:?}, not [B, L, dim]", x.shape()),
            ));
        };
        let per_token = (batch * self.proj_in.out_features() * 4) as u64;
        let budget = max_buffer_bytes.map_or(u64::MAX, |limit| limit / 2);
        if per_token * tokens as u64 <= budget {
            return self.proj_out.forward(&self.proj_in.forward(x)?.geglu()?);
        }
        if per_token > budget {
            return Err(Error::InvalidArgument(format!(
                "one token of the UNet's feed-forward needs {per_token} bytes, over half of \
                 this device's largest buffer ({} bytes)",
                max_buffer_bytes.unwrap_or(0)
            )));
        }
        let chunk = (budget / per_token) as usize;
        let parts = (0..tokens)
            .step_by(chunk)
            .map(|start| {
                let part = x.narrow(1, start, chunk.min(tokens - start))?;
                self.proj_out
                    .forward(&self.proj_in.forward(&part)?.geglu()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, feed-forward, each pre-normed
/// and residual.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(
        w: &Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        only_cross_attention: bool,
    ) -> Result<Self> {
        let attn1_context = if only_cross_attention { cross_dim } else { dim };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&w.pp("attn1"), dim, attn1_context, heads, head_dim, false)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&w.pp("attn2"), dim, cross_dim, heads, head_dim, false)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&w.pp("ff"), dim)?,
            only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let self_context = self.only_cross_attention.then_some(context);
        let x = self
            .attn1
            .forward(&self.norm1.forward(x)?, self_context)?
            .add_owned(x)?;
        let x = self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            .add_owned(&x)?;
        self.ff.forward(&self.norm3.forward(&x)?)?.add_owned(&x)
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions on NCHW (SD 1.x) or linear layers on tokens
/// (`use_linear_projection`, SD 2.x).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Sizes of a `Transformer2DModel`.
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

/// `Transformer2DModel` for continuous (image) input.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(w: &Weights, c: Transformer2DConfig) -> Result<Self> {
        // diffusers: `attention_head_dim = channels // heads`, inner width = heads * that.
        let head_dim = c.channels / c.heads.max(1);
        let inner = c.heads * head_dim;
        let projection = |name: &str, cin: usize, cout: usize| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::new(&w.pp(name), cin, cout, true)?)
            } else {
                Projection::Conv(Conv2d::new(&w.pp(name), cin, cout, 1, 1, 0)?)
            })
        };
        Ok(Transformer2DModel {
            norm: GroupNorm::new(&w.pp("norm"), c.norm_groups, c.channels, 1e-6)?,
            proj_in: projection("proj_in", c.channels, inner)?,
            transformer_blocks: (0..c.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &w.pp("transformer_blocks").pp(i),
                        inner,
                        c.heads,
                        head_dim,
                        c.cross_attention_dim,
                        c.only_cross_attention,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: projection("proj_out", inner, c.channels)?,
        })
    }

    /// `x` is `[B, C, H, W]`, `context` the text embeddings `[B, L, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("transformer2d").entered();
        let [b, c, h, w] = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
        let normed = self.norm.forward(x.clone())?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1);
            t.permute(&[0, 2, 3, 1])?.reshape(&[b, h * w, ch])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2);
            t.reshape(&[b, h, w, ch])?.permute(&[0, 3, 1, 2])
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1), c);
        out.add_owned(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::testing::{assert_close, random};
    use crate::tensor::Device;

    /// Token chunks (7 of 5 tokens and one of 2) give the whole feed-forward's result, on
    /// the CPU and on the test GPU; a limit below one token is a clear error.
    #[test]
    fn feed_forward_in_token_chunks_equals_the_whole() {
        let mut devices = vec![Device::Cpu];
        devices.extend(crate::backend::gpu::test_device().map(Device::Gpu));
        for device in devices {
            let ff = FeedForward::new(&Weights::random(3, &device).pp("ff"), 8).unwrap();
            let x = random(&[2, 37, 8], 4).to_device(&device).unwrap();
            // One token: batch 2 x 64 projected features x 4 bytes.
            let per_token = 2 * 64 * 4;
            let whole = ff.forward_within(&x, None).unwrap();
            let chunked = ff.forward_within(&x, Some(2 * 5 * per_token)).unwrap();
            assert_eq!(chunked.shape(), [2, 37, 8]);
            assert_close(
                &format!("feed-forward in chunks on {device}"),
                &chunked.to_vec().unwrap(),
                &whole.to_vec().unwrap(),
            );
            let err = ff.forward_within(&x, Some(per_token)).unwrap_err();
            assert!(
                err.to_string().contains("largest buffer"),
                "{device}: {err}"
            );
        }
    }
}
