//! AUTOMATIC1111's `/sdapi/v1` routes through the router: the field table
//! walked (mapped, refused, ignored), ranges refused in the web UI's error
//! shapes, pixels equal to the native request each call translates to,
//! `<lora:...>` tags, options, the lists, progress and interrupt, auth.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use base64::Engine as _;
use easel_server::config::EngineKind;
use easel_server::routes::a1111::names::SAMPLERS;
use easel_server::routes::a1111::request::{Mode, Rule, FIELDS};
use serde_json::{json, Value};

mod common;
use common::{test_png, TestServer};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn fake_server(step_ms: u64) -> TestServer {
    TestServer::new(|c| {
        c.engine = EngineKind::Fake;
        c.fake_step_ms = step_ms;
        c.default_model = Some("fake/model".into());
        c.rate_limit_per_minute = 1_000_000;
        c.rate_limit_burst = 100_000;
    })
    .await
}

/// The tiny fixture models, `default_model = "tiny-sd15"`, and a web UI
/// model root whose `models/Lora` folder holds the SD 1.5 fixture LoRA.
async fn real_server() -> TestServer {
    TestServer::new(|c| {
        c.default_model = Some("tiny-sd15".into());
        let webui = c.data_dir.parent().unwrap().join("webui");
        let loras = webui.join("models/Lora");
        std::fs::create_dir_all(&loras).unwrap();
        std::fs::copy(
            common::fixtures().join("loras/tiny-sd15-lora.safetensors"),
            loras.join("tiny-sd15-lora.safetensors"),
        )
        .unwrap();
        c.models_dirs.push(webui);
    })
    .await
}

impl TestServer {
    async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/v1/generations/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        job
    }

    /// The decoded RGB pixels of every image of a finished native job.
    async fn native_pixels(&self, body: Value) -> Vec<Vec<u8>> {
        let (status, job) = self.post("/v1/generations", body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let job = self.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let mut out = Vec::new();
        for asset in job["assets"].as_array().unwrap() {
            let url = asset["file_url"].as_str().unwrap();
            let path = &url[url.find("/v1/files/").unwrap()..];
            let (_, _, bytes) = self
                .send(Request::get(path).body(Body::empty()).unwrap())
                .await;
            out.push(easel_core::decode_image(&bytes).unwrap().into_rgb8());
        }
        out
    }
}

/// The info object of an sdapi answer.
fn info(answer: &Value) -> Value {
    serde_json::from_str(answer["info"].as_str().expect("info is a string")).unwrap()
}

fn pixels_of(answer: &Value) -> Vec<Vec<u8>> {
    answer["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(i.as_str().unwrap())
                .unwrap();
            easel_core::decode_image(&bytes).unwrap().into_rgb8()
        })
        .collect()
}

