//! The routes of the API guide (`POST /generate`, `GET /health`) plus the page at `/` and
//! `GET /readyz`, and the middleware every response passes: one log line per request, the
//! `Host` check, CORS, JSON errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use utoipa::ToSchema;

use super::body::{too_large, JsonBody};
use super::error::{ApiError, ErrorBody};
use super::hosts::{check_host, AllowedHosts};
use super::request::{self, GenerateBody, GenerateRequest, Limits};
use super::{a1111, jobs, metrics, openai, openapi};
use crate::engine::{Engine, ModelState, SubmitError};
use crate::model::lora::library::LoraLibrary;
use crate::model::lora::LoraChoice;
use crate::pipeline::{GenerateParams, Generated};
use crate::tensor::Device;

/// What every handler sees.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub limits: Limits,
    /// How long one request may take, queueing included (`None`: no limit).
    pub time_limit: Option<Duration>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// How long a client may take to send a request body.
    pub client_timeout: Duration,
    pub jobs: super::jobs::Jobs,
    pub a1111: super::a1111::A1111State,
    pub http_counts: super::metrics::HttpCounts,
    /// The LoRAs requests may name (`--lora-dir`).
    pub loras: Arc<LoraLibrary>,
}

impl AppState {
    /// A parsed request as the engine's parameters, its LoRAs read from the library; an
    /// unknown name (or a file that cannot be used) is a 400 naming it.
    pub fn params(&self, req: GenerateRequest) -> Result<GenerateParams, ApiError> {
        let loras = req
            .loras
            .iter()
            .map(|l| {
                let lora = self.loras.get(&l.name).map_err(|e| {
                    ApiError::bad_request(format!("`{}`: {}", l.field, request::plain(&e)))
                })?;
                Ok(LoraChoice {
                    lora,
                    scale: l.scale as f32,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(req.into_params(loras))
    }

    /// The limits a request is parsed under: the deployment's, with the loaded model's
    /// defaults for what it leaves out.
    pub fn limits(&self) -> Limits {
        self.limits.for_model(self.engine.model_defaults())
    }
}

/// The HTTP service. `cors_origins` empty means any origin.
pub fn router(
    state: Arc<AppState>,
    cors_origins: &[HeaderValue],
    allowed_hosts: AllowedHosts,
) -> Router {
    let body_limit = state.body_limit;
    let origins = if cors_origins.is_empty() {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(cors_origins.iter().cloned())
    };
    let cors = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([header::CONTENT_TYPE])
        .max_age(Duration::from_secs(3600));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/readyz", get(readyz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/generate", post(generate))
        .route("/jobs", post(jobs::create))
        .route("/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .nest("/sdapi/v1", a1111::routes())
        .nest("/v1", openai::routes())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .with_state(state)
        .layer(middleware::from_fn(move |req, next| {
            json_errors(req, next, body_limit)
        }))
        .layer(cors)
        .layer(middleware::from_fn_with_state(allowed_hosts, check_host))
        // Outermost, so CORS preflights are logged too.
        .layer(middleware::from_fn(log_request))
}

#[utoipa::path(get, path = "/", tag = "native",
    responses((status = 200, description = "The page: a form, a progress bar and the session's images", content_type = "text/html", body = String)))]
async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The guide's `status` and `model_loaded`, and what an operator needs besides: why the
/// model failed, what was loaded, the queue. Always 200 while the process serves; `status`
/// is `unhealthy` (and `ready` false) when the model cannot be used, see also /readyz.
#[utoipa::path(get, path = "/health", tag = "native",
    responses((status = 200, description = "`status`, `model_loaded` (the guide's), and the model, backend, queue and schedulers", body = serde_json::Value)))]
