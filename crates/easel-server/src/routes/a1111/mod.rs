//! AUTOMATIC1111 web UI compatibility (`/sdapi/v1/...`): what Open WebUI,
//! SillyTavern and the `webuiapi` Python client call.
//!
//! `txt2img` and `img2img` translate the web UI's request ([`request`])
//! into one native job (billed per image, listed by `GET /v1/generations`
//! with source `a1111`), wait for it (up to `max_wait_seconds`; the web UI
//! answers synchronously) and answer `{images: [base64 PNG], parameters,
//! info}` where `info` is a JSON string carrying the web UI's `infotexts`
//! (each image's `parameters` text) and seeds. The other routes list
//! models (`sd-models`), samplers, schedulers and LoRAs, read and set
//! `sd_model_checkpoint` (`options`: per API key, in memory), report the
//! caller's running job (`progress`) and cancel it (`interrupt`).
//!
//! Auth: `Authorization: Bearer KEY`, or HTTP Basic with the key as the
//! password (any user name), as `--api-auth` clients send. Errors use the
//! web UI's (FastAPI) shapes: see [`crate::error_shape::a1111_error_body`].

pub mod info;
pub mod names;
pub mod request;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::error_shape::A1111Error;
use crate::http::{BaseUrl, RawBody};
use crate::job::JobStatus;
use crate::jobs::{cancel_job, wait_for_record};
use crate::submit::{body_hash, commit, prepare, Source};
use crate::AppState;
use names::invalid;
use request::{rename_field, Mode};

type Result<T> = std::result::Result<T, A1111Error>;

fn parse_body(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(A1111Error(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_json",
            format!("the body must be a JSON object, not `{other}`"),
        ))),
        Err(e) => Err(A1111Error(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_json",
            format!("JSON decode error: {e}"),
        ))),
    }
}

/// The model for a request: `override_settings.sd_model_checkpoint`, the
/// key's `options`, or the server's `default_model`.
fn chosen_model(
    state: &AppState,
    principal: &Principal,
    body: &Map<String, Value>,
) -> Result<String> {
    if let Some(title) = request::checkpoint_override(body) {
        return Ok(names::model_reference(&title));
    }
    state
        .a1111_checkpoint(&principal.key_id)
        .or_else(|| state.config().default_model.clone())
        .ok_or_else(|| {
            A1111Error(invalid(
                "override_settings.sd_model_checkpoint",
                "no model: set override_settings.sd_model_checkpoint, POST /sdapi/v1/options \
                 {\"sd_model_checkpoint\": ...}, or default_model in the server config \
                 (GET /sdapi/v1/sd-models lists the models)",
            ))
        })
}

