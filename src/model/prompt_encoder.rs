//! The text side of a pipeline: one tokenizer + CLIP text encoder (SD 1.x/2.x) or two
//! (SDXL: `CLIPTextModel` and `CLIPTextModelWithProjection`), turning a prompt into what
//! the UNet reads, as diffusers' `encode_prompt` does for each pipeline.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::model::clip::{ClipTextModel, HiddenLayer};
use crate::model::folder::Component;
use crate::model::prompt_syntax::{self, PromptSyntax};
use crate::model::tokenizer::ClipTokenizer;
use crate::tensor::Tensor;

/// One tokenizer with the encoder it feeds.
pub struct TextEncoderPart {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
}

/// A prompt's embeddings.
#[derive(Clone)]
pub struct PromptEmbeddings {
    /// `[1, 77, width]`: what the UNet's cross-attention reads.
    pub context: Tensor,
    /// SDXL: `[1, projection_dim]`, the last encoder's pooled `text_embeds`.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeddings {
    /// Zeros of the same shapes: SDXL's negative embeddings for a missing negative prompt
    /// (`force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        let zeros = |t: &Tensor| Tensor::zeros(t.shape(), &t.device());
        Ok(PromptEmbeddings {
            context: zeros(&self.context)?,
            pooled: self.pooled.as_ref().map(zeros).transpose()?,
        })
    }
}

pub struct PromptEncoder {
    parts: Vec<TextEncoderPart>,
}

impl PromptEncoder {
    /// SD 1.x/2.x pipelines have one part, SDXL's two, each with its config's path for
    /// errors. Every part's prompt length must fit its encoder's positions,
    /// and with two parts the last must have a projection (SDXL's pooled embedding).
    pub fn new(parts: Vec<(TextEncoderPart, PathBuf)>) -> Result<Self> {
        let count = parts.len();
        if !(1..=2).contains(&count) {
            return Err(Error::InvalidArgument(format!(
                "a pipeline has one or two text encoders, not {count}"
            )));
        }
        for (i, (part, config_path)) in parts.iter().enumerate() {
            let positions = part.encoder.config().max_position_embeddings;
            if part.tokenizer.max_length() > positions {
                return Err(Error::config(
                    config_path,
                    format!(
                        "`max_position_embeddings` {positions} is less than the {} tokens per prompt of its tokenizer ({}/, `model_max_length`)",
                        part.tokenizer.max_length(),
                        [Component::Tokenizer, Component::Tokenizer2][i].dir_name()
                    ),
                ));
            }
            if count == 2 && i == 1 && part.encoder.projection_dim().is_none() {
                return Err(Error::config(
                    config_path,
                    "SDXL's second text encoder needs `text_projection.weight` (CLIPTextModelWithProjection) for the pooled embedding",
                ));
            }
        }
        Ok(PromptEncoder {
            parts: parts.into_iter().map(|(part, _)| part).collect(),
        })
    }

    pub fn parts(&self) -> &[TextEncoderPart] {
        &self.parts
    }

