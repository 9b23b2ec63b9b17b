//! The workflow builder's Image Generation step as the `ImageGeneration`
//! flow step type: its parameter table, refusals at flow creation naming
//! the step and field, `{{ }}` prompt variables, on-failure modes, asset
//! records consumed by later steps, and pixels equal to the native request.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{fixtures, TestServer};
use easel_server::config::EngineKind;
use easel_server::flows::image_generation::{native_request, SIZE_TILES};
use serde_json::{json, Value};

impl TestServer {
    /// A fake-engine server whose `default_model` is the tiny SD 1.5 fixture.
    async fn fake_with_default() -> TestServer {
        Self::new(|c| {
            c.engine = EngineKind::Fake;
            c.fake_step_ms = 1;
            c.default_model = Some("tiny-sd15".into());
        })
        .await
    }

    /// The bytes of an asset's file.
    async fn file_bytes(&self, url: &str) -> Vec<u8> {
        let path = &url[url.find("/v1/files/").unwrap()..];
        let (s, _, bytes) = self
            .send(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::OK, "{url}");
        bytes
    }
}

/// Every parameter of the documented table, each value, and the native
/// request it becomes (with `default_model` `m0`).
#[test]
fn parameter_table_maps_to_the_native_request() {
    let base = |extra: Value| {
        let mut request =
            json!({ "baseModel": "m0", "outputFormat": "png", "images": [{ "prompt": "p" }] });
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    };
    let mut cases: Vec<(Value, Value)> = vec![
        // Defaults: size auto (native size), count 1, png.
        (json!({ "prompt": "p" }), base(json!({}))),
        (
            json!({ "prompt": "p", "count": 3, "seed": 7 }),
            base(json!({ "images": [
                { "prompt": "p", "seed": 7 }, { "prompt": "p", "seed": 8 }, { "prompt": "p", "seed": 9 }
            ] })),
        ),
        (
            json!({ "prompt": "p", "count": 2 }),
            base(json!({ "images": [{ "prompt": "p" }, { "prompt": "p" }] })),
        ),
        (
            json!({ "prompt": "p", "outputFormat": "jpeg", "outputCompression": 0 }),
            base(json!({ "outputFormat": "jpeg", "outputQuality": 1 })),
        ),
        (
            json!({ "prompt": "p", "outputFormat": "WEBP", "outputCompression": 55 }),
            base(json!({ "outputFormat": "webp", "outputQuality": 55 })),
        ),
        (
            json!({ "prompt": "p", "outputFormat": "webp" }),
            base(json!({ "outputFormat": "webp", "outputQuality": 100 })),
        ),
        // png is lossless: compression is accepted and not sent.
        (
            json!({ "prompt": "p", "outputFormat": "png", "outputCompression": 10 }),
            base(json!({})),
        ),
        (
            json!({ "prompt": "p", "model": "tiny-sdxl" }),
            base(json!({ "baseModel": "tiny-sdxl" })),
        ),
    ];
    for (tile, size) in SIZE_TILES {
        let expected = match size {
            Some((w, h)) => base(json!({ "width": w, "height": h })),
            None => base(json!({})),
        };
        cases.push((json!({ "prompt": "p", "size": tile }), expected));
    }
    // Accepted values that change nothing.
    for (key, values) in [
        ("quality", &["auto", "low", "medium", "high", "High"][..]),
        ("background", &["auto", "opaque", "Opaque"][..]),
        ("moderation", &["auto", "low"][..]),
        ("chargeType", &["hosted", "personal", "Personal"][..]),
    ] {
        for value in values {
            cases.push((json!({ "prompt": "p", key: value }), base(json!({}))));
        }
    }
    for (parameters, expected) in cases {
        let got = native_request(&parameters, Some("m0"), false)
            .unwrap_or_else(|e| panic!("{parameters}: {e:?}"));
        assert_eq!(got, expected, "{parameters}");
    }
}

