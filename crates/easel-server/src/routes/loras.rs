//! `GET /v1/loras`: the LoRA files of the model folders, by name.

use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::lora_list::{list_loras as list, LoraEntry};
use crate::views::ListOf;
use crate::AppState;

#[utoipa::path(get, path = "/v1/loras", tag = "models",
    responses((status = 200, description = "The LoRA files of the model roots' A1111 `Lora` / \
        ComfyUI `loras` folders; `id` is what `loras[].path` takes (uploaded LoRAs are \
        `GET /v1/trainings`)", body = ListOf<LoraEntry>)),
    security(("bearer" = [])))]
pub(super) async fn list_loras(
    State(state): State<AppState>,
) -> Result<Json<ListOf<LoraEntry>>, ApiError> {
    let config = state.config().clone();
    let entries = tokio::task::spawn_blocking(move || list(&config))
        .await
        .map_err(|e| ApiError::internal("listing LoRAs", e))?;
    Ok(Json(ListOf::new(entries)))
}
