//! The one error type of the HTTP layer: every failure is a status code and a JSON body
//! `{"error": "..."}`, whichever layer produced it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Every error's body.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field or the reason.
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        ApiError {
            retry_after,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<crate::Error> for ApiError {
    /// Engine errors: a request the engine refuses is the client's (400); a cancelled job
    /// means the server is going away (503); anything else is the server's (500).
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::InvalidArgument(message) => ApiError::bad_request(message),
            crate::Error::Cancelled => ApiError::unavailable(
                "the job was cancelled: the server is shutting down, or a client interrupted it",
                None,
            ),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("generation failed: {other}"),
            ),
        }
    }
}
