//! The native API (`/v1/...`), operational endpoints and the router.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Multipart, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use easel_core::{ImageDefinition, NativeRequest, ValidateOptions};
use futures_util::stream::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{require_key, Principal};
use crate::error::{ApiError, ErrorBody};
use crate::job::JobStatus;
use crate::metrics::Gauges;
use crate::models::ModelEntry;
use crate::store::{PackRow, TrainingRow};
use crate::submit::{body_hash, commit, prepare, Source};
use crate::util::{new_id, now_ms, rfc3339, usd};
use crate::views::{
    AssetRecord, GenerationRecord, ListOf, PackRecord, TrainingRecord, UsageRecord,
};
use crate::{AppState, JobEvent};

/// The router: public operational routes, the file route (capability
/// URLs), and the `/v1` API behind the API-key middleware.
pub fn router(state: AppState) -> Router {
    let limit = state.config().max_body_bytes;
    let authed = Router::new()
        .route(
            "/v1/generations",
            post(create_generation).get(list_generations),
        )
        .route("/v1/generations/{id}", get(get_generation))
        .route("/v1/generations/{id}/events", get(generation_events))
        .route("/v1/generations/{id}/cancel", post(cancel_generation))
        .route("/v1/assets", get(list_assets))
        .route("/v1/assets/{id}", get(get_asset))
        .route("/v1/assets/{id}/file", get(get_asset_file))
        .route("/v1/models", get(list_models))
        .route("/v1/trainings", post(create_training).get(list_trainings))
        .route(
            "/v1/trainings/{id}",
            get(get_training).delete(delete_training),
        )
        .route("/v1/inference-packs", post(create_pack).get(list_packs))
        .route(
            "/v1/inference-packs/{id}",
            get(get_pack).delete(delete_pack),
        )
        .route("/v1/usage", get(get_usage))
        .route("/v1/images/generations", post(crate::openai::generations))
        .route("/v1/images/edits", post(crate::openai::edits))
        .merge(crate::flows::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/docs", get(crate::openapi::docs_page))
        .route("/v1/files/{name}", get(get_file))
        .merge(authed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(crate::error_shape::shape_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /docs or /openapi.json",
    )
}

// ---- extractors ---------------------------------------------------------

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

// ---- helpers ---------------------------------------------------------------

/// The record of job `id` (any owner), or `None`.
///
/// # Errors
/// A store failure.
pub async fn load_record(
    state: &AppState,
    id: &str,
    base_url: &str,
) -> Result<Option<GenerationRecord>, sqlx::Error> {
    let Some(g) = state.store().generation(id).await? else {
        return Ok(None);
    };
    let items = state.store().items(id).await?;
    let assets = state.store().assets_of(id).await?;
    Ok(Some(GenerationRecord::new(&g, &items, &assets, base_url)))
}

async fn owned_record(
    state: &AppState,
    principal: &Principal,
    id: &str,
    base_url: &str,
) -> Result<GenerationRecord, ApiError> {
    let owned = state
        .store()
        .generation(id)
        .await?
        .is_some_and(|g| g.key_id == principal.key_id);
    if !owned {
        return Err(ApiError::not_found("generation", id));
    }
    load_record(state, id, base_url)
        .await?
        .ok_or_else(|| ApiError::not_found("generation", id))
}

/// Queue webhook `event` (`start`, `progress`, `completed`) of job `id` if
/// the job subscribed to it.
///
/// # Errors
/// A store failure.
pub async fn queue_webhook(state: &AppState, id: &str, event: &str) -> Result<(), sqlx::Error> {
    let Some(g) = state.store().generation(id).await? else {
        return Ok(());
    };
    let Some(url) = &g.webhook_url else {
        return Ok(());
    };
    if !g.webhook_events.iter().any(|e| e == event) {
        return Ok(());
    }
    let Some(record) = load_record(state, id, &state.default_base_url()).await? else {
        return Ok(());
    };
    let kind = match event {
        "start" => "generation.started",
        "progress" => "generation.progress",
        _ => "generation.completed",
    };
    let payload = serde_json::json!({
        "id": new_id(),
        "type": kind,
        "created_at": rfc3339(now_ms()),
        "data": record,
    });
    let attempts = if event == "progress" {
        1
    } else {
        state.config().webhook_max_attempts
    };
    state
        .store()
        .enqueue_delivery(id, url, kind, &payload.to_string(), attempts)
        .await?;
    state.webhook_wake().notify_one();
    Ok(())
}

/// `Prefer: wait=N` (RFC 7240), capped at `max_wait_seconds`.
pub fn prefer_wait(headers: &HeaderMap, max: u64) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait"))
                .then(|| v.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .map(|n| n.min(max))
}

/// Wait until job `id` is finished or `seconds` pass; true when finished.
pub async fn wait_for(state: &AppState, id: &str, seconds: u64) -> Result<bool, ApiError> {
    let mut events = state.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let done = state
            .store()
            .generation(id)
            .await?
            .is_some_and(|g| g.status.is_terminal());
        if done {
            return Ok(true);
        }
        if state.is_shutting_down() {
            return Ok(false);
        }
        // Wake on this job's status events; re-check the store after a lag.
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(JobEvent::Status { id: e, .. }) if e == id => return,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return;
                    }
                }
            }
        };
        let tick = Duration::from_secs(1);
        match tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + tick), wait).await
        {
            Ok(()) => {}
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Ok(state
                    .store()
                    .generation(id)
                    .await?
                    .is_some_and(|g| g.status.is_terminal()))
            }
            Err(_) => {}
        }
    }
}

