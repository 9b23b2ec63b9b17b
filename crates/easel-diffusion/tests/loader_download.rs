//! Downloading through `hf-hub` against a local stand-in for the Hugging Face
//! hub (the two endpoints the sync API uses: `GET /api/models/<repo>/revision/<rev>`
//! for the file list and commit, `GET /<repo>/resolve/<rev>/<file>` with
//! `Range` for the metadata headers and the bytes). No real network is used.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use easel_diffusion::loader::{resolve_model, ModelSource, ResolveOptions};
use easel_diffusion::Error;

const COMMIT: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcd";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A hub serving one repository (`files`, at commit [`COMMIT`] for any
/// revision) and recording the files it was asked for.
struct FakeHub {
    url: String,
    /// Files whose bytes were sent.
    requested: Arc<Mutex<Vec<String>>>,
    /// Every request, of any kind.
    hits: Arc<AtomicUsize>,
}

impl FakeHub {
    fn start(repo_id: &'static str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requested = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (log, counter) = (requested.clone(), hits.clone());
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let files = files.clone();
                let log = log.clone();
                std::thread::spawn(move || serve(stream, repo_id, &files, &log));
            }
        });
        Self {
            url,
            requested,
            hits,
        }
    }

    /// The files whose bytes were downloaded (not just their metadata).
    fn downloaded(&self) -> Vec<String> {
        let mut files = self.requested.lock().unwrap().clone();
        files.sort();
        files.dedup();
        files
    }
}

fn serve(
    stream: TcpStream,
    repo_id: &str,
    files: &BTreeMap<String, Vec<u8>>,
    log: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range = Some(value.trim().to_string());
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut stream = stream;
    let respond =
        |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        };
    let api_prefix = format!("/api/models/{repo_id}/revision/");
    let resolve_prefix = format!("/{repo_id}/resolve/");
    if path.starts_with(&api_prefix) {
        let siblings: Vec<serde_json::Value> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo_id, "sha": COMMIT, "siblings": siblings });
        let headers = [("Content-Type".to_string(), "application/json".to_string())];
        respond(&mut stream, "200 OK", &headers, body.to_string().as_bytes());
    } else if let Some(rest) = path.strip_prefix(&resolve_prefix) {
        // <revision>/<file>; the revision has no '/' here (escaped as %2F).
        let file = rest.split_once('/').map_or("", |(_, f)| f);
        let Some(bytes) = files.get(file) else {
            respond(&mut stream, "404 Not Found", &[], b"not found");
            return;
        };
        // hf-hub asks `bytes=0-0` for the metadata headers, then `bytes=<start>-`.
        let metadata_only = range.as_deref() == Some("0-0");
        let start = range
            .as_deref()
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
            .min(bytes.len());
        let body = if metadata_only {
            &bytes[..bytes.len().min(1)]
        } else {
            log.lock().unwrap().push(file.to_string());
            &bytes[start..]
        };
        let headers = [
            (
                "ETag".to_string(),
                format!("\"etag-{}\"", file.replace('/', "-")),
            ),
            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
            (
                "Content-Range".to_string(),
                format!(
                    "bytes {start}-{}/{}",
                    bytes.len().saturating_sub(1),
                    bytes.len()
                ),
            ),
        ];
        respond(&mut stream, "206 Partial Content", &headers, body);
    } else {
        respond(&mut stream, "404 Not Found", &[], b"not found");
    }
}

