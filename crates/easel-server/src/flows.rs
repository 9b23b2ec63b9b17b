//! Flows over HTTP (issue 7): stored flow documents, durable runs, their
//! events, and the step types that need the server.
//!
//! - `POST /v1/flows` stores a document (JSON object, or JSON / JSON5 text
//!   in `document`) after validating it (every error at once, each naming
//!   the step and parameter); `GET /v1/flows`, `GET /v1/flows/{id}`,
//!   `DELETE /v1/flows/{id}`.
//! - `POST /v1/flows/{id}/runs` `{ "input": {...} }` validates the input's
//!   references, stores the run record (`pending`) and starts it on its own
//!   thread; `GET /v1/flow-runs/{id}` is the record (per step: status,
//!   times, result or error, job id), `GET /v1/flows/{id}/runs` the flow's
//!   runs, `GET /v1/flow-runs/{id}/events` Server-Sent Events (the
//!   `easel_flow::FlowEvent`s by name, then the final record as `status`),
//!   `POST /v1/flow-runs/{id}/cancel`.
//! - Durable: the record is stored at every checkpoint (run start, step
//!   start and finish, end: [`easel_flow::RunOptions::checkpoint`]); a run
//!   the process left `pending` or `running` is resumed when the server
//!   starts, keeping its finished steps. A step that was running runs
//!   again, but an image step finds the job it had submitted (its
//!   idempotency key is `flow-run:<run>:step:<index>`) and waits for it. A run keeps the document it started
//!   with, so deleting the flow does not break it. While the server stops,
//!   records are no longer written, so a run cut off by a graceful stop
//!   resumes too.
//! - Steps: `ImageGenerator` submits its request as ONE job of the run's
//!   key ([`ServerImageBackend`]: same validation, queue, credit and worker
//!   as `POST /v1/generations`, `source: flow`), waits for it, reports its
//!   progress, cancels it when the run is canceled, and returns the job's
//!   asset records; `RegisterTraining` stores a LoRA file as a training
//!   ([`RegisterTraining`]); `ObjectGenerator` uses the configured
//!   chat-completions server (`llm_url`); `Constant`, `List`, `Template`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use easel_flow::{
    CancelToken, FlowDocument, FlowEvent, FlowRun, FlowRunner, ImageBackend, ImageJobResult,
    ParamError, ParamPath, RunOptions, Step, StepContext, StepError, StepOutput, StepRegistry,
};
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{cancel_job, load_record, register_training, RawBody};
use crate::auth::{Principal, LOCAL_KEY_ID};
use crate::error::ApiError;
use crate::job::JobStatus;
use crate::store::{FlowRow, FlowRunRow};
use crate::submit::{body_hash, commit, prepare, Source};
use crate::util::{new_id, now_ms, rfc3339};
use crate::views::TrainingRecord;
use crate::{AppState, JobEvent};

/// What the flow runs of a server share: their events (for SSE) and the
/// cancel tokens of the runs executing now.
pub struct FlowsShared {
    events: broadcast::Sender<FlowEvent>,
    running: Mutex<HashMap<String, CancelToken>>,
}

