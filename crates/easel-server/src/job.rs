//! What a job is made of, as stored: statuses, the resolved spec of each
//! image definition, what running it resolved, progress and errors.

use std::path::PathBuf;

use easel_core::{ImageDefinition, OutputFormat, Precision};
use easel_diffusion::loader::ModelFamily;
use serde::{Deserialize, Serialize};

/// The status of a generation job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, waiting for the worker.
    Queued,
    /// The worker is running it.
    Running,
    /// Every image definition produced its images.
    Succeeded,
    /// At least one image definition failed (images made by the others are kept).
    Failed,
    /// Canceled by the client (images made before are kept).
    Canceled,
}

impl JobStatus {
    /// The stored and serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "canceled" => JobStatus::Canceled,
            _ => return None,
        })
    }

    /// Whether the job is finished (succeeded, failed or canceled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

/// The status of one image definition of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    /// Not run yet.
    Pending,
    /// Its images are stored.
    Succeeded,
    /// It failed (see its error).
    Failed,
    /// The job was canceled before it ran.
    Canceled,
}

impl ItemStatus {
    /// The stored and serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Pending => "pending",
            ItemStatus::Succeeded => "succeeded",
            ItemStatus::Failed => "failed",
            ItemStatus::Canceled => "canceled",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ItemStatus::Pending,
            "succeeded" => ItemStatus::Succeeded,
            "failed" => ItemStatus::Failed,
            "canceled" => ItemStatus::Canceled,
            _ => return None,
        })
    }
}

/// An error recorded on a job or image definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// Stable code: `engine_error`, `unsupported`, `model_load_failed`,
    /// `lora_fetch_failed`,
    /// `interrupted`, `canceled`, `invalid_value`, ...
    pub code: String,
    /// What happened.
    pub message: String,
    /// The request field at fault (`images[1].scheduler`), if any.
    pub field: Option<String>,
}

impl JobError {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            field: None,
        }
    }
}

/// The model of an image definition, as resolved when the job was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The reference as requested (`baseModel`).
    pub reference: String,
    /// What the worker loads: a canonical local folder, or a repo id
    /// (`org/name[@revision]`) for the hub cache or a download.
    pub load: String,
    /// `_class_name` of `model_index.json`, when known before loading.
    pub pipeline_class: Option<String>,
}

impl ModelSpec {
    /// The model's family, as the engine's loader decides it from
    /// [`Self::pipeline_class`]; `None` when the class is not known before
    /// loading or is not one the engine loads (the fake engine's).
    pub fn family(&self) -> Option<ModelFamily> {
        self.pipeline_class
            .as_deref()
            .and_then(ModelFamily::from_class_name)
    }
}

/// A LoRA adapter to apply, resolved to a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Where it came from: `training:<uuid>` or the path as requested.
    pub source: String,
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Strength.
    pub scale: f64,
    /// For `loras[].url`: the resolved http(s) URL the worker downloads
    /// into `path` (the LoRA cache) before the item runs, if it is not
    /// there yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For a training: the content hash of its file in the trainings store.
    /// The worker asks the store for a local file of it before the item
    /// runs (`path` is where it was on the server that accepted the job;
    /// with an S3 store, another server's cache). Absent in jobs recorded
    /// before the asset store could be remote: `path` is then used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<String>,
}

/// An input image stored as an asset when the job was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    /// The input asset's id.
    pub asset_id: String,
    /// Its content hash (blake3, hex).
    pub hash: String,
    /// Its file extension (`png`, `jpg`, `webp`).
    pub extension: String,
}

/// One image definition of a job as the worker runs it: the merged
/// definition (with the seed filled in and image inputs replaced by asset
/// ids) plus everything resolved at acceptance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemSpec {
    /// The field path of this definition in the request (`images[0]`, or
    /// `inferencePack.images[0]` for a pack's definitions).
    pub field: String,
    /// The merged definition.
    pub definition: ImageDefinition,
    /// The model to load.
    pub model: ModelSpec,
    /// LoRA adapters (`trainingId` first, then `loras[]`).
    pub loras: Vec<LoraSpec>,
    /// Seed of image 0 (image `i` uses `seed + i`).
    pub seed: u64,
    /// Images from this definition.
    pub batch_size: u32,
    /// Explicit width (from `width` or `aspectRatio`), else the model's.
    pub width: Option<u32>,
    /// Explicit height (from `height` or `aspectRatio`), else the model's.
    pub height: Option<u32>,
    /// Image-to-image init image.
    pub image: Option<InputRef>,
    /// Inpainting mask.
    pub mask: Option<InputRef>,
}

