//! Accepting a job: everything is checked before anything is stored.
//!
//! [`prepare`] merges the inference pack and the defaults into each image
//! definition, validates every field (with its path), resolves models
//! (model roots), trainings and LoRA paths, and reads image inputs; it
//! writes nothing. [`commit`] then, under one lock: replays an
//! `Idempotency-Key`, refuses a full queue (429) or an exhausted credit
//! (402), stores the input images, and inserts the job with its charge in
//! one transaction.

use std::collections::HashMap;

use axum::http::StatusCode;
use easel_core::{ImageDefinition, NativeRequest, ValidateOptions};
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::checks::model_error;
use crate::error::ApiError;
use crate::inputs::{load_input, LoadedInput};
use crate::job::{InputRef, ItemSpec, LoraSpec, ModelSpec};
use crate::metrics::Metrics;
use crate::models::ModelRegistry;
use crate::store::{Admission, Admitted, AssetRow, GenerationRow, NewGeneration};
use crate::util::{new_id, now_ms};
use crate::AppState;

/// Where a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `POST /v1/generations`.
    Native,
    /// `POST /v1/images/generations` or `/v1/images/edits`.
    OpenAi,
    /// `POST /sdapi/v1/txt2img` or `/sdapi/v1/img2img` (AUTOMATIC1111's API).
    A1111,
    /// An `ImageGenerator` step of a flow run.
    Flow,
    /// `POST /api/rest/v1/generations` (Leonardo-style).
    Leonardo,
    /// `POST /api/v1/images/generation` (the serverless endpoint shape).
    Serverless,
    /// `POST /v1/predictions` or `/v1/models/{owner}/{name}/predictions`.
    Replicate,
}

impl Source {
    /// The name stored as the job's `source` (`native`, `openai`, `a1111`,
    /// `flow`, `leonardo`, `serverless`, `replicate`).
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Native => "native",
            Source::OpenAi => "openai",
            Source::A1111 => "a1111",
            Source::Flow => "flow",
            Source::Leonardo => "leonardo",
            Source::Serverless => "serverless",
            Source::Replicate => "replicate",
        }
    }
}

/// An input read for the job, stored when it is accepted.
#[derive(Debug, Clone)]
struct PendingInput {
    loaded: LoadedInput,
}

/// A request checked and ready to be accepted.
#[derive(Debug, Clone)]
pub struct Prepared {
    source: Source,
    items: Vec<ItemSpec>,
    /// For each item: indices into `inputs` of its image and mask.
    item_inputs: Vec<(Option<usize>, Option<usize>)>,
    inputs: Vec<PendingInput>,
    request_json: serde_json::Value,
    request_hash: String,
    idempotency_key: Option<String>,
    webhook: Option<String>,
    webhook_events: Vec<String>,
}

impl Prepared {
    /// Images the job will make.
    pub fn images_total(&self) -> u32 {
        self.items.iter().map(|i| i.batch_size).sum()
    }
}

