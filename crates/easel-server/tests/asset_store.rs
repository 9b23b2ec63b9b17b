//! The asset store's one test suite, run on both backends: a folder, and an
//! S3 bucket on a real S3-protocol server (moto, see `common/moto.rs`;
//! skipped loudly without it, a failure with `EASEL_REQUIRE_SERVERS=1`).
//! Then the server end to end on S3: a generated image's `file_url` serves
//! the PNG from the bucket, and a training uploaded to the bucket is used
//! through its local copy.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use bytes::Bytes;
use easel_server::assets::{AssetStore, AssetStoreSpec, Backend, Folder, S3};
use easel_server::config::EngineKind;
use serde_json::{json, Value};

mod common;
use common::moto::Moto;
use common::{fixtures, TestServer};

/// Deterministic, incompressible-looking bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The suite: `backend` empty, `cache` where a remote backend's local
/// copies go.
async fn suite(label: &str, backend: Arc<dyn Backend>, cache: Option<Folder>) {
    let store = AssetStore::new(backend.clone(), cache);
    assert!(store.keys().await.unwrap().is_empty(), "{label}: not empty");

    // put: content-addressed, idempotent.
    let a = store.put(b"hello".to_vec(), "png").await.unwrap();
    assert_eq!(a.hash, easel_server::assets::hash_bytes(b"hello"));
    assert_eq!((a.extension.as_str(), a.size), ("png", 5));
    let again = store
        .put(Bytes::from_static(b"hello"), "png")
        .await
        .unwrap();
    assert_eq!(a, again, "{label}");
    let key_a = format!("{}/{}.png", &a.hash[..2], a.hash);
    assert_eq!(store.keys().await.unwrap(), vec![key_a.clone()], "{label}");
    assert_eq!(
        store.get(&a.hash, "png").await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
    assert!(store.exists(&a.hash, "png").await.unwrap());
    // The same bytes under another extension are another file.
    assert!(!store.exists(&a.hash, "webp").await.unwrap());
    assert_eq!(store.get(&a.hash, "webp").await.unwrap(), None);
    let absent = easel_server::assets::hash_bytes(b"never stored");
    assert_eq!(store.get(&absent, "png").await.unwrap(), None, "{label}");

    // Malformed names are refused before they reach the backend.
    for (hash, ext) in [
        (a.hash.as_str(), "png/../x"),
        (a.hash.as_str(), ""),
        (a.hash.as_str(), "averyveryverylongext"),
        ("../../etc/passwd", "png"),
        (&a.hash[..63], "png"),
        (&a.hash.to_uppercase(), "png"),
    ] {
        let e = store.get(hash, ext).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{label}: {hash}.{ext}");
        let e = store.exists(hash, ext).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{label}: {hash}.{ext}");
        let e = store.local_file(hash, ext).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{label}: {hash}.{ext}");
    }
    let e = store.put(b"x".to_vec(), "png/../x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{label}");
    let e = store.put(b"x".to_vec(), "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{label}");

    // Large-ish: 24 MiB (more than one S3 PUT buffer, hashed off the runtime).
    let big = noise(24 << 20, 7);
    let stored = store.put(big.clone(), "safetensors").await.unwrap();
    assert_eq!(stored.size, big.len() as u64);
    let back = store
        .get(&stored.hash, "safetensors")
        .await
        .unwrap()
        .unwrap();
    assert!(back == big, "{label}: large file differs");
    // A local file of it (the folder's own, or a downloaded copy).
    let local = store.local_file(&stored.hash, "safetensors").await.unwrap();
    assert!(std::fs::read(&local).unwrap() == big, "{label}");
    // A copy that no longer matches its hash is downloaded again.
    if backend.local_path("x").is_none() {
        std::fs::write(&local, b"corrupt").unwrap();
        let again = store.local_file(&stored.hash, "safetensors").await.unwrap();
        assert_eq!(again, local);
        assert!(
            std::fs::read(&local).unwrap() == big,
            "{label}: copy not refreshed"
        );
    }
    let e = store.local_file(&absent, "png").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{label}");

    // remove: gone; removing again is fine.
    store.remove(&stored.hash, "safetensors").await;
    assert_eq!(store.get(&stored.hash, "safetensors").await.unwrap(), None);
    assert!(!store.exists(&stored.hash, "safetensors").await.unwrap());
    store.remove(&stored.hash, "safetensors").await;
    assert_eq!(store.keys().await.unwrap(), vec![key_a.clone()], "{label}");

    // sweep: files no record names and stray objects go, recorded ones stay.
    let orphan = store.put(b"orphan".to_vec(), "webp").await.unwrap();
    let stray = format!("{}/.easel-partial.tmp", &a.hash[..2]);
    backend
        .put(&stray, Bytes::from_static(b"partial"))
        .await
        .unwrap();
    let known: HashSet<String> = [a.hash.clone()].into();
    assert_eq!(store.keys().await.unwrap().len(), 3, "{label}");
    let grace = backend.sweep_grace();
    if !grace.is_zero() {
        // A shared store keeps young unrecorded files: another server may
        // be about to commit their records.
        assert_eq!(store.sweep(&known).await.unwrap(), 0, "{label}");
        assert_eq!(store.keys().await.unwrap().len(), 3, "{label}");
    }
    assert_eq!(
        store
            .sweep_older_than(&known, Duration::ZERO)
            .await
            .unwrap(),
        2,
        "{label}"
    );
    assert_eq!(store.keys().await.unwrap(), vec![key_a], "{label}");
    assert!(!store.exists(&orphan.hash, "webp").await.unwrap());
    assert!(store.exists(&a.hash, "png").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_store_suite_on_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = Folder::open(dir.path().join("assets")).unwrap();
    suite("folder", Arc::new(folder), None).await;
    // The layout is today's: ROOT/ab/<hash>.<ext>.
    let hash = easel_server::assets::hash_bytes(b"hello");
    assert!(dir
        .path()
        .join("assets")
        .join(&hash[..2])
        .join(format!("{hash}.png"))
        .is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_store_suite_on_s3() {
    let Some(moto) = Moto::start("asset_store_suite_on_s3") else {
        return;
    };
    moto.create_bucket("easel-suite");
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::open("easel-suite", "deploy/assets", &moto.s3_options()).unwrap();
    assert_eq!(s3.location(), "s3://easel-suite/deploy/assets");
    let cache = Folder::open(dir.path().join("cache")).unwrap();
    suite("s3", Arc::new(s3), Some(cache)).await;
    // The layout: PREFIX/ab/<hash>.<ext> in the bucket (read with a client
    // rooted higher up).
    let hash = easel_server::assets::hash_bytes(b"hello");
    let root = S3::open("easel-suite", "", &moto.s3_options()).unwrap();
    let key = format!("deploy/assets/{}/{hash}.png", &hash[..2]);
    assert_eq!(
        root.get(&key).await.unwrap().as_deref(),
        Some(&b"hello"[..])
    );
}

/// A bucket that is not there (or an endpoint that does not answer) stops
/// the server's start with the store named, not its first job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_stops_the_start() {
    let Some(moto) = Moto::start("a_missing_bucket_stops_the_start") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::base_config(dir.path());
    config.engine = EngineKind::Fake;
    config.asset_store = Some("s3://no-such-bucket/x".parse().unwrap());
    config.s3 = moto.s3_options();
    let e = easel_server::AppState::open(config).await.err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("asset store") && text.contains("s3://no-such-bucket/x"),
        "{text}"
    );
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----easelassetstoretest";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match filename {
            Some(f) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The server on an S3 store: a generated image is in the bucket, its
/// `file_url` serves the PNG through the API, nothing is written to the
/// data dir's `assets/`; a training goes to the bucket and a job using it
/// runs on its local copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_on_s3_serves_generated_files_and_uses_trainings() {
    let Some(moto) = Moto::start("server_on_s3_serves_generated_files_and_uses_trainings") else {
        return;
    };
    moto.create_bucket("easel-e2e");
    let options = moto.s3_options();
    let server = TestServer::new(move |c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.asset_store = Some("s3://easel-e2e/prod".parse().unwrap());
        c.s3 = options;
    })
    .await;
    assert_eq!(
        server.state.assets().location(),
        "s3://easel-e2e/prod/assets"
    );
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "steps": 2, "outputFormat": "png",
                   "images": [{"prompt": "a lighthouse", "width": 64, "height": 48}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 60).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let asset = &job["assets"][0];
    let url = asset["file_url"].as_str().unwrap();
    let path = &url[url.find("/v1/files/").unwrap()..];
    let (status, headers, bytes) = server
        .send(Request::get(path).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "image/png");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let image = easel_core::decode_image(&bytes).unwrap();
    assert_eq!((image.width, image.height), (64, 48));
    // It is the bucket's object, and the data dir holds no asset files.
    let hash = asset["content_hash"].as_str().unwrap();
    let root = S3::open("easel-e2e", "", &moto.s3_options()).unwrap();
    let in_bucket = root
        .get(&format!("prod/assets/{}/{hash}.png", &hash[..2]))
        .await
        .unwrap()
        .unwrap();
    assert!(in_bucket == bytes);
    let data_assets = server.dir.path().join("data/assets");
    assert!(
        !data_assets.exists() || std::fs::read_dir(&data_assets).unwrap().next().is_none(),
        "files under {}",
        data_assets.display()
    );
    // The asset's own file route reads the bucket too.
    let (status, _, by_id) = server
        .send(
            Request::get(format!("/v1/assets/{}/file", asset["id"].as_str().unwrap()))
                .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(by_id == bytes);
    // A file that is not stored is a 404.
    let missing = format!("/v1/files/{}.png", "0".repeat(64));
    let (status, _, _) = server
        .send(Request::get(missing).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A training: uploaded to the bucket, used through a local copy.
    let lora = std::fs::read(fixtures().join("loras/tiny-sd15-lora.safetensors")).unwrap();
    let (content_type, body) = multipart(&[
        ("file", Some("tiny.safetensors"), &lora),
        ("baseModel", None, b"fake/model"),
    ]);
    let request = Request::post("/v1/trainings")
        .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap();
    let (status, _, t) = server.send(request).await;
    let t: Value = serde_json::from_slice(&t).unwrap();
    assert_eq!(status, StatusCode::CREATED, "{t}");
    let lora_hash = easel_server::assets::hash_bytes(&lora);
    assert!(server
        .state
        .trainings()
        .exists(&lora_hash, "safetensors")
        .await
        .unwrap());
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "steps": 2, "trainingId": t["id"],
                   "scale": 0.5, "images": [{"prompt": "b"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 60).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let copy = server
        .dir
        .path()
        .join("data/asset-cache/trainings")
        .join(&lora_hash[..2])
        .join(format!("{lora_hash}.safetensors"));
    assert!(std::fs::read(&copy).unwrap() == lora, "{}", copy.display());
    // A store written by another server: the config spelled as a spec.
    assert_eq!(
        server.state.config().asset_store_spec(),
        AssetStoreSpec::S3 {
            bucket: "easel-e2e".into(),
            prefix: "prod".into()
        }
    );
}
