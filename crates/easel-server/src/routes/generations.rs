//! `/v1/generations`: submit a job, list, read, cancel, and follow it
//! (Server-Sent Events).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::{Extension, Json};
use easel_core::NativeRequest;
use futures_util::stream::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::http::{
    invalid_json, json_response, list_limit, prefer_wait, ApiQuery, BaseUrl, RawBody,
};
use crate::job::{JobStatus, Progress};
use crate::jobs::{cancel_job, load_record, wait_for};
use crate::submit::{body_hash, commit, prepare, Source};
use crate::views::{GenerationRecord, ListOf};
use crate::{AppState, JobEvent};

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

#[utoipa::path(post, path = "/v1/generations", tag = "generations",
    request_body = crate::views::GenerationRequestDoc,
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
pub(super) async fn create_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    state.check_submission_rate(&principal.key_id)?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(invalid_json)?;
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
    let wait = prefer_wait(headers, state.config().max_wait_seconds, None);
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
pub(super) async fn list_generations(
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
pub(super) async fn get_generation(
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
pub(super) async fn cancel_generation(
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

#[utoipa::path(get, path = "/v1/generations/{id}/events", tag = "generations",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Server-Sent Events: `status` (the whole job record) \
        and `progress` (a Progress object); the stream ends after the job finishes",
        content_type = "text/event-stream")),
    security(("bearer" = [])))]
pub(super) async fn generation_events(
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
        /// What the client was last sent: the status and progress, to
        /// tell a change made by another process (found by polling).
        last: (JobStatus, Option<Progress>),
    }
    let start = S {
        state,
        id,
        base,
        events,
        last: (first.status, first.progress.clone()),
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
                // Nothing from this process for a second: the job may run
                // on a worker elsewhere (`easel worker`), so poll the store.
                Err(_) => match load_record(&s.state, &s.id, &s.base).await {
                    Ok(Some(r)) if r.status != s.last.0 => {
                        s.done = r.status.is_terminal();
                        s.last = (r.status, r.progress.clone());
                        return Some((Ok(status_event(&r)), s));
                    }
                    Ok(Some(r)) if r.progress != s.last.1 => {
                        s.last.1 = r.progress.clone();
                        let Some(progress) = r.progress else { continue };
                        let e = Event::default()
                            .event("progress")
                            .json_data(&progress)
                            .unwrap_or_else(|_| Event::default().event("progress"));
                        return Some((Ok(e), s));
                    }
                    Ok(Some(_)) => continue,
                    _ => return None,
                },
                Ok(Ok(JobEvent::Progress { id, progress })) if id == s.id => {
                    s.last.1 = Some(progress.clone());
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
                        s.last = (r.status, r.progress.clone());
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
