//! The application state: the handles every route, the worker and the
//! background tasks share ([`AppState`]), and opening it (data dir, store,
//! recovery, worker and webhook dispatcher start, flow runs resumed) and
//! shutting it down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, Notify};

use crate::assets::AssetStore;
use crate::config::{self, Config};
use crate::engine::{self, Capabilities, Engine, WorkerEngine};
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::models::ModelRegistry;
use crate::store::{self, Store};
use crate::worker::{self, WorkerShared};
use crate::{fetch, flows, lora_cache, ratelimit, webhooks, JobEvent};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The job store could not be opened or migrated.
    #[error("job store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A folder or file of the data dir could not be used.
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The asset store (`asset_store`) could not be opened or listed.
    #[error("asset store {0}")]
    Assets(String),
}

struct Inner {
    config: Config,
    store: Store,
    assets: AssetStore,
    trainings: AssetStore,
    models: ModelRegistry,
    capabilities: Capabilities,
    events: broadcast::Sender<JobEvent>,
    metrics: Metrics,
    worker: Arc<WorkerShared>,
    webhook_wake: Notify,
    webhook_secret: Vec<u8>,
    fetcher: fetch::Fetcher,
    shutting_down: AtomicBool,
    base_url: Mutex<String>,
    worker_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// PostgreSQL's LISTEN task (wakes and cancels from other processes).
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    flows: flows::FlowsShared,
    rate_limiter: ratelimit::RateLimiter,
    a1111_checkpoints: Mutex<std::collections::HashMap<String, String>>,
}