/// Values outside the table are refused naming the field and the allowed values.
#[test]
fn parameter_table_refuses_values_outside_it() {
    for (parameters, field, words) in [
        (json!({}), "prompt", "missing"),
        (json!({ "prompt": "" }), "prompt", "must not be empty"),
        (json!({ "prompt": 3 }), "prompt", "must be a string"),
        (json!({ "prompt": "a {{ x y }}" }), "prompt", "`{{ x y }}` is not a variable"),
        (json!({ "prompt": "a {{ x" }), "prompt", "never closed"),
        (json!({ "prompt": "p", "size": "512x512" }), "size", "(allowed: auto, 1024x1024, 1536x1024, 1024x1536)"),
        (json!({ "prompt": "p", "count": 0 }), "count", "from 1 to 10"),
        (json!({ "prompt": "p", "count": 11 }), "count", "from 1 to 10"),
        (json!({ "prompt": "p", "count": 1.5 }), "count", "from 1 to 10"),
        (json!({ "prompt": "p", "quality": "ultra" }), "quality", "(allowed: auto, low, medium, high)"),
        (json!({ "prompt": "p", "background": "transparent" }), "background", "`transparent` is not supported: diffusion models draw no alpha channel (allowed: auto, opaque)"),
        (json!({ "prompt": "p", "background": "green" }), "background", "(allowed: auto, opaque)"),
        (json!({ "prompt": "p", "moderation": "strict" }), "moderation", "(allowed: auto, low)"),
        (json!({ "prompt": "p", "outputFormat": "gif" }), "outputFormat", "(allowed: png, jpeg, webp)"),
        (json!({ "prompt": "p", "outputCompression": 101 }), "outputCompression", "from 0 to 100"),
        (json!({ "prompt": "p", "chargeType": "free" }), "chargeType", "(allowed: hosted, personal)"),
        (json!({ "prompt": "p", "seed": -1 }), "seed", "must be an integer"),
        (json!({ "prompt": "p", "model": 5 }), "model", "must be a model name"),
        (json!({ "prompt": "p", "width": 64 }), "width", "unknown parameter"),
        (json!({ "prompt": "p", "name": "x" }), "name", "the step's own field"),
        (json!({ "prompt": "p", "Count": 2 }), "Count", "did you mean `count`?"),
    ] {
        let errors = native_request(&parameters, Some("m0"), false)
            .expect_err(&parameters.to_string());
        let found = errors.iter().any(|e| {
            e.path.as_str() == format!("parameters.{field}") && e.message.contains(words)
        });
        assert!(found, "{parameters}: want parameters.{field} `{words}`, got {errors:?}");
    }
    // No model and no default_model.
    let errors = native_request(&json!({ "prompt": "p" }), None, false).unwrap_err();
    assert_eq!(errors[0].path.as_str(), "parameters.model");
    assert!(errors[0].message.contains("default_model"), "{errors:?}");
}

