//! `/v1/assets` (a key's images) and `/v1/files/{name}` (files by content
//! hash, no API key: the URL is the capability).

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::http::{list_limit, list_offset, ApiQuery, BaseUrl};
use crate::store::AssetFilter;
use crate::views::{AssetRecord, ListOf};
use crate::AppState;

/// Query of `GET /v1/assets`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AssetQuery {
    /// Only the outputs of this job.
    pub generation: Option<String>,
    /// At most this many, 1..=500 (default 50) when no job is given.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Skip this many of the newest (paging; default 0) when no job is given.
    #[param(minimum = 0)]
    pub offset: Option<i64>,
    /// Only outputs whose image definition's prompt contains this text
    /// (ASCII case-insensitive) when no job is given.
    pub prompt: Option<String>,
    /// Only outputs of definitions whose `baseModel` is this, as requested
    /// (a `GET /v1/models` id), when no job is given.
    pub model: Option<String>,
}

#[utoipa::path(get, path = "/v1/assets", tag = "assets", params(AssetQuery),
    responses((status = 200, body = ListOf<AssetRecord>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn list_assets(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    ApiQuery(query): ApiQuery<AssetQuery>,
) -> Result<Json<ListOf<AssetRecord>>, ApiError> {
    let limit = list_limit(query.limit, 50, 1..=500)?;
    let rows = match &query.generation {
        Some(id) => {
            let owned = state
                .store()
                .generation(id)
                .await?
                .is_some_and(|g| g.key_id == principal.key_id);
            if !owned {
                return Err(ApiError::not_found("generation", id));
            }
            state.store().assets_of(id).await?
        }
        None => {
            let offset = list_offset(query.offset)?;
            let filter = AssetFilter {
                limit,
                offset,
                prompt: query.prompt.as_deref().filter(|p| !p.is_empty()),
                model: query.model.as_deref().filter(|m| !m.is_empty()),
            };
            state
                .store()
                .assets_page(&principal.key_id, &filter)
                .await?
        }
    };
    Ok(Json(ListOf::new(
        rows.iter().map(|a| AssetRecord::new(a, &base)).collect(),
    )))
}

#[utoipa::path(delete, path = "/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id (an output of this key)")),
    responses((status = 204, description = "Deleted: gone from lists and job records; the file \
        is removed unless another record names the same content (or a job is queued or running, \
        then the next start's sweep removes it)"),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn delete_asset(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (row, shared) = state
        .store()
        .delete_output_asset(&principal.key_id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("asset", &id))?;
    // A running job may be storing the same bytes right now (files by
    // content): keep the file then; the start-up sweep removes orphans.
    let (queued, running) = state.store().counts().await?;
    if !shared && queued == 0 && running == 0 {
        state.assets().remove(&row.hash, &row.extension).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn owned_asset(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<crate::store::AssetRow, ApiError> {
    state
        .store()
        .asset(id)
        .await?
        .filter(|a| a.key_id == principal.key_id)
        .ok_or_else(|| ApiError::not_found("asset", id))
}

#[utoipa::path(get, path = "/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id")),
    responses((status = 200, body = AssetRecord), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_asset(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    BaseUrl(base): BaseUrl,
    Path(id): Path<String>,
) -> Result<Json<AssetRecord>, ApiError> {
    let a = owned_asset(&state, &principal, &id).await?;
    Ok(Json(AssetRecord::new(&a, &base)))
}

async fn file_response(
    state: &AppState,
    hash: &str,
    ext: &str,
    mime: &str,
) -> Result<Response, ApiError> {
    // Bytes through the store, whatever keeps them (folder or bucket); a
    // store that cannot be read is a 500, a file that is not there a 404.
    let bytes = match state.assets().get(hash, ext).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(ApiError::not_found("file", hash)),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(ApiError::not_found("file", hash))
        }
        Err(e) => return Err(ApiError::internal("reading a file", e)),
    };
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{hash}\"")) {
        h.insert(header::ETAG, v);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/assets/{id}/file", tag = "assets",
    params(("id" = String, Path, description = "Asset id")),
    responses((status = 200, description = "The image, with its content type"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn get_asset_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let a = owned_asset(&state, &principal, &id).await?;
    file_response(&state, &a.hash, &a.extension, &a.file_type).await
}

#[utoipa::path(get, path = "/v1/files/{name}", tag = "assets",
    params(("name" = String, Path, description = "`<content hash>.<ext>` as in an asset's `file_url`")),
    responses((status = 200, description = "The image, with its content type (no API key: the URL names the content hash)"),
              (status = 404, body = ErrorBody)))]
pub(super) async fn get_file(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (hash, ext) = name
        .split_once('.')
        .ok_or_else(|| ApiError::not_found("file", &name))?;
    let asset = state
        .store()
        .asset_by_hash(hash)
        .await?
        .filter(|a| a.extension == ext)
        .ok_or_else(|| ApiError::not_found("file", &name))?;
    file_response(&state, hash, ext, &asset.file_type).await
}
