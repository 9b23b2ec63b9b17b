//! `/v1/inference-packs`: saved image definitions a request can run.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use easel_core::{ImageDefinition, NativeRequest, ValidateOptions};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::http::{invalid_json, json_response, RawBody};
use crate::store::PackRow;
use crate::util::{new_id, now_ms};
use crate::views::{ListOf, PackRecord};
use crate::AppState;

#[utoipa::path(post, path = "/v1/inference-packs", tag = "inference packs",
    request_body = crate::views::PackRequestDoc,
    responses((status = 201, body = PackRecord), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(invalid_json)?;
    let name = match value.as_object_mut().and_then(|m| m.remove("name")) {
        Some(serde_json::Value::String(n)) if !n.trim().is_empty() => n,
        Some(serde_json::Value::String(_)) | None => {
            return Err(ApiError::invalid(
                "missing_field",
                "name",
                "give the pack a name",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_type",
                "name",
                "invalid type: expected a string",
            ))
        }
    };
    let pack = NativeRequest::pack_from_json(value.clone())?;
    if pack.images.is_empty() {
        return Err(ApiError::invalid(
            "missing_field",
            "images",
            "a pack needs at least one image definition",
        ));
    }
    if pack.images.len() > state.config().max_images_per_request {
        return Err(ApiError::invalid(
            "too_many_images",
            "images",
            format!(
                "at most {} image definitions",
                state.config().max_images_per_request
            ),
        ));
    }
    pack.defaults
        .validate_defaults(&ValidateOptions::default())?;
    // Ranges now; prompt and baseModel may come from the request that uses it.
    for (i, image) in pack.images.iter().enumerate() {
        let mut merged: ImageDefinition = image.merged_over(&pack.defaults);
        merged.prompt.get_or_insert_with(String::new);
        merged.base_model.get_or_insert_with(|| "-".into());
        merged.validate(&ValidateOptions::default().field_prefix(format!("images[{i}]")))?;
    }
    let row = PackRow {
        id: new_id(),
        key_id: principal.key_id.clone(),
        name,
        body_json: value.to_string(),
        image_count: pack.images.len() as i64,
        created_at: now_ms(),
    };
    state.store().insert_pack(&row).await?;
    Ok(json_response(StatusCode::CREATED, PackRecord::from(&row)))
}

#[utoipa::path(get, path = "/v1/inference-packs", tag = "inference packs",
    responses((status = 200, body = ListOf<PackRecord>)), security(("bearer" = [])))]
pub(super) async fn list_packs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ListOf<PackRecord>>, ApiError> {
    let rows = state.store().packs(&principal.key_id).await?;
    Ok(Json(ListOf::new(
        rows.iter().map(PackRecord::from).collect(),
    )))
}

#[utoipa::path(get, path = "/v1/inference-packs/{id}", tag = "inference packs",
    params(("id" = String, Path, description = "Pack id")),
    responses((status = 200, body = PackRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<PackRecord>, ApiError> {
    let row = state
        .store()
        .pack(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("inference pack", &id))?;
    Ok(Json(PackRecord::from(&row)))
}

#[utoipa::path(delete, path = "/v1/inference-packs/{id}", tag = "inference packs",
    params(("id" = String, Path, description = "Pack id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn delete_pack(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.store().delete_pack(&principal.key_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("inference pack", &id))
    }
}
