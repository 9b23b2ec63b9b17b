//! The serverless endpoint shape (NebulaBlock's "Serverless Endpoints"
//! image generation): `POST /api/v1/images/generation`, the path of the
//! original under its base URL `https://HOST/api/v1`, so a client works by
//! changing the host. Authenticated with `Authorization: Bearer <key>` (an
//! easel key), as the original.
//!
//! Synchronous: the request becomes one native job ([`crate::submit`],
//! source `serverless`, billed per image, listed by `GET /v1/generations`
//! and the web UI), waited for up to `max_wait_seconds`, and answered as
//! the original does:
//! `{"model", "object": "list", "data": [{"timings": {"inference"}, "index",
//! "b64_json"}], "message", "status": "success"}` (`b64_json`: a PNG).
//!
//! Fields ([`FIELDS`]): `model_name` (or `model`, as the original's API
//! reference spells it), `prompt`, `negative_prompt`, `width`, `height`,
//! `num_steps`, `guidance_scale`, `seed`, `input_image` (or `image`) and
//! `mask_image` (or `mask`) as base64 (or data URIs). The three documented
//! `model_name`s are mapped to configured models by
//! [`super::compat_models`] (the name itself when it resolves, else a model
//! of its family: SDXL; FLUX preferring `schnell`; FLUX Fill). For FLUX.1
//! Fill, `width` and `height` are rounded down to multiples of 16, as the
//! original documents ("it will automatically resize the dimensions").
//!
//! The original documents no error body; easel answers
//! `{"status": "error", "message", "field", "code"}` (the success body's
//! `status` / `message` pair, plus the field at fault by its name here and
//! easel's stable code), with easel's statuses.

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use easel_core::{ImageDefinition, NativeRequest, OutputFormat};
use easel_diffusion::loader::ModelFamily;
use serde::Deserialize;
use serde_json::{json, Value};

use super::compat_models;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::error_shape::serverless_error_body as error_body;
use crate::http::{BaseUrl, RawBody};
use crate::job::JobStatus;
use crate::jobs::wait_for_record;
use crate::submit::{body_hash, commit, prepare, Source};
use crate::AppState;

/// The `model_name`s the original documents, their model family, and the
/// words that pick among that family's models.
pub const MODELS: &[(&str, ModelFamily, &[&str])] = &[
    (
        "stabilityai/stable-diffusion-xl-base-1.0",
        ModelFamily::StableDiffusionXl,
        &["xl"],
    ),
    (
        "black-forest-labs/FLUX.1-schnell",
        ModelFamily::Flux,
        &["schnell"],
    ),
    (
        "black-forest-labs/FLUX.1-Fill-dev",
        ModelFamily::FluxFill,
        &["fill"],
    ),
];

/// The request fields: name, alias, and the native field each maps to.
pub const FIELDS: &[(&str, Option<&str>, &str)] = &[
    ("model_name", Some("model"), "baseModel"),
    ("prompt", None, "prompt"),
    ("negative_prompt", None, "negativePrompt"),
    ("width", None, "width"),
    ("height", None, "height"),
    ("num_steps", None, "steps"),
    ("guidance_scale", None, "guidanceScale"),
    ("seed", None, "seed"),
    ("input_image", Some("image"), "image"),
    ("mask_image", Some("mask"), "mask"),
];

/// An error in this surface's shape (see the module docs).
pub struct ServerlessError(pub ApiError);

impl From<ApiError> for ServerlessError {
    fn from(e: ApiError) -> Self {
        ServerlessError(e)
    }
}

impl From<crate::store::StoreError> for ServerlessError {
    fn from(e: crate::store::StoreError) -> Self {
        ServerlessError(e.into())
    }
}

impl IntoResponse for ServerlessError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = error_body(&e.message, e.field.as_deref(), e.code);
        crate::error_shape::shaped_response(e.status, body, e.retry_after)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ServerlessError {
    ServerlessError(ApiError::invalid("invalid_value", field, message))
}

/// The request body.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerlessRequest {
    /// One of [`MODELS`] or an easel model.
    #[serde(default, alias = "model")]
    pub model_name: Option<String>,
    /// What to draw (required).
    #[serde(default)]
    pub prompt: Option<String>,
    /// What to steer away from (SDXL only, as the original's table).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Pixels; default: the model's native width.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub width: Option<u32>,
    /// Pixels; default: the model's native height.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub height: Option<u32>,
    /// Denoising steps (native range 1..=60); default: the model's.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub num_steps: Option<u32>,
    /// Guidance (native range 0..=30); default: the model's.
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// Seed; default random.
    #[serde(default, deserialize_with = "easel_core::integer::option")]
    pub seed: Option<u64>,
    /// Base64 (or a data URI) of the input image.
    #[serde(default, alias = "image")]
    pub input_image: Option<String>,
    /// Base64 (or a data URI) of the mask: white repaints, black keeps.
    #[serde(default, alias = "mask")]
    pub mask_image: Option<String>,
}