/// SHA-256 of a request body, hex (to recognise a replayed idempotent request).
pub fn body_hash(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unsupported(field: String, message: impl Into<String>) -> ApiError {
    ApiError::invalid("unsupported_feature", field, message)
}

/// The LoRA of training `id` of `principal` at `scale`; `field` and
/// `unknown` name the field and say what is wrong when there is no such
/// training.
async fn training_lora(
    state: &AppState,
    principal: &Principal,
    id: &str,
    scale: f64,
    field: String,
    unknown: String,
) -> Result<LoraSpec, ApiError> {
    let training = state
        .store()
        .training(&principal.key_id, id.trim())
        .await?
        .ok_or_else(|| ApiError::invalid("unknown_training", field, unknown))?;
    // A local file of it (an S3 store's file is downloaded into the cache
    // now): the checks at submission read its header.
    let path = state
        .trainings()
        .local_file(&training.hash, "safetensors")
        .await
        .map_err(|e| ApiError::internal("reading a training", e))?;
    Ok(LoraSpec {
        url: None,
        source: format!("training:{}", training.id),
        path,
        scale,
        training: Some(training.hash),
    })
}

/// A `loras[].url` (an http(s) `.safetensors` URL or a Hugging Face repo id):
/// the LoRA cache path it is (or will be) downloaded to. A file already in
/// the cache is checked now; one that is not is downloaded by the worker
/// (refused here when the server is `offline`).
fn url_lora(state: &AppState, value: &str, scale: f64, field: &str) -> Result<LoraSpec, ApiError> {
    let url = crate::lora_cache::resolve_url(value)
        .map_err(|e| ApiError::invalid("invalid_value", field, e))?;
    let path = crate::lora_cache::url_path(&state.config().data_dir, &url);
    if path.is_file() {
        crate::lora_cache::check_lora(&path).map_err(|e| {
            ApiError::invalid(
                "invalid_value",
                field,
                format!("the cached file of `{value}` is not a usable LoRA: {e}"),
            )
        })?;
    } else if state.config().offline {
        return Err(ApiError::invalid(
            "invalid_value",
            field,
            format!(
                "`{value}` is not in this server's LoRA cache and the server does not \
                 download (offline = true)"
            ),
        ));
    }
    Ok(LoraSpec {
        source: value.to_string(),
        path,
        scale,
        url: Some(url),
        training: None,
    })
}

/// Check a native request for `principal` and read its inputs; stores nothing.
///
/// # Errors
/// The first problem found, as a 4xx [`ApiError`] naming the field.
pub async fn prepare(
    state: &AppState,
    principal: &Principal,
    request: &NativeRequest,
    source: Source,
    request_json: serde_json::Value,
    request_hash: String,
    idempotency_key: Option<String>,
) -> Result<Prepared, ApiError> {
    // 0. The top-level defaults on their own: a value out of range is
    // refused even when every image overrides it.
    request
        .defaults
        .validate_defaults(&ValidateOptions::default())?;
    // 1. The inference pack's definitions first, then the request's own.
    let mut definitions: Vec<(String, ImageDefinition)> = Vec::new();
    if let Some(pack_id) = &request.inference_pack_id {
        let pack = state
            .store()
            .pack(&principal.key_id, pack_id.trim())
            .await?
            .ok_or_else(|| {
                ApiError::invalid(
                    "unknown_inference_pack",
                    "inferencePackId",
                    format!("no inference pack with id `{pack_id}` (create one with POST /v1/inference-packs)"),
                )
            })?;
        let body: serde_json::Value = serde_json::from_str(&pack.body_json)
            .map_err(|e| ApiError::internal("reading an inference pack", e))?;
        let pack_request = NativeRequest::pack_from_json(body)
            .map_err(|e| ApiError::internal("reading an inference pack", e))?;
        for (i, image) in pack_request.images.iter().enumerate() {
            let merged = image
                .merged_over(&pack_request.defaults)
                .merged_over(&request.defaults);
            definitions.push((format!("inferencePack.images[{i}]"), merged));
        }
    }
    definitions.extend(request.merged_images());
    let limit = state.config().max_images_per_request;
    if definitions.len() > limit {
        return Err(ApiError::invalid(
            "too_many_images",
            "images",
            format!(
                "{} image definitions (with the inference pack's); at most {limit} per request",
                definitions.len()
            ),
        ));
    }
    if definitions.is_empty() {
        return Err(ApiError::invalid(
            "missing_field",
            "images",
            "no image definitions: give images[] (the inference pack is empty)",
        ));
    }

    // 2. Each definition: model, ranges, scheduler, LoRAs, inputs.
    let mut models: HashMap<String, ModelSpec> = HashMap::new();
    let mut inputs: Vec<PendingInput> = Vec::new();
    let mut input_index: HashMap<String, usize> = HashMap::new();
    let mut items = Vec::new();
    let mut item_inputs = Vec::new();
    let caps = state.capabilities();
    for (prefix, def) in definitions {
        let field = |name: &str| format!("{prefix}.{name}");
        // Presence first (prompt, baseModel), then the model, then ranges
        // with the model's size multiple.
        if def.prompt.is_none() || def.base_model.is_none() {
            def.validate(&ValidateOptions::default().field_prefix(prefix.clone()))?;
        }
        let reference = def.base_model.clone().unwrap_or_default();
        if reference.trim().is_empty() {
            def.validate(&ValidateOptions::default().field_prefix(prefix.clone()))?;
        }
        let model = match models.get(reference.trim()) {
            Some(m) => m.clone(),
            None => {
                let registry = state.models().clone();
                let r = reference.clone();
                let spec = tokio::task::spawn_blocking(move || registry.resolve(&r))
                    .await
                    .map_err(|e| ApiError::internal("resolving a model", e))?
                    .map_err(|e| model_error(e, field("baseModel")))?;
                models.insert(reference.trim().to_string(), spec.clone());
                spec
            }
        };
        let multiple = ModelRegistry::size_multiple(model.family());
        def.validate(
            &ValidateOptions::default()
                .size_multiple(multiple)
                .field_prefix(prefix.clone()),
        )?;
        if let Some(name) = &def.scheduler {
            crate::checks::check_scheduler(name, Some(&model), field("scheduler"))?;
        }

        // LoRAs: trainingId first, then loras[].
        let mut loras = Vec::new();
        if let Some(id) = &def.training_id {
            let lora = training_lora(
                state,
                principal,
                id,
                def.scale_or_default(),
                field("trainingId"),
                format!("no training with id `{id}` (upload one with POST /v1/trainings)"),
            )
            .await?;
            crate::checks::check_lora(&lora.path, field("trainingId"))?;
            loras.push(lora);
        }
        for (i, lora) in def.loras.iter().flatten().enumerate() {
            let lora_field = field(&format!("loras[{i}]"));
            let scale = lora
                .scale
                .unwrap_or(easel_core::request::DEFAULT_LORA_SCALE);
            if let Some(id) = &lora.id {
                let spec = training_lora(
                    state,
                    principal,
                    id,
                    scale,
                    format!("{lora_field}.id"),
                    format!("no training with id `{id}`"),
                )
                .await?;
                crate::checks::check_lora(&spec.path, format!("{lora_field}.id"))?;
                loras.push(spec);
            } else if let Some(path) = &lora.path {
                let registry = state.models().clone();
                let (p, f) = (path.clone(), format!("{lora_field}.path"));
                let canonical =
                    tokio::task::spawn_blocking(move || crate::checks::lora_path(&registry, &p, f))
                        .await
                        .map_err(|e| ApiError::internal("reading a LoRA", e))??;
                loras.push(LoraSpec {
                    source: path.clone(),
                    path: canonical,
                    scale,
                    url: None,
                    training: None,
                });
            } else if let Some(value) = &lora.url {
                loras.push(url_lora(state, value, scale, &format!("{lora_field}.url"))?);
            } else {
                return Err(ApiError::invalid(
                    "invalid_value",
                    lora_field,
                    "a LoRA needs one of `id`, `path` or `url`",
                ));
            }
        }
        if !loras.is_empty() && !caps.lora {
            let f = if def.training_id.is_some() {
                field("trainingId")
            } else {
                field("loras")
            };
            return Err(unsupported(
                f,
                "LoRA adapters are not supported by this engine build yet",
            ));
        }

        // Image inputs, read and decoded now; stored on acceptance.
        let mut refs = (None, None);
        for (name, value) in [("image", &def.image), ("mask", &def.mask)] {
            let Some(value) = value else { continue };
            let index = match input_index.get(value) {
                Some(&i) => i,
                None => {
                    let loaded = load_input(state, principal, value, &field(name)).await?;
                    inputs.push(PendingInput { loaded });
                    input_index.insert(value.clone(), inputs.len() - 1);
                    inputs.len() - 1
                }
            };
            if name == "image" {
                refs.0 = Some(index);
            } else {
                refs.1 = Some(index);
            }
        }

        // The engine's rules for these inputs on this model.
        crate::checks::check_definition(&def, &model, refs.0.is_some(), refs.1.is_some(), &field)?;
        if let (Some(i), Some(m)) = (refs.0, refs.1) {
            let dims = |i: usize| (inputs[i].loaded.width, inputs[i].loaded.height);
            crate::checks::check_mask_shape(dims(m), dims(i), field("mask"))?;
        }

        let (mut width, mut height) = def
            .explicit_size()
            .map_err(|e| ApiError::from(e.with_prefix(&prefix)))?;
        // With an init image and no size, the image sets the size, rounded
        // down to the model's size multiple: the engine's one rule, as in
        // diffusers and `easel generate`.
        if let Some(i) = refs.0 {
            let loaded = &inputs[i].loaded;
            let (w, h) = easel_diffusion::engine::init_image_size(
                (loaded.width as usize, loaded.height as usize),
                (width, height),
                multiple as usize,
            )
            .map_err(|e| match e {
                easel_diffusion::Error::InvalidArgument {
                    field: name,
                    message,
                } => ApiError::invalid("invalid_value", field(&name), message),
                other => ApiError::invalid("invalid_value", field("image"), other.to_string()),
            })?;
            (width, height) = (Some(w as u32), Some(h as u32));
        }
        let seed = def.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
        let mut definition = def.clone();
        definition.seed = Some(seed);
        items.push(ItemSpec {
            field: prefix.clone(),
            batch_size: def.batch_size_or_default(),
            definition,
            model,
            loras,
            seed,
            width,
            height,
            image: None,
            mask: None,
        });
        item_inputs.push(refs);
    }

    // 3. Webhook.
    if let Some(url) = &request.webhook {
        let ok = url::Url::parse(url)
            .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .unwrap_or(false);
        if !ok {
            return Err(ApiError::invalid(
                "invalid_value",
                "webhook",
                format!("`{url}` is not an http(s) URL"),
            ));
        }
        // Resolve and check the address now (no connection is made), so a
        // webhook to an internal address is refused before anything is stored.
        let fetcher = state.fetcher().clone();
        let target = url.clone();
        let checked = tokio::task::spawn_blocking(move || fetcher.check_url(&target))
            .await
            .map_err(|e| ApiError::internal("checking the webhook URL", e))?;
        if let Err(e) = checked {
            tracing::info!("webhook {url} refused: {}", e.detail);
            return Err(ApiError::invalid(
                "invalid_value",
                "webhook",
                format!(
                    "`{url}` cannot be used as a webhook: it does not resolve to an \
                     address this server may deliver to (public addresses, or those in \
                     allow_fetch_hosts)"
                ),
            ));
        }
    }
    let webhook_events = request
        .webhook_events
        .clone()
        .unwrap_or_else(|| vec!["completed".to_string()]);
    Ok(Prepared {
        source,
        items,
        item_inputs,
        inputs,
        request_json,
        request_hash,
        idempotency_key,
        webhook: request.webhook.clone(),
        webhook_events,
    })
}

trait BatchSizeOrDefault {
    fn batch_size_or_default(&self) -> u32;
}

impl BatchSizeOrDefault for ImageDefinition {
    fn batch_size_or_default(&self) -> u32 {
        self.batch_size
            .unwrap_or(easel_core::params::DEFAULT_BATCH_SIZE)
    }
}

/// The result of [`commit`]: the job, and whether it was created now (false:
/// an idempotent replay of an earlier request).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The job.
    pub job: GenerationRow,
    /// Created by this call.
    pub created: bool,
}

