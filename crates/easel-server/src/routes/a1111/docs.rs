//! OpenAPI documentation types of the AUTOMATIC1111 routes: the request
//! fields easel reads with their ranges, and the answers' shapes. The
//! handlers read the raw JSON ([`super::request`]); these only document it.
//! Every field may be null (the web UI's pydantic fields are optional);
//! fields not listed are ignored.
#![allow(dead_code)]

use serde::Serialize;
use utoipa::ToSchema;

/// `POST /sdapi/v1/txt2img`: the fields easel reads (see docs/API.md for
/// every field and what it maps to).
#[derive(Serialize, ToSchema)]
pub struct Txt2ImgRequest {
    /// What to draw; `<lora:NAME:WEIGHT>` tags apply LoRAs.
    pub prompt: Option<String>,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// -1 = random (default).
    #[schema(minimum = -1)]
    pub seed: Option<i64>,
    /// Denoising steps. Default 50.
    #[schema(minimum = 1, maximum = 60)]
    pub steps: Option<i64>,
    /// Guidance scale. Default 7.
    #[schema(minimum = 0, maximum = 30)]
    pub cfg_scale: Option<f64>,
    /// Width, a multiple of 8 (16 for FLUX). Default 512.
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub width: Option<i64>,
    /// Height, a multiple of 8 (16 for FLUX). Default 512.
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub height: Option<i64>,
    /// Images per iteration. Default 1.
    #[schema(minimum = 1, maximum = 8)]
    pub batch_size: Option<i64>,
    /// Iterations (batch count). Default 1.
    #[schema(minimum = 1, maximum = 100)]
    pub n_iter: Option<i64>,
    /// A sampler of GET /sdapi/v1/samplers. Default `Euler`.
    pub sampler_name: Option<String>,
    /// Older name of `sampler_name`.
    pub sampler_index: Option<String>,
    /// `automatic`, `karras` (DPM++ 2M) or `simple` (flow models).
    pub scheduler: Option<String>,
    /// Seamless tiling.
    pub tiling: Option<bool>,
    /// Must be false.
    pub restore_faces: Option<bool>,
    /// Must be false.
    pub enable_hr: Option<bool>,
    /// `{sd_model_checkpoint: TITLE}` (and the settings of GET /sdapi/v1/options at their values).
    pub override_settings: Option<serde_json::Map<String, serde_json::Value>>,
    /// False: answer no images (the job and its files exist).
    pub send_images: Option<bool>,
}

/// `POST /sdapi/v1/img2img`: the txt2img fields (less hires. fix) and the
/// init image.
#[derive(Serialize, ToSchema)]
pub struct Img2ImgRequest {
    /// One init image: base64, with or without a `data:` prefix.
    #[schema(min_items = 1, max_items = 1)]
    pub init_images: Vec<String>,
    /// How much of the init image is replaced. Default 0.75.
    #[schema(minimum = 0, maximum = 1)]
    pub denoising_strength: Option<f64>,
    /// Inpainting mask (white repaints), base64; needs `mask_blur: 0`,
    /// `inpainting_fill: 1`, `inpaint_full_res: false`.
    pub mask: Option<String>,
    /// What to draw; `<lora:NAME:WEIGHT>` tags apply LoRAs.
    pub prompt: Option<String>,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// -1 = random (default).
    #[schema(minimum = -1)]
    pub seed: Option<i64>,
    /// Denoising steps. Default 50.
    #[schema(minimum = 1, maximum = 60)]
    pub steps: Option<i64>,
    /// Guidance scale. Default 7.
    #[schema(minimum = 0, maximum = 30)]
    pub cfg_scale: Option<f64>,
    /// Width, a multiple of 8 (16 for FLUX). Default 512.
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub width: Option<i64>,
    /// Height, a multiple of 8 (16 for FLUX). Default 512.
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub height: Option<i64>,
    /// Images per iteration. Default 1.
    #[schema(minimum = 1, maximum = 8)]
    pub batch_size: Option<i64>,
    /// Iterations (batch count). Default 1.
    #[schema(minimum = 1, maximum = 100)]
    pub n_iter: Option<i64>,
    /// A sampler of GET /sdapi/v1/samplers. Default `Euler`.
    pub sampler_name: Option<String>,
    /// `automatic`, `karras` (DPM++ 2M) or `simple` (flow models).
    pub scheduler: Option<String>,
    /// `{sd_model_checkpoint: TITLE}`.
    pub override_settings: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The answer of txt2img / img2img.
#[derive(Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Base64 PNGs (with their `parameters` text chunk).
    pub images: Vec<String>,
    /// The request as received (init images left out).
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// A JSON string: `{prompt, seed, all_seeds, infotexts, ...}`.
    pub info: String,
}

