//! The JSON records the API returns: jobs, image definitions, assets,
//! trainings, packs, usage.
//!
//! Records use snake_case keys (`file_url`, `created_at`), as the asset
//! records of the workflow step they replace; parameter objects echo the
//! request's camelCase names.

use easel_core::ImageDefinition;
use serde::Serialize;
use utoipa::ToSchema;

use crate::job::{ItemStatus, JobError, JobStatus, Progress, ResolvedParameters};
use crate::store::{AssetRow, GenerationRow, ItemRow, PackRow, TrainingRow};
use crate::util::{rfc3339, usd};

/// An asset record: a stored image and what it is.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct AssetRecord {
    /// UUID; usable as `image` / `mask` input of later requests.
    pub id: String,
    /// Always `asset`.
    pub object: String,
    /// Where to download the file (no API key needed: the URL names the
    /// content hash).
    pub file_url: String,
    /// A file name for it.
    pub file_name: String,
    /// Bytes.
    pub file_size: i64,
    /// MIME type (`image/webp`, `image/png`, `image/jpeg`).
    pub file_type: String,
    /// Pixels.
    pub width: Option<i64>,
    /// Pixels.
    pub height: Option<i64>,
    /// This image's own seed (regenerates it with the definition's parameters).
    pub seed: Option<u64>,
    /// The job that made it (or was given it as input).
    pub generation_id: Option<String>,
    /// The image definition's index in the job.
    pub image_index: Option<i64>,
    /// The image's index in its definition's batch.
    pub batch_index: Option<i64>,
    /// blake3 of the file, hex.
    pub content_hash: String,
    /// `output` or `input`.
    pub kind: String,
    /// RFC 3339.
    pub created_at: String,
}

impl AssetRecord {
    /// The record of `row`, with file URLs under `base_url`.
    pub fn new(row: &AssetRow, base_url: &str) -> Self {
        AssetRecord {
            id: row.id.clone(),
            object: "asset".into(),
            file_url: format!("{base_url}/v1/files/{}.{}", row.hash, row.extension),
            file_name: row.file_name.clone(),
            file_size: row.file_size,
            file_type: row.file_type.clone(),
            width: row.width,
            height: row.height,
            seed: row.seed,
            generation_id: row.generation_id.clone(),
            image_index: row.item_idx,
            batch_index: row.image_idx,
            content_hash: row.hash.clone(),
            kind: row.kind.clone(),
            created_at: rfc3339(row.created_at),
        }
    }
}

/// One image definition of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageResult {
    /// Index in the job (an inference pack's definitions come first).
    pub index: i64,
    /// The request field it came from (`images[0]`, `inferencePack.images[0]`).
    pub field: String,
    /// Its status.
    pub status: ItemStatus,
    /// The definition as merged from the request (image inputs replaced by asset ids).
    #[schema(value_type = Object)]
    pub requested: ImageDefinition,
    /// The seed of each image.
    pub seeds: Vec<u64>,
    /// The parameters it ran with (every default resolved), once it ran.
    pub parameters: Option<ResolvedParameters>,
    /// Its images.
    pub assets: Vec<AssetRecord>,
    /// Warnings of the run (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    /// Why it failed.
    pub error: Option<JobError>,
}

/// A job's cost.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Cost {
    /// Billed inferences (image definitions).
    pub inferences: i64,
    /// USD per inference.
    pub unit_price_usd: f64,
    /// Charged when accepted.
    pub amount_usd: f64,
    /// Refunded for definitions that did not produce images.
    pub refunded_usd: f64,
    /// `amount_usd - refunded_usd`.
    pub total_usd: f64,
}

/// Links of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobLinks {
    /// This record.
    #[serde(rename = "self")]
    pub self_: String,
    /// Server-Sent Events of its status and progress.
    pub events: String,
    /// POST to cancel.
    pub cancel: String,
    /// Its assets.
    pub assets: String,
}

