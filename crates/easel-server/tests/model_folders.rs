//! A model root laid out as an AUTOMATIC1111 install (issue 14): its
//! checkpoints are listed by `GET /v1/models` with their kind, family and
//! format, and `baseModel` / `loras[].path` take their file names.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use easel_server::config::Config;
use easel_server::{app, AppState};
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The config and tokenizer files (no weights) of fixture folder `fixture`
/// as the hub-cache snapshot of `repo_id`, the default config repo a
/// single-file checkpoint of its architecture reads offline.
fn cache_configs(hub: &Path, repo_id: &str, fixture: &str) {
    let commit = "1111111111111111111111111111111111111111";
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    let source = fixtures().join("models").join(fixture);
    let mut stack = vec![source.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let target = snapshot.join(path.strip_prefix(&source).unwrap());
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none_or(|e| e != "safetensors") {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

async fn call(
    router: &axum::Router,
    key: &str,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    let request = match body {
        Some(b) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    };
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_a1111_model_root_lists_and_resolves_its_files_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let webui = dir.path().join("stable-diffusion-webui");
    let checkpoints = webui.join("models/Stable-diffusion");
    let loras = webui.join("models/Lora");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::copy(
        single_file_support::single_file_fixture("tiny-sd15"),
        checkpoints.join("dreamshaper_8.safetensors"),
    )
    .unwrap();
    std::fs::write(checkpoints.join("old.ckpt"), b"\x80\x02}q\x00.").unwrap();
    std::fs::copy(
        fixtures().join("loras/tiny-sd15-lora.safetensors"),
        loras.join("detail.safetensors"),
    )
    .unwrap();
    let hub = dir.path().join("hub");
    cache_configs(
        &hub,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "tiny-sd15",
    );

    let config = Config {
        data_dir: dir.path().join("data"),
        models_dirs: vec![webui.clone()],
        hf_cache: Some(hub),
        offline: true,
        ..Config::default()
    };
    let state = AppState::open(config).await.unwrap();
    let (row, secret) = easel_server::auth::new_key("test", None);
    state
        .store()
        .insert_key(&row, &easel_server::auth::hash_secret(&secret))
        .await
        .unwrap();
    let router = app(state.clone());

    // Listed by name with what the header says.
    let (status, models) = call(&router, &secret, Method::GET, "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK, "{models}");
    let data = models["data"].as_array().unwrap();
    let entry = |id: &str| {
        data.iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {models}"))
            .clone()
    };
    let sd = entry("dreamshaper_8");
    assert_eq!(sd["kind"], "checkpoint");
    assert_eq!(sd["family"], "SD 1.x");
    assert_eq!(sd["format"], "safetensors");
    assert_eq!(sd["pipeline_class"], "StableDiffusionPipeline");
    assert_eq!(
        sd["size_bytes"].as_u64(),
        Some(
            std::fs::metadata(checkpoints.join("dreamshaper_8.safetensors"))
                .unwrap()
                .len()
        )
    );
    let old = entry("old");
    assert_eq!(old["format"], "pickle");
    assert!(
        old["family"].as_str().unwrap().starts_with("unknown: "),
        "{old}"
    );
    // LoRAs are no base models.
    assert!(data.iter().all(|m| m["id"] != "detail"), "{models}");

    // `baseModel` and `loras[].path` by file name.
    let (status, job) = call(
        &router,
        &secret,
        Method::POST,
        "/v1/generations",
        Some(
            json!({"baseModel": "dreamshaper_8", "steps": 2, "width": 64, "height": 64,
                    "images": [{"prompt": "a red fox", "seed": 1,
                                "loras": [{"path": "detail.safetensors", "scale": 0.8}]},
                               {"prompt": "a red fox", "seed": 1,
                                "loras": [{"path": "detail", "scale": 0.8}]},
                               {"prompt": "a red fox", "seed": 1}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let (_, job) = call(
            &router,
            &secret,
            Method::GET,
            &format!("/v1/generations/{id}"),
            None,
        )
        .await;
        if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        assert!(Instant::now() < deadline, "not done: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(
        images[0]["parameters"]["pipeline"], "StableDiffusionPipeline",
        "{job}"
    );
    // Both spellings of the LoRA name the same file: the same image, and
    // not the image without it.
    let assets = job["assets"].as_array().unwrap();
    assert_eq!(assets.len(), 3, "{job}");
    assert_eq!(
        assets[0]["content_hash"], assets[1]["content_hash"],
        "{job}"
    );
    assert_ne!(
        assets[0]["content_hash"], assets[2]["content_hash"],
        "{job}"
    );

    // A pickle by name is refused before 202, saying why; an ambiguous
    // name lists both files.
    let (status, e) = call(
        &router,
        &secret,
        Method::POST,
        "/v1/generations",
        Some(json!({"baseModel": "old", "images": [{"prompt": "a"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("pickle"),
        "{e}"
    );
    std::fs::create_dir_all(checkpoints.join("sd15")).unwrap();
    std::fs::copy(
        checkpoints.join("dreamshaper_8.safetensors"),
        checkpoints.join("sd15/dreamshaper_8.safetensors"),
    )
    .unwrap();
    let (status, e) = call(
        &router,
        &secret,
        Method::POST,
        "/v1/generations",
        Some(json!({"baseModel": "dreamshaper_8", "images": [{"prompt": "a"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("ambiguous"), "{e}");
    assert!(message.contains("sd15/dreamshaper_8.safetensors"), "{e}");
    assert!(
        message.contains("Stable-diffusion/dreamshaper_8.safetensors"),
        "{e}"
    );
    state.shutdown().await;
}
