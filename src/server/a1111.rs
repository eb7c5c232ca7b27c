//! AUTOMATIC1111's web UI API, the part its clients use (the `webuiapi` package, Open
//! WebUI, SillyTavern): `txt2img`, the model/sampler/scheduler lists, options, progress,
//! `interrupt` and `skip`, under `/sdapi/v1`. A txt2img image is the /generate image for the
//! same parameters: each image of a batch is one engine job with seed, seed+1, ...

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::body::{BodilessPost, JsonBody};
use super::error::{ApiError, ErrorBody};
use super::request::{self, type_error, Dialect};
use super::routes::{check_cost, generate_images, AppState};
use crate::model::prompt_syntax::PromptSyntax;
use crate::pipeline::{GenerateParams, InitImage, MaskImage, RgbImage};

/// txt2img's fields as A1111 names them, with its defaults; the many options this server
/// has no use for (hires fix, face restoration, scripts...) are ignored, as A1111 ignores
/// what it does not know.
const A1111: Dialect = Dialect {
    steps: "steps",
    guidance: "cfg_scale",
    scheduler: None,
    refuse_unknown: false,
    default_steps: Some(50),
    default_guidance: Some(7.0),
    init_image: false,
    loras: false,
    // What A1111's clients write prompts for.
    prompt_syntax: Some(PromptSyntax::A1111),
    second_prompts: false,
};

/// txt2img's body as the OpenAPI document describes it (the fields this server reads; any
/// other is ignored).
#[derive(ToSchema)]
#[allow(dead_code)] // describes the wire format only
pub struct Txt2ImgBody {
    prompt: String,
    negative_prompt: Option<String>,
    /// Default 50.
    steps: Option<u64>,
    /// Default 7.0.
    cfg_scale: Option<f64>,
    width: Option<u64>,
    height: Option<u64>,
    /// -1 for random.
    seed: Option<i64>,
    /// "Euler a", "Euler", "LMS", "DPM++ 2M", "DDIM", "PLMS", "LCM" (or "... Karras");
    /// default "Euler".
    sampler_name: Option<String>,
    /// "automatic" or "Karras".
    scheduler: Option<String>,
    /// Images per batch (1 to 16, with n_iter).
    batch_size: Option<u64>,
    n_iter: Option<u64>,
}

/// img2img's body as the OpenAPI document describes it: txt2img's fields and these.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the wire format only
pub struct Img2ImgBody {
    prompt: String,
    negative_prompt: Option<String>,
    /// Base64 PNGs or JPEGs (raw or data URLs); the first is the image to start from,
    /// resized to width x height when its size differs.
    init_images: Vec<String>,
    /// Inpainting: a base64 mask, white where the image is repainted (resized likewise).
    mask: Option<String>,
    /// 1 repaints the black part of the mask instead; default 0.
    inpainting_mask_invert: Option<u64>,
    /// Above 0 and at most 1; default 0.75.
    denoising_strength: Option<f64>,
    /// Default 50.
    steps: Option<u64>,
    /// Default 7.0.
    cfg_scale: Option<f64>,
    /// Default 512.
    width: Option<u64>,
    /// Default 512.
    height: Option<u64>,
    /// -1 for random.
    seed: Option<i64>,
    /// As txt2img's.
    sampler_name: Option<String>,
    /// As txt2img's.
    scheduler: Option<String>,
    batch_size: Option<u64>,
    n_iter: Option<u64>,
}

/// txt2img's (and img2img's) answer.
#[derive(Serialize, ToSchema)]
pub struct Txt2ImgResponse {
    /// PNGs, base64-encoded (no data: prefix).
    images: Vec<String>,
    /// The request with its defaults filled in.
    parameters: Map<String, Value>,
    /// A JSON string: seed, all_seeds, prompt, negative_prompt, steps, cfg_scale,
    /// sampler_name, scheduler, width, height...
    info: String,
}

/// Most images one txt2img request may ask for (`batch_size` x `n_iter`).
const MAX_IMAGES: u64 = 16;

