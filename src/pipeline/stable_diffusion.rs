//! diffusers' Stable Diffusion pipelines in one: text-to-image (`StableDiffusionPipeline`),
//! image-to-image (`StableDiffusionImg2ImgPipeline`) and inpainting
//! (`StableDiffusionInpaintPipeline`, for 9-channel inpainting UNets and ordinary ones).
//! They share four stages: encode the prompts, prepare the starting latents, denoise with
//! classifier-free guidance, decode to 8-bit RGB. Only the second differs much.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::clip::ClipTextModel;
use crate::model::download::RepoKind;
use crate::model::hub::resolve_path;
use crate::model::lora::{Adapters, LoraChoice, LoraComponent};
use crate::model::prompt_encoder::{PromptEmbeddings, PromptEncoder, TextEncoderPart};
use crate::model::source::{ModelInfo, ModelOptions, ModelSource};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Conditioning, TextTime, UNet2DConditionModel};
use crate::model::vae::VaeDecoder;
use crate::model::vae_encoder::VaeEncoder;
use crate::pipeline::image::{ensure_finite, to_rgb8, RgbImage};
use crate::pipeline::noise::TorchRng;
use crate::pipeline::params::{
    GenerateParams, InitImage, ModelDefaults, ParamsCheck, Plan, StepEvent,
};
use crate::pipeline::scheduler::Scheduler;
use crate::tensor::{Device, Tensor};

/// Wall time of each stage of one generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimings {
    pub text_encoder: Duration,
    /// Image-to-image and inpainting: the init (and masked) image through the VAE encoder.
    pub vae_encode: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
    pub total: Duration,
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
    prompt_encoder: PromptEncoder,
    /// SDXL's `force_zeros_for_empty_prompt`: a missing negative prompt gives zero negative
    /// embeddings. Always off for SD 1.x/2.x, whose pipeline encodes "" instead.
    zero_missing_negative: bool,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    /// `None` when the VAE's weights have no encoder (text-to-image does not need it).
    vae_encoder: Option<VaeEncoder>,
    defaults: ModelDefaults,
    /// The LoRA-changeable layers and the set merged into them now.
    adapters: Adapters,
}

