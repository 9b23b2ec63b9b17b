//! Model choice for the compatibility surfaces whose clients name models by
//! the hosted service's ids (Leonardo's `modelId` / `sd_version`, the
//! serverless endpoint's `model_name`), which no easel server holds.
//!
//! The rule, in order:
//! 1. the id itself, when it resolves as an easel model reference: a
//!    `[models]` registry name (so `"b24e16ff-..." = "org/repo"` in the
//!    config maps a Leonardo UUID), a Hugging Face repo id in the cache, or a
//!    model folder / file name under the model roots;
//! 2. else a model of the id's family ([`ModelFamily`]): `default_model`
//!    when it is of that family, else the first model `GET /v1/models`
//!    lists with that family; among them the first whose name contains one
//!    of the `prefer` words (`schnell`, `dev`, ...) wins.
//!
//! A family is known from the model's `model_index.json` class
//! (diffusers' `_class_name`); models whose class is unknown before loading
//! are not chosen by family.

use easel_diffusion::loader::ModelFamily;

use crate::error::ApiError;
use crate::AppState;

/// Whether `reference` resolves as an easel model (rule 1).
pub async fn resolves(state: &AppState, reference: &str) -> Result<bool, ApiError> {
    let registry = state.models().clone();
    let r = reference.to_string();
    tokio::task::spawn_blocking(move || registry.resolve(&r).is_ok())
        .await
        .map_err(|e| ApiError::internal("resolving a model", e))
}

/// The family of the easel model `reference`, when it resolves and its
/// class is known.
pub async fn family_of(state: &AppState, reference: &str) -> Result<Option<ModelFamily>, ApiError> {
    let registry = state.models().clone();
    let r = reference.to_string();
    tokio::task::spawn_blocking(move || registry.resolve(&r).ok().and_then(|s| s.family()))
        .await
        .map_err(|e| ApiError::internal("resolving a model", e))
}

/// A model of `family` (rule 2), preferring names that contain a word of
/// `prefer` (case-insensitive); `None` when the server has none.
pub async fn model_of_family(
    state: &AppState,
    family: ModelFamily,
    prefer: &'static [&'static str],
) -> Result<Option<String>, ApiError> {
    let registry = state.models().clone();
    let default = state.config().default_model.clone();
    let loaded: Vec<String> = Vec::new();
    tokio::task::spawn_blocking(move || {
        let mut candidates: Vec<String> = Vec::new();
        if let Some(d) = default {
            if registry.resolve(&d).ok().and_then(|s| s.family()) == Some(family) {
                candidates.push(d);
            }
        }
        for entry in registry.list(&loaded) {
            let entry_family = entry
                .pipeline_class
                .as_deref()
                .and_then(ModelFamily::from_class_name);
            if entry_family == Some(family) && !candidates.contains(&entry.id) {
                candidates.push(entry.id);
            }
        }
        let preferred = candidates.iter().find(|c| {
            let lower = c.to_ascii_lowercase();
            prefer.iter().any(|p| lower.contains(p))
        });
        preferred.or(candidates.first()).cloned()
    })
    .await
    .map_err(|e| ApiError::internal("listing models", e))
}
