//! `/v1/trainings`: upload, list, read and delete LoRA files (storing one
//! is [`crate::trainings::register_training`]).

use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::http::{body_error, json_response};
use crate::trainings::register_training;
use crate::views::{ListOf, TrainingRecord};
use crate::AppState;

#[utoipa::path(post, path = "/v1/trainings", tag = "trainings",
    request_body(content_type = "multipart/form-data", description = "`file`: the LoRA `.safetensors`; `baseModel`: the model it was trained on; `name` (optional)"),
    responses((status = 201, body = TrainingRecord), (status = 422, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send multipart/form-data with `file` and `baseModel`: {e}"),
        )
    })?;
    let (mut file, mut base_model, mut name, mut file_name) = (None, None, None, None);
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "file" => {
                file_name = field.file_name().map(str::to_string);
                file = Some(field.bytes().await.map_err(multipart_error)?);
            }
            "baseModel" | "base_model" => {
                base_model = Some(field.text().await.map_err(multipart_error)?)
            }
            "name" => name = Some(field.text().await.map_err(multipart_error)?),
            other => {
                return Err(ApiError::invalid(
                    "unknown_field",
                    other,
                    "unknown form field (allowed: file, baseModel, name)",
                ))
            }
        }
    }
    let file = file.ok_or_else(|| {
        ApiError::invalid(
            "missing_field",
            "file",
            "upload the LoRA .safetensors as `file`",
        )
    })?;
    let base_model = base_model
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "missing_field",
                "baseModel",
                "give the base model the LoRA is for",
            )
        })?;
    let name = name.filter(|n| !n.trim().is_empty()).or(file_name);
    let row = register_training(&state, &principal, file.to_vec(), name, base_model).await?;
    Ok(json_response(
        StatusCode::CREATED,
        TrainingRecord::from(&row),
    ))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    body_error(e.status(), e.body_text())
}

#[utoipa::path(get, path = "/v1/trainings", tag = "trainings",
    responses((status = 200, body = ListOf<TrainingRecord>)), security(("bearer" = [])))]
pub(super) async fn list_trainings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ListOf<TrainingRecord>>, ApiError> {
    let rows = state.store().trainings(&principal.key_id).await?;
    Ok(Json(ListOf::new(
        rows.iter().map(TrainingRecord::from).collect(),
    )))
}

#[utoipa::path(get, path = "/v1/trainings/{id}", tag = "trainings",
    params(("id" = String, Path, description = "Training id")),
    responses((status = 200, body = TrainingRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TrainingRecord>, ApiError> {
    let row = state
        .store()
        .training(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("training", &id))?;
    Ok(Json(TrainingRecord::from(&row)))
}

#[utoipa::path(delete, path = "/v1/trainings/{id}", tag = "trainings",
    params(("id" = String, Path, description = "Training id")),
    responses((status = 204, description = "Deleted (jobs already accepted keep their copy)"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn delete_training(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (row, shared) = state
        .store()
        .delete_training(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("training", &id))?;
    // Queued jobs name the file by path: keep it while any job may need it.
    let (queued, running) = state.store().counts().await?;
    if !shared && queued == 0 && running == 0 {
        state.trainings().remove(&row.hash, "safetensors").await;
    }
    Ok(StatusCode::NO_CONTENT)
}