/// A1111's samplers that this server has, with the scheduler each one is here.
struct Sampler {
    name: &'static str,
    aliases: &'static [&'static str],
    /// The scheduler name (see `scheduler::resolve_name`).
    scheduler: &'static str,
    /// Whether A1111's "Karras" schedule applies (`<scheduler>_karras`).
    karras: bool,
}

const SAMPLERS: [Sampler; 7] = [
    Sampler {
        name: "Euler a",
        aliases: &["k_euler_a", "k_euler_ancestral"],
        scheduler: "euler_a",
        karras: false,
    },
    Sampler {
        name: "Euler",
        aliases: &["k_euler"],
        scheduler: "euler",
        karras: true,
    },
    Sampler {
        name: "LMS",
        aliases: &["k_lms"],
        scheduler: "lms",
        karras: true,
    },
    Sampler {
        name: "DPM++ 2M",
        aliases: &["k_dpmpp_2m"],
        scheduler: "dpm++2m",
        karras: true,
    },
    Sampler {
        name: "DDIM",
        aliases: &["ddim"],
        scheduler: "ddim",
        karras: false,
    },
    Sampler {
        name: "PLMS",
        aliases: &["plms"],
        scheduler: "pndm",
        karras: false,
    },
    Sampler {
        name: "LCM",
        aliases: &["lcm"],
        scheduler: "lcm",
        karras: false,
    },
];

/// A1111 runs "Euler" when a request names no sampler.
const DEFAULT_SAMPLER: &str = "Euler";

/// A1111's schedules (name, label) that this server has: the sampler's own, and Karras.
const SCHEDULES: [(&str, &str); 2] = [("automatic", "Automatic"), ("karras", "Karras")];

/// Schedule names clients send that mean the sampler's own here: A1111's "normal" (the
/// model's discrete schedule, which is what the samplers here use unless Karras is asked
/// for) and SillyTavern's "N/A" (sent when it could not read the list).
const OWN_SCHEDULE_ALIASES: [&str; 2] = ["normal", "N/A"];

/// What the dialect keeps between requests.
#[derive(Default)]
pub struct A1111State {
    /// Counts `POST interrupt`s, so that a batch can tell an interrupt (stop the batch)
    /// from a skip (go on with the next image).
    interrupts: AtomicU64,
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/txt2img", post(txt2img))
        .route("/img2img", post(img2img))
        .route("/progress", get(progress))
        .route("/interrupt", post(interrupt))
        .route("/skip", post(skip))
        .route("/options", get(options).post(set_options))
        .route("/sd-models", get(sd_models))
        .route("/samplers", get(samplers))
        .route("/schedulers", get(schedulers))
        .route("/sd-vae", get(sd_vaes))
        .route("/loras", get(loras))
        .route("/refresh-loras", post(refresh_loras))
        .route("/upscalers", get(upscalers))
        .route("/latent-upscale-modes", get(latent_upscale_modes))
        .route("/scripts", get(scripts))
}