impl ItemSpec {
    /// The seeds of the images, `seed + i` (wrapping).
    pub fn seeds(&self) -> Vec<u64> {
        (0..u64::from(self.batch_size))
            .map(|i| self.seed.wrapping_add(i))
            .collect()
    }

    /// The output format (default webp).
    pub fn output_format(&self) -> OutputFormat {
        self.definition
            .output_format
            .unwrap_or(easel_core::params::DEFAULT_OUTPUT_FORMAT)
    }

    /// The output quality (default 80).
    pub fn output_quality(&self) -> u8 {
        self.definition
            .output_quality
            .and_then(|q| u8::try_from(q).ok())
            .unwrap_or(easel_core::params::DEFAULT_OUTPUT_QUALITY)
    }
}

/// A LoRA as reported in resolved parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResolvedLora {
    /// `training:<uuid>` or the path as requested.
    pub source: String,
    /// Strength.
    pub scale: f64,
}

/// The parameters an image definition ran with: every default resolved, so
/// that any image can be regenerated exactly from its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedParameters {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt, if any.
    pub negative_prompt: Option<String>,
    /// The model as requested.
    pub base_model: String,
    /// The pipeline class that ran.
    pub pipeline: String,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Seed of image 0.
    pub seed: u64,
    /// Seed of each image.
    pub seeds: Vec<u64>,
    /// Images from this definition.
    pub batch_size: u32,
    /// Image-to-image strength, when an init image was given.
    pub strength: Option<f64>,
    /// LoRA adapters applied.
    pub loras: Vec<ResolvedLora>,
    /// Seamless tiling (circular padding) was on. Records stored before
    /// this field existed read as `false`.
    #[serde(default)]
    pub tiling: bool,
    /// Encoded format.
    #[schema(value_type = String)]
    pub output_format: OutputFormat,
    /// Quality of lossy formats.
    pub output_quality: u8,
    /// Requested precision.
    #[schema(value_type = String)]
    pub precision: Precision,
    /// The dtype the device computed in (`fp32` on the CPU).
    pub compute_precision: String,
    /// The device that computed it: `cpu`, `cuda:N` (the worker's; the
    /// fake engine reports the device as configured). Records stored
    /// before this field existed read as `""`.
    #[serde(default)]
    pub device: String,
}

/// What running an image definition resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// The parameters it ran with.
    pub parameters: ResolvedParameters,
    /// Things the user should know (e.g. a truncated prompt).
    pub warnings: Vec<String>,
}

/// Progress of a running job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// `loading`, `denoising`, `saving`.
    pub stage: String,
    /// Images finished and stored.
    pub images_done: u32,
    /// Images of the job.
    pub images_total: u32,
    /// The running batch covers images `first_image .. first_image + batch_images`
    /// (0-based, in job order).
    pub first_image: u32,
    /// Images in the running batch.
    pub batch_images: u32,
    /// Denoising step (1-based) of the running batch, 0 before the first.
    pub step: u32,
    /// Denoising steps of the running batch.
    pub steps: u32,
}

/// Something that happened to a job, broadcast to SSE streams and waiters.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The job's status changed.
    Status {
        /// The job.
        id: String,
        /// Its new status.
        status: JobStatus,
    },
    /// A running job progressed.
    Progress {
        /// The job.
        id: String,
        /// Where it is.
        progress: Progress,
    },
}

impl JobEvent {
    /// The job this event is about.
    pub fn id(&self) -> &str {
        match self {
            JobEvent::Status { id, .. } | JobEvent::Progress { id, .. } => id,
        }
    }
}
