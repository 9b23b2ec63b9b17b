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
//!   the shape their SDKs parse;
//! - on AUTOMATIC1111's routes (`/sdapi/...`), every native-shaped error is
//!   rewritten to the web UI's (FastAPI) shapes (see [`a1111_error_body`]);
//! - on the Replicate routes (`/v1/predictions...`,
//!   `/v1/models/{owner}/{name}/predictions`), to Replicate's problem
//!   details (`application/problem+json`, `crate::replicate_error`);
//! - likewise on the Leonardo routes (`/api/rest/v1/...`, Leonardo's
//!   `{"error", "path", "code"}`) and the serverless endpoint
//!   (`/api/v1/images/generation`, `{"status": "error", "message", ...}`).

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;

/// `body` as a JSON response with `status`, and `Retry-After` when
/// `retry_after` is set: what each foreign error shape (OpenAI,
/// AUTOMATIC1111, Leonardo, serverless) answers.
pub fn shaped_response(status: StatusCode, body: Value, retry_after: Option<u64>) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(v) = retry_after.and_then(|s| s.to_string().parse().ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// An error in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<crate::store::StoreError> for OpenAiError {
    fn from(e: crate::store::StoreError) -> Self {
        OpenAiError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = openai_error_body(e.status, &e.message, e.field.as_deref(), e.code);
        shaped_response(openai_status(e.status), body, e.retry_after)
    }
}

/// An error in AUTOMATIC1111's (FastAPI) shape; see [`a1111_error_body`].
pub struct A1111Error(pub ApiError);

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        A1111Error(e)
    }
}

impl From<crate::store::StoreError> for A1111Error {
    fn from(e: crate::store::StoreError) -> Self {
        A1111Error(e.into())
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = a1111_error_body(e.status, &e.message, e.field.as_deref());
        let mut response = shaped_response(e.status, body, e.retry_after);
        if e.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Basic realm=\"easel\""),
            );
        }
        response
    }
}

/// AUTOMATIC1111's error bodies, as its FastAPI app answers them:
///
/// - a request field that does not fit (422 with a `field`): FastAPI's
///   validation error `{"detail": [{"loc": ["body", FIELD...], "msg",
///   "type": "value_error"}]}`, `loc` naming the field (`override_settings`
///   keys as `["body", "override_settings", KEY]`);
/// - every other error: the web UI's `api_middleware` shape
///   `{"error": "HTTPException", "detail": MESSAGE, "body": "", "errors":
///   "STATUS: MESSAGE"}`, plus easel's `field` (the request field at fault
///   or null).
pub fn a1111_error_body(
    status: StatusCode,
    message: &str,
    field: Option<&str>,
) -> serde_json::Value {
    match field {
        Some(field) if status == StatusCode::UNPROCESSABLE_ENTITY => {
            let mut loc = vec![serde_json::Value::from("body")];
            loc.extend(field.split('.').map(serde_json::Value::from));
            serde_json::json!({"detail": [{"loc": loc, "msg": message, "type": "value_error"}]})
        }
        _ => serde_json::json!({
            "error": "HTTPException",
            "detail": message,
            "body": "",
            "errors": format!("{}: {message}", status.as_u16()),
            "field": field,
        }),
    }
}

