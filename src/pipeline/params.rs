//! What a generation is asked for, and the model's rules for it: checked before a request
//! waits in a queue, so that one the model cannot run is refused at once.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::lora::LoraChoice;
use crate::model::prompt_syntax::PromptSyntax;
use crate::pipeline::image::{MaskImage, RgbImage};
use crate::pipeline::scheduler::{self, Scheduler};

/// What to generate. Mirrors the arguments of diffusers' pipeline call.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub prompt: String,
    /// The unconditional branch's prompt; `None` means "".
    pub negative_prompt: Option<String>,
    /// SDXL's second text encoder's prompts (diffusers' `prompt_2`, `negative_prompt_2`);
    /// `None`: the first encoder's. A missing `negative_prompt` still gives SDXL's zero
    /// negative embeddings whatever `negative_prompt_2` says, as in diffusers.
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
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
    /// Image-to-image or inpainting; `None` is text-to-image.
    pub init: Option<InitImage>,
    /// LoRAs merged into the text encoders and UNet for this generation, each with its
    /// weight (diffusers' `load_lora_weights` + `set_adapters`).
    pub loras: Vec<LoraChoice>,
    /// How the prompts are read: diffusers' plain text (the default) or AUTOMATIC1111's
    /// emphasis and chunks.
    pub prompt_syntax: PromptSyntax,
}

/// The API guide's defaults (512x512, 50 steps, guidance 7.5, seed 0), the model's own
/// scheduler, text-to-image, no LoRA, diffusers' prompt syntax; the prompt is empty, so
/// callers set it: `GenerateParams { prompt: "a cat".into(), ..Default::default() }`.
impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            seed: 0,
            scheduler: None,
            scheduler_overrides: Default::default(),
            init: None,
            loras: Vec::new(),
            prompt_syntax: PromptSyntax::default(),
        }
    }
}

impl GenerateParams {
    /// The denoising steps a run takes: all `steps`, or strength's share of them
    /// (PNDM's schedule runs one more UNet evaluation).
    pub fn denoising_steps(&self) -> usize {
        match &self.init {
            Some(init) => self.steps - init.begin_index(self.steps).unwrap_or(self.steps),
            None => self.steps,
        }
    }
}

/// What a request that leaves them out gets from this model. SD 1.x/2.x: the API guide's
/// 512x512, 50 steps, guidance 7.5 (SD 1.5's, which the guide was written for). SDXL:
/// diffusers' `StableDiffusionXLPipeline` defaults, a side of the UNet's `sample_size`
/// times the VAE factor (1024 for the base model, 512 for Turbo), 50 steps, guidance 5.0.
/// The distilled Turbo models: 1 step without guidance, as their model cards prescribe.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ModelDefaults {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
}

impl ModelDefaults {
    /// SD 1.x/2.x's, the API guide's.
    pub const GUIDE: ModelDefaults = ModelDefaults {
        width: 512,
        height: 512,
        steps: 50,
        guidance_scale: 7.5,
    };

    /// SDXL's: `sample_size` is the UNet config's (`None`: SDXL base's 128), `factor` the
    /// VAE's.
    pub fn xl(sample_size: Option<usize>, factor: usize) -> Self {
        let side = sample_size.unwrap_or(128) * factor;
        ModelDefaults {
            width: side,
            height: side,
            steps: 50,
            guidance_scale: 5.0,
        }
    }

    /// SD-Turbo and SDXL-Turbo (adversarially distilled): one step, no guidance.
    pub fn turbo(self) -> Self {
        ModelDefaults {
            steps: 1,
            guidance_scale: 0.0,
            ..self
        }
    }
}

/// Where image-to-image (`StableDiffusionImg2ImgPipeline`) and, with a mask, inpainting
/// (`StableDiffusionInpaintPipeline`) start. The image sets the output size.
#[derive(Clone, Debug, PartialEq)]
pub struct InitImage {
    pub image: Arc<RgbImage>,
    /// White repaints, black keeps.
    pub mask: Option<Arc<MaskImage>>,
    /// How much of the schedule runs, in (0, 1]: 1 starts from (almost) pure noise.
    /// diffusers' defaults are 0.8 for image-to-image and 1.0 for inpainting.
    pub strength: f64,
}

impl InitImage {
    /// diffusers' `get_timesteps`: the index of the first of the `steps`-step schedule's
    /// timesteps that a run at `strength` takes (every scheduler here has order 1).
    pub fn begin_index(&self, steps: usize) -> Result<usize> {
        let run = ((steps as f64 * self.strength) as usize).min(steps);
        if run == 0 {
            return Err(Error::InvalidArgument(format!(
                "strength {} of {steps} steps runs no denoising step: raise strength or steps",
                self.strength
            )));
        }
        Ok(steps - run)
    }
}

