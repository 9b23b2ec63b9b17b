//! One place that gives every error response its documented JSON shape.
//!
//! Handlers answer [`ApiError`] (native `{"error": {code, message, field}}`)
//! or [`OpenAiError`] (OpenAI's shape, defined here). What they do not produce
//! is shaped here, after the router ran:
//!
//! - the framework's own rejections: 405 (axum sends an empty body, with
//!   `Allow`), a body over the limit (413), a query string or path that does
//!   not deserialize (400), an unknown route (404) - any error response that
//!   is not JSON becomes the native shape, keeping the status and headers;
//! - on the OpenAI routes (`/v1/images/...`), every native-shaped error
//!   (the API-key middleware's 401, the body limit's 413, the rate limit's
//!   429) is rewritten to OpenAI's `{"error": {message, type, param, code}}`
//!   (see [`openai_error_body`]), so OpenAI clients always see
//!   the shape their SDKs parse.

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;

/// An error in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<sqlx::Error> for OpenAiError {
    fn from(e: sqlx::Error) -> Self {
        OpenAiError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = openai_error_body(e.status, &e.message, e.field.as_deref(), e.code);
        let mut response = (openai_status(e.status), Json(body)).into_response();
        if let Some(s) = e.retry_after {
            if let Ok(v) = s.to_string().parse() {
                response.headers_mut().insert("retry-after", v);
            }
        }
        response
    }
}

/// The status an OpenAI route answers for an easel error status: OpenAI
/// reports every invalid request as 400 `invalid_request_error` and never
/// uses 422, so easel's 422 (a field out of range, e.g. a `size` that is
/// not a multiple of 8) becomes 400 there - `size` errors are then 400
/// whether the text or the numbers are wrong.
pub fn openai_status(status: StatusCode) -> StatusCode {
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    }
}

/// OpenAI's error body `{"error": {message, type, param, code}}` (plus
/// easel's `field`, equal to `param`) for an error with `status`.
///
/// `type` follows the values OpenAI's API answers (its "Error codes"
/// guide): `invalid_request_error` for 4xx (also a missing or wrong API key,
/// whose `code` is `invalid_api_key`), `insufficient_quota` for 402 (credit
/// used up), `requests` with code `rate_limit_exceeded` for 429, and
/// `server_error` for 5xx. `param` is the OpenAI parameter at fault or null.
pub fn openai_error_body(
    status: StatusCode,
    message: &str,
    field: Option<&str>,
    code: &str,
) -> serde_json::Value {
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("invalid_request_error", "invalid_api_key"),
        StatusCode::PAYMENT_REQUIRED => ("insufficient_quota", "insufficient_quota"),
        StatusCode::TOO_MANY_REQUESTS => ("requests", "rate_limit_exceeded"),
        s if s.is_server_error() => ("server_error", code),
        _ => ("invalid_request_error", code),
    };
    serde_json::json!({"error": {
        "message": message,
        "type": kind,
        "param": field,
        "code": code,
        "field": field,
    }})
}

/// The largest error body read back for rewriting (framework rejections
/// are one line; handler errors a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Whether `path` is one of the OpenAI-compatible routes.
pub fn is_openai_path(path: &str) -> bool {
    path.starts_with("/v1/images/")
}

/// The stable native `code` for a framework rejection with `status`.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_value",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

fn default_message(status: StatusCode, method: &str, allow: Option<&str>) -> String {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "method {method} is not allowed on this endpoint (allowed: {})",
            allow.unwrap_or("listed in the Allow header")
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than this server accepts (max_body_bytes)".into()
        }
        StatusCode::NOT_FOUND => "no such endpoint; see /docs or /openapi.json".into(),
        s => s
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string(),
    }
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Middleware: shape every error response (see the module docs).
pub async fn shape_errors(request: Request, next: Next) -> Response {
    let openai = is_openai_path(request.uri().path());
    let replicate = crate::replicate_error::is_replicate_path(request.uri().path());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if replicate {
        return replicate_problem(response, &method).await;
    }
    let json = is_json(&response);
    if json && !openai {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_ERROR_BODY).await else {
        let e = ApiError::new(
            status,
            code_for_status(status),
            default_message(status, &method, None),
        );
        return finish(parts, e, openai);
    };
    let error = if json {
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let detail = &value["error"];
        if detail.get("type").is_some() || !detail.is_object() {
            // Already OpenAI-shaped (or not an error body we know): as is.
            return Response::from_parts(parts, Body::from(bytes));
        }
        let code = detail["code"].as_str().unwrap_or(code_for_status(status));
        let mut e = ApiError::new(
            status,
            code_for_status(status),
            detail["message"].as_str().unwrap_or_default(),
        );
        e.field = detail["field"].as_str().map(str::to_string);
        return finish_with_code(parts, e, code, openai);
    } else {
        let allow = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let message = if text.is_empty() {
            default_message(status, &method, allow.as_deref())
        } else if status == StatusCode::PAYLOAD_TOO_LARGE {
            default_message(status, &method, None)
        } else {
            text
        };
        ApiError::new(status, code_for_status(status), message)
    };
    finish(parts, error, openai)
}

/// On the Replicate routes: every error that is not already problem
/// details (the API-key middleware's 401, the body limit's 413, the rate
/// limit's 429, a framework rejection) becomes Replicate's problem body,
/// keeping the status and headers.
async fn replicate_problem(response: Response, method: &str) -> Response {
    use crate::replicate_error::{problem_body, problem_response, title_for};
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    if is_problem {
        return response;
    }
    let json = is_json(&response);
    let status = response.status();
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, MAX_ERROR_BODY).await.unwrap_or_default();
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let detail = if json {
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        value["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        String::from_utf8_lossy(&bytes).trim().to_string()
    };
    let detail = if detail.is_empty() || status == StatusCode::PAYLOAD_TOO_LARGE {
        default_message(status, method, allow.as_deref())
    } else {
        detail
    };
    let mut out = problem_response(
        status,
        problem_body(status, title_for(status), &detail, None),
    );
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

fn finish(parts: axum::http::response::Parts, e: ApiError, openai: bool) -> Response {
    let code = e.code;
    finish_with_code(parts, e, code, openai)
}

fn finish_with_code(
    parts: axum::http::response::Parts,
    e: ApiError,
    code: &str,
    openai: bool,
) -> Response {
    let body = if openai {
        openai_error_body(e.status, &e.message, e.field.as_deref(), code)
    } else {
        serde_json::json!({"error": {"code": code, "message": e.message, "field": e.field}})
    };
    let status = if openai {
        openai_status(e.status)
    } else {
        e.status
    };
    let mut response = (status, axum::Json(body)).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}
