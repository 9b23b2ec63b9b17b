//! OpenAI Images compatibility: `POST /v1/images/generations` (JSON) and
//! `POST /v1/images/edits` (multipart), in the request shapes the official
//! client libraries send. Each call becomes a native job (one image
//! definition per image, billed as such) and waits for it (up to
//! `max_wait_seconds`), then answers `{"created", "data": [{"url" |
//! "b64_json", "revised_prompt"}], ...}`.
//!
//! Fields:
//! - `model`: an easel model reference; OpenAI names (`dall-e-2`,
//!   `dall-e-3`, `gpt-image-*`) or none use the config's `default_model`.
//! - `n` (1..=10), `size` (`WxH` or `auto` = the model's native size).
//! - `response_format`: `url` | `b64_json`; default `b64_json` for
//!   `gpt-image-*` models (as OpenAI), else `url`.
//! - `output_format` (`png` default, `jpeg`, `webp`) and
//!   `output_compression` (0..=100, the lossy quality; default 100).
//! - `background`: `auto` and `opaque` are accepted; `transparent` is a 400
//!   (diffusion models draw no alpha channel).
//! - `quality` (`auto`, `low`, `medium`, `high`, `standard`, `hd`), `style`,
//!   `moderation` (`auto`, `low`), `user`, `input_fidelity`: accepted and
//!   recorded; they change nothing (easel runs no moderation; use the native
//!   API's `steps` for quality).
//! - Edits: `image` (or `image[]`, one image) and optional `mask`. A mask
//!   with an alpha channel follows OpenAI (transparent = repaint); one
//!   without alpha follows easel (white = repaint). Without a mask the
//!   edit is image-to-image at strength 0.8.
//!
//! Errors use OpenAI's shape, with easel's fields too:
//! `{"error": {"message", "type", "param", "code", "field"}}`.

use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use easel_core::{ImageDefinition, NativeRequest, OutputFormat};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::error_shape::OpenAiError;
use crate::http::{body_error, BaseUrl, RawBody};
use crate::job::JobStatus;
use crate::jobs::wait_for_record;
use crate::submit::{body_hash, commit, prepare, Source};
use crate::AppState;

fn bad(param: &str, message: impl Into<String>) -> OpenAiError {
    OpenAiError(ApiError::new(StatusCode::BAD_REQUEST, "invalid_value", message).with_field(param))
}

/// The fields of an OpenAI image request.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    /// What to draw.
    pub prompt: String,
    /// An easel model, or an OpenAI model name (uses `default_model`).
    #[serde(default)]
    pub model: Option<String>,
    /// Images, 1..=10. Default 1.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub n: Option<u32>,
    /// `WxH` or `auto`.
    #[serde(default)]
    pub size: Option<String>,
    /// `url` or `b64_json`.
    #[serde(default)]
    pub response_format: Option<String>,
    /// `png`, `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// 0..=100: the quality of jpeg/webp.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub output_compression: Option<u32>,
    /// `auto` or `opaque` (`transparent` is refused).
    #[serde(default)]
    pub background: Option<String>,
    /// Accepted, no effect.
    #[serde(default)]
    pub quality: Option<String>,
    /// Accepted, no effect.
    #[serde(default)]
    pub moderation: Option<String>,
    /// Accepted, no effect.
    #[serde(default)]
    pub style: Option<String>,
    /// Accepted, no effect.
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted (edits), no effect.
    #[serde(default)]
    pub input_fidelity: Option<String>,
    /// Streaming is not supported: must be absent or false.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming is not supported: must be absent or 0.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub partial_images: Option<u32>,
}

/// What the request asks besides the native fields.
struct Translated {
    request: NativeRequest,
    b64: bool,
    format: OutputFormat,
}

fn is_openai_model(m: &str) -> bool {
    let m = m.trim().to_ascii_lowercase();
    m.starts_with("dall-e") || m.starts_with("gpt-image") || m.starts_with("chatgpt-image")
}