/// Whether `path` is one of AUTOMATIC1111's routes.
pub fn is_a1111_path(path: &str) -> bool {
    path.starts_with("/sdapi/")
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

/// The path prefix of the Leonardo-compatible routes.
pub const LEONARDO_PREFIX: &str = "/api/rest/v1/";

/// The route of the serverless endpoint shape.
pub const SERVERLESS_PATH: &str = "/api/v1/images/generation";

/// Leonardo's error body (Hasura's REST errors) for `status`, `message` and
/// the field at fault: `{"error": MESSAGE, "path": "$.FIELD" | "$", "code"}`,
/// `code` by status: 400 `parse-failed`, 401/403 `access-denied`, 402
/// `payment-required`, 404 `not-found`, 409 `conflict`, 413
/// `payload-too-large`, 422 `validation-failed`, 429 `rate-limited`, else
/// `unexpected`.
pub fn leonardo_error_body(status: StatusCode, message: &str, field: Option<&str>) -> Value {
    let code = match status.as_u16() {
        400 => "parse-failed",
        401 | 403 => "access-denied",
        402 => "payment-required",
        404 => "not-found",
        409 => "conflict",
        413 => "payload-too-large",
        422 => "validation-failed",
        429 => "rate-limited",
        _ => "unexpected",
    };
    let path = match field {
        Some(f) if !f.is_empty() => format!("$.{f}"),
        _ => "$".to_string(),
    };
    json!({"error": message, "path": path, "code": code})
}

/// The serverless endpoint's error body (see `routes::serverless`) for `message`, `field` and `code`.
pub fn serverless_error_body(message: &str, field: Option<&str>, code: &str) -> Value {
    json!({"status": "error", "message": message, "field": field, "code": code})
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

/// The error shape of the routes under `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"error": {code, message, field}}`.
    Native,
    /// OpenAI's (`/v1/images/...`).
    OpenAi,
    /// Leonardo's (`/api/rest/v1/...`).
    Leonardo,
    /// The serverless endpoint's (`/api/v1/images/generation`).
    Serverless,
    /// AUTOMATIC1111's web UI (`/sdapi/...`; rewritten by `shape_a1111`).
    A1111,
    /// Replicate's problem details (`/v1/predictions...`,
    /// `/v1/models/{owner}/{name}/predictions`; rewritten by
    /// `replicate_problem`).
    Replicate,
}

impl Shape {
    /// The shape of the routes under `path`.
    pub fn of(path: &str) -> Shape {
        if is_openai_path(path) {
            Shape::OpenAi
        } else if path.starts_with(LEONARDO_PREFIX) {
            Shape::Leonardo
        } else if path == SERVERLESS_PATH {
            Shape::Serverless
        } else if is_a1111_path(path) {
            Shape::A1111
        } else if crate::replicate_error::is_replicate_path(path) {
            Shape::Replicate
        } else {
            Shape::Native
        }
    }
}

/// Middleware: shape every error response (see the module docs).
pub async fn shape_errors(request: Request, next: Next) -> Response {
    let shape = Shape::of(request.uri().path());
    let foreign = shape != Shape::Native;
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if shape == Shape::Replicate {
        return replicate_problem(response, &method).await;
    }
    let json = is_json(&response);
    if shape == Shape::A1111 {
        return shape_a1111(response, &method).await;
    }
    if json && !foreign {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_ERROR_BODY).await else {
        let e = ApiError::new(
            status,
            code_for_status(status),
            default_message(status, &method, None),
        );
        return finish(parts, e, shape);
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
        return finish_with_code(parts, e, code, shape);
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
    finish(parts, error, shape)
}

/// Rewrite an error response of an `/sdapi/` route into AUTOMATIC1111's
/// shape, unless it already is (a body with `detail`).
async fn shape_a1111(response: Response, method: &str) -> Response {
    let status = response.status();
    let json = is_json(&response);
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, MAX_ERROR_BODY).await.unwrap_or_default();
    let mut e = if json {
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if value.get("detail").is_some() {
            return Response::from_parts(parts, Body::from(bytes));
        }
        let detail = &value["error"];
        let mut e = ApiError::new(
            status,
            code_for_status(status),
            detail["message"].as_str().unwrap_or_default(),
        );
        e.field = detail["field"].as_str().map(str::to_string);
        e
    } else {
        let allow = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let message = if text.is_empty() || status == StatusCode::PAYLOAD_TOO_LARGE {
            default_message(status, method, allow.as_deref())
        } else {
            text
        };
        ApiError::new(status, code_for_status(status), message)
    };
    if e.message.is_empty() {
        e.message = default_message(status, method, None);
    }
    let mut response = A1111Error(e).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
            && name != header::WWW_AUTHENTICATE
        {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
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

fn finish(parts: axum::http::response::Parts, e: ApiError, shape: Shape) -> Response {
    let code = e.code;
    finish_with_code(parts, e, code, shape)
}

fn finish_with_code(
    parts: axum::http::response::Parts,
    e: ApiError,
    code: &str,
    shape: Shape,
) -> Response {
    let field = e.field.as_deref();
    let body = match shape {
        Shape::OpenAi => openai_error_body(e.status, &e.message, field, code),
        Shape::Leonardo => leonardo_error_body(e.status, &e.message, field),
        Shape::Serverless => serverless_error_body(&e.message, field, code),
        Shape::A1111 => a1111_error_body(e.status, &e.message, field),
        Shape::Replicate => crate::replicate_error::problem_body(
            e.status,
            crate::replicate_error::title_for(e.status),
            &e.message,
            field,
        ),
        Shape::Native => {
            serde_json::json!({"error": {"code": code, "message": e.message, "field": e.field}})
        }
    };
    let status = if shape == Shape::OpenAi {
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