fn json_response(status: StatusCode, body: impl serde::Serialize) -> Response {
    (status, Json(body)).into_response()
}

// ---- operational -----------------------------------------------------------

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready: the store answers and the worker runs"),
              (status = 503, description = "Not ready", body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        );
        e.retry_after = Some(5);
        return e.into_response();
    }
    match state.store().counts().await {
        Ok((queued, running)) => Json(serde_json::json!({
            "status": "ready",
            "queued": queued,
            "running": running,
        }))
        .into_response(),
        Err(e) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("job store: {e}"),
            );
            e.retry_after = Some(5);
            e.into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let (queued, running) = state.store().counts().await.unwrap_or((0, 0));
    let loaded = state.worker().loaded();
    let text = state.metrics().render(Gauges {
        queued,
        running,
        models_loaded: loaded.len(),
        models_bytes: loaded.iter().map(|m| m.bytes).sum(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

// ---- generations -----------------------------------------------------------

/// Query of `GET /v1/generations`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs with this status.
    #[param(pattern = "^(queued|running|succeeded|failed|canceled)$")]
    pub status: Option<String>,
    /// At most this many, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
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

#[utoipa::path(post, path = "/v1/generations", tag = "generations",
    request_body = crate::openapi::GenerationRequestDoc,
    params(
        ("Prefer" = Option<String>, Header, description = "`wait=N`: hold up to N seconds for the job to finish"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retried POST with the same key returns the first job"),
    ),
    responses(
        (status = 202, description = "Accepted (or still running after `Prefer: wait`)", body = GenerationRecord),
        (status = 200, description = "Finished within `Prefer: wait`", body = GenerationRecord),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 402, description = "Credit limit reached", body = ErrorBody),
        (status = 403, description = "A local path outside the model roots", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid field (wrong type, out of range, unknown model/training, bad image)", body = ErrorBody),
        (status = 429, description = "Queue full (`queue_full`) or this key's submission rate exceeded (`rate_limited`); Retry-After", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    state.check_submission_rate(&principal.key_id)?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let request = NativeRequest::from_json(value.clone())?;
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if idempotency_key.as_ref().is_some_and(|k| k.len() > 255) {
        return Err(ApiError::bad_request(
            "Idempotency-Key is longer than 255 characters",
        ));
    }
    let hash = body_hash(&body);
    // A replay is answered before any validation work.
    if let Some(key) = &idempotency_key {
        if let Some(existing) = state
            .store()
            .generation_by_idempotency_key(&principal.key_id, key)
            .await?
        {
            if existing.request_hash.as_deref() == Some(hash.as_str()) {
                return respond_job(&state, &existing.id, &base, &headers, false).await;
            }
        }
    }
    let prepared = prepare(
        &state,
        &principal,
        &request,
        Source::Native,
        value,
        hash,
        idempotency_key,
    )
    .await?;
    let committed = commit(&state, &principal, prepared).await?;
    respond_job(
        &state,
        &committed.job.id,
        &base,
        &headers,
        committed.created,
    )
    .await
}

async fn respond_job(
    state: &AppState,
    id: &str,
    base: &str,
    headers: &HeaderMap,
    created: bool,
) -> Result<Response, ApiError> {
    let wait = prefer_wait(headers, state.config().max_wait_seconds);
    if let Some(seconds) = wait {
        wait_for(state, id, seconds).await?;
    }
    let record = load_record(state, id, base)
        .await?
        .ok_or_else(|| ApiError::not_found("generation", id))?;
    let status = if record.status.is_terminal() && wait.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = json_response(status, &record);
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/generations/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Some(seconds) = wait {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={seconds}")) {
            h.insert("preference-applied", v);
        }
    }
    if !created {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/generations", tag = "generations", params(ListQuery),
    responses((status = 200, description = "The key's jobs, newest first", body = ListOf<GenerationRecord>)),
    security(("bearer" = [])))]
async fn list_generations(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<ListOf<GenerationRecord>>, ApiError> {
    let status = match &query.status {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "invalid_value",
                "status",
                format!(
                    "unknown status `{s}` (allowed: queued, running, succeeded, failed, canceled)"
                ),
            )
        })?),
        None => None,
    };
    let limit = list_limit(query.limit, 20, 1..=100)?;
    let rows = state
        .store()
        .generations(&principal.key_id, status, limit, None)
        .await?;
    let mut data = Vec::new();
    for g in rows {
        if let Some(r) = load_record(&state, &g.id, &base).await? {
            data.push(r);
        }
    }
    Ok(Json(ListOf::new(data)))
}

#[utoipa::path(get, path = "/v1/generations/{id}", tag = "generations",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = GenerationRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Json<GenerationRecord>, ApiError> {
    Ok(Json(owned_record(&state, &principal, &id, &base).await?))
}

