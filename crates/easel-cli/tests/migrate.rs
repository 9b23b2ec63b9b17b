//! `easel migrate` as a user runs it (issue 18): a single-machine install
//! (SQLite + asset folder) with finished jobs moved to a real PostgreSQL and
//! a real S3-protocol server (moto), S3 settings from the standard `AWS_*`
//! variables; run twice (the second copies nothing); then a server on the
//! new stores answers the same key with the same jobs and the same image
//! bytes.

// Shared with easel-server's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../easel-server/tests/common/moto.rs"]
mod moto;
// Shared with easel-server's tests; this file uses part of it.
#[allow(dead_code)]
#[path = "../../easel-server/tests/common/postgres.rs"]
mod postgres;

mod common;
use common::{fixtures, free_port, wait_ready};

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

fn easel(aws: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_easel"));
    c.env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_CONFIG")
        .env_remove("EASEL_DEVICE")
        .env_remove("EASEL_DATABASE_URL")
        .env_remove("EASEL_ASSET_STORE");
    for (k, v) in aws {
        c.env(k, v);
    }
    c
}

struct Server {
    child: Child,
    base: String,
    key: String,
}

impl Server {
    fn start(mut command: Command, key: &str) -> Server {
        let port = free_port();
        let child = command
            .args(["serve", "--fake-engine", "--offline"])
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .arg("--models-dir")
            .arg(fixtures().join("models"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            key: key.into(),
        };
        wait_ready(&server.base, "server");
        server
    }

    fn get(&self, path: &str) -> Value {
        ureq::get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    fn bytes(&self, url: &str) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut ureq::get(url).call().unwrap().into_reader(), &mut out)
            .unwrap();
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn migrate(data: &Path, url: &str, aws: &[(&str, String)]) -> String {
    let out = easel(aws)
        .args(["migrate", "--data-dir"])
        .arg(data)
        .args(["--to-database-url", url])
        .args(["--to-asset-store", "s3://migrated/easel"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "easel migrate failed: {stderr}");
    stderr
}

#[test]
fn migrate_moves_records_and_files_to_postgres_and_s3() {
    let Some(pg) = postgres::PgServer::start("migrate_moves_records_and_files_to_postgres_and_s3")
    else {
        return;
    };
    let Some(s3) = moto::Moto::start("migrate_moves_records_and_files_to_postgres_and_s3") else {
        return;
    };
    s3.create_bucket("migrated");
    let aws: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("single");

    // A single-machine install with two finished jobs.
    let out = easel(&[])
        .args(["keys", "create", "--name", "me", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut cmd = easel(&[]);
    cmd.env("EASEL_DATA_DIR", &data);
    let server = Server::start(cmd, &key);
    let model = fixtures().join("models/tiny-sd15").display().to_string();
    let mut ids = Vec::new();
    for i in 0..2 {
        let body = json!({"baseModel": model, "width": 64, "height": 64, "steps": 2,
                          "outputFormat": "png",
                          "images": [{"prompt": format!("before {i}"), "seed": i}]});
        let job: Value = ureq::post(&format!("{}/v1/generations", server.base))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Prefer", "wait=60")
            .send_json(body)
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(job["status"], "succeeded", "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let before = server.get("/v1/generations?limit=10");
    drop(server);

    // Migrate, twice.
    let url = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(pg.new_database())
    };
    let first = migrate(&data, &url, &aws);
    assert!(first.contains("generations"), "{first}");
    assert!(
        first.contains("2 files,        2 copied now"),
        "the two images were not copied: {first}"
    );
    let second = migrate(&data, &url, &aws);
    for line in second.lines().filter(|l| l.contains("copied now")) {
        assert!(
            line.contains(" 0 copied now"),
            "the second run copied again: {line}"
        );
    }

    // A server on the new stores: same jobs, same bytes.
    let mut cmd = easel(&aws);
    cmd.env("EASEL_DATA_DIR", dir.path().join("node"))
        .env("EASEL_DATABASE_URL", &url)
        .env("EASEL_ASSET_STORE", "s3://migrated/easel");
    let node = Server::start(cmd, &key);
    let after = node.get("/v1/generations?limit=10");
    assert_eq!(after["data"].as_array().unwrap().len(), 2);
    for id in &ids {
        let old = before["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == id.as_str())
            .unwrap();
        let new = node.get(&format!("/v1/generations/{id}"));
        assert_eq!(new["status"], "succeeded");
        let (a, b) = (&old["assets"][0], &new["assets"][0]);
        assert_eq!(a["content_hash"], b["content_hash"]);
        let hash = a["content_hash"].as_str().unwrap();
        let original = std::fs::read(
            data.join("assets")
                .join(&hash[..2])
                .join(format!("{hash}.png")),
        )
        .unwrap();
        assert_eq!(node.bytes(b["file_url"].as_str().unwrap()), original);
    }
    assert_eq!(
        node.get("/v1/usage")["inferences_billed"],
        before_usage(&before)
    );
}

/// Inferences billed before the move: one per job here.
fn before_usage(before: &Value) -> Value {
    json!(before["data"].as_array().unwrap().len())
}
