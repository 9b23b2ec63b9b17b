//! HTTP plumbing the routes share: body and query extractors that answer
//! in the native error shape, the request's base URL, `Prefer: wait`
//! (RFC 7240), list limits and JSON responses. Depends on no route.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ApiError;
use crate::AppState;

/// A request body as bytes; a body over `max_body_bytes` is a 413
/// `body_too_large` JSON error.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(e) => Err(body_error(e.status(), e.body_text())),
        }
    }
}

/// A query string deserialized into `T`; one that does not fit is a 400
/// `bad_request` naming the parameter (`?limit=abc` -> field `limit`), in
/// the native error shape (axum's own `Query` answers plain text).
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|e| {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                ApiError::bad_request(format!("query parameter: {}", e.inner())).with_field(field)
            })
    }
}

/// The error for a body that could not be read.
pub fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server accepts (max_body_bytes)",
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", text)
    }
}

/// The base of absolute URLs for this request: `public_url`, else
/// `http://` + the `Host` header.
pub struct BaseUrl(pub String);

impl FromRequestParts<AppState> for BaseUrl {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        if let Some(url) = &state.config().public_url {
            return Ok(BaseUrl(url.trim_end_matches('/').to_string()));
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.is_empty() && !h.contains(['/', ' ']));
        Ok(BaseUrl(match host {
            Some(h) => format!("http://{h}"),
            None => state.default_base_url(),
        }))
    }
}

/// `Prefer: wait=N` (RFC 7240), capped at `max` (the server's
/// `max_wait_seconds`); a bare `wait` means `bare` seconds where the API
/// gives it a meaning (Replicate's 60), else nothing. The first `wait` of
/// the header counts.
pub fn prefer_wait(headers: &HeaderMap, max: u64, bare: Option<u64>) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|p| {
            if p.trim().eq_ignore_ascii_case("wait") {
                return bare;
            }
            let (k, v) = p.trim().split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait"))
                .then(|| v.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .map(|n| n.min(max))
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, body: impl serde::Serialize) -> Response {
    (status, Json(body)).into_response()
}

/// `limit` of a list query: `default` when absent, else within `range`
/// (a 422 `invalid_value` naming `limit` outside it; never clamped).
pub fn list_limit(
    limit: Option<i64>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if range.contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid(
            "invalid_value",
            "limit",
            format!(
                "{limit} is out of range (allowed: {} to {})",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// A list endpoint's `offset` query parameter: entries to skip, 0 when
/// absent. Errors: a negative offset (`invalid_value` naming `offset`).
pub fn list_offset(offset: Option<i64>) -> Result<i64, ApiError> {
    let offset = offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid(
            "invalid_value",
            "offset",
            format!("{offset} is out of range (allowed: 0 or more)"),
        ));
    }
    Ok(offset)
}

/// The 400 `invalid_json` error for a body that does not parse as JSON
/// (RFC 8259); the message carries the parser's position and reason.
pub fn invalid_json(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("the body is not valid JSON: {e}"),
    )
}