#[utoipa::path(post, path = "/v1/generations/{id}/cancel", tag = "generations",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Canceled (a running job stops at its next step)", body = GenerationRecord),
        (status = 202, description = "Cancel asked; the job is still stopping", body = GenerationRecord),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody)),
    security(("bearer" = [])))]
async fn cancel_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = owned_record(&state, &principal, &id, &base).await?;
    if record.status.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelable",
            format!("the job is already {}", record.status.as_str()),
        ));
    }
    if !cancel_job(&state, &id).await? {
        wait_for(&state, &id, 10).await?;
    }
    let record = owned_record(&state, &principal, &id, &base).await?;
    let status = if record.status.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_response(status, record))
}

use crate::metrics::Metrics;

/// Cancel job `id`: a queued job is canceled now (true), a running one is
/// asked to stop at its next step (false).
///
/// # Errors
/// A store failure.
pub async fn cancel_job(state: &AppState, id: &str) -> Result<bool, ApiError> {
    let error = crate::job::JobError::new("canceled", "canceled by the client");
    if state.store().cancel_queued(id, &error).await? {
        Metrics::inc(&state.metrics().jobs_canceled);
        state.emit(JobEvent::Status {
            id: id.to_string(),
            status: JobStatus::Canceled,
        });
        queue_webhook(state, id, "completed").await?;
        Ok(true)
    } else {
        // Running: the worker stops at the next step.
        state.store().request_cancel(id).await?;
        state.worker().cancel(id);
        Ok(false)
    }
}

#[utoipa::path(get, path = "/v1/generations/{id}/events", tag = "generations",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Server-Sent Events: `status` (the whole job record) \
        and `progress` (a Progress object); the stream ends after the job finishes",
        content_type = "text/event-stream")),
    security(("bearer" = [])))]