/// POST /v1/flows refuses bad parameters at creation: 422 `invalid_flow`
/// listing every problem by step and field, with the allowed values; the
/// model is checked as a native request would be; seed variables naming
/// steps that do not exist or run later are refused by the engine's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_parameters_are_refused_at_creation_naming_step_and_field() {
    let server = TestServer::fake_with_default().await;
    let (s, e) = server
        .post(
            "/v1/flows",
            json!({ "steps": [
                { "id": "hero", "type": "ImageGeneration", "parameters": {
                    "prompt": "a bottle", "size": "512x512", "count": 11,
                    "background": "transparent", "outputFormat": "gif" } },
                { "id": "second", "type": "ImageGeneration", "parameters": {
                    "prompt": "x {{ later.output[0].id }} and {{ nope.output }}", "model": "missing-model" } },
                { "id": "later", "type": "ImageGeneration", "parameters": { "prompt": "y" } }
            ] }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "invalid_flow");
    let message = e["error"]["message"].as_str().unwrap();
    for want in [
        "steps[0] (hero).parameters.size: unknown size `512x512` (allowed: auto, 1024x1024, 1536x1024, 1024x1536)",
        "steps[0] (hero).parameters.count: must be an integer from 1 to 10, not 11",
        "steps[0] (hero).parameters.background: `transparent` is not supported",
        "steps[0] (hero).parameters.outputFormat: unknown outputFormat `gif` (allowed: png, jpeg, webp)",
        "steps[1] (second).parameters.prompt: reference `$.results.later[0].id` refers to step `later` (steps[2]), which runs later",
        "steps[1] (second).parameters.prompt: reference `$.results.nope` refers to step `nope`, which does not exist",
        "steps[1] (second).parameters.model:",
    ] {
        assert!(message.contains(want), "want `{want}` in:\n{message}");
    }
    assert!(!message.contains("steps[2] (later)"), "{message}");

    // Every tile fits FLUX's size multiple (16); the cosmetic values and
    // the builder's `Continue` are accepted.
    let (s, flow) = server
        .post(
            "/v1/flows",
            json!({ "steps": [{ "id": "ok", "type": "ImageGeneration", "onFailure": "Continue",
                "parameters": { "prompt": "{{ subject }}", "size": "1536x1024", "model": "tiny-flux-schnell",
                                "quality": "high", "moderation": "low", "chargeType": "Personal" } }] }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{flow}");
    // The input lacks the variable: refused before anything runs, naming it.
    let (s, e) = server
        .post(
            &format!("/v1/flows/{}/runs", flow["id"].as_str().unwrap()),
            json!({ "input": { "other": 1 } }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("steps[0] (ok).parameters.prompt: `$.input.subject` selects nothing: the input has no `subject` (it has: other)"),
        "{message}"
    );
    let (_, jobs) = server.get("/v1/generations").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0, "nothing ran");
}

/// `{{ }}` variables from the flow input and a previous step; the size tile
/// and count reach the job (one definition per image, billed per image,
/// listed in GET /v1/generations as a flow job); the output records are
/// GET /v1/assets' records and later steps consume them (an asset id as
/// an image-to-image input, a file name in another step's prompt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_output_records_and_later_steps() {
    let server = TestServer::fake_with_default().await;
    let run_id = server
        .start_flow(
            json!({ "document": r#"{ steps: [
                { id: 'facts', type: 'Constant', parameters: { value: { subject: 'a blue bottle', tags: ['studio', 'clean'] } } },
                { id: 'hero', type: 'ImageGeneration', name: 'Hero image', parameters: {
                    prompt: 'A {{ style }} photo of {{facts.output.subject}}, {{ facts.output.tags[1] }} background, {{ $.input.extra }}',
                    size: '1536x1024', count: 2, outputFormat: 'jpeg', outputCompression: 70, seed: 11 } },
                { id: 'variant', type: 'ImageGenerator', parameters: { baseModel: 'tiny-sd15',
                    images: [{ prompt: 'variant', image: '$.results.hero[0].id', strength: 0.5, width: 64, height: 64 }] } },
                { id: 'caption', type: 'ImageGeneration', parameters: {
                    prompt: 'from {{ hero.output[1].file_name }}', seed: 3 } },
                { id: 'urls', type: 'Template', parameters: { template: '{{ $.results.hero[0].file_url }}' } },
            ] }"# }),
            json!({ "style": "product", "extra": "soft light" }),
        )
        .await;
    let run = server.wait_run(&run_id, 60).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let hero = &run["steps"][1];
    let job_id = hero["jobId"].as_str().unwrap();
    let job = server.wait_done(job_id, 10).await;
    assert_eq!(job["source"], "flow");
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "one definition per image");
    for (i, image) in images.iter().enumerate() {
        let p = &image["parameters"];
        assert_eq!(
            p["prompt"],
            "A product photo of a blue bottle, clean background, soft light"
        );
        assert_eq!(
            (p["width"].as_u64(), p["height"].as_u64()),
            (Some(1536), Some(1024))
        );
        assert_eq!(p["outputFormat"], "jpeg");
        assert_eq!(p["outputQuality"], 70);
        assert_eq!(p["seed"], 11 + i as u64);
    }
    assert_eq!(job["cost"]["inferences"], 2, "billed per image");
    let (_, list) = server.get("/v1/generations").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == job_id),
        "the step's job is listed: {list}"
    );

    // The result is GET /v1/assets' records for that job, in order.
    let (s, assets) = server.get(&format!("/v1/assets?generation={job_id}")).await;
    assert_eq!(s, StatusCode::OK, "{assets}");
    let result = hero["result"].as_array().unwrap();
    assert_eq!(result.len(), 2);
    for (mine, listed) in result.iter().zip(assets["data"].as_array().unwrap()) {
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(mine), keys(listed), "same record shape");
        for field in [
            "id",
            "object",
            "file_name",
            "file_size",
            "file_type",
            "width",
            "seed",
            "generation_id",
        ] {
            assert_eq!(mine[field], listed[field], "{field}");
        }
        assert_eq!(mine["file_type"], "image/jpeg");
        let bytes = server.file_bytes(mine["file_url"].as_str().unwrap()).await;
        assert_eq!(bytes.len() as u64, mine["file_size"].as_u64().unwrap());
    }

    // Later steps consumed the records.
    let variant = server
        .wait_done(run["steps"][2]["jobId"].as_str().unwrap(), 10)
        .await;
    assert_eq!(variant["status"], "succeeded", "{variant}");
    assert_eq!(variant["images"][0]["parameters"]["strength"], 0.5);
    let caption = server
        .wait_done(run["steps"][3]["jobId"].as_str().unwrap(), 10)
        .await;
    assert_eq!(
        caption["images"][0]["parameters"]["prompt"],
        format!("from {}", result[1]["file_name"].as_str().unwrap())
    );
    assert_eq!(run["steps"][4]["result"], result[0]["file_url"]);
}

