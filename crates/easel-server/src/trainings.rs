//! Registering a LoRA file as a training: what `POST /v1/trainings` and
//! the flows' `RegisterTraining` step both do.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::TrainingRow;
use crate::util::{new_id, now_ms};
use crate::AppState;

/// Whether safetensors `bytes` are a LoRA file the engine can apply: its
/// header's keys must be of a layout the engine reads, each module with its
/// down and up matrix ([`easel_diffusion::lora::check_lora_bytes`], the same
/// rule as for `loras[].path` at submission and as the worker applies).
fn check_lora_file(bytes: &[u8]) -> Result<(), String> {
    easel_diffusion::lora::check_lora_bytes(std::path::Path::new("the uploaded file"), bytes)
        .map_err(|e| crate::checks::engine_message(&e))
}

/// Store a LoRA file as a training of `principal` (what `POST
/// /v1/trainings` and the flows' `RegisterTraining` step do): the base model
/// must resolve, the file must hold LoRA weights.
///
/// # Errors
/// 403 `path_not_allowed` / 422 `unknown_model` for `baseModel`, 422
/// `invalid_value` for `file`, or a store failure.
pub async fn register_training(
    state: &AppState,
    principal: &Principal,
    bytes: Vec<u8>,
    name: Option<String>,
    base_model: String,
) -> Result<TrainingRow, ApiError> {
    let registry = state.models().clone();
    let b = base_model.clone();
    tokio::task::spawn_blocking(move || registry.resolve(&b))
        .await
        .map_err(|e| ApiError::internal("resolving a model", e))?
        .map_err(|e| crate::checks::model_error(e, "baseModel".into()))?;
    let check = tokio::task::spawn_blocking(move || check_lora_file(&bytes).map(|_| bytes))
        .await
        .map_err(|e| ApiError::internal("reading a LoRA", e))?;
    let bytes = check.map_err(|m| ApiError::invalid("invalid_value", "file", m))?;
    let stored = state
        .trainings()
        .put(bytes, "safetensors")
        .await
        .map_err(|e| ApiError::internal("storing a LoRA", e))?;
    let row = TrainingRow {
        id: new_id(),
        key_id: principal.key_id.clone(),
        name: name.unwrap_or_else(|| "lora".into()),
        base_model,
        hash: stored.hash,
        file_size: stored.size as i64,
        created_at: now_ms(),
    };
    state.store().insert_training(&row).await?;
    Ok(row)
}
