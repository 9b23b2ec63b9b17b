//! The serverless endpoint shape (`POST /api/v1/images/generation`) on the
//! fixture models: every field of its table mapped, the three documented
//! `model_name`s mapped to configured models of their families, FLUX Fill
//! sizes rounded to 16, errors in this surface's shape naming the field,
//! and pixels equal to the native request.

mod common;

use axum::http::{Method, StatusCode};
use base64::Engine as _;
use common::TestServer;
use easel_server::routes::serverless::FIELDS;
use serde_json::{json, Value};

const PATH: &str = "/api/v1/images/generation";

/// [`common::test_png`] in base64, as this surface takes its images.
fn b64_png(width: u32, height: u32, white: bool) -> String {
    base64::engine::general_purpose::STANDARD.encode(common::test_png(width, height, white))
}

fn decode(b64: &Value) -> easel_core::DecodedImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap();
    easel_core::decode_image(&bytes).unwrap()
}

impl TestServer {
    /// The native job behind a serverless answer.
    async fn job_of(&self, answer: &Value) -> Value {
        let id = answer["easel_generation_id"].as_str().unwrap();
        let (s, job) = self.get(&format!("/v1/generations/{id}")).await;
        assert_eq!(s, StatusCode::OK);
        job
    }
}

/// This surface's error shape, naming `field`.
fn assert_error(status: StatusCode, e: &Value, want: StatusCode, field: Option<&str>) {
    assert_eq!(status, want, "{e}");
    assert_eq!(e["status"], "error", "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert_eq!(e["field"].as_str(), field, "{e}");
    assert!(e["code"].as_str().is_some(), "{e}");
}

/// Every field of the table lands on its native field; the documented
/// `model_name`s run on configured models of their family, and FLUX.1
/// Fill sizes are rounded down to multiples of 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_is_mapped_and_model_names_pick_their_family() {
    let server = TestServer::new(|_| {}).await;
    let image = b64_png(64, 64, false);
    let mask = b64_png(64, 64, true);
    let values = |name: &str| -> Value {
        match name {
            "model_name" => json!("black-forest-labs/FLUX.1-Fill-dev"),
            "prompt" => json!("a red cap"),
            "negative_prompt" => json!(""),
            "width" => json!(72),
            "height" => json!(56),
            "num_steps" => json!(2),
            "guidance_scale" => json!(4.5),
            "seed" => json!(11),
            "input_image" => json!(image),
            "mask_image" => json!(mask),
            other => panic!("no test value for {other}"),
        }
    };
    let mut body = json!({});
    for (name, _, _) in FIELDS {
        body[*name] = values(name);
    }
    let (s, r) = server.post(PATH, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "success");
    assert_eq!(r["object"], "list");
    assert_eq!(r["model"], "black-forest-labs/FLUX.1-Fill-dev");
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["index"], 0);
    assert!(data[0]["timings"]["inference"].as_f64().is_some());
    let png = decode(&data[0]["b64_json"]);
    assert_eq!(
        (png.width, png.height),
        (64, 48),
        "72x56 rounded down to 16"
    );
    let job = server.job_of(&r).await;
    assert_eq!(job["source"], "serverless");
    let requested = &job["images"][0]["requested"];
    for (name, _, native) in FIELDS {
        if *name == "negative_prompt" {
            continue; // empty: no negative prompt (FLUX has none)
        }
        assert!(
            !requested[*native].is_null(),
            "{name} -> {native}: {requested}"
        );
    }
    assert_eq!(requested["baseModel"], "tiny-flux-fill");
    assert_eq!(requested["steps"], 2);
    assert_eq!(requested["guidanceScale"], 4.5);
    assert_eq!(requested["seed"], 11);
    assert_eq!(job["cost"]["inferences"], 1, "billed per image");

    for (name, model) in [
        ("stabilityai/stable-diffusion-xl-base-1.0", "tiny-sdxl"),
        ("black-forest-labs/FLUX.1-schnell", "tiny-flux-schnell"),
    ] {
        let (s, r) = server
            .post(
                PATH,
                json!({"model": name, "prompt": "a", "width": 64, "height": 64,
                                "num_steps": 2, "seed": 1}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{name}: {r}");
        let job = server.job_of(&r).await;
        assert_eq!(job["images"][0]["requested"]["baseModel"], model, "{name}");
    }
}

/// Values easel refuses, in this surface's shape with the field's name
/// here (not the native one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_field_in_the_original_shape() {
    let server = TestServer::new(|_| {}).await;
    let ok = json!({"model_name": "stabilityai/stable-diffusion-xl-base-1.0", "prompt": "a",
                    "width": 64, "height": 64, "num_steps": 2});
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b
    };
    for (body, field) in [
        (
            with("model_name", json!("black-forest-labs/FLUX.1-pro")),
            "model_name",
        ),
        (with("prompt", json!(" ")), "prompt"),
        (with("num_steps", json!(0)), "num_steps"),
        (with("num_steps", json!(61)), "num_steps"),
        (with("width", json!(70)), "width"),
        (with("height", json!(4096)), "height"),
        (with("guidance_scale", json!(-1)), "guidance_scale"),
        (
            with("mask_image", json!(b64_png(64, 64, true))),
            "mask_image",
        ),
        (with("input_image", json!("not base64 !!")), "input_image"),
        (with("style", json!("x")), "style"),
    ] {
        let (s, e) = server.post(PATH, body.clone()).await;
        assert!(
            s == StatusCode::UNPROCESSABLE_ENTITY || s == StatusCode::BAD_REQUEST,
            "{body} -> {s} {e}"
        );
        assert_error(s, &e, s, Some(field));
    }
    let (s, e) = server.post(PATH, with("width", json!("wide"))).await;
    assert_error(s, &e, StatusCode::BAD_REQUEST, Some("width"));
    let (_, list) = server.get("/v1/generations").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing accepted"
    );
    let (s, _, e) = server.call_as(None, Method::POST, PATH, Some(ok)).await;
    assert_error(s, &e, StatusCode::UNAUTHORIZED, None);
}

/// The answer's image is the native request's, pixel for pixel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_equal_the_native_request() {
    let server = TestServer::new(|_| {}).await;
    let (s, r) = server
        .post(
            PATH,
            json!({"model_name": "stabilityai/stable-diffusion-xl-base-1.0",
                            "prompt": "a harbour", "negative_prompt": "rain", "width": 64,
                            "height": 48, "num_steps": 3, "guidance_scale": 6, "seed": 77}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let served = decode(&r["data"][0]["b64_json"]);
    let (s, native) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "tiny-sdxl", "prompt": "a harbour", "negativePrompt": "rain",
                   "width": 64, "height": 48, "steps": 3, "guidanceScale": 6,
                   "outputFormat": "png", "images": [{"seed": 77}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{native}");
    let native = server.wait_done(native["id"].as_str().unwrap(), 300).await;
    let asset = &native["assets"][0];
    let ext = asset["file_name"]
        .as_str()
        .unwrap()
        .rsplit('.')
        .next()
        .unwrap();
    let bytes = server
        .state
        .assets()
        .get(asset["content_hash"].as_str().unwrap(), ext)
        .await
        .unwrap()
        .unwrap();
    let native_pixels = easel_core::decode_image(&bytes).unwrap();
    assert_eq!((served.width, served.height), (64, 48));
    assert!(served.pixels == native_pixels.pixels, "same pixels");
}