/// A model of `GET /sdapi/v1/sd-models`.
#[derive(Serialize, ToSchema)]
pub struct SdModel {
    /// The easel model id (what `sd_model_checkpoint` takes).
    pub title: String,
    /// The same id.
    pub model_name: String,
    /// Always null.
    pub hash: Option<String>,
    /// Always null.
    pub sha256: Option<String>,
    /// The same id.
    pub filename: String,
    /// Always null.
    pub config: Option<String>,
}

/// A sampler of `GET /sdapi/v1/samplers`.
#[derive(Serialize, ToSchema)]
pub struct SamplerItem {
    /// The web UI's name.
    pub name: String,
    /// Other names accepted.
    pub aliases: Vec<String>,
    /// `{scheduler: karras}` for the legacy combined names.
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// A schedule type of `GET /sdapi/v1/schedulers`.
#[derive(Serialize, ToSchema)]
pub struct SchedulerItem {
    /// `automatic`, `karras` or `simple`.
    pub name: String,
    /// Its label.
    pub label: String,
    /// Always null.
    pub aliases: Option<Vec<String>>,
    /// 7 for karras, else -1.
    pub default_rho: f64,
    /// Always false.
    pub need_inner_model: bool,
}

/// A LoRA of `GET /sdapi/v1/loras`.
#[derive(Serialize, ToSchema)]
pub struct LoraItem {
    /// What `<lora:NAME:WEIGHT>` takes.
    pub name: String,
    /// The same name.
    pub alias: String,
    /// The same name.
    pub path: String,
    /// Always `{}`.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `GET /sdapi/v1/progress`.
#[derive(Serialize, ToSchema)]
pub struct ProgressResponse {
    /// 0..1 over the running job's images and steps.
    pub progress: f64,
    /// Seconds left, estimated.
    pub eta_relative: f64,
    /// `{job, job_count, job_no, sampling_step, sampling_steps, interrupted, ...}`.
    pub state: serde_json::Map<String, serde_json::Value>,
    /// Always null.
    pub current_image: Option<String>,
    /// The running job's stage, or null.
    pub textinfo: Option<String>,
}

/// The web UI's error body: `{error, detail, body, errors}` (+ easel's `field`).
#[derive(Serialize, ToSchema)]
pub struct HttpError {
    /// `HTTPException`.
    pub error: String,
    /// What is wrong.
    pub detail: String,
    /// Empty.
    pub body: String,
    /// `STATUS: detail`.
    pub errors: String,
    /// The request field at fault, or null.
    pub field: Option<String>,
}

/// FastAPI's validation error: `{detail: [{loc, msg, type}]}`; some
/// 422s (a body that is not a JSON object) are [`HttpError`]s.
#[derive(Serialize, ToSchema)]
pub struct ValidationError {
    /// The problems: `loc` = `["body", FIELD, ...]`.
    pub detail: serde_json::Value,
}

/// `POST /sdapi/v1/png-info`.
#[derive(Serialize, ToSchema)]
pub struct PngInfoRequest {
    /// A base64 PNG, or a `data:image/png;base64,...` URI.
    #[schema(min_length = 1)]
    pub image: String,
}

/// The answer of `POST /sdapi/v1/png-info`.
#[derive(Serialize, ToSchema)]
pub struct PngInfoResponse {
    /// The `parameters` text chunk ("" when there is none).
    pub info: String,
    /// The other text chunks, by keyword.
    #[schema(value_type = Object)]
    pub items: serde_json::Value,
    /// `info` read as the web UI reads it: `Prompt`, `Negative prompt`,
    /// and each `Key: value` of its last line (strings; `Size-1`, `Size-2`).
    #[schema(value_type = Object)]
    pub parameters: serde_json::Value,
}

/// An upscaler of `GET /sdapi/v1/upscalers` (easel lists none).
#[derive(Serialize, ToSchema)]
pub struct UpscalerItem {
    /// Name.
    pub name: String,
    /// Model name.
    pub model_name: Option<String>,
    /// Model path.
    pub model_path: Option<String>,
    /// Model URL.
    pub model_url: Option<String>,
    /// Scale factor.
    pub scale: Option<f64>,
}

/// The answer of `GET /sdapi/v1/scripts`.
#[derive(Serialize, ToSchema)]
pub struct ScriptsList {
    /// Scripts of txt2img (none in easel).
    pub txt2img: Vec<String>,
    /// Scripts of img2img (none in easel).
    pub img2img: Vec<String>,
}