fn translate(
    state: &AppState,
    r: &ImagesRequest,
    image: Option<String>,
    mask: Option<String>,
) -> Result<Translated, OpenAiError> {
    if r.stream == Some(true) || r.partial_images.unwrap_or(0) > 0 {
        return Err(bad(
            "stream",
            "streaming responses are not supported; use the native /v1/generations/{id}/events",
        ));
    }
    let model = match r.model.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        Some(m) if !is_openai_model(m) => m.to_string(),
        named => state.config().default_model.clone().ok_or_else(|| {
            bad(
                "model",
                match named {
                    Some(m) => format!(
                        "model `{m}` is an OpenAI model name and this server has no default_model \
                         to run it with: pass an easel model as `model` (GET /v1/models lists them) \
                         or set default_model in the server config"
                    ),
                    None => "missing: no `model` was given and this server has no default_model; \
                             pass an easel model as `model` (GET /v1/models lists them) or set \
                             default_model in the server config"
                        .to_string(),
                },
            )
        })?,
    };
    let n = r.n.unwrap_or(1);
    if !(1..=10).contains(&n) {
        return Err(bad("n", format!("{n} is out of range (allowed: 1 to 10)")));
    }
    let (width, height) = match r.size.as_deref().map(str::trim) {
        None | Some("auto") => (None, None),
        Some(s) => {
            let parsed = s.split_once(['x', 'X']).and_then(|(w, h)| {
                Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?))
            });
            match parsed {
                Some((w, h)) => (Some(w), Some(h)),
                None => return Err(bad("size", format!("`{s}` is not WIDTHxHEIGHT or auto"))),
            }
        }
    };
    let format = match r.output_format.as_deref() {
        None => OutputFormat::Png,
        Some(f) => f
            .parse::<OutputFormat>()
            .map_err(|e| bad("output_format", e.to_string()))?,
    };
    let quality = match r.output_compression {
        None => 100,
        Some(c) if c <= 100 => c.max(1),
        Some(c) => {
            return Err(bad(
                "output_compression",
                format!("{c} is out of range (allowed: 0 to 100)"),
            ))
        }
    };
    match r.background.as_deref() {
        None | Some("auto") | Some("opaque") => {}
        Some("transparent") => return Err(OpenAiError(
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_value",
                "transparent backgrounds are not supported: diffusion models draw no alpha channel",
            )
            .with_field("background"),
        )),
        Some(other) => {
            return Err(bad(
                "background",
                format!("unknown background `{other}` (allowed: auto, opaque, transparent)"),
            ))
        }
    }
    let check =
        |param: &str, value: &Option<String>, allowed: &[&str]| -> Result<(), OpenAiError> {
            match value.as_deref() {
                Some(v) if !allowed.contains(&v) => Err(bad(
                    param,
                    format!("unknown {param} `{v}` (allowed: {})", allowed.join(", ")),
                )),
                _ => Ok(()),
            }
        };
    check(
        "quality",
        &r.quality,
        &["auto", "low", "medium", "high", "standard", "hd"],
    )?;
    check("moderation", &r.moderation, &["auto", "low"])?;
    check("style", &r.style, &["vivid", "natural"])?;
    check("input_fidelity", &r.input_fidelity, &["low", "high"])?;
    let b64 = match r.response_format.as_deref() {
        Some("b64_json") => true,
        Some("url") => false,
        None => r
            .model
            .as_deref()
            .is_some_and(|m| m.trim().to_ascii_lowercase().starts_with("gpt-image")),
        Some(other) => {
            return Err(bad(
                "response_format",
                format!("unknown response_format `{other}` (allowed: url, b64_json)"),
            ))
        }
    };
    let defaults = ImageDefinition {
        base_model: Some(model),
        width,
        height,
        output_format: Some(format),
        output_quality: Some(quality),
        image,
        mask,
        ..ImageDefinition::default()
    };
    let images = (0..n)
        .map(|_| ImageDefinition {
            prompt: Some(r.prompt.clone()),
            ..ImageDefinition::default()
        })
        .collect();
    Ok(Translated {
        request: NativeRequest {
            defaults,
            images,
            ..NativeRequest::default()
        },
        b64,
        format,
    })
}

