//! `easel serve` and `easel keys` as processes: the seed-shaped request
//! against `easel generate`, and a server killed in the middle of a job.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{fixtures, free_port, wait_ready};

fn easel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_easel"));
    c.env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_CONFIG")
        .env_remove("EASEL_DEVICE");
    c
}

fn create_key(data: &Path) -> String {
    let out = easel()
        .args(["keys", "create", "--name", "test", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(secret.starts_with("esk_"), "{secret}");
    secret
}

/// `easel serve` on a free loopback port; waits until `/readyz` answers.
struct Server {
    child: Child,
    base: String,
    key: String,
}

impl Server {
    fn start(data: &Path, key: &str, extra_env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = easel();
        cmd.args(["serve", "--offline", "--bind", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data)
            .arg("--models-dir")
            .arg(fixtures().join("models"))
            .env("HF_HUB_CACHE", data.join("no-hub"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            key: key.to_string(),
        };
        wait_ready(&server.base, "server");
        server
    }

    fn post(&self, path: &str, body: &Value, wait: Option<u64>) -> Value {
        let mut r = ureq::post(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key));
        if let Some(w) = wait {
            r = r.set("Prefer", &format!("wait={w}"));
        }
        match r.send_json(body.clone()) {
            Ok(resp) => resp.into_json().unwrap(),
            Err(ureq::Error::Status(code, resp)) => {
                panic!("POST {path}: {code} {}", resp.into_string().unwrap())
            }
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn get(&self, path: &str) -> Value {
        ureq::get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    fn bytes(&self, url: &str) -> Vec<u8> {
        let mut out = Vec::new();
        use std::io::Read;
        ureq::get(url)
            .call()
            .unwrap()
            .into_reader()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn wait_done(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.get(&format!("/v1/generations/{id}"));
            if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap()) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} not done: {job}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rgb8(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = easel_core::decode_image(bytes).unwrap();
    let (w, h) = (img.width, img.height);
    (w, h, img.into_rgb8())
}

/// Issue 6: a request in the seed shape (three image definitions with
/// per-image overrides of the global defaults) gives the images `easel
/// generate` gives for the same settings and seeds, pixel for pixel.
#[test]
fn seed_shape_request_gives_the_pixels_of_easel_generate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = create_key(&data);
    let server = Server::start(&data, &key, &[]);
    let model = fixtures().join("models/tiny-sd15").display().to_string();
    let request = json!({
        "baseModel": model,
        "negativePrompt": "blurry, deformed",
        "width": 64, "height": 64, "steps": 2, "guidanceScale": 8.0,
        "outputFormat": "png",
        "images": [
            {"prompt": "A photo of an astronaut riding a horse on mars", "seed": 42},
            {"prompt": "A portrait in a sunlit garden", "seed": 7, "width": 72, "steps": 3,
             "guidanceScale": 5.5, "baseModel": "tiny-sd15"},
            {"prompt": "a lighthouse at dusk", "seed": 1000, "batchSize": 2,
             "scheduler": "euler", "negativePrompt": "fog"},
        ],
    });
    let job = server.post("/v1/generations", &request, Some(300));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["cost"]["inferences"], 3);
    assert_eq!(job["cost"]["amount_usd"], 0.06);
    let cli = [
        (
            "A photo of an astronaut riding a horse on mars",
            "blurry, deformed",
            42u64,
            64,
            2,
            "8",
            None,
            1,
        ),
        (
            "A portrait in a sunlit garden",
            "blurry, deformed",
            7,
            72,
            3,
            "5.5",
            None,
            1,
        ),
        (
            "a lighthouse at dusk",
            "fog",
            1000,
            64,
            2,
            "8",
            Some("euler"),
            2,
        ),
    ];
    for (i, (prompt, negative, seed, width, steps, guidance, scheduler, batch)) in
        cli.iter().enumerate()
    {
        let image = &job["images"][i];
        assert_eq!(image["parameters"]["seed"], *seed);
        assert_eq!(image["parameters"]["width"], *width);
        let out = dir.path().join(format!("cli-{i}.png"));
        let mut cmd = easel();
        cmd.args([
            "generate",
            "--model",
            &model,
            "--prompt",
            prompt,
            "--negative-prompt",
            negative,
        ])
        .args([
            "--seed",
            &seed.to_string(),
            "--width",
            &width.to_string(),
            "--height",
            "64",
        ])
        .args(["--steps", &steps.to_string(), "--guidance-scale", guidance])
        .args(["--batch-size", &batch.to_string(), "--output"])
        .arg(&out);
        if let Some(s) = scheduler {
            cmd.args(["--scheduler", s]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let assets = image["assets"].as_array().unwrap();
        assert_eq!(assets.len(), *batch);
        for (j, asset) in assets.iter().enumerate() {
            let file = if *batch == 1 {
                out.clone()
            } else {
                dir.path().join(format!("cli-{i}-{j}.png"))
            };
            let want = rgb8(&std::fs::read(&file).unwrap());
            let got = rgb8(&server.bytes(asset["file_url"].as_str().unwrap()));
            assert_eq!(got.0, want.0);
            assert_eq!(got.1, want.1);
            assert!(
                got.2 == want.2,
                "image {i}.{j}: pixels differ from easel generate"
            );
            assert_eq!(asset["seed"], seed + j as u64);
        }
    }
}

/// Every file in the asset folder is named by a record and complete; every
/// record's file is there.
fn check_assets(data: &Path) -> HashSet<String> {
    let mut on_disk = HashSet::new();
    for dir in std::fs::read_dir(data.join("assets")).unwrap() {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with(".easel-"), "temporary file left: {name}");
            let bytes = std::fs::read(&path).unwrap();
            let hash = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                hash,
                "truncated or corrupt: {name}"
            );
            easel_core::decode_image(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            on_disk.insert(hash);
        }
    }
    on_disk
}

/// Issue 6: kill the server (SIGKILL) in the middle of a job, start it
/// again on the same data dir: every job is accounted for, the images
/// finished before the kill are kept, and no orphan or truncated file is left.
#[test]
fn a_server_killed_mid_job_resumes_it_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = create_key(&data);
    let model = fixtures().join("models/tiny-sd15").display().to_string();
    // A short lease: the restarted server claims the job again 3 s after
    // the dead one's last renewal.
    let lease = [("EASEL_LEASE_SECONDS", "3")];
    let mut server = Server::start(&data, &key, &lease);
    // Four definitions with different steps: four batches, one after another.
    let long = json!({
        "baseModel": model, "width": 64, "height": 64, "outputFormat": "png",
        "images": (0..4).map(|i| json!({"prompt": format!("image {i}"), "seed": i, "steps": 12 + i}))
            .collect::<Vec<_>>(),
    });
    let first = server.post("/v1/generations", &long, None);
    let id = first["id"].as_str().unwrap().to_string();
    let mut others = Vec::new();
    for i in 0..2 {
        let body = json!({"baseModel": model, "width": 64, "height": 64, "steps": 2,
                          "images": [{"prompt": format!("queued {i}"), "seed": 100 + i}]});
        others.push(
            server.post("/v1/generations", &body, None)["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Wait until the first definition's images are stored, then kill.
    let deadline = Instant::now() + Duration::from_secs(300);
    let kept: Vec<Value> = loop {
        let job = server.get(&format!("/v1/generations/{id}"));
        let assets = job["assets"].as_array().unwrap().clone();
        if !assets.is_empty() {
            assert_eq!(job["status"], "running", "{job}");
            break assets;
        }
        assert!(Instant::now() < deadline, "no image in time: {job}");
        std::thread::sleep(Duration::from_millis(20));
    };
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = Server::start(&data, &key, &lease);
    let job = server.wait_done(&id, 300);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "re-queued once after the kill");
    let assets = job["assets"].as_array().unwrap();
    assert_eq!(assets.len(), 4);
    for k in &kept {
        assert!(
            assets.iter().any(|a| a["id"] == k["id"]),
            "image {} from before the kill was lost",
            k["id"]
        );
    }
    let mut slots = HashSet::new();
    for a in assets {
        assert!(
            slots.insert((a["image_index"].as_i64(), a["batch_index"].as_i64())),
            "duplicate image {a}"
        );
    }
    for other in &others {
        let job = server.wait_done(other, 120);
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["assets"].as_array().unwrap().len(), 1);
    }
    let list = server.get("/v1/generations?limit=100");
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        3,
        "no job lost or duplicated"
    );
    // Files: exactly the recorded ones, each complete.
    let on_disk = check_assets(&data);
    let mut recorded = HashSet::new();
    for g in list["data"].as_array().unwrap() {
        for a in g["assets"].as_array().unwrap() {
            recorded.insert(a["content_hash"].as_str().unwrap().to_string());
            let bytes = server.bytes(a["file_url"].as_str().unwrap());
            assert_eq!(bytes.len() as u64, a["file_size"].as_u64().unwrap());
        }
    }
    assert_eq!(on_disk, recorded, "orphan or missing files");
    let usage = server.get("/v1/usage");
    assert_eq!(usage["inferences_billed"], 6);
}

#[test]
fn serve_refuses_no_auth_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let o = easel()
        .args(["serve", "--no-auth", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn keys_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    create_key(dir.path());
    let o = easel()
        .args(["keys", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    let id = text.split('\t').next().unwrap().to_string();
    assert!(id.starts_with("key_"), "{text}");
    let o = easel()
        .args(["keys", "revoke", &id, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = easel()
        .args(["keys", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8(o.stdout).unwrap().contains("revoked"));
}

/// A request's `loras[]` merges the adapter into the cached model: the
/// server's pixels equal `easel generate --lora` with the same file and scale,
/// and a following request without LoRAs equals plain `easel generate`.
#[test]
fn loras_give_the_pixels_of_easel_generate_with_lora() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = create_key(&data);
    std::fs::create_dir_all(data.join("models")).unwrap();
    let lora = data.join("models/tiny-sd15-lora.safetensors");
    std::fs::copy(fixtures().join("loras/tiny-sd15-lora.safetensors"), &lora).unwrap();
    let server = Server::start(&data, &key, &[]);
    let model = fixtures().join("models/tiny-sd15").display().to_string();
    let mut results: Vec<(u32, u32, Vec<u8>)> = Vec::new();
    for (i, loras) in [
        json!([{"path": lora.display().to_string(), "scale": 0.7}]),
        json!([]),
    ]
    .into_iter()
    .enumerate()
    {
        let with_lora = i == 0;
        let request = json!({
            "baseModel": model,
            "width": 64, "height": 64, "steps": 2, "outputFormat": "png",
            "images": [{"prompt": "a red bicycle", "seed": 3, "loras": loras}],
        });
        let job = server.post("/v1/generations", &request, Some(300));
        assert_eq!(job["status"], "succeeded", "{job}");
        let out = dir.path().join(format!("cli-{i}.png"));
        let mut cmd = easel();
        cmd.args(["generate", "--model", &model, "--prompt", "a red bicycle"])
            .args([
                "--seed", "3", "--width", "64", "--height", "64", "--steps", "2",
            ])
            .arg("--output")
            .arg(&out);
        if with_lora {
            cmd.arg("--lora").arg(format!("{}:0.7", lora.display()));
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let asset = &job["images"][0]["assets"][0];
        let got = rgb8(&server.bytes(asset["file_url"].as_str().unwrap()));
        let want = rgb8(&std::fs::read(&out).unwrap());
        assert!(
            got == want,
            "loras {with_lora}: pixels differ from easel generate"
        );
        results.push(got);
    }
    assert!(results[0] != results[1], "the LoRA changed nothing");
}

/// Image-to-image (`image` as a data URI, `strength`) and inpainting (`mask`
/// as plain base64, on the 9-channel inpainting model) over HTTP give the
/// pixels of `easel generate --image [--mask]` with the same settings.
#[test]
fn image_inputs_give_the_pixels_of_easel_generate() {
    use base64::Engine as _;
    let b64 =
        |p: &Path| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = create_key(&data);
    let server = Server::start(&data, &key, &[]);
    let init = fixtures().join("references/init_image.png");
    let mask = fixtures().join("references/mask.png");
    let cases = [
        ("tiny-sd15", false, "0.6"),
        ("tiny-sd15-inpaint", true, "1.0"),
    ];
    for (i, (name, with_mask, strength)) in cases.into_iter().enumerate() {
        let model = fixtures().join("models").join(name).display().to_string();
        let mut image = json!({
            "prompt": "a portrait in a sunlit garden", "seed": 11,
            "image": format!("data:image/png;base64,{}", b64(&init)),
            "strength": strength.parse::<f64>().unwrap(),
        });
        if with_mask {
            image["mask"] = json!(b64(&mask));
        }
        let request = json!({
            "baseModel": model, "steps": 4, "outputFormat": "png", "images": [image],
        });
        let job = server.post("/v1/generations", &request, Some(300));
        assert_eq!(job["status"], "succeeded", "{job}");
        let out = dir.path().join(format!("cli-{i}.png"));
        let mut cmd = easel();
        cmd.args([
            "generate",
            "--model",
            &model,
            "--prompt",
            "a portrait in a sunlit garden",
        ])
        .args(["--seed", "11", "--steps", "4", "--strength", strength])
        .arg("--image")
        .arg(&init)
        .arg("--output")
        .arg(&out);
        if with_mask {
            cmd.arg("--mask").arg(&mask);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let asset = &job["images"][0]["assets"][0];
        let got = rgb8(&server.bytes(asset["file_url"].as_str().unwrap()));
        let want = rgb8(&std::fs::read(&out).unwrap());
        assert_eq!((got.0, got.1), (64, 64));
        assert!(got == want, "{name}: pixels differ from easel generate");
    }
}