/// The sampler and schedule a request names, as this server's scheduler name and A1111's
/// labels for the answer. A legacy combined name ("DPM++ 2M Karras") sets the schedule.
fn choose_sampler(
    fields: &Map<String, Value>,
) -> Result<(String, &'static str, &'static str), ApiError> {
    let text = |field: &str| match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(type_error(field, "a string", other)),
    };
    let named = text("sampler_name")?
        .or(text("sampler_index")?)
        .unwrap_or_else(|| DEFAULT_SAMPLER.to_string());
    let (base, legacy_karras) = match named.strip_suffix(" Karras") {
        Some(base) => (base.to_string(), true),
        None => (named.clone(), false),
    };
    let sampler = SAMPLERS
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(&base) || s.aliases.contains(&base.as_str()))
        .ok_or_else(|| {
            let names: Vec<&str> = SAMPLERS.iter().map(|s| s.name).collect();
            ApiError::bad_request(format!(
                "`sampler_name` {named:?} is not available here; the samplers are {}",
                names.join(", ")
            ))
        })?;
    let schedule = text("scheduler")?
        .filter(|s| {
            !OWN_SCHEDULE_ALIASES
                .iter()
                .any(|a| a.eq_ignore_ascii_case(s))
        })
        .unwrap_or_else(|| "automatic".to_string());
    let (schedule, label) = SCHEDULES
        .iter()
        .find(|(name, label)| schedule.eq_ignore_ascii_case(name) || schedule == *label)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = SCHEDULES.iter().map(|(name, _)| *name).collect();
            ApiError::bad_request(format!(
                "`scheduler` {schedule:?} is not available here; the schedulers are {}",
                names.join(", ")
            ))
        })?;
    let karras = legacy_karras || schedule == "karras";
    if karras && !sampler.karras {
        return Err(ApiError::bad_request(format!(
            "`scheduler` Karras does not apply to the sampler {:?}; it applies to {}",
            sampler.name,
            SAMPLERS
                .iter()
                .filter(|s| s.karras)
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let scheduler = match karras {
        true => format!("{}_karras", sampler.scheduler),
        false => sampler.scheduler.to_string(),
    };
    Ok((
        scheduler,
        sampler.name,
        if karras { "Karras" } else { label },
    ))
}

/// A positive count field (`batch_size`, `n_iter`), 1 when absent.
fn count(fields: &Map<String, Value>, field: &str) -> Result<u64, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(1),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (1..=MAX_IMAGES).contains(&v) => Ok(v),
            _ => Err(ApiError::bad_request(format!(
                "`{field}` must be an integer between 1 and {MAX_IMAGES}, got {n}"
            ))),
        },
        Some(other) => Err(type_error(field, "an integer", other)),
    }
}

/// `POST /sdapi/v1/txt2img`.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "automatic1111", request_body = Txt2ImgBody,
    responses((status = 200, description = "The images", body = Txt2ImgResponse),
              (status = 400, description = "A field is wrong", body = ErrorBody),
              (status = 503, description = "Not ready or the queue is full", body = ErrorBody)))]
async fn txt2img(
    State(app): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    generate(&app, request::json_object(&body)?, false).await
}

/// `POST /sdapi/v1/img2img`: txt2img from `init_images[0]` (and `mask`), which are resized
/// to width x height as A1111 does. A1111's mask_blur, inpainting_fill and inpaint_full_res
/// are not applied: the mask is used as sent, binarised as diffusers does.
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "automatic1111", request_body = Img2ImgBody,
    responses((status = 200, description = "The images", body = Txt2ImgResponse),
              (status = 400, description = "A field is wrong", body = ErrorBody),
              (status = 503, description = "Not ready or the queue is full", body = ErrorBody)))]
async fn img2img(
    State(app): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    generate(&app, request::json_object(&body)?, true).await
}

/// img2img's `init_images`, `mask`, `inpainting_mask_invert` and `denoising_strength`, the
/// images brought to the request's (checked) `width` x `height`.
fn init_image(
    fields: &Map<String, Value>,
    limits: &request::Limits,
    (width, height): (usize, usize),
) -> Result<InitImage, ApiError> {
    let max_pixels = usize::try_from(limits.max_pixels).unwrap_or(usize::MAX);
    let first = match fields.get("init_images") {
        Some(Value::Array(images)) if !images.is_empty() => {
            let mut one = Map::new();
            one.insert("init_images".into(), images[0].clone());
            one
        }
        None | Some(Value::Null | Value::Array(_)) => {
            return Err(ApiError::bad_request(
                "`init_images` must hold the image to start from (a base64 PNG or JPEG)",
            ))
        }
        Some(other) => {
            return Err(type_error(
                "init_images",
                "an array of base64 images",
                other,
            ))
        }
    };
    let image = request::image_field(&first, "init_images", |b| RgbImage::decode(b, max_pixels))?
        .ok_or_else(|| ApiError::bad_request("`init_images` must not start with null"))?;
    let mask = request::image_field(fields, "mask", |b| MaskImage::decode(b, max_pixels))?;
    let invert = match request::integer(fields, "inpainting_mask_invert")? {
        None | Some(0) => false,
        Some(1) => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`inpainting_mask_invert` must be 0 or 1, got {other}"
            )))
        }
    };
    let strength = match fields.get("denoising_strength") {
        None | Some(Value::Null) => 0.75,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => return Err(type_error("denoising_strength", "a number", other)),
    };
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "`denoising_strength` must be above 0 and at most 1, got {strength}"
        )));
    }
    let resize_error = |e: crate::Error| ApiError::bad_request(request::plain(&e));
    let image = image.resized(width, height).map_err(resize_error)?;
    let mask = match mask {
        Some(mask) => {
            let mask = mask.resized(width, height).map_err(resize_error)?;
            Some(Arc::new(if invert { mask.inverted() } else { mask }))
        }
        None => None,
    };
    Ok(InitImage {
        image: Arc::new(image),
        mask,
        strength,
    })
}

