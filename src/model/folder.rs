//! A model folder in diffusers layout: which file holds what, with clear errors for
//! anything missing.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::config::read_json;

/// The components a text-to-image pipeline reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    Tokenizer,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer.
    TextEncoder2,
    Tokenizer2,
    Unet,
    Vae,
    Scheduler,
}

impl Component {
    pub fn dir_name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::Tokenizer => "tokenizer",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Tokenizer2 => "tokenizer_2",
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::Scheduler => "scheduler",
        }
    }

    /// Weight file stem: transformers and diffusers name them differently.
    fn weights_stem(self) -> &'static str {
        match self {
            Component::TextEncoder | Component::TextEncoder2 => "model",
            _ => "diffusion_pytorch_model",
        }
    }
}

/// What is read of `model_index.json`: the pipeline class (diffusers needs it too) and
/// the pipeline options that change the computation.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// SDXL: a missing negative prompt gives zero negative embeddings (the
    /// `StableDiffusionXLPipeline` default, `true`, when absent).
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// Set by the SDXL refiner's pipeline, which conditions on an aesthetic score.
    pub requires_aesthetics_score: Option<bool>,
}

/// A diffusers model folder (the directory holding `model_index.json`).
#[derive(Clone, Debug)]
pub struct ModelFolder {
    root: PathBuf,
}

impl ModelFolder {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "model folder {} does not exist or is not a directory",
                root.display()
            )));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a diffusers model folder: model_index.json is missing",
                root.display()
            )));
        }
        // A file that is not JSON, or not an object naming the pipeline class, is a broken
        // download or a hand-made mistake.
        let model_index = read_json::<ModelIndex>(&index)?;
        if model_index.requires_aesthetics_score == Some(true) {
            return Err(Error::InvalidArgument(format!(
                "{}: the SDXL refiner ({}) is not supported yet; load an SDXL base model",
                root.display(),
                model_index.class_name
            )));
        }
        Ok(ModelFolder {
            root: root.to_path_buf(),
        })
    }

    /// A folder in diffusers layout that only needs the component configs (and possibly
    /// `tokenizer/`), not `model_index.json` or weights: `--model-config`.
    pub fn open_configs(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "config folder {} does not exist or is not a directory",
                root.display()
            )));
        }
        Ok(ModelFolder {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the folder has the component's directory (SDXL's second text encoder).
    pub fn has(&self, c: Component) -> bool {
        self.root.join(c.dir_name()).is_dir()
    }

    /// `model_index.json`, checked by [`ModelFolder::open`]; `None` for a config-only folder
    /// without one.
    pub fn model_index(&self) -> Result<Option<ModelIndex>> {
        let path = self.root.join("model_index.json");
        if path.is_file() {
            read_json(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The component's directory, which must exist.
    pub fn dir(&self, c: Component) -> Result<PathBuf> {
        let dir = self.root.join(c.dir_name());
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::InvalidArgument(format!(
                "model folder {} has no {}/ component",
                self.root.display(),
                c.dir_name()
            )))
        }
    }

    /// A file inside a component's directory, which must exist.
    pub fn file(&self, c: Component, name: &str) -> Result<PathBuf> {
        let path = self.dir(c)?.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::InvalidArgument(format!(
                "{} is missing",
                path.display()
            )))
        }
    }

    pub fn config(&self, c: Component) -> Result<PathBuf> {
        let name = match c {
            Component::Scheduler => "scheduler_config.json",
            _ => "config.json",
        };
        self.file(c, name)
    }

    /// The component's safetensors weights: see [`weights_file`].
    pub fn weights(&self, c: Component) -> Result<PathBuf> {
        weights_file(&self.dir(c)?, c.weights_stem())
    }
}

/// A component folder's safetensors weights (`<stem>.safetensors`), or else the `fp16`
/// variant diffusers saves with `variant="fp16"`: a pipeline's `unet/`, or a component
/// repository on its own (a VAE for `--vae`).
pub fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let candidates = [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ];
    if let Some(found) = candidates.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        return Ok(found);
    }
    let pickle = [format!("{stem}.bin"), format!("{stem}.fp16.bin")]
        .iter()
        .any(|n| dir.join(n).is_file());
    let hint = if pickle {
        " (only PyTorch .bin pickles are there: those can run code when loaded and are not read; \
         convert them with diffusers: `pipe.save_pretrained(dir, safe_serialization=True)`)"
    } else {
        ""
    };
    Err(Error::InvalidArgument(format!(
        "{}: no {} or {} found{hint}",
        dir.display(),
        candidates[0],
        candidates[1]
    )))
}
