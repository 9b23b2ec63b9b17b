//! Replicate-style predictions (issue 19): the flux-dev-lora input mapped
//! field by field, ranges refused in Replicate's problem shape, pixels equal
//! to the native request, `Prefer: wait`, cancel, list, auth.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::{fixtures, test_png_data_uri, TestServer};
use easel_server::config::EngineKind;
use easel_server::routes::replicate::input::FIELDS;
use serde_json::{json, Value};

fn fixture_model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn flux_lora() -> String {
    fixtures()
        .join("loras/tiny-flux-lora.safetensors")
        .display()
        .to_string()
}

async fn fake(step_ms: u64) -> TestServer {
    TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = step_ms;
        c.default_model = Some("fake/model".into());
    })
    .await
}

impl TestServer {
    /// POST with extra headers; the status, content type and JSON body.
    async fn post_with(
        &self,
        uri: &str,
        body: Value,
        headers: &[(&str, String)],
    ) -> (StatusCode, String, Value) {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let (s, h, bytes) = self
            .send(builder.body(Body::from(body.to_string())).unwrap())
            .await;
        let ct = h
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (s, ct, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn predict(&self, body: Value) -> (StatusCode, String, Value) {
        let auth = ("authorization", format!("Bearer {}", self.key));
        self.post_with("/v1/predictions", body, &[auth]).await
    }

    async fn predict_wait(&self, uri: &str, body: Value) -> Value {
        let auth = ("authorization", format!("Bearer {}", self.key));
        let (s, _, p) = self
            .post_with(uri, body, &[auth, ("prefer", "wait".into())])
            .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        assert_eq!(p["status"], "succeeded", "{p}");
        p
    }

    async fn poll_prediction(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (s, p) = self.get(&format!("/v1/predictions/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{p}");
            if ["succeeded", "failed", "canceled"].contains(&p["status"].as_str().unwrap()) {
                return p;
            }
            assert!(Instant::now() < deadline, "prediction {id} not done: {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn native_done(&self, body: Value) -> Value {
        let (s, j) = self.post("/v1/generations", body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{j}");
        let id = j["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (_, job) = self.get(&format!("/v1/generations/{id}")).await;
            if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap()) {
                assert_eq!(job["status"], "succeeded", "{job}");
                return job;
            }
            assert!(Instant::now() < deadline, "{job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn file_bytes(&self, url: &str) -> Vec<u8> {
        let path = &url[url.find("/v1/files/").unwrap()..];
        let (s, _, bytes) = self
            .send(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::OK);
        bytes
    }
}

/// Every documented input field: one input that sets it and what the
/// native image definition (`images[i].requested`) must then hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_field_maps_to_the_native_request() {
    let server = fake(1).await;
    let image = test_png_data_uri(64, 64);
    let lora = flux_lora();
    // (field, input, native field, expected native value)
    let table: Vec<(&str, Value, &str, Value)> = vec![
        ("prompt", json!({}), "prompt", json!("a lighthouse")),
        ("image", json!({"image": image}), "strength", json!(0.8)),
        (
            "mask",
            json!({"image": image, "mask": image}),
            "strength",
            json!(0.8),
        ),
        (
            "aspect_ratio",
            json!({"aspect_ratio": "16:9"}),
            "aspectRatio",
            json!("16:9"),
        ),
        (
            "height",
            json!({"aspect_ratio": "custom", "width": 256, "height": 1000}),
            "height",
            json!(1008),
        ),
        (
            "width",
            json!({"aspect_ratio": "custom", "width": 300, "height": 256}),
            "width",
            json!(304),
        ),
        (
            "prompt_strength",
            json!({"image": image, "prompt_strength": 0.5}),
            "strength",
            json!(0.5),
        ),
        ("model", json!({"model": "schnell"}), "steps", json!(4)),
        ("num_outputs", json!({"num_outputs": 1}), "seed", json!(11)),
        (
            "num_inference_steps",
            json!({"num_inference_steps": 7}),
            "steps",
            json!(7),
        ),
        (
            "guidance_scale",
            json!({"guidance_scale": 4.5}),
            "guidanceScale",
            json!(4.5),
        ),
        ("seed", json!({"seed": 11}), "seed", json!(11)),
        (
            "output_format",
            json!({"output_format": "jpg"}),
            "outputFormat",
            json!("jpeg"),
        ),
        (
            "output_quality",
            json!({"output_quality": 0}),
            "outputQuality",
            json!(1),
        ),
        (
            "disable_safety_checker",
            json!({"disable_safety_checker": true}),
            "prompt",
            json!("a lighthouse"),
        ),
        (
            "go_fast",
            json!({"go_fast": true}),
            "baseModel",
            json!("fake/model"),
        ),
        (
            "megapixels",
            json!({"megapixels": "0.25"}),
            "megapixels",
            json!(0.25),
        ),
        (
            "lora_weights",
            json!({"lora_weights": lora}),
            "loras",
            json!([{"path": lora, "scale": 1.0}]),
        ),
        (
            "hf_lora",
            json!({"hf_lora": lora, "lora_scale": 0.5}),
            "loras",
            json!([{"path": lora, "scale": 0.5}]),
        ),
        (
            "lora_scale",
            json!({"lora_weights": lora, "lora_scale": -0.5}),
            "loras",
            json!([{"path": lora, "scale": -0.5}]),
        ),
        (
            "extra_lora",
            json!({"extra_lora": lora}),
            "loras",
            json!([{"path": lora, "scale": 1.0}]),
        ),
        (
            "extra_lora_scale",
            json!({"lora_weights": lora, "extra_lora": lora, "extra_lora_scale": 2.5}),
            "loras",
            json!([{"path": lora, "scale": 1.0}, {"path": lora, "scale": 2.5}]),
        ),
    ];
    for f in FIELDS {
        assert!(
            table.iter().any(|(name, ..)| name == &f.name),
            "documented field {} has no row in the mapping test",
            f.name
        );
    }
    for (name, extra, native, expected) in &table {
        let mut input = json!({"prompt": "a lighthouse", "seed": 11});
        for (k, v) in extra.as_object().unwrap() {
            input[k] = v.clone();
        }
        let (s, ct, p) = server.predict(json!({"input": input})).await;
        assert_eq!(s, StatusCode::CREATED, "{name}: {p}");
        assert!(ct.starts_with("application/json"), "{name}: {ct}");
        let (s, job) = server
            .get(&format!("/v1/generations/{}", p["id"].as_str().unwrap()))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(job["source"], "replicate");
        let requested = &job["images"][0]["requested"];
        assert_eq!(&requested[native], expected, "{name}: {requested}");
    }

    // The defaults of the schema.
    let (_, _, p) = server
        .predict(json!({"input": {"prompt": "a", "seed": 3}}))
        .await;
    let (_, job) = server
        .get(&format!("/v1/generations/{}", p["id"].as_str().unwrap()))
        .await;
    let r = &job["images"][0]["requested"];
    assert_eq!(
        (
            &r["steps"],
            &r["guidanceScale"],
            &r["aspectRatio"],
            &r["megapixels"],
            &r["outputFormat"],
            &r["outputQuality"]
        ),
        (
            &json!(28),
            &json!(3.0),
            &json!("1:1"),
            &json!(1.0),
            &json!("webp"),
            &json!(80)
        ),
        "{r}"
    );
    assert!(r.get("strength").is_none_or(Value::is_null), "{r}");
    // go_fast without a quantized registry entry: a warning in the logs.
    let (_, _, p) = server
        .predict(json!({"input": {"prompt": "a", "go_fast": true}}))
        .await;
    assert!(p["logs"].as_str().unwrap().contains("go_fast"), "{p}");

    // num_outputs: one image definition each (billed per image), seeds
    // seed, seed+1, ...
    let (_, _, p) = server
        .predict(json!({"input": {"prompt": "a", "seed": 5, "num_outputs": 3}}))
        .await;
    let (_, job) = server
        .get(&format!("/v1/generations/{}", p["id"].as_str().unwrap()))
        .await;
    let seeds: Vec<&Value> = job["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["requested"]["seed"])
        .collect();
    assert_eq!(seeds, [&json!(5), &json!(6), &json!(7)]);
    assert_eq!(job["cost"]["inferences"], 3, "{job}");
}

/// A `null` optional input (what Replicate's clients send for a field left
/// at its default) is taken as absent, and the OpenAPI schema says so:
/// every input but `prompt` is nullable (schemathesis checks the schema
/// against what the server accepts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_inputs_are_absent_and_nullable_in_the_schema() {
    let server = fake(1).await;
    let (s, _, doc) = server
        .call_as(None, Method::GET, "/openapi.json", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let props = doc["components"]["schemas"]["PredictionRequest"]["properties"]["input"]
        ["properties"]
        .as_object()
        .unwrap()
        .clone();
    let mut nulls = json!({"prompt": "a"});
    for (name, schema) in &props {
        let nullable = schema["type"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("null")));
        assert_eq!(nullable, name != "prompt", "{name}: {schema}");
        // An enum is an array (with null in it), or absent.
        match schema.get("enum") {
            None => {}
            Some(Value::Array(values)) => {
                assert!(values.contains(&Value::Null), "{name}: {schema}")
            }
            Some(other) => panic!("{name}: enum {other} is not an array"),
        }
        if name != "prompt" {
            nulls[name] = Value::Null;
        }
    }
    let (s, _, p) = server.predict(json!({"input": nulls})).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let (s, _, e) = server.predict(json!({"input": {"prompt": null}})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
}

/// Out of range, wrong type, unknown: 422 problem details naming
/// `input.<field>` and what is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_inputs_are_refused_in_replicates_shape() {
    let server = fake(1).await;
    let cases: Vec<(&str, Value)> = vec![
        ("prompt", json!({"prompt": null})),
        ("aspect_ratio", json!({"aspect_ratio": "7:5"})),
        (
            "height",
            json!({"aspect_ratio": "custom", "width": 512, "height": 255}),
        ),
        (
            "width",
            json!({"aspect_ratio": "custom", "width": 1441, "height": 512}),
        ),
        ("width", json!({"aspect_ratio": "custom", "height": 512})),
        ("prompt_strength", json!({"prompt_strength": 1.5})),
        ("model", json!({"model": "pro"})),
        ("num_outputs", json!({"num_outputs": 5})),
        ("num_outputs", json!({"num_outputs": 0})),
        ("num_inference_steps", json!({"num_inference_steps": 51})),
        ("num_inference_steps", json!({"num_inference_steps": 0})),
        ("guidance_scale", json!({"guidance_scale": 10.5})),
        ("guidance_scale", json!({"guidance_scale": -1})),
        ("seed", json!({"seed": -1})),
        ("output_format", json!({"output_format": "gif"})),
        ("output_quality", json!({"output_quality": 101})),
        (
            "disable_safety_checker",
            json!({"disable_safety_checker": "yes"}),
        ),
        ("go_fast", json!({"go_fast": 1})),
        ("megapixels", json!({"megapixels": "2"})),
        ("lora_scale", json!({"lora_scale": 3.5})),
        ("extra_lora_scale", json!({"extra_lora_scale": -1.5})),
        (
            "extra_lora",
            json!({"extra_lora": "https://civitai.com/models/1"}),
        ),
        ("mask", json!({"mask": "data:image/png;base64,AAAA"})),
        ("steps", json!({"steps": 4})),
        ("num_outputs", json!({"num_outputs": "two"})),
    ];
    for (field, extra) in cases {
        let mut input = json!({"prompt": "a"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                input.as_object_mut().unwrap().remove(k);
            } else {
                input[k] = v.clone();
            }
        }
        let (s, ct, e) = server.predict(json!({"input": input})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {e}");
        assert_eq!(ct, "application/problem+json", "{field}");
        assert_eq!(e["status"], 422);
        assert_eq!(e["title"], "Input validation failed");
        let want = format!("input.{field}");
        assert_eq!(e["invalid_fields"][0]["field"], want.as_str(), "{e}");
        assert!(e["detail"].as_str().unwrap().starts_with(&want), "{e}");
    }
    // The messages name the allowed values.
    let (_, _, e) = server
        .predict(json!({"input": {"prompt": "a", "num_outputs": 5}}))
        .await;
    assert_eq!(
        e["detail"],
        "input.num_outputs: 5 is out of range (allowed: 1 to 4)"
    );
    let (_, _, e) = server
        .predict(json!({"input": {"prompt": "a", "output_format": "gif"}}))
        .await;
    assert_eq!(
        e["detail"],
        "input.output_format: `gif` is not allowed (allowed: webp, jpg, png)"
    );
    // Nothing was accepted.
    let (_, list) = server.get("/v1/generations").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    // A malformed body, an unknown top-level field, an unknown model.
    let auth = ("authorization", format!("Bearer {}", server.key));
    let request = Request::post("/v1/predictions")
        .header("authorization", &auth.1)
        .body(Body::from("{"))
        .unwrap();
    let (s, h, _) = server.send(request).await;
    assert_eq!(
        (s, &h[header::CONTENT_TYPE]),
        (
            StatusCode::BAD_REQUEST,
            &"application/problem+json".parse().unwrap()
        )
    );
    let (s, _, e) = server
        .predict(json!({"input": {"prompt": "a"}, "stream_url": "x"}))
        .await;
    assert_eq!(
        (s, e["invalid_fields"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("stream_url")),
        "{e}"
    );
}

/// Auth: `Bearer` and `Token`; a missing key is a 401 problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_bearer_auth_and_problem_401() {
    let server = fake(1).await;
    let (s, ct, e) = server
        .post_with("/v1/predictions", json!({"input": {"prompt": "a"}}), &[])
        .await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::UNAUTHORIZED, "application/problem+json")
    );
    assert_eq!(
        (e["status"].as_i64(), e["title"].as_str()),
        (Some(401), Some("Unauthenticated")),
        "{e}"
    );
    let token = ("authorization", format!("Token {}", server.key));
    let (s, _, p) = server
        .post_with(
            "/v1/predictions",
            json!({"input": {"prompt": "a"}}),
            &[token],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let (s, _) = server.get("/v1/predictions/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// `Prefer: wait` answers the finished prediction; without it the client
/// polls `urls.get`. Output files decode at the asked size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_and_polling() {
    let server = fake(1).await;
    let input = json!({"input": {"prompt": "a", "aspect_ratio": "custom", "width": 256, "height": 320,
                                 "num_outputs": 2, "output_format": "png"}});
    let p = server.predict_wait("/v1/predictions", input.clone()).await;
    let output = p["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    for url in output {
        let image =
            easel_core::decode_image(&server.file_bytes(url.as_str().unwrap()).await).unwrap();
        assert_eq!(
            (image.width, image.height, image.format),
            (256, 320, easel_core::OutputFormat::Png)
        );
    }
    assert!(p["metrics"]["predict_time"].as_f64().unwrap() >= 0.0, "{p}");
    assert!(p["completed_at"].as_str().unwrap().contains('T'), "{p}");
    assert!(p["urls"]["get"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/v1/predictions/{}", p["id"].as_str().unwrap())));
    assert_eq!(p["model"], "black-forest-labs/flux-dev-lora");
    assert_eq!(p["input"]["num_outputs"], 2);
    // Without Prefer: starting/processing, then succeeded.
    let (s, _, p) = server.predict(input).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(
        ["starting", "processing", "succeeded"].contains(&p["status"].as_str().unwrap()),
        "{p}"
    );
    let done = server.poll_prediction(p["id"].as_str().unwrap(), 30).await;
    assert_eq!(done["status"], "succeeded");
    // The models route, a registry-less easel model name: the fake server
    // knows `fake/model` as owner/name.
    let p = server
        .predict_wait(
            "/v1/models/fake/model/predictions",
            json!({"input": {"prompt": "a", "megapixels": "0.25"}}),
        )
        .await;
    assert_eq!(
        (p["model"].as_str(), p["version"].as_str()),
        (Some("fake/model"), Some("fake/model")),
        "{p}"
    );
}

/// Cancel a running prediction; list shows it (newest first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_list() {
    let server = fake(200).await;
    let (_, _, first) = server
        .predict(json!({"input": {"prompt": "first", "num_inference_steps": 50}}))
        .await;
    let (_, _, second) = server
        .predict(json!({"input": {"prompt": "second", "num_inference_steps": 50}}))
        .await;
    let id = first["id"].as_str().unwrap();
    let (s, p) = server
        .post(&format!("/v1/predictions/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    let p = if p["status"] == "canceled" {
        p
    } else {
        server.poll_prediction(id, 30).await
    };
    assert_eq!(p["status"], "canceled", "{p}");
    assert!(p["output"].is_null());
    // Canceling again answers it as it is.
    let (s, again) = server
        .post(&format!("/v1/predictions/{id}/cancel"), json!({}))
        .await;
    assert_eq!((s, &again["status"]), (StatusCode::OK, &json!("canceled")));
    let (s, page) = server.get("/v1/predictions").await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let ids: Vec<&str> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second["id"].as_str().unwrap(), id]);
    assert!(
        page["next"].is_null() && page["previous"].is_null(),
        "{page}"
    );
    let (s, _) = server.get("/v1/predictions?cursor=abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let second = second["id"].as_str().unwrap();
    server
        .post(&format!("/v1/predictions/{second}/cancel"), json!({}))
        .await;
}

/// The pixels of a prediction equal those of the native request it
/// translates to (real engine, fixture FLUX models), with a LoRA; `model`
/// dev / schnell map to tiny-flux-dev / tiny-flux-schnell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_equal_the_native_request() {
    let server = TestServer::new(|c| c.default_model = Some(fixture_model("tiny-sd15"))).await;
    let lora = flux_lora();
    let p = server
        .predict_wait(
            "/v1/predictions",
            json!({"input": {"prompt": "a red cube", "aspect_ratio": "custom", "width": 256, "height": 256,
                             "num_inference_steps": 2, "guidance_scale": 3.5, "seed": 7, "output_format": "png",
                             "lora_weights": lora, "lora_scale": 0.7}}),
        )
        .await;
    assert_eq!(p["version"], "tiny-flux-dev", "{p}");
    let native = server
        .native_done(
            json!({"baseModel": "tiny-flux-dev", "width": 256, "height": 256, "steps": 2,
                            "guidanceScale": 3.5, "outputFormat": "png", "outputQuality": 80,
                            "loras": [{"path": lora, "scale": 0.7}],
                            "images": [{"prompt": "a red cube", "seed": 7}]}),
        )
        .await;
    let ours = server.file_bytes(p["output"][0].as_str().unwrap()).await;
    let theirs = server
        .file_bytes(native["assets"][0]["file_url"].as_str().unwrap())
        .await;
    assert_eq!(
        easel_core::decode_image(&ours).unwrap().pixels,
        easel_core::decode_image(&theirs).unwrap().pixels
    );
    // schnell on the models route: the fixture's tiny-flux-schnell, 4 steps.
    let p = server
        .predict_wait(
            "/v1/models/black-forest-labs/flux-schnell/predictions",
            json!({"input": {"prompt": "a", "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 1}}),
        )
        .await;
    assert_eq!(p["version"], "tiny-flux-schnell", "{p}");
    let (_, job) = server
        .get(&format!("/v1/generations/{}", p["id"].as_str().unwrap()))
        .await;
    assert_eq!(job["images"][0]["requested"]["steps"], 4, "{job}");
    // A model name easel does not know: 404 problem.
    let auth = ("authorization", format!("Bearer {}", server.key));
    let (s, ct, e) = server
        .post_with(
            "/v1/models/someone/no-such-model/predictions",
            json!({"input": {"prompt": "a"}}),
            &[auth],
        )
        .await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::NOT_FOUND, "application/problem+json"),
        "{e}"
    );
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("someone/no-such-model"),
        "{e}"
    );
    // A model folder by name on the models route runs that model.
    let p = server
        .predict_wait("/v1/models/easel/tiny-sd15/predictions",
            json!({"input": {"prompt": "a", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}}))
        .await;
    assert_eq!(p["version"], "tiny-sd15", "{p}");
}

/// A webhook receiver on loopback that answers 200 and keeps each request's
/// path, headers and body.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap, String)>>>;

fn webhook_receiver() -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let received: Received = Default::default();
    let r2 = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split(' ').nth(1).unwrap_or_default().to_string();
            let mut headers = axum::http::HeaderMap::new();
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
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            r2.lock()
                .unwrap()
                .push((path, headers, String::from_utf8(body).unwrap()));
        }
    });
    (base, received)
}

/// What a receiver does with Replicate's signing secret (`whsec_<base64>`)
/// and the Standard Webhooks headers, written from Replicate's
/// documentation (not with the server's code): true when one of the
/// space-separated `v1,<base64>` signatures is the HMAC-SHA256 of
/// `"<webhook-id>.<webhook-timestamp>.<body>"`.
fn replicate_signature_verifies(secret: &str, headers: &axum::http::HeaderMap, body: &str) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let id = headers["webhook-id"].to_str().unwrap();
    let t = headers["webhook-timestamp"].to_str().unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{t}.{body}").as_bytes());
    let expected = mac.finalize().into_bytes().to_vec();
    headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .any(|(_, sig)| b64.decode(sig).is_ok_and(|s| s == expected))
}

async fn webhook_server() -> TestServer {
    TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = 20;
        c.default_model = Some("fake/model".into());
        c.allow_fetch_hosts = vec!["127.0.0.1".into()];
    })
    .await
}

