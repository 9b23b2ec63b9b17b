//! Leonardo.Ai compatibility: `POST /api/rest/v1/generations` in the body
//! shape of Leonardo's `createGeneration`, and `GET
//! /api/rest/v1/generations/{id}` answering `{"generations_by_pk": ...}`,
//! so a Leonardo client works by changing its base URL to
//! `http(s)://HOST/api/rest/v1`. Authenticated as Leonardo is
//! (`Authorization: Bearer <key>`, an easel key).
//!
//! A request becomes one native job ([`crate::submit::prepare`] +
//! [`crate::submit::commit`], source `leonardo`) with one image definition
//! per image (`num_images`; billed per image, listed by `GET
//! /v1/generations` and the web UI). Every body field is classified in
//! [`fields::FIELDS`]; the field table with ranges and defaults is in
//! docs/API.md ("Leonardo-style generations").
//!
//! Errors use the shape of Leonardo's API (Hasura's REST errors):
//! `{"error": MESSAGE, "path": "$.FIELD", "code": CODE}` (see
//! [`LeonardoError`]).

pub mod fields;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use easel_core::{ImageDefinition, LoraRef, NativeRequest};
use easel_diffusion::loader::ModelFamily;
use serde::Deserialize;
use serde_json::{json, Value};

use super::compat_models;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::error_shape::leonardo_error_body as error_body;
use crate::http::{BaseUrl, RawBody};
use crate::job::JobStatus;
use crate::jobs::load_record;
use crate::submit::{body_hash, commit, prepare, Source};
use crate::AppState;
use fields::{Role, FIELDS, PRESET_STYLES, SCHEDULERS, SD_VERSIONS, SD_VERSIONS_ALL};

/// Leonardo's documented ranges.
pub const SIZE_RANGE: (f64, f64) = (32.0, 1536.0);
/// `num_images`: 1..=8, or 1..=4 when width or height is over 768.
pub const NUM_IMAGES_MAX: (u32, u32) = (8, 4);
/// `num_inference_steps`: 10..=60, default 15.
pub const STEPS_RANGE: (f64, f64) = (10.0, 60.0);
/// Leonardo's default step count.
pub const DEFAULT_STEPS: u32 = 15;
/// Leonardo's default image count.
pub const DEFAULT_NUM_IMAGES: u32 = 4;
/// `guidance_scale`: 1..=20.
pub const GUIDANCE_RANGE: (f64, f64) = (1.0, 20.0);
/// `init_strength`: 0.1..=0.9.
pub const INIT_STRENGTH_RANGE: (f64, f64) = (0.1, 0.9);
/// The largest seed: FLUX models, others.
pub const SEED_MAX: (u64, u64) = (2_147_483_637, 9_999_999_998);

/// An error in Leonardo's shape: `{"error", "path", "code"}`. `path` is
/// `$.FIELD` for the body field at fault (`$.elements[0].weight`), else
/// `$`; `code` follows Hasura's codes by status: 400 `parse-failed`, 401
/// `access-denied`, 402 `payment-required`, 404 `not-found`, 409
/// `conflict`, 413 `payload-too-large`, 422 `validation-failed`, 429
/// `rate-limited`, 5xx `unexpected`. The status is easel's (422 for a
/// value out of range or a feature easel does not do).
pub struct LeonardoError(pub ApiError);

impl From<ApiError> for LeonardoError {
    fn from(e: ApiError) -> Self {
        LeonardoError(e)
    }
}

impl From<crate::store::StoreError> for LeonardoError {
    fn from(e: crate::store::StoreError) -> Self {
        LeonardoError(e.into())
    }
}

impl IntoResponse for LeonardoError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = error_body(e.status, &e.message, e.field.as_deref());
        crate::error_shape::shaped_response(e.status, body, e.retry_after)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> LeonardoError {
    LeonardoError(ApiError::invalid("invalid_value", field, message))
}