async fn generation_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading the state, so nothing is missed between.
    let events = state.subscribe();
    let first = owned_record(&state, &principal, &id, &base).await?;
    struct S {
        state: AppState,
        id: String,
        base: String,
        events: tokio::sync::broadcast::Receiver<JobEvent>,
        first: Option<GenerationRecord>,
        done: bool,
    }
    let start = S {
        state,
        id,
        base,
        events,
        first: Some(first),
        done: false,
    };
    let status_event = |r: &GenerationRecord| {
        Event::default()
            .event("status")
            .json_data(r)
            .unwrap_or_else(|_| Event::default().event("status"))
    };
    let stream = futures_util::stream::unfold(start, move |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(first) = s.first.take() {
            s.done = first.status.is_terminal();
            let e = status_event(&first);
            return Some((Ok(e), s));
        }
        loop {
            if s.state.is_shutting_down() {
                return None;
            }
            let next = tokio::time::timeout(Duration::from_secs(1), s.events.recv()).await;
            let reload = match next {
                Err(_) => continue,
                Ok(Ok(JobEvent::Progress { id, progress })) if id == s.id => {
                    let e = Event::default()
                        .event("progress")
                        .json_data(&progress)
                        .unwrap_or_else(|_| Event::default().event("progress"));
                    return Some((Ok(e), s));
                }
                Ok(Ok(JobEvent::Status { id, .. })) => id == s.id,
                Ok(Ok(_)) => false,
                Ok(Err(RecvError::Lagged(_))) => true,
                Ok(Err(RecvError::Closed)) => return None,
            };
            if reload {
                match load_record(&s.state, &s.id, &s.base).await {
                    Ok(Some(r)) => {
                        s.done = r.status.is_terminal();
                        let e = status_event(&r);
                        return Some((Ok(e), s));
                    }
                    _ => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

// ---- assets ---------------------------------------------------------------

/// Query of `GET /v1/assets`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AssetQuery {
    /// Only the outputs of this job.
    pub generation: Option<String>,
    /// At most this many, 1..=500 (default 50) when no job is given.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/assets", tag = "assets", params(AssetQuery),
    responses((status = 200, body = ListOf<AssetRecord>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_assets(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    ApiQuery(query): ApiQuery<AssetQuery>,
) -> Result<Json<ListOf<AssetRecord>>, ApiError> {
    let limit = list_limit(query.limit, 50, 1..=500)?;
    let rows = match &query.generation {
        Some(id) => {
            let owned = state
                .store()
                .generation(id)
                .await?
                .is_some_and(|g| g.key_id == principal.key_id);
            if !owned {
                return Err(ApiError::not_found("generation", id));
            }
            state.store().assets_of(id).await?
        }
        None => {
            state
                .store()
                .assets_of_key(&principal.key_id, limit)
                .await?
        }
    };
    Ok(Json(ListOf::new(
        rows.iter().map(|a| AssetRecord::new(a, &base)).collect(),
    )))
}

async fn owned_asset(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<crate::store::AssetRow, ApiError> {
    state
        .store()
        .asset(id)
        .await?
        .filter(|a| a.key_id == principal.key_id)
        .ok_or_else(|| ApiError::not_found("asset", id))
}

#[utoipa::path(get, path = "/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id")),
    responses((status = 200, body = AssetRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_asset(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Json<AssetRecord>, ApiError> {
    let a = owned_asset(&state, &principal, &id).await?;
    Ok(Json(AssetRecord::new(&a, &base)))
}

async fn file_response(
    state: &AppState,
    hash: &str,
    ext: &str,
    mime: &str,
) -> Result<Response, ApiError> {
    let path = state
        .assets()
        .path(hash, ext)
        .ok_or_else(|| ApiError::not_found("file", hash))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found("file", hash))?;
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{hash}\"")) {
        h.insert(header::ETAG, v);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/assets/{id}/file", tag = "assets",
    params(("id" = String, Path, description = "Asset id")),
    responses((status = 200, description = "The image, with its content type"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_asset_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = owned_asset(&state, &principal, &id).await?;
    file_response(&state, &a.hash, &a.extension, &a.file_type).await
}

#[utoipa::path(get, path = "/v1/files/{name}", tag = "assets",
    params(("name" = String, Path, description = "`<content hash>.<ext>` as in an asset's `file_url`")),
    responses((status = 200, description = "The image, with its content type (no API key: the URL names the content hash)"),
              (status = 404, body = ErrorBody)))]
async fn get_file(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (hash, ext) = name
        .split_once('.')
        .ok_or_else(|| ApiError::not_found("file", &name))?;
    let asset = state
        .store()
        .asset_by_hash(hash)
        .await?
        .filter(|a| a.extension == ext)
        .ok_or_else(|| ApiError::not_found("file", &name))?;
    file_response(&state, hash, ext, &asset.file_type).await
}

// ---- models ---------------------------------------------------------------

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "Registry names and local models; `loaded` marks those in the worker's cache", body = ListOf<ModelEntry>)),
    security(("bearer" = [])))]
async fn list_models(State(state): State<AppState>) -> Result<Json<ListOf<ModelEntry>>, ApiError> {
    let loaded: Vec<String> = state
        .worker()
        .loaded()
        .into_iter()
        .map(|m| m.load)
        .collect();
    let registry = state.models().clone();
    let list = tokio::task::spawn_blocking(move || registry.list(&loaded))
        .await
        .map_err(|e| ApiError::internal("listing models", e))?;
    Ok(Json(ListOf::new(list)))
}

// ---- trainings ---------------------------------------------------------------

/// Whether safetensors `bytes` are a LoRA file the engine can apply: its
/// header's keys must be of a layout the engine reads, each module with its
/// down and up matrix ([`easel_diffusion::lora::check_lora_bytes`], the same
/// rule as for `loras[].path` at submission and as the worker applies).
fn check_lora_file(bytes: &[u8]) -> Result<(), String> {
    easel_diffusion::lora::check_lora_bytes(std::path::Path::new("the uploaded file"), bytes)
        .map_err(|e| crate::checks::engine_message(&e))
}

#[utoipa::path(post, path = "/v1/trainings", tag = "trainings",
    request_body(content_type = "multipart/form-data", description = "`file`: the LoRA `.safetensors`; `baseModel`: the model it was trained on; `name` (optional)"),
    responses((status = 201, body = TrainingRecord), (status = 422, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send multipart/form-data with `file` and `baseModel`: {e}"),
        )
    })?;
    let (mut file, mut base_model, mut name, mut file_name) = (None, None, None, None);
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "file" => {
                file_name = field.file_name().map(str::to_string);
                file = Some(field.bytes().await.map_err(multipart_error)?);
            }
            "baseModel" | "base_model" => {
                base_model = Some(field.text().await.map_err(multipart_error)?)
            }
            "name" => name = Some(field.text().await.map_err(multipart_error)?),
            other => {
                return Err(ApiError::invalid(
                    "unknown_field",
                    other,
                    "unknown form field (allowed: file, baseModel, name)",
                ))
            }
        }
    }
    let file = file.ok_or_else(|| {
        ApiError::invalid(
            "missing_field",
            "file",
            "upload the LoRA .safetensors as `file`",
        )
    })?;
    let base_model = base_model
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "missing_field",
                "baseModel",
                "give the base model the LoRA is for",
            )
        })?;
    let name = name.filter(|n| !n.trim().is_empty()).or(file_name);
    let row = register_training(&state, &principal, file.to_vec(), name, base_model).await?;
    Ok(json_response(
        StatusCode::CREATED,
        TrainingRecord::from(&row),
    ))
}