async fn health(State(app): State<Arc<AppState>>) -> Json<Value> {
    let engine = &app.engine;
    let state = engine.state();
    let mut body = json!({
        "status": if matches!(state, ModelState::Failed(_)) { "unhealthy" } else { "healthy" },
        "model_loaded": matches!(state, ModelState::Ready),
        "ready": matches!(state, ModelState::Ready),
        "model_state": match state {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed(_) => "failed",
        },
        "model": engine.model_name(),
        "backend": engine.device().to_string(),
        // On a GPU: its backend (Vulkan/Metal/DX12), features and chosen kernel variants.
        "gpu": match engine.device() {
            Device::Gpu(gpu) => serde_json::to_value(gpu.selection()).unwrap_or(Value::Null),
            Device::Cpu => Value::Null,
        },
        // On a GPU: the device memory its tensors hold, its pool keeps idle, and the most
        // held at once since it opened (the backend's own account: GpuMemory).
        "gpu_memory": match engine.device() {
            Device::Gpu(gpu) => serde_json::to_value(gpu.memory()).unwrap_or(Value::Null),
            Device::Cpu => Value::Null,
        },
        // On the CPU: its vector level, the products' precision (`f32`, or `bf16 (Amx)`
        // with --precision bf16) and the convolutions' Winograd cut-offs (measured on this
        // processor, remembered, or the table's: --cpu-tuning).
        "cpu": match engine.device() {
            Device::Gpu(_) => Value::Null,
            Device::Cpu => json!({
                "simd": format!("{:?}", crate::backend::cpu::simd::level()).to_lowercase(),
                "precision": crate::backend::cpu::precision::current(),
                "convolutions": crate::backend::cpu::tuning::current(),
            }),
        },
        "busy": engine.busy(),
        "queue_length": engine.queued(),
        "queue_capacity": engine.queue_capacity(),
        // What `scheduler` may name besides diffusers' class names.
        "schedulers": crate::pipeline::scheduler::SHORT_NAMES,
    });
    if let ModelState::Failed(reason) = state {
        body["model_error"] = Value::String(reason);
    }
    // Measured at load; requests that surely exceed the time limit are refused from it.
    if let Some(cost) = engine.step_cost() {
        body["min_step_seconds"] = json!({
            "512x512": cost.step_at_least(512, 512).as_secs_f64(),
            "1024x1024": cost.step_at_least(1024, 1024).as_secs_f64(),
        });
    }
    // Folder or single file, its family, and where its configs and tokenizer came from.
    if let Some(info) = engine.info() {
        body["model_family"] = json!(info.family);
        body["model_info"] = serde_json::to_value(info).unwrap_or(Value::Null);
    }
    // The LoRAs requests may name, when the server has a --lora-dir.
    if app.loras.dir().is_some() {
        let names: Vec<String> = app.loras.entries().into_iter().map(|e| e.name).collect();
        body["loras"] = json!(names);
    }
    // What a request that leaves them out gets (the operator's --default-* flags win).
    if engine.model_defaults().is_some() {
        let limits = app.limits();
        let d = limits.model_defaults;
        body["defaults"] = json!({
            "width": d.width,
            "height": d.height,
            "num_inference_steps": limits.default_steps.unwrap_or(d.steps as u64),
            "guidance_scale": limits.default_guidance.unwrap_or(d.guidance_scale),
        });
    }
    Json(body)
}

/// Readiness for load balancers and orchestrators: 200 once the model can take requests,
/// 503 while it loads, after it failed, and while the server shuts down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The model is loaded", body = serde_json::Value),
              (status = 503, description = "Loading, failed, or shutting down", body = ErrorBody)))]
async fn readyz(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    match app.engine.state() {
        _ if app.engine.is_shutting_down() => {
            Err(ApiError::unavailable("the server is shutting down", None))
        }
        ModelState::Ready => Ok(Json(json!({ "ready": true }))),
        ModelState::Loading => Err(ApiError::unavailable("the model is still loading", Some(5))),
        ModelState::Failed(reason) => Err(ApiError::unavailable(
            format!("the model failed to load: {reason}"),
            None,
        )),
    }
}

