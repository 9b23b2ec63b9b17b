//! The HTTP service through its router (`oneshot`) and over a real socket,
//! with a real SQLite file in a temporary folder, on the tiny fixture
//! models (or the fake engine where only the service is under test).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use easel_server::config::{Config, EngineKind};
use easel_server::{app, AppState};
use serde_json::{json, Value};

mod common;
use common::{base_config, fixtures, TestServer};

#[path = "../../../tests/support/component_files.rs"]
mod component_files_support;
#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;

fn tiny_sd15() -> String {
    fixtures().join("models/tiny-sd15").display().to_string()
}

impl TestServer {
    async fn wait_status(&self, id: &str, want: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, job) = self.get(&format!("/v1/generations/{id}")).await;
            if job["status"] == want {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never {want}: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Bytes of a file URL (through the router, path only).
    async fn file(&self, url: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
        let path = &url[url.find("/v1/files/").unwrap()..];
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn count(&self, table: &str) -> i64 {
        self.state
            .store()
            .scalar_raw(&format!("SELECT COUNT(*) FROM {table}"))
            .await
            .unwrap()
    }

    /// Files in the assets store (their keys).
    async fn asset_files(&self) -> Vec<String> {
        self.state.assets().keys().await.unwrap()
    }
}

fn png_bytes(width: u32, height: u32, rgba: bool) -> Vec<u8> {
    let channels = if rgba { 4 } else { 3 };
    let pixels: Vec<u8> = (0..width * height * channels)
        .map(|i| {
            if rgba && i % 4 == 3 {
                if i < width * height * 2 {
                    0
                } else {
                    255
                }
            } else {
                (i % 251) as u8
            }
        })
        .collect();
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(if rgba {
            png::ColorType::Rgba
        } else {
            png::ColorType::Rgb
        });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&pixels).unwrap();
    }
    out
}

fn rgb8(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = easel_core::decode_image(bytes).unwrap();
    let (w, h) = (img.width, img.height);
    (w, h, img.into_rgb8())
}

