//! easel-server: the image-generation HTTP service (`easel serve`).
//!
//! Layout (see `docs/ARCHITECTURE.md`), each layer importing only those
//! below it and the shared [`AppState`]:
//! - [`routes`]: the router ([`routes::router`]) and one module per
//!   resource (generations, assets, models, trainings, packs, usage, flows,
//!   the OpenAI routes, `/openapi.json` and `/docs`, operations); nothing
//!   outside it imports it except [`app`]. [`http`]: the extractors and
//!   helpers the routes share.
//! - Services the routes, flow steps and worker share: [`submit`] and
//!   [`inputs`] (turning a request into an accepted job: validation with
//!   [`checks`], model roots, trainings, packs, credit, idempotency),
//!   [`jobs`] (a job's record, webhooks, waiting, cancel, announcing its
//!   start and end), [`trainings`] (registering a LoRA file), [`flows`]
//!   (the server's flow steps, runs on their threads, resumption).
//! - [`worker`]: the engine thread: jobs in order, each request's images as
//!   batches, the loaded model preferred when fair; [`engine`] wraps
//!   `easel-diffusion` (the server never sees a tensor) and a fake for load tests.
//! - [`store`]: the SQLite job store (one module per table, migrations
//!   embedded); [`job`] the stored shapes of jobs and image definitions;
//!   [`assets`]: files by content hash, written atomically before records
//!   point to them; [`models`], [`config`].
//! - [`state`]: [`AppState`], the handles all of the above share, and
//!   starting and stopping it; [`error_shape`] (one JSON error shape per
//!   route family), [`auth`], [`webhooks`], [`metrics`].
//! - [`listener`]: the accept loop, connection cap and timeouts in front
//!   of the router; [`ratelimit`]: per-key submission rate limits.
//!
//! [`app`] builds the router from an [`AppState`] (tests call it with
//! `oneshot`); [`serve`] binds a socket and runs until Ctrl-C / SIGTERM;
//! [`serve_on`] serves an already bound listener (tests, `bench-api`).

#![warn(missing_docs)]

pub mod assets;
pub mod auth;
pub mod bench;
pub mod bench_cluster;
pub mod checks;
pub mod config;
pub mod engine;
pub mod error;
pub mod error_shape;
pub mod family_defaults;
pub mod fetch;
pub mod flows;
pub mod http;
pub mod inputs;
pub mod job;
pub mod jobs;
pub mod listener;
pub mod lora_cache;
pub mod lora_list;
pub mod metrics;
pub mod models;
pub mod ratelimit;
pub mod replicate_error;
pub mod replicate_prediction;
pub mod routes;
pub mod state;
pub mod store;
pub mod submit;
pub mod trainings;
pub mod util;
pub mod views;
pub mod webhooks;
pub mod worker;

pub use config::Config;
pub use error::ApiError;
pub use job::JobEvent;
pub use listener::serve_on;
pub use state::{AppState, StartError};

use axum::Router;

/// The router: every route of the service over `state`.
pub fn app(state: AppState) -> Router {
    routes::router(state)
}

/// Bind `config.bind`, serve (through [`serve_on`]: timeouts, connection
/// cap) until Ctrl-C or SIGTERM, then shut down gracefully: stop accepting,
/// let in-flight requests finish, then stop the worker (a running job goes
/// back to the queue).
///
/// # Errors
/// The server cannot start or the address cannot be bound.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let addr = config.bind_addr()?;
    let state = AppState::open(config).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    state.set_local_addr(local);
    tracing::info!("easel serve: listening on http://{local}");
    let devices = state.worker().devices();
    let workers = if devices.is_empty() {
        "none: API only, jobs run on `easel worker` processes".to_string()
    } else {
        devices.join(", ")
    };
    eprintln!(
        "easel serve: listening on http://{local} (data dir {}, store {}, auth {}, engine workers on {workers})",
        state.config().data_dir.display(),
        store::redact_url(&state.config().database_url()),
        if state.config().no_auth { "off" } else { "on" },
    );
    let result = serve_on(listener, state.clone(), shutdown_signal(state.clone())).await;
    state.shutdown().await;
    result.map_err(StartError::Io)
}

/// `easel worker`: open the store and the asset store of `config`, start
/// one engine worker per configured device and claim jobs from the shared
/// queue (with the webhook dispatcher, which claims deliveries like any
/// API node's) until Ctrl-C or SIGTERM; a running job is then put back in
/// the queue for another worker. No HTTP listener.
///
/// # Errors
/// The configuration, the store or a device cannot be used.
pub async fn run_worker(mut config: Config) -> Result<(), StartError> {
    config.no_worker = false;
    config.worker_only = true;
    let state = AppState::open(config).await?;
    let devices = state.worker().devices();
    eprintln!(
        "easel worker: claiming jobs from {} (engine workers on {})",
        store::redact_url(&state.config().database_url()),
        devices.join(", ")
    );
    wait_for_signal().await;
    eprintln!("easel worker: shutting down (a running job goes back to the queue)");
    state.shutdown().await;
    Ok(())
}

/// Wait for Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn shutdown_signal(state: AppState) {
    wait_for_signal().await;
    eprintln!("easel serve: shutting down");
    // Event streams end and waiters return; the worker stops after serve.
    state.mark_shutting_down();
}
