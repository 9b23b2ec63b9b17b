//! The router, assembled from one module per resource. Handlers depend on
//! [`crate::http`] (extractors, helpers) and the services ([`crate::jobs`],
//! [`crate::submit`], [`crate::trainings`], [`crate::flows`]); nothing
//! outside this module imports from it except [`crate::app`] and the error
//! shaping middleware (the OpenAI error body).

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

use crate::auth::require_key;
use crate::error::ApiError;
use crate::AppState;

pub mod a1111;
pub mod assets;
pub mod compat_models;
pub mod flows;
pub mod generations;
pub mod leonardo;
pub mod loras;
pub mod models;
pub mod openai;
pub mod openapi;
pub mod ops;
pub mod packs;
pub mod replicate;
pub mod serverless;
pub mod trainings;
pub mod ui;
pub mod usage;

/// The router: public operational routes, the file route (capability
/// URLs), and the `/v1` API behind the API-key middleware.
pub fn router(state: AppState) -> Router {
    let limit = state.config().max_body_bytes;
    let authed = Router::new()
        .route(
            "/v1/generations",
            post(generations::create_generation).get(generations::list_generations),
        )
        .route("/v1/generations/{id}", get(generations::get_generation))
        .route(
            "/v1/generations/{id}/events",
            get(generations::generation_events),
        )
        .route(
            "/v1/generations/{id}/cancel",
            post(generations::cancel_generation),
        )
        .route("/v1/assets", get(assets::list_assets))
        .route(
            "/v1/assets/{id}",
            get(assets::get_asset).delete(assets::delete_asset),
        )
        .route("/v1/assets/{id}/file", get(assets::get_asset_file))
        .route("/v1/models", get(models::list_models))
        .route("/v1/loras", get(loras::list_loras))
        .route(
            "/v1/trainings",
            post(trainings::create_training).get(trainings::list_trainings),
        )
        .route(
            "/v1/trainings/{id}",
            get(trainings::get_training).delete(trainings::delete_training),
        )
        .route(
            "/v1/inference-packs",
            post(packs::create_pack).get(packs::list_packs),
        )
        .route(
            "/v1/inference-packs/{id}",
            get(packs::get_pack).delete(packs::delete_pack),
        )
        .route("/v1/usage", get(usage::get_usage))
        .route("/v1/usage/ledger", get(usage::get_ledger))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route(
            "/api/rest/v1/generations",
            post(leonardo::create_generation),
        )
        .route(
            "/api/rest/v1/generations/{id}",
            get(leonardo::get_generation),
        )
        .route("/api/v1/images/generation", post(serverless::generate))
        .route(
            "/v1/predictions",
            post(replicate::create_prediction).get(replicate::list_predictions),
        )
        .route("/v1/predictions/{id}", get(replicate::get_prediction))
        .route(
            "/v1/webhooks/default/secret",
            get(replicate::webhook_secret),
        )
        .route(
            "/v1/predictions/{id}/cancel",
            post(replicate::cancel_prediction),
        )
        .route(
            "/v1/models/{owner}/{name}/predictions",
            post(replicate::create_model_prediction),
        )
        .route("/v1/flows", post(flows::create_flow).get(flows::list_flows))
        .route(
            "/v1/flows/{id}",
            get(flows::get_flow).delete(flows::delete_flow),
        )
        .route(
            "/v1/flows/{id}/runs",
            post(flows::create_run).get(flows::list_runs),
        )
        .route("/v1/flow-runs/{id}", get(flows::get_run))
        .route("/v1/flow-runs/{id}/events", get(flows::run_events))
        .route("/v1/flow-runs/{id}/cancel", post(flows::cancel_run))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/png-info", post(a1111::info::png_info))
        .route("/sdapi/v1/upscalers", get(a1111::info::upscalers))
        .route("/sdapi/v1/scripts", get(a1111::info::scripts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs_page))
        .route("/", get(ui::index))
        .route("/ui/{name}", get(ui::ui_file))
        .route("/v1/files/{name}", get(assets::get_file))
        .merge(authed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(crate::error_shape::shape_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /docs or /openapi.json",
    )
}