/// "When the step fails": `Terminate Workflow` (and `terminate`, the
/// default) fail the run naming the step and field and skip the rest;
/// `Continue` records the error as the step's result and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_modes() {
    let server = TestServer::fake_with_default().await;
    let flow = |on_failure: Option<&str>| {
        let mut step = json!({ "id": "hero", "type": "ImageGeneration",
            "parameters": { "prompt": "p", "size": "$.input.size" } });
        if let Some(f) = on_failure {
            step["onFailure"] = json!(f);
        }
        json!({ "steps": [step,
            { "id": "after", "type": "Template", "parameters": { "template": "after {{ $.input.size }}" } }] })
    };
    for on_failure in [None, Some("terminate"), Some("Terminate Workflow")] {
        let run_id = server
            .start_flow(flow(on_failure), json!({ "size": "999x999" }))
            .await;
        let run = server.wait_run(&run_id, 30).await;
        assert_eq!(run["status"], "failed", "{on_failure:?}: {run:#}");
        assert_eq!(
            run["error"]["message"],
            "steps[0] (hero): parameters.size: unknown size `999x999` (allowed: auto, 1024x1024, 1536x1024, 1024x1536)"
        );
        assert_eq!(run["steps"][1]["status"], "skipped");
    }
    for on_failure in ["continue", "Continue"] {
        let run_id = server
            .start_flow(flow(Some(on_failure)), json!({ "size": "999x999" }))
            .await;
        let run = server.wait_run(&run_id, 30).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["steps"][0]["status"], "failed");
        assert!(run["steps"][0]["result"]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("parameters.size: unknown size"));
        assert_eq!(run["steps"][1]["result"], "after 999x999");
    }
    // A model that fails at run time: the job's error, named as the step's field.
    let run_id = server
        .start_flow(
            json!({ "steps": [{ "id": "hero", "type": "ImageGeneration",
                "parameters": { "prompt": "p", "model": "$.input.model" } }] }),
            json!({ "model": "missing-model" }),
        )
        .await;
    let run = server.wait_run(&run_id, 30).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("steps[0] (hero): parameters.model: "),
        "{message}"
    );
    let (s, e) = server
        .post(
            "/v1/flows",
            json!({ "steps": [{ "id": "hero", "type": "ImageGeneration", "onFailure": "stop",
                "parameters": { "prompt": "p" } }] }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("steps[0] (hero).onFailure: must be `terminate` (the default) or `continue` (also written `Terminate Workflow` / `Continue`)"));
}

/// On the real engine with the tiny SD 1.5 fixture: the step's image is
/// byte for byte the native request's with the same seed and model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_equal_the_native_request_with_the_same_seed() {
    let server = TestServer::new(|c| c.default_model = Some("tiny-sd15".into())).await;
    assert!(fixtures().join("models/tiny-sd15").is_dir());
    let run_id = server
        .start_flow(
            json!({ "steps": [{ "id": "hero", "type": "ImageGeneration",
                "parameters": { "prompt": "a {{ subject }}", "seed": 1234, "outputFormat": "png", "quality": "high" } }] }),
            json!({ "subject": "red fox" }),
        )
        .await;
    let run = server.wait_run(&run_id, 300).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let step_asset = &run["steps"][0]["result"][0];
    let (s, native) = server
        .post(
            "/v1/generations",
            json!({ "baseModel": "tiny-sd15", "outputFormat": "png",
                    "images": [{ "prompt": "a red fox", "seed": 1234 }] }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{native}");
    let native = server.wait_done(native["id"].as_str().unwrap(), 300).await;
    assert_eq!(native["status"], "succeeded", "{native}");
    let native_asset = &native["assets"][0];
    assert_eq!(step_asset["width"], native_asset["width"]);
    let a = server
        .file_bytes(step_asset["file_url"].as_str().unwrap())
        .await;
    let b = server
        .file_bytes(native_asset["file_url"].as_str().unwrap())
        .await;
    // The files differ only in their metadata (the job id): decode them.
    let pixels = |bytes: &[u8]| {
        let image = easel_core::decode_image(bytes).unwrap();
        (image.width, image.height, image.into_rgb8())
    };
    let (a, b) = (pixels(&a), pixels(&b));
    assert!(a.2.iter().any(|&v| v != a.2[0]), "not a flat image");
    assert_eq!(a, b, "same pixels");
    assert_eq!(step_asset["seed"], 1234);
    assert_eq!(native_asset["seed"], 1234);
}