/// A generation job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerationRecord {
    /// UUID.
    pub id: String,
    /// Always `generation`.
    pub object: String,
    /// `queued`, `running`, `succeeded`, `failed` or `canceled`.
    pub status: JobStatus,
    /// `native`, `openai`, `a1111` or `flow`.
    pub source: String,
    /// RFC 3339.
    pub created_at: String,
    /// When it (last) started running.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Times the worker started it (more than 1 after a restart).
    pub attempts: i64,
    /// Progress while running.
    pub progress: Option<Progress>,
    /// While queued: its place in the queue (1 = next), counting the jobs
    /// of every key accepted before it; `null` otherwise.
    pub queue_position: Option<i64>,
    /// Images finished, of `images_total`.
    pub images_done: i64,
    /// Images of the job (sum of batch sizes).
    pub images_total: i64,
    /// Per image definition: status, seeds, parameters, assets, error.
    pub images: Vec<ImageResult>,
    /// Every output asset, in order (`images[*].assets` flattened).
    pub assets: Vec<AssetRecord>,
    /// Why it failed or was canceled.
    pub error: Option<JobError>,
    /// What it costs.
    pub cost: Cost,
    /// Webhook URL, if any.
    pub webhook: Option<String>,
    /// Links.
    pub links: JobLinks,
}

impl GenerationRecord {
    /// The record of a job from its rows.
    pub fn new(g: &GenerationRow, items: &[ItemRow], assets: &[AssetRow], base_url: &str) -> Self {
        let records: Vec<AssetRecord> = assets
            .iter()
            .map(|a| AssetRecord::new(a, base_url))
            .collect();
        let images: Vec<ImageResult> = items
            .iter()
            .map(|item| ImageResult {
                index: item.idx,
                field: item.spec.field.clone(),
                status: item.status,
                requested: item.spec.definition.clone(),
                seeds: item.spec.seeds(),
                parameters: item.result.as_ref().map(|r| r.parameters.clone()),
                assets: assets
                    .iter()
                    .zip(&records)
                    .filter(|(a, _)| a.item_idx == Some(item.idx))
                    .map(|(_, r)| r.clone())
                    .collect(),
                warnings: item
                    .result
                    .as_ref()
                    .map(|r| r.warnings.clone())
                    .unwrap_or_default(),
                error: item.error.clone(),
            })
            .collect();
        let unbilled = if g.status.is_terminal() {
            items
                .iter()
                .filter(|i| i.status != ItemStatus::Succeeded)
                .count() as i64
        } else {
            0
        };
        let amount = g.inferences * g.price_micros;
        let refunded = unbilled * g.price_micros;
        let path = format!("/v1/generations/{}", g.id);
        GenerationRecord {
            id: g.id.clone(),
            object: "generation".into(),
            status: g.status,
            source: g.source.clone(),
            created_at: rfc3339(g.created_at),
            started_at: g.started_at.map(rfc3339),
            finished_at: g.finished_at.map(rfc3339),
            attempts: g.attempts,
            progress: if g.status == JobStatus::Running {
                g.progress.clone()
            } else {
                None
            },
            queue_position: None,
            images_done: assets.len() as i64,
            images_total: g.images_total,
            images,
            assets: records,
            error: g.error.clone(),
            cost: Cost {
                inferences: g.inferences,
                unit_price_usd: usd(g.price_micros),
                amount_usd: usd(amount),
                refunded_usd: usd(refunded),
                total_usd: usd(amount - refunded),
            },
            webhook: g.webhook_url.clone(),
            links: JobLinks {
                self_: format!("{base_url}{path}"),
                events: format!("{base_url}{path}/events"),
                cancel: format!("{base_url}{path}/cancel"),
                assets: format!("{base_url}/v1/assets?generation={}", g.id),
            },
        }
    }
}

/// A registered LoRA.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TrainingRecord {
    /// UUID: pass it as `trainingId`.
    pub id: String,
    /// Always `training`.
    pub object: String,
    /// A label.
    pub name: String,
    /// The base model it is for.
    pub base_model: String,
    /// Bytes.
    pub file_size: i64,
    /// blake3 of the file.
    pub content_hash: String,
    /// RFC 3339.
    pub created_at: String,
}

