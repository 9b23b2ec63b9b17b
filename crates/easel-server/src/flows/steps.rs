//! The flow step types that need the server: the image backend of
//! `ImageGenerator` (and of `ImageGeneration`, [`crate::flows::image_generation`])
//! and `RegisterTraining`.

use std::sync::Arc;
use std::time::Duration;

use easel_flow::{
    ImageBackend, ImageJobResult, ParamError, ParamPath, Step, StepContext, StepError, StepOutput,
    StepRegistry,
};
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::job::JobStatus;
use crate::jobs::{cancel_job, load_record};
use crate::submit::{body_hash, commit, prepare, Source};
use crate::trainings::register_training;
use crate::views::TrainingRecord;
use crate::{AppState, JobEvent};

/// The step types of a run of `principal` on this server.
pub fn step_registry(state: &AppState, principal: &Principal) -> StepRegistry {
    let backend = Arc::new(ServerImageBackend {
        state: state.clone(),
        principal: principal.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let mut registry = StepRegistry::standard(backend.clone(), state.config().chat_config());
    registry.register(
        crate::flows::image_generation::STEP_TYPE,
        crate::flows::image_generation::ImageGeneration::new(
            backend,
            state.config().default_model.clone(),
        ),
    );
    registry.register(
        "RegisterTraining",
        RegisterTraining {
            state: state.clone(),
            principal: principal.clone(),
            runtime: tokio::runtime::Handle::current(),
        },
    );
    registry
}

/// The [`ImageBackend`] of flow runs: each request is one job of the run's
/// key in the server's queue (see the module docs).
pub struct ServerImageBackend {
    state: AppState,
    principal: Principal,
    runtime: tokio::runtime::Handle,
}

/// A request error as a step error: `parameters.<field>: <message>`.
fn api_step_error(e: ApiError) -> StepError {
    match e.field {
        Some(f) => StepError::failed(format!("parameters.{f}: {}", e.message)),
        None => StepError::failed(e.message),
    }
}

impl ImageBackend for ServerImageBackend {
    fn check_static(&self, parameters: &Value) -> Vec<ParamError> {
        // Model folders and LoRA headers are small reads: done in place.
        match crate::checks::check_flow_request(self.state.models(), parameters) {
            Ok(()) => Vec::new(),
            Err(e) => {
                let path = match e.field.as_deref() {
                    Some(f) if !f.is_empty() => ParamPath::field(&format!("parameters.{f}")),
                    _ => ParamPath::root(),
                };
                vec![ParamError::new(path, e.message)]
            }
        }
    }

    fn generate(&self, request: Value, ctx: &StepContext<'_>) -> Result<ImageJobResult, StepError> {
        let state = &self.state;
        let bytes = serde_json::to_vec(&request).unwrap_or_default();
        let hash = body_hash(&bytes);
        // One idempotency key per run and step: a run resumed after a
        // restart finds the job its step already submitted (same request)
        // and waits for it instead of submitting the work again.
        let key = format!("flow-run:{}:step:{}", ctx.run_id(), ctx.step_index());
        let job_id = self.runtime.block_on(async {
            let existing = state
                .store()
                .generation_by_idempotency_key(&self.principal.key_id, &key)
                .await
                .map_err(|e| StepError::failed(format!("job store: {e}")))?;
            let key = match existing {
                Some(job) if job.request_hash.as_deref() == Some(hash.as_str()) => {
                    return Ok(job.id);
                }
                // Another request under this key: submit without one.
                Some(_) => None,
                None => Some(key),
            };
            let native = easel_core::NativeRequest::from_json(request.clone())
                .map_err(|e| api_step_error(ApiError::from(e)))?;
            let prepared = prepare(
                state,
                &self.principal,
                &native,
                Source::Flow,
                request,
                hash,
                key,
            )
            .await
            .map_err(api_step_error)?;
            let committed = commit(state, &self.principal, prepared)
                .await
                .map_err(api_step_error)?;
            Ok::<_, StepError>(committed.job.id)
        })?;
        ctx.log(format!("job {job_id}"));
        let mut events = state.subscribe();
        let mut canceled = false;
        loop {
            let status = self
                .runtime
                .block_on(async { state.store().generation(&job_id).await })
                .map_err(|e| StepError::failed(format!("job store: {e}")))?
                .map(|g| g.status);
            if status.is_none_or(|s| s.is_terminal()) {
                break;
            }
            if state.is_shutting_down() {
                // The worker re-queues the job; the run's stored record stays
                // `running` (checkpoints stop), so it resumes at the next start.
                return Err(StepError::failed(
                    "the server is stopping; this run resumes when it starts again",
                ));
            }
            if ctx.is_canceled() && !canceled {
                canceled = true;
                let _ = self.runtime.block_on(cancel_job(state, &job_id));
            }
            let next = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(250), events.recv()).await
            });
            if let Ok(Ok(JobEvent::Progress { id, progress })) = next {
                if id == job_id {
                    // done / total in images; the message adds the
                    // denoising step of the batch running now.
                    let note = format!(
                        "{} of {} images done; {} step {}/{}",
                        progress.images_done,
                        progress.images_total,
                        progress.stage,
                        progress.step,
                        progress.steps
                    );
                    ctx.progress(
                        u64::from(progress.images_done),
                        u64::from(progress.images_total),
                        Some(&note),
                    );
                }
            }
        }
        let record = self
            .runtime
            .block_on(async { load_record(state, &job_id, &state.default_base_url()).await })
            .map_err(|e| StepError::failed(format!("job store: {e}")))?
            .ok_or_else(|| StepError::failed(format!("job {job_id} vanished")))?;
        match record.status {
            JobStatus::Succeeded => {
                let assets = record
                    .assets
                    .iter()
                    .map(|a| {
                        serde_json::to_value(a)
                            .and_then(serde_json::from_value)
                            .map_err(|e| StepError::failed(format!("asset record: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ImageJobResult { job_id, assets })
            }
            JobStatus::Canceled if canceled || ctx.is_canceled() => Err(StepError::canceled()),
            status => {
                let why = record
                    .error
                    .map(|e| match e.field {
                        Some(f) => format!("parameters.{f}: {}", e.message),
                        None => e.message,
                    })
                    .unwrap_or_default();
                Err(StepError::failed(format!(
                    "job {job_id} {}: {why}",
                    status.as_str()
                )))
            }
        }
    }
}

/// `RegisterTraining`: store a LoRA file as a training of the run's key and
/// return its record (`{ id, name, base_model, ... }`), so later steps use
/// `trainingId: '$.results.<step>.id'` (the `myTrainingStep` of the
/// ImageGenerator seed document's trained-model flow).
///
/// Parameters: `file` (a local `.safetensors` path under the server's model
/// roots, as `loras[].path`), `baseModel` (the model it is for; must
/// resolve), `name` (optional).
pub struct RegisterTraining {
    state: AppState,
    principal: Principal,
    runtime: tokio::runtime::Handle,
}

impl Step for RegisterTraining {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let root = ParamPath::root();
        let Some(map) = parameters.as_object() else {
            return Err(vec![ParamError::new(
                root,
                "must be an object with `file` and `baseModel`",
            )]);
        };
        let mut errors = Vec::new();
        for key in map.keys() {
            if !matches!(key.as_str(), "file" | "baseModel" | "name") {
                errors.push(ParamError::new(
                    root.key(key),
                    "unknown parameter (allowed: file, baseModel, name)",
                ));
            }
        }
        for key in ["file", "baseModel"] {
            match map.get(key) {
                None => errors.push(ParamError::new(root.key(key), "missing")),
                Some(v) if !v.is_string() && !easel_flow::is_dynamic(v) => {
                    errors.push(ParamError::new(root.key(key), "must be a string"))
                }
                Some(_) => {}
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors),
        }
    }

    fn run(&self, parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let text = |key: &str| -> Result<Option<String>, StepError> {
            match parameters.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(StepError::failed(format!(
                    "parameters.{key}: must be a string"
                ))),
            }
        };
        let file = text("file")?.ok_or_else(|| StepError::failed("parameters.file: missing"))?;
        let base_model =
            text("baseModel")?.ok_or_else(|| StepError::failed("parameters.baseModel: missing"))?;
        let path = self
            .state
            .models()
            .check_path(&file)
            .map_err(|e| StepError::failed(format!("parameters.file: {e}")))?;
        if !path.is_file() || path.extension().is_none_or(|e| e != "safetensors") {
            return Err(StepError::failed(format!(
                "parameters.file: `{file}` is not a .safetensors file"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            StepError::failed(format!("parameters.file: cannot read `{file}`: {e}"))
        })?;
        let name =
            text("name")?.or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()));
        let row = self
            .runtime
            .block_on(register_training(
                &self.state,
                &self.principal,
                bytes,
                name,
                base_model,
            ))
            .map_err(|e| {
                let field = match e.field.as_deref() {
                    Some("baseModel") => "baseModel",
                    _ => "file",
                };
                StepError::failed(format!("parameters.{field}: {}", e.message))
            })?;
        let record = serde_json::to_value(TrainingRecord::from(&row))
            .map_err(|e| StepError::failed(e.to_string()))?;
        Ok(record.into())
    }
}
