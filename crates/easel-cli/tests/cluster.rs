//! Many machines (issue 18), as processes: two API nodes
//! (`easel serve --no-worker`) and three workers (`easel worker`) on one
//! real PostgreSQL server and one asset folder, with the fake engine (a
//! fixed time per step). Faults: a worker killed (SIGKILL) mid-job, an API
//! node killed around a submission retried on the other node with the same
//! `Idempotency-Key`, a cancel through one node of a job running on a
//! worker, and a PostgreSQL restart mid-run. After each, every job finishes
//! with each image stored exactly once.

// Shared with easel-server's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../easel-server/tests/common/postgres.rs"]
mod postgres;

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixtures, free_port, wait_ready};
use postgres::PgServer;
use serde_json::{json, Value};

/// The settings every process of the cluster shares.
struct Cluster {
    url: String,
    data: PathBuf,
    key: String,
}

impl Cluster {
    fn easel(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_easel"));
        c.env("HF_HUB_OFFLINE", "1")
            .env_remove("EASEL_CONFIG")
            .env_remove("EASEL_DEVICE")
            .env("EASEL_DATABASE_URL", &self.url)
            .env("EASEL_LEASE_SECONDS", "3")
            .env("EASEL_FAKE_STEP_MS", "40")
            .env("EASEL_WEBHOOK_SECRET", "whsec_cluster_test")
            .env("HF_HUB_CACHE", self.data.join("no-hub"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    fn api_node(&self) -> Node {
        let port = free_port();
        let child = self
            .easel()
            .args(["serve", "--no-worker", "--fake-engine", "--offline"])
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--models-dir")
            .arg(fixtures().join("models"))
            .spawn()
            .unwrap();
        let node = Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
            key: self.key.clone(),
        };
        wait_ready(&node.base, "API node");
        node
    }

    fn worker(&self) -> Child {
        self.easel()
            .args(["worker", "--fake-engine", "--offline"])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--models-dir")
            .arg(fixtures().join("models"))
            .spawn()
            .unwrap()
    }
}

struct Node {
    child: Child,
    base: String,
    key: String,
}

impl Node {
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key))
    }

    fn submit(&self, body: &Value, idempotency_key: Option<&str>) -> Result<Value, String> {
        let mut r = self.request("POST", "/v1/generations");
        if let Some(k) = idempotency_key {
            r = r.set("Idempotency-Key", k);
        }
        match r.send_json(body.clone()) {
            Ok(resp) => Ok(resp.into_json().unwrap()),
            Err(ureq::Error::Status(code, resp)) => {
                Err(format!("{code} {}", resp.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn get(&self, path: &str) -> Value {
        self.request("GET", path)
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    fn wait_done(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(resp) = self.request("GET", &format!("/v1/generations/{id}")).call() {
                let job: Value = resp.into_json().unwrap();
                if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap()) {
                    return job;
                }
                assert!(Instant::now() < deadline, "job {id} not done: {job}");
            }
            assert!(Instant::now() < deadline, "job {id} not done");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `definitions` image definitions of `steps` steps each (40 ms a step).
fn body(tag: &str, definitions: usize, steps: u32) -> Value {
    let model = fixtures().join("models/tiny-sd15").display().to_string();
    json!({
        "baseModel": model, "width": 64, "height": 64, "outputFormat": "png",
        "images": (0..definitions)
            .map(|i| json!({"prompt": format!("{tag} {i}"), "seed": i, "steps": steps}))
            .collect::<Vec<_>>(),
    })
}

/// Every image of a finished job once, each file present and whole.
fn check_job(job: &Value, data: &Path, definitions: usize) {
    assert_eq!(job["status"], "succeeded", "{job}");
    let assets = job["assets"].as_array().unwrap();
    assert_eq!(assets.len(), definitions, "{job}");
    let mut slots = HashSet::new();
    for a in assets {
        assert!(
            slots.insert((a["image_index"].as_i64(), a["batch_index"].as_i64())),
            "image stored twice: {a}"
        );
        let hash = a["content_hash"].as_str().unwrap();
        let path = data
            .join("assets")
            .join(&hash[..2])
            .join(format!("{hash}.png"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), hash);
    }
}

#[test]
fn two_api_nodes_and_three_workers_survive_faults() {
    let Some(pg) = PgServer::start("two_api_nodes_and_three_workers_survive_faults") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = runtime.block_on(pg.new_database());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared");
    let mut cluster = Cluster {
        url,
        data,
        key: String::new(),
    };
    let out = cluster
        .easel()
        .args(["keys", "create", "--name", "cluster"])
        .arg("--data-dir")
        .arg(&cluster.data)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    cluster.key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(cluster.key.starts_with("esk_"), "{}", cluster.key);

    let a = cluster.api_node();
    let mut b = cluster.api_node();
    let mut workers: Vec<Child> = (0..3).map(|_| cluster.worker()).collect();

    // 1. Six jobs of three 20-step definitions (0.8 s each), through both
    // nodes; kill one worker once images are being made.
    let mut ids = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { &a } else { &b };
        let job = node
            .submit(&body(&format!("job {i}"), 3, 20), None)
            .unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = ids
            .iter()
            .filter(|id| a.get(&format!("/v1/generations/{id}"))["status"] == "running")
            .count();
        if running == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three workers never ran three jobs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    kill(&mut workers[0]);
    for id in &ids {
        check_job(&b.wait_done(id, 120), &cluster.data, 3);
    }
    let retried = ids
        .iter()
        .filter(|id| a.get(&format!("/v1/generations/{id}"))["attempts"] == 2)
        .count();
    assert_eq!(retried, 1, "the killed worker's job ran again once");
    workers[0] = cluster.worker();

    // 2. Cancel through node B a long job running on a worker.
    let long = a.submit(&body("long", 10, 60), None).unwrap();
    let long_id = long["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get(&format!("/v1/generations/{long_id}"))["status"] != "running" {
        assert!(Instant::now() < deadline, "the long job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let asked = Instant::now();
    b.request("POST", &format!("/v1/generations/{long_id}/cancel"))
        .call()
        .unwrap();
    let job = a.wait_done(&long_id, 30);
    assert_eq!(job["status"], "canceled", "{job}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the cancel took {:?} to reach the worker",
        asked.elapsed()
    );

    // 3. An API node killed around a submission; the client retries the
    // same Idempotency-Key on the other node: one job.
    let retry_body = body("idempotent", 1, 2);
    let first = std::thread::scope(|scope| {
        let sent = scope.spawn(|| b.submit(&retry_body, Some("retry-key-1")));
        // Killed while the request is in flight (or just after it: the
        // client cannot tell, which is the point of the key).
        std::thread::sleep(Duration::from_millis(3));
        let _ = std::process::Command::new("kill")
            .args(["-9", &b.child.id().to_string()])
            .status();
        sent.join().unwrap()
    });
    let _ = b.child.wait();
    let second = a.submit(&retry_body, Some("retry-key-1")).unwrap();
    if let Ok(first) = &first {
        assert_eq!(first["id"], second["id"]);
    }
    let listed = a.get("/v1/generations?limit=100");
    let with_prompt = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["id"] == second["id"])
        .count();
    assert_eq!(with_prompt, 1);
    check_job(
        &a.wait_done(second["id"].as_str().unwrap(), 60),
        &cluster.data,
        1,
    );
    let total = listed["data"].as_array().unwrap().len();
    assert_eq!(
        total, 8,
        "jobs: 6 + the canceled one + one idempotent submission"
    );

    // 4. PostgreSQL restarts mid-run: the workers reconnect, nothing lost.
    let mut late = Vec::new();
    for i in 0..3 {
        let job = a.submit(&body(&format!("late {i}"), 2, 25), None).unwrap();
        late.push(job["id"].as_str().unwrap().to_string());
    }
    std::thread::sleep(Duration::from_millis(600));
    pg.stop();
    std::thread::sleep(Duration::from_millis(1500));
    pg.start_again();
    for id in &late {
        check_job(&a.wait_done(id, 120), &cluster.data, 2);
    }
    for w in &mut workers {
        kill(w);
    }
}
