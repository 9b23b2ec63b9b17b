//! Several engine workers (`device = [...]`), one per device, on the one
//! job queue: jobs run concurrently, each on one worker, exactly once;
//! cancel reaches the worker running the job; duplicate devices are
//! refused. The fake engine opens no device, so two "GPU" workers run on a
//! CPU-only machine; the diffusion engine's device resolution is tested in
//! easel-diffusion (`device.rs`) and by `easel serve` (easel-cli's tests).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::TestServer;
use easel_diffusion::device::DeviceSpec;
use easel_server::config::EngineKind;
use easel_server::AppState;
use serde_json::{json, Value};

async fn two_workers(step_ms: u64) -> TestServer {
    TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = step_ms;
        c.device = vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)];
    })
    .await
}

async fn submit(server: &TestServer, prompt: &str, steps: u32) -> String {
    let body = json!({"baseModel": "fake/model", "steps": steps, "images": [{"prompt": prompt}]});
    let (s, job) = server.post("/v1/generations", body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    job["id"].as_str().unwrap().to_string()
}

/// Poll `/readyz` until `done(workers)` holds; panics after `secs`.
async fn wait_workers(server: &TestServer, secs: u64, done: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (s, ready) = server.get("/readyz").await;
        assert_eq!(s, StatusCode::OK, "{ready}");
        if done(ready["workers"].as_array().unwrap()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "workers not as expected: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_two_jobs_at_once_each_exactly_once() {
    // 20 steps of 40 ms: 0.8 s per job.
    let server = two_workers(40).await;
    let (s, ready) = server.get("/readyz").await;
    assert_eq!(s, StatusCode::OK);
    let devices: Vec<&str> = ready["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["cuda:0", "cuda:1"]);

    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(submit(&server, &format!("prompt {i}"), 20).await);
    }
    // Both workers busy at the same moment, and two jobs running.
    wait_workers(&server, 20, |w| w.iter().all(|w| w["busy"] == true)).await;
    let (_, ready) = server.get("/readyz").await;
    assert_eq!(ready["running"], 2, "{ready}");

    let mut devices_used = BTreeSet::new();
    for id in &ids {
        let job = server.wait_done(id, 30).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        // Claimed once: one attempt, one definition, one image.
        assert_eq!(job["attempts"], 1, "{job}");
        assert_eq!(job["images"].as_array().unwrap().len(), 1);
        assert_eq!(job["assets"].as_array().unwrap().len(), 1, "{job}");
        let device = job["images"][0]["parameters"]["device"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(["cuda:0", "cuda:1"].contains(&device.as_str()), "{device}");
        devices_used.insert(device);
    }
    // Four jobs of 0.8 s each on two workers: about 1.6 s, never 3.2 s.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(3000), "{elapsed:?}");
    assert_eq!(devices_used.len(), 2, "{devices_used:?}");
    // Each job's one batch ran once: four engine calls in all.
    let batches = server.state.metrics().batches.load(Ordering::SeqCst);
    assert_eq!(batches, 4);
    let (_, list) = server.get("/v1/assets?limit=100").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 4, "{list}");
    // Both workers hold the model in their own cache.
    wait_workers(&server, 5, |w| {
        w.iter()
            .all(|w| w["busy"] == false && w["models_loaded"] == 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_worker_running_the_job() {
    // 60 steps of 70 ms: 4.2 s per job, longer than the test waits.
    let server = two_workers(70).await;
    let a = submit(&server, "a", 60).await;
    let b = submit(&server, "b", 60).await;
    wait_workers(&server, 20, |w| w.iter().all(|w| w["busy"] == true)).await;
    let started = Instant::now();
    let (s, job) = server
        .post(&format!("/v1/generations/{b}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, job["status"].as_str()),
        (StatusCode::OK, Some("canceled")),
        "{job}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The other worker's job runs on.
    let (_, other) = server.get(&format!("/v1/generations/{a}")).await;
    assert_eq!(other["status"], "running", "{other}");
    let (_, job) = server
        .post(&format!("/v1/generations/{a}/cancel"), json!({}))
        .await;
    assert_eq!(job["status"], "canceled", "{job}");
    wait_workers(&server, 5, |w| w.iter().all(|w| w["busy"] == false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_listed_twice_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for devices in [
        vec![DeviceSpec::Cpu, DeviceSpec::Cpu],
        vec![
            DeviceSpec::Cuda(0),
            DeviceSpec::Cuda(1),
            DeviceSpec::Cuda(0),
        ],
    ] {
        let mut config = common::base_config(dir.path());
        config.device = devices;
        let e = AppState::open(config).await.err().expect("refused");
        assert!(e.to_string().contains("is listed twice"), "{e}");
    }
    // `auto` opens the CPU here (a CPU-only build, or no GPU): with `cpu`
    // beside it, two workers would share one device.
    if DeviceSpec::Auto.resolve().unwrap().is_cpu() {
        let mut config = common::base_config(dir.path());
        config.device = vec![DeviceSpec::Auto, DeviceSpec::Cpu];
        let e = AppState::open(config).await.err().expect("refused");
        assert!(
            e.to_string()
                .contains("device: `auto` and `cpu` both open cpu"),
            "{e}"
        );
    }
}