    /// The width of [`PromptEmbeddings::context`]: the encoders' widths added up.
    pub fn context_width(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.encoder.config().hidden_size)
            .sum()
    }

    /// The width of [`PromptEmbeddings::pooled`], for SDXL.
    pub fn pooled_width(&self) -> Option<usize> {
        match self.parts.as_slice() {
            [_, second] => second.encoder.projection_dim(),
            _ => None,
        }
    }

    /// `StableDiffusionPipeline.encode_prompt` (one encoder: `last_hidden_state`) or
    /// `StableDiffusionXLPipeline.encode_prompt` (two: each encoder's `hidden_states[-2]`
    /// joined along the width, the pooled embedding from the second), each tokenizer
    /// padding to its own length and cutting what does not fit, with a warning.
    pub fn encode(&self, prompt: &str) -> Result<PromptEmbeddings> {
        self.encode_each(&self.prompts(prompt, None)?)
    }

    /// The prompt each encoder reads: `prompt`, and for SDXL's second `prompt_2` when
    /// given (diffusers' `prompt_2 = prompt_2 or prompt`). `prompt_2` for a model with one
    /// text encoder is an error, as diffusers' SD pipelines have no such argument.
    fn prompts<'a>(&self, prompt: &'a str, prompt_2: Option<&'a str>) -> Result<Vec<&'a str>> {
        match (self.parts.len(), prompt_2) {
            (1, Some(_)) => Err(Error::InvalidArgument(
                "prompt_2 and negative_prompt_2 are for SDXL's second text encoder; this model has one".into(),
            )),
            (n, second) => Ok((0..n)
                .map(|i| if i == 1 { second.unwrap_or(prompt) } else { prompt })
                .collect()),
        }
    }

    /// [`Self::encode`] with one prompt per encoder.
    fn encode_each(&self, prompts: &[&str]) -> Result<PromptEmbeddings> {
        let layer = self.hidden_layer();
        let mut contexts = Vec::with_capacity(self.parts.len());
        let mut pooled = None;
        for (i, (part, prompt)) in self.parts.iter().zip(prompts).enumerate() {
            let tokens = part.tokenizer.encode(prompt)?;
            // The count, not the words: prompts are the users' and logs are the operator's.
            if tokens.dropped > 0 {
                tracing::warn!(
                    "the {} was cut: its last {} tokens are beyond the {} that CLIP reads",
                    if i == 0 {
                        "prompt"
                    } else {
                        "second encoder's prompt"
                    },
                    tokens.dropped,
                    part.tokenizer.max_length()
                );
            }
            let out = part.encoder.encode(&tokens.ids, layer)?;
            contexts.push(out.hidden);
            if self.parts.len() > 1 {
                pooled = out.pooled;
            }
        }
        let context = match contexts.as_slice() {
            [one] => one.clone(),
            many => Tensor::cat(&many.iter().collect::<Vec<_>>(), 2)?,
        };
        Ok(PromptEmbeddings { context, pooled })
    }

    /// What each pipeline's `encode_prompt` reads: the last layer, or for SDXL the
    /// penultimate.
    fn hidden_layer(&self) -> HiddenLayer {
        match self.parts.len() {
            1 => HiddenLayer::Last,
            _ => HiddenLayer::Penultimate,
        }
    }

    /// `prompt` (and SDXL's `prompt_2`, see [`Self::prompts`]) read with `syntax`:
    /// [`Self::encode`], or AUTOMATIC1111's way, each chunk of 75 tokens encoded on its
    /// own, its emphasis weights applied, and the chunks joined along the tokens
    /// (`[1, 77 * chunks, width]`; the pooled embedding is the first chunk's, as A1111's).
    pub fn encode_with(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        syntax: PromptSyntax,
    ) -> Result<PromptEmbeddings> {
        let prompts = self.prompts(prompt, prompt_2)?;
        if syntax == PromptSyntax::Plain {
            return self.encode_each(&prompts);
        }
        let layer = self.hidden_layer();
        let mut contexts = Vec::with_capacity(self.parts.len());
        let mut pooled = None;
        let mut counts = Vec::with_capacity(self.parts.len());
        for (part, prompt) in self.parts.iter().zip(&prompts) {
            let chunks = prompt_syntax::chunks(&part.tokenizer, prompt)?;
            counts.push(chunks.len());
            let mut pieces = Vec::with_capacity(chunks.len());
            for (k, chunk) in chunks.iter().enumerate() {
                let out = part.encoder.encode(&chunk.ids, layer)?;
                pieces.push(emphasised(out.hidden, &chunk.weights)?);
                if k == 0 && self.parts.len() > 1 {
                    pooled = out.pooled;
                }
            }
            contexts.push(Tensor::cat(&pieces.iter().collect::<Vec<_>>(), 1)?);
        }
        // Both of SDXL's tokenizers split one prompt alike (the same BPE); a prompt_2 of
        // another length cannot be joined with the prompt's chunks.
        if counts.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::InvalidArgument(format!(
                "with AUTOMATIC1111's prompt syntax the prompt and prompt_2 make {counts:?} chunks of 75 tokens; they must make as many"
            )));
        }
        let context = match contexts.as_slice() {
            [one] => one.clone(),
            many => Tensor::cat(&many.iter().collect::<Vec<_>>(), 2)?,
        };
        Ok(PromptEmbeddings { context, pooled })
    }
}

/// A1111's emphasis: each token's state times its weight, then the whole scaled back to its
/// mean before (`z * w; z * (mean_before / mean_after)`). All weights 1 leave it as it is.
fn emphasised(hidden: Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(hidden);
    }
    let shape = hidden.shape().to_vec();
    let width = shape[shape.len() - 1];
    let mut z = hidden.to_vec()?;
    let mean = |z: &[f32]| z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
    let before = mean(&z);
    for (row, &w) in z.chunks_exact_mut(width).zip(weights) {
        for v in row {
            *v *= w;
        }
    }
    let factor = (before / mean(&z)) as f32;
    for v in &mut z {
        *v *= factor;
    }
    Tensor::from_vec(z, &shape, &hidden.device())
}
