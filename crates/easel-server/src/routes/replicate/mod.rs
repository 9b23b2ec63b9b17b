//! Replicate-style predictions: `POST /v1/predictions`,
//! `POST /v1/models/{owner}/{name}/predictions`, `GET /v1/predictions`,
//! `GET /v1/predictions/{id}` and `POST /v1/predictions/{id}/cancel`, in the
//! shapes of Replicate's HTTP API (its "Predictions" reference), so that
//! the official `replicate` client works with its base URL pointed here.
//!
//! A prediction IS a native generation job: the prediction id is the job
//! id, the job appears in `GET /v1/generations` and the web UI (source
//! `replicate`) and is billed per image like any other. The input is the
//! flux-dev-lora schema ([`input::FIELDS`]); `{owner}/{name}` and `version`
//! pick the model ([`input::route_target`]).
//!
//! - `Prefer: wait` holds the create call until the job finishes, up to 60
//!   s (Replicate's maximum) or `max_wait_seconds` if lower; `Prefer:
//!   wait=N` up to N seconds. A job still running when the wait ends is
//!   reported `starting` in that answer (as Replicate does; the client
//!   then polls).
//! - Status: queued = `starting`, running = `processing`, then
//!   `succeeded`, `failed`, `canceled`.
//! - `webhook` + `webhook_events_filter` (`start`, `output`, `logs`,
//!   `completed`; default all) become the job's webhook events
//!   (`output`/`logs` = the native `progress` events). Each delivery's body
//!   is the prediction object as `GET /v1/predictions/{id}` answers it at
//!   that moment ([`crate::replicate_prediction`]), signed the Standard
//!   Webhooks way with the key's secret of `GET /v1/webhooks/default/secret`
//!   ([`crate::webhooks`]).
//!
//! Errors are RFC 7807 problem details as Replicate answers them and its
//! client parses (`ReplicateError.from_response` reads `title`, `detail`,
//! `status`): `{"title", "detail", "status", "invalid_fields": [{"type",
//! "field", "description"}]}` with `Content-Type: application/problem+json`.

pub mod input;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::http::{ApiQuery, BaseUrl, RawBody};
use crate::jobs::{cancel_job, load_record, wait_for};
pub use crate::replicate_error::{is_replicate_path, ReplicateError};
use crate::replicate_prediction::prediction;
pub use crate::replicate_prediction::Prediction;
use crate::submit::{body_hash, commit, prepare, Source};
use crate::AppState;

/// The longest `Prefer: wait` Replicate honours, seconds.
pub const MAX_PREFER_WAIT: u64 = 60;
/// Predictions per page of `GET /v1/predictions`.
pub const PAGE_SIZE: i64 = 100;

fn abbreviate(input: &Map<String, Value>) -> Map<String, Value> {
    let mut out = input.clone();
    for field in ["image", "mask"] {
        if let Some(Value::String(s)) = out.get(field) {
            if s.len() > 256 {
                let shown = format!(
                    "{}… ({} characters)",
                    s.chars().take(64).collect::<String>(),
                    s.len()
                );
                out.insert(field.into(), Value::String(shown));
            }
        }
    }
    out
}

async fn owned_prediction(
    state: &AppState,
    principal: &Principal,
    id: &str,
    base: &str,
    waited_out: bool,
) -> Result<Prediction, ReplicateError> {
    let not_found = || {
        ReplicateError::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("no prediction `{id}`"),
        )
    };
    let row = state
        .store()
        .generation(id)
        .await?
        .filter(|g| g.key_id == principal.key_id)
        .ok_or_else(not_found)?;
    let record = load_record(state, id, base).await?.ok_or_else(not_found)?;
    Ok(prediction(&row, &record, base, waited_out))
}

/// The seconds a `Prefer` header asks to wait: `wait` = 60, `wait=N`;
/// both capped at 60 and at `max` ([`crate::http::prefer_wait`]).
pub fn prefer_wait(headers: &HeaderMap, max: u64) -> Option<u64> {
    crate::http::prefer_wait(headers, max.min(MAX_PREFER_WAIT), Some(MAX_PREFER_WAIT))
}

