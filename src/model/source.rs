//! Where a pipeline's parts come from: a diffusers model folder, or a single-file
//! checkpoint with its configs from a built-in preset or a `--model-config` folder and its
//! tokenizer from that folder, a `tokenizer/` folder beside the file or the built-in copy.
//! [`StableDiffusion::load`](crate::pipeline::StableDiffusion::load) builds every model from
//! the same per-component answers (config, weights) whichever it is.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::config::{read_json, ClipTextConfig, ComponentConfig, UNetConfig, VaeConfig};
use crate::model::folder::{Component, ModelFolder};
use crate::model::presets::Preset;
use crate::model::single_file::{is_pickle_path, pickle_refusal, Family, SingleFile};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::weights::Weights;
use crate::pipeline::scheduler;
use crate::tensor::Device;

/// What was loaded, for logs and `/health`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    /// `diffusers_folder` or `single_file`.
    pub format: &'static str,
    /// For a single file: `SD 1.x` or `SD 2.x`, as recognised from its tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    /// Where the configs came from: the folder, `built-in preset <name> (<repo>)`, or the
    /// `--model-config` folder (by its name, not its path, as for all of these).
    pub config: String,
    /// Where the tokenizer came from.
    pub tokenizer: String,
}

/// A folder's own name: [`ModelInfo`] is shown to API clients, who need not see the
/// server's file system.
fn last_component(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// Where component configs come from.
enum Configs {
    Folder(ModelFolder),
    Preset(&'static Preset),
}

enum Tokenizer {
    Dir(PathBuf),
    Builtin(&'static Preset),
}

enum WeightsFrom {
    Folder(ModelFolder),
    SingleFile(SingleFile),
}

/// A model's configs, weights and tokenizer, wherever they are.
pub struct ModelSource {
    weights: WeightsFrom,
    configs: Configs,
    tokenizer: Tokenizer,
    device: Device,
    info: ModelInfo,
}

/// A component's config, where it came from (for errors), and its weights.
pub struct ComponentParts<C> {
    pub config: C,
    pub config_path: PathBuf,
    pub weights: Weights,
}

impl ModelSource {
    /// `model` is a diffusers folder or a single `.safetensors` checkpoint. `config`
    /// (single files only) names a built-in preset (`sd1.5`, `sd2.1-base`, `sd2.1`) or a
    /// folder in diffusers layout whose component configs and tokenizer replace the
    /// preset's, like diffusers' `from_single_file(..., config=DIR)`.
    pub fn open(model: &Path, config: Option<&Path>, device: &Device) -> Result<Self> {
        if model.is_file() || is_pickle_path(model) {
            Self::open_single_file(model, config, device)
        } else {
            if let Some(config) = config {
                return Err(Error::InvalidArgument(format!(
                    "--model-config {} only applies to single-file checkpoints; {} is a model folder with its own configs",
                    config.display(),
                    model.display()
                )));
            }
            let folder = ModelFolder::open(model)?;
            let info = ModelInfo {
                format: "diffusers_folder",
                family: None,
                config: "the model folder".into(),
                tokenizer: "the model folder's tokenizer/".into(),
            };
            Ok(ModelSource {
                tokenizer: Tokenizer::Dir(folder.dir(Component::Tokenizer)?),
                weights: WeightsFrom::Folder(folder.clone()),
                configs: Configs::Folder(folder),
                device: device.clone(),
                info,
            })
        }
    }

    fn open_single_file(path: &Path, config: Option<&Path>, device: &Device) -> Result<Self> {
        if is_pickle_path(path) {
            return Err(pickle_refusal(path));
        }
        let file = SingleFile::open(path, device)?;
        let family = file.family();
        let describe =
            |p: &Preset| format!("built-in preset {} ({}, {})", p.name, p.repo, p.description);
        let (configs, preset, config_info) = match config {
            Some(dir) if dir.is_dir() => (
                Configs::Folder(ModelFolder::open_configs(dir)?),
                file.default_preset()?,
                format!("--model-config folder {}", last_component(dir)),
            ),
            Some(name) => match name.to_str().and_then(Preset::by_name) {
                Some(p) => (Configs::Preset(p), p, describe(p)),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "--model-config {}: not a folder, nor a built-in preset ({})",
                        name.display(),
                        Preset::names()
                    )))
                }
            },
            None => {
                let p = file.default_preset()?;
                (Configs::Preset(p), p, describe(p))
            }
        };
        // The tokenizer: the config folder's, else a `tokenizer/` folder beside the file,
        // else the built-in copy with the preset's special tokens.
        let beside = path
            .parent()
            .map(|p| p.join("tokenizer"))
            .filter(|d| d.is_dir());
        let (tokenizer, tokenizer_info) = match (&configs, beside) {
            (Configs::Folder(f), _) if f.root().join("tokenizer").is_dir() => {
                let dir = f.root().join("tokenizer");
                let info = format!("{}/tokenizer (--model-config)", last_component(f.root()));
                (Tokenizer::Dir(dir), info)
            }
            (_, Some(dir)) => {
                let info = "tokenizer/ beside the checkpoint".to_string();
                (Tokenizer::Dir(dir), info)
            }
            (_, None) => (
                Tokenizer::Builtin(preset),
                format!(
                    "built-in CLIP BPE files with {}'s special tokens",
                    preset.name
                ),
            ),
        };
        tracing::info!(
            "{}: single-file checkpoint, {} ({}); configs: {config_info}; tokenizer: {tokenizer_info}",
            path.display(),
            family.name(),
            match family {
                Family::Sd1 => "CLIP text encoder",
                Family::Sd2 => "OpenCLIP text encoder",
            }
        );
        Ok(ModelSource {
            weights: WeightsFrom::SingleFile(file),
            configs,
            tokenizer,
            device: device.clone(),
            info: ModelInfo {
                format: "single_file",
                family: Some(family.name()),
                config: config_info,
                tokenizer: tokenizer_info,
            },
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A component's config file as `T`, parsed but not checked.
    fn parse_config<T: DeserializeOwned>(&self, c: Component) -> Result<(T, PathBuf)> {
        match &self.configs {
            Configs::Folder(f) => {
                let path = f.config(c)?;
                Ok((read_json(&path)?, path))
            }
            Configs::Preset(p) => {
                let path = p.config_path(c);
                let value = serde_json::from_str(p.config_text(c)?)
                    .map_err(|e| Error::config(&path, e.to_string()))?;
                Ok((value, path))
            }
        }
    }

    /// A component's config, parsed and validated: the one way configs come in.
    fn config<T: ComponentConfig>(&self, c: Component) -> Result<(T, PathBuf)> {
        let (config, path) = self.parse_config::<T>(c)?;
        config.validate(&path)?;
        Ok((config, path))
    }

    /// The scheduler config every request starts from, checked to build.
    pub fn scheduler_config(&self) -> Result<Map<String, Value>> {
        let (map, path): (Map<String, Value>, PathBuf) = match &self.configs {
            Configs::Folder(f) => {
                let path = f.config(Component::Scheduler)?;
                (scheduler::read_config(&path)?, path)
            }
            Configs::Preset(_) => self.parse_config(Component::Scheduler)?,
        };
        scheduler::from_config_with(&map, None, &Map::new(), 1).map_err(|e| match e {
            Error::InvalidArgument(message) => Error::config(&path, message),
            other => other,
        })?;
        Ok(map)
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        match &self.tokenizer {
            Tokenizer::Dir(dir) => ClipTokenizer::from_dir(dir),
            Tokenizer::Builtin(preset) => preset.tokenizer(),
        }
    }

    fn folder_weights(&self, folder: &ModelFolder, c: Component) -> Result<Weights> {
        let path = folder.weights(c)?;
        tracing::info!("loading {} from {}", c.dir_name(), path.display());
        Weights::open(&path, &self.device)
    }

    /// A component's config and weights: from the folder, or read from the single file
    /// by `from_single_file` under the config's shapes.
    fn component<C: ComponentConfig>(
        &self,
        c: Component,
        from_single_file: impl FnOnce(&SingleFile, &C, &Path) -> Result<Weights>,
    ) -> Result<ComponentParts<C>> {
        let (config, config_path) = self.config::<C>(c)?;
        let weights = match &self.weights {
            WeightsFrom::Folder(f) => self.folder_weights(f, c)?,
            WeightsFrom::SingleFile(s) => from_single_file(s, &config, &config_path)?,
        };
        Ok(ComponentParts {
            config,
            config_path,
            weights,
        })
    }

    pub fn text_encoder(&self) -> Result<ComponentParts<ClipTextConfig>> {
        self.component(Component::TextEncoder, |s, config, _| {
            s.text_encoder(config)
        })
    }

    /// The UNet; a single file's input width comes from the file, so the SD 1.x/2.x presets
    /// serve inpainting checkpoints too.
    pub fn unet(&self) -> Result<ComponentParts<UNetConfig>> {
        let mut parts = self.component(Component::Unet, |s, config, path| s.unet(config, path))?;
        if let WeightsFrom::SingleFile(file) = &self.weights {
            if let Some(channels) = file.unet_in_channels() {
                if channels != parts.config.in_channels {
                    tracing::info!("the checkpoint's UNet takes {channels} input channels (an inpainting model)");
                    parts.config.in_channels = channels;
                }
            }
        }
        Ok(parts)
    }

    /// SDXL's second text encoder and its tokenizer, when the model has them.
    pub fn text_encoder_2(
        &self,
    ) -> Result<Option<(ComponentParts<ClipTextConfig>, ClipTokenizer)>> {
        let Configs::Folder(folder) = &self.configs else {
            return Ok(None);
        };
        if !folder.has(Component::TextEncoder2) {
            return Ok(None);
        }
        let parts = self.component(Component::TextEncoder2, |_, _, path| {
            Err(Error::config(
                path,
                "single-file checkpoints with a second text encoder (SDXL) are not read yet",
            ))
        })?;
        let tokenizer = ClipTokenizer::from_dir(&folder.dir(Component::Tokenizer2)?)?;
        Ok(Some((parts, tokenizer)))
    }

    /// `model_index.json`'s `force_zeros_for_empty_prompt`, which SDXL pipelines read
    /// (`true` when absent, as diffusers' default).
    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        let index = match &self.weights {
            WeightsFrom::Folder(folder) => folder.model_index()?,
            WeightsFrom::SingleFile(_) => None,
        };
        Ok(index
            .and_then(|i| i.force_zeros_for_empty_prompt)
            .unwrap_or(true))
    }

    pub fn vae(&self) -> Result<ComponentParts<VaeConfig>> {
        self.component(Component::Vae, |s, config, _| s.vae(config))
    }
}