/// tiny-sd15 as a hub repository, plus what a real one also holds: pickle
/// weights, a safety checker, fp16 variants, a sharded text encoder.
/// The files of fixture model `name`, by path in the repo.
fn served(name: &str) -> BTreeMap<String, Vec<u8>> {
    let root = fixtures().join("models").join(name);
    let mut files = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .replace('\\', "/");
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// tiny-sd15 as served, with what a real repo also holds (a safety
/// checker, fp16 and pickle variants, a sharded text encoder).
fn served_repo() -> BTreeMap<String, Vec<u8>> {
    let mut files = served("tiny-sd15");
    let mut index: serde_json::Value = serde_json::from_slice(&files["model_index.json"]).unwrap();
    index["safety_checker"] =
        serde_json::json!(["stable_diffusion", "StableDiffusionSafetyChecker"]);
    files.insert(
        "model_index.json".into(),
        serde_json::to_vec_pretty(&index).unwrap(),
    );
    let unet = files["unet/diffusion_pytorch_model.safetensors"].clone();
    files.insert("unet/diffusion_pytorch_model.fp16.safetensors".into(), unet);
    files.insert(
        "unet/diffusion_pytorch_model.bin".into(),
        b"pickle".to_vec(),
    );
    files.insert("safety_checker/config.json".into(), b"{}".to_vec());
    files.insert("safety_checker/model.safetensors".into(), b"big".to_vec());
    files.insert("v1-5-pruned.ckpt".into(), b"pickle".to_vec());
    files.insert("README.md".into(), b"# readme".to_vec());
    // The text encoder in two shards (contents are not parsed here).
    files.remove("text_encoder/model.safetensors");
    files.insert(
        "text_encoder/model.safetensors.index.json".into(),
        br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#.to_vec(),
    );
    files.insert(
        "text_encoder/model-00001-of-00002.safetensors".into(),
        b"shard1".to_vec(),
    );
    files.insert(
        "text_encoder/model-00002-of-00002.safetensors".into(),
        b"shard2".to_vec(),
    );
    files
}

fn online(hub: &Path, url: &str) -> ResolveOptions {
    ResolveOptions {
        cache_dir: Some(hub.to_path_buf()),
        endpoint: Some(url.to_string()),
        token: Some("test-token".into()),
        ..Default::default()
    }
}

fn offline_by_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

#[test]
fn downloads_what_the_pipeline_needs() {
    if offline_by_env() {
        eprintln!("HF_HUB_OFFLINE is set: skipping the download test");
        return;
    }
    let fake = FakeHub::start("org/served", served_repo());
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let options = online(&hub, &fake.url);

    let model = resolve_model("org/served", &options).unwrap();
    let snapshot = hub.join("models--org--served/snapshots").join(COMMIT);
    assert_eq!(model.path(), snapshot);
    assert_eq!(
        model.source(),
        &ModelSource::HubCache {
            repo_id: "org/served".into(),
            revision: "main".into(),
            commit: COMMIT.into(),
        }
    );
    assert_eq!(
        std::fs::read_to_string(hub.join("models--org--served/refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    assert_eq!(
        fake.downloaded(),
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    );
    assert_eq!(
        model.weight_files("unet").unwrap(),
        [snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")]
    );
    assert_eq!(
        model.weight_files("text_encoder").unwrap(),
        [
            snapshot.join("text_encoder/model-00001-of-00002.safetensors"),
            snapshot.join("text_encoder/model-00002-of-00002.safetensors"),
        ]
    );
    assert_eq!(
        std::fs::read(snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap(),
        std::fs::read(fixtures().join("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
    );

    // Cached and complete: no request at all, even offline.
    let before = fake.hits.load(Ordering::SeqCst);
    assert_eq!(
        resolve_model("org/served", &options).unwrap().path(),
        snapshot
    );
    let offline = ResolveOptions {
        offline: true,
        ..options.clone()
    };
    assert_eq!(
        resolve_model("org/served", &offline).unwrap().path(),
        snapshot
    );
    assert_eq!(fake.hits.load(Ordering::SeqCst), before);

    // Incomplete: only the missing file is fetched again.
    std::fs::remove_file(snapshot.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    fake.requested.lock().unwrap().clear();
    resolve_model("org/served", &options).unwrap();
    assert_eq!(
        fake.downloaded(),
        ["vae/diffusion_pytorch_model.safetensors"]
    );
    assert!(model.weight_files("vae").is_ok());

    // Another revision name for the same commit gets its ref.
    resolve_model("org/served@v2", &options).unwrap();
    assert_eq!(
        std::fs::read_to_string(hub.join("models--org--served/refs/v2"))
            .unwrap()
            .trim(),
        COMMIT
    );
}

#[test]
fn hub_failures_are_model_not_found_with_the_cache_path() {
    if offline_by_env() {
        return;
    }
    let fake = FakeHub::start("org/served", served_repo());
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");

    // Unknown repository (404).
    let err = resolve_model("org/unknown", &online(&hub, &fake.url)).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains("could not be downloaded"), "{message}");
    assert!(
        message.contains(&hub.join("models--org--unknown").display().to_string()),
        "{message}"
    );
    assert!(message.contains("HF_TOKEN"), "{message}");

    // Nothing listening.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let err = resolve_model("org/served", &online(&hub, &closed)).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");

    // A repository with pickle-only weights: refused before any weight is fetched.
    let mut files = served_repo();
    files.remove("unet/diffusion_pytorch_model.safetensors");
    files.remove("unet/diffusion_pytorch_model.fp16.safetensors");
    let pickle = FakeHub::start("org/pickle", files);
    let err = resolve_model("org/pickle", &online(&hub, &pickle.url)).unwrap_err();
    assert!(matches!(err, Error::UnsupportedWeights { .. }), "{err}");
    let err = err.to_string();
    assert!(err.contains("only safetensors are supported"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.bin"), "{err}");
    assert_eq!(pickle.downloaded(), ["model_index.json"]);

    // Not a diffusers repository.
    let mut files = BTreeMap::new();
    files.insert("model.safetensors".to_string(), b"x".to_vec());
    let single = FakeHub::start("org/single", files);
    let err = resolve_model("org/single", &online(&hub, &single.url)).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    assert!(
        err.to_string().contains("not a diffusers pipeline"),
        "{err}"
    );
    assert!(single.downloaded().is_empty());
}

/// Issue 14: a single-file checkpoint's config repo is downloaded without
/// its weights (configs and tokenizer files only), then the model runs on
/// the file's weights; a cached config snapshot needs no request.
#[test]
fn single_file_config_repo_downloads_configs_only() {
    if offline_by_env() {
        eprintln!("HF_HUB_OFFLINE is set: skipping the download test");
        return;
    }
    let fake = FakeHub::start("org/served", served_repo());
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let options = online(&hub, &fake.url);
    let file = single_file_fixture("tiny-sd15");
    let model =
        easel_diffusion::loader::open_single_file(&file, Some("org/served"), None, &options)
            .unwrap();
    assert_eq!(
        fake.downloaded(),
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "vae/config.json",
        ]
    );
    assert_eq!(model.single_file().unwrap().path(), file);
    assert!(easel_diffusion::pipelines::load_pipeline(&model, &candle_core::Device::Cpu).is_ok());
    let before = fake.hits.load(Ordering::SeqCst);
    easel_diffusion::loader::open_single_file(&file, Some("org/served"), None, &options).unwrap();
    assert_eq!(fake.hits.load(Ordering::SeqCst), before);
}

/// Issue 14: a FLUX transformer-only file's config repo gives the text
/// encoders and VAE too: everything is downloaded but the transformer's
/// weights, which come from the file.
#[test]
fn flux_single_file_config_repo_downloads_all_but_the_transformer() {
    if offline_by_env() {
        eprintln!("HF_HUB_OFFLINE is set: skipping the download test");
        return;
    }
    let fake = FakeHub::start("org/flux", served("tiny-flux-schnell"));
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let options = online(&hub, &fake.url);
    let file = single_file_fixture("tiny-flux-schnell");
    let model =
        easel_diffusion::loader::open_single_file(&file, Some("org/flux"), None, &options).unwrap();
    let downloaded = fake.downloaded();
    assert!(
        !downloaded
            .iter()
            .any(|f| f.starts_with("transformer/") && f.ends_with(".safetensors")),
        "{downloaded:?}"
    );
    for needed in [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "transformer/config.json",
    ] {
        assert!(
            downloaded.iter().any(|f| f == needed),
            "{needed}: {downloaded:?}"
        );
    }
    assert_eq!(model.single_file().unwrap().path(), file);
    assert!(easel_diffusion::pipelines::load_pipeline(&model, &candle_core::Device::Cpu).is_ok());
}
