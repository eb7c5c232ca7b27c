//! Where a pipeline's parts come from: a diffusers model folder, or a single-file
//! checkpoint with its configs from a built-in preset or a `--model-config` folder and its
//! tokenizer from that folder, a `tokenizer/` folder beside the file or the built-in copy
//! (SDXL's second tokenizer: that folder's `tokenizer_2/`, or the built-in copy).
//! [`StableDiffusion::load`](crate::pipeline::StableDiffusion::load) builds every model from
//! the same per-component answers (config, weights) whichever it is.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::config::{read_json, ClipTextConfig, ComponentConfig, UNetConfig, VaeConfig};
use crate::model::folder::{weights_file, Component, ModelFolder};
use crate::model::presets::{self, Preset};
use crate::model::single_file::{self, is_pickle_path, pickle_refusal, Family, SingleFile};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::weights::Weights;
use crate::pipeline::scheduler;
use crate::tensor::Device;

/// What was loaded, for logs and `/health`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    /// `diffusers_folder` or `single_file`.
    pub format: &'static str,
    /// For a single file: `SD 1.x`, `SD 2.x` or `SDXL`, as recognised from its tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    /// Where the configs came from: the folder, `built-in preset <name> (<repo>)`, or the
    /// `--model-config` folder (by its name, not its path, as for all of these).
    pub config: String,
    /// Where the tokenizer came from.
    pub tokenizer: String,
    /// Where SDXL's second tokenizer came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_2: Option<String>,
    /// The VAE `--vae` put in place of the model's, and where its config came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
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
    /// The built-in BPE files with the preset's special tokens.
    Builtin(&'static Preset),
}

impl Tokenizer {
    /// The first tokenizer, or SDXL's second (`Component::Tokenizer2`).
    fn load(&self, c: Component) -> Result<ClipTokenizer> {
        match self {
            Tokenizer::Dir(dir) => ClipTokenizer::from_dir(dir),
            Tokenizer::Builtin(p) if c == Component::Tokenizer2 => p
                .tokenizer_2()?
                .ok_or_else(|| Error::Other(format!("preset {} has no second tokenizer", p.name))),
            Tokenizer::Builtin(p) => p.tokenizer(),
        }
    }
}

enum WeightsFrom {
    Folder(ModelFolder),
    SingleFile(SingleFile),
}

/// A VAE that replaces the model's (`--vae`).
enum VaeFrom {
    /// A diffusers VAE folder (`config.json` and its weights, as `AutoencoderKL.
    /// from_pretrained` reads it): its own config, scaling factor included.
    Folder { config: PathBuf, weights: PathBuf },
    /// One `.safetensors` file, read under the model's VAE config (see
    /// [`single_file::vae_file`]).
    File(PathBuf),
}

/// What modifies a model beyond its folder or file: `--model-config` and `--vae`.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// For a single-file checkpoint: a built-in preset's name or a diffusers-layout folder
    /// whose configs (and tokenizer) are used.
    pub config: Option<PathBuf>,
    /// A VAE in place of the model's: a diffusers VAE folder (or a pipeline folder, whose
    /// `vae/` is taken), or one `.safetensors` file in diffusers' names or the original
    /// layout (AUTOMATIC1111's VAE files), read under the model's VAE config.
    pub vae: Option<PathBuf>,
    /// Keep the text encoders on the CPU, whatever the device (`--text-encoders-on-cpu`):
    /// SDXL's two take 1.5 GiB of f16 weights that a GPU with 8 GB needs for the UNet and
    /// the VAE, and they run once per prompt.
    pub text_encoders_on_cpu: bool,
}

