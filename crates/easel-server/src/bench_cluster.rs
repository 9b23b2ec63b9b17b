//! `easel bench-api --database-url postgres://... --workers 1,2,4`: the
//! throughput of a multi-machine deployment (issue 18), as processes on one
//! machine: `api_nodes` API-only nodes (`easel serve --no-worker`) and N
//! `easel worker` processes, all with the fake engine (a fixed time per
//! step, so the figure is the service's own scaling, not the engine's) on
//! one database and one asset folder, for each N in turn. Each run uses a
//! new API key and counts only that key's jobs, so the database may hold
//! other data; each checks that every accepted job finished exactly once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{submit_all, BenchOptions, BenchReport};
use crate::store::Store;

/// The deployment to measure.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The shared database (PostgreSQL; SQLite works but serializes writers).
    pub database_url: String,
    /// The `easel` binary to start the nodes and workers from.
    pub exe: PathBuf,
    /// API nodes (at least 1).
    pub api_nodes: usize,
    /// Worker counts to measure, one run each.
    pub workers: Vec<usize>,
}

/// One run: its worker count and report.
#[derive(Debug, Clone)]
pub struct ClusterRun {
    /// `easel worker` processes.
    pub workers: usize,
    /// What the clients saw and the store holds.
    pub report: BenchReport,
}

impl ClusterRun {
    /// Jobs finished per second, first POST to last job done.
    pub fn jobs_per_second(&self) -> f64 {
        self.report.succeeded as f64 / self.report.wall.as_secs_f64().max(1e-9)
    }
}

/// The table: one row per worker count, throughput relative to the first.
pub fn table(runs: &[ClusterRun], api_nodes: usize) -> String {
    let base = runs.first().map(ClusterRun::jobs_per_second).unwrap_or(1.0);
    let mut out = format!(
        "| API nodes | workers | jobs | succeeded | lost | duplicated | wall | jobs/s | vs first |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for run in runs {
        let r = &run.report;
        out.push_str(&format!(
            "| {api_nodes} | {} | {} | {} | {} | {} | {:.2} s | {:.2} | {:.2}x |\n",
            run.workers,
            r.accepted,
            r.succeeded,
            r.lost,
            r.duplicated,
            r.wall.as_secs_f64(),
            run.jobs_per_second(),
            run.jobs_per_second() / base.max(1e-9)
        ));
    }
    out
}

/// Child processes, killed on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn command(cluster: &ClusterOptions, options: &BenchOptions, data: &Path) -> Command {
    let mut c = Command::new(&cluster.exe);
    c.env("EASEL_DATABASE_URL", &cluster.database_url)
        .env("EASEL_DATA_DIR", data)
        .env("EASEL_FAKE_STEP_MS", options.fake_step_ms.to_string())
        .env("EASEL_MAX_QUEUE", (options.requests + 16).to_string())
        .env(
            "EASEL_MAX_IMAGES_PER_REQUEST",
            options.images_per_request.max(1).to_string(),
        )
        .env("EASEL_RATE_LIMIT_PER_MINUTE", "0")
        .env(
            "EASEL_MAX_CONNECTIONS",
            (options.clients.max(1) * 2 + 64).to_string(),
        )
        .env("EASEL_OFFLINE", "true")
        .env_remove("EASEL_CONFIG")
        .env_remove("EASEL_DEVICE")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Run `options` against `cluster.api_nodes` API nodes and each worker
/// count of `cluster.workers` in turn.
///
/// # Errors
/// The store cannot be reached, a process cannot start, or an API node
/// does not answer `/readyz` within a minute.
pub async fn run(
    options: &BenchOptions,
    cluster: &ClusterOptions,
) -> Result<Vec<ClusterRun>, crate::StartError> {
    let store = Store::connect(&cluster.database_url).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("shared");
    let mut runs = Vec::new();
    for &workers in &cluster.workers {
        let mut children = Children(Vec::new());
        let mut bases = Vec::new();
        for _ in 0..cluster.api_nodes.max(1) {
            let port = free_port()?;
            children.0.push(
                command(cluster, options, &data)
                    .args(["serve", "--no-worker", "--fake-engine"])
                    .args(["--bind", &format!("127.0.0.1:{port}")])
                    .spawn()?,
            );
            bases.push(format!("http://127.0.0.1:{port}"));
        }
        for _ in 0..workers {
            children.0.push(
                command(cluster, options, &data)
                    .args(["worker", "--fake-engine"])
                    .spawn()?,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for base in &bases {
            let url = format!("{base}/readyz");
            loop {
                let up = tokio::task::spawn_blocking({
                    let url = url.clone();
                    move || ureq::get(&url).call().is_ok()
                })
                .await
                .unwrap_or(false);
                if up {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(std::io::Error::other(format!("{url} did not answer")).into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (row, secret) = crate::auth::new_key("bench-cluster", None);
        store
            .insert_key(&row, &crate::auth::hash_secret(&secret))
            .await?;
        let started = Instant::now();
        let (mut report, ids) = submit_all(bases, &secret, "fake/model", options).await;
        report.submit_wall = started.elapsed();
        let deadline = started + options.time_limit;
        loop {
            let open = store
                .scalar_raw(&format!(
                    "SELECT COUNT(*) FROM generations WHERE key_id = '{}' \
                     AND status IN ('queued', 'running')",
                    row.id
                ))
                .await?;
            if open == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.wall = started.elapsed();
        crate::bench::tally(&store, &mut report, &ids).await?;
        let rows = store
            .scalar_raw(&format!(
                "SELECT COUNT(*) FROM generations WHERE key_id = '{}'",
                row.id
            ))
            .await?;
        report.duplicated = (rows as usize).saturating_sub(ids.len());
        drop(children);
        runs.push(ClusterRun { workers, report });
    }
    store.close().await;
    Ok(runs)
}