impl StableDiffusion {
    /// Loads a diffusers model folder, or a single-file checkpoint with its built-in preset
    /// configs, onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, &ModelOptions::default(), device)
    }

    /// [`StableDiffusion::load`] with `--model-config` (for a single-file checkpoint, a
    /// preset name or a diffusers-layout folder whose configs and tokenizer are used) and
    /// `--vae` (a VAE in place of the model's).
    pub fn load_with(path: &Path, options: &ModelOptions, device: &Device) -> Result<Self> {
        let mut sd = Self::from_source(&ModelSource::open_with(path, options, device)?, device)?;
        // Turbo weights are the base model's architecture: only the name tells them apart
        // (the Hub cache keeps it in a parent folder, `models--stabilityai--sdxl-turbo`).
        let turbo = path.components().any(|c| {
            c.as_os_str()
                .to_string_lossy()
                .to_lowercase()
                .contains("turbo")
        });
        if turbo {
            sd.defaults = sd.defaults.turbo();
        }
        tracing::info!(
            "{} model{}: requests default to {}x{}, {} steps, guidance {}",
            sd.info.family.unwrap_or("custom"),
            if turbo { " (Turbo, by its name)" } else { "" },
            sd.defaults.width,
            sd.defaults.height,
            sd.defaults.steps,
            sd.defaults.guidance_scale
        );
        Ok(sd)
    }

    /// Loads the model `--model` names: a folder or single file, a name under `weights/`,
    /// or a Hub id (downloaded into the Hugging Face cache first if need be), with
    /// `--model-config` and `--vae` (which is found the same way). The one loading path of
    /// `generate` and `serve`.
    pub fn load_named(model: &Path, options: &ModelOptions, device: &Device) -> Result<Self> {
        let path = resolve_path(model, RepoKind::Pipeline)?;
        tracing::info!("model `{}`: {}", model.display(), path.display());
        let mut options = options.clone();
        if let Some(vae) = &options.vae {
            let found = resolve_path(vae, RepoKind::Vae)?;
            tracing::info!("vae `{}`: {}", vae.display(), found.display());
            options.vae = Some(found);
        }
        Self::load_with(&path, &options, device)
    }

    /// Builds every component from `source`'s configs and weights.
    pub fn from_source(source: &ModelSource, device: &Device) -> Result<Self> {
        // Built per request; checked now so that a bad config fails at load time.
        let scheduler_config = source.scheduler_config()?;
        // The text encoders' and UNet's Linear and Conv2d layers, for LoRA.
        let mut adapters = Adapters::default();
        let p = source.text_encoder()?;
        let weights = p
            .weights
            .registering(&adapters.registry(LoraComponent::TextEncoder));
        let first = TextEncoderPart {
            tokenizer: source.tokenizer()?,
            encoder: ClipTextModel::new(&p.config, &weights, &p.config_path)?,
        };
        let mut parts = vec![(first, p.config_path)];
        if let Some((p, tokenizer)) = source.text_encoder_2()? {
            let weights = p
                .weights
                .registering(&adapters.registry(LoraComponent::TextEncoder2));
            let encoder = ClipTextModel::new(&p.config, &weights, &p.config_path)?;
            parts.push((TextEncoderPart { tokenizer, encoder }, p.config_path));
        }
        let is_xl = parts.len() == 2;
        let prompt_encoder = PromptEncoder::new(parts)?;

        let p = source.unet()?;
        let unet_config_path = p.config_path.clone();
        let weights = p
            .weights
            .registering(&adapters.registry(LoraComponent::Unet));
        let unet = UNet2DConditionModel::new(&p.config, &weights, &p.config_path)?;
        adapters.accept_original_unet_names(&p.config);

        let p = source.vae()?;
        let path = p.config_path.clone();
        let vae = VaeDecoder::new(&p.config, &p.weights, &p.config_path)?;
        let vae_encoder = if p.weights.contains("encoder.conv_in.weight") {
            Some(VaeEncoder::new(&p.config, &p.weights, &p.config_path)?)
        } else {
            tracing::warn!("the VAE has no encoder weights: image-to-image and inpainting are off");
            None
        };
        let width = prompt_encoder.context_width();
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
        // SDXL's UNet reads the second encoder's pooled embedding; diffusers checks the
        // width in `_get_add_time_ids`.
        let pooled = prompt_encoder.pooled_width();
        match (unet.text_time_pooled_dim(), pooled) {
            (Some(want), Some(have)) if want == have => {}
            (None, None) => {}
            (want, have) => {
                return Err(Error::config(
                    unet_config_path,
                    format!(
                        "the UNet reads {} but the text encoders make {}",
                        want.map_or("no pooled text embedding (it is not an SDXL UNet)".into(), |w| format!("a {w}-wide pooled text embedding (`projection_class_embeddings_input_dim` - 6 x `addition_time_embed_dim`)")),
                        have.map_or("none (one text encoder)".into(), |h| format!("a {h}-wide one"))
                    ),
                ));
            }
        }
        let latent = vae.config().latent_channels;
        let unet_in = unet.config().in_channels;
        // An inpainting UNet also takes the mask and the masked image's latents.
        if unet_in != latent && unet_in != 2 * latent + 1 {
            return Err(Error::config(
                unet_config_path,
                format!(
                    "the UNet takes {unet_in} input channels: neither the VAE's {latent} latent channels nor the {} of an inpainting model",
                    2 * latent + 1
                ),
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
        if *device == Device::Cpu {
            // The convolutions' choices measured on this processor, before anything is timed
            // (the service's step cost) or generated.
            let widest = (unet.config().block_out_channels.iter())
                .chain(&vae.config().block_out_channels)
                .max();
            crate::backend::cpu::tuning::prepare(widest.copied().unwrap_or(0));
        }
        let mut info = source.info().clone();
        // A folder's family, by the same signs as a single file's: CLIP or OpenCLIP.
        if info.family.is_none() {
            let first = &prompt_encoder.parts()[0].encoder;
            info.family = Some(match (is_xl, first.config().hidden_act.as_str()) {
                (true, _) => "SDXL",
                (false, "quick_gelu") => "SD 1.x",
                (false, _) => "SD 2.x",
            });
        }
        let defaults = if is_xl {
            ModelDefaults::xl(unet.config().sample_size, vae.config().downscale_factor())
        } else {
            ModelDefaults::GUIDE
        };
        Ok(StableDiffusion {
            info,
            defaults,
            scheduler_config,
            device: device.clone(),
            prompt_encoder,
            zero_missing_negative: is_xl && source.force_zeros_for_empty_prompt()?,
            unet,
            vae,
            vae_encoder,
            adapters,
        })
    }

    /// The LoRAs merged into the weights now (those of the last generation).
    pub fn active_loras(&self) -> Vec<LoraChoice> {
        self.adapters.active()
    }

    /// What was loaded: a folder or a single file, and where configs and tokenizer came from.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// What requests that leave them out get: size, steps, guidance.
    pub fn defaults(&self) -> ModelDefaults {
        self.defaults
    }

    /// The (first) tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.prompt_encoder.parts()[0].tokenizer
    }

    /// The (first) text encoder.
    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.prompt_encoder.parts()[0].encoder
    }

    pub fn prompt_encoder(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }

    /// Whether this is an SDXL pipeline (two text encoders, `text_time` conditioning).
    pub fn is_xl(&self) -> bool {
        self.prompt_encoder.parts().len() == 2
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

    /// One prompt's embeddings, warning when the prompt was cut.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeddings> {
        self.prompt_encoder.encode(prompt)
    }

    /// The UNet's conditioning for a batch of prompts' embeddings (one per branch of the
    /// guidance batch), at an image of `width` x `height`: for SDXL also the pooled
    /// embeddings and `_get_add_time_ids` (original size = target size = the image's,
    /// crop corner (0, 0), as the pipeline's defaults), the same for every branch.
    pub fn conditioning(
        &self,
        branches: &[&PromptEmbeddings],
        width: usize,
        height: usize,
    ) -> Result<Conditioning> {
        // The text encoders may run on the CPU beside a UNet on a GPU.
        let context = Tensor::cat(&branches.iter().map(|b| &b.context).collect::<Vec<_>>(), 0)?
            .to_device(&self.device)?;
        if self.unet.text_time_pooled_dim().is_none() {
            return Ok(Conditioning {
                context,
                text_time: None,
            });
        }
        let pooled = branches
            .iter()
            .map(|b| {
                b.pooled.as_ref().ok_or_else(|| {
                    Error::InvalidArgument("the SDXL UNet needs a pooled prompt embedding".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (w, h) = (width as f32, height as f32);
        Ok(Conditioning {
            context,
            text_time: Some(TextTime {
                text_embeds: Tensor::cat(&pooled, 0)?.to_device(&self.device)?,
                time_ids: vec![vec![h, w, 0.0, 0.0, h, w]; branches.len()],
            }),
        })
    }

    pub fn vae_encoder(&self) -> Option<&VaeEncoder> {
        self.vae_encoder.as_ref()
    }

    /// What a request is checked against before it is queued.
    pub fn params_check(&self) -> ParamsCheck {
        ParamsCheck {
            vae_scale_factor: self.vae_scale_factor(),
            scheduler_config: self.scheduler_config.clone(),
            unet_in_channels: self.unet.config().in_channels,
            latent_channels: self.vae.config().latent_channels,
            has_vae_encoder: self.vae_encoder.is_some(),
            text_encoders: self.prompt_encoder.parts().len(),
        }
    }

    /// Runs the whole pipeline. `on_step` is called before each denoising step.
    pub fn generate(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(StepEvent) -> ControlFlow<()>,
    ) -> Result<Generated> {
        let Plan {
            mut scheduler,
            begin,
        } = self.params_check().plan(p)?;
        if let Some(took) = self.adapters.activate(&p.loras)? {
            tracing::info!("LoRA set {:?} in effect after {took:.2?}", p.loras);
        }
        let start = Instant::now();
        let mut timings = StageTimings::default();

        let t0 = Instant::now();
        let guidance = Guidance::encode(self, p)?;
        timings.text_encoder = t0.elapsed();

        // The VAE runs once per image and its maps change size from level to level, so
        // on a GPU it frees its buffers as it goes instead of pooling them, and the pool is
        // emptied around it: the device holds the weights and one stage's working memory
        // at a time (see Device::without_buffer_reuse).
        let t0 = Instant::now();
        let mut rng = TorchRng::new(p.seed);
        let start_latents = self.device.without_buffer_reuse(|| match &p.init {
            None => self.text_to_image_latents(p, scheduler.as_ref(), &mut rng),
            Some(init) => {
                scheduler.set_begin_index(begin);
                self.init_image_latents(init, scheduler.as_ref(), &mut rng)
            }
        })?;
        timings.vae_encode = t0.elapsed();

        let t0 = Instant::now();
        let latents = self.denoise(
            scheduler.as_mut(),
            begin,
            start_latents,
            &guidance,
            &mut rng,
            on_step,
        )?;
        timings.denoise = t0.elapsed();

        let t0 = Instant::now();
        let image = self.device.without_buffer_reuse(|| self.decode(&latents))?;
        timings.vae_decode = t0.elapsed();
        timings.total = start.elapsed();
        Ok(Generated {
            image,
            seed: p.seed,
            timings,
        })
    }

    /// Stage 2 of text-to-image: seeded noise at the scheduler's initial scale.
    fn text_to_image_latents(
        &self,
        p: &GenerateParams,
        scheduler: &dyn Scheduler,
        rng: &mut TorchRng,
    ) -> Result<StartLatents> {
        let f = self.vae_scale_factor();
        let shape = [
            1,
            self.vae.config().latent_channels,
            p.height / f,
            p.width / f,
        ];
        let latents = rng
            .randn_tensor(&shape, &self.device)?
            .scale(scheduler.init_noise_sigma())?;
        Ok(StartLatents {
            latents,
            inpaint: None,
        })
    }

    /// `scaling_factor * vae.encode(image).latent_dist.sample(generator)`: one draw from
    /// the generator, of the latents' shape.
    fn encode_image(&self, image: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let encoder = self.vae_encoder.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this model has no VAE encoder weights".into())
        })?;
        let dist = encoder.encode(image)?;
        let noise = rng.randn_tensor(dist.mean.shape(), &self.device)?;
        dist.sample_with(&noise)?
            .scale(self.vae.config().scaling_factor as f32)
    }

    /// Stage 2 of image-to-image and inpainting, drawing from the generator in diffusers'
    /// order: the init image's latents (when used), the noise, then for inpainting the
    /// masked image's latents (encoded even where only a 9-channel UNet reads them).
    fn init_image_latents(
        &self,
        init: &InitImage,
        scheduler: &dyn Scheduler,
        rng: &mut TorchRng,
    ) -> Result<StartLatents> {
        let image = init.image.to_tensor(&self.device)?;
        let Some(mask) = &init.mask else {
            // StableDiffusionImg2ImgPipeline.prepare_latents.
            let image_latents = self.encode_image(&image, rng)?;
            let noise = rng.randn_tensor(image_latents.shape(), &self.device)?;
            return Ok(StartLatents {
                latents: scheduler.add_noise(&image_latents, &noise, 0)?,
                inpaint: None,
            });
        };
        // StableDiffusionInpaintPipeline.prepare_latents: at strength 1 the latents are pure
        // noise, and a 9-channel UNet never needs the init image's own latents.
        let from_noise = init.strength == 1.0;
        let blends = !self.params_check().is_inpainting_unet();
        let image_latents = if blends || !from_noise {
            Some(self.encode_image(&image, rng)?)
        } else {
            None
        };
        let f = self.vae_scale_factor();
        let shape = [
            1,
            self.vae.config().latent_channels,
            init.image.height / f,
            init.image.width / f,
        ];
        let noise = rng.randn_tensor(&shape, &self.device)?;
        let latents = match &image_latents {
            Some(image_latents) if !from_noise => scheduler.add_noise(image_latents, &noise, 0)?,
            _ => noise.scale(scheduler.init_noise_sigma())?,
        };
        // prepare_mask_latents.
        let (_, masked_image) = mask.apply(&init.image, &self.device)?;
        let masked_image_latents = self.encode_image(&masked_image, rng)?;
        let latent_mask = mask.latent_mask(f, &self.device)?;
        let inpaint = match image_latents {
            Some(image_latents) if blends => Inpaint::Blend {
                mask: latent_mask,
                image_latents,
                noise,
            },
            _ => Inpaint::Concat {
                mask: latent_mask,
                masked_image_latents,
            },
        };
        Ok(StartLatents {
            latents,
            inpaint: Some(inpaint),
        })
    }

    /// Stage 3: the scheduler's steps from `timesteps()[begin]` on, one UNet evaluation
    /// each (a batch of two under guidance).
    fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        begin: usize,
        start: StartLatents,
        guidance: &Guidance,
        rng: &mut TorchRng,
        on_step: &mut dyn FnMut(StepEvent) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let StartLatents {
            mut latents,
            inpaint,
        } = start;
        // The mask and masked-image latents a 9-channel UNet reads beside the latents, once
        // per branch of the guidance batch.
        let extra_channels = match &inpaint {
            Some(Inpaint::Concat {
                mask,
                masked_image_latents,
            }) => Some(Tensor::cat(
                &[
                    &guidance.batch(mask)?,
                    &guidance.batch(masked_image_latents)?,
                ],
                1,
            )?),
            _ => None,
        };
        let timesteps = scheduler
            .timesteps()
            .get(begin..)
            .unwrap_or_default()
            .to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            if on_step(StepEvent { step: i, total }).is_break() {
                return Err(Error::Cancelled);
            }
            let input = scheduler.scale_model_input(&guidance.batch(&latents)?, i)?;
            let input = match &extra_channels {
                Some(extra) => Tensor::cat(&[&input, extra], 1)?,
                None => input,
            };
            let noise_pred = guidance.combine(&self.unet.forward(&input, t, &guidance.cond)?)?;
            latents = scheduler.step(&noise_pred, i, &latents, rng)?;
            if let Some(Inpaint::Blend {
                mask,
                image_latents,
                noise,
            }) = &inpaint
            {
                // The known region is put back, noised to the next step's level.
                let known = if i + 1 < total {
                    scheduler.add_noise(image_latents, noise, i + 1)?
                } else {
                    image_latents.clone()
                };
                latents = mask
                    .affine(-1.0, 1.0)?
                    .mul(&known)?
                    .add(&mask.mul(&latents)?)?;
            }
        }
        if on_step(StepEvent { step: total, total }).is_break() {
            return Err(Error::Cancelled);
        }
        // One read-back of the small latent tensor: NaN here would decode to black.
        ensure_finite(&latents.to_vec()?, "the denoised latents")?;
        Ok(latents)
    }

    /// Stage 4: `vae.decode(latents / scaling_factor)` to 8-bit RGB.
    fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        let scaling = self.vae.config().scaling_factor as f32;
        to_rgb8(&self.vae.decode(&latents.scale(1.0 / scaling)?)?)
    }
}