/// The model for `name` (see the module docs).
async fn choose_model(
    state: &AppState,
    name: &str,
) -> Result<(String, Option<ModelFamily>), ServerlessError> {
    if compat_models::resolves(state, name).await? {
        return Ok((
            name.to_string(),
            compat_models::family_of(state, name).await?,
        ));
    }
    let known: Vec<&str> = MODELS.iter().map(|(n, _, _)| *n).collect();
    let Some((_, family, prefer)) = MODELS.iter().find(|(n, _, _)| *n == name) else {
        return Err(invalid(
            "model_name",
            format!(
                "unknown model_name `{name}` (allowed: {}, or an easel model of GET /v1/models)",
                known.join(", ")
            ),
        ));
    };
    match compat_models::model_of_family(state, *family, prefer).await? {
        Some(m) => Ok((m, Some(*family))),
        None => Err(invalid(
            "model_name",
            format!("this server has no {family:?} model to run `{name}`; GET /v1/models lists its models"),
        )),
    }
}

/// The native request for `r`.
async fn translate(
    state: &AppState,
    r: &ServerlessRequest,
) -> Result<NativeRequest, ServerlessError> {
    let name = r
        .model_name
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            invalid(
                "model_name",
                format!(
                    "`model_name` is required (one of: {})",
                    MODELS
                        .iter()
                        .map(|(n, _, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
    let prompt = r
        .prompt
        .clone()
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| invalid("prompt", "`prompt` is required (a non-empty string)"))?;
    let (model, family) = choose_model(state, name).await?;
    let (mut width, mut height) = (r.width, r.height);
    if family == Some(ModelFamily::FluxFill) {
        // "requires that the height and width are divisible by 16. If not,
        // it will automatically resize the dimensions accordingly."
        let round = |v: u32| (v / 16).max(1) * 16;
        width = width.map(round);
        height = height.map(round);
    }
    let defaults = ImageDefinition {
        base_model: Some(model),
        prompt: Some(prompt),
        negative_prompt: r.negative_prompt.clone().filter(|p| !p.is_empty()),
        width,
        height,
        steps: r.num_steps,
        guidance_scale: r.guidance_scale,
        seed: r.seed,
        image: r.input_image.clone(),
        mask: r.mask_image.clone(),
        output_format: Some(OutputFormat::Png),
        ..ImageDefinition::default()
    };
    Ok(NativeRequest {
        images: vec![ImageDefinition::default()],
        defaults,
        ..NativeRequest::default()
    })
}

/// The name here of a native field path.
fn serverless_field(field: &str) -> String {
    let local = match field.split_once('.') {
        Some((head, rest)) if head.starts_with("images[") => rest,
        _ => field,
    };
    FIELDS
        .iter()
        .find(|(_, _, native)| *native == local)
        .map_or(local, |(name, _, _)| name)
        .to_string()
}

/// `POST /api/v1/images/generation`.
#[utoipa::path(post, path = "/api/v1/images/generation", tag = "serverless",
    request_body(content = Object, description = "`model_name`, `prompt`, ...; see docs/API.md"),
    responses((status = 200, description = "`{model, object: \"list\", data: [{timings, index, b64_json}], message, status}`")),
    security(("bearer" = [])))]
pub async fn generate(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    RawBody(body): RawBody,
) -> Result<Response, ServerlessError> {
    state.check_submission_rate(&principal.key_id)?;
    let raw: Value = serde_json::from_slice(&body).map_err(|e| {
        ServerlessError(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        )))
    })?;
    if !raw.is_object() {
        return Err(ServerlessError(ApiError::bad_request(
            "the body must be a JSON object",
        )));
    }
    let params: ServerlessRequest = easel_core::request::from_json_at(raw, "").map_err(|e| {
        let status = if e.kind.code() == "unknown_field" {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        ServerlessError(ApiError::new(status, e.kind.code(), e.message).with_field(e.field))
    })?;
    let request = translate(&state, &params).await?;
    let record_json = serde_json::to_value(&params).unwrap_or_default();
    let prepared = prepare(
        &state,
        &principal,
        &request,
        Source::Serverless,
        record_json,
        body_hash(&body),
        None,
    )
    .await
    .map_err(|mut e| {
        e.field = e.field.take().map(|f| serverless_field(&f));
        ServerlessError(e)
    })?;
    let committed = commit(&state, &principal, prepared).await?;
    let started = Instant::now();
    let id = committed.job.id.clone();
    let record = wait_for_record(&state, &id, &base)
        .await
        .map_err(ServerlessError)?;
    if record.status != JobStatus::Succeeded {
        let error = record.error.clone();
        let code = error.as_ref().map(|e| e.code.clone()).unwrap_or_default();
        let (status, stable) = match code.as_str() {
            "invalid_value" => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"),
            "unsupported" => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported"),
            "canceled" => (StatusCode::CONFLICT, "canceled"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "generation_failed"),
        };
        let message = error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "the generation failed".into());
        let mut e = ApiError::new(status, stable, format!("{message} (job {id})"));
        e.field = error.and_then(|e| e.field).map(|f| serverless_field(&f));
        return Err(ServerlessError(e));
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut data = Vec::new();
    for (index, asset) in record.assets.iter().enumerate() {
        let bytes = state
            .assets()
            .get(&asset.content_hash, OutputFormat::Png.extension())
            .await
            .map_err(|e| ApiError::internal("reading an image", e))?
            .ok_or_else(|| ApiError::internal("reading an image", "the file is gone"))?;
        data.push(json!({
            "timings": {"inference": seconds},
            "index": index,
            "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
        }));
    }
    Ok(Json(json!({
        "model": params.model_name,
        "object": "list",
        "data": data,
        "message": "Image generated successfully",
        "status": "success",
        "easel_generation_id": id,
    }))
    .into_response())
}