impl From<&TrainingRow> for TrainingRecord {
    fn from(t: &TrainingRow) -> Self {
        TrainingRecord {
            id: t.id.clone(),
            object: "training".into(),
            name: t.name.clone(),
            base_model: t.base_model.clone(),
            file_size: t.file_size,
            content_hash: t.hash.clone(),
            created_at: rfc3339(t.created_at),
        }
    }
}

/// An inference pack.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PackRecord {
    /// UUID: pass it as `inferencePackId`.
    pub id: String,
    /// Always `inference_pack`.
    pub object: String,
    /// A label.
    pub name: String,
    /// Image definitions in it.
    pub image_count: i64,
    /// The pack: `images` and request-wide defaults, as given.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    /// RFC 3339.
    pub created_at: String,
}

impl From<&PackRow> for PackRecord {
    fn from(p: &PackRow) -> Self {
        PackRecord {
            id: p.id.clone(),
            object: "inference_pack".into(),
            name: p.name.clone(),
            image_count: p.image_count,
            body: serde_json::from_str(&p.body_json).unwrap_or(serde_json::Value::Null),
            created_at: rfc3339(p.created_at),
        }
    }
}

/// A key's usage and credit.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageRecord {
    /// The key.
    pub key_id: String,
    /// USD per inference (one image definition).
    pub price_per_inference_usd: f64,
    /// Inferences charged.
    pub inferences_charged: i64,
    /// Inferences refunded (did not produce images).
    pub inferences_refunded: i64,
    /// Inferences billed (`charged - refunded`).
    pub inferences_billed: i64,
    /// Images stored.
    pub images_generated: i64,
    /// USD charged.
    pub charged_usd: f64,
    /// USD refunded.
    pub refunded_usd: f64,
    /// USD used (`charged - refunded`).
    pub used_usd: f64,
    /// The key's credit limit, if any.
    pub credit_limit_usd: Option<f64>,
    /// What is left of it.
    pub credit_remaining_usd: Option<f64>,
}

/// One entry of a key's ledger (`GET /v1/usage/ledger`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LedgerEntry {
    /// Always `ledger_entry`.
    pub object: String,
    /// The job charged or refunded.
    pub generation_id: String,
    /// `charge` (when the job was accepted) or `refund` (definitions that
    /// made no image).
    pub kind: String,
    /// Inferences (image definitions) charged or refunded.
    pub inferences: i64,
    /// USD charged or refunded (positive either way).
    pub amount_usd: f64,
    /// RFC 3339.
    pub created_at: String,
}

/// A list response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ListOf<T: ToSchema> {
    /// Always `list`.
    pub object: String,
    /// The items.
    pub data: Vec<T>,
}

impl<T: ToSchema> ListOf<T> {
    /// A list of `data`.
    pub fn new(data: Vec<T>) -> Self {
        Self {
            object: "list".into(),
            data,
        }
    }
}

// ---- request bodies (documentation types) ----------------------------------

/// The body of `POST /v1/generations` (documentation type): every image
/// field may also be given at the top level as a default for all images.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationRequestDoc {
    /// Request-wide defaults: any image field.
    #[serde(flatten)]
    pub defaults: ImageDefinition,
    /// The image definitions (at least one, unless `inferencePackId` gives some).
    pub images: Vec<ImageDefinition>,
    /// An inference pack whose definitions run first.
    pub inference_pack_id: Option<String>,
    /// An http(s) URL to POST signed events to.
    pub webhook: Option<String>,
    /// Events to send: `start`, `progress`, `completed` (default `completed`).
    pub webhook_events: Option<Vec<String>>,
}

/// The body of `POST /v1/inference-packs` (documentation type).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackRequestDoc {
    /// A label.
    pub name: String,
    /// Defaults for the pack's images: any image field.
    #[serde(flatten)]
    pub defaults: ImageDefinition,
    /// The pack's image definitions.
    pub images: Vec<ImageDefinition>,
}