/// Liveness: 200 while the process serves HTTP, whatever the model's state (a failed
/// model is for /readyz to report; restarting the process would not mend it).
#[utoipa::path(get, path = "/livez", tag = "operations",
    responses((status = 200, description = "The process serves HTTP", body = serde_json::Value)))]
async fn livez() -> Json<Value> {
    Json(json!({ "alive": true }))
}

#[utoipa::path(post, path = "/generate", tag = "native", request_body = GenerateBody,
    responses((status = 200, description = "The image", body = GenerateResponse),
              (status = 400, description = "A field is wrong (the message names it), or the request cannot finish within the time limit", body = ErrorBody),
              (status = 413, description = "The body is over the limit", body = ErrorBody),
              (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
              (status = 500, description = "The generation failed", body = ErrorBody),
              (status = 503, description = "The model is loading or failed, the queue is full (Retry-After), or the server is stopping", body = ErrorBody),
              (status = 504, description = "The time limit ran out", body = ErrorBody)))]
async fn generate(
    State(app): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Json<GenerateResponse>, ApiError> {
    let params = prepare(&app, &body)?;
    let started = Instant::now();
    let images = generate_images(&app, &params, 1, None).await?;
    let (_, generated) = images
        .first()
        .ok_or_else(|| ApiError::from(crate::Error::Cancelled))?;
    Ok(Json(generated_body(&params, generated, started.elapsed())?))
}

/// Generates `count` images of `params`, with seeds `params.seed`, +1, ..., one engine job
/// each, within the time limit (for all of them). A job stopped by a client (A1111's
/// interrupt or skip) fails the request unless `interrupted` is given: it then tells an
/// interrupt (stop here, answer with the images so far: true) from a skip (go on: false).
pub(super) async fn generate_images(
    app: &AppState,
    params: &GenerateParams,
    count: u64,
    interrupted: Option<&(dyn Fn() -> bool + Sync)>,
) -> Result<Vec<(u64, Generated)>, ApiError> {
    let run = async {
        let mut images = Vec::new();
        for i in 0..count {
            let params = GenerateParams {
                seed: params.seed.wrapping_add(i),
                ..params.clone()
            };
            let seed = params.seed;
            // `_ticket` cancels the job if this future is dropped (client gone) or times out.
            let (result, _ticket) = app
                .engine
                .submit(params)
                .map_err(|e| submit_error(app, e))?;
            let outcome = result.await.map_err(|_| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped")
            })?;
            match (outcome, interrupted) {
                (Ok(generated), _) => images.push((seed, generated)),
                (Err(crate::Error::Cancelled), Some(interrupted))
                    if !app.engine.is_shutting_down() =>
                {
                    if interrupted() {
                        break;
                    }
                }
                (Err(e), _) => return Err(ApiError::from(e)),
            }
        }
        Ok(images)
    };
    match app.time_limit {
        Some(limit) => tokio::time::timeout(limit, run)
            .await
            .map_err(|_| over_time_limit(limit))?,
        None => run.await,
    }
}

/// A request body (the guide's fields) as the engine's parameters, refused with a 400
/// when it is malformed or cannot finish within the time limit.
pub(super) fn prepare(app: &AppState, body: &[u8]) -> Result<GenerateParams, ApiError> {
    let params = app.params(request::parse(body, &app.limits())?)?;
    check_cost(app, &params, 1)?;
    Ok(params)
}

/// Why the engine did not take a job, as an HTTP answer.
pub(super) fn submit_error(app: &AppState, e: SubmitError) -> ApiError {
    match e {
        SubmitError::Invalid(e) => ApiError::from(e),
        SubmitError::NotReady(ModelState::Failed(reason)) => {
            ApiError::unavailable(format!("the model failed to load: {reason}"), None)
        }
        SubmitError::NotReady(_) => {
            ApiError::unavailable("the model is still loading; try again shortly", Some(5))
        }
        SubmitError::QueueFull => ApiError::unavailable(
            format!(
                "the queue is full ({} requests waiting); try again later",
                app.engine.queue_capacity()
            ),
            Some(10),
        ),
        SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down", None),
    }
}

