//! OpenAI's Images API, the part that fits a Stable Diffusion server: `POST
//! /v1/images/generations` (prompt, n, size, response_format `b64_json`, model) with this
//! server's fields as extensions (negative_prompt, num_inference_steps, guidance_scale,
//! seed, scheduler), and `GET /v1/models`. Errors take OpenAI's shape, which its SDKs read:
//! `{"error": {"message", "type", "param", "code"}}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::body::JsonBody;
use super::error::ApiError;
use super::request::{self, type_error, Dialect};
use super::routes::{check_cost, generate_images, AppState};
use crate::model::prompt_syntax::PromptSyntax;

/// The fields read by the shared checks: this server's names, since OpenAI has none for
/// steps or guidance. OpenAI's own fields that do not apply (quality, style, user...) are
/// ignored, as its newer models ignore the older ones'.
const OPENAI: Dialect = Dialect {
    refuse_unknown: false,
    init_image: false,
    loras: false,
    prompt_syntax: Some(PromptSyntax::Plain),
    ..request::NATIVE
};

/// The request body as the OpenAPI document describes it; OpenAI's fields that do not
/// apply here (quality, style, user...) are ignored.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the wire format only
pub struct ImagesRequest {
    prompt: String,
    /// 1 to 10; default 1. The images have seeds seed, seed+1, ...
    n: Option<u64>,
    /// "WIDTHxHEIGHT", e.g. "512x512" (the default, also for "auto").
    size: Option<String>,
    /// "b64_json" only.
    response_format: Option<String>,
    /// Accepted; this server serves one model.
    model: Option<String>,
    negative_prompt: Option<String>,
    num_inference_steps: Option<u64>,
    guidance_scale: Option<f64>,
    /// -1 for random.
    seed: Option<i64>,
    scheduler: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    created: u64,
    data: Vec<ImageData>,
}

#[derive(Serialize, ToSchema)]
pub struct ImageData {
    /// The PNG, base64-encoded.
    b64_json: String,
    /// Always null: prompts are used as given.
    revised_prompt: Option<String>,
    /// This server's extension: the image's seed.
    seed: u64,
}

/// OpenAI's error body.
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    error: OpenAiErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    message: String,
    /// "invalid_request_error" or "server_error".
    #[serde(rename = "type")]
    kind: String,
    /// The request field the error is about.
    param: Option<String>,
    code: Option<String>,
}

/// Most images one request may ask for (`n`), as OpenAI's dall-e-2.
const MAX_IMAGES: u64 = 10;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/images/generations", post(generations))
        .route("/models", get(models))
}

/// An error in OpenAI's shape; `param` is the request field it is about.
pub struct OpenAiError {
    error: ApiError,
    param: Option<String>,
}

impl From<ApiError> for OpenAiError {
    /// The field is the first one the message quotes (`width` must be...).
    fn from(error: ApiError) -> Self {
        let param = error
            .message
            .split('`')
            .nth(1)
            .filter(|p| !p.contains(' '))
            .map(str::to_string);
        OpenAiError { error, param }
    }
}

impl From<crate::Error> for OpenAiError {
    fn from(e: crate::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.error.status;
        let kind = if status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.error.message,
                kind: kind.to_string(),
                param: self.param,
                code: status
                    .canonical_reason()
                    .map(|r| r.to_ascii_lowercase().replace(' ', "_")),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.error.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

fn bad_param(param: &str, message: String) -> OpenAiError {
    OpenAiError {
        error: ApiError::bad_request(message),
        param: Some(param.to_string()),
    }
}

/// `size` as `WxH` (or `auto`: the guide's 512x512) into `width` and `height`.
fn apply_size(fields: &mut Map<String, Value>) -> Result<(), OpenAiError> {
    let size = match fields.get("size") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(s)) if s == "auto" => return Ok(()),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(type_error("size", "a string such as \"512x512\"", other).into()),
    };
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse::<u64>().ok()?, h.trim().parse::<u64>().ok()?)));
    let Some((width, height)) = parsed else {
        return Err(bad_param(
            "size",
            format!("`size` must be \"WIDTHxHEIGHT\" such as \"512x512\", got {size:?}"),
        ));
    };
    fields.insert("width".into(), json!(width));
    fields.insert("height".into(), json!(height));
    Ok(())
}

/// `POST /v1/images/generations`.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai", request_body = ImagesRequest,
    responses((status = 200, description = "The images", body = ImagesResponse),
              (status = 400, description = "A field is wrong (`param` names it)", body = OpenAiErrorBody),
              (status = 503, description = "Not ready or the queue is full", body = OpenAiErrorBody)))]
async fn generations(
    State(app): State<Arc<AppState>>,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let JsonBody(body) = body?;
    let mut fields = request::json_object(&body)?;
    match fields.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "b64_json" => {}
        Some(other) => {
            return Err(bad_param(
                "response_format",
                format!(
                    "`response_format` {other} is not available: this server keeps no files to link to; use \"b64_json\""
                ),
            ))
        }
    }
    let n = match fields.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (1..=MAX_IMAGES).contains(&v) => v,
            _ => {
                return Err(bad_param(
                    "n",
                    format!("`n` must be an integer between 1 and {MAX_IMAGES}, got {n}"),
                ))
            }
        },
        Some(other) => return Err(type_error("n", "an integer", other).into()),
    };
    apply_size(&mut fields)?;
    let params = request::parse_as(&fields, &app.limits(), &OPENAI).map_err(|e| {
        // Width and height came from `size`, unless sent as such.
        let mut e = OpenAiError::from(e);
        if let (Some("width" | "height"), Some(size)) = (e.param.as_deref(), fields.get("size")) {
            e.error.message = format!("`size` {size}: {}", e.error.message);
            e.param = Some("size".into());
        }
        e
    })?;
    let params = app.params(params)?;
    check_cost(&app, &params, n as usize)?;
    let images = generate_images(&app, &params, n, None).await?;
    let mut data = Vec::with_capacity(images.len());
    for (seed, generated) in &images {
        let png = generated.image.to_png()?;
        data.push(ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(png),
            revised_prompt: None,
            seed: *seed,
        });
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Json(ImagesResponse { created, data }))
}

/// `GET /v1/models`: the one model this server serves.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The served model", body = serde_json::Value)))]
async fn models(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.engine.model_name(),
            "object": "model",
            "created": 0,
            "owned_by": "sd-wgpu",
        }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_they_are_about() {
        let e = OpenAiError::from(ApiError::bad_request("`width` must be a multiple of 8"));
        assert_eq!(e.param.as_deref(), Some("width"));
        let e = OpenAiError::from(ApiError::bad_request("the queue is full"));
        assert_eq!(e.param, None);
        let e = OpenAiError::from(ApiError::bad_request("`width` x `height` = 4096x4096"));
        assert_eq!(e.param.as_deref(), Some("width"));
    }

    #[test]
    fn sizes_are_width_by_height() {
        let mut fields = Map::new();
        fields.insert("size".into(), json!("384x256"));
        apply_size(&mut fields).ok().unwrap();
        assert_eq!(
            (fields["width"].clone(), fields["height"].clone()),
            (json!(384), json!(256))
        );
        fields.insert("size".into(), json!("big"));
        let e = apply_size(&mut fields).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("size"));
    }
}
