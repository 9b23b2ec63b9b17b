//! The API load benchmark (`easel bench-api`): a server on a loopback port
//! with a throwaway data dir, many concurrent clients submitting jobs
//! (some POSTs retried with the same `Idempotency-Key`), then a check that
//! every accepted job finished exactly once.
//!
//! Bounded: a fixed number of requests, a time limit, loopback only.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, EngineKind};
use crate::AppState;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Distinct generation requests (each with its own Idempotency-Key).
    pub requests: usize,
    /// Concurrent client threads.
    pub clients: usize,
    /// Image definitions per request.
    pub images_per_request: usize,
    /// A model folder to run for real (e.g. the tiny fixture); `None`: the fake engine.
    pub model: Option<PathBuf>,
    /// Denoising steps per image.
    pub steps: u32,
    /// Width and height of the images.
    pub size: u32,
    /// Fake engine: milliseconds per step.
    pub fake_step_ms: u64,
    /// Every `retry_every`-th request is POSTed twice with the same key.
    pub retry_every: usize,
    /// Give up waiting for jobs after this long.
    pub time_limit: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            requests: 400,
            clients: 32,
            images_per_request: 1,
            model: None,
            steps: 4,
            size: 64,
            fake_step_ms: 0,
            retry_every: 10,
            time_limit: Duration::from_secs(300),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// Requests sent (not counting retries).
    pub requests: usize,
    /// Accepted (202) on the first try or after 429s.
    pub accepted: usize,
    /// Answered 429 (then retried).
    pub throttled: usize,
    /// Other failures to submit.
    pub submit_errors: usize,
    /// Idempotent retries that returned the first job.
    pub replays_ok: usize,
    /// Idempotent retries that returned another job.
    pub replays_mismatched: usize,
    /// Jobs that succeeded.
    pub succeeded: usize,
    /// Jobs that failed or were canceled.
    pub failed: usize,
    /// Accepted jobs the server does not know or did not finish in time.
    pub lost: usize,
    /// Job rows beyond one per request (duplicates).
    pub duplicated: usize,
    /// Images stored.
    pub images: usize,
    /// POST latencies, seconds.
    pub submit_latency: Vec<f64>,
    /// Accepted-to-finished times, seconds (server clock).
    pub job_latency: Vec<f64>,
    /// First POST to last job finished.
    pub wall: Duration,
    /// Seconds spent submitting.
    pub submit_wall: Duration,
}

/// The `p`-th percentile (0..=100) of `values` (nearest rank).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