/// The `loc` of a FastAPI validation error.
fn loc(v: &Value) -> Vec<String> {
    v["detail"][0]["loc"]
        .as_array()
        .unwrap_or_else(|| panic!("not a validation error: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn base_body(mode: Mode) -> Value {
    let mut body = json!({"prompt": "a cube", "steps": 2, "width": 64, "height": 64});
    if mode == Mode::Img2Img {
        body["init_images"] = json!([b64(&test_png(64, 64, false))]);
    }
    body
}

fn path(mode: Mode) -> &'static str {
    match mode {
        Mode::Txt2Img => "/sdapi/v1/txt2img",
        Mode::Img2Img => "/sdapi/v1/img2img",
    }
}

/// Every row of the documented field table, on both endpoints where it
/// applies: a mapped field lands in the native definition, a field easel
/// cannot do is a 422 naming it at any value but its neutral ones, an
/// ignored field changes nothing and is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_field_table_maps_refuses_and_ignores_each_field() {
    let server = fake_server(1).await;
    let mask = b64(&test_png(64, 64, true));
    for mode in [Mode::Txt2Img, Mode::Img2Img] {
        for field in FIELDS.iter().filter(|f| f.applies.to(mode)) {
            let mut body = base_body(mode);
            match field.rule {
                Rule::Maps {
                    native,
                    example,
                    with,
                    native_example,
                } => {
                    let with: Value = serde_json::from_str(with).unwrap();
                    for (k, v) in with.as_object().unwrap() {
                        body[k] = v.clone();
                    }
                    let mut value: Value = serde_json::from_str(example).unwrap();
                    if field.name == "mask" {
                        value = json!(mask);
                    } else if field.name == "init_images" {
                        value = json!([format!(
                            "data:image/png;base64,{}",
                            b64(&test_png(64, 64, false))
                        )]);
                    }
                    body[field.name] = value;
                    let (status, answer) = server.post(path(mode), body.clone()).await;
                    assert_eq!(status, StatusCode::OK, "{} {body}: {answer}", field.name);
                    let id = info(&answer)["easel_generation_id"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let job = server.job(&id).await;
                    assert_eq!(job["source"], "a1111");
                    let want: Value = serde_json::from_str(native_example).unwrap();
                    if native == "images" {
                        assert_eq!(
                            job["images"].as_array().unwrap().len() as u64,
                            want.as_u64().unwrap(),
                            "{}",
                            field.name
                        );
                        assert_eq!(
                            answer["images"].as_array().unwrap().len() as u64,
                            want.as_u64().unwrap()
                        );
                        continue;
                    }
                    let got = &job["images"][0]["requested"][native];
                    if want == "<set>" {
                        assert!(got.is_string(), "{}: {native} = {got}", field.name);
                    } else if native == "guidanceScale" || native == "strength" {
                        assert_eq!(got.as_f64(), want.as_f64(), "{}", field.name);
                    } else {
                        assert_eq!(got, &want, "{}: {native}", field.name);
                    }
                }
                Rule::Only {
                    allowed,
                    refused_example,
                    with_mask,
                    ..
                } => {
                    if with_mask {
                        body["mask"] = json!(mask);
                        body["mask_blur"] = json!(0);
                        body["inpainting_fill"] = json!(1);
                        body["inpaint_full_res"] = json!(false);
                    }
                    if field.name == "eta" {
                        body["sampler_name"] = json!("Euler a");
                    }
                    for ok in allowed {
                        let mut body = body.clone();
                        body[field.name] = serde_json::from_str(ok).unwrap();
                        let (status, answer) = server.post(path(mode), body).await;
                        assert_eq!(status, StatusCode::OK, "{} = {ok}: {answer}", field.name);
                    }
                    body[field.name] = serde_json::from_str(refused_example).unwrap();
                    let (status, answer) = server.post(path(mode), body).await;
                    assert_eq!(
                        status,
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "{}: {answer}",
                        field.name
                    );
                    assert_eq!(loc(&answer), ["body", field.name], "{answer}");
                    let msg = answer["detail"][0]["msg"].as_str().unwrap();
                    assert!(msg.contains("allowed"), "{msg}");
                }
                Rule::Answer => {
                    body[field.name] = json!(false);
                    let (status, answer) = server.post(path(mode), body).await;
                    assert_eq!(status, StatusCode::OK, "{}: {answer}", field.name);
                    assert_eq!(answer["images"], json!([]));
                    assert_eq!(info(&answer)["infotexts"].as_array().unwrap().len(), 1);
                }
                Rule::Ignored => {
                    body[field.name] = json!("anything");
                    let (status, answer) = server.post(path(mode), body).await;
                    assert_eq!(status, StatusCode::OK, "{}: {answer}", field.name);
                }
            }
        }
    }
    // A field outside the table is ignored, as the web UI's models do, and
    // reported.
    let mut body = base_body(Mode::Txt2Img);
    body["some_extension_field"] = json!(3);
    let (status, answer) = server.post("/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        info(&answer)["easel_ignored_fields"],
        json!(["some_extension_field"])
    );
}

/// Out-of-range values and samplers easel lacks are 422s in FastAPI's
/// validation shape naming the A1111 field; the native checks' field
/// names are translated back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_refused_in_the_web_ui_shape_naming_the_field() {
    let server = fake_server(1).await;
    for (field, value, name) in [
        ("steps", json!(100), "steps"),
        ("steps", json!(0), "steps"),
        ("width", json!(65), "width"),
        ("height", json!(4096), "height"),
        ("cfg_scale", json!(31), "cfg_scale"),
        ("batch_size", json!(9), "batch_size"),
        ("n_iter", json!(0), "n_iter"),
        ("seed", json!(-2), "seed"),
        ("seed", json!(1.5), "seed"),
        ("sampler_name", json!("DPM++ SDE"), "sampler_name"),
        ("scheduler", json!("exponential"), "scheduler"),
        ("prompt", json!(3), "prompt"),
        (
            "override_settings",
            json!({"sd_model_checkpoint": "fake/missing"}),
            "override_settings",
        ),
        (
            "override_settings",
            json!({"CLIP_stop_at_last_layers": 2}),
            "override_settings",
        ),
    ] {
        let mut body = base_body(Mode::Txt2Img);
        body[field] = value.clone();
        let (status, answer) = server.post("/sdapi/v1/txt2img", body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field} = {value}: {answer}"
        );
        assert_eq!(loc(&answer)[1], name, "{field} = {value}: {answer}");
    }
    let (_, answer) = server
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "sampler_name": "DPM++ SDE"}),
        )
        .await;
    let msg = answer["detail"][0]["msg"].as_str().unwrap();
    for s in SAMPLERS {
        assert!(msg.contains(s.name), "{msg} lacks {}", s.name);
    }
    let (status, answer) = server
        .post(
            "/sdapi/v1/img2img",
            json!({"prompt": "x", "denoising_strength": 1.5,
              "init_images": [b64(&test_png(64, 64, false))]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(loc(&answer), ["body", "denoising_strength"]);
    let (status, answer) = server
        .post("/sdapi/v1/img2img", json!({"prompt": "x"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(loc(&answer), ["body", "init_images"]);
    // Not JSON: the web UI's error shape, not easel's.
    let (status, _, bytes) = server
        .send(
            Request::post("/sdapi/v1/txt2img")
                .header(header::AUTHORIZATION, format!("Bearer {}", server.key))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{nope"))
                .unwrap(),
        )
        .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"], "HTTPException", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("JSON"), "{v}");
}

/// A txt2img and an img2img call give the pixels of the native request
/// they translate to (same model, seeds, steps, sampler), and `info`
/// carries the web UI's infotexts and seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_equal_the_native_request() {
    let server = real_server().await;
    let (status, answer) = server
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a red fox", "negative_prompt": "blurry", "seed": 5, "steps": 2,
                   "cfg_scale": 6, "width": 64, "height": 64, "batch_size": 2,
                   "sampler_name": "Euler a", "scheduler": "automatic", "eta": 1.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let native = server
        .native_pixels(json!({"baseModel": "tiny-sd15", "prompt": "a red fox",
            "negativePrompt": "blurry", "steps": 2, "guidanceScale": 6, "width": 64, "height": 64,
            "scheduler": "euler_a", "outputFormat": "png",
            "images": [{"seed": 5}, {"seed": 6}]}))
        .await;
    assert_eq!(pixels_of(&answer), native);
    let info = info(&answer);
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(info["seed"], 5);
    let text = info["infotexts"][1].as_str().unwrap();
    assert!(
        text.starts_with(
            "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 6"
        ),
        "{text}"
    );
    assert!(text.contains("Seed: 6, Size: 64x64"), "{text}");
    assert_eq!(answer["parameters"]["prompt"], "a red fox");

    let init = b64(&test_png(64, 64, false));
    let (status, answer) = server
        .post(
            "/sdapi/v1/img2img",
            json!({"prompt": "a blue bird", "seed": 9, "steps": 4, "width": 64, "height": 64,
                   "init_images": [format!("data:image/png;base64,{init}")],
                   "denoising_strength": 0.5, "sampler_name": "DDIM", "eta": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["parameters"]["init_images"], Value::Null);
    let native = server
        .native_pixels(
            json!({"baseModel": "tiny-sd15", "prompt": "a blue bird", "steps": 4,
            "guidanceScale": 7, "width": 64, "height": 64, "scheduler": "ddim", "strength": 0.5,
            "image": init, "outputFormat": "png", "images": [{"seed": 9}]}),
        )
        .await;
    assert_eq!(pixels_of(&answer), native);
}

/// `<lora:NAME:WEIGHT>` applies the LoRA file of that name (as GET
/// /sdapi/v1/loras lists it) at that weight and leaves the prompt text;
/// an unknown name is a 422 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_tags_apply_the_named_lora() {
    let server = real_server().await;
    let (status, list) = server.get("/sdapi/v1/loras").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "tiny-sd15-lora"),
        "{list}"
    );
    let (status, answer) = server
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a cat <lora:tiny-sd15-lora:0.8>", "seed": 3, "steps": 2,
                   "width": 64, "height": 64, "sampler_name": "Euler"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let id = info(&answer)["easel_generation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = server.job(&id).await;
    assert_eq!(job["images"][0]["requested"]["prompt"], "a cat ");
    assert_eq!(
        job["images"][0]["parameters"]["loras"][0]["scale"], 0.8,
        "{job}"
    );
    let native = server
        .native_pixels(
            json!({"baseModel": "tiny-sd15", "prompt": "a cat ", "steps": 2,
            "guidanceScale": 7, "width": 64, "height": 64, "scheduler": "euler",
            "outputFormat": "png", "loras": [{"path": "tiny-sd15-lora", "scale": 0.8}],
            "images": [{"seed": 3}]}),
        )
        .await;
    assert_eq!(pixels_of(&answer), native);
    // Without the tag the picture differs: the LoRA did something.
    let plain = server
        .native_pixels(
            json!({"baseModel": "tiny-sd15", "prompt": "a cat ", "steps": 2,
            "guidanceScale": 7, "width": 64, "height": 64, "scheduler": "euler",
            "outputFormat": "png", "images": [{"seed": 3}]}),
        )
        .await;
    assert_ne!(plain, native);
    let (status, answer) = server
        .post(
            "/sdapi/v1/txt2img",
            json!({"prompt": "a cat <lora:no-such-lora:1>", "steps": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(loc(&answer), ["body", "prompt"]);
    assert!(
        answer["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("no-such-lora"),
        "{answer}"
    );
}

/// `sd_model_checkpoint` is per API key: set with POST /options, read back,
/// used by later calls without `override_settings`; another key keeps the
/// server's default. Settings easel does not have are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_set_and_read_the_keys_checkpoint() {
    let server = fake_server(1).await;
    let (status, options) = server.get("/sdapi/v1/options").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(options["sd_model_checkpoint"], "fake/model");
    let (status, _) = server
        .post(
            "/sdapi/v1/options",
            json!({"sd_model_checkpoint": "fake/other", "samples_format": "png"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, options) = server.get("/sdapi/v1/options").await;
    assert_eq!(options["sd_model_checkpoint"], "fake/other");
    let (status, answer) = server
        .post("/sdapi/v1/txt2img", base_body(Mode::Txt2Img))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let id = info(&answer)["easel_generation_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        server.job(&id).await["images"][0]["requested"]["baseModel"],
        "fake/other"
    );
    let other = TestServer::add_key(&server.state, None).await;
    let (_, _, options) = server
        .call_as(Some(&other), Method::GET, "/sdapi/v1/options", None)
        .await;
    assert_eq!(options["sd_model_checkpoint"], "fake/model");
    for (body, name) in [
        (
            json!({"sd_model_checkpoint": "fake/missing"}),
            "sd_model_checkpoint",
        ),
        (
            json!({"CLIP_stop_at_last_layers": 2}),
            "CLIP_stop_at_last_layers",
        ),
        (json!({"show_progressbar": true}), "show_progressbar"),
    ] {
        let (status, answer) = server.post("/sdapi/v1/options", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(loc(&answer), ["body", name]);
    }
    let (_, options) = server.get("/sdapi/v1/options").await;
    assert_eq!(options["sd_model_checkpoint"], "fake/other");
}

/// Every sampler GET /samplers lists is accepted by txt2img, and the
/// schedulers, models and LoRAs are listed in the web UI's shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lists_are_in_the_web_ui_shapes_and_usable() {
    let server = fake_server(1).await;
    let (status, samplers) = server.get("/sdapi/v1/samplers").await;
    assert_eq!(status, StatusCode::OK);
    let samplers = samplers.as_array().unwrap();
    assert_eq!(samplers.len(), SAMPLERS.len());
    for s in samplers {
        assert!(s["aliases"].is_array() && s["options"].is_object(), "{s}");
        let mut body = base_body(Mode::Txt2Img);
        body["sampler_name"] = s["name"].clone();
        let (status, answer) = server.post("/sdapi/v1/txt2img", body).await;
        assert_eq!(status, StatusCode::OK, "{s}: {answer}");
    }
    let (_, schedulers) = server.get("/sdapi/v1/schedulers").await;
    let names: Vec<&str> = schedulers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["automatic", "karras", "simple"]);
    let real = real_server().await;
    let (status, models) = real.get("/sdapi/v1/sd-models").await;
    assert_eq!(status, StatusCode::OK);
    let m = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["title"] == "tiny-sd15")
        .expect("tiny-sd15 listed");
    for key in ["model_name", "hash", "sha256", "filename", "config"] {
        assert!(m.get(key).is_some(), "{m} lacks {key}");
    }
}

/// GET /progress reports the caller's running job; POST /interrupt cancels
/// it and the waiting txt2img answers what was finished; the job is in the
/// native list with source `a1111`. Another key sees no job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_interrupt_act_on_the_callers_job() {
    let server = fake_server(100).await;
    let (_, idle) = server.get("/sdapi/v1/progress").await;
    assert_eq!(idle["progress"], 0.0);
    assert_eq!(idle["state"]["job_count"], 0);
    let router = server.router.clone();
    let key = server.key.clone();
    let call = tokio::spawn(async move {
        use tower::ServiceExt;
        let body = json!({"prompt": "slow", "steps": 50, "width": 64, "height": 64});
        let request = Request::post("/sdapi/v1/txt2img")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let (_, p) = server.get("/sdapi/v1/progress").await;
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 {
            break p;
        }
        assert!(Instant::now() < deadline, "no progress: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fraction = progress["progress"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 1.0, "{progress}");
    assert_eq!(progress["state"]["sampling_steps"], 50);
    assert_eq!(progress["state"]["job_count"], 1);
    assert!(
        progress["eta_relative"].as_f64().unwrap() > 0.0,
        "{progress}"
    );
    let other = TestServer::add_key(&server.state, None).await;
    let (_, _, theirs) = server
        .call_as(Some(&other), Method::GET, "/sdapi/v1/progress", None)
        .await;
    assert_eq!(theirs["state"]["job_count"], 0, "{theirs}");
    // Another key's interrupt leaves the job alone.
    server
        .call_as(Some(&other), Method::POST, "/sdapi/v1/interrupt", None)
        .await;
    let (status, answer) = server.post("/sdapi/v1/interrupt", json!({})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({})));
    let (status, answer) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info = info(&answer);
    assert_eq!(info["interrupted"], true);
    let (_, list) = server.get("/v1/generations").await;
    let job = &list["data"][0];
    assert_eq!(
        (job["source"].as_str(), job["status"].as_str()),
        (Some("a1111"), Some("canceled"))
    );
    assert_eq!(job["id"], info["easel_generation_id"]);
}

/// Bearer, or Basic with the key as the password (any user name) on
/// /sdapi only; failures in the web UI's shape with a Basic challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_takes_the_key_as_password() {
    let server = fake_server(1).await;
    let basic = |password: &str| format!("Basic {}", b64(format!("webui:{password}").as_bytes()));
    let get = |uri: &str, auth: Option<String>| {
        let mut b = Request::get(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::empty()).unwrap()
    };
    let (status, _, _) = server
        .send(get("/sdapi/v1/samplers", Some(basic(&server.key))))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, bytes) = server
        .send(get("/sdapi/v1/samplers", Some(basic("esk_wrong"))))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"], "HTTPException");
    assert!(v["errors"].as_str().unwrap().starts_with("401: "), "{v}");
    let (status, _, _) = server.send(get("/sdapi/v1/samplers", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Basic is for the web UI's routes only.
    let (status, _, bytes) = server
        .send(get("/v1/models", Some(basic(&server.key))))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(v["error"]["code"].is_string(), "native shape: {v}");
    // An unknown /sdapi route is a 404 in the web UI's shape.
    let (status, _, bytes) = server
        .send(get("/sdapi/v1/nope", Some(basic(&server.key))))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"], "HTTPException", "{v}");
}

/// png-info reads back the `parameters` text of an image txt2img answered
/// (as the web UI's `{info, items, parameters}`), from base64 or a data
/// URI; a PNG without it reads as empty; what is not a base64 PNG is a 422
/// naming `image`. upscalers and scripts list what easel has: nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn png_info_upscalers_and_scripts() {
    let server = fake_server(1).await;
    let mut body = base_body(Mode::Txt2Img);
    body["prompt"] = json!("a red cube, studio light");
    body["negative_prompt"] = json!("blurry");
    body["seed"] = json!(1234);
    let (status, answer) = server.post("/sdapi/v1/txt2img", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let image = answer["images"][0].as_str().unwrap().to_string();
    let infotext = info(&answer)["infotexts"][0].as_str().unwrap().to_string();
    for given in [image.clone(), format!("data:image/png;base64,{image}")] {
        let (status, read) = server
            .post("/sdapi/v1/png-info", json!({"image": given}))
            .await;
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(read["info"], infotext.as_str(), "{read}");
        let p = &read["parameters"];
        assert_eq!(p["Prompt"], "a red cube, studio light", "{p}");
        assert_eq!(p["Negative prompt"], "blurry", "{p}");
        assert_eq!(p["Seed"], "1234", "{p}");
        assert_eq!(p["Steps"], "2", "{p}");
        assert_eq!(
            (p["Size-1"].as_str(), p["Size-2"].as_str()),
            (Some("64"), Some("64"))
        );
        // The other text chunks are the items (easel's own record among them).
        assert!(read["items"]["easel"].is_string(), "{read}");
        assert!(read["items"].get("parameters").is_none(), "{read}");
    }
    // A PNG with no text chunks at all.
    let mut plain = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut plain, 2, 2);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 12]).unwrap();
    }
    let (status, read) = server
        .post("/sdapi/v1/png-info", json!({"image": b64(&plain)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read, json!({"info": "", "items": {}, "parameters": {}}));
    for bad in [
        json!({}),
        json!({"image": "%%%"}),
        json!({"image": b64(b"GIF89a not a png")}),
        json!({"image": 5}),
    ] {
        let (status, e) = server.post("/sdapi/v1/png-info", bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
        assert_eq!(loc(&e), ["body", "image"], "{bad}: {e}");
    }
    let (status, upscalers) = server.get("/sdapi/v1/upscalers").await;
    assert_eq!((status, upscalers), (StatusCode::OK, json!([])));
    let (status, scripts) = server.get("/sdapi/v1/scripts").await;
    assert_eq!(
        (status, scripts),
        (StatusCode::OK, json!({"txt2img": [], "img2img": []}))
    );
    for uri in ["/sdapi/v1/upscalers", "/sdapi/v1/scripts"] {
        let (status, _, e) = server.call_as(None, Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}: {e}");
        assert_eq!(e["error"], "HTTPException", "{uri}: {e}");
    }
}
