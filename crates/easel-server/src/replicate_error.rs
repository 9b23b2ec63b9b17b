//! Replicate's error shape: RFC 7807 problem details, as Replicate's HTTP
//! API answers them and its official client parses them
//! (`ReplicateError.from_response` reads `title`, `detail`, `status`):
//! `{"title", "detail", "status", "invalid_fields": [{"type", "field",
//! "description"}]}` with `Content-Type: application/problem+json`. Used by
//! the Replicate-style routes (`routes/replicate/`) and by the error
//! shaping middleware for the errors those routes do not produce
//! themselves (the API-key check's 401, the body limit's 413, ...).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;

/// An error in Replicate's shape (RFC 7807 problem details).
#[derive(Debug)]
pub struct ReplicateError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short summary (`Input validation failed`, `Not found`, ...).
    pub title: String,
    /// What is wrong and how to fix it.
    pub detail: String,
    /// The field at fault (`input.num_outputs`), if any.
    pub field: Option<String>,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ReplicateError {
    /// An error with `status`, `title` and `detail`.
    pub fn new(status: StatusCode, title: &str, detail: impl Into<String>) -> Self {
        ReplicateError {
            status,
            title: title.into(),
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }

    /// A 422 `Input validation failed` naming `field`; the detail starts
    /// with the field.
    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        ReplicateError {
            field: Some(field.into()),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Input validation failed",
                format!("{field}: {}", detail.into()),
            )
        }
    }
}

/// The problem body for an error (see the module docs).
pub fn problem_body(
    status: StatusCode,
    title: &str,
    detail: &str,
    field: Option<&str>,
) -> serde_json::Value {
    let mut body = serde_json::json!({"title": title, "detail": detail, "status": status.as_u16()});
    if let Some(field) = field {
        body["invalid_fields"] =
            serde_json::json!([{"type": "invalid", "field": field, "description": detail}]);
    }
    body
}

/// The title Replicate gives a status.
pub fn title_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "Unauthenticated",
        StatusCode::PAYMENT_REQUIRED => "Insufficient credit",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::UNPROCESSABLE_ENTITY => "Input validation failed",
        StatusCode::TOO_MANY_REQUESTS => "Request was throttled",
        s if s.is_server_error() => "Internal server error",
        s => s.canonical_reason().unwrap_or("Bad request"),
    }
}

/// A problem+json response.
pub fn problem_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

impl IntoResponse for ReplicateError {
    fn into_response(self) -> Response {
        let body = problem_body(
            self.status,
            &self.title,
            &self.detail,
            self.field.as_deref(),
        );
        let mut response = problem_response(self.status, body);
        if let Some(s) = self.retry_after {
            response.headers_mut().insert("retry-after", s.into());
        }
        response
    }
}

/// The input field a native field path comes from.
fn input_field(native: &str) -> String {
    let last = native.rsplit('.').next().unwrap_or(native);
    let name = match last {
        "baseModel" => "model",
        "steps" => "num_inference_steps",
        "guidanceScale" => "guidance_scale",
        "strength" => "prompt_strength",
        "outputFormat" => "output_format",
        "outputQuality" => "output_quality",
        "aspectRatio" => "aspect_ratio",
        "images" => "num_outputs",
        "webhook" | "webhookEvents" => return "webhook".into(),
        other if native.contains("loras[1]") || other.starts_with("loras[1]") => "extra_lora",
        other if native.contains("loras[0]") || other.starts_with("loras[0]") => "lora_weights",
        other => other,
    };
    format!("input.{name}")
}

impl From<ApiError> for ReplicateError {
    fn from(e: ApiError) -> Self {
        let field = e
            .field
            .as_deref()
            .filter(|f| !f.is_empty())
            .map(input_field);
        let detail = match &field {
            Some(f) => format!("{f}: {}", e.message),
            None => e.message,
        };
        ReplicateError {
            status: e.status,
            title: title_for(e.status).into(),
            detail,
            field,
            retry_after: e.retry_after,
        }
    }
}

impl From<crate::store::StoreError> for ReplicateError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

/// Whether `path` is one of the Replicate routes (their errors are problem
/// details).
pub fn is_replicate_path(path: &str) -> bool {
    path == "/v1/predictions"
        || path.starts_with("/v1/predictions/")
        || path == "/v1/webhooks/default/secret"
        || (path.starts_with("/v1/models/") && path.ends_with("/predictions"))
}