/// Reported before each denoising step and once after the last (before the VAE decode);
/// returning `ControlFlow::Break` cancels the job.
#[derive(Clone, Copy, Debug)]
pub struct StepEvent {
    /// Denoising steps done.
    pub step: usize,
    pub total: usize,
}

/// A model's rules for a request's parameters, without its weights.
#[derive(Clone, Debug)]
pub struct ParamsCheck {
    pub(crate) vae_scale_factor: usize,
    pub(crate) scheduler_config: serde_json::Map<String, serde_json::Value>,
    /// 9 for an inpainting UNet (latents, mask, masked-image latents), else the latent width.
    pub(crate) unet_in_channels: usize,
    pub(crate) latent_channels: usize,
    pub(crate) has_vae_encoder: bool,
    /// 2 for SDXL, whose second encoder may read its own prompts.
    pub(crate) text_encoders: usize,
}

/// A checked request's scheduler and where in its timesteps the run begins.
pub(crate) struct Plan {
    pub scheduler: Box<dyn Scheduler>,
    pub begin: usize,
}

impl ParamsCheck {
    pub fn check(&self, p: &GenerateParams) -> Result<()> {
        self.plan(p).map(drop)
    }

    /// The UNet evaluations the request runs, as the pipeline's step events count them:
    /// [`GenerateParams::denoising_steps`] plus any the scheduler adds (PNDM's warm-up).
    pub fn unet_evaluations(&self, p: &GenerateParams) -> Result<usize> {
        let plan = self.plan(p)?;
        Ok(plan.scheduler.timesteps().len().saturating_sub(plan.begin))
    }

    /// Whether the UNet takes the mask and the masked image's latents besides the latents.
    pub(crate) fn is_inpainting_unet(&self) -> bool {
        self.unet_in_channels != self.latent_channels
    }

    /// The scheduler `p` asks for, once its size, guidance, steps and init image are known
    /// to suit the model (building the scheduler is what checks the steps).
    pub(crate) fn plan(&self, p: &GenerateParams) -> Result<Plan> {
        let f = self.vae_scale_factor;
        if p.width == 0
            || p.height == 0
            || !p.width.is_multiple_of(f)
            || !p.height.is_multiple_of(f)
        {
            let what = if p.init.is_some() {
                "the init image's width and height"
            } else {
                "width and height"
            };
            return Err(Error::InvalidArgument(format!(
                "{what} must be positive multiples of {f} (the VAE's downscale factor), got {}x{}",
                p.width, p.height
            )));
        }
        if self.text_encoders < 2 {
            let second = [
                ("prompt_2", &p.prompt_2),
                ("negative_prompt_2", &p.negative_prompt_2),
            ];
            if let Some((field, _)) = second.iter().find(|(_, v)| v.is_some()) {
                return Err(Error::InvalidArgument(format!(
                    "{field} is for SDXL's second text encoder; this model has one text encoder"
                )));
            }
        }
        if !p.guidance_scale.is_finite() {
            return Err(Error::InvalidArgument(
                "guidance_scale must be a finite number".into(),
            ));
        }
        let has_mask = p.init.as_ref().is_some_and(|i| i.mask.is_some());
        if self.is_inpainting_unet() && !has_mask {
            return Err(Error::InvalidArgument(format!(
                "this is an inpainting model (its UNet takes {} input channels): it needs an init image and a mask",
                self.unet_in_channels
            )));
        }
        let scheduler = scheduler::from_config_with(
            &self.scheduler_config,
            p.scheduler.as_deref(),
            &p.scheduler_overrides,
            p.steps,
        )?;
        let Some(init) = &p.init else {
            return Ok(Plan {
                scheduler,
                begin: 0,
            });
        };
        if !(init.strength > 0.0 && init.strength <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "strength must be in (0, 1], got {}",
                init.strength
            )));
        }
        if !self.has_vae_encoder {
            return Err(Error::InvalidArgument(
                "this model has no VAE encoder weights, which image-to-image and inpainting need"
                    .into(),
            ));
        }
        let image = &init.image;
        if (image.width, image.height) != (p.width, p.height) {
            return Err(Error::InvalidArgument(format!(
                "width and height {}x{} differ from the init image's {}x{}",
                p.width, p.height, image.width, image.height
            )));
        }
        if let Some(mask) = &init.mask {
            if (mask.width, mask.height) != (image.width, image.height) {
                return Err(Error::InvalidArgument(format!(
                    "the mask is {}x{} but the init image is {}x{}: they must be the same size",
                    mask.width, mask.height, image.width, image.height
                )));
            }
        }
        let begin = init.begin_index(p.steps)?;
        Ok(Plan { scheduler, begin })
    }
}