async fn generate(
    state: AppState,
    principal: Principal,
    base: String,
    body: &[u8],
    mode: Mode,
) -> Result<Response> {
    state.check_submission_rate(&principal.key_id)?;
    let map = parse_body(body)?;
    let model = chosen_model(&state, &principal, &map)?;
    let registry = state.models().clone();
    let reference = model.clone();
    let spec = tokio::task::spawn_blocking(move || registry.resolve(&reference))
        .await
        .map_err(|e| ApiError::internal("resolving a model", e))?
        .map_err(|e| {
            invalid(
                "override_settings.sd_model_checkpoint",
                format!("{e} (GET /sdapi/v1/sd-models lists the models)"),
            )
        })?;
    let family = spec.family().map(|f| f.scheduler_family());
    let max_images = u32::try_from(state.config().max_images_per_request).unwrap_or(u32::MAX);
    let seed = u64::from(rand::random::<u32>());
    let translated = request::translate(&map, mode, &model, family, max_images, seed)?;
    // LoRA tags by file name, as GET /sdapi/v1/loras lists them.
    for lora in translated.request.defaults.loras.iter().flatten() {
        let name = lora.path.clone().unwrap_or_default();
        let registry = state.models().clone();
        let n = name.clone();
        let found = tokio::task::spawn_blocking(move || registry.lora_by_name(&n))
            .await
            .map_err(|e| ApiError::internal("finding a LoRA", e))?
            .map_err(|e| invalid("prompt", format!("<lora:{name}>: {e}")))?;
        if found.is_none() {
            return Err(A1111Error(invalid(
                "prompt",
                format!("<lora:{name}>: no LoRA named `{name}` (GET /sdapi/v1/loras lists them)"),
            )));
        }
    }
    // The stored request leaves the inputs out: they are stored as the
    // job's input assets.
    let mut record = map.clone();
    for input in ["init_images", "mask"] {
        if record.contains_key(input) {
            record.insert(input.into(), json!("(stored as an input asset)"));
        }
    }
    let record_json = Value::Object(record);
    let prepared = prepare(
        &state,
        &principal,
        &translated.request,
        Source::A1111,
        record_json,
        body_hash(body),
        None,
    )
    .await
    .map_err(rename_field)?;
    let committed = commit(&state, &principal, prepared).await?;
    let id = committed.job.id.clone();
    let record = wait_for_record(&state, &id, &base)
        .await
        .map_err(A1111Error)?;
    // An interrupted job answers the images it finished, as the web UI does.
    if !matches!(record.status, JobStatus::Succeeded | JobStatus::Canceled) {
        let error = record.error.clone();
        let code = error.as_ref().map(|e| e.code.clone()).unwrap_or_default();
        let status = if code == "invalid_value" || code == "unsupported" {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        let message = error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "the generation failed".into());
        let mut e = ApiError::new(status, "generation_failed", format!("{message} (job {id})"));
        e.field = error
            .and_then(|e| e.field)
            .map(|f| request::a1111_field(&f));
        return Err(A1111Error(e));
    }
    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    let mut seeds = Vec::new();
    for asset in &record.assets {
        let bytes = state
            .assets()
            .get(&asset.content_hash, "png")
            .await
            .map_err(|e| ApiError::internal("reading an image", e))?
            .ok_or_else(|| ApiError::internal("reading an image", "the file is gone"))?;
        infotexts.push(
            easel_core::codec::read_png_metadata(&bytes)
                .map(|m| m.parameters_text())
                .unwrap_or_default(),
        );
        seeds.push(asset.seed.unwrap_or_default());
        if translated.send_images {
            images.push(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    let first = record.images.iter().find_map(|i| i.parameters.clone());
    let defaults = &translated.request.defaults;
    let sampler = first.as_ref().map(|p| {
        easel_core::sampler_names::a1111_sampler(
            &p.scheduler,
            (defaults.scheduler.as_deref() == Some("dpmpp_2m_karras")).then_some("karras"),
        )
        .sampler
    });
    let negative = defaults.negative_prompt.clone().unwrap_or_default();
    let prompt = defaults.prompt.clone().unwrap_or_default();
    let info = json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); seeds.len()],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); seeds.len()],
        "seed": translated.seed,
        "all_seeds": seeds,
        "subseed": translated.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": first.as_ref().map(|p| p.width),
        "height": first.as_ref().map(|p| p.height),
        "sampler_name": sampler,
        "cfg_scale": first.as_ref().map(|p| p.guidance_scale),
        "steps": first.as_ref().map(|p| p.steps),
        "batch_size": map.get("batch_size").and_then(Value::as_u64).unwrap_or(1),
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": defaults.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": record.created_at,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("easel ", env!("CARGO_PKG_VERSION")),
        "interrupted": record.status == JobStatus::Canceled,
        "easel_generation_id": id,
        "easel_ignored_fields": translated.ignored,
    });
    // `parameters` echoes the request, without the input images unless
    // `include_init_images` (as the web UI).
    let mut parameters = map;
    if mode == Mode::Img2Img && parameters.get("include_init_images") != Some(&Value::Bool(true)) {
        parameters.insert("init_images".into(), Value::Null);
        parameters.insert("mask".into(), Value::Null);
    }
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    }))
    .into_response())
}