/// Store a LoRA file as a training of `principal` (what `POST
/// /v1/trainings` and the flows' `RegisterTraining` step do): the base model
/// must resolve, the file must hold LoRA weights.
///
/// # Errors
/// 403 `path_not_allowed` / 422 `unknown_model` for `baseModel`, 422
/// `invalid_value` for `file`, or a store failure.
pub async fn register_training(
    state: &AppState,
    principal: &Principal,
    bytes: Vec<u8>,
    name: Option<String>,
    base_model: String,
) -> Result<TrainingRow, ApiError> {
    let registry = state.models().clone();
    let b = base_model.clone();
    tokio::task::spawn_blocking(move || registry.resolve(&b))
        .await
        .map_err(|e| ApiError::internal("resolving a model", e))?
        .map_err(|e| crate::submit::model_error(e, "baseModel".into()))?;
    let check = tokio::task::spawn_blocking(move || check_lora_file(&bytes).map(|_| bytes))
        .await
        .map_err(|e| ApiError::internal("reading a LoRA", e))?;
    let bytes = check.map_err(|m| ApiError::invalid("invalid_value", "file", m))?;
    let trainings = state.trainings().clone();
    let stored = tokio::task::spawn_blocking(move || trainings.put(&bytes, "safetensors"))
        .await
        .map_err(|e| ApiError::internal("storing a LoRA", e))?
        .map_err(|e| ApiError::internal("storing a LoRA", e))?;
    let row = TrainingRow {
        id: new_id(),
        key_id: principal.key_id.clone(),
        name: name.unwrap_or_else(|| "lora".into()),
        base_model,
        hash: stored.hash,
        file_size: stored.size as i64,
        created_at: now_ms(),
    };
    state.store().insert_training(&row).await?;
    Ok(row)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    body_error(e.status(), e.body_text())
}

#[utoipa::path(get, path = "/v1/trainings", tag = "trainings",
    responses((status = 200, body = ListOf<TrainingRecord>)), security(("bearer" = [])))]
async fn list_trainings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ListOf<TrainingRecord>>, ApiError> {
    let rows = state.store().trainings(&principal.key_id).await?;
    Ok(Json(ListOf::new(
        rows.iter().map(TrainingRecord::from).collect(),
    )))
}

