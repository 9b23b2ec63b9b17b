//! Operational routes: `/healthz`, `/readyz`, `/metrics` (no API key).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::{ApiError, ErrorBody};
use crate::metrics::Gauges;
use crate::AppState;

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up")))]
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready: the store answers and the workers run; `workers` lists each engine worker's device, whether it is busy and how many models it holds"),
              (status = 503, description = "Not ready", body = ErrorBody)))]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        );
        e.retry_after = Some(5);
        return e.into_response();
    }
    match state.store().counts().await {
        Ok((queued, running)) => {
            let workers: Vec<serde_json::Value> = state
                .worker()
                .workers()
                .into_iter()
                .map(|w| {
                    serde_json::json!({
                        "device": w.device,
                        "busy": w.busy,
                        "models_loaded": w.loaded.len(),
                    })
                })
                .collect();
            Json(serde_json::json!({
                "status": "ready",
                "queued": queued,
                "running": running,
                "workers": workers,
            }))
            .into_response()
        }
        Err(e) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("job store: {e}"),
            );
            e.retry_after = Some(5);
            e.into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let (queued, running) = state.store().counts().await.unwrap_or((0, 0));
    let loaded = state.worker().loaded();
    let text = state.metrics().render(Gauges {
        queued,
        running,
        models_loaded: loaded.len(),
        models_bytes: loaded.iter().map(|m| m.bytes).sum(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