impl BenchReport {
    /// Whether every accepted job finished exactly once.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.replays_mismatched == 0
            && self.submit_errors == 0
            && self.accepted == self.requests
    }

    /// The table `easel bench-api` prints.
    pub fn table(&self) -> String {
        let ms = |v: f64| format!("{:.1} ms", v * 1e3);
        let s = |v: f64| format!("{v:.3} s");
        let rows = vec![
            ("requests".to_string(), self.requests.to_string()),
            ("accepted".into(), self.accepted.to_string()),
            (
                "throttled (429, retried)".into(),
                self.throttled.to_string(),
            ),
            ("submit errors".into(), self.submit_errors.to_string()),
            (
                "idempotent retries: same job".into(),
                format!(
                    "{} (mismatched {})",
                    self.replays_ok, self.replays_mismatched
                ),
            ),
            ("succeeded".into(), self.succeeded.to_string()),
            ("failed or canceled".into(), self.failed.to_string()),
            ("lost".into(), self.lost.to_string()),
            ("duplicated".into(), self.duplicated.to_string()),
            ("images".into(), self.images.to_string()),
            (
                "POST latency p50".into(),
                ms(percentile(&self.submit_latency, 50.0)),
            ),
            (
                "POST latency p99".into(),
                ms(percentile(&self.submit_latency, 99.0)),
            ),
            (
                "POST latency max".into(),
                ms(percentile(&self.submit_latency, 100.0)),
            ),
            (
                "submit throughput".into(),
                format!(
                    "{:.1} req/s",
                    self.submit_latency.len() as f64 / self.submit_wall.as_secs_f64().max(1e-9)
                ),
            ),
            (
                "job latency p50 (queued to done)".into(),
                s(percentile(&self.job_latency, 50.0)),
            ),
            (
                "job latency p99".into(),
                s(percentile(&self.job_latency, 99.0)),
            ),
            (
                "job throughput".into(),
                format!(
                    "{:.1} jobs/s, {:.1} images/s",
                    self.succeeded as f64 / self.wall.as_secs_f64().max(1e-9),
                    self.images as f64 / self.wall.as_secs_f64().max(1e-9)
                ),
            ),
            ("wall time".into(), s(self.wall.as_secs_f64())),
            (
                "result".into(),
                if self.ok() {
                    "OK: no job lost or duplicated".into()
                } else {
                    "FAILED".into()
                },
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Run the benchmark (see the module docs). Needs a multi-threaded tokio runtime.
///
/// # Errors
/// The server could not start.
pub async fn run(options: BenchOptions) -> Result<BenchReport, crate::StartError> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        bind: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        max_queue: options.requests + 16,
        max_images_per_request: options.images_per_request.max(1),
        fake_step_ms: options.fake_step_ms,
        offline: true,
        // One key submits everything as fast as it can: the per-key rate
        // limit would measure itself, not the queue.
        rate_limit_per_minute: 0,
        max_connections: options.clients.max(1) * 2 + 64,
        ..Config::default()
    };
    let model = match &options.model {
        Some(path) => {
            config.engine = EngineKind::Diffusion;
            config
                .models
                .insert("bench".into(), path.display().to_string().into());
            "bench".to_string()
        }
        None => {
            config.engine = EngineKind::Fake;
            "fake/model".to_string()
        }
    };
    let state = AppState::open(config).await?;
    let (row, secret) = crate::auth::new_key("bench", None);
    state
        .store()
        .insert_key(&row, &crate::auth::hash_secret(&secret))
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    state.set_local_addr(addr);
    let server = tokio::spawn(crate::serve_on(
        listener,
        state.clone(),
        std::future::pending(),
    ));

    let base = format!("http://{addr}");
    let started = Instant::now();
    let (report, ids) = submit_all(vec![base], &secret, &model, &options).await;
    let submit_wall = started.elapsed();

    // Wait for every accepted job to finish (bounded).
    let deadline = started + options.time_limit;
    loop {
        let (queued, running) = state.store().counts().await?;
        if queued + running == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let mut rep = report;
    rep.submit_wall = submit_wall;
    rep.wall = wall;
    tally(state.store(), &mut rep, &ids).await?;
    let seen: HashSet<&String> = ids.values().collect();
    let rows = state
        .store()
        .scalar_raw("SELECT COUNT(*) FROM generations")
        .await?;
    rep.duplicated = (rows as usize).saturating_sub(seen.len());
    state.shutdown().await;
    server.abort();
    Ok(rep)
}

/// Count the outcome of each accepted job in `ids` into `rep`: succeeded
/// (with its latency and images), failed or canceled, or lost (unknown or
/// not finished).
pub(crate) async fn tally(
    store: &crate::store::Store,
    rep: &mut BenchReport,
    ids: &HashMap<usize, String>,
) -> Result<(), crate::store::StoreError> {
    for id in ids.values() {
        match store.generation(id).await? {
            Some(g) if g.status == crate::job::JobStatus::Succeeded => {
                rep.succeeded += 1;
                if let Some(done) = g.finished_at {
                    rep.job_latency.push((done - g.created_at) as f64 / 1e3);
                }
                rep.images += store.assets_of(id).await?.len();
            }
            Some(g) if g.status.is_terminal() => rep.failed += 1,
            _ => rep.lost += 1,
        }
    }
    Ok(())
}

/// Submit `options.requests` requests from `options.clients` threads,
/// spread over the API nodes at `bases` (retrying 429s, replaying every
/// `retry_every`-th with its `Idempotency-Key`): the report so far and the
/// accepted job id of each request.
pub(crate) async fn submit_all(
    bases: Vec<String>,
    secret: &str,
    model: &str,
    options: &BenchOptions,
) -> (BenchReport, HashMap<usize, String>) {
    let report = Arc::new(Mutex::new(BenchReport {
        requests: options.requests,
        ..BenchReport::default()
    }));
    let ids: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut threads = Vec::new();
    for c in 0..options.clients.max(1) {
        // Clients spread over the API nodes.
        let base = bases[c % bases.len()].clone();
        let (secret, model) = (secret.to_string(), model.to_string());
        let (report, ids, next, options) =
            (report.clone(), ids.clone(), next.clone(), options.clone());
        threads.push(std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= options.requests {
                    return;
                }
                let images: Vec<serde_json::Value> = (0..options.images_per_request)
                    .map(|j| serde_json::json!({"prompt": format!("bench {i} {j}"), "seed": i * 10 + j}))
                    .collect();
                let body = serde_json::json!({
                    "baseModel": model, "steps": options.steps,
                    "width": options.size, "height": options.size,
                    "outputFormat": "png", "images": images,
                })
                .to_string();
                let key = format!("bench-{i}");
                let post = || {
                    let t = Instant::now();
                    let r = agent
                        .post(&format!("{base}/v1/generations"))
                        .set("Authorization", &format!("Bearer {secret}"))
                        .set("Content-Type", "application/json")
                        .set("Idempotency-Key", &key)
                        .send_string(&body);
                    (t.elapsed().as_secs_f64(), r)
                };
                let id = loop {
                    let (latency, result) = post();
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    rep.submit_latency.push(latency);
                    match result {
                        Ok(resp) => {
                            let v: serde_json::Value = resp.into_json().unwrap_or_default();
                            rep.accepted += 1;
                            break v["id"].as_str().map(str::to_string);
                        }
                        Err(ureq::Error::Status(429, resp)) => {
                            rep.throttled += 1;
                            let wait = resp
                                .header("retry-after")
                                .and_then(|s| s.parse::<u64>().ok())
                                .unwrap_or(1);
                            drop(rep);
                            std::thread::sleep(Duration::from_millis(wait.min(2) * 500));
                        }
                        Err(e) => {
                            tracing::warn!("bench: POST failed: {e}");
                            rep.submit_errors += 1;
                            break None;
                        }
                    }
                };
                let Some(id) = id else { continue };
                ids.lock().unwrap_or_else(|e| e.into_inner()).insert(i, id.clone());
                if options.retry_every > 0 && i % options.retry_every == 0 {
                    let (latency, result) = post();
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    rep.submit_latency.push(latency);
                    let again = result
                        .ok()
                        .and_then(|r| r.into_json::<serde_json::Value>().ok())
                        .and_then(|v| v["id"].as_str().map(str::to_string));
                    if again.as_deref() == Some(id.as_str()) {
                        rep.replays_ok += 1;
                    } else {
                        rep.replays_mismatched += 1;
                    }
                }
            }
        }));
    }
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = joined.await;
    let report = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ids = ids.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (report, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
