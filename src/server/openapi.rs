//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, derived by utoipa from the
//! handlers' annotations and the request and response types they use.

use axum::Json;
use utoipa::OpenApi;

use super::{a1111, jobs, metrics, openai, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sd-wgpu",
        description = "Stable Diffusion text-to-image: the API guide's /generate and /health, jobs with progress, and the AUTOMATIC1111 and OpenAI dialects."
    ),
    paths(
        routes::page,
        routes::health,
        routes::readyz,
        routes::livez,
        routes::generate,
        jobs::create,
        jobs::status,
        jobs::cancel,
        jobs::events,
        metrics::metrics,
        document,
        a1111::txt2img,
        a1111::img2img,
        a1111::progress,
        a1111::interrupt,
        a1111::skip,
        a1111::options,
        a1111::set_options,
        a1111::sd_models,
        a1111::samplers,
        a1111::schedulers,
        a1111::sd_vaes,
        a1111::loras,
        a1111::refresh_loras,
        a1111::upscalers,
        a1111::latent_upscale_modes,
        a1111::scripts,
        openai::generations,
        openai::models,
    ),
    tags(
        (name = "native", description = "The API guide's routes"),
        (name = "jobs", description = "Generations followed by polling or Server-Sent Events"),
        (name = "automatic1111", description = "AUTOMATIC1111's web UI API, the part its clients use"),
        (name = "openai", description = "OpenAI's Images API"),
        (name = "operations", description = "Probes and metrics"),
    )
)]
struct ApiDoc;

/// The document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}