/// An element: a LoRA and its weight.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Element {
    /// An easel training id (`POST /v1/trainings`) or a LoRA name of
    /// `GET /v1/loras` (or a LoRA path under the model roots).
    #[serde(rename = "akUUID")]
    pub ak_uuid: String,
    /// The LoRA scale, -1..=3 (easel's range). Default 1 (Leonardo's).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// The mapped and cosmetic fields of a Leonardo body (the refused ones are
/// checked on the raw JSON by [`fields::FIELDS`]). Numbers are read as
/// JSON numbers and range-checked with Leonardo's ranges.
#[derive(Debug, Clone, Default, Deserialize)]
struct Body {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    #[serde(rename = "modelId")]
    model_id: Option<String>,
    sd_version: Option<String>,
    num_images: Option<f64>,
    width: Option<f64>,
    height: Option<f64>,
    num_inference_steps: Option<f64>,
    guidance_scale: Option<f64>,
    scheduler: Option<String>,
    seed: Option<f64>,
    init_image_id: Option<String>,
    init_generation_image_id: Option<String>,
    init_strength: Option<f64>,
    tiling: Option<bool>,
    elements: Option<Vec<Element>>,
    #[serde(rename = "presetStyle")]
    preset_style: Option<String>,
    /// Cosmetic: read only to check its type.
    #[allow(dead_code)]
    public: Option<bool>,
}

/// An integer field within `lo..=hi` (and a multiple of `multiple`).
fn integer(field: &str, value: f64, lo: f64, hi: f64, multiple: u32) -> Result<u64, LeonardoError> {
    let tail = if multiple > 1 {
        format!(" and be a multiple of {multiple}")
    } else {
        String::new()
    };
    let ok = value.fract() == 0.0 && (lo..=hi).contains(&value);
    if !ok || !(value as u64).is_multiple_of(u64::from(multiple)) {
        return Err(invalid(
            field,
            format!(
                "{value} is not allowed: {field} must be an integer between {lo} and {hi}{tail}"
            ),
        ));
    }
    Ok(value as u64)
}

fn number(field: &str, value: f64, lo: f64, hi: f64) -> Result<f64, LeonardoError> {
    if !(lo..=hi).contains(&value) {
        return Err(invalid(
            field,
            format!("{value} is out of range: {field} must be between {lo} and {hi}"),
        ));
    }
    Ok(value)
}

