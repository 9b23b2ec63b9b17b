//! The jobs service: what the route handlers, the flows' image step and
//! the worker all do to a job after it was accepted ([`crate::submit`]
//! accepts it): read its record, queue its webhooks, wait for it to
//! finish, cancel it, and announce its status changes ([`announce_started`],
//! [`announce_finished`]: event bus, webhooks, counters) the same way
//! whoever changed it.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use crate::error::ApiError;
use crate::job::JobStatus;
use crate::metrics::Metrics;
use crate::replicate_prediction::{is_prediction, prediction};
use crate::util::{new_id, now_ms, rfc3339};
use crate::views::GenerationRecord;
use crate::{AppState, JobEvent};

/// The record of job `id` (any owner), or `None`.
///
/// # Errors
/// A store failure.
pub async fn load_record(
    state: &AppState,
    id: &str,
    base_url: &str,
) -> Result<Option<GenerationRecord>, crate::store::StoreError> {
    let Some(g) = state.store().generation(id).await? else {
        return Ok(None);
    };
    let items = state.store().items(id).await?;
    let assets = state.store().assets_of(id).await?;
    let mut record = GenerationRecord::new(&g, &items, &assets, base_url);
    if g.status == JobStatus::Queued {
        record.queue_position = Some(state.store().queue_position(g.seq).await?);
    }
    Ok(Some(record))
}

/// Wait for job `id` up to the server's `max_wait_seconds` and read its
/// record: what a synchronous route (OpenAI images, AUTOMATIC1111's
/// txt2img / img2img, the serverless endpoint) answers from.
///
/// # Errors
/// 504 `timeout` naming the job when it is not finished in time (the job
/// goes on); a store failure; 404 when the record is gone.
pub async fn wait_for_record(
    state: &AppState,
    id: &str,
    base_url: &str,
) -> Result<GenerationRecord, ApiError> {
    let seconds = state.config().max_wait_seconds;
    let finished = wait_for(state, id, seconds).await?;
    let record = load_record(state, id, base_url)
        .await?
        .ok_or_else(|| ApiError::not_found("generation", id))?;
    if !finished {
        return Err(ApiError::new(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the images were not ready within {seconds} s; the job goes on: GET /v1/generations/{id}"
            ),
        ));
    }
    Ok(record)
}

/// Queue webhook `event` (`start`, `progress`, `completed`) of job `id` if
/// the job subscribed to it: easel's envelope `{id, type, created_at,
/// data: <the record>}` (type `generation.started` / `.progress` /
/// `.completed`), or for a Replicate prediction the prediction object as
/// `GET /v1/predictions/{id}` answers it now (outbox event
/// `prediction.<event>`, signed as Replicate signs: [`crate::webhooks`]).
/// The body is fixed when queued, so retries and a restart send the same.
///
/// # Errors
/// A store failure.
pub async fn queue_webhook(
    state: &AppState,
    id: &str,
    event: &str,
) -> Result<(), crate::store::StoreError> {
    let Some(g) = state.store().generation(id).await? else {
        return Ok(());
    };
    let Some(url) = &g.webhook_url else {
        return Ok(());
    };
    if !g.webhook_events.iter().any(|e| e == event) {
        return Ok(());
    }
    let base = state.default_base_url();
    let Some(record) = load_record(state, id, &base).await? else {
        return Ok(());
    };
    let (kind, payload) = if is_prediction(&g) {
        let kind = match event {
            "start" => "prediction.start",
            "progress" => "prediction.progress",
            _ => "prediction.completed",
        };
        let body = serde_json::to_value(prediction(&g, &record, &base, false)).unwrap_or_default();
        (kind, body)
    } else {
        let kind = match event {
            "start" => "generation.started",
            "progress" => "generation.progress",
            _ => "generation.completed",
        };
        let body = serde_json::json!({
            "id": new_id(),
            "type": kind,
            "created_at": rfc3339(now_ms()),
            "data": record,
        });
        (kind, body)
    };
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

/// Cancel job `id`: a queued job is canceled now (true), a running one is
/// asked to stop at its next step (false).
///
/// # Errors
/// A store failure.
pub async fn cancel_job(state: &AppState, id: &str) -> Result<bool, ApiError> {
    let error = crate::job::JobError::new("canceled", "canceled by the client");
    if state.store().cancel_queued(id, &error).await? {
        announce_finished(state, id, JobStatus::Canceled).await?;
        Ok(true)
    } else {
        // Running: the worker stops at the next step.
        state.store().request_cancel(id).await?;
        state.worker().cancel(id);
        Ok(false)
    }
}

/// Announce that job `id` started running (the store already says so):
/// broadcast the status to event streams and waiters, and queue its
/// `start` webhook if it subscribed to it.
///
/// # Errors
/// A store failure while queueing the webhook (the status is broadcast
/// before).
pub async fn announce_started(state: &AppState, id: &str) -> Result<(), crate::store::StoreError> {
    state.emit(JobEvent::Status {
        id: id.to_string(),
        status: JobStatus::Running,
    });
    queue_webhook(state, id, "start").await
}

/// Announce that job `id` finished with terminal `status` (the store
/// already says so; the worker finished it, or a cancel caught it while
/// queued): count it in `easel_jobs_finished_total` (`failed` for any
/// status other than `succeeded` and `canceled`), broadcast the status,
/// and queue its `completed` webhook.
///
/// # Errors
/// A store failure while queueing the webhook (the count and the
/// broadcast happen before).
pub async fn announce_finished(
    state: &AppState,
    id: &str,
    status: JobStatus,
) -> Result<(), crate::store::StoreError> {
    let metrics = state.metrics();
    Metrics::inc(match status {
        JobStatus::Succeeded => &metrics.jobs_succeeded,
        JobStatus::Canceled => &metrics.jobs_canceled,
        _ => &metrics.jobs_failed,
    });
    state.emit(JobEvent::Status {
        id: id.to_string(),
        status,
    });
    queue_webhook(state, id, "completed").await
}