async fn deliveries_to(
    received: &Received,
    path: &str,
    at_least: usize,
) -> Vec<(axum::http::HeaderMap, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<_> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect();
        if got.len() >= at_least {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {} webhooks of {at_least}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A prediction's webhooks carry the prediction object (the GET body at
/// that moment), only on the events of `webhook_events_filter`, signed the
/// Standard Webhooks way with the key's secret of
/// `GET /v1/webhooks/default/secret`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_send_the_prediction_signed_as_replicate_does() {
    let (hook, received) = webhook_receiver();
    let server = webhook_server().await;
    let (s, secret) = server.get("/v1/webhooks/default/secret").await;
    assert_eq!(s, StatusCode::OK, "{secret}");
    let secret = secret["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    // Each key has its own secret; without a key, Replicate's 401.
    let other = TestServer::add_key(&server.state, None).await;
    let (s, _, other_secret) = server
        .call_as(
            Some(&other),
            Method::GET,
            "/v1/webhooks/default/secret",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(other_secret["key"], secret.as_str());
    let (s, _, e) = server
        .call_as(None, Method::GET, "/v1/webhooks/default/secret", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["status"], 401, "{e}");

    let input = json!({"prompt": "a fox", "num_inference_steps": 4, "seed": 3});
    // start + completed only.
    let (s, _, p) = server
        .predict(
            json!({"input": input, "webhook": format!("{hook}/filtered"),
                        "webhook_events_filter": ["start", "completed"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    let done = server.poll_prediction(&id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let got = deliveries_to(&received, "/filtered", 2).await;
    // Nothing more comes (no progress events were asked for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deliveries_to(&received, "/filtered", 2).await.len(), 2);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (headers, body) in &got {
        assert!(
            replicate_signature_verifies(&secret, headers, body),
            "{headers:?}"
        );
        assert!(
            !replicate_signature_verifies(other_secret["key"].as_str().unwrap(), headers, body),
            "another key's secret must not verify"
        );
        let t: i64 = headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((now - t).abs() < 60, "{t} vs {now}");
        assert!(headers.get("easel-signature").is_none(), "{headers:?}");
    }
    // Deliveries may arrive in any order: find each by its status.
    let bodies: Vec<Value> = got
        .iter()
        .map(|(_, b)| serde_json::from_str(b).unwrap())
        .collect();
    let start = bodies
        .iter()
        .find(|b| b["status"] == "processing")
        .expect("start");
    assert_eq!(start["id"], id.as_str());
    assert!(start["output"].is_null(), "{start}");
    assert_eq!(start["input"], input);
    let completed = bodies
        .iter()
        .find(|b| b["status"] == "succeeded")
        .expect("completed");
    assert_eq!(completed, &done, "the completed webhook is the GET body");
    assert_eq!(completed["output"].as_array().unwrap().len(), 1);

    // No filter: every event, progress ones included; `webhook_completed`: only completed.
    let (_, _, all) = server
        .predict(json!({"input": input, "webhook": format!("{hook}/all")}))
        .await;
    let (_, _, old) = server
        .predict(json!({"input": input, "webhook_completed": format!("{hook}/old")}))
        .await;
    for p in [&all, &old] {
        let done = server.poll_prediction(p["id"].as_str().unwrap(), 60).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    // start, at least one progress event (the last step's), completed.
    let got = deliveries_to(&received, "/all", 3).await;
    let statuses: Vec<String> = got
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| *s == "succeeded").count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| *s == "processing").count() >= 2,
        "{statuses:?}"
    );
    let got = deliveries_to(&received, "/old", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deliveries_to(&received, "/old", 1).await.len(), 1);
    let only: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(only["status"], "succeeded", "{only}");
    assert!(replicate_signature_verifies(&secret, &got[0].0, &got[0].1));
}
