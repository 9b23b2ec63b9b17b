//! `GET /v1/usage`: a key's charges, refunds and credit;
//! `GET /v1/usage/ledger`: its ledger entries.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{list_limit, list_offset, ApiQuery};
use crate::util::{rfc3339, usd};
use crate::views::{LedgerEntry, ListOf, UsageRecord};
use crate::AppState;

/// Query of `GET /v1/usage/ledger`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// At most this many, 1..=500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Skip this many of the newest (paging; default 0).
    #[param(minimum = 0)]
    pub offset: Option<i64>,
}

#[utoipa::path(get, path = "/v1/usage/ledger", tag = "billing", params(LedgerQuery),
    responses((status = 200, description = "The key's ledger entries (a job's charge when it \
        was accepted, its refund when definitions made no image), newest first",
        body = ListOf<LedgerEntry>)),
    security(("bearer" = [])))]
pub(super) async fn get_ledger(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(query): ApiQuery<LedgerQuery>,
) -> Result<Json<ListOf<LedgerEntry>>, ApiError> {
    let limit = list_limit(query.limit, 50, 1..=500)?;
    let offset = list_offset(query.offset)?;
    let rows = state
        .store()
        .ledger(&principal.key_id, limit, offset)
        .await?;
    Ok(Json(ListOf::new(
        rows.iter()
            .map(|r| LedgerEntry {
                object: "ledger_entry".into(),
                generation_id: r.generation_id.clone(),
                kind: r.kind.clone(),
                inferences: r.inferences,
                amount_usd: usd(r.amount_micros),
                created_at: rfc3339(r.created_at),
            })
            .collect(),
    )))
}

#[utoipa::path(get, path = "/v1/usage", tag = "billing",
    responses((status = 200, body = UsageRecord)), security(("bearer" = [])))]
pub(super) async fn get_usage(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<UsageRecord>, ApiError> {
    let u = state.store().usage(&principal.key_id).await?;
    let used = u.charged_micros - u.refunded_micros;
    Ok(Json(UsageRecord {
        key_id: principal.key_id.clone(),
        price_per_inference_usd: usd(state.config().price_micros()),
        inferences_charged: u.inferences_charged,
        inferences_refunded: u.inferences_refunded,
        inferences_billed: u.inferences_charged - u.inferences_refunded,
        images_generated: u.images_generated,
        charged_usd: usd(u.charged_micros),
        refunded_usd: usd(u.refunded_micros),
        used_usd: usd(used),
        credit_limit_usd: principal.credit_limit_micros.map(usd),
        credit_remaining_usd: principal
            .credit_limit_micros
            .map(|l| usd((l - used).max(0))),
    }))
}