/// The body of `POST /v1/predictions` (the models route takes the same
/// without `version`).
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictionRequest {
    /// `owner/name` or `owner/name:id` picks the model as the models route
    /// does; any other value (a version id) means flux-dev-lora.
    #[serde(default)]
    pub version: Option<String>,
    /// The model's input (see the field table in docs/API.md).
    #[schema(value_type = Object)]
    pub input: Map<String, Value>,
    /// An `http(s)` URL for webhook events.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Older form: a URL that gets the `completed` event.
    #[serde(default)]
    pub webhook_completed: Option<String>,
    /// Of `start`, `output`, `logs`, `completed`. Default: all four with
    /// `webhook`, `completed` with `webhook_completed`.
    #[serde(default)]
    pub webhook_events_filter: Option<Vec<String>>,
    /// Accepted; easel streams no output (no `urls.stream`).
    #[serde(default)]
    pub stream: Option<bool>,
}

fn parse_body(body: &[u8]) -> Result<PredictionRequest, ReplicateError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ReplicateError::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.starts_with("unknown field"))
            .unwrap_or("input")
            .to_string();
        ReplicateError::invalid(&field, message)
    })
}

/// Run `f` off the async runtime, as the other routes run model-folder
/// scans (`ModelRegistry::list` / `resolve` read the disk): picking the
/// model of a prediction scans the model folders.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicateError> + Send + 'static,
) -> Result<T, ReplicateError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ReplicateError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            format!("choosing the model failed: {e}"),
        )
    })?
}

async fn create(
    state: AppState,
    principal: Principal,
    base: String,
    headers: HeaderMap,
    (model_label, target): (String, input::Target),
    params: PredictionRequest,
    hash: String,
) -> Result<Response, ReplicateError> {
    state.check_submission_rate(&principal.key_id)?;
    let mut translated = {
        let (state, target, input) = (state.clone(), target.clone(), params.input.clone());
        off_runtime(move || input::translate(&state, &target, &input)).await?
    };
    if params.input.contains_key("disable_safety_checker") {
        translated
            .logs
            .push("disable_safety_checker: easel runs no safety checker".into());
    }
    let webhook = params.webhook.clone().or(params.webhook_completed.clone());
    let events = match (&params.webhook_events_filter, &params.webhook) {
        (Some(filter), _) => {
            let mut events: Vec<String> = Vec::new();
            for e in filter {
                let native = match e.as_str() {
                    "start" => "start",
                    "output" | "logs" => "progress",
                    "completed" => "completed",
                    other => {
                        return Err(ReplicateError::invalid(
                            "webhook_events_filter",
                            format!(
                                "unknown event `{other}` (allowed: start, output, logs, completed)"
                            ),
                        ))
                    }
                };
                if !events.iter().any(|x| x == native) {
                    events.push(native.into());
                }
            }
            Some(events)
        }
        // Replicate's default: every event; the older `webhook_completed`
        // gets only `completed`.
        (None, Some(_)) => Some(vec!["start".into(), "progress".into(), "completed".into()]),
        (None, None) => webhook.as_ref().map(|_| vec!["completed".to_string()]),
    };
    translated.request.webhook = webhook;
    translated.request.webhook_events = events;
    let record_json = serde_json::json!({
        "model": model_label,
        "version": params.version,
        "easel_model": translated.model,
        "input": abbreviate(&params.input),
        "logs": translated.logs,
    });
    let prepared = prepare(
        &state,
        &principal,
        &translated.request,
        Source::Replicate,
        record_json,
        hash,
        None,
    )
    .await?;
    let committed = commit(&state, &principal, prepared).await?;
    let id = committed.job.id.clone();
    let wait = prefer_wait(&headers, state.config().max_wait_seconds);
    let mut waited_out = false;
    if let Some(seconds) = wait {
        waited_out = !wait_for(&state, &id, seconds).await?;
    }
    let prediction = owned_prediction(&state, &principal, &id, &base, waited_out).await?;
    let mut response = (StatusCode::CREATED, Json(prediction)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/predictions/{id}")) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(seconds) = wait {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={seconds}")) {
            response.headers_mut().insert("preference-applied", v);
        }
    }
    Ok(response)
}

