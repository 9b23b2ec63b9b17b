//! The test harness the server's integration tests share: a server on a
//! temporary data dir with one API key, called through its router
//! (`oneshot`). Each test file adds its own helpers in `impl TestServer`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use easel_server::config::{Config, EngineKind};
use easel_server::{app, AppState};
use serde_json::Value;
use tower::ServiceExt;

pub mod moto;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A server on a temporary data dir, with one API key.
pub struct TestServer {
    pub state: AppState,
    pub router: Router,
    pub key: String,
    pub dir: tempfile::TempDir,
}

pub fn base_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.join("data"),
        models_dirs: vec![fixtures().join("models"), fixtures().join("loras")],
        hf_cache: Some(dir.join("hub")),
        offline: true,
        webhook_secret: Some("test-secret".into()),
        webhook_backoff_ms: 50,
        ..Config::default()
    }
}

impl TestServer {
    pub async fn new(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = base_config(dir.path());
        tweak(&mut config);
        let state = AppState::open(config).await.unwrap();
        let key = Self::add_key(&state, None).await;
        TestServer {
            router: app(state.clone()),
            state,
            key,
            dir,
        }
    }

    pub async fn fake() -> TestServer {
        Self::new(|c| {
            c.engine = EngineKind::Fake;
            c.fake_step_ms = 1;
        })
        .await
    }

    pub async fn add_key(state: &AppState, limit_micros: Option<i64>) -> String {
        let (row, secret) = easel_server::auth::new_key("test", limit_micros);
        state
            .store()
            .insert_key(&row, &easel_server::auth::hash_secret(&secret))
            .await
            .unwrap();
        secret
    }

    pub async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    pub async fn call_as(
        &self,
        key: Option<&str>,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match body {
            Some(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        let (status, headers, bytes) = self.send(request).await;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, value)
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (s, _, v) = self
            .call_as(Some(&self.key.clone()), method, uri, body)
            .await;
        (s, v)
    }

    pub async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, uri, Some(body)).await
    }

    /// Poll `GET path` (a job or a flow run) until its `status` is
    /// finished (`succeeded`, `failed`, `canceled`); panics after `secs`.
    pub async fn wait_finished(&self, path: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let (status, record) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {record}");
            if ["succeeded", "failed", "canceled"].contains(&record["status"].as_str().unwrap()) {
                return record;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} not finished in {secs} s: {record:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Store `document` as a flow (201) and start a run of it with `input`
    /// (202); the run's id.
    pub async fn start_flow(&self, document: Value, input: Value) -> String {
        let (s, flow) = self.post("/v1/flows", document).await;
        assert_eq!(s, StatusCode::CREATED, "{flow}");
        let (s, run) = self
            .post(
                &format!("/v1/flows/{}/runs", flow["id"].as_str().unwrap()),
                serde_json::json!({ "input": input }),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{run}");
        assert_eq!(run["object"], "flow_run");
        run["id"].as_str().unwrap().to_string()
    }

    /// [`TestServer::wait_finished`] for the generation job `id`.
    pub async fn wait_done(&self, id: &str, secs: u64) -> Value {
        self.wait_finished(&format!("/v1/generations/{id}"), secs)
            .await
    }

    /// [`TestServer::wait_finished`] for the flow run `id`.
    pub async fn wait_run(&self, id: &str, secs: u64) -> Value {
        self.wait_finished(&format!("/v1/flow-runs/{id}"), secs)
            .await
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None).await
    }
}

/// A `width` x `height` RGB PNG: a gradient, or all white (a mask that
/// repaints everything) with `white`.
pub fn test_png(width: u32, height: u32, white: bool) -> Vec<u8> {
    let pixels: Vec<u8> = (0..width * height * 3)
        .map(|i| if white { 255 } else { (i % 251) as u8 })
        .collect();
    let image = easel_core::RgbImageRef::new(width, height, &pixels).unwrap();
    easel_core::encode_image(
        &image,
        easel_core::OutputFormat::Png,
        100,
        &easel_core::ImageMetadata::default(),
    )
    .unwrap()
}

/// [`test_png`] (the gradient) as a `data:image/png;base64,` URI.
pub fn test_png_data_uri(width: u32, height: u32) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(test_png(width, height, false));
    format!("data:image/png;base64,{b64}")
}
pub mod postgres;