/// Complete the OpenAPI document for this route: the request body and the
/// error schema `ServerlessErrorBody`.
pub fn patch_openapi(doc: &mut Value) {
    let size = json!({"type": ["integer", "null"], "minimum": easel_core::params::SIZE_MIN,
        "maximum": easel_core::params::SIZE_MAX,
        "description": "A multiple of 8 (16 for FLUX.1 schnell; FLUX.1 Fill rounds down to 16)."});
    let names: Vec<&str> = MODELS.iter().map(|(n, _, _)| *n).collect();
    let mut props = json!({
        "model_name": {"type": "string", "minLength": 1,
            "description": format!("One of {}, or an easel model", names.join(", "))},
        "prompt": {"type": "string", "minLength": 1, "pattern": "\\S",
            "maxLength": easel_core::params::PROMPT_MAX_CHARS},
        "negative_prompt": {"type": ["string", "null"]},
        "width": size.clone(),
        "height": size,
        "num_steps": {"type": ["integer", "null"], "minimum": *easel_core::params::STEPS_RANGE.start(),
            "maximum": *easel_core::params::STEPS_RANGE.end()},
        "guidance_scale": {"type": ["number", "null"], "minimum": 0,
            "maximum": easel_core::params::GUIDANCE_SCALE_MAX},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX},
        "input_image": {"type": ["string", "null"], "description": "Base64 or a data URI"},
        "mask_image": {"type": ["string", "null"], "description": "Base64 or a data URI; needs input_image"},
    });
    props["model"] = props["model_name"].clone();
    props["image"] = props["input_image"].clone();
    props["mask"] = props["mask_image"].clone();
    let body = json!({"type": "object", "required": ["prompt"], "additionalProperties": false,
        "properties": props,
        "anyOf": [{"required": ["model_name"]}, {"required": ["model"]}],
        "allOf": [{"not": {"required": ["model_name", "model"]}},
                  {"not": {"required": ["input_image", "image"]}},
                  {"not": {"required": ["mask_image", "mask"]}}]});
    let op = &mut doc["paths"][crate::error_shape::SERVERLESS_PATH]["post"];
    if op.is_object() {
        op["requestBody"] = json!({"required": true,
            "content": {"application/json": {"schema": body}}});
    }
    doc["components"]["schemas"]["ServerlessErrorBody"] = json!({
        "type": "object", "required": ["status", "message", "field", "code"],
        "description": "An error of the serverless endpoint shape.",
        "properties": {
            "status": {"type": "string", "enum": ["error"]},
            "message": {"type": "string"},
            "field": {"type": ["string", "null"], "description": "The request field at fault, by its name here."},
            "code": {"type": "string"},
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_field_paths_read_as_this_surfaces_names() {
        for (native, name) in [
            ("images[0].steps", "num_steps"),
            ("images[0].guidanceScale", "guidance_scale"),
            ("images[0].baseModel", "model_name"),
            ("images[0].image", "input_image"),
            ("images[0].mask", "mask_image"),
            ("images[0].negativePrompt", "negative_prompt"),
            ("images[0].width", "width"),
        ] {
            assert_eq!(serverless_field(native), name, "{native}");
        }
    }
}
