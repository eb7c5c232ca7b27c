//! The body of a POST: JSON only, within the size limit, within the client timeout.
//! Requiring `application/json` makes browsers send a CORS preflight before any cross-origin
//! POST, so a page from a site the server does not allow cannot make it compute (a
//! `text/plain` "simple" request would reach the handler without one).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;
use super::routes::AppState;

/// A POST body that is JSON by its `Content-Type`, not yet parsed.
pub struct JsonBody(pub Bytes);

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<AppState>) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "the request body must be sent as `Content-Type: application/json`, got {}",
                    if content_type.is_empty() {
                        "none".to_string()
                    } else {
                        format!("`{content_type}`")
                    }
                ),
            ));
        }
        let limit = app.body_limit;
        // Refused before reading (and before hyper answers `Expect: 100-continue`).
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let read = Limited::new(req.into_body(), limit).collect();
        match tokio::time::timeout(app.client_timeout, read).await {
            Ok(Ok(body)) => Ok(JsonBody(body.to_bytes())),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(limit)),
            Ok(Err(e)) => Err(ApiError::bad_request(format!(
                "the request body could not be read: {e}"
            ))),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    app.client_timeout.as_secs()
                ),
            )),
        }
    }
}

/// A POST that carries no data (A1111's `interrupt` and `skip`, which its clients send with
/// no body and no `Content-Type`). A browser sends `Origin` with every POST; from one, the
/// request must still say JSON, so a cross-origin page is preflighted like any other POST.
pub struct BodilessPost;

impl<S: Sync> FromRequestParts<S> for BodilessPost {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let from_browser = parts.headers.contains_key(header::ORIGIN);
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if from_browser && !is_json(content_type) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "from a browser, this POST must be sent as `Content-Type: application/json`",
            ));
        }
        Ok(BodilessPost)
    }
}

/// `application/json`, with parameters (`; charset=utf-8`) or not, in any case.
fn is_json(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    media_type.eq_ignore_ascii_case("application/json")
}

pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than this server's limit of {limit} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }
}