/// `POST /v1/predictions`.
#[utoipa::path(post, path = "/v1/predictions", tag = "replicate",
    request_body = PredictionRequest,
    params(("Prefer" = Option<String>, Header, description = "`wait` or `wait=N` (N <= 60): hold until the prediction finishes")),
    responses(
        (status = 201, description = "The prediction", body = Prediction),
        (status = 400, description = "Malformed JSON (problem+json)"),
        (status = 401, description = "No or a wrong API key (problem+json)"),
        (status = 402, description = "Credit limit reached (problem+json)"),
        (status = 403, description = "A local path outside the model roots (problem+json)"),
        (status = 404, description = "`version` names no known model (problem+json)"),
        (status = 413, description = "Body too large (problem+json)"),
        (status = 422, description = "An input field missing, unknown, of the wrong type or out of range (problem+json, `invalid_fields`)"),
        (status = 429, description = "Queue full or rate limited (problem+json)")),
    security(("bearer" = [])))]
pub async fn create_prediction(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ReplicateError> {
    let params = parse_body(&body)?;
    let version = params.version.as_deref().map(str::trim).unwrap_or_default();
    let (label, target) = match version
        .split_once(':')
        .map_or(version, |(m, _)| m)
        .split_once('/')
    {
        Some((owner, name)) => (format!("{owner}/{name}"), {
            let (st, owner, name) = (state.clone(), owner.to_string(), name.to_string());
            off_runtime(move || input::route_target(&st, &owner, &name)).await?
        }),
        None => (
            "black-forest-labs/flux-dev-lora".to_string(),
            input::Target::Flux { default: "dev" },
        ),
    };
    create(
        state,
        principal,
        base,
        headers,
        (label, target),
        params,
        body_hash(&body),
    )
    .await
}

/// `POST /v1/models/{owner}/{name}/predictions`.
#[utoipa::path(post, path = "/v1/models/{owner}/{name}/predictions", tag = "replicate",
    request_body = PredictionRequest,
    params(
        ("owner" = String, Path, description = "Any owner (`easel`, `black-forest-labs`, ...)"),
        ("name" = String, Path, description = "A model name of GET /v1/models, or flux-dev* / flux-schnell*"),
        ("Prefer" = Option<String>, Header, description = "`wait` or `wait=N` (N <= 60)")),
    responses(
        (status = 201, description = "The prediction", body = Prediction),
        (status = 400, description = "Malformed JSON (problem+json)"),
        (status = 401, description = "No or a wrong API key (problem+json)"),
        (status = 402, description = "Credit limit reached (problem+json)"),
        (status = 403, description = "A local path outside the model roots (problem+json)"),
        (status = 404, description = "No such model (problem+json)"),
        (status = 413, description = "Body too large (problem+json)"),
        (status = 422, description = "An input field missing, unknown, of the wrong type or out of range (problem+json)"),
        (status = 429, description = "Queue full or rate limited (problem+json)")),
    security(("bearer" = [])))]
pub async fn create_model_prediction(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ReplicateError> {
    let params = parse_body(&body)?;
    let target = {
        let (st, owner, name) = (state.clone(), owner.clone(), name.clone());
        off_runtime(move || input::route_target(&st, &owner, &name)).await?
    };
    let label = format!("{owner}/{name}");
    create(
        state,
        principal,
        base,
        headers,
        (label, target),
        params,
        body_hash(&body),
    )
    .await
}

/// `GET /v1/predictions/{id}`.
#[utoipa::path(get, path = "/v1/predictions/{id}", tag = "replicate",
    params(("id" = String, Path, description = "Prediction (job) id")),
    responses((status = 200, body = Prediction),
        (status = 401, description = "No or a wrong API key (problem+json)"),
        (status = 404, description = "No such prediction (problem+json)")),
    security(("bearer" = [])))]