/// A model's configs, weights and tokenizer, wherever they are.
pub struct ModelSource {
    weights: WeightsFrom,
    configs: Configs,
    tokenizer: Tokenizer,
    /// SDXL's second tokenizer, for a model with a second text encoder.
    tokenizer_2: Option<Tokenizer>,
    /// `--vae`, when given.
    vae: Option<VaeFrom>,
    device: Device,
    /// Where the text encoders' weights go: `device`, or the CPU (see [`ModelOptions`]).
    text_encoder_device: Device,
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
    /// (single files only) names a built-in preset (`sd1.5`, `sd2.1-base`, `sd2.1`,
    /// `sdxl-base-1.0`, `sdxl-turbo`) or a folder in diffusers layout whose component
    /// configs and tokenizers replace the preset's, like diffusers'
    /// `from_single_file(..., config=DIR)`.
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
            let tokenizer_2 = if folder.has(Component::TextEncoder2) {
                Some(Tokenizer::Dir(folder.dir(Component::Tokenizer2)?))
            } else {
                None
            };
            let info = ModelInfo {
                format: "diffusers_folder",
                family: None,
                config: "the model folder".into(),
                tokenizer: "the model folder's tokenizer/".into(),
                tokenizer_2: tokenizer_2
                    .as_ref()
                    .map(|_| "the model folder's tokenizer_2/".into()),
                vae: None,
            };
            Ok(ModelSource {
                tokenizer: Tokenizer::Dir(folder.dir(Component::Tokenizer)?),
                tokenizer_2,
                weights: WeightsFrom::Folder(folder.clone()),
                configs: Configs::Folder(folder),
                vae: None,
                device: device.clone(),
                text_encoder_device: device.clone(),
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
        // The configs must be for as many text encoders as the file has.
        let two = match &configs {
            Configs::Folder(f) => f.has(Component::TextEncoder2),
            Configs::Preset(p) => p.has_text_encoder_2(),
        };
        if two != (family == Family::Sdxl) {
            let (has, wants) = if two {
                ("configs for SDXL (two text encoders)", "one text encoder")
            } else {
                (
                    "configs for one text encoder (no text_encoder_2/)",
                    "two text encoders",
                )
            };
            let names = presets::ALL
                .iter()
                .filter(|p| p.has_text_encoder_2() != two)
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::InvalidArgument(format!(
                "{}: an {} checkpoint ({wants}), but {config_info} has {has}; pass --model-config with one of {names}, or a folder of that family's configs",
                path.display(),
                family.name(),
            )));
        }
        // SDXL's second tokenizer: the config folder's, else the built-in copy.
        let (tokenizer_2, tokenizer_2_info) = match &configs {
            _ if !two => (None, None),
            Configs::Folder(f) if f.has(Component::Tokenizer2) => (
                Some(Tokenizer::Dir(f.root().join("tokenizer_2"))),
                Some(format!(
                    "{}/tokenizer_2 (--model-config)",
                    last_component(f.root())
                )),
            ),
            _ => (
                Some(Tokenizer::Builtin(preset)),
                Some(format!(
                    "built-in CLIP BPE files with {}'s tokenizer_2 special tokens",
                    preset.name
                )),
            ),
        };
        tracing::info!(
            "{}: single-file checkpoint, {} ({}); configs: {config_info}; tokenizer: {tokenizer_info}{}",
            path.display(),
            family.name(),
            family.text_encoders(),
            tokenizer_2_info
                .as_ref()
                .map_or(String::new(), |t| format!("; tokenizer_2: {t}")),
        );
        Ok(ModelSource {
            weights: WeightsFrom::SingleFile(file),
            configs,
            tokenizer,
            tokenizer_2,
            vae: None,
            device: device.clone(),
            text_encoder_device: device.clone(),
            info: ModelInfo {
                format: "single_file",
                family: Some(family.name()),
                config: config_info,
                tokenizer: tokenizer_info,
                tokenizer_2: tokenizer_2_info,
                vae: None,
            },
        })
    }

    /// [`ModelSource::open`] with every option: `--model-config` and `--vae`.
    pub fn open_with(model: &Path, options: &ModelOptions, device: &Device) -> Result<Self> {
        let mut source = Self::open(model, options.config.as_deref(), device)?;
        if options.text_encoders_on_cpu {
            source.text_encoder_device = Device::Cpu;
        }
        match &options.vae {
            Some(vae) => source.with_vae(vae),
            None => Ok(source),
        }
    }