impl Default for FlowsShared {
    fn default() -> Self {
        Self {
            events: broadcast::channel(4096).0,
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl FlowsShared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancelToken>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The step types of a run of `principal` on this server.
pub fn step_registry(state: &AppState, principal: &Principal) -> StepRegistry {
    let backend = Arc::new(ServerImageBackend {
        state: state.clone(),
        principal: principal.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let mut registry = StepRegistry::standard(backend, state.config().chat_config());
    registry.register(
        "RegisterTraining",
        RegisterTraining {
            state: state.clone(),
            principal: principal.clone(),
            runtime: tokio::runtime::Handle::current(),
        },
    );
    registry
}

// ---- steps ----------------------------------------------------------------

/// The [`ImageBackend`] of flow runs: each request is one job of the run's
/// key in the server's queue (see the module docs).
pub struct ServerImageBackend {
    state: AppState,
    principal: Principal,
    runtime: tokio::runtime::Handle,
}

/// A request error as a step error: `parameters.<field>: <message>`.
fn api_step_error(e: ApiError) -> StepError {
    match e.field {
        Some(f) => StepError::failed(format!("parameters.{f}: {}", e.message)),
        None => StepError::failed(e.message),
    }
}

impl ImageBackend for ServerImageBackend {
    fn check_static(&self, parameters: &Value) -> Vec<ParamError> {
        // Model folders and LoRA headers are small reads: done in place.
        match crate::checks::check_flow_request(self.state.models(), parameters) {
            Ok(()) => Vec::new(),
            Err(e) => {
                let path = match e.field.as_deref() {
                    Some(f) if !f.is_empty() => ParamPath::field(&format!("parameters.{f}")),
                    _ => ParamPath::root(),
                };
                vec![ParamError::new(path, e.message)]
            }
        }
    }

    fn generate(&self, request: Value, ctx: &StepContext<'_>) -> Result<ImageJobResult, StepError> {
        let state = &self.state;
        let bytes = serde_json::to_vec(&request).unwrap_or_default();
        let hash = body_hash(&bytes);
        // One idempotency key per run and step: a run resumed after a
        // restart finds the job its step already submitted (same request)
        // and waits for it instead of submitting the work again.
        let key = format!("flow-run:{}:step:{}", ctx.run_id(), ctx.step_index());
        let job_id = self.runtime.block_on(async {
            let existing = state
                .store()
                .generation_by_idempotency_key(&self.principal.key_id, &key)
                .await
                .map_err(|e| StepError::failed(format!("job store: {e}")))?;
            let key = match existing {
                Some(job) if job.request_hash.as_deref() == Some(hash.as_str()) => {
                    return Ok(job.id);
                }
                // Another request under this key: submit without one.
                Some(_) => None,
                None => Some(key),
            };
            let native = easel_core::NativeRequest::from_json(request.clone())
                .map_err(|e| api_step_error(ApiError::from(e)))?;
            let prepared = prepare(
                state,
                &self.principal,
                &native,
                Source::Flow,
                request,
                hash,
                key,
            )
            .await
            .map_err(api_step_error)?;
            let committed = commit(state, &self.principal, prepared)
                .await
                .map_err(api_step_error)?;
            Ok::<_, StepError>(committed.job.id)
        })?;
        ctx.log(format!("job {job_id}"));
        let mut events = state.subscribe();
        let mut canceled = false;
        loop {
            let status = self
                .runtime
                .block_on(async { state.store().generation(&job_id).await })
                .map_err(|e| StepError::failed(format!("job store: {e}")))?
                .map(|g| g.status);
            if status.is_none_or(|s| s.is_terminal()) {
                break;
            }
            if state.is_shutting_down() {
                // The worker re-queues the job; the run's stored record stays
                // `running` (checkpoints stop), so it resumes at the next start.
                return Err(StepError::failed(
                    "the server is stopping; this run resumes when it starts again",
                ));
            }
            if ctx.is_canceled() && !canceled {
                canceled = true;
                let _ = self.runtime.block_on(cancel_job(state, &job_id));
            }
            let next = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(250), events.recv()).await
            });
            if let Ok(Ok(JobEvent::Progress { id, progress })) = next {
                if id == job_id {
                    // done / total in images; the message adds the
                    // denoising step of the batch running now.
                    let note = format!(
                        "{} of {} images done; {} step {}/{}",
                        progress.images_done,
                        progress.images_total,
                        progress.stage,
                        progress.step,
                        progress.steps
                    );
                    ctx.progress(
                        u64::from(progress.images_done),
                        u64::from(progress.images_total),
                        Some(&note),
                    );
                }
            }
        }
        let record = self
            .runtime
            .block_on(async { load_record(state, &job_id, &state.default_base_url()).await })
            .map_err(|e| StepError::failed(format!("job store: {e}")))?
            .ok_or_else(|| StepError::failed(format!("job {job_id} vanished")))?;
        match record.status {
            JobStatus::Succeeded => {
                let assets = record
                    .assets
                    .iter()
                    .map(|a| {
                        serde_json::to_value(a)
                            .and_then(serde_json::from_value)
                            .map_err(|e| StepError::failed(format!("asset record: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ImageJobResult { job_id, assets })
            }
            JobStatus::Canceled if canceled || ctx.is_canceled() => Err(StepError::canceled()),
            status => {
                let why = record
                    .error
                    .map(|e| match e.field {
                        Some(f) => format!("parameters.{f}: {}", e.message),
                        None => e.message,
                    })
                    .unwrap_or_default();
                Err(StepError::failed(format!(
                    "job {job_id} {}: {why}",
                    status.as_str()
                )))
            }
        }
    }
}

/// `RegisterTraining`: store a LoRA file as a training of the run's key and
/// return its record (`{ id, name, base_model, ... }`), so later steps use
/// `trainingId: '$.results.<step>.id'` (the `myTrainingStep` of the
/// ImageGenerator seed document's trained-model flow).
///
/// Parameters: `file` (a local `.safetensors` path under the server's model
/// roots, as `loras[].path`), `baseModel` (the model it is for; must
/// resolve), `name` (optional).
pub struct RegisterTraining {
    state: AppState,
    principal: Principal,
    runtime: tokio::runtime::Handle,
}

impl Step for RegisterTraining {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let root = ParamPath::root();
        let Some(map) = parameters.as_object() else {
            return Err(vec![ParamError::new(
                root,
                "must be an object with `file` and `baseModel`",
            )]);
        };
        let mut errors = Vec::new();
        for key in map.keys() {
            if !matches!(key.as_str(), "file" | "baseModel" | "name") {
                errors.push(ParamError::new(
                    root.key(key),
                    "unknown parameter (allowed: file, baseModel, name)",
                ));
            }
        }
        for key in ["file", "baseModel"] {
            match map.get(key) {
                None => errors.push(ParamError::new(root.key(key), "missing")),
                Some(v) if !v.is_string() && !easel_flow::is_dynamic(v) => {
                    errors.push(ParamError::new(root.key(key), "must be a string"))
                }
                Some(_) => {}
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors),
        }
    }

    fn run(&self, parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let text = |key: &str| -> Result<Option<String>, StepError> {
            match parameters.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(StepError::failed(format!(
                    "parameters.{key}: must be a string"
                ))),
            }
        };
        let file = text("file")?.ok_or_else(|| StepError::failed("parameters.file: missing"))?;
        let base_model =
            text("baseModel")?.ok_or_else(|| StepError::failed("parameters.baseModel: missing"))?;
        let path = self
            .state
            .models()
            .check_path(&file)
            .map_err(|e| StepError::failed(format!("parameters.file: {e}")))?;
        if !path.is_file() || path.extension().is_none_or(|e| e != "safetensors") {
            return Err(StepError::failed(format!(
                "parameters.file: `{file}` is not a .safetensors file"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            StepError::failed(format!("parameters.file: cannot read `{file}`: {e}"))
        })?;
        let name =
            text("name")?.or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()));
        let row = self
            .runtime
            .block_on(register_training(
                &self.state,
                &self.principal,
                bytes,
                name,
                base_model,
            ))
            .map_err(|e| {
                let field = match e.field.as_deref() {
                    Some("baseModel") => "baseModel",
                    _ => "file",
                };
                StepError::failed(format!("parameters.{field}: {}", e.message))
            })?;
        let record = serde_json::to_value(TrainingRecord::from(&row))
            .map_err(|e| StepError::failed(e.to_string()))?;
        Ok(record.into())
    }
}

// ---- running -----------------------------------------------------------------

/// The principal a stored run acts as (its key; `local` without auth).
async fn principal_of(state: &AppState, key_id: &str) -> Result<Principal, ApiError> {
    if key_id == LOCAL_KEY_ID {
        return Ok(Principal {
            key_id: key_id.to_string(),
            credit_limit_micros: None,
        });
    }
    let key = state.store().key(key_id).await?;
    Ok(Principal {
        key_id: key_id.to_string(),
        credit_limit_micros: key.and_then(|k| k.credit_limit_micros),
    })
}

/// Execute a stored run on its own thread, storing its record at every
/// checkpoint. Must be called inside the tokio runtime.
fn spawn_run(
    state: AppState,
    principal: Principal,
    flow: FlowDocument,
    mut run: FlowRun,
    cancel_requested: bool,
) {
    let runtime = tokio::runtime::Handle::current();
    let registry = step_registry(&state, &principal);
    let cancel = CancelToken::new();
    if cancel_requested {
        cancel.cancel();
    }
    state
        .flows()
        .running()
        .insert(run.id.clone(), cancel.clone());
    let store_state = state.clone();
    let store_runtime = runtime.clone();
    let checkpoint = move |record: &FlowRun| {
        // While stopping, keep the last stored record (`running`), so the
        // next start resumes the run instead of seeing it failed.
        if store_state.is_shutting_down() {
            return;
        }
        let text = serde_json::to_string(record).unwrap_or_else(|_| "{}".into());
        let status = status_name(record);
        let stored = store_runtime.block_on(
            store_state
                .store()
                .update_flow_run(&record.id, &status, &text),
        );
        if let Err(e) = stored {
            tracing::error!("flow run {}: storing the record failed: {e}", record.id);
        }
    };
    let events = state.flows().events.clone();
    let options = RunOptions {
        run_id: Some(run.id.clone()),
        flow_id: run.flow_id.clone(),
        cancel,
        events: Some(Arc::new(move |e: &FlowEvent| {
            let _ = events.send(e.clone());
        })),
        checkpoint: Some(Arc::new(checkpoint)),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("flow-{}", run.id))
        .spawn(move || {
            FlowRunner::new(registry).execute(&flow, &mut run, &options);
            state.flows().running().remove(&run.id);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a flow run thread: {e}");
    }
}

/// The record's status as stored (`pending`, `running`, ...).
fn status_name(run: &FlowRun) -> String {
    serde_json::to_value(run.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "running".into())
}

/// Resume the runs a previous process left `pending` or `running` (see the
/// module docs). Called once when the server starts.
pub async fn resume_unfinished(state: &AppState) {
    let rows = match state.store().unfinished_flow_runs().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!("cannot list unfinished flow runs: {e}");
            return;
        }
    };
    for row in rows {
        let parsed = serde_json::from_str::<FlowRun>(&row.record_json)
            .map_err(|e| e.to_string())
            .and_then(|run| {
                FlowDocument::parse(&row.document)
                    .map(|flow| (flow, run))
                    .map_err(|e| e.to_string())
            });
        let principal = principal_of(state, &row.key_id).await;
        match (parsed, principal) {
            (Ok((flow, run)), Ok(principal)) => {
                tracing::warn!("resuming flow run {} after a restart", row.id);
                spawn_run(state.clone(), principal, flow, run, row.cancel_requested);
            }
            (Err(e), _) => tracing::error!("flow run {} cannot resume: {e}", row.id),
            (_, Err(e)) => tracing::error!("flow run {} cannot resume: {}", row.id, e.message),
        }
    }
}

// ---- views -----------------------------------------------------------------

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

// ---- handlers ---------------------------------------------------------------

/// The flow routes (behind the API-key middleware).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/flows", post(create_flow).get(list_flows))
        .route("/v1/flows/{id}", get(get_flow).delete(delete_flow))
        .route("/v1/flows/{id}/runs", post(create_run).get(list_runs))
        .route("/v1/flow-runs/{id}", get(get_run))
        .route("/v1/flow-runs/{id}/events", get(run_events))
        .route("/v1/flow-runs/{id}/cancel", post(cancel_run))
}

fn invalid_json(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("the body is not valid JSON: {e}"),
    )
}

/// 422 `invalid_flow` listing every problem.
fn flow_error(message: String) -> ApiError {
    ApiError::invalid("invalid_flow", "document", message)
}

#[utoipa::path(post, path = "/v1/flows", tag = "flows",
    request_body(content = Object, description = "A flow document `{ name?, steps: [...] }`, \
        or `{ \"document\": \"<JSON or JSON5 text>\" }`"),
    responses((status = 201, body = FlowRecord),
        (status = 422, description = "Invalid flow: every problem, each naming the step and parameter", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn create_flow(
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
    responses((status = 200, body = crate::views::ListOf<FlowRecord>)), security(("bearer" = [])))]
async fn list_flows(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<crate::views::ListOf<FlowRecord>>, ApiError> {
    let rows = state.store().flows(&principal.key_id).await?;
    Ok(Json(crate::views::ListOf::new(
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
    responses((status = 200, body = FlowRecord), (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn get_flow(
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
        (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn delete_flow(
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
        (status = 404, body = crate::error::ErrorBody),
        (status = 422, description = "The input does not fit the flow's references, or a step cannot run here", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn create_run(
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
async fn list_runs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    crate::api::ApiQuery(query): crate::api::ApiQuery<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = crate::api::list_limit(query.limit, 20, 1..=100)?;
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
        (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn get_run(
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
        (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "Already finished", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
async fn cancel_run(
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
    let token = state.flows().running().get(&id).cloned();
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
async fn run_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading the record, so nothing is missed between.
    let events = state.flows().events.subscribe();
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
