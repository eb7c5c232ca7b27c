//! diffusers' `StableDiffusionPipeline.__call__`: encode the prompts, denoise from seeded
//! noise with classifier-free guidance, decode the latents to an 8-bit RGB image.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::clip::ClipTextModel;
use crate::model::source::{ModelInfo, ModelSource};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::VaeDecoder;
use crate::pipeline::noise::TorchRng;
use crate::pipeline::scheduler;
use crate::tensor::{Device, Tensor};

/// What to generate. Mirrors the arguments of diffusers' pipeline call.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub prompt: String,
    /// The unconditional branch's prompt; `None` means "".
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub seed: u64,
    /// A scheduler class name or alias replacing the folder's own (`from_config`).
    pub scheduler: Option<String>,
    /// Scheduler config values set last, as diffusers' `from_config(config, **overrides)`
    /// (for example `{"timestep_spacing": "trailing"}`).
    pub scheduler_overrides: serde_json::Map<String, serde_json::Value>,
}

/// Reported before each denoising step and once after the last (before the VAE decode);
/// returning `ControlFlow::Break` cancels the job.
#[derive(Clone, Copy, Debug)]
pub struct StepEvent {
    /// Denoising steps done.
    pub step: usize,
    pub total: usize,
}

/// Wall time of each stage of one generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimings {
    pub text_encoder: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
    pub total: Duration,
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Generated {
    pub image: RgbImage,
    pub seed: u64,
    pub timings: StageTimings,
}

/// A loaded model, ready to generate.
pub struct StableDiffusion {
    info: ModelInfo,
    /// The folder's `scheduler_config.json`; each request builds its scheduler from it.
    scheduler_config: serde_json::Map<String, serde_json::Value>,
    device: Device,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
}

impl StableDiffusion {
    /// Loads a diffusers model folder, or a single-file checkpoint with its built-in preset
    /// configs, onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_config(path, None, device)
    }

    /// [`StableDiffusion::load`] with `--model-config`: for a single-file checkpoint, a
    /// preset name or a diffusers-layout folder whose configs (and tokenizer) are used.
    pub fn load_with_config(path: &Path, config: Option<&Path>, device: &Device) -> Result<Self> {
        Self::from_source(&ModelSource::open(path, config, device)?, device)
    }

    /// Loads the model `--model` names: a folder or single file, a name under `weights/`,
    /// or a Hub id (downloaded into the Hugging Face cache first if need be), with
    /// `--model-config`. The one loading path of `generate` and `serve`.
    pub fn load_named(model: &Path, config: Option<&Path>, device: &Device) -> Result<Self> {
        let path = crate::model::hub::resolve_model_path(model)?;
        tracing::info!("model `{}`: {}", model.display(), path.display());
        Self::load_with_config(&path, config, device)
    }

    /// Builds every component from `source`'s configs and weights.
    pub fn from_source(source: &ModelSource, device: &Device) -> Result<Self> {
        // Built per request; checked now so that a bad config fails at load time.
        let scheduler_config = source.scheduler_config()?;
        let tokenizer = source.tokenizer()?;

        let p = source.text_encoder()?;
        let text_encoder = ClipTextModel::new(&p.config, &p.weights, &p.config_path)?;
        // Every prompt is padded to the tokenizer's length: the encoder needs that many positions.
        let positions = p.config.max_position_embeddings;
        if tokenizer.max_length() > positions {
            return Err(Error::config(
                &p.config_path,
                format!(
                    "`max_position_embeddings` {positions} is less than the {} tokens per prompt of the tokenizer ({}, `model_max_length`)",
                    tokenizer.max_length(),
                    source.info().tokenizer
                ),
            ));
        }

        let p = source.unet()?;
        let unet_config_path = p.config_path.clone();
        let unet = UNet2DConditionModel::new(&p.config, &p.weights, &p.config_path)?;

        let p = source.vae()?;
        let path = p.config_path.clone();
        let vae = VaeDecoder::new(&p.config, &p.weights, &p.config_path)?;
        let width = text_encoder.config().hidden_size;
        if let Some(&dim) = match &unet.config().cross_attention_dim {
            crate::model::config::PerLevel::One(d) => Some(d),
            crate::model::config::PerLevel::Each(dims) => dims.iter().find(|&&d| d != width),
        }
        .filter(|&&d| d != width)
        {
            return Err(Error::config(
                unet_config_path,
                format!("the UNet attends to {dim}-wide text embeddings but the text encoder makes {width}-wide ones"),
            ));
        }
        if vae.config().latent_channels != unet.config().out_channels {
            return Err(Error::config(
                path,
                format!(
                    "the VAE takes {} latent channels but the UNet makes {}",
                    vae.config().latent_channels,
                    unet.config().out_channels
                ),
            ));
        }
        Ok(StableDiffusion {
            info: source.info().clone(),
            scheduler_config,
            device: device.clone(),
            tokenizer,
            text_encoder,
            unet,
            vae,
        })
    }

    /// What was loaded: a folder or a single file, and where configs and tokenizer came from.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &VaeDecoder {
        &self.vae
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// `[1, L, D]` embeddings of one prompt, warning when the prompt was cut.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(prompt)?;
        // The count, not the words: prompts are the users' and logs are the operator's.
        if tokens.dropped > 0 {
            tracing::warn!(
                "the prompt was cut: its last {} tokens are beyond the {} that CLIP reads",
                tokens.dropped,
                self.tokenizer.max_length()
            );
        }
        self.text_encoder.forward(&tokens.ids)
    }

    /// What a request is checked against before it is queued.
    pub fn params_check(&self) -> ParamsCheck {
        ParamsCheck {
            vae_scale_factor: self.vae_scale_factor(),
            scheduler_config: self.scheduler_config.clone(),
        }
    }

    /// Runs the whole pipeline. `on_step` is called before each denoising step.
    pub fn generate(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(StepEvent) -> ControlFlow<()>,
    ) -> Result<Generated> {
        let mut scheduler = checked_scheduler(p, self.vae_scale_factor(), &self.scheduler_config)?;
        let start = Instant::now();
        let mut timings = StageTimings::default();

        // diffusers: guidance only when > 1 (and the UNet has no guidance embedding).
        let guided = p.guidance_scale > 1.0;
        let t0 = Instant::now();
        let prompt = self.encode_prompt(&p.prompt)?;
        let context = if guided {
            let negative = self.encode_prompt(p.negative_prompt.as_deref().unwrap_or(""))?;
            Tensor::cat(&[&negative, &prompt], 0)?
        } else {
            prompt
        };
        timings.text_encoder = t0.elapsed();

        let t0 = Instant::now();
        let f = self.vae_scale_factor();
        let shape = [1, self.unet.config().in_channels, p.height / f, p.width / f];
        let mut rng = TorchRng::new(p.seed);
        let mut latents = rng
            .randn_tensor(&shape, &self.device)?
            .scale(scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            if on_step(StepEvent {
                step: i,
                total: timesteps.len(),
            })
            .is_break()
            {
                return Err(Error::Cancelled);
            }
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let mut noise = self.unet.forward(&input, t, &context)?;
            if guided {
                let uncond = noise.narrow(0, 0, 1)?;
                let text = noise.narrow(0, 1, 1)?;
                noise = text
                    .sub(&uncond)?
                    .scale(p.guidance_scale as f32)?
                    .add(&uncond)?;
            }
            latents = scheduler.step(&noise, i, &latents, &mut rng)?;
        }
        let total = timesteps.len();
        if on_step(StepEvent { step: total, total }).is_break() {
            return Err(Error::Cancelled);
        }
        // One read-back of the small latent tensor: NaN here would decode to black.
        ensure_finite(&latents.to_vec()?, "the denoised latents")?;
        timings.denoise = t0.elapsed();

        let t0 = Instant::now();
        let scaling = self.vae.config().scaling_factor as f32;
        let decoded = self.vae.decode(&latents.scale(1.0 / scaling)?)?;
        let image = to_rgb8(&decoded)?;
        timings.vae_decode = t0.elapsed();
        timings.total = start.elapsed();
        Ok(Generated {
            image,
            seed: p.seed,
            timings,
        })
    }
}