/// Map native field paths to the OpenAI parameter names.
fn openai_param(field: Option<String>) -> Option<String> {
    let f = field?;
    let name = f.rsplit('.').next().unwrap_or(&f).to_string();
    Some(match name.as_str() {
        "width" | "height" => "size".into(),
        "baseModel" => "model".into(),
        "outputQuality" => "output_compression".into(),
        "outputFormat" => "output_format".into(),
        "images" => "n".into(),
        "prompt" => "prompt".into(),
        "image" => "image".into(),
        "mask" => "mask".into(),
        _ => name,
    })
}

async fn run(
    state: AppState,
    principal: Principal,
    base: String,
    headers: HeaderMap,
    params: &ImagesRequest,
    translated: Translated,
    hash: String,
) -> Result<Response, OpenAiError> {
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let record_json = serde_json::to_value(params).unwrap_or_default();
    let prepared = prepare(
        &state,
        &principal,
        &translated.request,
        Source::OpenAi,
        record_json,
        hash,
        idempotency_key,
    )
    .await
    .map_err(|mut e| {
        e.field = openai_param(e.field.take());
        OpenAiError(e)
    })?;
    let committed = commit(&state, &principal, prepared).await?;
    let id = committed.job.id.clone();
    let record = wait_for_record(&state, &id, &base)
        .await
        .map_err(OpenAiError)?;
    if record.status != JobStatus::Succeeded {
        let error = record.error.clone();
        let code = error.as_ref().map(|e| e.code.clone()).unwrap_or_default();
        let status = match code.as_str() {
            "invalid_value" | "unsupported" | "model_load_failed" => StatusCode::BAD_REQUEST,
            "canceled" => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let stable: &'static str = match code.as_str() {
            "invalid_value" => "invalid_value",
            "unsupported" => "unsupported",
            "model_load_failed" => "model_load_failed",
            "canceled" => "canceled",
            _ => "generation_failed",
        };
        let message = error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "the generation failed".into());
        let mut e = ApiError::new(status, stable, format!("{message} (job {id})"));
        e.field = openai_param(error.and_then(|e| e.field));
        return Err(OpenAiError(e));
    }
    let mut data = Vec::new();
    for asset in &record.assets {
        if translated.b64 {
            let bytes = state
                .assets()
                .get(&asset.content_hash, translated.format.extension())
                .await
                .map_err(|e| OpenAiError(ApiError::internal("reading an image", e)))?
                .ok_or_else(|| {
                    OpenAiError(ApiError::internal("reading an image", "the file is gone"))
                })?;
            data.push(serde_json::json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                "revised_prompt": null,
            }));
        } else {
            data.push(serde_json::json!({"url": asset.file_url, "revised_prompt": null}));
        }
    }
    let size = record
        .images
        .first()
        .and_then(|i| i.parameters.as_ref())
        .map(|p| format!("{}x{}", p.width, p.height));
    Ok(Json(serde_json::json!({
        "created": crate::util::now_ms() / 1000,
        "data": data,
        "background": "opaque",
        "output_format": translated.format.as_str(),
        "quality": params.quality.clone().unwrap_or_else(|| "auto".into()),
        "size": size,
        "easel_generation_id": id,
    }))
    .into_response())
}

/// `POST /v1/images/generations`.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body = ImagesRequest,
    responses((status = 200, description = "`{created, data: [{url | b64_json}]}`"),
              (status = 400, description = "OpenAI-shaped error")),
    security(("bearer" = [])))]
pub async fn generations(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, OpenAiError> {
    state.check_submission_rate(&principal.key_id)?;
    let params: ImagesRequest = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| bad("", format!("the body is not valid JSON: {e}")))
        .and_then(|v| {
            easel_core::request::from_json_at(v, "").map_err(|e| {
                OpenAiError(
                    ApiError::new(StatusCode::BAD_REQUEST, e.kind.code(), e.message)
                        .with_field(e.field),
                )
            })
        })?;
    let translated = translate(&state, &params, None, None)?;
    run(
        state,
        principal,
        base,
        headers,
        &params,
        translated,
        body_hash(&body),
    )
    .await
}