/// Refuse unknown fields and the unsupported ones that ask for something.
fn check_fields(object: &serde_json::Map<String, Value>) -> Result<(), LeonardoError> {
    for (name, value) in object {
        let Some(f) = fields::field(name) else {
            return Err(invalid(
                name,
                format!(
                    "unknown field `{name}`; Leonardo's createGeneration fields are: {}",
                    FIELDS.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        if let Role::Unsupported(inactive) = f.role {
            if !inactive.allows(value) {
                return Err(LeonardoError(ApiError::invalid(
                    "unsupported_feature",
                    name,
                    format!(
                        "`{name}` ({}) is not supported by easel: allowed values are {}",
                        f.note,
                        inactive.describe()
                    ),
                )));
            }
        }
    }
    Ok(())
}

/// The easel model for the request and its family (see
/// [`compat_models`]): `modelId`, else `sd_version`, else `default_model`,
/// else Leonardo's default `sd_version` (`v1_5`).
async fn choose_model(
    state: &AppState,
    body: &Body,
) -> Result<(String, &'static str, Option<ModelFamily>), LeonardoError> {
    // A value outside Leonardo's list is refused even beside a `modelId`
    // that makes it unused (the fuzzer found it accepted there).
    if let Some(version) = body.sd_version.as_deref() {
        if !SD_VERSIONS_ALL.contains(&version) {
            return Err(invalid(
                "sd_version",
                format!(
                    "unknown sd_version `{version}` (allowed: {})",
                    SD_VERSIONS_ALL.join(", ")
                ),
            ));
        }
    }
    if let Some(id) = body
        .model_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if compat_models::resolves(state, id).await? {
            return Ok((
                id.to_string(),
                "modelId",
                compat_models::family_of(state, id).await?,
            ));
        }
        return Err(invalid(
            "modelId",
            format!(
                "no model `{id}` on this server: pass an easel model (GET /v1/models lists them) \
                 or map Leonardo's model id in the server's [models] table \
                 (`\"{id}\" = \"org/repo\"`)"
            ),
        ));
    }
    let version = match body.sd_version.as_deref() {
        Some(v) => Some(v),
        None => match state.config().default_model.clone() {
            Some(d) => {
                let family = compat_models::family_of(state, &d).await?;
                return Ok((d, "modelId", family));
            }
            None => None,
        },
    };
    let version_name = version.unwrap_or("v1_5");
    // A registry entry named as the version wins.
    if compat_models::resolves(state, version_name).await? {
        let family = compat_models::family_of(state, version_name).await?;
        return Ok((version_name.to_string(), "sd_version", family));
    }
    let servable: Vec<&str> = SD_VERSIONS.iter().map(|(n, _, _)| *n).collect();
    let Some((_, family, prefer)) = SD_VERSIONS.iter().find(|(n, _, _)| *n == version_name) else {
        return Err(invalid(
            "sd_version",
            format!(
                "sd_version `{version_name}` is a Leonardo model easel cannot run (allowed: {})",
                servable.join(", ")
            ),
        ));
    };
    match compat_models::model_of_family(state, *family, prefer).await? {
        Some(m) => Ok((m, "sd_version", Some(*family))),
        None => Err(invalid(
            "sd_version",
            format!(
                "this server has no {family:?} model for sd_version `{version_name}`: pass \
                 `modelId` (GET /v1/models lists the models) or add one"
            ),
        )),
    }
}

/// What the request becomes: the native request, and how to name native
/// fields in errors.
struct Translated {
    request: NativeRequest,
    names: FieldNames,
}

/// Which Leonardo field stands for a native one that two Leonardo fields
/// can fill (`baseModel`: `modelId` or `sd_version`; `image`:
/// `init_image_id` or `init_generation_image_id`).
#[derive(Debug, Clone, Copy)]
struct FieldNames {
    model: &'static str,
    image: &'static str,
}

async fn translate(
    state: &AppState,
    principal: &Principal,
    raw: &Value,
) -> Result<Translated, LeonardoError> {
    let object = raw
        .as_object()
        .ok_or_else(|| LeonardoError(ApiError::bad_request("the body must be a JSON object")))?;
    check_fields(object)?;
    let body: Body = easel_core::request::from_json_at(raw.clone(), "").map_err(|e| {
        LeonardoError(
            ApiError::new(StatusCode::BAD_REQUEST, e.kind.code(), e.message).with_field(e.field),
        )
    })?;
    let prompt = body
        .prompt
        .clone()
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| invalid("prompt", "`prompt` is required (a non-empty string)"))?;
    if let Some(style) = &body.preset_style {
        if !PRESET_STYLES.contains(&style.as_str()) {
            return Err(invalid(
                "presetStyle",
                format!(
                    "presetStyle `{style}` needs Alchemy or PhotoReal, which easel does not do \
                     (allowed: {})",
                    PRESET_STYLES.join(", ")
                ),
            ));
        }
    }
    let (model, model_field, family) = choose_model(state, &body).await?;
    let width = body
        .width
        .map(|w| integer("width", w, SIZE_RANGE.0, SIZE_RANGE.1, 8))
        .transpose()?;
    let height = body
        .height
        .map(|h| integer("height", h, SIZE_RANGE.0, SIZE_RANGE.1, 8))
        .transpose()?;
    let large = width.unwrap_or(0) > 768 || height.unwrap_or(0) > 768;
    let max_images = if large {
        NUM_IMAGES_MAX.1
    } else {
        NUM_IMAGES_MAX.0
    };
    let n = match body.num_images {
        Some(v) => {
            let n = integer("num_images", v, 1.0, f64::from(NUM_IMAGES_MAX.0), 1)? as u32;
            if n > max_images {
                return Err(invalid(
                    "num_images",
                    format!("{n} is not allowed: with width or height over 768, num_images must be between 1 and {max_images}"),
                ));
            }
            n
        }
        None => DEFAULT_NUM_IMAGES.min(max_images),
    };
    let steps = body
        .num_inference_steps
        .map(|s| integer("num_inference_steps", s, STEPS_RANGE.0, STEPS_RANGE.1, 1))
        .transpose()?
        .map_or(DEFAULT_STEPS, |s| s as u32);
    let guidance = body
        .guidance_scale
        .map(|g| number("guidance_scale", g, GUIDANCE_RANGE.0, GUIDANCE_RANGE.1))
        .transpose()?;
    let seed_max = if matches!(family, Some(ModelFamily::Flux | ModelFamily::FluxFill)) {
        SEED_MAX.0
    } else {
        SEED_MAX.1
    };
    let seed = body
        .seed
        .map(|s| integer("seed", s, 0.0, seed_max as f64, 1))
        .transpose()?;
    let scheduler = match body.scheduler.as_deref() {
        Some(name) => match SCHEDULERS.iter().find(|(n, _)| *n == name) {
            Some((_, easel)) => easel.map(str::to_string),
            None => {
                return Err(invalid(
                    "scheduler",
                    format!(
                        "unknown scheduler `{name}` (allowed: {})",
                        SCHEDULERS
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        },
        // Leonardo's default EULER_DISCRETE, for the models it applies to;
        // FLUX keeps its flow-matching scheduler.
        None => match family {
            Some(ModelFamily::StableDiffusion | ModelFamily::StableDiffusionXl) => {
                Some("euler".to_string())
            }
            _ => None,
        },
    };
    let image = match (&body.init_image_id, &body.init_generation_image_id) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "init_generation_image_id",
                "give one of init_image_id and init_generation_image_id",
            ))
        }
        (Some(a), None) | (None, Some(a)) => Some(a.trim().to_string()),
        (None, None) => None,
    };
    let strength = match body.init_strength {
        Some(s) => {
            if image.is_none() {
                return Err(invalid(
                    "init_strength",
                    "init_strength needs init_image_id (an easel asset id)",
                ));
            }
            let s = number(
                "init_strength",
                s,
                INIT_STRENGTH_RANGE.0,
                INIT_STRENGTH_RANGE.1,
            )?;
            // Leonardo's init_strength is how much of the init image stays;
            // diffusers' strength is how much is replaced.
            Some(((1.0 - s) * 1e6).round() / 1e6)
        }
        None => None,
    };
    let mut loras = Vec::new();
    for element in body.elements.iter().flatten() {
        let id = element.ak_uuid.trim();
        let is_training = state
            .store()
            .training(&principal.key_id, id)
            .await?
            .is_some();
        loras.push(LoraRef {
            id: is_training.then(|| id.to_string()),
            path: (!is_training).then(|| id.to_string()),
            url: None,
            scale: Some(element.weight.unwrap_or(1.0)),
        });
    }
    let defaults = ImageDefinition {
        base_model: Some(model),
        prompt: Some(prompt),
        negative_prompt: body.negative_prompt.clone().filter(|p| !p.is_empty()),
        steps: Some(steps),
        width: width.map(|w| w as u32),
        height: height.map(|h| h as u32),
        guidance_scale: guidance,
        scheduler,
        image,
        strength,
        tiling: body.tiling,
        loras: (!loras.is_empty()).then_some(loras),
        ..ImageDefinition::default()
    };
    let images = (0..u64::from(n))
        .map(|i| ImageDefinition {
            seed: seed.map(|s| s + i),
            ..ImageDefinition::default()
        })
        .collect();
    let image_field = if body.init_generation_image_id.is_some() {
        "init_generation_image_id"
    } else {
        "init_image_id"
    };
    Ok(Translated {
        request: NativeRequest {
            defaults,
            images,
            ..NativeRequest::default()
        },
        names: FieldNames {
            model: model_field,
            image: image_field,
        },
    })
}

/// The Leonardo name of a native field path (`images[0].loras[1].scale` →
/// `elements[1].weight`).
fn leonardo_field(field: &str, names: FieldNames) -> String {
    let local = match field.split_once('.') {
        Some((head, rest)) if head.starts_with("images[") => rest,
        _ => field,
    };
    if let Some(rest) = local.strip_prefix("loras[") {
        let (index, tail) = rest.split_once(']').unwrap_or((rest, ""));
        let name = match tail.trim_start_matches('.') {
            "scale" => "weight",
            _ => "akUUID",
        };
        return format!("elements[{index}].{name}");
    }
    match local {
        "baseModel" => names.model.to_string(),
        "negativePrompt" => "negative_prompt".into(),
        "steps" => "num_inference_steps".into(),
        "guidanceScale" => "guidance_scale".into(),
        "image" => names.image.into(),
        "strength" => "init_strength".into(),
        "images" => "num_images".into(),
        "loras" => "elements".into(),
        other => other.to_string(),
    }
}

/// `POST /api/rest/v1/generations`: accept a Leonardo generation.
#[utoipa::path(post, path = "/api/rest/v1/generations", tag = "leonardo",
    request_body(content = Object, description = "Leonardo's createGeneration body; see docs/API.md"),
    responses((status = 200, description = "`{sdGenerationJob: {generationId, apiCreditCost, cost}}`")),
    security(("bearer" = [])))]