/// `POST /sdapi/v1/txt2img`.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111",
    request_body = docs::Txt2ImgRequest,
    responses((status = 200, description = "`{images: [base64 PNG], parameters, info}`", body = docs::ImagesResponse),
              (status = 401, description = "Missing or wrong key (Bearer, or Basic with the key as password)", body = docs::HttpError),
              (status = 402, description = "Credit limit reached", body = docs::HttpError),
              (status = 413, description = "Body too large", body = docs::HttpError),
              (status = 422, description = "A field out of range or not supported: FastAPI's `{detail: [{loc, msg, type}]}`", body = docs::ValidationError),
              (status = 429, description = "Queue full or rate limited", body = docs::HttpError),
              (status = 500, description = "The generation failed", body = docs::HttpError),
              (status = 504, description = "Not finished within max_wait_seconds (the job goes on)", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn txt2img(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    RawBody(body): RawBody,
) -> Result<Response> {
    generate(state, principal, base, &body, Mode::Txt2Img).await
}

/// `POST /sdapi/v1/img2img`.
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111",
    request_body = docs::Img2ImgRequest,
    responses((status = 200, description = "`{images: [base64 PNG], parameters, info}`", body = docs::ImagesResponse),
              (status = 401, description = "Missing or wrong key (Bearer, or Basic with the key as password)", body = docs::HttpError),
              (status = 402, description = "Credit limit reached", body = docs::HttpError),
              (status = 413, description = "Body too large", body = docs::HttpError),
              (status = 422, description = "A field out of range or not supported: FastAPI's `{detail: [{loc, msg, type}]}`", body = docs::ValidationError),
              (status = 429, description = "Queue full or rate limited", body = docs::HttpError),
              (status = 500, description = "The generation failed", body = docs::HttpError),
              (status = 504, description = "Not finished within max_wait_seconds (the job goes on)", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn img2img(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    RawBody(body): RawBody,
) -> Result<Response> {
    generate(state, principal, base, &body, Mode::Img2Img).await
}

/// `GET /sdapi/v1/sd-models`: the models of `GET /v1/models` in the web
/// UI's shape (`title` and `model_name` are the easel model id; no hashes).
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111",
    responses((status = 200, description = "`[{title, model_name, hash, sha256, filename, config}]`", body = Vec<docs::SdModel>),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn sd_models(State(state): State<AppState>) -> Result<Json<Vec<Value>>> {
    let registry = state.models().clone();
    let list = tokio::task::spawn_blocking(move || registry.list(&[]))
        .await
        .map_err(|e| ApiError::internal("listing models", e))?;
    Ok(Json(
        list.into_iter()
            .map(|m| {
                json!({"title": m.id, "model_name": m.id, "hash": null, "sha256": null,
                       "filename": m.id, "config": null})
            })
            .collect(),
    ))
}

/// `GET /sdapi/v1/samplers`: the web UI's samplers that easel runs.
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111",
    responses((status = 200, description = "`[{name, aliases, options}]`", body = Vec<docs::SamplerItem>),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn samplers() -> Json<Vec<Value>> {
    Json(
        names::SAMPLERS
            .iter()
            .map(|s| {
                let options = if s.forces_karras {
                    json!({"scheduler": "karras"})
                } else {
                    json!({})
                };
                json!({"name": s.name, "aliases": s.aliases, "options": options})
            })
            .collect(),
    )
}

/// `GET /sdapi/v1/schedulers`: the schedule types easel accepts.
#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "a1111",
    responses((status = 200, description = "`[{name, label, aliases, default_rho, need_inner_model}]`", body = Vec<docs::SchedulerItem>),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn schedulers() -> Json<Vec<Value>> {
    Json(
        names::SCHEDULERS
            .iter()
            .map(|(name, label)| {
                let rho = if *name == "karras" { 7.0 } else { -1.0 };
                json!({"name": name, "label": label, "aliases": null, "default_rho": rho,
                       "need_inner_model": false})
            })
            .collect(),
    )
}

/// `GET /sdapi/v1/loras`: the LoRA files of `GET /v1/loras`, by the name
/// a `<lora:NAME:WEIGHT>` tag takes.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111",
    responses((status = 200, description = "`[{name, alias, path, metadata}]`", body = Vec<docs::LoraItem>),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn loras(State(state): State<AppState>) -> Result<Json<Vec<Value>>> {
    let config = state.config().clone();
    let list = tokio::task::spawn_blocking(move || crate::lora_list::list_loras(&config))
        .await
        .map_err(|e| ApiError::internal("listing LoRAs", e))?;
    Ok(Json(
        list.into_iter()
            .map(|l| json!({"name": l.id, "alias": l.id, "path": l.id, "metadata": {}}))
            .collect(),
    ))
}

fn options_of(state: &AppState, principal: &Principal) -> Map<String, Value> {
    let model = state
        .a1111_checkpoint(&principal.key_id)
        .or_else(|| state.config().default_model.clone());
    let mut out = Map::new();
    out.insert(
        "sd_model_checkpoint".into(),
        model.map_or(Value::Null, Value::String),
    );
    out.insert("sd_checkpoint_hash".into(), Value::Null);
    for (key, value) in request::FIXED_OPTIONS {
        out.insert(
            (*key).into(),
            serde_json::from_str(value).unwrap_or(Value::Null),
        );
    }
    out
}

/// `GET /sdapi/v1/options`: `sd_model_checkpoint` (this key's choice, else
/// the server's `default_model`) and the settings easel runs with.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111",
    responses((status = 200, description = "`{sd_model_checkpoint, sd_checkpoint_hash, samples_format, ...}`", body = Object),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn get_options(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Json<Map<String, Value>> {
    Json(options_of(&state, &principal))
}

/// `POST /sdapi/v1/options`: set `sd_model_checkpoint` for this API key's
/// later `/sdapi` calls (in memory: a restart forgets it). The other
/// reported settings are accepted at their value only.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111",
    request_body(content = Object, description = "`{sd_model_checkpoint: TITLE}`"),
    responses((status = 200, description = "Set; answers null as the web UI", body = Object),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError),
              (status = 413, description = "Body too large", body = docs::HttpError),
              (status = 422, description = "An unknown model, or a setting easel does not have", body = docs::ValidationError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn set_options(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> Result<Response> {
    let map = parse_body(&body)?;
    request::check_settings(&map, "")?;
    if let Some(Value::String(title)) = map.get("sd_model_checkpoint") {
        let reference = names::model_reference(title);
        let registry = state.models().clone();
        let r = reference.clone();
        tokio::task::spawn_blocking(move || registry.resolve(&r))
            .await
            .map_err(|e| ApiError::internal("resolving a model", e))?
            .map_err(|e| {
                invalid(
                    "sd_model_checkpoint",
                    format!("{e} (GET /sdapi/v1/sd-models lists the models)"),
                )
            })?;
        state.set_a1111_checkpoint(&principal.key_id, reference);
    }
    Ok(Json(Value::Null).into_response())
}

/// `GET /sdapi/v1/progress`: the caller's running job, in the web UI's
/// shape (`progress` 0..1 over its images and steps, `eta_relative`
/// seconds, `state` with `job_count` = the caller's running and queued
/// jobs, `sampling_step`/`sampling_steps` of the running batch;
/// `current_image` always null: easel does not decode previews).
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111",
    responses((status = 200, description = "`{progress, eta_relative, state, current_image, textinfo}`", body = docs::ProgressResponse),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn progress(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>> {
    let store = state.store();
    let running = store
        .generations(&principal.key_id, Some(JobStatus::Running), 100, None)
        .await?;
    let queued = store
        .generations(&principal.key_id, Some(JobStatus::Queued), 100, None)
        .await?;
    let job_count = running.len() + queued.len();
    let Some(job) = running.last() else {
        return Ok(Json(json!({
            "progress": 0.0, "eta_relative": 0.0, "current_image": null, "textinfo": null,
            "state": {"skipped": false, "interrupted": false, "stopping_generation": false,
                      "job": "", "job_count": job_count, "job_timestamp": "0", "job_no": 0,
                      "sampling_step": 0, "sampling_steps": 0},
        })));
    };
    let p = job.progress.clone();
    let total = job.images_total.max(1) as f64;
    let (done, step, steps, batch) = p.as_ref().map_or((0, 0, 0, 0), |p| {
        (p.images_done, p.step, p.steps, p.batch_images)
    });
    let mut fraction = f64::from(done) / total;
    if steps > 0 {
        fraction += f64::from(batch) / total * f64::from(step) / f64::from(steps);
    }
    let fraction = fraction.clamp(0.0, 1.0);
    let elapsed = job
        .started_at
        .map(|t| (crate::util::now_ms() - t).max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    let eta = if fraction > 0.0 {
        elapsed / fraction - elapsed
    } else {
        0.0
    };
    Ok(Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "current_image": null,
        "textinfo": p.as_ref().map(|p| p.stage.clone()),
        "state": {"skipped": false, "interrupted": job.cancel_requested, "stopping_generation": false,
                  "job": job.id, "job_count": job_count, "job_timestamp": job.created_at.to_string(),
                  "job_no": done, "sampling_step": step, "sampling_steps": steps},
    })))
}

/// `POST /sdapi/v1/interrupt`: cancel the caller's running jobs (their
/// waiting `txt2img`/`img2img` calls answer the images finished so far).
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111",
    responses((status = 200, description = "`{}`", body = Object),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn interrupt(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>> {
    let running = state
        .store()
        .generations(&principal.key_id, Some(JobStatus::Running), 100, None)
        .await?;
    for job in running {
        cancel_job(&state, &job.id).await?;
    }
    Ok(Json(json!({})))
}

pub mod docs;