/// txt2img and img2img after their own fields: the images, and A1111's answer.
async fn generate(
    app: &Arc<AppState>,
    fields: Map<String, Value>,
    img2img: bool,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    let app = app.clone();
    let req = request::parse_as(&fields, &app.limits(), &A1111)?;
    let size = (req.width as usize, req.height as usize);
    let init = match img2img {
        true => Some(init_image(&fields, &app.limits(), size)?),
        false => None,
    };
    let (scheduler, sampler_name, schedule_label) = choose_sampler(&fields)?;
    let (batch_size, n_iter) = (count(&fields, "batch_size")?, count(&fields, "n_iter")?);
    let images = batch_size * n_iter;
    if images > MAX_IMAGES {
        return Err(ApiError::bad_request(format!(
            "`batch_size` x `n_iter` = {images} images; this server makes at most {MAX_IMAGES} per request"
        )));
    }
    let params = GenerateParams {
        scheduler: Some(scheduler),
        init,
        ..app.params(req)?
    };
    let seed = params.seed;
    check_cost(&app, &params, images as usize)?;

    let interrupts_before = app.a1111.interrupts.load(Ordering::SeqCst);
    let interrupted = || app.a1111.interrupts.load(Ordering::SeqCst) != interrupts_before;
    let started = Instant::now();
    let generated = generate_images(&app, &params, images, Some(&interrupted)).await?;
    let seeds: Vec<u64> = generated.iter().map(|(seed, _)| *seed).collect();
    let pngs = generated
        .iter()
        .map(|(_, image)| image.image.to_png())
        .collect::<crate::error::Result<Vec<_>>>()?;

    let negative = params.negative_prompt.clone().unwrap_or_default();
    let mut info = json!({
        "prompt": params.prompt,
        "all_prompts": vec![&params.prompt; seeds.len()],
        "negative_prompt": negative,
        "all_negative_prompts": vec![&negative; seeds.len()],
        "seed": seeds.first().copied().unwrap_or(seed),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; seeds.len()],
        "steps": params.steps,
        "cfg_scale": params.guidance_scale,
        "sampler_name": sampler_name,
        "scheduler": schedule_label,
        "width": params.width,
        "height": params.height,
        "batch_size": batch_size,
        "n_iter": n_iter,
        "sd_model_name": app.engine.model_name(),
        "index_of_first_image": 0,
        "time_taken": started.elapsed().as_secs_f64(),
    });
    // A1111 answers with the request it ran, its defaults filled in.
    let mut parameters = fields;
    for (key, value) in [
        ("prompt", json!(params.prompt)),
        ("negative_prompt", json!(negative)),
        ("seed", json!(seed)),
        ("steps", json!(params.steps)),
        ("cfg_scale", json!(params.guidance_scale)),
        ("width", json!(params.width)),
        ("height", json!(params.height)),
        ("sampler_name", json!(sampler_name)),
        ("scheduler", json!(schedule_label)),
        ("batch_size", json!(batch_size)),
        ("n_iter", json!(n_iter)),
    ] {
        parameters.insert(key.to_string(), value);
    }
    if let Some(init) = &params.init {
        parameters.insert("denoising_strength".into(), json!(init.strength));
        // The images came in the request; A1111 does not echo them either.
        parameters.insert("init_images".into(), json!(null));
        parameters.insert("mask".into(), json!(null));
        info["denoising_strength"] = json!(init.strength);
    }
    let images: Vec<String> = pngs
        .iter()
        .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
        .collect();
    Ok(Json(Txt2ImgResponse {
        images,
        parameters,
        info: info.to_string(),
    }))
}

