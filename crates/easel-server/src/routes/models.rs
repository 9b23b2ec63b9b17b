//! `GET /v1/models`: registry names and local models.

use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::models::ModelEntry;
use crate::views::ListOf;
use crate::AppState;

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "Registry names and local models; `loaded` marks those in the worker's cache", body = ListOf<ModelEntry>)),
    security(("bearer" = [])))]
pub(super) async fn list_models(
    State(state): State<AppState>,
) -> Result<Json<ListOf<ModelEntry>>, ApiError> {
    let loaded: Vec<String> = state
        .worker()
        .loaded()
        .into_iter()
        .map(|m| m.load)
        .collect();
    let registry = state.models().clone();
    let list = tokio::task::spawn_blocking(move || registry.list(&loaded))
        .await
        .map_err(|e| ApiError::internal("listing models", e))?;
    Ok(Json(ListOf::new(list)))
}