pub(super) fn over_time_limit(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "generation took longer than this server's limit of {} s and was stopped",
            limit.as_secs()
        ),
    )
}

/// The guide's /generate answer: the PNG in base64 and the parameters it was made with.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    /// The PNG image, base64-encoded.
    pub image: String,
    /// The seed used (the one picked, when the request asked for a random one).
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// Seconds from the request's arrival to its answer, queueing included.
    pub time_taken: f64,
    /// Image-to-image and inpainting: the strength it ran with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    pub timings: StageSeconds,
}

/// Seconds spent in each stage of the generation.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StageSeconds {
    pub text_encoder: f64,
    /// Image-to-image and inpainting: the init (and masked) image through the VAE encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_encode: Option<f64>,
    pub denoise: f64,
    pub vae_decode: f64,
}

pub(super) fn generated_body(
    params: &GenerateParams,
    generated: &Generated,
    elapsed: Duration,
) -> Result<GenerateResponse, ApiError> {
    let png = generated.image.to_png()?;
    Ok(GenerateResponse {
        image: base64::engine::general_purpose::STANDARD.encode(png),
        seed: generated.seed,
        width: params.width,
        height: params.height,
        num_inference_steps: params.steps,
        guidance_scale: params.guidance_scale,
        time_taken: elapsed.as_secs_f64(),
        strength: params.init.as_ref().map(|init| init.strength),
        timings: StageSeconds {
            text_encoder: generated.timings.text_encoder.as_secs_f64(),
            vae_encode: params
                .init
                .as_ref()
                .map(|_| generated.timings.vae_encode.as_secs_f64()),
            denoise: generated.timings.denoise.as_secs_f64(),
            vae_decode: generated.timings.vae_decode.as_secs_f64(),
        },
    })
}

/// Refuses a request for `images` images that cannot finish within the time limit on this
/// backend, whatever the queue: its denoising steps alone take longer (see
/// `pipeline::cost`).
pub(super) fn check_cost(
    app: &AppState,
    params: &GenerateParams,
    images: usize,
) -> Result<(), ApiError> {
    let (Some(limit), Some(cost)) = (app.time_limit, app.engine.step_cost()) else {
        return Ok(());
    };
    let (w, h, steps) = (params.width, params.height, params.denoising_steps());
    let needed = cost.generation_at_least(w, h, steps * images);
    if needed <= limit {
        return Ok(());
    }
    let what = match images {
        1 => format!("a {w}x{h} image at {steps} steps"),
        n => format!("{n} {w}x{h} images at {steps} steps"),
    };
    Err(ApiError::bad_request(format!(
        "{what} needs at least {:.0} s on this server's {} ({:.1} s a step), over its limit of \
         {} s per request; ask for fewer steps or images, or a smaller width x height",
        needed.as_secs_f64(),
        app.engine.device(),
        cost.step_at_least(w, h).as_secs_f64(),
        limit.as_secs()
    )))
}

/// One log line per request: method, path, status, duration.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        "{method} {path} {} {:.3}s",
        response.status().as_u16(),
        started.elapsed().as_secs_f64()
    );
    response
}

/// Rewrites every error response that is not already JSON (axum's own 404, 405 and 413
/// among them) as `{"error": "..."}`, keeping its status and headers.
async fn json_errors(req: Request, next: Next, body_limit: usize) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let message = match status {
        StatusCode::NOT_FOUND => {
            format!("no such endpoint: {method} {path} (try POST /generate or GET /health)")
        }
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        StatusCode::PAYLOAD_TOO_LARGE => too_large(body_limit).message,
        other => other.canonical_reason().unwrap_or("error").to_string(),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let json = ApiError::new(status, message).into_response();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::new(json.into_body()))
}