pub async fn get_prediction(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Json<Prediction>, ReplicateError> {
    Ok(Json(
        owned_prediction(&state, &principal, &id, &base, false).await?,
    ))
}

/// Query of `GET /v1/predictions`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The `next` cursor of the previous page.
    #[param(pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// A page of predictions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PredictionPage {
    /// The URL of the next page, or null.
    pub next: Option<String>,
    /// Always null (pages go forward).
    pub previous: Option<String>,
    /// Newest first.
    pub results: Vec<Prediction>,
}

/// `GET /v1/predictions`: every job of the key, newest first, 100 a page.
#[utoipa::path(get, path = "/v1/predictions", tag = "replicate", params(ListQuery),
    responses((status = 200, body = PredictionPage),
        (status = 400, description = "A bad cursor (problem+json)"),
        (status = 401, description = "No or a wrong API key (problem+json)")),
    security(("bearer" = [])))]
pub async fn list_predictions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<PredictionPage>, ReplicateError> {
    let before = match query.cursor.as_deref() {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && c.len() <= 18)
                .ok_or_else(|| {
                    ReplicateError::new(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        format!("cursor `{c}` is not a cursor of this list (use `next` as given)"),
                    )
                })?,
        ),
    };
    let rows = state
        .store()
        .generations(&principal.key_id, None, PAGE_SIZE, before)
        .await?;
    let next = (rows.len() as i64 == PAGE_SIZE)
        .then(|| {
            rows.last()
                .map(|r| format!("{base}/v1/predictions?cursor={}", r.seq))
        })
        .flatten();
    let mut results = Vec::new();
    for row in &rows {
        if let Some(record) = load_record(&state, &row.id, &base).await? {
            results.push(prediction(row, &record, &base, false));
        }
    }
    Ok(Json(PredictionPage {
        next,
        previous: None,
        results,
    }))
}

/// `POST /v1/predictions/{id}/cancel`: the prediction, canceled (a running
/// one stops at its next step; a finished one is returned as it is).
#[utoipa::path(post, path = "/v1/predictions/{id}/cancel", tag = "replicate",
    params(("id" = String, Path, description = "Prediction (job) id")),
    responses((status = 200, body = Prediction),
        (status = 401, description = "No or a wrong API key (problem+json)"),
        (status = 404, description = "No such prediction (problem+json)")),
    security(("bearer" = [])))]
pub async fn cancel_prediction(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Json<Prediction>, ReplicateError> {
    let current = owned_prediction(&state, &principal, &id, &base, false).await?;
    if matches!(current.status.as_str(), "succeeded" | "failed" | "canceled") {
        return Ok(Json(current));
    }
    if !cancel_job(&state, &id).await? {
        wait_for(&state, &id, 10).await?;
    }
    Ok(Json(
        owned_prediction(&state, &principal, &id, &base, false).await?,
    ))
}

/// The webhook signing secret of the calling key (`replicate.webhooks.default.secret()`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookSigningSecret {
    /// `whsec_` + the base64 of the 32-byte key that signs the key's
    /// prediction webhooks (`webhook-signature`).
    pub key: String,
}

/// `GET /v1/webhooks/default/secret`: the key that signs this API key's
/// prediction webhooks, in Replicate's form; each API key has its own
/// (derived from the server's `webhook_secret`, so it changes only with it).
#[utoipa::path(get, path = "/v1/webhooks/default/secret", tag = "replicate",
    responses((status = 200, body = WebhookSigningSecret),
        (status = 401, description = "No or a wrong API key (problem+json)")),
    security(("bearer" = [])))]
pub async fn webhook_secret(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Json<WebhookSigningSecret> {
    Json(WebhookSigningSecret {
        key: crate::webhooks::prediction_secret(state.webhook_secret(), &principal.key_id),
    })
}