/// The server's shared state: configuration, store, asset stores, the
/// worker's handle, the event bus, metrics. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// Open the data dir (store, migrations, asset stores), recover jobs a
    /// dead process left running, remove orphan files, and start the
    /// workers (one per `device`, with the engine `config` selects) and the
    /// webhook dispatcher. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// An invalid configuration (a device that cannot be opened included)
    /// or an unusable data dir.
    pub async fn open(config: Config) -> Result<AppState, StartError> {
        config.check()?;
        let workers = if config.no_worker {
            Vec::new()
        } else {
            engine::build_workers(&config)?
        };
        Self::open_with_engines(config, workers).await
    }

    /// [`AppState::open`] with one given engine (one worker, named by the
    /// first configured device).
    ///
    /// # Errors
    /// As [`AppState::open`].
    pub async fn open_with_engine(
        config: Config,
        engine: Box<dyn Engine>,
    ) -> Result<AppState, StartError> {
        let device = config
            .device
            .first()
            .map(ToString::to_string)
            .unwrap_or_else(|| "cpu".into());
        Self::open_with_engines(config, vec![WorkerEngine { device, engine }]).await
    }

    /// [`AppState::open`] with given workers: one thread per entry, each
    /// driving its engine, all claiming from the one queue.
    ///
    /// # Errors
    /// As [`AppState::open`]; no workers, or two with one device name.
    pub async fn open_with_engines(
        config: Config,
        workers: Vec<WorkerEngine>,
    ) -> Result<AppState, StartError> {
        config.check()?;
        let devices: Vec<String> = workers.iter().map(|w| w.device.clone()).collect();
        if devices.is_empty() && !config.no_worker {
            return Err(config::ConfigError("no engine worker to start".into()).into());
        }
        if let Some(d) = devices
            .iter()
            .enumerate()
            .find_map(|(i, d)| devices[..i].contains(d).then_some(d))
        {
            return Err(config::ConfigError(format!("two engine workers on device `{d}`")).into());
        }
        std::fs::create_dir_all(&config.data_dir)?;
        std::fs::create_dir_all(config.data_dir.join("models"))?;
        let store = Store::connect(&config.database_url()).await?;
        // Jobs whose worker died (this process before a restart, or another
        // one) are claimed again by the workers once their lease expired
        // (worker.rs, before each claim); live workers' jobs are left alone.
        let spec = config.asset_store_spec();
        let open = |name: &str| {
            AssetStore::open(&spec, name, &config.data_dir, &config.s3)
                .map_err(|e| StartError::Assets(format!("{spec}: {e}")))
        };
        let (assets, trainings) = (open("assets")?, open("trainings")?);
        let known = store.known_hashes().await?;
        // Orphan files (written by a process that died before committing
        // their record) are removed at start: on a single machine (SQLite)
        // after the backend's grace (a folder: none; S3: an hour, the bucket
        // may be shared). With a shared database other processes may be
        // between writing a file and committing its record right now, so
        // only files older than an hour go. These are the first requests
        // to the store: a bucket that cannot be reached or listed stops the
        // start here, not the first job.
        let shared_grace = (store.backend() == store::Backend::Postgres)
            .then_some(std::time::Duration::from_secs(3600));
        let mut removed = lora_cache::sweep_partial(&config.data_dir);
        for files in [&assets, &trainings] {
            let swept = match shared_grace {
                None => files.sweep(&known).await,
                Some(grace) => files.sweep_older_than(&known, grace).await,
            };
            removed += swept.map_err(|e| {
                let (at, e) = (files.location(), e.to_string());
                // S3's errors name the store already.
                StartError::Assets(if e.starts_with(&at) {
                    e
                } else {
                    format!("{at}: {e}")
                })
            })?;
        }
        if removed > 0 {
            tracing::warn!("removed {removed} orphan or partial files from the data dir");
        }
        tracing::info!(
            "asset store: {} and {}",
            assets.location(),
            trainings.location()
        );
        let webhook_secret = match &config.webhook_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => load_or_create_secret(&config.data_dir.join("webhook_secret"))?,
        };
        let (events, _) = broadcast::channel(4096);
        let bind = config.bind.clone();
        let inner = Inner {
            models: ModelRegistry::new(&config),
            capabilities: engine::capabilities(&config),
            store,
            assets,
            trainings,
            events,
            metrics: Metrics::default(),
            worker: Arc::new(WorkerShared::new(devices)),
            webhook_wake: Notify::new(),
            webhook_secret,
            fetcher: fetch::Fetcher::new(config.fetch_allow_list()?),
            shutting_down: AtomicBool::new(false),
            base_url: Mutex::new(format!("http://{bind}")),
            worker_threads: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
            flows: flows::FlowsShared::default(),
            rate_limiter: ratelimit::RateLimiter::new(
                config.rate_limit_per_minute,
                config.rate_limit_burst,
            ),
            a1111_checkpoints: Mutex::new(std::collections::HashMap::new()),
            config,
        };
        let state = AppState(Arc::new(inner));
        for (index, w) in workers.into_iter().enumerate() {
            let handle = worker::spawn(
                state.clone(),
                index,
                w.engine,
                tokio::runtime::Handle::current(),
            );
            match handle {
                Ok(handle) => state
                    .0
                    .worker_threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(handle),
                Err(e) => {
                    // The workers already started stop again.
                    state.shutdown().await;
                    return Err(StartError::Io(e));
                }
            }
        }
        if state.worker().count() > 0 {
            // Other processes' submissions and cancels, at once (PostgreSQL).
            let (wake, cancel) = (state.clone(), state.clone());
            let task = state.store().listen(
                move || wake.worker().wake(),
                move |id| {
                    cancel.worker().cancel(id);
                },
            );
            *state.0.listener.lock().unwrap_or_else(|e| e.into_inner()) = task;
        }
        tokio::spawn(webhooks::run_dispatcher(state.clone()));
        if !state.config().worker_only {
            flows::resume_unfinished(&state).await;
        }
        Ok(state)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The `sd_model_checkpoint` that API key `key_id` chose with
    /// `POST /sdapi/v1/options` (kept in memory: a restart forgets it).
    pub fn a1111_checkpoint(&self, key_id: &str) -> Option<String> {
        self.0
            .a1111_checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
            .cloned()
    }

    /// Set the `sd_model_checkpoint` of API key `key_id` (see
    /// [`AppState::a1111_checkpoint`]).
    pub fn set_a1111_checkpoint(&self, key_id: &str, model: String) {
        self.0
            .a1111_checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key_id.to_string(), model);
    }

    /// The outbound fetcher for client-given URLs (images, LoRAs, webhooks).
    pub fn fetcher(&self) -> &fetch::Fetcher {
        &self.0.fetcher
    }

    /// The job store.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// Generated and input images.
    pub fn assets(&self) -> &AssetStore {
        &self.0.assets
    }

    /// Uploaded LoRA files.
    pub fn trainings(&self) -> &AssetStore {
        &self.0.trainings
    }

    /// Model references.
    pub fn models(&self) -> &ModelRegistry {
        &self.0.models
    }

    /// What the engine can do.
    pub fn capabilities(&self) -> Capabilities {
        self.0.capabilities
    }

    /// Flow runs' events and cancel tokens.
    pub fn flows(&self) -> &flows::FlowsShared {
        &self.0.flows
    }

    /// Per-key submission rate limits.
    pub fn rate_limiter(&self) -> &ratelimit::RateLimiter {
        &self.0.rate_limiter
    }

    /// Take a submission token for `key_id` (see [`ratelimit`]), counting
    /// refusals in `/metrics`.
    ///
    /// # Errors
    /// 429 `rate_limited` with `Retry-After` when the key's bucket is empty.
    pub fn check_submission_rate(&self, key_id: &str) -> Result<(), ApiError> {
        self.0.rate_limiter.check(key_id).inspect_err(|_| {
            metrics::Metrics::inc(&self.0.metrics.rejected_rate_limited);
        })
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The workers' shared handle.
    pub fn worker(&self) -> &Arc<WorkerShared> {
        &self.0.worker
    }

    /// The webhook signing key.
    pub fn webhook_secret(&self) -> &[u8] {
        &self.0.webhook_secret
    }

    /// Wakes the webhook dispatcher.
    pub fn webhook_wake(&self) -> &Notify {
        &self.0.webhook_wake
    }

    /// Subscribe to job events.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.0.events.subscribe()
    }

    /// Broadcast a job event (no one listening is fine).
    pub fn emit(&self, event: JobEvent) {
        let _ = self.0.events.send(event);
    }

    /// Mark the server as stopping (what [`AppState::shutdown`] does
    /// first): event streams end, waiters return, readiness fails, while
    /// in-flight requests finish.
    pub(crate) fn mark_shutting_down(&self) {
        self.0.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`AppState::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.0.shutting_down.load(Ordering::SeqCst)
    }

    /// The base of absolute URLs when no request is at hand (webhooks):
    /// `public_url`, else `http://` + the bound address.
    pub fn default_base_url(&self) -> String {
        match &self.config().public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => self
                .0
                .base_url
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Record the address the server listens on (for [`Self::default_base_url`]).
    pub fn set_local_addr(&self, addr: SocketAddr) {
        *self.0.base_url.lock().unwrap_or_else(|e| e.into_inner()) = format!("http://{addr}");
    }

    /// Stop the workers (running jobs are put back in the queue, not
    /// failed) and the webhook dispatcher; waits for the worker threads.
    pub async fn shutdown(&self) {
        self.0.shutting_down.store(true, Ordering::SeqCst);
        if let Some(task) = self
            .0
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        self.0.worker.stop();
        self.0.webhook_wake.notify_waiters();
        let handles = std::mem::take(
            &mut *self
                .0
                .worker_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for handle in handles {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Read the webhook secret file, or create it with a random key (mode 0600).
fn load_or_create_secret(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim();
        if !text.is_empty() {
            return Ok(text.as_bytes().to_vec());
        }
    }
    let secret: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..32)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect()
    };
    let secret = format!("whsec_{secret}");
    easel_core::write_atomic(path, secret.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(secret.into_bytes())
}