/// diffusers' post-processing of one decoded image `[1, 3, H, W]`:
/// `(x / 2 + 0.5).clamp(0, 1)`, then numpy's `(x * 255).round()` (ties to even).
pub fn to_rgb8(decoded: &Tensor) -> Result<RgbImage> {
    decoded.expect_rank("to_rgb8", 4)?;
    let (c, h, w) = (decoded.dim(1), decoded.dim(2), decoded.dim(3));
    if decoded.dim(0) != 1 || c != 3 {
        return Err(Error::shape(
            "to_rgb8",
            format!("expected [1, 3, H, W], got {:?}", decoded.shape()),
        ));
    }
    // Clamped here, not on the device, so that NaN is seen before it becomes a black pixel
    // (clamping is exact, so the pixels are the same).
    let values = decoded.affine(0.5, 0.5)?.to_vec()?;
    ensure_finite(&values, "the decoded image's pixels")?;
    let mut pixels = vec![0u8; h * w * 3];
    for ch in 0..3 {
        for (i, v) in values[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
            pixels[i * 3 + ch] = (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        pixels,
    })
}

fn ensure_finite(values: &[f32], what: &'static str) -> Result<()> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { what })
    }
}

/// A model's rules for a request's parameters, without its weights: what the engine checks
/// before queueing, so that a request it cannot run is refused at once.
#[derive(Clone, Debug)]
pub struct ParamsCheck {
    vae_scale_factor: usize,
    scheduler_config: serde_json::Map<String, serde_json::Value>,
}

impl ParamsCheck {
    pub fn check(&self, p: &GenerateParams) -> Result<()> {
        checked_scheduler(p, self.vae_scale_factor, &self.scheduler_config).map(drop)
    }
}

/// The scheduler `p` asks for, once its size, guidance and step count are known to suit
/// the model (building the scheduler is what checks the steps against its schedule).
fn checked_scheduler(
    p: &GenerateParams,
    vae_scale_factor: usize,
    scheduler_config: &serde_json::Map<String, serde_json::Value>,
) -> Result<Box<dyn scheduler::Scheduler>> {
    let f = vae_scale_factor;
    if p.width == 0 || p.height == 0 || !p.width.is_multiple_of(f) || !p.height.is_multiple_of(f) {
        return Err(Error::InvalidArgument(format!(
            "width and height must be positive multiples of {f} (the VAE's downscale factor), got {}x{}",
            p.width, p.height
        )));
    }
    if !p.guidance_scale.is_finite() {
        return Err(Error::InvalidArgument(
            "guidance_scale must be a finite number".into(),
        ));
    }
    scheduler::from_config_with(
        scheduler_config,
        p.scheduler.as_deref(),
        &p.scheduler_overrides,
        p.steps,
    )
}

impl RgbImage {
    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        image::ImageEncoder::write_image(
            encoder,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Other(format!("PNG encoding failed: {e}")))?;
        Ok(out)
    }
}
