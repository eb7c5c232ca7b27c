//! A model folder in diffusers layout: which file holds what, with clear errors for
//! anything missing.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::config::read_json;

/// The components a text-to-image pipeline reads.
#[derive(Clone, Copy, Debug)]
pub enum Component {
    TextEncoder,
    Tokenizer,
    Unet,
    Vae,
    Scheduler,
}

impl Component {
    pub fn dir_name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::Tokenizer => "tokenizer",
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::Scheduler => "scheduler",
        }
    }

    /// Weight file stem: transformers and diffusers name them differently.
    fn weights_stem(self) -> &'static str {
        match self {
            Component::TextEncoder => "model",
            _ => "diffusion_pytorch_model",
        }
    }
}

/// What `model_index.json` must hold.
#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    _class_name: String,
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
        // Only the pipeline class is read (diffusers needs it too); a file that is not
        // JSON, or not an object naming it, is a broken download or a hand-made mistake.
        read_json::<ModelIndex>(&index)?;
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

    /// The component's safetensors weights: the full-precision file, or else the `fp16`
    /// variant diffusers saves with `variant="fp16"`.
    pub fn weights(&self, c: Component) -> Result<PathBuf> {
        let dir = self.dir(c)?;
        let stem = c.weights_stem();
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
}