/// `GET /sdapi/v1/progress`: the running job's share done and time left; 0 and job_count
/// 0 when idle (clients poll for that to know the server is free).
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "automatic1111",
    responses((status = 200, description = "progress 0..1, eta_relative, state.job_count, sampling_step, sampling_steps", body = serde_json::Value)))]
async fn progress(State(app): State<Arc<AppState>>) -> Json<Value> {
    let activity = app.engine.activity();
    let (progress, eta, step, steps) = match activity.running {
        Some((step, steps, elapsed)) if steps > 0 => {
            let done = step as f64 / steps as f64;
            let elapsed = elapsed.as_secs_f64();
            let eta = if done > 0.0 {
                elapsed / done - elapsed
            } else {
                0.0
            };
            (done, eta, step, steps)
        }
        _ => (0.0, 0.0, 0, 0),
    };
    let job_count = activity.queued + usize::from(activity.running.is_some());
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": "",
            "job_count": job_count,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": null,
        "textinfo": null,
    }))
}

/// `POST /sdapi/v1/interrupt`: stops the running job, and the rest of its batch.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "automatic1111",
    responses((status = 200, description = "The running job stops, and the rest of its batch", body = serde_json::Value)))]
async fn interrupt(State(app): State<Arc<AppState>>, _: BodilessPost) -> Json<Value> {
    app.a1111.interrupts.fetch_add(1, Ordering::SeqCst);
    app.engine.cancel_running();
    Json(json!({}))
}

/// `POST /sdapi/v1/skip`: stops the running job; its batch goes on with the next image.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "automatic1111",
    responses((status = 200, description = "The running job stops; its batch goes on", body = serde_json::Value)))]
async fn skip(State(app): State<Arc<AppState>>, _: BodilessPost) -> Json<Value> {
    app.engine.cancel_running();
    Json(json!({}))
}

/// `GET /sdapi/v1/options`: the settings clients read (the checkpoint above all).
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "automatic1111",
    responses((status = 200, description = "sd_model_checkpoint and other settings", body = serde_json::Value)))]
async fn options(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": app.engine.model_name(),
        "sd_checkpoint_hash": null,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
    }))
}

/// `POST /sdapi/v1/options`: this server serves one model; choosing it is accepted, as are
/// settings it has no use for, and choosing another is an error.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "automatic1111", request_body = serde_json::Value,
    responses((status = 200, description = "Accepted", body = bool),
              (status = 400, description = "Another checkpoint than the served one", body = ErrorBody)))]
async fn set_options(
    State(app): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let fields = request::json_object(&body)?;
    let served = app.engine.model_name();
    match fields.get("sd_model_checkpoint") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) if *name == served => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`sd_model_checkpoint` {other}: this server serves only {served:?}"
            )))
        }
    }
    Ok(Json(json!(true)))
}

#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "automatic1111",
    responses((status = 200, description = "The served model", body = serde_json::Value)))]
async fn sd_models(State(app): State<Arc<AppState>>) -> Json<Value> {
    let name = app.engine.model_name();
    Json(json!([{
        "title": name,
        "model_name": name,
        "hash": null,
        "sha256": null,
        "filename": name,
        "config": null,
    }]))
}

#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "automatic1111",
    responses((status = 200, description = "The samplers", body = serde_json::Value)))]