pub async fn create_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> Result<Response, LeonardoError> {
    state.check_submission_rate(&principal.key_id)?;
    let raw: Value = serde_json::from_slice(&body).map_err(|e| {
        LeonardoError(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        )))
    })?;
    let translated = translate(&state, &principal, &raw).await?;
    let names = translated.names;
    let prepared = prepare(
        &state,
        &principal,
        &translated.request,
        Source::Leonardo,
        raw,
        body_hash(&body),
        None,
    )
    .await
    .map_err(|mut e| {
        e.field = e.field.take().map(|f| leonardo_field(&f, names));
        LeonardoError(e)
    })?;
    let inferences = prepared.images_total();
    let committed = commit(&state, &principal, prepared).await?;
    let price = committed.job.price_micros * committed.job.inferences;
    Ok(Json(json!({"sdGenerationJob": {
        "generationId": committed.job.id,
        "apiCreditCost": inferences,
        "cost": {"amount": format!("{:.6}", price as f64 / 1e6), "unit": "DOLLARS"},
    }}))
    .into_response())
}

fn leonardo_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued | JobStatus::Running => "PENDING",
        JobStatus::Succeeded => "COMPLETE",
        _ => "FAILED",
    }
}

/// `GET /api/rest/v1/generations/{id}`: the job as Leonardo's
/// `generations_by_pk` (any job of this key, whichever API made it).
#[utoipa::path(get, path = "/api/rest/v1/generations/{id}", tag = "leonardo",
    params(("id" = String, Path, description = "The generationId")),
    responses((status = 200, description = "`{generations_by_pk: {id, status, prompt, modelId, imageWidth, imageHeight, seed, generated_images: [{id, url, nsfw}], ...}}`")),
    security(("bearer" = [])))]