    /// This model with its VAE replaced by `vae` (see [`ModelOptions::vae`]); checked to
    /// exist and to be a VAE folder or a safetensors file now, read with the other weights.
    pub fn with_vae(mut self, vae: &Path) -> Result<Self> {
        let name = last_component(vae);
        let (from, info) = if vae.is_dir() {
            // A pipeline folder lends its `vae/`.
            let dir = if vae.join("vae").join("config.json").is_file() {
                vae.join("vae")
            } else {
                vae.to_path_buf()
            };
            let config = dir.join("config.json");
            if !config.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--vae {}: a folder without config.json; give a diffusers VAE folder (config.json and \
                     diffusion_pytorch_model.safetensors) or one .safetensors file",
                    vae.display()
                )));
            }
            let weights = weights_file(&dir, "diffusion_pytorch_model")
                .map_err(|e| Error::InvalidArgument(format!("--vae {}: {e}", vae.display())))?;
            let from = VaeFrom::Folder { config, weights };
            (from, format!("{name} (its own config)"))
        } else if vae.is_file() || is_pickle_path(vae) {
            if is_pickle_path(vae) {
                return Err(pickle_refusal(vae));
            }
            let from = VaeFrom::File(vae.to_path_buf());
            (from, format!("{name} (under the model's VAE config)"))
        } else {
            return Err(Error::InvalidArgument(format!(
                "--vae {}: no such file or folder",
                vae.display()
            )));
        };
        tracing::info!("VAE: {info}, in place of the model's");
        self.vae = Some(from);
        self.info.vae = Some(info);
        Ok(self)
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
        self.tokenizer.load(Component::Tokenizer)
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
        let parts = self.component(Component::TextEncoder, |s, config, _| {
            s.text_encoder(config)
        })?;
        Ok(self.on_text_encoder_device(parts))
    }

    fn on_text_encoder_device<C>(&self, parts: ComponentParts<C>) -> ComponentParts<C> {
        ComponentParts {
            weights: parts.weights.on(&self.text_encoder_device),
            ..parts
        }
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
        let Some(tokenizer) = &self.tokenizer_2 else {
            return Ok(None);
        };
        let parts = self.component(Component::TextEncoder2, |s, config, path| {
            s.text_encoder_2(config, path)
        })?;
        Ok(Some((
            self.on_text_encoder_device(parts),
            tokenizer.load(Component::Tokenizer2)?,
        )))
    }

    /// `model_index.json`'s `force_zeros_for_empty_prompt`, which SDXL pipelines read
    /// (`true` when absent, as diffusers' default): the model folder's, or for a single
    /// file the `--model-config` folder's, as `from_single_file(config=DIR)` reads it
    /// (both built-in SDXL presets set `true`).
    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        let index = match &self.configs {
            Configs::Folder(folder) => folder.model_index()?,
            Configs::Preset(_) => None,
        };
        Ok(index
            .and_then(|i| i.force_zeros_for_empty_prompt)
            .unwrap_or(true))
    }

    /// The VAE: the model's, or the one `--vae` names.
    pub fn vae(&self) -> Result<ComponentParts<VaeConfig>> {
        match &self.vae {
            None => self.component(Component::Vae, |s, config, _| s.vae(config)),
            Some(VaeFrom::Folder { config, weights }) => {
                let parsed: VaeConfig = read_json(config)?;
                parsed.validate(config)?;
                tracing::info!("loading the VAE from {}", weights.display());
                Ok(ComponentParts {
                    config: parsed,
                    config_path: config.clone(),
                    weights: Weights::open(weights, &self.device)?,
                })
            }
            Some(VaeFrom::File(path)) => {
                let (config, config_path) = self.config::<VaeConfig>(Component::Vae)?;
                tracing::info!("loading the VAE from {}", path.display());
                Ok(ComponentParts {
                    weights: single_file::vae_file(path, &config, &self.device)?,
                    config,
                    config_path,
                })
            }
        }
    }
}
