//! `/v1/flows` and `/v1/flow-runs`: store flow documents, start runs,
//! read, follow (Server-Sent Events) and cancel them (see [`crate::flows`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use easel_flow::{FlowDocument, FlowEvent, FlowRunner, RunOptions};
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::flows::runs::{spawn_run, status_name};
use crate::flows::step_registry;
use crate::http::{invalid_json, list_limit, ApiQuery, RawBody};
use crate::store::{FlowRow, FlowRunRow};
use crate::util::{new_id, now_ms, rfc3339};
use crate::views::ListOf;
use crate::AppState;

/// A stored flow.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FlowRecord {
    /// UUID.
    pub id: String,
    /// Always `flow`.
    pub object: String,
    /// The document's `name`, if any.
    pub name: Option<String>,
    /// Its steps, in order: `{ id, type }`.
    #[schema(value_type = Vec<Object>)]
    pub steps: Vec<Value>,
    /// The document as sent (JSON or JSON5 text).
    pub document: String,
    /// RFC 3339.
    pub created_at: String,
}

impl FlowRecord {
    fn new(row: &FlowRow) -> Self {
        let steps = FlowDocument::parse(&row.document)
            .map(|f| {
                f.steps
                    .iter()
                    .map(|s| json!({ "id": s.id, "type": s.step_type }))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            id: row.id.clone(),
            object: "flow".into(),
            name: row.name.clone(),
            steps,
            document: row.document.clone(),
            created_at: rfc3339(row.created_at),
        }
    }
}

/// A run record as the API returns it: `easel_flow::FlowRun` (camelCase:
/// `id`, `flowId`, `status`, `input`, `steps[]` with `status`, `result`,
/// `error`, `jobId`, times) plus `object: "flow_run"` and `cancelRequested`.
fn run_view(row: &FlowRunRow) -> Value {
    let mut value: Value = serde_json::from_str(&row.record_json).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.insert("object".into(), json!("flow_run"));
        map.insert("cancelRequested".into(), json!(row.cancel_requested));
    }
    value
}

/// 422 `invalid_flow` listing every problem.
fn flow_error(message: String) -> ApiError {
    ApiError::invalid("invalid_flow", "document", message)
}

#[utoipa::path(post, path = "/v1/flows", tag = "flows",
    request_body(content = Object, description = "A flow document `{ name?, steps: [...] }`, \
        or `{ \"document\": \"<JSON or JSON5 text>\" }`"),
    responses((status = 201, body = FlowRecord),
        (status = 422, description = "Invalid flow: every problem, each naming the step and parameter", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_flow(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(&body).map_err(invalid_json)?;
    let text = match value.get("document") {
        Some(Value::String(text)) => text.clone(),
        Some(doc @ Value::Object(_)) | Some(doc @ Value::Array(_)) => doc.to_string(),
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_value",
                "document",
                "must be the flow (an object) or its JSON / JSON5 text",
            ))
        }
        None => value.to_string(),
    };
    let runner = FlowRunner::new(step_registry(&state, &principal));
    let flow = runner.load(&text).map_err(|e| flow_error(e.to_string()))?;
    let row = FlowRow {
        id: new_id(),
        key_id: principal.key_id.clone(),
        name: flow.name.clone(),
        document: text,
        step_count: flow.steps.len() as i64,
        created_at: now_ms(),
    };
    state.store().insert_flow(&row).await?;
    let mut response = (StatusCode::CREATED, Json(FlowRecord::new(&row))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/flows/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/flows", tag = "flows",
    responses((status = 200, body = ListOf<FlowRecord>)), security(("bearer" = [])))]