pub async fn get_generation(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Response, LeonardoError> {
    let row = state
        .store()
        .generation(&id)
        .await?
        .filter(|g| g.key_id == principal.key_id)
        .ok_or_else(|| ApiError::not_found("generation", &id))?;
    let record = load_record(&state, &id, &base)
        .await?
        .ok_or_else(|| ApiError::not_found("generation", &id))?;
    let request: Value = serde_json::from_str(&row.request_json).unwrap_or_default();
    let first = record.images.first();
    let requested = first.map(|i| &i.requested);
    let params = first.and_then(|i| i.parameters.as_ref());
    let model_id = request["modelId"]
        .as_str()
        .map(str::to_string)
        .or_else(|| requested.and_then(|r| r.base_model.clone()));
    let images: Vec<Value> = record
        .assets
        .iter()
        .map(|a| {
            json!({"id": a.id, "url": a.file_url, "nsfw": false, "likeCount": 0,
                   "generated_image_variation_generics": []})
        })
        .collect();
    let or_request = |key: &str| request.get(key).cloned().unwrap_or(Value::Null);
    Ok(Json(json!({"generations_by_pk": {
        "id": record.id,
        "status": leonardo_status(record.status),
        "createdAt": record.created_at,
        "prompt": requested.and_then(|r| r.prompt.clone()),
        "negativePrompt": requested.and_then(|r| r.negative_prompt.clone()),
        "modelId": model_id,
        "imageWidth": params.map(|p| p.width).or(requested.and_then(|r| r.width)),
        "imageHeight": params.map(|p| p.height).or(requested.and_then(|r| r.height)),
        "inferenceSteps": params.map(|p| p.steps).or(requested.and_then(|r| r.steps)),
        "guidanceScale": params.map(|p| p.guidance_scale).or(requested.and_then(|r| r.guidance_scale)),
        "seed": params.map(|p| p.seed).or(requested.and_then(|r| r.seed)),
        "scheduler": or_request("scheduler"),
        "sdVersion": or_request("sd_version"),
        "presetStyle": or_request("presetStyle"),
        "initStrength": or_request("init_strength"),
        "public": request["public"].as_bool().unwrap_or(false),
        "tiling": requested.and_then(|r| r.tiling).unwrap_or(false),
        "photoReal": false,
        "promptMagic": false,
        "generated_images": images,
        "generation_elements": [],
    }}))
    .into_response())
}

/// Complete the OpenAPI document for these routes: the request body (every
/// field of [`FIELDS`], with Leonardo's ranges; refused features only in
/// their inactive values) and the error schema `LeonardoErrorBody`.
pub fn patch_openapi(doc: &mut Value) {
    let nullable = |schema: Value| json!({"anyOf": [schema, {"type": "null"}]});
    let mut props = serde_json::Map::new();
    for f in FIELDS {
        let schema = match f.role {
            Role::Unsupported(fields::Inactive::FalseOrNull) => json!({"enum": [false, null]}),
            Role::Unsupported(fields::Inactive::EmptyOrNull) => {
                json!({"type": ["array", "null"], "maxItems": 0})
            }
            Role::Unsupported(fields::Inactive::Null) => json!({"type": "null"}),
            Role::Unsupported(fields::Inactive::OneOf(values)) => {
                let mut e: Vec<Value> = values.iter().map(|v| json!(v)).collect();
                e.push(Value::Null);
                json!({"enum": e})
            }
            Role::Cosmetic => json!({"type": ["boolean", "null"]}),
            Role::Mapped(_) => match f.name {
                "prompt" => json!({"type": "string", "minLength": 1, "pattern": "\\S",
                    "maxLength": easel_core::params::PROMPT_MAX_CHARS}),
                "width" | "height" => nullable(json!({"type": "integer",
                    "minimum": SIZE_RANGE.0, "maximum": SIZE_RANGE.1, "multipleOf": 8})),
                "num_images" => nullable(json!({"type": "integer", "minimum": 1,
                    "maximum": NUM_IMAGES_MAX.0,
                    "description": "1..=8; 1..=4 when width or height is over 768. Default 4."})),
                "num_inference_steps" => nullable(json!({"type": "integer",
                    "minimum": STEPS_RANGE.0, "maximum": STEPS_RANGE.1,
                    "description": "Default 15."})),
                "guidance_scale" => nullable(json!({"type": "number",
                    "minimum": GUIDANCE_RANGE.0, "maximum": GUIDANCE_RANGE.1})),
                "init_strength" => nullable(json!({"type": "number",
                    "minimum": INIT_STRENGTH_RANGE.0, "maximum": INIT_STRENGTH_RANGE.1,
                    "description": "Needs init_image_id; easel's strength is 1 - init_strength."})),
                "seed" => nullable(json!({"type": "integer", "minimum": 0,
                    "maximum": SEED_MAX.1, "description": "At most 2147483637 for FLUX models."})),
                "scheduler" => {
                    let e: Vec<Value> = SCHEDULERS.iter().map(|(n, _)| json!(n)).collect();
                    nullable(json!({"type": "string", "enum": e}))
                }
                "sd_version" => {
                    let e: Vec<Value> = SD_VERSIONS.iter().map(|(n, _, _)| json!(n)).collect();
                    nullable(json!({"type": "string", "enum": e}))
                }
                "presetStyle" => nullable(json!({"type": "string", "enum": PRESET_STYLES})),
                "tiling" => json!({"type": ["boolean", "null"]}),
                "elements" => json!({"type": ["array", "null"], "items": {
                    "type": "object", "required": ["akUUID"], "additionalProperties": false,
                    "properties": {"akUUID": {"type": "string", "minLength": 1,
                        "description": "A training id or a LoRA name of GET /v1/loras"},
                        "weight": nullable(json!({"type": "number", "minimum": -1, "maximum": 3}))}}}),
                _ => json!({"type": ["string", "null"]}),
            },
        };
        props.insert(f.name.to_string(), schema);
    }
    let body = json!({"type": "object", "required": ["prompt"], "additionalProperties": false,
        "properties": props});
    let op = &mut doc["paths"]["/api/rest/v1/generations"]["post"];
    if op.is_object() {
        op["requestBody"] = json!({"required": true,
            "content": {"application/json": {"schema": body}}});
    }
    doc["components"]["schemas"]["LeonardoErrorBody"] = json!({
        "type": "object", "required": ["error", "path", "code"],
        "description": "An error of the Leonardo-compatible routes, in Leonardo's (Hasura's) shape.",
        "properties": {
            "error": {"type": "string"},
            "path": {"type": "string", "description": "`$.FIELD` of the body field at fault, or `$`."},
            "code": {"type": "string"},
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_field_paths_read_as_leonardo_names() {
        let names = FieldNames {
            model: "sd_version",
            image: "init_generation_image_id",
        };
        for (native, leonardo) in [
            ("images[3].width", "width"),
            ("images[0].steps", "num_inference_steps"),
            ("guidanceScale", "guidance_scale"),
            ("images[1].baseModel", "sd_version"),
            ("images[0].image", "init_generation_image_id"),
            ("images[0].strength", "init_strength"),
            ("images[0].loras[2].scale", "elements[2].weight"),
            ("images[0].loras[1].path", "elements[1].akUUID"),
            ("images[0].loras[0].id", "elements[0].akUUID"),
            ("images", "num_images"),
            ("images[0].negativePrompt", "negative_prompt"),
        ] {
            assert_eq!(leonardo_field(native, names), leonardo, "{native}");
        }
    }

    #[test]
    fn every_scheduler_and_sd_version_is_known_to_the_engine() {
        for (name, easel) in SCHEDULERS {
            if let Some(e) = easel {
                assert!(
                    easel_diffusion::schedulers::resolve_scheduler_name(e).is_ok(),
                    "{name} -> {e}"
                );
            }
        }
        for (name, _, _) in SD_VERSIONS {
            assert!(SD_VERSIONS_ALL.contains(name), "{name}");
        }
    }
}