/// Accept a prepared request (see the module docs).
///
/// # Errors
/// 409 `idempotency_key_reused`, 429 `queue_full` (with `Retry-After`), 402
/// `insufficient_credit`, or a store failure.
pub async fn commit(
    state: &AppState,
    principal: &Principal,
    mut prepared: Prepared,
) -> Result<Committed, ApiError> {
    let store = state.store();
    // A retry of a request already accepted: answered before storing its
    // inputs again (checked once more, with the limits, inside the insert).
    if let Some(key) = &prepared.idempotency_key {
        if let Some(existing) = store
            .generation_by_idempotency_key(&principal.key_id, key)
            .await?
        {
            return same_request(existing, &prepared, key);
        }
    }
    let price = state.config().price_micros();
    // Store the inputs (files first), then the job in one transaction.
    let id = new_id();
    let now = now_ms();
    let mut written = Vec::new();
    let mut rows = Vec::new();
    let mut refs = Vec::new();
    for input in &prepared.inputs {
        let ext = input.loaded.format.extension();
        // The same bytes given twice (say as a data URL and as bare base64)
        // are one input asset.
        let hash = crate::assets::hash_bytes(&input.loaded.bytes);
        if let Some(same) = refs
            .iter()
            .find(|r: &&InputRef| r.hash == hash && r.extension == ext)
        {
            refs.push(same.clone());
            continue;
        }
        let existed = state
            .assets()
            .exists(&hash, ext)
            .await
            .map_err(|e| ApiError::internal("storing an input image", e))?;
        let stored = state
            .assets()
            .put(input.loaded.bytes.clone(), ext)
            .await
            .map_err(|e| ApiError::internal("storing an input image", e))?;
        if !existed {
            written.push((stored.hash.clone(), ext));
        }
        let asset_id = new_id();
        rows.push(AssetRow {
            id: asset_id.clone(),
            key_id: principal.key_id.clone(),
            kind: "input".into(),
            hash: stored.hash.clone(),
            extension: ext.into(),
            file_name: format!("input-{}.{ext}", &stored.hash[..12]),
            file_size: stored.size as i64,
            file_type: input.loaded.format.mime_type().into(),
            width: Some(i64::from(input.loaded.width)),
            height: Some(i64::from(input.loaded.height)),
            seed: None,
            generation_id: Some(id.clone()),
            item_idx: None,
            image_idx: None,
            created_at: now,
        });
        refs.push(InputRef {
            asset_id,
            hash: stored.hash,
            extension: ext.into(),
        });
    }
    for (item, (image, mask)) in prepared.items.iter_mut().zip(&prepared.item_inputs) {
        if let Some(i) = image {
            item.image = Some(refs[*i].clone());
            item.definition.image = Some(refs[*i].asset_id.clone());
        }
        if let Some(i) = mask {
            item.mask = Some(refs[*i].clone());
            item.definition.mask = Some(refs[*i].asset_id.clone());
        }
    }
    // The recorded request names inputs by asset id, not by their bytes.
    let request_json = redact_inputs(prepared.request_json.clone());
    let new = NewGeneration {
        id,
        key_id: principal.key_id.clone(),
        source: prepared.source.as_str().into(),
        request_json: request_json.to_string(),
        items: prepared.items.clone(),
        price_micros: price,
        idempotency_key: prepared.idempotency_key.clone(),
        request_hash: Some(prepared.request_hash.clone()),
        webhook_url: prepared.webhook.clone(),
        webhook_events: prepared.webhook_events.clone(),
        inputs: rows,
    };
    let admission = Admission {
        max_queue: i64::try_from(state.config().max_queue).unwrap_or(i64::MAX),
        credit_limit_micros: principal.credit_limit_micros,
    };
    let outcome = store.insert_generation(&new, admission).await;
    if !matches!(outcome, Ok(Admitted::Created(_))) {
        for (hash, ext) in written {
            state.assets().remove(&hash, ext).await;
        }
    }
    match outcome? {
        Admitted::Created(job) => {
            Metrics::inc(&state.metrics().jobs_accepted);
            state.worker().wake();
            Ok(Committed { job, created: true })
        }
        Admitted::Existing(existing) => {
            let key = prepared.idempotency_key.as_deref().unwrap_or_default();
            same_request(existing, &prepared, key)
        }
        Admitted::QueueFull { queued } => {
            Metrics::inc(&state.metrics().rejected_queue_full);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "the queue is full ({queued} jobs waiting, max_queue = {}); retry later",
                    state.config().max_queue
                ),
            );
            e.retry_after = Some(5);
            Err(e)
        }
        Admitted::InsufficientCredit { used_micros } => {
            Metrics::inc(&state.metrics().rejected_credit);
            let limit = principal.credit_limit_micros.unwrap_or_default();
            let cost = prepared.items.len() as i64 * price;
            Err(ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credit",
                format!(
                    "this request costs {:.2} USD ({} inferences at {:.2}); the key has {:.2} of its {:.2} USD credit left",
                    cost as f64 / 1e6,
                    prepared.items.len(),
                    price as f64 / 1e6,
                    (limit - used_micros).max(0) as f64 / 1e6,
                    limit as f64 / 1e6
                ),
            ))
        }
    }
}

/// The answer to a request whose `Idempotency-Key` (`key`) names job
/// `existing`: that job when the bodies match, else 409
/// `idempotency_key_reused`.
fn same_request(
    existing: GenerationRow,
    prepared: &Prepared,
    key: &str,
) -> Result<Committed, ApiError> {
    if existing.request_hash.as_deref() != Some(prepared.request_hash.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            format!(
                "Idempotency-Key `{key}` was used for a different request (job {}); \
                 use a new key for a new request",
                existing.id
            ),
        ));
    }
    Ok(Committed {
        job: existing,
        created: false,
    })
}

/// Replace long inline image data (data URIs, base64) in a request body by
/// a marker, so the recorded request stays small; the definitions keep the
/// input asset ids.
fn redact_inputs(mut value: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if (k == "image" || k == "mask")
                        && child.as_str().is_some_and(|s| s.len() > 256)
                    {
                        *child =
                            serde_json::Value::from("<inline image, stored as an input asset>");
                    } else {
                        walk(child);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}