/// Stage 1: the prompt embeddings the UNet attends to, and the guidance that combines its
/// two predictions. diffusers guides only when the scale is above 1.
struct Guidance {
    /// `[negative; prompt]` when guided, else the prompt's alone.
    cond: Conditioning,
    scale: Option<f32>,
}

impl Guidance {
    fn encode(sd: &StableDiffusion, p: &GenerateParams) -> Result<Self> {
        let encoder = &sd.prompt_encoder;
        // diffusers' `prompt_2 or prompt`: an empty second prompt is the first.
        fn second(p2: &Option<String>) -> Option<&str> {
            p2.as_deref().filter(|s| !s.is_empty())
        }
        let prompt = encoder.encode_with(&p.prompt, second(&p.prompt_2), p.prompt_syntax)?;
        if p.guidance_scale > 1.0 {
            let negative = match p.negative_prompt.as_deref() {
                None if sd.zero_missing_negative => prompt.zeros_like()?,
                negative => encoder.encode_with(
                    negative.unwrap_or(""),
                    second(&p.negative_prompt_2),
                    p.prompt_syntax,
                )?,
            };
            let (negative, prompt) = Self::same_length(sd, negative, prompt, p)?;
            Ok(Guidance {
                cond: sd.conditioning(&[&negative, &prompt], p.width, p.height)?,
                scale: Some(p.guidance_scale as f32),
            })
        } else {
            Ok(Guidance {
                cond: sd.conditioning(&[&prompt], p.width, p.height)?,
                scale: None,
            })
        }
    }

