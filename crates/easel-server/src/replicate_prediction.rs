//! Replicate's prediction object, built from a job's row and record: what
//! `GET /v1/predictions/{id}` answers ([`crate::routes::replicate`]) and what
//! the webhooks of a prediction carry ([`crate::jobs::queue_webhook`]), so
//! that a webhook body is the GET body at the moment of the event, as
//! Replicate documents ("the request body is a prediction object ... the
//! same structure as the object returned by the get a prediction API").
//!
//! Jobs created through the Replicate routes have `source` `replicate`
//! ([`is_prediction`]); their stored request is `{model, version,
//! easel_model, input, logs}`. Any other job is shown as `easel/MODEL` with
//! its native request as `input`.

use serde::Serialize;
use serde_json::Value;

use crate::job::JobStatus;
use crate::store::GenerationRow;
use crate::submit::Source;
use crate::views::GenerationRecord;

/// Whether job `row` was created through the Replicate routes (its
/// webhooks then carry the prediction object, signed the Standard Webhooks
/// way: [`crate::webhooks`]).
pub fn is_prediction(row: &GenerationRow) -> bool {
    row.source == Source::Replicate.as_str()
}

/// A prediction (Replicate's prediction object).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Prediction {
    /// The job id.
    pub id: String,
    /// `owner/name` as asked (`easel/MODEL` for native jobs).
    pub model: String,
    /// The easel model that ran.
    pub version: String,
    /// The input as given (inline images abbreviated).
    #[schema(value_type = Object)]
    pub input: Value,
    /// `starting`, `processing`, `succeeded`, `failed` or `canceled`.
    pub status: String,
    /// The file URLs of the images, once succeeded.
    pub output: Option<Vec<String>>,
    /// Why it failed or was canceled.
    pub error: Option<String>,
    /// What the translation and the run said, one line each.
    pub logs: String,
    /// `predict_time` (seconds from start to finish) once finished.
    #[schema(value_type = Object)]
    pub metrics: Value,
    /// ISO 8601.
    pub created_at: String,
    /// ISO 8601, once started.
    pub started_at: Option<String>,
    /// ISO 8601, once finished.
    pub completed_at: Option<String>,
    /// `source`: always `api`.
    pub source: String,
    /// `get`, `cancel` and `web` (the native record).
    #[schema(value_type = Object)]
    pub urls: Value,
}

/// The prediction of job `row` with record `record` (loaded with base URL
/// `base`, which also prefixes `urls`). `waited_out`: a `Prefer: wait`
/// ended before the job did, so an unfinished job reads `starting` (as
/// Replicate answers then; its client polls).
pub fn prediction(
    row: &GenerationRow,
    record: &GenerationRecord,
    base: &str,
    waited_out: bool,
) -> Prediction {
    let stored: Value = serde_json::from_str(&row.request_json).unwrap_or_default();
    let ours = is_prediction(row);
    let status = match record.status {
        _ if waited_out && !record.status.is_terminal() => "starting",
        JobStatus::Queued => "starting",
        JobStatus::Running => "processing",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Canceled => "canceled",
    };
    let mut logs: Vec<String> = if ours {
        stored["logs"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if let Some(p) = &record.progress {
        logs.push(format!(
            "{}: image {}/{}",
            p.stage, p.images_done, p.images_total
        ));
    }
    let predict_time = match (row.started_at, row.finished_at) {
        (Some(s), Some(f)) if f >= s => {
            serde_json::json!({"predict_time": (f - s) as f64 / 1000.0})
        }
        _ => serde_json::json!({}),
    };
    let id = &record.id;
    Prediction {
        id: id.clone(),
        model: if ours {
            stored["model"].as_str().unwrap_or_default().to_string()
        } else {
            format!("easel/{}", row.primary_model)
        },
        version: stored["easel_model"]
            .as_str()
            .filter(|_| ours)
            .unwrap_or(&row.primary_model)
            .to_string(),
        input: if ours {
            stored["input"].clone()
        } else {
            stored
        },
        status: status.into(),
        output: (record.status == JobStatus::Succeeded)
            .then(|| record.assets.iter().map(|a| a.file_url.clone()).collect()),
        error: record.error.as_ref().map(|e| e.message.clone()),
        logs: logs.join("\n"),
        metrics: predict_time,
        created_at: record.created_at.clone(),
        started_at: record.started_at.clone(),
        completed_at: record.finished_at.clone(),
        source: "api".into(),
        urls: serde_json::json!({
            "get": format!("{base}/v1/predictions/{id}"),
            "cancel": format!("{base}/v1/predictions/{id}/cancel"),
            "web": format!("{base}/v1/generations/{id}"),
        }),
    }
}