pub(super) async fn list_flows(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ListOf<FlowRecord>>, ApiError> {
    let rows = state.store().flows(&principal.key_id).await?;
    Ok(Json(ListOf::new(
        rows.iter().map(FlowRecord::new).collect(),
    )))
}

async fn owned_flow(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<FlowRow, ApiError> {
    state
        .store()
        .flow(&principal.key_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("flow", id))
}

#[utoipa::path(get, path = "/v1/flows/{id}", tag = "flows",
    params(("id" = String, Path, description = "Flow id")),
    responses((status = 200, body = FlowRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_flow(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<FlowRecord>, ApiError> {
    Ok(Json(FlowRecord::new(
        &owned_flow(&state, &principal, &id).await?,
    )))
}

#[utoipa::path(delete, path = "/v1/flows/{id}", tag = "flows",
    params(("id" = String, Path, description = "Flow id")),
    responses((status = 204, description = "Deleted (its runs stay readable; running ones finish)"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn delete_flow(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !state.store().delete_flow(&principal.key_id, &id).await? {
        return Err(ApiError::not_found("flow", &id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /v1/flows/{id}/runs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    /// The run's input (`$.input`); absent or null is `{}`.
    #[serde(default)]
    input: Value,
}

#[utoipa::path(post, path = "/v1/flows/{id}/runs", tag = "flows",
    params(("id" = String, Path, description = "Flow id")),
    request_body(content = Object, description = "`{ \"input\": { ... } }` (`$.input` of the flow)"),
    responses((status = 202, description = "Started: the run record (`pending`)", body = Object),
        (status = 404, body = ErrorBody),
        (status = 422, description = "The input does not fit the flow's references, or a step cannot run here", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_run(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    state.check_submission_rate(&principal.key_id)?;
    let request: RunRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RunRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body must be `{{\"input\": {{...}}}}`: {e}"),
            )
        })?
    };
    if !(request.input.is_object() || request.input.is_null()) {
        return Err(ApiError::invalid(
            "invalid_value",
            "input",
            "must be an object (what the flow reads as `$.input`)",
        ));
    }
    let flow_row = owned_flow(&state, &principal, &id).await?;
    let runner = FlowRunner::new(step_registry(&state, &principal));
    let flow = runner
        .load(&flow_row.document)
        .map_err(|e| flow_error(e.to_string()))?;
    let options = RunOptions {
        run_id: Some(new_id()),
        flow_id: Some(flow_row.id.clone()),
        ..RunOptions::default()
    };
    let run = runner
        .prepare(&flow, request.input, &options)
        .map_err(|e| ApiError::invalid("invalid_input", "input", e.to_string()))?;
    let row = FlowRunRow {
        id: run.id.clone(),
        flow_id: flow_row.id.clone(),
        key_id: principal.key_id.clone(),
        document: flow_row.document.clone(),
        record_json: serde_json::to_string(&run).map_err(|e| ApiError::internal("a run", e))?,
        cancel_requested: false,
        created_at: now_ms(),
    };
    state
        .store()
        .insert_flow_run(&row, &status_name(&run))
        .await?;
    spawn_run(state.clone(), principal, flow, run, false);
    let mut response = (StatusCode::ACCEPTED, Json(run_view(&row))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/flow-runs/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Query of `GET /v1/flows/{id}/runs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// At most this many (default 20, 1..=100).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/flows/{id}/runs", tag = "flows",
    params(("id" = String, Path, description = "Flow id"), RunsQuery),
    responses((status = 200, description = "The flow's runs, newest first: `{object: list, data: [run records]}`", body = Object)),
    security(("bearer" = [])))]
pub(super) async fn list_runs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = list_limit(query.limit, 20, 1..=100)?;
    let rows = state
        .store()
        .flow_runs(&principal.key_id, Some(&id), limit)
        .await?;
    Ok(Json(json!({
        "object": "list",
        "data": rows.iter().map(run_view).collect::<Vec<_>>(),
    })))
}

async fn owned_run(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<FlowRunRow, ApiError> {
    state
        .store()
        .flow_run(id)
        .await?
        .filter(|r| r.key_id == principal.key_id)
        .ok_or_else(|| ApiError::not_found("flow run", id))
}

#[utoipa::path(get, path = "/v1/flow-runs/{id}", tag = "flows",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "The run record: per step status, times, result or error, job id", body = Object),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_run(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(run_view(&owned_run(&state, &principal, &id).await?)))
}

/// Whether a run record's `status` is terminal (`RunStatus::is_terminal`).
fn is_finished(view: &Value) -> bool {
    easel_flow::RunStatus::deserialize(&view["status"]).is_ok_and(|s| s.is_terminal())
}

#[utoipa::path(post, path = "/v1/flow-runs/{id}/cancel", tag = "flows",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "Canceled", body = Object),
        (status = 202, description = "Cancel asked; the run stops at its next step (a running image job is canceled)", body = Object),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn cancel_run(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned_run(&state, &principal, &id).await?;
    let view = run_view(&row);
    if is_finished(&view) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancelable",
            format!(
                "the run is already {}",
                view["status"].as_str().unwrap_or("finished")
            ),
        ));
    }
    state.store().request_flow_cancel(&id).await?;
    let token = state.flows().cancel_token(&id);
    if let Some(token) = token {
        token.cancel();
    }
    // Give a run between steps a moment to stop.
    for _ in 0..40 {
        let row = owned_run(&state, &principal, &id).await?;
        if is_finished(&run_view(&row)) {
            return Ok((StatusCode::OK, Json(run_view(&row))).into_response());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let row = owned_run(&state, &principal, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&row))).into_response())
}

#[utoipa::path(get, path = "/v1/flow-runs/{id}/events", tag = "flows",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "Server-Sent Events: `status` (the whole run record) first, \
        then `run_started`, `step_started`, `step_progress`, `step_log`, `step_finished`, \
        `run_finished` as they happen, and the final record as `status`; the stream ends \
        when the run finishes", content_type = "text/event-stream")),
    security(("bearer" = [])))]
pub(super) async fn run_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading the record, so nothing is missed between.
    let events = state.flows().subscribe();
    let first = run_view(&owned_run(&state, &principal, &id).await?);
    struct S {
        state: AppState,
        id: String,
        events: broadcast::Receiver<FlowEvent>,
        first: Option<Value>,
        done: bool,
    }
    let start = S {
        state,
        id,
        events,
        first: Some(first),
        done: false,
    };
    let status_event = |v: &Value| {
        Event::default()
            .event("status")
            .json_data(v)
            .unwrap_or_else(|_| Event::default().event("status"))
    };
    let stream = futures_util::stream::unfold(start, move |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(first) = s.first.take() {
            s.done = is_finished(&first);
            return Some((Ok(status_event(&first)), s));
        }
        loop {
            if s.state.is_shutting_down() {
                return None;
            }
            let next = tokio::time::timeout(Duration::from_secs(1), s.events.recv()).await;
            let reload = match next {
                // No event for a while: the run may have finished unseen.
                Err(_) => true,
                Ok(Ok(event)) if run_id_of(&event) == s.id => {
                    if matches!(event, FlowEvent::RunFinished { .. }) {
                        true
                    } else {
                        let e = Event::default()
                            .event(event.name())
                            .json_data(&event)
                            .unwrap_or_else(|_| Event::default().event(event.name()));
                        return Some((Ok(e), s));
                    }
                }
                Ok(Ok(_)) => false,
                Ok(Err(RecvError::Lagged(_))) => true,
                Ok(Err(RecvError::Closed)) => return None,
            };
            if reload {
                match s.state.store().flow_run(&s.id).await {
                    Ok(Some(row)) => {
                        let view = run_view(&row);
                        if is_finished(&view) {
                            s.done = true;
                            return Some((Ok(status_event(&view)), s));
                        }
                    }
                    _ => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn run_id_of(event: &FlowEvent) -> &str {
    match event {
        FlowEvent::RunStarted { run_id, .. }
        | FlowEvent::StepStarted { run_id, .. }
        | FlowEvent::StepProgress { run_id, .. }
        | FlowEvent::StepLog { run_id, .. }
        | FlowEvent::StepFinished { run_id, .. }
        | FlowEvent::RunFinished { run_id, .. } => run_id,
    }
}