    /// Prompts of different numbers of chunks (A1111's syntax) made as long as each other
    /// with the empty prompt's chunks after the shorter (A1111's `pad_cond_uncond`; without
    /// it A1111 runs the two branches apart, which a batch of two cannot).
    fn same_length(
        sd: &StableDiffusion,
        a: PromptEmbeddings,
        b: PromptEmbeddings,
        p: &GenerateParams,
    ) -> Result<(PromptEmbeddings, PromptEmbeddings)> {
        let (la, lb) = (a.context.dim(1), b.context.dim(1));
        if la == lb {
            return Ok((a, b));
        }
        let empty = sd
            .prompt_encoder
            .encode_with("", None, p.prompt_syntax)?
            .context;
        let pad = |e: PromptEmbeddings, to: usize| -> Result<PromptEmbeddings> {
            let mut pieces = vec![e.context.clone()];
            let mut length = e.context.dim(1);
            while length < to {
                pieces.push(empty.clone());
                length += empty.dim(1);
            }
            Ok(PromptEmbeddings {
                context: Tensor::cat(&pieces.iter().collect::<Vec<_>>(), 1)?,
                pooled: e.pooled,
            })
        };
        Ok((pad(a, lb)?, pad(b, la)?))
    }

    /// `x` once per branch of the UNet's batch.
    fn batch(&self, x: &Tensor) -> Result<Tensor> {
        match self.scale {
            Some(_) => Tensor::cat(&[x, x], 0),
            None => Ok(x.clone()),
        }
    }

    /// `uncond + scale * (text - uncond)`.
    fn combine(&self, noise_pred: &Tensor) -> Result<Tensor> {
        let Some(scale) = self.scale else {
            return Ok(noise_pred.clone());
        };
        let uncond = noise_pred.narrow(0, 0, 1)?;
        let text = noise_pred.narrow(0, 1, 1)?;
        text.sub(&uncond)?.scale(scale)?.add(&uncond)
    }
}

/// What stage 2 hands to the denoising loop.
struct StartLatents {
    latents: Tensor,
    inpaint: Option<Inpaint>,
}

/// How the denoising loop keeps the unmasked region, by the kind of UNet.
enum Inpaint {
    /// A 9-channel inpainting UNet reads the mask and the masked image's latents.
    Concat {
        mask: Tensor,
        masked_image_latents: Tensor,
    },
    /// An ordinary UNet: after each step the known region is replaced by the init image's
    /// latents noised with the same `noise` to the next step's level.
    Blend {
        mask: Tensor,
        image_latents: Tensor,
        noise: Tensor,
    },
}