/// Turn an OpenAI mask into easel's (white repaints): with an alpha
/// channel, transparent pixels repaint; without one, it is already easel's.
fn convert_mask(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let decoded = easel_core::decode_image(bytes).map_err(|e| e.to_string())?;
    if decoded.layout != easel_core::PixelLayout::Rgba8 {
        return Ok(bytes.to_vec());
    }
    let rgb: Vec<u8> = decoded
        .pixels
        .chunks_exact(4)
        .flat_map(|p| {
            let v = if p[3] == 0 { 255 } else { 0 };
            [v, v, v]
        })
        .collect();
    let image = easel_core::RgbImageRef::new(decoded.width, decoded.height, &rgb)
        .map_err(|e| e.to_string())?;
    easel_core::encode_image(
        &image,
        OutputFormat::Png,
        100,
        &easel_core::ImageMetadata::default(),
    )
    .map_err(|e| e.to_string())
}

fn data_uri(bytes: &[u8]) -> String {
    format!(
        "data:application/octet-stream;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `POST /v1/images/edits` (multipart/form-data).
#[utoipa::path(post, path = "/v1/images/edits", tag = "openai",
    request_body(content_type = "multipart/form-data", description = "`image` (or `image[]`), optional `mask`, `prompt`, and the fields of /v1/images/generations"),
    responses((status = 200, description = "`{created, data: [{url | b64_json}]}`"),
              (status = 400, description = "OpenAI-shaped error")),
    security(("bearer" = [])))]
pub async fn edits(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, OpenAiError> {
    state.check_submission_rate(&principal.key_id)?;
    let mut multipart = multipart.map_err(|e| {
        OpenAiError(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send multipart/form-data with `image` and `prompt`: {e}"),
        ))
    })?;
    let mut fields = serde_json::Map::new();
    let mut images: Vec<Vec<u8>> = Vec::new();
    let mut mask: Option<Vec<u8>> = None;
    let mut hasher = sha2::Sha256::default();
    use sha2::Digest;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| OpenAiError(body_error(e.status(), e.body_text())))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| OpenAiError(body_error(e.status(), e.body_text())))?;
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
        match name.as_str() {
            "image" | "image[]" => images.push(bytes.to_vec()),
            "mask" => mask = Some(bytes.to_vec()),
            _ => {
                let text =
                    String::from_utf8(bytes.to_vec()).map_err(|_| bad(&name, "must be text"))?;
                let value = match name.as_str() {
                    // A JSON number (`1`, or `1.0` as some clients send);
                    // the request type checks that it is an integer.
                    "n" | "output_compression" | "partial_images" => {
                        serde_json::from_str::<serde_json::Number>(text.trim())
                            .map(serde_json::Value::Number)
                            .map_err(|_| bad(&name, format!("`{text}` is not a whole number")))?
                    }
                    "stream" => serde_json::Value::from(text.trim() == "true"),
                    _ => serde_json::Value::from(text),
                };
                fields.insert(name, value);
            }
        }
    }
    let params: ImagesRequest =
        easel_core::request::from_json_at(serde_json::Value::Object(fields), "").map_err(|e| {
            OpenAiError(
                ApiError::new(StatusCode::BAD_REQUEST, e.kind.code(), e.message)
                    .with_field(e.field),
            )
        })?;
    let image = match images.len() {
        0 => return Err(bad("image", "upload the image to edit as `image`")),
        1 => images.remove(0),
        n => {
            return Err(bad(
                "image",
                format!("{n} images given; easel edits one image per request"),
            ))
        }
    };
    let mask = match mask {
        Some(m) => Some(data_uri(&convert_mask(&m).map_err(|e| {
            OpenAiError(ApiError::invalid("invalid_image", "mask", e))
        })?)),
        None => None,
    };
    let translated = translate(&state, &params, Some(data_uri(&image)), mask)?;
    let hash: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    run(state, principal, base, headers, &params, translated, hash).await
}