/// A multipart/form-data body: `(name, filename, bytes)`.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----easeltestboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_multipart(
    server: &TestServer,
    uri: &str,
    parts: &[(&str, Option<&str>, &[u8])],
) -> (StatusCode, Value) {
    let (content_type, body) = multipart(parts);
    let request = Request::post(uri)
        .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap();
    let (status, _, bytes) = server.send(request).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

// ---- native API on the tiny model ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_lifecycle_records_assets_seeds_and_resolved_parameters() {
    let server = TestServer::new(|_| {}).await;
    let (status, job) = server
        .post(
            "/v1/generations",
            json!({
                "baseModel": tiny_sd15(),
                "steps": 2, "width": 64, "height": 64, "outputFormat": "png",
                "images": [{"prompt": "a red fox", "seed": 7, "batchSize": 2}]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(job["links"]["events"]
        .as_str()
        .unwrap()
        .ends_with("/events"));
    assert_eq!(job["cost"]["amount_usd"], 0.02);
    let job = server.wait_done(&id, 120).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let image = &job["images"][0];
    assert_eq!(image["seeds"], json!([7, 8]));
    let p = &image["parameters"];
    assert_eq!(p["steps"], 2);
    assert_eq!(p["guidanceScale"], 7.5);
    assert_eq!(p["scheduler"], "PNDMScheduler");
    assert_eq!(p["pipeline"], "StableDiffusionPipeline");
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(p["computePrecision"], "fp32");
    // The default device, `auto`: the CPU on a machine without a GPU.
    let auto = easel_diffusion::device::DeviceSpec::Auto.resolve().unwrap();
    assert_eq!(p["device"], easel_diffusion::device::device_name(&auto));
    let assets = job["assets"].as_array().unwrap();
    assert_eq!(assets.len(), 2);
    for (i, a) in assets.iter().enumerate() {
        assert_eq!(a["seed"], 7 + i as u64);
        assert_eq!(a["file_type"], "image/png");
        assert_eq!(a["generation_id"], id.as_str());
        let (status, headers, bytes) = server.file(a["file_url"].as_str().unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "image/png");
        assert_eq!(bytes.len() as u64, a["file_size"].as_u64().unwrap());
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            a["content_hash"].as_str().unwrap()
        );
        let meta = easel_core::read_png_metadata(&bytes).unwrap();
        assert_eq!(meta.seed, 7 + i as u64);
        assert_eq!(meta.prompt, "a red fox");
        // The asset record and its authenticated file route.
        let (status, record) = server
            .get(&format!("/v1/assets/{}", a["id"].as_str().unwrap()))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(record, *a);
        let (status, headers, same) = server
            .send(
                Request::get(format!("/v1/assets/{}/file", a["id"].as_str().unwrap()))
                    .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(
            (status, &headers[header::CONTENT_TYPE]),
            (StatusCode::OK, &"image/png".parse().unwrap())
        );
        assert_eq!(same, bytes);
    }
    let (status, list) = server.get(&format!("/v1/assets?generation={id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (_, usage) = server.get("/v1/usage").await;
    assert_eq!(usage["inferences_billed"], 1);
    assert_eq!(usage["images_generated"], 2);
    assert_eq!(usage["used_usd"], 0.02);
    // The model is loaded now.
    let (_, models) = server.get("/v1/models").await;
    let tiny = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "tiny-sd15")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(tiny["loaded"], true, "{models}");
    assert_eq!(tiny["pipeline_class"], "StableDiffusionPipeline");
}

/// Each definition of a request gives the pixels it gives alone (one engine
/// call per definition by default); with `batch_definitions` on, definitions
/// with equal settings share one tensor batch and may differ by a unit in a
/// few values (CPU matmul rounding), never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_equal_their_separate_runs() {
    for batch_definitions in [false, true] {
        let server = TestServer::new(|c| c.batch_definitions = batch_definitions).await;
        let common = json!({"baseModel": tiny_sd15(), "steps": 2, "width": 64, "height": 64,
                            "outputFormat": "png", "negativePrompt": "blurry"});
        let mut together = common.clone();
        together["images"] =
            json!([{"prompt": "a red fox", "seed": 3}, {"prompt": "a blue bird", "seed": 11}]);
        let (_, job) = server.post("/v1/generations", together).await;
        let job = server.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let mut batched = Vec::new();
        for a in job["assets"].as_array().unwrap() {
            batched.push(rgb8(&server.file(a["file_url"].as_str().unwrap()).await.2));
        }
        for (i, (prompt, seed)) in [("a red fox", 3), ("a blue bird", 11)].iter().enumerate() {
            let mut alone = common.clone();
            alone["images"] = json!([{"prompt": prompt, "seed": seed}]);
            let (_, job) = server.post("/v1/generations", alone).await;
            let job = server.wait_done(job["id"].as_str().unwrap(), 120).await;
            let bytes = server
                .file(job["assets"][0]["file_url"].as_str().unwrap())
                .await
                .2;
            let alone = rgb8(&bytes);
            assert_eq!((alone.0, alone.1), (batched[i].0, batched[i].1));
            if batch_definitions {
                let max = alone
                    .2
                    .iter()
                    .zip(&batched[i].2)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max();
                assert!(max <= Some(1), "image {i}: max difference {max:?}");
            } else {
                assert_eq!(
                    alone, batched[i],
                    "image {i} differs between the request and alone"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_documented_4xx_and_leave_nothing_behind() {
    let server = TestServer::new(|c| c.max_body_bytes = 64 * 1024).await;
    let model = tiny_sd15();
    let ok = |images: Value| json!({"baseModel": model, "steps": 2, "images": images});
    let outside = server.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let cases: Vec<(Value, StatusCode, &str, &str)> = vec![
        (
            ok(json!([{"prompt": "a", "width": "wide"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_type",
            "images[0].width",
        ),
        (
            ok(json!([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "width": 1001}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[2].width",
        ),
        (
            ok(json!([{"prompt": "a", "steps": 0}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[0].steps",
        ),
        (
            ok(json!([{"prompt": "a", "guidanceScale": 31}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[0].guidanceScale",
        ),
        (
            ok(json!([{"prompt": "a", "batchSize": 5}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[0].batchSize",
        ),
        (
            ok(json!([{"prompt": "a", "seed": -1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[0].seed",
        ),
        (
            ok(json!([{"prompt": "a", "negative_prompt": "x"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
            "images[0].negative_prompt",
        ),
        (
            ok(json!([{"steps": 3}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "images[0].prompt",
        ),
        (
            json!({"images": [{"prompt": "a"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "images[0].baseModel",
        ),
        (
            json!({"baseModel": model}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "images",
        ),
        (
            ok(json!([{"prompt": "a", "baseModel": "no-such-model"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_model",
            "images[0].baseModel",
        ),
        (
            ok(json!([{"prompt": "a", "baseModel": "someorg/not-cached"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_model",
            "images[0].baseModel",
        ),
        (
            ok(json!([{"prompt": "a", "baseModel": outside.display().to_string()}])),
            StatusCode::FORBIDDEN,
            "path_not_allowed",
            "images[0].baseModel",
        ),
        (
            ok(json!([{"prompt": "a", "baseModel": "/etc"}])),
            StatusCode::FORBIDDEN,
            "path_not_allowed",
            "images[0].baseModel",
        ),
        (
            ok(json!([{"prompt": "a", "trainingId": "4716c93e-03bc-49cf-921d-203971fe5866"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_training",
            "images[0].trainingId",
        ),
        (
            ok(json!([{"prompt": "a", "loras": [{"path": "/etc/passwd"}]}])),
            StatusCode::FORBIDDEN,
            "path_not_allowed",
            "images[0].loras[0].path",
        ),
        (
            ok(json!([{"prompt": "a", "image": "not base64 at all!"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
            "images[0].image",
        ),
        (
            ok(json!([{"prompt": "a", "image": "aGVsbG8gd29ybGQ="}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
            "images[0].image",
        ),
        (
            ok(json!([{"prompt": "a", "image": "data:image/png;base64,@@@"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
            "images[0].image",
        ),
        (
            ok(json!([{"prompt": "a", "scheduler": "nope"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "images[0].scheduler",
        ),
        (
            json!({"baseModel": model, "images": [{"prompt": "a"}], "webhook": "ftp://x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            "webhook",
        ),
        (
            json!({"baseModel": model, "images": [{"prompt": "a"}], "inferencePackId": "7e0b0c59-3f55-4d4b-8a4c-3c0a2d1e0f00"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_inference_pack",
            "inferencePackId",
        ),
        (
            ok(Value::Array(
                (0..65).map(|i| json!({"prompt": i.to_string()})).collect(),
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_images",
            "images",
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, err) = server.post("/v1/generations", body.clone()).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert_eq!(err["error"]["code"], code, "{body} -> {err}");
        assert_eq!(err["error"]["field"], field, "{body} -> {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    // Ranges are in the message.
    let (_, err) = server
        .post(
            "/v1/generations",
            ok(json!([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "width": 1001}])),
        )
        .await;
    assert_eq!(
        err["error"]["message"],
        "1001 is not a multiple of 8 (allowed: multiples of 8 from 8 to 2048)"
    );
    // Malformed JSON, oversized body, a valid image that is not a PNG/JPEG/WebP.
    let request = |body: Vec<u8>| {
        Request::post("/v1/generations")
            .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let (status, _, body) = server.send(request(b"{\"images\": [".to_vec())).await;
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let big = json!({"baseModel": model, "images": [{"prompt": "x".repeat(100_000)}]}).to_string();
    let (status, _, body) = server.send(request(big.into_bytes())).await;
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large")),
        "{err}"
    );
    // Nothing was stored, nothing was charged.
    for table in ["generations", "generation_items", "assets", "ledger"] {
        assert_eq!(server.count(table).await, 0, "{table}");
    }
    let files = server.asset_files().await;
    assert!(files.is_empty(), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_each_key_sees_only_its_own() {
    let server = TestServer::fake().await;
    let (status, _, err) = server.call_as(None, Method::GET, "/v1/usage", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(err["error"]["code"], "unauthorized");
    let (status, headers, _) = server
        .call_as(Some("esk_wrong"), Method::GET, "/v1/usage", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    let (status, _, _) = server.call_as(None, Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);

    let (_, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a"}]}),
        )
        .await;
    let id = job["id"].as_str().unwrap();
    let other = TestServer::add_key(&server.state, None).await;
    let (status, _, _) = server
        .call_as(
            Some(&other),
            Method::GET,
            &format!("/v1/generations/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = server
        .call_as(
            Some(&other),
            Method::GET,
            &format!("/v1/assets?generation={id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Revoked keys stop working.
    let row = server.state.store().keys().await.unwrap().pop().unwrap();
    assert!(server.state.store().revoke_key(&row.id).await.unwrap());
    let (status, _, _) = server
        .call_as(Some(&other), Method::GET, "/v1/usage", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_job() {
    let server = TestServer::fake().await;
    let body = json!({"baseModel": "fake/model", "images": [{"prompt": "a"}]});
    let post = |body: Value, key: &'static str| {
        Request::post("/v1/generations")
            .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s1, _, b1) = server.send(post(body.clone(), "k1")).await;
    let (s2, h2, b2) = server.send(post(body.clone(), "k1")).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    let (j1, j2): (Value, Value) = (
        serde_json::from_slice(&b1).unwrap(),
        serde_json::from_slice(&b2).unwrap(),
    );
    assert_eq!(j1["id"], j2["id"]);
    assert_eq!(h2["idempotent-replayed"], "true");
    let mut other = body.clone();
    other["images"][0]["prompt"] = json!("b");
    let (s3, _, b3) = server.send(post(other, "k1")).await;
    let e: Value = serde_json::from_slice(&b3).unwrap();
    assert_eq!(
        (s3, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_reused"))
    );
    assert_eq!(server.count("generations").await, 1);
    assert_eq!(server.count("ledger").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_with_retry_after() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 100;
        c.max_queue = 1;
    })
    .await;
    let body = json!({"baseModel": "fake/model", "steps": 20, "images": [{"prompt": "a"}]});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (_, headers, v) = server
            .call_as(
                Some(&server.key.clone()),
                Method::POST,
                "/v1/generations",
                Some(body.clone()),
            )
            .await;
        if v["error"]["code"] == "queue_full" {
            assert!(headers.contains_key(header::RETRY_AFTER));
            statuses.push(429);
        } else {
            statuses.push(202);
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 202).count() <= 2,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_limit_is_402_before_any_work_and_refunds_count() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 200;
    })
    .await;
    let limited = TestServer::add_key(&server.state, Some(50_000)).await; // 0.05 USD
    let post = |n: usize| {
        let images: Vec<Value> = (0..n).map(|i| json!({"prompt": i.to_string()})).collect();
        json!({"baseModel": "fake/model", "steps": 50, "images": images})
    };
    let (s, _, first) = server
        .call_as(
            Some(&limited),
            Method::POST,
            "/v1/generations",
            Some(post(2)),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, err) = server
        .call_as(
            Some(&limited),
            Method::POST,
            "/v1/generations",
            Some(post(2)),
        )
        .await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_credit");
    // Cancel the first: its definitions are refunded, credit is back.
    let id = first["id"].as_str().unwrap();
    let (s, _, canceled) = server
        .call_as(
            Some(&limited),
            Method::POST,
            &format!("/v1/generations/{id}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{canceled}");
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(canceled["error"]["code"], "canceled");
    assert_eq!(canceled["cost"]["total_usd"], 0.0);
    let (_, _, usage) = server
        .call_as(Some(&limited), Method::GET, "/v1/usage", None)
        .await;
    assert_eq!(usage["used_usd"], 0.0, "{usage}");
    assert_eq!(usage["credit_limit_usd"], 0.05);
    assert_eq!(usage["credit_remaining_usd"], 0.05);
    let (s, _, _) = server
        .call_as(
            Some(&limited),
            Method::POST,
            "/v1/generations",
            Some(post(2)),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(server.count("generations").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_at_the_next_step_and_a_queued_one_at_once() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 50;
    })
    .await;
    let body = json!({"baseModel": "fake/model", "steps": 60, "images": [{"prompt": "a"}]});
    let (_, running) = server.post("/v1/generations", body.clone()).await;
    let (_, queued) = server.post("/v1/generations", body).await;
    let (rid, qid) = (
        running["id"].as_str().unwrap(),
        queued["id"].as_str().unwrap(),
    );
    let job = server.wait_status(rid, "running", 10).await;
    assert_eq!(job["attempts"], 1);
    let (s, q) = server
        .post(&format!("/v1/generations/{qid}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, q["status"].as_str()),
        (StatusCode::OK, Some("canceled"))
    );
    let started = Instant::now();
    let (s, r) = server
        .post(&format!("/v1/generations/{rid}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("canceled")),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        started.elapsed()
    );
    assert!(r["assets"].as_array().unwrap().is_empty());
    let (s, e) = server
        .post(&format!("/v1/generations/{rid}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_cancelable"))
    );
}

// ---- trainings, packs ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainings_upload_list_get_delete_and_are_usable_as_training_id() {
    let server = TestServer::fake().await;
    let lora = std::fs::read(fixtures().join("loras/tiny-sd15-lora.safetensors")).unwrap();
    let (s, t) = post_multipart(
        &server,
        "/v1/trainings",
        &[
            ("file", Some("tiny.safetensors"), &lora),
            ("baseModel", None, b"fake/model"),
            ("name", None, b"my style"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(t["name"], "my style");
    assert_eq!(t["file_size"], lora.len());
    let (_, list) = server.get("/v1/trainings").await;
    assert_eq!(list["data"][0]["id"], id.as_str());
    let (s, got) = server.get(&format!("/v1/trainings/{id}")).await;
    assert_eq!((s, &got), (StatusCode::OK, &t));

    let (s, job) = server
        .post("/v1/generations", json!({"baseModel": "fake/model", "trainingId": id, "scale": 0.7,
                                         "images": [{"prompt": "a"}, {"prompt": "b", "scale": 1.5}]}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["images"][0]["parameters"]["loras"],
        json!([{"source": format!("training:{id}"), "scale": 0.7}])
    );
    assert_eq!(job["images"][1]["parameters"]["loras"][0]["scale"], 1.5);

    // Not a LoRA, not safetensors, no base model: 422 naming the field.
    let (s, e) = post_multipart(
        &server,
        "/v1/trainings",
        &[
            ("file", Some("x"), b"garbage"),
            ("baseModel", None, b"fake/model"),
        ],
    )
    .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("file"))
    );
    let (s, e) = post_multipart(&server, "/v1/trainings", &[("file", Some("x"), &lora)]).await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("baseModel"))
    );

    let (s, _) = server
        .call(Method::DELETE, &format!("/v1/trainings/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = server.get(&format!("/v1/trainings/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "trainingId": id, "images": [{"prompt": "a"}]}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_training"))
    );
}

/// LoRA files under a model root are accepted (their pixels are checked
/// against `easel generate --lora` in easel-cli's serve tests); a LoRA URL
/// that names no `.safetensors` file is refused up front, before anything
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_paths_are_accepted_and_bad_lora_urls_refused_up_front() {
    let server = TestServer::new(|_| {}).await;
    let (s, e) = server
        .post("/v1/generations", json!({"baseModel": tiny_sd15(), "images": [{"prompt": "a", "loras": [{"url": "https://example.com/x.bin"}]}]}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "invalid_value");
    assert_eq!(e["error"]["field"], "images[0].loras[0].url");
    assert_eq!(server.count("generations").await, 0);
    let lora = fixtures()
        .join("loras/tiny-sd15-lora.safetensors")
        .display()
        .to_string();
    let (s, job) = server
        .post("/v1/generations", json!({"baseModel": tiny_sd15(), "images": [{"prompt": "a", "loras": [{"path": lora, "scale": 0.5}]}]}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    assert_eq!(server.count("generations").await, 1);
}

/// Top-level defaults are checked on their own: a value out of range is a
/// mistake even when every image overrides it. A `strength` default without
/// a top-level `image` is fine when the images give theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_defaults_are_range_checked_even_when_overridden() {
    let server = TestServer::fake().await;
    for (body, field) in [
        (
            json!({"baseModel": "fake/model", "batchSize": 0, "images": [{"prompt": "a", "batchSize": 2}]}),
            "batchSize",
        ),
        (
            json!({"baseModel": "fake/model", "steps": 0, "images": [{"prompt": "a", "steps": 2}]}),
            "steps",
        ),
        (
            json!({"baseModel": "fake/model", "guidanceScale": -1, "images": [{"prompt": "a", "guidanceScale": 2}]}),
            "guidanceScale",
        ),
    ] {
        let (s, e) = server.post("/v1/generations", body).await;
        assert_eq!(
            (s, e["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{e}"
        );
    }
    assert_eq!(server.count("generations").await, 0);
    let png = base64::engine::general_purpose::STANDARD.encode(png_bytes(64, 64, false));
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "strength": 0.5,
                   "images": [{"prompt": "a", "image": format!("data:image/png;base64,{png}")}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_pack_definitions_run_before_the_request_images() {
    let server = TestServer::fake().await;
    let (s, pack) = server
        .post("/v1/inference-packs", json!({"name": "baseline", "steps": 3,
                                             "images": [{"prompt": "pack one"}, {"prompt": "pack two", "seed": 5}]}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pack}");
    assert_eq!(pack["image_count"], 2);
    let pid = pack["id"].as_str().unwrap();
    let (s, e) = server
        .post(
            "/v1/inference-packs",
            json!({"name": "bad", "images": [{"prompt": "x", "steps": 99}]}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("images[0].steps"))
    );
    // A top-level default out of range is refused even when every image
    // overrides it (schemathesis found `batchSize: 0` accepted).
    let (s, e) = server
        .post(
            "/v1/inference-packs",
            json!({"name": "bad default", "batchSize": 0, "images": [{"prompt": "x", "batchSize": 3}]}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("batchSize")),
        "{e}"
    );
    let (_, list) = server.get("/v1/inference-packs").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "inferencePackId": pid,
                                         "images": [{"prompt": "mine"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    let images = job["images"].as_array().unwrap();
    let fields: Vec<&str> = images
        .iter()
        .map(|i| i["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "inferencePack.images[0]",
            "inferencePack.images[1]",
            "images[0]"
        ]
    );
    assert_eq!(images[0]["parameters"]["prompt"], "pack one");
    assert_eq!(images[0]["parameters"]["steps"], 3);
    assert_eq!(images[1]["seeds"], json!([5]));
    assert_eq!(
        images[2]["parameters"]["steps"], 4,
        "the pack's defaults stay in the pack"
    );
    assert_eq!(job["cost"]["inferences"], 3);
    let (s, _) = server
        .call(Method::DELETE, &format!("/v1/inference-packs/{pid}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = server.get(&format!("/v1/inference-packs/{pid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_inputs_are_stored_as_input_assets() {
    let server = TestServer::fake().await;
    let png = png_bytes(64, 64, false);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "width": 64, "height": 64, "images": [
                {"prompt": "a", "image": format!("data:image/png;base64,{b64}"), "strength": 0.5},
                {"prompt": "b", "image": b64, "mask": b64},
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let input = job["images"][0]["requested"]["image"].as_str().unwrap();
    assert_eq!(
        job["images"][1]["requested"]["image"], input,
        "the same bytes are one input"
    );
    let (s, asset) = server.get(&format!("/v1/assets/{input}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(asset["kind"], "input");
    assert_eq!(job["images"][0]["parameters"]["strength"], 0.5);
    // An asset id works as an input too.
    let out = job["assets"][0]["id"].as_str().unwrap();
    let (s, j2) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "c", "image": out}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j2}");
}

// ---- OpenAI compatibility ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_generations_accept_the_official_client_json() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.default_model = Some("fake/model".into());
    })
    .await;
    // client.images.generate(model="gpt-image-1", prompt=..., n=2, size="64x64")
    let (s, r) = server
        .post("/v1/images/generations", json!({"model": "gpt-image-1", "prompt": "a lighthouse", "n": 2, "size": "64x64",
                                                "quality": "low", "moderation": "low", "background": "opaque",
                                                "output_format": "webp", "output_compression": 70}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    assert!(r["created"].as_i64().unwrap() > 1_600_000_000);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let image = easel_core::decode_image(&bytes).unwrap();
    assert_eq!(
        (image.width, image.height, image.format),
        (64, 64, easel_core::OutputFormat::Webp)
    );
    // dall-e style: url by default.
    let (s, r) = server
        .post("/v1/images/generations", json!({"prompt": "a lighthouse", "model": "dall-e-2", "size": "64x64", "response_format": "url"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let url = r["data"][0]["url"].as_str().unwrap();
    let (s, h, _) = server.file(url).await;
    assert_eq!(
        (s, &h[header::CONTENT_TYPE]),
        (StatusCode::OK, &"image/png".parse().unwrap())
    );
    // Errors in OpenAI's shape.
    let (s, e) = server
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "background": "transparent"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "background");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (s, e) = server
        .post("/v1/images/generations", json!({"prompt": "x", "n": 11}))
        .await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("n"))
    );
    let (s, e) = server
        .post(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "1001x64"}),
        )
        .await;
    // OpenAI answers 400 for every invalid request (issue 12, finding 6).
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("size")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_edits_accept_the_official_client_multipart() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.default_model = Some("fake/model".into());
    })
    .await;
    let image = png_bytes(64, 64, false);
    let mask = png_bytes(64, 64, true);
    // client.images.edit(image=open(...), mask=open(...), prompt=..., n=1, size=...)
    let (s, r) = post_multipart(
        &server,
        "/v1/images/edits",
        &[
            ("image", Some("image.png"), &image),
            ("mask", Some("mask.png"), &mask),
            ("prompt", None, b"add a hat"),
            ("model", None, b"gpt-image-1"),
            ("n", None, b"1"),
            ("size", None, b"64x64"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["data"][0]["b64_json"].as_str().unwrap().len() > 100);
    // Newer clients send `image[]`.
    let (s, r) = post_multipart(
        &server,
        "/v1/images/edits",
        &[
            ("image[]", Some("image.png"), &image),
            ("prompt", None, b"x"),
            ("response_format", None, b"url"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["data"][0]["url"].as_str().unwrap().contains("/v1/files/"));
    // The OpenAI mask (transparent = edit) was stored as easel's (white = repaint).
    let (_, list) = server.get("/v1/generations?limit=10").await;
    let first = list["data"].as_array().unwrap().last().unwrap();
    let mask_id = first["images"][0]["requested"]["mask"].as_str().unwrap();
    let (_, mask_asset) = server.get(&format!("/v1/assets/{mask_id}")).await;
    let (_, _, bytes) = server.file(mask_asset["file_url"].as_str().unwrap()).await;
    let (_, _, rgb) = rgb8(&bytes);
    assert_eq!(rgb[0], 255, "transparent pixels repaint");
    assert_eq!(*rgb.last().unwrap(), 0, "opaque pixels are kept");
    let (s, e) = post_multipart(&server, "/v1/images/edits", &[("prompt", None, b"x")]).await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("image"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_edits_on_a_text_to_image_model_fail_cleanly() {
    let server = TestServer::new(|c| c.default_model = Some(tiny_sd15())).await;
    let image = png_bytes(64, 64, false);
    let (s, r) = post_multipart(
        &server,
        "/v1/images/edits",
        &[
            ("image", Some("image.png"), &image),
            ("prompt", None, b"x"),
            ("size", None, b"64x64"),
        ],
    )
    .await;
    // Until image-to-image lands in the engine this is a clean 400; after, images.
    if s == StatusCode::OK {
        assert!(r["data"][0]["url"].is_string(), "{r}");
    } else {
        assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
        assert_eq!(r["error"]["code"], "unsupported", "{r}");
    }
}

// ---- operations ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_openapi_and_docs() {
    let server = TestServer::fake().await;
    let (_, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a"}]}),
        )
        .await;
    server.wait_done(job["id"].as_str().unwrap(), 30).await;
    let (s, _, v) = server.call_as(None, Method::GET, "/readyz", None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ready")));
    let (s, h, body) = server
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(body).unwrap();
    for line in [
        "easel_queue_depth 0",
        "easel_jobs_finished_total{status=\"succeeded\"} 1",
        "easel_images_generated_total 1",
        "easel_job_duration_seconds_count 1",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    let (s, _, doc) = server
        .call_as(None, Method::GET, "/openapi.json", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["paths"]["/v1/generations"]["post"].is_object());
    let (s, h, _) = server
        .send(Request::get("/docs").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let (s, _, e) = server.call_as(None, Method::GET, "/nope", None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

// ---- over a real socket ----------------------------------------------------

/// Serve `server` on a loopback port through the real listener
/// (`serve_on`: its timeouts and connection cap); returns the base URL.
async fn listen(server: &TestServer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    server.state.set_local_addr(addr);
    tokio::spawn(easel_server::serve_on(
        listener,
        server.state.clone(),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_returns_the_finished_job_over_a_socket() {
    let server = TestServer::new(|_| {}).await;
    let base = listen(&server).await;
    let key = server.key.clone();
    let model = tiny_sd15();
    let (status, applied, job) = tokio::task::spawn_blocking(move || {
        let r = ureq::post(&format!("{base}/v1/generations"))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Prefer", "wait=60")
            .send_json(
                json!({"baseModel": model, "steps": 2, "width": 64, "height": 64,
                              "images": [{"prompt": "a", "seed": 1}]}),
            )
            .unwrap();
        (
            r.status(),
            r.header("preference-applied").map(str::to_string),
            r.into_json::<Value>().unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{job}");
    assert_eq!(applied.as_deref(), Some("wait=60"));
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["assets"][0]["file_type"], "image/webp");
    assert!(job["assets"][0]["file_url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_progress_and_the_final_status_over_a_socket() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 30;
    })
    .await;
    let base = listen(&server).await;
    let (_, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "steps": 8, "images": [{"prompt": "a"}]}),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let key = server.key.clone();
    let events = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let r = ureq::get(&format!("{base}/v1/generations/{id}/events"))
            .set("Authorization", &format!("Bearer {key}"))
            .call()
            .unwrap();
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut events: Vec<(String, Value)> = Vec::new();
        let mut name = String::new();
        for line in std::io::BufReader::new(r.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                events.push((name.clone(), serde_json::from_str(d).unwrap()));
            }
        }
        events
    })
    .await
    .unwrap();
    assert_eq!(events.first().unwrap().0, "status");
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, v)| v)
        .collect();
    assert!(
        progress.iter().any(|p| p["step"] == 8 && p["steps"] == 8),
        "{events:?}"
    );
    assert!(progress.iter().all(|p| p["images_total"] == 1));
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "status");
    assert_eq!(
        data["status"], "succeeded",
        "the stream ends with the finished job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_never_block_the_worker() {
    use std::io::{BufRead, BufReader, Read, Write};
    // A receiver that answers 500 to the first delivery and 200 after.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(HeaderMap, String)>::new()));
    let r2 = received.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = HeaderMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(": ").unwrap();
                headers.insert(
                    axum::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let len: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = stream.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            r2.lock()
                .unwrap()
                .push((headers, String::from_utf8(body).unwrap()));
        }
    });
    // The receiver is on loopback, which the outbound fetcher refuses unless allowed.
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.allow_fetch_hosts = vec!["127.0.0.1".into()];
    })
    .await;
    let (_, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a"}],
                                         "webhook": hook, "webhookEvents": ["start", "completed"]}),
        )
        .await;
    let id = job["id"].as_str().unwrap();
    let done = server.wait_done(id, 30).await;
    assert_eq!(done["status"], "succeeded");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        let completed: Vec<_> = got
            .iter()
            .filter(|(h, _)| h["easel-event"] == "generation.completed")
            .collect();
        if got.len() >= 3 && !completed.is_empty() {
            for (headers, body) in &got {
                let sig = headers["easel-signature"].to_str().unwrap();
                assert!(
                    easel_server::webhooks::verify(b"test-secret", sig, body),
                    "bad signature"
                );
                let v: Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["data"]["id"], id);
            }
            let last: Value = serde_json::from_str(&completed.last().unwrap().1).unwrap();
            assert_eq!(last["data"]["status"], "succeeded");
            // The 500 was retried with the same delivery id.
            let ids: Vec<&str> = got
                .iter()
                .map(|(h, _)| h["easel-delivery"].to_str().unwrap())
                .collect();
            assert!(
                ids.len() > ids.iter().collect::<std::collections::HashSet<_>>().len(),
                "{ids:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "webhooks not received: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Recovery at startup: a job a dead process left `running` is queued again
/// (and finishes, its images kept), unless it was already started
/// `max_attempts` times: then it fails with `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_requeues_running_jobs_and_fails_them_after_max_attempts() {
    let server = TestServer::fake().await;
    let mut ids = Vec::new();
    for prompt in ["a", "b"] {
        let (s, job) = server
            .post(
                "/v1/generations",
                json!({"baseModel": "fake/model", "width": 64, "height": 64,
                                           "images": [{"prompt": prompt, "seed": 1}]}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(server.wait_done(&id, 30).await["status"], "succeeded");
        ids.push(id);
    }
    server.state.shutdown().await;
    // As a process killed mid-job leaves them: running, started 1 and 3 times.
    for (id, attempts) in ids.iter().zip([1, 3]) {
        let sql = format!(
            "UPDATE generations SET status = 'running', finished_at = NULL, attempts = {attempts},
                 lease_owner = 'dead-worker', lease_expires_at = 0 WHERE id = '{id}'"
        );
        server.state.store().execute_raw(&sql).await.unwrap();
    }
    let mut config = base_config(server.dir.path());
    config.engine = EngineKind::Fake;
    config.fake_step_ms = 1;
    config.max_attempts = 3;
    let state = AppState::open(config).await.unwrap();
    // The same data dir, so the same key.
    let again = TestServer {
        router: app(state.clone()),
        state,
        key: server.key.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let requeued = again.wait_done(&ids[0], 30).await;
    assert_eq!(requeued["status"], "succeeded", "{requeued}");
    assert_eq!(
        requeued["assets"].as_array().unwrap().len(),
        1,
        "its image is kept"
    );
    let (_, failed) = again.get(&format!("/v1/generations/{}", ids[1])).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "interrupted", "{failed}");
    assert_eq!(
        failed["assets"].as_array().unwrap().len(),
        1,
        "its image is kept"
    );
}

// ---- flows (issue 7) ------------------------------------------------------

#[path = "../../easel-flow/tests/support/mod.rs"]
mod flow_support;

impl TestServer {
    /// Stop this server and open a fake-engine one on the same data dir
    /// (same keys), as after a process restart.
    async fn restart_fake(self) -> TestServer {
        self.state.shutdown().await;
        let state = AppState::open(Config {
            engine: EngineKind::Fake,
            ..base_config(self.dir.path())
        })
        .await
        .unwrap();
        TestServer {
            router: app(state.clone()),
            state,
            key: self.key,
            dir: self.dir,
        }
    }

    /// The id of this server's API key.
    async fn key_id(&self) -> String {
        self.state
            .store()
            .key_by_hash(&easel_server::auth::hash_secret(&self.key))
            .await
            .unwrap()
            .unwrap()
            .id
    }
}

const SEED_GENRE_FLOW: &str = include_str!("../../easel-flow/tests/seed_flows/genre.json5");
const SEED_TRAINED_MODEL_FLOW: &str =
    include_str!("../../easel-flow/tests/seed_flows/trained_model.json5");

/// Both example flows of the ImageGenerator seed document, stored and run
/// over HTTP on the real engine with the tiny SD 1.5 fixture (the seed's
/// model ids are aliases of it): the genre flow with its prompts from a
/// chat-completions test server, one asset per prompt from ONE job; the
/// trained-model flow after a `RegisterTraining` step, with the per-image
/// `trainingId` / `baseModel` overrides reaching the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flows_run_over_http_on_the_fixture_model() {
    let chat = flow_support::FakeChatServer::start(4, |request| {
        let genre = flow_support::user_message(request);
        let prompts: Vec<String> = (0..3).map(|i| format!("{genre} scene {i}")).collect();
        (
            200,
            flow_support::chat_answer(&json!({ "prompts": prompts }).to_string()),
        )
    });
    let chat_url = chat.url.clone();
    let server = TestServer::new(|c| {
        for alias in [
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Realistic_Vision_V6.0_B1",
        ] {
            c.models.insert(alias.into(), tiny_sd15().into());
        }
        c.llm_url = Some(chat_url);
        c.llm_model = Some("test-model".into());
    })
    .await;

    // The genre flow: 3 prompts → 3 assets of one job.
    let genre = server
        .start_flow(
            json!({ "document": SEED_GENRE_FLOW }),
            json!({ "promptType": "film noir" }),
        )
        .await;
    let run = server.wait_run(&genre, 300).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let gen = &run["steps"][1];
    let job_id = gen["jobId"].as_str().unwrap();
    let assets = gen["result"].as_array().unwrap();
    assert_eq!(assets.len(), 3, "one asset per prompt");
    let job = server.wait_done(job_id, 5).await;
    assert_eq!(job["source"], "flow");
    assert_eq!(job["images"].as_array().unwrap().len(), 3, "one job");
    for (i, asset) in assets.iter().enumerate() {
        assert_eq!(asset["job_id"], job_id);
        assert_eq!(
            job["images"][i]["parameters"]["prompt"],
            format!("film noir scene {i}")
        );
        assert_eq!(job["images"][i]["parameters"]["steps"], 30);
        let (s, _, bytes) = server.file(asset["file_url"].as_str().unwrap()).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(bytes.len() as u64, asset["file_size"].as_u64().unwrap());
    }

    // The trained-model flow: myTrainingStep registers the fixture LoRA;
    // the second image overrides with another training, uploaded first.
    let lora = std::fs::read(fixtures().join("loras/tiny-sd15-lora.safetensors")).unwrap();
    let (s, other) = post_multipart(
        &server,
        "/v1/trainings",
        &[
            (
                "file",
                Some("kohya.safetensors"),
                &std::fs::read(fixtures().join("loras/tiny-sd15-lora-kohya.safetensors")).unwrap(),
            ),
            ("baseModel", None, b"Realistic_Vision_V6.0_B1"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{other}");
    drop(lora);
    let other_id = other["id"].as_str().unwrap();
    // The seed's sizes and steps, scaled to the tiny model; its
    // override id replaced by a training this server has.
    let document = SEED_TRAINED_MODEL_FLOW
        .replace("4716c93e-03bc-49cf-921d-203971fe5866", other_id)
        .replace("width: 768", "width: 64")
        .replace("height: 768", "height: 64")
        .replace("steps: 20", "steps: 4")
        .replace(
            "name: 'my subject' }",
            "name: 'my subject', baseModel: 'stable-diffusion-v1-5/stable-diffusion-v1-5' }",
        );
    let lora_path = fixtures().join("loras/tiny-sd15-lora.safetensors");
    let trained = server
        .start_flow(
            json!({ "document": document }),
            json!({ "loraFile": lora_path.display().to_string() }),
        )
        .await;
    let run = server.wait_run(&trained, 300).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let training = &run["steps"][0]["result"];
    assert_eq!(training["object"], "training");
    assert_eq!(training["name"], "my subject");
    let (s, _) = server
        .get(&format!(
            "/v1/trainings/{}",
            training["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "the step registered a training");
    let gen = &run["steps"][1];
    assert_eq!(gen["result"].as_array().unwrap().len(), 2);
    let job = server.wait_done(gen["jobId"].as_str().unwrap(), 5).await;
    let lora_of = |i: usize| job["images"][i]["parameters"]["loras"][0]["source"].clone();
    assert_eq!(
        lora_of(0),
        format!("training:{}", training["id"].as_str().unwrap())
    );
    assert_eq!(lora_of(1), format!("training:{other_id}"));
    assert_eq!(job["images"][1]["parameters"]["guidanceScale"], 8.0);
}

/// Flows are stored, listed, read and deleted; invalid documents are 422
/// with every problem named by step and parameter; a failing second step
/// fails the run (terminate) or is recorded and skipped past (continue);
/// inputs that do not fit the references are refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_crud_validation_and_on_failure_over_http() {
    let server = TestServer::fake().await;
    let (s, e) = server
        .post(
            "/v1/flows",
            json!({ "document": "{ steps: [ { id: 'a', type: 'Nope' }, { id: 'b', type: 'Template', parameters: { template: '$.results.c' } } ] }" }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "invalid_flow");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("steps[0] (a).type: unknown step type `Nope`"),
        "{message}"
    );
    assert!(message.contains("steps[1] (b)"), "{message}");

    let flow = |on_failure: &str| {
        json!({
            "name": "two steps",
            "steps": [
                { "id": "gen", "type": "ImageGenerator", "onFailure": on_failure,
                  "parameters": { "baseModel": tiny_sd15(), "images": [ { "prompt": "a", "width": "$.input.x" } ] } },
                { "id": "after", "type": "Template", "parameters": { "template": "done {{ $.input.x }}" } }
            ]
        })
    };
    let (s, created) = server.post("/v1/flows", flow("terminate")).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["object"], "flow");
    assert_eq!(created["name"], "two steps");
    assert_eq!(
        created["steps"][1],
        json!({ "id": "after", "type": "Template" })
    );
    let id = created["id"].as_str().unwrap();
    let (_, list) = server.get("/v1/flows").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (s, got) = server.get(&format!("/v1/flows/{id}")).await;
    assert_eq!((s, &got["id"]), (StatusCode::OK, &created["id"]));

    // The input lacks `x`: refused before anything runs.
    let (s, e) = server
        .post(&format!("/v1/flows/{id}/runs"), json!({ "input": {} }))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("steps[1] (after)"),
        "{e}"
    );

    // terminate: the run fails naming the step and field; `after` is skipped.
    let (s, run) = server
        .post(
            &format!("/v1/flows/{id}/runs"),
            json!({ "input": { "x": 1 } }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{run}");
    let run = server.wait_run(run["id"].as_str().unwrap(), 30).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("steps[0] (gen): parameters.images[0].width"),
        "{message}"
    );
    assert_eq!(run["steps"][1]["status"], "skipped");
    let (_, runs) = server.get(&format!("/v1/flows/{id}/runs")).await;
    assert_eq!(runs["data"][0]["id"], run["id"]);

    // continue: the error is the step's result and the run goes on.
    let run_id = server.start_flow(flow("continue"), json!({ "x": 2 })).await;
    let run = server.wait_run(&run_id, 30).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["status"], "failed");
    assert!(run["steps"][0]["result"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("width"));
    assert_eq!(run["steps"][1]["result"], "done 2");

    let (s, _) = server
        .call(Method::DELETE, &format!("/v1/flows/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = server.get(&format!("/v1/flows/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Its runs stay readable.
    let (s, _) = server
        .get(&format!("/v1/flow-runs/{}", run["id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Another key sees none of it.
    let other = TestServer::add_key(&server.state, None).await;
    let (s, _, _) = server
        .call_as(
            Some(&other),
            Method::GET,
            &format!("/v1/flow-runs/{run_id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Canceling a run cancels its running image job; the SSE stream reports
/// the steps and ends with the final record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_runs_cancel_and_stream_events() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 200;
    })
    .await;
    let flow = json!({ "steps": [
        { "id": "gen", "type": "ImageGenerator",
          "parameters": { "baseModel": tiny_sd15(), "steps": 50, "images": [ { "prompt": "slow" } ] } },
        { "id": "after", "type": "Constant", "parameters": { "value": 1 } }
    ] });
    let run_id = server.start_flow(flow, json!({})).await;
    // Wait for the job to run, then cancel the run.
    let deadline = Instant::now() + Duration::from_secs(20);
    let job_id = loop {
        let (_, run) = server.get(&format!("/v1/flow-runs/{run_id}")).await;
        let (_, jobs) = server.get("/v1/generations").await;
        if let Some(j) = jobs["data"].as_array().and_then(|d| d.first()) {
            if j["status"] == "running" && run["steps"][0]["status"] == "running" {
                break j["id"].as_str().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (s, run) = server
        .post(&format!("/v1/flow-runs/{run_id}/cancel"), json!({}))
        .await;
    assert!(
        s == StatusCode::OK || s == StatusCode::ACCEPTED,
        "{s} {run}"
    );
    let run = server.wait_run(&run_id, 30).await;
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(run["steps"][0]["status"], "canceled");
    assert_eq!(run["steps"][1]["status"], "canceled");
    let job = server.wait_done(&job_id, 10).await;
    assert_eq!(job["status"], "canceled");
    let (s, e) = server
        .post(&format!("/v1/flow-runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_cancelable"))
    );

    // Events of a fresh run, from the start to the final record.
    let fast = json!({ "steps": [
        { "id": "gen", "type": "ImageGenerator",
          "parameters": { "baseModel": tiny_sd15(), "steps": 5, "images": [ { "prompt": "a" } ] } },
        { "id": "t", "type": "Template", "parameters": { "template": "$.results.gen[0].file_url" } }
    ] });
    let run_id = server.start_flow(fast, json!({})).await;
    let request = Request::get(format!("/v1/flow-runs/{run_id}/events"))
        .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
        .body(Body::empty())
        .unwrap();
    let (s, headers, body) = server.send(request).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(body).unwrap();
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert_eq!(events.first().unwrap().0, "status", "{text}");
    let (last, record) = events.last().unwrap();
    assert_eq!(*last, "status", "{text}");
    assert_eq!(record["status"], "succeeded", "{text}");
    assert_eq!(
        record["steps"][1]["result"],
        record["steps"][0]["result"][0]["file_url"]
    );
    if events.len() > 2 {
        assert!(events.iter().any(|(n, _)| *n == "step_finished"), "{text}");
    }
}

/// A run the process left `running` resumes when the server starts again,
/// keeping its finished steps' stored results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_flow_run_resumes_on_restart() {
    let server = TestServer::fake().await;
    let text = "{ steps: [ { id: 'list', type: 'List', parameters: { value: ['fresh'] } }, { id: 't', type: 'Template', parameters: { template: 'got {{ $.results.list[0] }}' } } ] }";
    let (s, flow) = server.post("/v1/flows", json!({ "document": text })).await;
    assert_eq!(s, StatusCode::CREATED, "{flow}");
    // A record as a dead process would have left it: `list` finished (with
    // a result that differs from what it would compute now), `t` running.
    let runner = easel_flow::FlowRunner::new(easel_flow::StepRegistry::with_basic_steps());
    let document = runner.load(text).unwrap();
    let mut run = runner
        .prepare(&document, json!({}), &easel_flow::RunOptions::default())
        .unwrap();
    run.status = easel_flow::RunStatus::Running;
    run.steps[0].status = easel_flow::StepStatus::Succeeded;
    run.steps[0].result = Some(json!(["stored"]));
    run.steps[1].status = easel_flow::StepStatus::Running;
    let key_id = server.key_id().await;
    let row = easel_server::store::FlowRunRow {
        id: run.id.clone(),
        flow_id: flow["id"].as_str().unwrap().to_string(),
        key_id,
        document: text.to_string(),
        record_json: serde_json::to_string(&run).unwrap(),
        cancel_requested: false,
        created_at: 1,
    };
    server
        .state
        .store()
        .insert_flow_run(&row, "running")
        .await
        .unwrap();
    let restarted = server.restart_fake().await;
    let resumed = restarted.wait_run(&run.id, 30).await;
    assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
    assert_eq!(resumed["steps"][1]["result"], "got stored");
}

/// A run cut off while its image step's job was in the queue re-attaches to
/// that job when it resumes (the step's idempotency key), instead of
/// submitting the work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_image_step_waits_for_the_job_it_submitted() {
    let server = TestServer::fake().await;
    let params = json!({ "baseModel": tiny_sd15(), "steps": 2, "images": [ { "prompt": "a" } ] });
    let document =
        json!({ "steps": [ { "id": "gen", "type": "ImageGenerator", "parameters": params } ] });
    let (s, flow) = server.post("/v1/flows", document.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{flow}");
    let key_id = server.key_id().await;
    let principal = easel_server::auth::Principal {
        key_id: key_id.clone(),
        credit_limit_micros: None,
    };
    let runner = easel_flow::FlowRunner::new(easel_server::flows::step_registry(
        &server.state,
        &principal,
    ));
    let text = document.to_string();
    let parsed = runner.load(&text).unwrap();
    let mut run = runner
        .prepare(&parsed, json!({}), &easel_flow::RunOptions::default())
        .unwrap();
    // The job the step had submitted before the process stopped.
    let request = Request::post("/v1/generations")
        .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", format!("flow-run:{}:step:0", run.id))
        .body(Body::from(params.to_string()))
        .unwrap();
    let (s, _, body) = server.send(request).await;
    assert_eq!(
        s,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let job: Value = serde_json::from_slice(&body).unwrap();
    run.status = easel_flow::RunStatus::Running;
    run.steps[0].status = easel_flow::StepStatus::Running;
    let row = easel_server::store::FlowRunRow {
        id: run.id.clone(),
        flow_id: flow["id"].as_str().unwrap().to_string(),
        key_id,
        document: text,
        record_json: serde_json::to_string(&run).unwrap(),
        cancel_requested: false,
        created_at: 1,
    };
    server
        .state
        .store()
        .insert_flow_run(&row, "running")
        .await
        .unwrap();
    let restarted = server.restart_fake().await;
    let resumed = restarted.wait_run(&run.id, 30).await;
    assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
    assert_eq!(resumed["steps"][0]["jobId"], job["id"]);
    assert_eq!(restarted.count("generations").await, 1, "no second job");
}

// ---- issue 12, findings 1 and 2: the outbound fetcher (SSRF) ---------------

/// A loopback listener that must never be connected to: `assert_untouched`
/// checks that no connection is waiting in its backlog.
struct Tripwire(std::net::TcpListener);

impl Tripwire {
    fn bind(ip: &str) -> Option<Tripwire> {
        let listener = std::net::TcpListener::bind((ip, 0)).ok()?;
        listener.set_nonblocking(true).unwrap();
        Some(Tripwire(listener))
    }
    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }
    fn assert_untouched(&self) {
        match self.0.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the tripwire got a connection: {other:?}"),
        }
    }
}

/// A loopback HTTP server answering every connection with `response`;
/// returns its port and a connection counter.
fn canned_server(response: Vec<u8>) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 8192];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(&response);
        }
    });
    (port, hits)
}

fn http_ok(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

async fn image_url_error(server: &TestServer, url: &str) -> Value {
    let (s, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a", "image": url}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {e}");
    assert_eq!(e["error"]["code"], "invalid_image", "{url}: {e}");
    assert_eq!(e["error"]["field"], "images[0].image", "{url}: {e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_ssrf_image_url_to_loopback_gets_no_connection() {
    let server = TestServer::fake().await;
    let v4 = Tripwire::bind("127.0.0.1").unwrap();
    let mut urls = vec![
        format!("http://127.0.0.1:{}/x.png", v4.port()),
        format!("http://localhost:{}/x.png", v4.port()),
        // 2130706433 = 0x7f000001 = 127.0.0.1 (the URL standard's numeric host).
        format!("http://2130706433:{}/x.png", v4.port()),
        format!("http://0x7f.1:{}/x.png", v4.port()),
        format!("http://[::ffff:127.0.0.1]:{}/x.png", v4.port()),
    ];
    let v6 = Tripwire::bind("::1");
    if let Some(v6) = &v6 {
        urls.push(format!("http://[::1]:{}/x.png", v6.port()));
    }
    for url in &urls {
        let e = image_url_error(&server, url).await;
        assert_eq!(
            e["error"]["message"],
            easel_server::fetch::FETCH_FAILED,
            "{url}"
        );
    }
    // The mask goes through the same fetcher.
    let (s, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a",
                "image": format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png_bytes(64, 64, false))),
                "mask": urls[0]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["field"], "images[0].mask");
    v4.assert_untouched();
    if let Some(v6) = &v6 {
        v6.assert_untouched();
    }
    assert_eq!(server.count("generations").await, 0);
}

/// Private, link-local (the cloud metadata address), CGNAT and mapped forms
/// are refused with the same text; they are refused by the address check
/// before any connection (proved without dialling them in
/// `fetch::tests::finding_1_ssrf_metadata_address_is_refused_before_any_connect`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_ssrf_internal_addresses_are_refused_with_one_message() {
    let server = TestServer::fake().await;
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",
        "http://[fd00::1]/x.png",
        "http://0.0.0.0:1/x.png",
    ] {
        let e = image_url_error(&server, url).await;
        assert_eq!(
            e["error"]["message"],
            easel_server::fetch::FETCH_FAILED,
            "{url}"
        );
    }
}

/// No port-scan oracle: an open port that is not an image server, an open
/// port answering 404, a closed port and a refused address all answer the
/// same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_ssrf_open_and_closed_ports_give_the_same_error() {
    let allowed = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.allow_fetch_hosts = vec!["127.0.0.1".into()];
    })
    .await;
    let (garbage, _) = canned_server(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec());
    let (not_found, _) = canned_server(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut messages = Vec::new();
    for port in [garbage, not_found, closed_port] {
        let e = image_url_error(&allowed, &format!("http://127.0.0.1:{port}/x.png")).await;
        messages.push(e["error"]["message"].clone());
    }
    let refused = TestServer::fake().await;
    let e = image_url_error(&refused, &format!("http://127.0.0.1:{garbage}/x.png")).await;
    messages.push(e["error"]["message"].clone());
    let e = image_url_error(&refused, "http://no-such-host.invalid/x.png").await;
    messages.push(e["error"]["message"].clone());
    for m in &messages {
        assert_eq!(m, easel_server::fetch::FETCH_FAILED, "{messages:?}");
    }
}

/// An allow-listed image server works, and a redirect from it to a
/// forbidden address is refused without connecting there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_ssrf_redirect_from_an_allowed_server_to_a_forbidden_address_is_refused() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.allow_fetch_hosts = vec!["127.0.0.1".into()];
    })
    .await;
    let (image, hits) = canned_server(http_ok(&png_bytes(64, 64, false)));
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a", "image": format!("http://127.0.0.1:{image}/x.png")}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // 127.0.0.2 is loopback too, but only 127.0.0.1 is allowed.
    let Some(trap) = Tripwire::bind("127.0.0.2") else {
        return; // no 127.0.0.2 on this host
    };
    for target in [
        format!("http://127.0.0.2:{}/x.png", trap.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let (port, hits) = canned_server(
            format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        );
        let e = image_url_error(&server, &format!("http://127.0.0.1:{port}/x.png")).await;
        assert_eq!(e["error"]["message"], easel_server::fetch::FETCH_FAILED);
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{target}"
        );
    }
    trap.assert_untouched();
    assert_eq!(server.count("generations").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_2_ssrf_webhook_to_an_internal_address_is_refused_at_submission() {
    let server = TestServer::fake().await;
    let trap = Tripwire::bind("127.0.0.1").unwrap();
    for hook in [
        "http://169.254.169.254/h".to_string(),
        format!("http://127.0.0.1:{}/h", trap.port()),
        format!("http://localhost:{}/h", trap.port()),
        format!("http://2130706433:{}/h", trap.port()),
        "http://[::1]/h".to_string(),
        "http://10.1.2.3/h".to_string(),
    ] {
        let (s, e) = server
            .post(
                "/v1/generations",
                json!({"baseModel": "fake/model", "images": [{"prompt": "a"}], "webhook": hook}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{hook}: {e}");
        assert_eq!(e["error"]["field"], "webhook", "{hook}: {e}");
    }
    assert_eq!(server.count("generations").await, 0);
    trap.assert_untouched();
}

// ---- LoRA by URL (through the outbound fetcher) ----------------------------

/// A LoRA URL on an allow-listed loopback server is downloaded once into
/// the content-addressed cache and applied on the tiny SD 1.5 model; a
/// second request for the same URL does not download again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_url_is_downloaded_once_and_applied() {
    let server = TestServer::new(|c| {
        c.offline = false;
        c.allow_fetch_hosts = vec!["127.0.0.1".into()];
    })
    .await;
    let lora = std::fs::read(fixtures().join("loras/tiny-sd15-lora.safetensors")).unwrap();
    let (port, hits) = canned_server(http_ok(&lora));
    let url = format!("http://127.0.0.1:{port}/tiny.safetensors");
    for round in 0..2 {
        let (s, job) = server
            .post(
                "/v1/generations",
                json!({"baseModel": tiny_sd15(), "steps": 2, "width": 64, "height": 64,
                       "images": [{"prompt": "a", "seed": 1, "loras": [{"url": url, "scale": 0.5}]}]}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{job}");
        let done = server.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "round {round}: {done}");
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "round {round}"
        );
    }
    let cache = server.dir.path().join("data/models/lora-cache");
    let blob = cache
        .join("blobs")
        .join(format!("{}.safetensors", blake3::hash(&lora).to_hex()));
    assert_eq!(std::fs::read(&blob).unwrap(), lora);
    let by_url = easel_server::lora_cache::url_path(&server.dir.path().join("data"), &url);
    assert_eq!(std::fs::read(by_url).unwrap(), lora);
}

/// Finding 4 (for LoRA URLs): a cached file that is not a LoRA is refused
/// with 422 naming the field before 202, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_lora_url_whose_cached_file_is_not_a_lora_is_refused_before_202() {
    let server = TestServer::fake().await;
    let url = "https://loras.example/not-a-lora.safetensors";
    let path = easel_server::lora_cache::url_path(&server.dir.path().join("data"), url);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A model's weights: safetensors, but no LoRA keys.
    std::fs::copy(
        fixtures().join("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors"),
        &path,
    )
    .unwrap();
    let (s, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a"}, {"prompt": "b", "loras": [{"url": url}]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["field"], "images[1].loras[0].url", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a LoRA"),
        "{e}"
    );
    assert_eq!(server.count("generations").await, 0);
    // An offline server (the test default) does not download an uncached URL.
    let (s, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "b", "loras": [{"url": "org/name"}]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["field"], "images[0].loras[0].url", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("offline"),
        "{e}"
    );
    assert_eq!(server.count("generations").await, 0);
}

/// A LoRA download that fails (here a refused address, never dialled) fails
/// only its own image definition, with a clear error, and that definition
/// is not charged; the other definition runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_url_download_failure_fails_only_that_image_and_refunds_it() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.offline = false;
    })
    .await;
    let trap = Tripwire::bind("127.0.0.1").unwrap();
    let url = format!("http://127.0.0.1:{}/x.safetensors", trap.port());
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "images": [{"prompt": "a"}, {"prompt": "b", "loras": [{"url": url}]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let done = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "lora_fetch_failed", "{done}");
    assert_eq!(done["error"]["field"], "images[1].loras[0].url", "{done}");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains(easel_server::fetch::FETCH_FAILED));
    assert_eq!(done["cost"]["inferences"], 2, "{done}");
    assert_eq!(done["cost"]["total_usd"], 0.02, "{done}");
    assert_eq!(done["cost"]["refunded_usd"], 0.02, "{done}");
    assert_eq!(done["images"][0]["status"], "succeeded", "{done}");
    assert_eq!(done["images"][1]["status"], "failed", "{done}");
    assert_eq!(
        done["images"][1]["error"]["code"], "lora_fetch_failed",
        "{done}"
    );
    // The refused address is not cached: nothing entered the LoRA cache.
    let cached = easel_server::lora_cache::url_path(&server.dir.path().join("data"), &url);
    assert!(!cached.exists());
    trap.assert_untouched();
}

// ---- finding 3: slow clients, connection cap, rate limits -----------------

/// Raise this process's soft open file limit to `want` (or the hard limit);
/// returns the soft limit now in force.
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur != libc::RLIM_INFINITY && (lim.rlim_cur as u64) < want {
            let target = if lim.rlim_max == libc::RLIM_INFINITY {
                want
            } else {
                want.min(lim.rlim_max as u64)
            };
            let raised = libc::rlimit {
                rlim_cur: target as libc::rlim_t,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur as u64
}

/// One request on a new connection (`Connection: close`); the status line
/// and the whole answer, or an error.
async fn raw_request(addr: &str, request: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Read until EOF (or a reset); the bytes read and when it ended.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(got)
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_3_slow_clients_do_not_stop_healthz() {
    use tokio::io::AsyncWriteExt;
    // Each slow client costs two descriptors here (client and server side).
    let wanted_n: usize = 300;
    let limit = raise_fd_limit(4096);
    let n = wanted_n.min((limit.saturating_sub(200) / 4) as usize);
    assert!(
        n >= 100,
        "the open file limit ({limit}) is too low for this test"
    );
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.header_read_timeout_seconds = 1;
        c.body_read_timeout_seconds = 1;
        c.idle_timeout_seconds = 1;
    })
    .await;
    let base = listen(&server).await;
    let addr = base.trim_start_matches("http://").to_string();

    let started = Instant::now();
    let mut idle = Vec::new();
    let mut half_open = Vec::new();
    for _ in 0..n {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // A request head without its final CRLF.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half_open.push(s);
    }
    // A POST whose body never completes.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(
            format!(
                "POST /v1/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"baseModel\"",
                server.key
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let opened = started.elapsed();

    // With all of them open, /healthz answers at once.
    let t = Instant::now();
    let answer = raw_request(&addr, HEALTHZ).await.unwrap();
    let took = t.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_millis(100),
        "/healthz took {took:?} beside {n} idle and {n} half-open connections"
    );

    // The body read timeout answers the slow POST (400 naming the limit)
    // and closes it.
    let got = read_until_closed(&mut slow_body, Duration::from_secs(5))
        .await
        .expect("the slow-body connection is closed within 5 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("body_read_timeout_seconds"), "{text}");

    // The header read timeout closes the idle and half-open ones, without
    // an answer.
    for (kind, streams) in [("idle", &mut idle), ("half-open", &mut half_open)] {
        for s in streams.iter_mut() {
            let got = read_until_closed(s, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("an {kind} connection is still open after 5 s"));
            assert!(got.is_empty(), "{kind}: {}", String::from_utf8_lossy(&got));
        }
    }
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_secs(1),
        "closed after {closed:?}, before the 1 s timeout"
    );
    eprintln!(
        "finding 3: {n} idle + {n} half-open + 1 slow body opened in {opened:?}; \
         /healthz in {took:?}; all closed after {closed:?}"
    );
    let answer = raw_request(&addr, HEALTHZ).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_3_connections_beyond_max_connections_are_closed() {
    let server = TestServer::new(|c| {
        c.header_read_timeout_seconds = 2;
        c.max_connections = 8;
    })
    .await;
    let base = listen(&server).await;
    let addr = base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The ninth waits briefly for a slot, then is closed unanswered.
    let t = Instant::now();
    let refused = raw_request(&addr, HEALTHZ).await.unwrap_or_default();
    assert!(refused.is_empty(), "answered over the cap: {refused}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Once the held ones time out, the slots are free again.
    for s in held.iter_mut() {
        assert!(read_until_closed(s, Duration::from_secs(5)).await.is_some());
    }
    let answer = raw_request(&addr, HEALTHZ).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_3_timeouts_do_not_cut_sse_streams_or_prefer_wait() {
    // Steps 1.5 s apart: longer than every timeout, without a byte between.
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1500;
        c.header_read_timeout_seconds = 1;
        c.body_read_timeout_seconds = 1;
        c.idle_timeout_seconds = 1;
    })
    .await;
    let base = listen(&server).await;
    let (_, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "steps": 2, "images": [{"prompt": "a"}]}),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let (key, base2) = (server.key.clone(), base.clone());
    let sse = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let t = Instant::now();
        let r = ureq::get(&format!("{base2}/v1/generations/{id}/events"))
            .set("Authorization", &format!("Bearer {key}"))
            .call()
            .unwrap();
        let mut last = Value::Null;
        for line in std::io::BufReader::new(r.into_reader()).lines() {
            if let Some(d) = line.unwrap().strip_prefix("data: ") {
                last = serde_json::from_str(d).unwrap();
            }
        }
        (t.elapsed(), last)
    });
    let key = server.key.clone();
    let wait = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let r = ureq::post(&format!("{base}/v1/generations"))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Prefer", "wait=30")
            .send_json(json!({"baseModel": "fake/model", "steps": 2, "images": [{"prompt": "b"}]}))
            .unwrap();
        (t.elapsed(), r.status(), r.into_json::<Value>().unwrap())
    });
    let (took, last) = sse.await.unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    assert!(took > Duration::from_secs(2), "the stream lasted {took:?}");
    let (took, status, record) = wait.await.unwrap();
    assert_eq!(
        (status, &record["status"]),
        (200, &json!("succeeded")),
        "{record}"
    );
    assert!(took > Duration::from_secs(2), "the wait lasted {took:?}");
}

#[tokio::test]
async fn finding_3_submissions_over_the_rate_limit_get_429_with_retry_after() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.rate_limit_per_minute = 6; // one token per 10 s
        c.rate_limit_burst = 3;
    })
    .await;
    let body = json!({"baseModel": "fake/model", "steps": 1, "images": [{"prompt": "a"}]});
    for _ in 0..3 {
        let (s, v) = server.post("/v1/generations", body.clone()).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let key = server.key.clone();
    let (s, headers, v) = server
        .call_as(
            Some(&key),
            Method::POST,
            "/v1/generations",
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rate_limit_per_minute"));
    let retry: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(server.count("generations").await, 3, "nothing stored");
    let (_, _, text) = server
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("easel_requests_rejected_total{reason=\"rate_limited\"} 1"),
        "{text}"
    );
    // The OpenAI route answers in OpenAI's shape, through its error path.
    let (s, headers, v) = server
        .call_as(
            Some(&key),
            Method::POST,
            "/v1/images/generations",
            Some(json!({"prompt": "a", "model": "fake/model"})),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // OpenAI's own 429 spelling: type `requests`, code `rate_limit_exceeded`.
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert_eq!(v["error"]["type"], "requests", "{v}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    // Another key has its own bucket; reads are not limited.
    let other = TestServer::add_key(&server.state, None).await;
    let (s, _, v) = server
        .call_as(Some(&other), Method::POST, "/v1/generations", Some(body))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, _, _) = server
        .call_as(Some(&key), Method::GET, "/v1/generations", None)
        .await;
    assert_eq!(s, StatusCode::OK);
}
// ---- issue 12, finding 5 and 6 (error shapes, OpenAPI) ---------------------

/// The native error shape: `{"error": {code, message, field}}`, nothing else.
fn assert_native_error(status: StatusCode, headers: &HeaderMap, body: &[u8], want: StatusCode) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{headers:?}"
    );
    let v: Value = serde_json::from_slice(body).expect("a JSON error body");
    let e = v["error"].as_object().expect("an error object");
    assert!(e["code"].is_string() && e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e.contains_key("field"), "{v}");
    assert_eq!(e.len(), 3, "{v}");
}

/// OpenAI's error shape: `{"error": {message, type, param, code}}`.
fn assert_openai_error(v: &Value, want_type: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], want_type, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test]
async fn finding_6_bad_query_is_a_json_400_naming_the_parameter() {
    let server = TestServer::fake().await;
    let key = server.key.clone();
    for uri in [
        "/v1/generations?limit=abc",
        "/v1/assets?limit=1.5",
        "/v1/flows/x/runs?limit=abc",
    ] {
        let request = Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (s, h, b) = server.send(request).await;
        assert_native_error(s, &h, &b, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["field"], "limit", "{uri}: {v}");
    }
    // Out of range is named, not clamped.
    let (s, v) = server.get("/v1/generations?limit=0").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("limit"))
    );
    let (s, v) = server.get("/v1/assets?limit=501").await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("limit"))
    );
    let (s, _) = server.get("/v1/generations?limit=100").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn finding_6_method_not_allowed_is_a_json_405_with_allow() {
    let server = TestServer::fake().await;
    let (s, h, b) = server
        .send(
            Request::delete("/v1/generations")
                .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_native_error(s, &h, &b, StatusCode::METHOD_NOT_ALLOWED);
    let allow = h[header::ALLOW].to_str().unwrap().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed");
    // Also without a key, and on a public route.
    let (s, h, b) = server
        .send(Request::post("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_native_error(s, &h, &b, StatusCode::METHOD_NOT_ALLOWED);
    assert!(h.contains_key(header::ALLOW));
}

#[tokio::test]
async fn finding_6_unknown_routes_and_large_bodies_are_json_errors() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.max_body_bytes = 1024;
    })
    .await;
    let (s, h, b) = server
        .send(Request::get("/v2/nothing").body(Body::empty()).unwrap())
        .await;
    assert_native_error(s, &h, &b, StatusCode::NOT_FOUND);
    let big = json!({"prompt": "a".repeat(4096), "baseModel": "fake/model", "images": [{}]});
    let (s, h, b) = server
        .send(
            Request::post("/v1/generations")
                .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(big.to_string()))
                .unwrap(),
        )
        .await;
    assert_native_error(s, &h, &b, StatusCode::PAYLOAD_TOO_LARGE);
    // The same body on the OpenAI route: 413 in OpenAI's shape.
    let big = json!({"prompt": "a".repeat(4096)});
    let (s, _, v) = server
        .call_as(
            Some(&server.key.clone()),
            Method::POST,
            "/v1/images/generations",
            Some(big),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_openai_error(&v, "invalid_request_error");
}

#[tokio::test]
async fn finding_6_openai_401_has_openai_type_and_param() {
    let server = TestServer::fake().await;
    for key in [None, Some("esk_wrong")] {
        for uri in ["/v1/images/generations", "/v1/images/edits"] {
            let (s, h, v) = server
                .call_as(key, Method::POST, uri, Some(json!({"prompt": "a"})))
                .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}: {v}");
            assert_openai_error(&v, "invalid_request_error");
            assert_eq!(v["error"]["code"], "invalid_api_key");
            assert!(v["error"]["param"].is_null());
            assert!(h.contains_key(header::WWW_AUTHENTICATE));
        }
    }
    // Native routes keep the native shape for the same 401.
    let (s, h, b) = server
        .send(Request::get("/v1/generations").body(Body::empty()).unwrap())
        .await;
    assert_native_error(s, &h, &b, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn finding_6_openai_size_errors_are_always_400() {
    let server = TestServer::fake().await;
    for size in ["big", "1001x64", "64x4096", "0x0"] {
        let (s, v) = server
            .post(
                "/v1/images/generations",
                json!({"model": "fake/model", "prompt": "a", "size": size}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{size}: {v}");
        assert_openai_error(&v, "invalid_request_error");
        assert_eq!(v["error"]["param"], "size", "{size}: {v}");
    }
}

/// Every `$ref` in `v` and whether `allOf` members are closed objects
/// combined with others (which no value satisfies).
fn walk_schema(v: &Value, problems: &mut Vec<String>, at: &str) {
    match v {
        Value::Object(map) => {
            if let Some(all) = map.get("allOf").and_then(Value::as_array) {
                let closed = all.iter().any(|m| m["additionalProperties"] == false);
                if closed && all.len() > 1 {
                    problems.push(format!("{at}: allOf with a closed member"));
                }
                if all.iter().any(|m| m.get("$ref").is_some()) && all.len() > 1 {
                    problems.push(format!("{at}: allOf of a $ref and more"));
                }
            }
            for (k, child) in map {
                walk_schema(child, problems, &format!("{at}/{k}"));
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk_schema(child, problems, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn finding_5_openapi_is_usable_by_generators() {
    let server = TestServer::fake().await;
    let (s, _, doc) = server
        .call_as(None, Method::GET, "/openapi.json", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    let mut problems = Vec::new();
    walk_schema(&doc, &mut problems, "");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let mut seen = std::collections::HashSet::new();
            for p in &params {
                let (name, place) = (p["name"].as_str().unwrap(), p["in"].as_str().unwrap());
                if !seen.insert((name.to_string(), place.to_string())) {
                    problems.push(format!("{at}: parameter {name} twice"));
                }
                if place == "path" && !path.contains(&format!("{{{name}}}")) {
                    problems.push(format!("{at}: path parameter {name} not in the path"));
                }
            }
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(['{', '}']);
                if !params
                    .iter()
                    .any(|p| p["name"] == name && p["in"] == "path")
                {
                    problems.push(format!("{at}: {{{name}}} is not declared"));
                }
            }
            let responses = op["responses"].as_object().unwrap();
            let mut want = vec![];
            if op.get("security").is_some() {
                want.push("401");
            }
            if path.contains('{') {
                want.push("404");
            }
            if op.get("requestBody").is_some() {
                want.extend(["400", "413"]);
            }
            if method == "post" && (path == "/v1/generations" || path.starts_with("/v1/images/")) {
                want.extend(["402", "409", "429"]);
            }
            for code in want {
                if !responses.contains_key(code) {
                    problems.push(format!("{at}: {code} undocumented"));
                }
            }
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let replicate = easel_server::replicate_error::is_replicate_path(path);
                    let content_type = if replicate {
                        "application/problem+json"
                    } else {
                        "application/json"
                    };
                    let schema = r["content"][content_type]["schema"]["$ref"]
                        .as_str()
                        .unwrap_or_default();
                    let family = if path.starts_with("/v1/images/") {
                        "OpenAiErrorBody"
                    } else if path.starts_with("/sdapi/") {
                        "A1111ErrorBody"
                    } else if replicate {
                        "ReplicateErrorBody"
                    } else if path.starts_with("/api/rest/v1/") {
                        "LeonardoErrorBody"
                    } else if path == "/api/v1/images/generation" {
                        "ServerlessErrorBody"
                    } else {
                        "ErrorBody"
                    };
                    if schema != format!("#/components/schemas/{family}") {
                        problems.push(format!("{at}: {code} has no {family} schema"));
                    }
                }
            }
        }
    }
    // Query parameters are declared as such.
    let list = doc["paths"]["/v1/generations"]["get"]["parameters"]
        .as_array()
        .unwrap();
    assert!(list
        .iter()
        .any(|p| p["name"] == "limit" && p["in"] == "query"));
    // Ranges and enums of the image fields.
    let image = &doc["components"]["schemas"]["ImageDefinition"]["properties"];
    assert_eq!(
        (
            image["steps"]["minimum"].as_u64(),
            image["steps"]["maximum"].as_u64()
        ),
        (Some(1), Some(60))
    );
    assert_eq!(image["width"]["maximum"].as_u64(), Some(2048));
    assert!(image["outputFormat"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("webp")));
    assert!(image["aspectRatio"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("16:9")));
    assert!(image["precision"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("bf16")));
    let gen = &doc["components"]["schemas"]["GenerationRequestDoc"];
    assert!(gen["properties"]["prompt"].is_object() && gen["properties"]["images"].is_object());
    assert!(gen["properties"]["webhookEvents"]["items"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("completed")));
    assert!(problems.is_empty(), "{problems:#?}");
}
// --- issue 12: metadata that other tools read --------------------------------

/// The `parameters` text of a JPEG/WebP file from its EXIF `UserComment`
/// (`UNICODE` + UTF-16 in the TIFF byte order), read with `kamadak-exif`.
fn exif_user_comment(bytes: &[u8]) -> String {
    let exif = exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(bytes))
        .expect("the file has EXIF");
    let field = exif
        .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
        .expect("no UserComment");
    let exif::Value::Undefined(raw, _) = &field.value else {
        panic!("UserComment is {:?}", field.value);
    };
    assert_eq!(&raw[..8], b"UNICODE\0");
    let units: Vec<u16> = raw[8..]
        .chunks_exact(2)
        .map(|b| {
            if exif.little_endian() {
                u16::from_le_bytes([b[0], b[1]])
            } else {
                u16::from_be_bytes([b[0], b[1]])
            }
        })
        .collect();
    String::from_utf16(&units).unwrap()
}

/// Issue 12: the worker writes JPEG and WebP outputs with the AUTOMATIC1111
/// `parameters` text in EXIF, sampler in the web UI's spelling, while the
/// job record keeps the diffusers class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_and_webp_outputs_carry_a1111_parameters_in_exif() {
    let server = TestServer::new(|_| {}).await;
    for format in ["jpeg", "webp"] {
        let (status, job) = server
            .post(
                "/v1/generations",
                json!({
                    "baseModel": tiny_sd15(),
                    "steps": 2, "width": 64, "height": 64, "outputFormat": format,
                    "scheduler": "euler_a",
                    "images": [{"prompt": "a red fox, «snow»", "seed": 11}]
                }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = server.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(
            job["images"][0]["parameters"]["scheduler"],
            "EulerAncestralDiscreteScheduler"
        );
        let url = job["assets"][0]["file_url"].as_str().unwrap();
        let (status, _, bytes) = server.file(url).await;
        assert_eq!(status, StatusCode::OK);
        let text = exif_user_comment(&bytes);
        let (prompt, line) = text.split_once('\n').unwrap();
        assert_eq!(prompt, "a red fox, «snow»", "{format}: {text}");
        assert!(
            line.starts_with(
                "Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 11, Size: 64x64, Model: "
            ),
            "{format}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_shutdown_stops_accepting_and_finishes_in_flight_requests() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1000;
        c.idle_timeout_seconds = 1;
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(easel_server::serve_on(
        listener,
        server.state.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let key = server.key.clone();
    let in_flight = tokio::task::spawn_blocking(move || {
        let r = ureq::post(&format!("http://{addr}/v1/generations"))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Prefer", "wait=30")
            .send_json(json!({"baseModel": "fake/model", "steps": 1, "images": [{"prompt": "a"}]}))
            .unwrap();
        (r.status(), r.into_json::<Value>().unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    let (status, record) = in_flight.await.unwrap();
    assert_eq!(
        (status, &record["status"]),
        (200, &json!("succeeded")),
        "{record}"
    );
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve_on returns once its connections are closed")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

// ---- issue 12: everything checked before 202 (findings 4 and 6) -----------

fn fixture_model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn png_data_uri(width: u32, height: u32) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(png_bytes(width, height, false));
    format!("data:image/png;base64,{b64}")
}

impl TestServer {
    /// Nothing was written: no job, no item, no input asset (row or file),
    /// no ledger row.
    async fn assert_nothing_written(&self, context: &str) {
        for table in ["generations", "generation_items", "assets", "ledger"] {
            assert_eq!(self.count(table).await, 0, "{context}: rows in {table}");
        }
        let files = self.asset_files().await;
        assert!(files.is_empty(), "{context}: files {files:?}");
    }

    /// POST `body` to /v1/generations; expect `status` naming `field`, and
    /// nothing written.
    async fn assert_refused(&self, body: Value, status: StatusCode, field: &str) -> Value {
        let (s, e) = self.post("/v1/generations", body.clone()).await;
        assert_eq!(s, status, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
        self.assert_nothing_written(&format!("{field} ({e})")).await;
        e
    }
}

/// Finding 4: requests the worker used to fail after a 202 (leaving a job,
/// input assets and a charge + refund) are refused up front, naming the
/// field, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_checked_after_accepting_is_refused_before_202() {
    let server = TestServer::new(|_| {}).await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let sd = fixture_model("tiny-sd15");
    let dev = fixture_model("tiny-flux-dev");
    let fill = fixture_model("tiny-flux-fill");
    let image = png_data_uri(64, 64);
    let one = |model: &str, image: Value| json!({"baseModel": model, "images": [image]});

    // strength 0, and a strength whose floor(steps x strength) is 0 on SD.
    let e = server
        .assert_refused(
            one(&sd, json!({"prompt": "a", "image": image, "strength": 0})),
            unprocessable,
            "images[0].strength",
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no denoising step"),
        "{e}"
    );
    server
        .assert_refused(
            one(
                &sd,
                json!({"prompt": "a", "image": image, "steps": 4, "strength": 0.2}),
            ),
            unprocessable,
            "images[0].strength",
        )
        .await;
    // On FLUX only 0 leaves no step; 0 is refused there too.
    server
        .assert_refused(
            one(&dev, json!({"prompt": "a", "image": image, "strength": 0})),
            unprocessable,
            "images[0].strength",
        )
        .await;
    // strength without image: refused as `easel generate` does.
    let e = server
        .assert_refused(
            one(&sd, json!({"prompt": "a", "strength": 0.5})),
            unprocessable,
            "images[0].strength",
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("give `image` too"),
        "{e}"
    );

    // Masks: another aspect ratio, a non-Fill FLUX model, a Fill model
    // without one, and a mask without an image.
    let e = server
        .assert_refused(
            one(
                &sd,
                json!({"prompt": "a", "image": image, "mask": png_data_uri(32, 48)}),
            ),
            unprocessable,
            "images[0].mask",
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("aspect ratios differ"),
        "{e}"
    );
    let e = server
        .assert_refused(
            one(
                &dev,
                json!({"prompt": "a", "image": image, "mask": png_data_uri(32, 32)}),
            ),
            unprocessable,
            "images[0].mask",
        )
        .await;
    assert!(
        e["error"]["message"].as_str().unwrap().contains("Fill"),
        "{e}"
    );
    server
        .assert_refused(
            one(&fill, json!({"prompt": "a", "image": image})),
            unprocessable,
            "images[0].mask",
        )
        .await;
    server
        .assert_refused(
            one(&sd, json!({"prompt": "a", "mask": png_data_uri(64, 64)})),
            unprocessable,
            "images[0].mask",
        )
        .await;

    // Schedulers of the other family, both ways.
    let e = server
        .assert_refused(
            one(&sd, json!({"prompt": "a", "scheduler": "flow_match_euler"})),
            unprocessable,
            "images[0].scheduler",
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("choose one of"),
        "{e}"
    );
    server
        .assert_refused(
            one(&dev, json!({"prompt": "a", "scheduler": "euler"})),
            unprocessable,
            "images[0].scheduler",
        )
        .await;

    // A safetensors file under a model root that is not a LoRA.
    let weights = fixtures()
        .join("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors")
        .display()
        .to_string();
    let e = server
        .assert_refused(
            one(&sd, json!({"prompt": "a", "loras": [{"path": weights}]})),
            unprocessable,
            "images[0].loras[0].path",
        )
        .await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a LoRA weight"),
        "{e}"
    );
    // ... and refused at upload as a training, so no trainingId names one.
    let bytes = std::fs::read(&weights).unwrap();
    let (s, e) = post_multipart(
        &server,
        "/v1/trainings",
        &[
            ("file", Some("unet.safetensors"), &bytes),
            ("baseModel", None, sd.as_bytes()),
        ],
    )
    .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (unprocessable, Some("file")),
        "{e}"
    );
    assert_eq!(server.count("trainings").await, 0);

    // The checks do not refuse what runs: a real LoRA and an image with a
    // strength that leaves steps are accepted.
    let lora = fixtures()
        .join("loras/tiny-sd15-lora.safetensors")
        .display()
        .to_string();
    let (s, job) = server
        .post(
            "/v1/generations",
            one(
                &sd,
                json!({"prompt": "a", "steps": 4, "image": image, "strength": 0.25,
                            "scheduler": "euler", "loras": [{"path": lora}]}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
}

/// Finding 4: `/v1/images/edits` with a 32x48 mask on a 64x64 image was a
/// 400 after the job, its input assets and its ledger rows were written;
/// now it is refused before anything is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_openai_edits_with_a_mismatched_mask_write_nothing() {
    let server = TestServer::new(|c| c.default_model = Some(tiny_sd15())).await;
    let image = png_bytes(64, 64, false);
    let mask = png_bytes(32, 48, true);
    let (s, e) = post_multipart(
        &server,
        "/v1/images/edits",
        &[
            ("image", Some("image.png"), &image),
            ("mask", Some("mask.png"), &mask),
            ("prompt", None, b"x"),
            ("size", None, b"64x64"),
        ],
    )
    .await;
    assert!(s.is_client_error(), "{s}: {e}");
    assert_eq!(e["error"]["param"], "mask", "{e}");
    server.assert_nothing_written("edits").await;
}

/// Finding 6: integral floats (`64.0`) are integers; `64.5` is refused
/// naming the field and saying it must be an integer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_integral_floats_are_accepted_in_integer_fields() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 1;
        c.default_model = Some("fake/model".into());
    })
    .await;
    let (s, job) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "fake/model", "steps": 4.0, "images": [
                {"prompt": "a", "width": 64.0, "height": 64, "seed": 42.0, "batchSize": 1.0}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let p = &job["images"][0]["parameters"];
    assert_eq!(
        (&p["width"], &p["seed"], &p["steps"]),
        (&json!(64), &json!(42), &json!(4)),
        "{job}"
    );

    for (field, value) in [
        ("width", json!(64.5)),
        ("steps", json!(4.5)),
        ("seed", json!(1e30)),
    ] {
        let mut image = json!({"prompt": "a"});
        image[field] = value.clone();
        let (s, e) = server
            .post(
                "/v1/generations",
                json!({"baseModel": "fake/model", "images": [image]}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}={value}: {e}");
        assert_eq!(e["error"]["field"], format!("images[0].{field}"), "{e}");
        if field != "seed" {
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("must be an integer"),
                "{e}"
            );
        }
    }
    assert_eq!(server.count("generations").await, 1);

    let (s, r) = server
        .post(
            "/v1/images/generations",
            json!({"prompt": "a", "n": 1.0, "size": "64x64"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 1, "{r}");
    let (s, e) = server
        .post("/v1/images/generations", json!({"prompt": "a", "n": 1.5}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "n", "{e}");
}

/// Finding 6: a missing model says what is missing and how to give one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_a_missing_model_says_what_is_missing() {
    let server = TestServer::fake().await;
    let (s, e) = server
        .post("/v1/images/generations", json!({"prompt": "a"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "model", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(!message.contains("no model has"), "{message}");
    assert!(message.contains("no `model` was given"), "{message}");
    assert!(message.contains("default_model"), "{message}");
    let (_, e) = server
        .post(
            "/v1/images/generations",
            json!({"prompt": "a", "model": "dall-e-3"}),
        )
        .await;
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("model `dall-e-3`"), "{message}");
}

/// Finding 6: flows whose static parameters break the generation rules
/// (`width: 1001`, a `../` path, a scheduler of the other family, a file
/// that is not a LoRA) are refused at creation (there is no update route)
/// with 422
/// `invalid_flow` naming the step and field; references are left to run
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_flows_with_bad_static_parameters_are_refused_at_creation() {
    let server = TestServer::new(|_| {}).await;
    let flow = |parameters: Value| json!({"name": "f", "steps": [{"id": "gen", "type": "ImageGenerator", "parameters": parameters}]});
    let sd = tiny_sd15();
    let weights = fixtures()
        .join("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors")
        .display()
        .to_string();
    let cases = [
        (
            json!({"baseModel": sd, "images": [{"prompt": "a", "width": 1001}]}),
            "steps[0] (gen).parameters.images[0].width",
        ),
        (
            json!({"baseModel": sd, "width": 1001, "images": "$.input.images"}),
            "steps[0] (gen).parameters.images[0].width",
        ),
        (
            json!({"baseModel": "../../../etc", "images": [{"prompt": "a"}]}),
            "steps[0] (gen).parameters.images[0].baseModel",
        ),
        (
            json!({"baseModel": sd, "images": [{"prompt": "a", "loras": [{"path": "../../../../etc/passwd"}]}]}),
            "steps[0] (gen).parameters.images[0].loras[0].path",
        ),
        (
            json!({"baseModel": sd, "images": [{"prompt": "a", "loras": [{"path": weights}]}]}),
            "steps[0] (gen).parameters.images[0].loras[0].path",
        ),
        (
            json!({"baseModel": sd, "scheduler": "flow_match_euler", "images": [{"prompt": "$.input.p"}]}),
            "steps[0] (gen).parameters.images[0].scheduler",
        ),
        (
            json!({"baseModel": sd, "images": [{"prompt": "a", "strength": 0.5}]}),
            "steps[0] (gen).parameters.images[0].strength",
        ),
        (
            json!({"baseModel": fixture_model("tiny-flux-dev"), "images": [{"prompt": "a", "image": "$.input.i", "mask": "$.input.m"}]}),
            "steps[0] (gen).parameters.images[0].mask",
        ),
    ];
    for (parameters, want) in cases {
        let (s, e) = server.post("/v1/flows", flow(parameters.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{parameters}: {e}");
        assert_eq!(e["error"]["code"], "invalid_flow", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{parameters}: {message}");
        assert_eq!(server.count("flows").await, 0, "{parameters}");
    }

    // References and @Map expressions are only checked when the run starts.
    let (s, created) = server
        .post(
            "/v1/flows",
            flow(json!({"baseModel": "$.input.model", "steps": 4.0, "images": [
                {"prompt": "{{ $.input.p }}", "width": "$.input.w", "image": "$.input.i", "strength": 0.5}
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(server.count("flows").await, 1);
}

/// Issue 13: `tiling: true` is accepted (the engine's job carries it to the
/// pipelines) and runs like any other definition; a non-boolean is still a
/// named 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiling_is_accepted_and_runs() {
    let server = TestServer::fake().await;
    let (status, job) = server
        .post(
            "/v1/generations",
            json!({
                "baseModel": tiny_sd15(), "steps": 2, "width": 64, "height": 64,
                "images": [{"prompt": "a tile", "seed": 3, "tiling": true}]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["assets"].as_array().unwrap().len(), 1, "{job}");
    let (status, err) = server
        .post(
            "/v1/generations",
            json!({"baseModel": tiny_sd15(), "images": [{"prompt": "a", "tiling": "yes"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(
        err["error"]["field"]
            .as_str()
            .is_some_and(|f| f.contains("tiling")),
        "{err}"
    );
}

// ---- issue 13: the jobs service ------------------------------------------------

/// A job canceled while queued (by the handler) and one canceled while
/// running (finished by the worker) are announced through the same jobs
/// service: each is counted once as canceled, and only the one that ran
/// has a duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_jobs_are_counted_once_whoever_finished_them() {
    let server = TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 50;
    })
    .await;
    let body = json!({"baseModel": "fake/model", "steps": 60, "images": [{"prompt": "a"}]});
    let (_, running) = server.post("/v1/generations", body.clone()).await;
    let (_, queued) = server.post("/v1/generations", body).await;
    let (rid, qid) = (
        running["id"].as_str().unwrap(),
        queued["id"].as_str().unwrap(),
    );
    server.wait_status(rid, "running", 10).await;
    for id in [qid, rid] {
        let (s, job) = server
            .post(&format!("/v1/generations/{id}/cancel"), json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{job}");
        assert_eq!(job["status"], "canceled", "{job}");
    }
    let (s, _, body) = server
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "easel_jobs_finished_total{status=\"canceled\"} 2\n",
        "easel_jobs_finished_total{status=\"succeeded\"} 0\n",
        "easel_jobs_finished_total{status=\"failed\"} 0\n",
        "easel_job_duration_seconds_count 1\n",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

// ---- issue 13: the worker builds its jobs with the engine's one builder ------

/// The worker resolves each definition with the engine's builder: the
/// resolved parameters record `tiling` and the image-to-image strength
/// (the family's default), and an init image without a size sets it,
/// rounded down to the size multiple by the engine's one rule (the same
/// refusal, naming the field, when it rounds down to nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_records_what_the_engines_builder_resolved() {
    let server = TestServer::fake().await;
    let (status, job) = server
        .post(
            "/v1/generations",
            json!({
                "baseModel": tiny_sd15(), "steps": 2,
                "images": [
                    {"prompt": "a tile", "seed": 3, "tiling": true},
                    {"prompt": "a cat", "seed": 4, "image": png_data_uri(70, 41)}
                ]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let job = server.wait_done(job["id"].as_str().unwrap(), 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let tiled = &job["images"][0]["parameters"];
    assert_eq!(tiled["tiling"], true, "{job}");
    assert_eq!(tiled["strength"], Value::Null, "{job}");
    assert_eq!(
        (tiled["width"].as_u64(), tiled["height"].as_u64()),
        (Some(64), Some(64))
    );
    let img2img = &job["images"][1]["parameters"];
    assert_eq!(img2img["tiling"], false, "{job}");
    assert_eq!(img2img["strength"], 0.8, "{job}");
    assert_eq!(
        (img2img["width"].as_u64(), img2img["height"].as_u64()),
        (Some(64), Some(40)),
        "{job}"
    );

    let (status, e) = server
        .post(
            "/v1/generations",
            json!({"baseModel": tiny_sd15(), "images": [{"prompt": "a", "image": png_data_uri(64, 7)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["field"], "images[0].height", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("allowed: 8 to 2048"), "{message}");
}

// ---- component files in the registry (issue 14) -----------------------------

/// A registry entry `{ path, vae }` with an LDM-layout VAE file (a path
/// relative to a model root) generates the folder's own image, pixel for
/// pixel, and is its own model; an entry whose VAE is of another
/// architecture (FLUX's 16 latent channels into SD 1.5's 4) is refused
/// before 202, naming the flag, the tensor and both shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_entries_with_a_vae_file_generate_the_folders_image() {
    use easel_server::config::ModelTarget;
    let entry = |vae: &str| ModelTarget::Entry {
        path: tiny_sd15(),
        config: None,
        prediction_type: None,
        unet: None,
        transformer: None,
        vae: Some(vae.to_string()),
        text_encoder: None,
        text_encoder_2: None,
        quantize: None,
        offload_t5: false,
    };
    let flux_vae = fixtures()
        .join("models/tiny-flux-dev/vae/diffusion_pytorch_model.safetensors")
        .display()
        .to_string();
    let server = TestServer::new(|c| {
        c.models
            .insert("sd15-ldm-vae".into(), entry("vae-ldm.safetensors"));
        c.models.insert("sd15-flux-vae".into(), entry(&flux_vae));
    })
    .await;
    // The LDM VAE of the single-file fixture, under DATA_DIR/models.
    let roots = server.dir.path().join("data/models");
    std::fs::create_dir_all(&roots).unwrap();
    component_files_support::component_file(
        &single_file_support::single_file_fixture("tiny-sd15"),
        "first_stage_model.",
        true,
        &roots.join("vae-ldm.safetensors"),
    );
    let mut images = Vec::new();
    for model in ["sd15-ldm-vae".to_string(), tiny_sd15()] {
        let (status, job) = server
            .post(
                "/v1/generations",
                json!({"baseModel": model, "steps": 2, "width": 32, "height": 32,
                       "outputFormat": "png", "images": [{"prompt": "a red fox", "seed": 5}]}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = server.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let url = job["assets"][0]["file_url"].as_str().unwrap();
        images.push(rgb8(&server.file(url).await.2));
    }
    assert_eq!(images[0], images[1]);
    // Two cache entries: the folder with the file, and the folder alone.
    let (_, models) = server.get("/v1/models").await;
    let loaded = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .count();
    assert!(loaded >= 2, "{models}");

    let (status, err) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "sd15-flux-vae", "steps": 2, "width": 32, "height": 32,
                   "images": [{"prompt": "a red fox"}]}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("--vae"), "{message}");
    assert!(
        message.contains("[64, 16, 3, 3]") && message.contains("[64, 4, 3, 3]"),
        "{message}"
    );
}
