//! `GET /v1/usage`: a key's charges, refunds and credit.

use axum::extract::State;
use axum::{Extension, Json};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::util::usd;
use crate::views::UsageRecord;
use crate::AppState;

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