#[utoipa::path(get, path = "/v1/trainings/{id}", tag = "trainings",
    params(("id" = String, Path, description = "Training id")),
    responses((status = 200, body = TrainingRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TrainingRecord>, ApiError> {
    let row = state
        .store()
        .training(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("training", &id))?;
    Ok(Json(TrainingRecord::from(&row)))
}

#[utoipa::path(delete, path = "/v1/trainings/{id}", tag = "trainings",
    params(("id" = String, Path, description = "Training id")),
    responses((status = 204, description = "Deleted (jobs already accepted keep their copy)"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (row, shared) = state
        .store()
        .delete_training(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("training", &id))?;
    // Queued jobs name the file by path: keep it while any job may need it.
    let (queued, running) = state.store().counts().await?;
    if !shared && queued == 0 && running == 0 {
        state.trainings().remove(&row.hash, "safetensors");
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---- inference packs -------------------------------------------------------

#[utoipa::path(post, path = "/v1/inference-packs", tag = "inference packs",
    request_body = crate::openapi::PackRequestDoc,
    responses((status = 201, body = PackRecord), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let name = match value.as_object_mut().and_then(|m| m.remove("name")) {
        Some(serde_json::Value::String(n)) if !n.trim().is_empty() => n,
        Some(serde_json::Value::String(_)) | None => {
            return Err(ApiError::invalid(
                "missing_field",
                "name",
                "give the pack a name",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_type",
                "name",
                "invalid type: expected a string",
            ))
        }
    };
    let pack = NativeRequest::pack_from_json(value.clone())?;
    if pack.images.is_empty() {
        return Err(ApiError::invalid(
            "missing_field",
            "images",
            "a pack needs at least one image definition",
        ));
    }
    if pack.images.len() > state.config().max_images_per_request {
        return Err(ApiError::invalid(
            "too_many_images",
            "images",
            format!(
                "at most {} image definitions",
                state.config().max_images_per_request
            ),
        ));
    }
    // Ranges now; prompt and baseModel may come from the request that uses it.
    for (i, image) in pack.images.iter().enumerate() {
        let mut merged: ImageDefinition = image.merged_over(&pack.defaults);
        merged.prompt.get_or_insert_with(String::new);
        merged.base_model.get_or_insert_with(|| "-".into());
        merged.validate(&ValidateOptions::default().field_prefix(format!("images[{i}]")))?;
    }
    let row = PackRow {
        id: new_id(),
        key_id: principal.key_id.clone(),
        name,
        body_json: value.to_string(),
        image_count: pack.images.len() as i64,
        created_at: now_ms(),
    };
    state.store().insert_pack(&row).await?;
    Ok(json_response(StatusCode::CREATED, PackRecord::from(&row)))
}

#[utoipa::path(get, path = "/v1/inference-packs", tag = "inference packs",
    responses((status = 200, body = ListOf<PackRecord>)), security(("bearer" = [])))]
async fn list_packs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ListOf<PackRecord>>, ApiError> {
    let rows = state.store().packs(&principal.key_id).await?;
    Ok(Json(ListOf::new(
        rows.iter().map(PackRecord::from).collect(),
    )))
}

#[utoipa::path(get, path = "/v1/inference-packs/{id}", tag = "inference packs",
    params(("id" = String, Path, description = "Pack id")),
    responses((status = 200, body = PackRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<PackRecord>, ApiError> {
    let row = state
        .store()
        .pack(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("inference pack", &id))?;
    Ok(Json(PackRecord::from(&row)))
}

#[utoipa::path(delete, path = "/v1/inference-packs/{id}", tag = "inference packs",
    params(("id" = String, Path, description = "Pack id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.store().delete_pack(&principal.key_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("inference pack", &id))
    }
}

// ---- usage ---------------------------------------------------------------

#[utoipa::path(get, path = "/v1/usage", tag = "billing",
    responses((status = 200, body = UsageRecord)), security(("bearer" = [])))]
async fn get_usage(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<UsageRecord>, ApiError> {
    let u = state.store().usage(&principal.key_id).await?;
    let used = u.charged_micros - u.refunded_micros;
    Ok(Json(UsageRecord {
        key_id: principal.key_id.clone(),
        price_per_inference_usd: usd(state.config().price_micros()),
        inferences_charged: u.inferences_charged,
        inferences_refunded: u.inferences_refunded,
        inferences_billed: u.inferences_charged - u.inferences_refunded,
        images_generated: u.images_generated,
        charged_usd: usd(u.charged_micros),
        refunded_usd: usd(u.refunded_micros),
        used_usd: usd(used),
        credit_limit_usd: principal.credit_limit_micros.map(usd),
        credit_remaining_usd: principal
            .credit_limit_micros
            .map(|l| usd((l - used).max(0))),
    }))
}