async fn samplers() -> Json<Value> {
    let list: Vec<Value> = SAMPLERS
        .iter()
        .map(|s| json!({"name": s.name, "aliases": s.aliases, "options": {}}))
        .collect();
    Json(Value::Array(list))
}

#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "automatic1111",
    responses((status = 200, description = "The schedules", body = serde_json::Value)))]
async fn schedulers() -> Json<Value> {
    let list: Vec<Value> = SCHEDULES
        .iter()
        .map(|(name, label)| {
            json!({"name": name, "label": label, "aliases": null, "default_rho": -1.0,
                   "need_inner_model": false})
        })
        .collect();
    Json(Value::Array(list))
}

#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "automatic1111",
    responses((status = 200, description = "None only", body = serde_json::Value)))]
async fn upscalers() -> Json<Value> {
    Json(json!([{
        "name": "None",
        "model_name": null,
        "model_path": null,
        "model_url": null,
        "scale": 4.0,
    }]))
}

#[utoipa::path(get, path = "/sdapi/v1/sd-vae", tag = "automatic1111",
    responses((status = 200, description = "None: the model's own VAE", body = serde_json::Value)))]
async fn sd_vaes() -> Json<Value> {
    Json(json!([]))
}

/// The LoRAs of `--lora-dir` as A1111's Lora extension lists them; prompts name them as
/// `<lora:name:weight>`.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "automatic1111",
    responses((status = 200, description = "The LoRA files of --lora-dir: name, alias, path, metadata", body = serde_json::Value)))]
pub(super) async fn loras(State(app): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = app
        .loras
        .entries()
        .into_iter()
        .map(|e| json!({"name": e.name, "alias": e.name, "path": e.path, "metadata": {}}))
        .collect();
    Json(Value::Array(list))
}

/// The folder is read on every listing, so there is nothing to refresh.
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", tag = "automatic1111",
    responses((status = 200, description = "Nothing to do: the folder is read on every listing", body = serde_json::Value)))]
async fn refresh_loras() -> Json<Value> {
    Json(Value::Null)
}

#[utoipa::path(get, path = "/sdapi/v1/latent-upscale-modes", tag = "automatic1111",
    responses((status = 200, description = "None", body = serde_json::Value)))]
async fn latent_upscale_modes() -> Json<Value> {
    Json(json!([]))
}

#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "automatic1111",
    responses((status = 200, description = "No scripts", body = serde_json::Value)))]
async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(body: Value) -> Result<(String, &'static str, &'static str), String> {
        choose_sampler(body.as_object().unwrap()).map_err(|e| e.message)
    }

    #[test]
    fn samplers_and_schedules_as_clients_name_them() {
        assert_eq!(
            choose(json!({})).unwrap(),
            ("euler".into(), "Euler", "Automatic")
        );
        assert_eq!(
            choose(json!({"sampler_name": "DPM++ 2M", "scheduler": "karras"})).unwrap(),
            ("dpm++2m_karras".into(), "DPM++ 2M", "Karras")
        );
        assert_eq!(
            choose(json!({"sampler_name": "DPM++ 2M Karras"}))
                .unwrap()
                .0,
            "dpm++2m_karras"
        );
        assert_eq!(choose(json!({"sampler_index": "k_lms"})).unwrap().0, "lms");
        // SillyTavern's defaults, and what it sends when the list could not be read.
        assert_eq!(
            choose(json!({"sampler_name": "DDIM", "scheduler": "normal"}))
                .unwrap()
                .0,
            "ddim"
        );
        assert_eq!(
            choose(json!({"sampler_name": "Euler a", "scheduler": "N/A"}))
                .unwrap()
                .0,
            "euler_a"
        );
        assert!(choose(json!({"sampler_name": "Heun"}))
            .unwrap_err()
            .contains("sampler_name"));
        assert!(choose(json!({"scheduler": "exponential"}))
            .unwrap_err()
            .contains("scheduler"));
        assert!(
            choose(json!({"sampler_name": "DDIM", "scheduler": "Karras"}))
                .unwrap_err()
                .contains("does not apply")
        );
    }
}
