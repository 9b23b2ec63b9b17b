//! Leonardo-style generations (`/api/rest/v1/generations`) on the fixture
//! models: every field of the classification table, Leonardo's ranges
//! refused in Leonardo's error shape naming the field, `sd_version` mapped
//! to a model of its family, and pixels equal to the native request the
//! body translates to.

mod common;

use axum::http::{Method, StatusCode};
use common::{fixtures, TestServer};
use easel_server::routes::leonardo::fields::{Inactive, Role, FIELDS};
use serde_json::{json, Value};

const PATH: &str = "/api/rest/v1/generations";

impl TestServer {
    /// The decoded pixels of a finished job's images, in order.
    async fn pixels(&self, job: &Value) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for a in job["assets"].as_array().unwrap() {
            let name = a["file_name"].as_str().unwrap();
            let ext = name.rsplit('.').next().unwrap();
            let bytes = self
                .state
                .assets()
                .get(a["content_hash"].as_str().unwrap(), ext)
                .await
                .unwrap()
                .unwrap();
            out.push(easel_core::decode_image(&bytes).unwrap().pixels);
        }
        out
    }

    /// POST a Leonardo body; the generation id when accepted.
    async fn leonardo(&self, body: Value) -> (StatusCode, Value) {
        self.post(PATH, body).await
    }

    /// The asset id of one image made natively (an init image).
    async fn some_asset(&self) -> String {
        let (s, job) = self
            .post(
                "/v1/generations",
                json!({"baseModel": "tiny-sd15", "width": 64, "height": 64, "steps": 2,
                       "images": [{"prompt": "init"}]}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{job}");
        let job = self.wait_done(job["id"].as_str().unwrap(), 120).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        job["assets"][0]["id"].as_str().unwrap().to_string()
    }
}

fn base() -> Value {
    json!({"prompt": "a red fox", "modelId": "tiny-sd15", "width": 64, "height": 64,
           "num_images": 1, "num_inference_steps": 10})
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// Leonardo's error shape, naming `field`.
fn assert_leonardo_error(status: StatusCode, e: &Value, want: StatusCode, field: &str) {
    assert_eq!(status, want, "{e}");
    let obj = e.as_object().expect("an object");
    assert_eq!(obj.len(), 3, "exactly error, path, code: {e}");
    assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    let path = if field.is_empty() {
        "$".to_string()
    } else {
        format!("$.{field}")
    };
    assert_eq!(e["path"], path, "{e}");
    let code = match want.as_u16() {
        400 => "parse-failed",
        401 | 403 => "access-denied",
        404 => "not-found",
        422 => "validation-failed",
        _ => "unexpected",
    };
    assert_eq!(e["code"], code, "{e}");
}

/// Every field of the table: unsupported ones refused with their name (and
/// accepted when they ask for nothing), cosmetic ones accepted, mapped ones
/// landing on the native field the table names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_table_is_mapped_accepted_or_refused() {
    let server = TestServer::new(|_| {}).await;
    let asset = server.some_asset().await;
    let lora = fixtures()
        .join("loras/tiny-sd15-lora.safetensors")
        .display()
        .to_string();
    let mut inactive = base();
    for field in FIELDS {
        let example: Value = match field.example {
            "ASSET" => json!(asset),
            e => serde_json::from_str(&e.replace("LORA", &lora.replace('\\', "\\\\")))
                .unwrap_or_else(|err| panic!("{}: {err}", field.name)),
        };
        match field.role {
            Role::Unsupported(kind) => {
                let (s, e) = server.leonardo(with(base(), field.name, example)).await;
                assert_leonardo_error(s, &e, StatusCode::UNPROCESSABLE_ENTITY, field.name);
                assert!(e["error"].as_str().unwrap().contains(field.name), "{e}");
                inactive[field.name] = match kind {
                    Inactive::FalseOrNull => json!(false),
                    Inactive::EmptyOrNull => json!([]),
                    Inactive::Null => Value::Null,
                    Inactive::OneOf(values) => json!(values[0]),
                };
            }
            Role::Cosmetic => {
                let (s, r) = server.leonardo(with(base(), field.name, example)).await;
                assert_eq!(s, StatusCode::OK, "{}: {r}", field.name);
            }
            Role::Mapped(target) => {
                let mut body = with(base(), field.name, example.clone());
                if field.name == "init_strength" {
                    body["init_image_id"] = json!(asset);
                }
                let (s, r) = server.leonardo(body).await;
                assert_eq!(s, StatusCode::OK, "{}: {r}", field.name);
                let id = r["sdGenerationJob"]["generationId"].as_str().unwrap();
                let (_, job) = server.get(&format!("/v1/generations/{id}")).await;
                assert_eq!(job["source"], "leonardo");
                if target == "images" {
                    assert_eq!(job["images"].as_array().unwrap().len(), 2, "{job}");
                    continue;
                }
                let got = &job["images"][0]["requested"][target];
                assert!(!got.is_null(), "{} -> {target}: {job}", field.name);
                let want = match field.name {
                    "num_inference_steps"
                    | "width"
                    | "height"
                    | "seed"
                    | "guidance_scale"
                    | "negative_prompt"
                    | "tiling" => Some(example),
                    "init_strength" => Some(json!(0.5)),
                    "scheduler" => Some(json!("ddim")),
                    "modelId" => Some(json!("tiny-sd15")),
                    "prompt" | "presetStyle" => Some(json!("a red fox")),
                    _ => None,
                };
                if let Some(want) = want {
                    let matches =
                        got == &want || got.as_f64().is_some() && got.as_f64() == want.as_f64();
                    assert!(matches, "{} -> {target}: {got} != {want}", field.name);
                }
            }
        }
    }
    let (s, r) = server.leonardo(inactive.clone()).await;
    assert_eq!(s, StatusCode::OK, "inactive values pass: {inactive} -> {r}");
}

/// Leonardo's ranges, enums and required fields, each refused in Leonardo's
/// shape with the field's path; a wrong JSON type is 400 `parse-failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_values_are_refused_naming_the_field() {
    let server = TestServer::new(|_| {}).await;
    let asset_free = base();
    let cases: Vec<(Value, &str)> = vec![
        (with(base(), "width", json!(24)), "width"),
        (with(base(), "width", json!(1544)), "width"),
        (with(base(), "width", json!(100)), "width"),
        (with(base(), "height", json!(0)), "height"),
        (with(base(), "num_images", json!(0)), "num_images"),
        (with(base(), "num_images", json!(9)), "num_images"),
        (
            with(with(base(), "width", json!(1024)), "num_images", json!(5)),
            "num_images",
        ),
        (
            with(base(), "num_inference_steps", json!(9)),
            "num_inference_steps",
        ),
        (
            with(base(), "num_inference_steps", json!(61)),
            "num_inference_steps",
        ),
        (
            with(base(), "num_inference_steps", json!(12.5)),
            "num_inference_steps",
        ),
        (with(base(), "guidance_scale", json!(0.5)), "guidance_scale"),
        (with(base(), "guidance_scale", json!(21)), "guidance_scale"),
        (
            with(
                with(base(), "init_image_id", json!("x")),
                "init_strength",
                json!(0.05),
            ),
            "init_strength",
        ),
        (
            with(
                with(base(), "init_image_id", json!("x")),
                "init_strength",
                json!(0.95),
            ),
            "init_strength",
        ),
        (with(base(), "init_strength", json!(0.5)), "init_strength"),
        (with(base(), "seed", json!(-1)), "seed"),
        (with(base(), "seed", json!(9_999_999_999u64)), "seed"),
        (with(base(), "scheduler", json!("FOO")), "scheduler"),
        (with(base(), "presetStyle", json!("ANIME")), "presetStyle"),
        (with(base(), "foo", json!(1)), "foo"),
        (with(base(), "prompt", json!("")), "prompt"),
        (
            with(
                base(),
                "modelId",
                json!("b24e16ff-06e3-43eb-8d33-4416c2d75876"),
            ),
            "modelId",
        ),
        (
            with(
                base(),
                "elements",
                json!([{"akUUID": "tiny-sd15-lora", "weight": 5}]),
            ),
            "elements[0].weight",
        ),
    ];
    for (body, field) in cases {
        let (s, e) = server.leonardo(body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {e}");
        assert_leonardo_error(s, &e, StatusCode::UNPROCESSABLE_ENTITY, field);
    }
    // A LoRA that is neither a training nor a file under the model roots.
    let (s, e) = server
        .leonardo(with(
            base(),
            "elements",
            json!([{"akUUID": "no-such-lora"}]),
        ))
        .await;
    assert_leonardo_error(s, &e, StatusCode::FORBIDDEN, "elements[0].akUUID");
    let mut no_model = asset_free.clone();
    no_model.as_object_mut().unwrap().remove("modelId");
    for (version, field) in [("v9", "sd_version"), ("PHOENIX", "sd_version")] {
        let (s, e) = server
            .leonardo(with(no_model.clone(), "sd_version", json!(version)))
            .await;
        assert_leonardo_error(s, &e, StatusCode::UNPROCESSABLE_ENTITY, field);
    }
    // Beside a `modelId` (which makes it unused) too: the fuzzer's case.
    let (s, e) = server
        .leonardo(with(base(), "sd_version", json!("\u{19}0\u{bd}")))
        .await;
    assert_leonardo_error(s, &e, StatusCode::UNPROCESSABLE_ENTITY, "sd_version");
    let (s, e) = server.leonardo(with(base(), "width", json!("wide"))).await;
    assert_leonardo_error(s, &e, StatusCode::BAD_REQUEST, "width");
    // Nothing was accepted.
    let (_, list) = server.get("/v1/generations").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    // Auth and unknown ids answer in the same shape.
    let (s, _, e) = server.call_as(None, Method::POST, PATH, Some(base())).await;
    assert_leonardo_error(s, &e, StatusCode::UNAUTHORIZED, "");
    let (s, e) = server.get(&format!("{PATH}/nope")).await;
    assert_leonardo_error(s, &e, StatusCode::NOT_FOUND, "");
}

/// `sd_version` without `modelId` picks a configured model of that family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_version_maps_to_a_model_of_its_family() {
    let server = TestServer::new(|_| {}).await;
    for (version, model) in [
        ("v1_5", "tiny-sd15"),
        ("v2", "tiny-sd2-v"),
        ("SDXL_1_0", "tiny-sdxl"),
        ("FLUX", "tiny-flux-schnell"),
        ("FLUX_DEV", "tiny-flux-dev"),
    ] {
        let body = json!({"prompt": "a", "sd_version": version, "width": 64, "height": 64,
                          "num_images": 1, "num_inference_steps": 10});
        let (s, r) = server.leonardo(body).await;
        assert_eq!(s, StatusCode::OK, "{version}: {r}");
        let id = r["sdGenerationJob"]["generationId"].as_str().unwrap();
        let (_, job) = server.get(&format!("/v1/generations/{id}")).await;
        assert_eq!(
            job["images"][0]["requested"]["baseModel"], model,
            "{version}"
        );
        server.wait_done(id, 300).await;
    }
}

/// The Leonardo body gives the same pixels as the native request it stands
/// for (one definition per image with seeds `seed + i`, Leonardo's
/// scheduler name mapped), is billed per image, and reads back as `generations_by_pk`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixels_equal_the_native_request() {
    let server = TestServer::new(|_| {}).await;
    let (s, r) = server
        .leonardo(json!({
            "prompt": "a lighthouse", "negative_prompt": "fog", "modelId": "tiny-sd15",
            "width": 64, "height": 48, "num_images": 2, "num_inference_steps": 10,
            "guidance_scale": 6, "scheduler": "DDIM", "seed": 1234, "public": false,
        }))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["sdGenerationJob"]["apiCreditCost"], 2);
    let id = r["sdGenerationJob"]["generationId"]
        .as_str()
        .unwrap()
        .to_string();
    let leo = server.wait_done(&id, 300).await;
    assert_eq!(leo["status"], "succeeded", "{leo}");
    assert_eq!(leo["cost"]["inferences"], 2, "billed per image");
    let (s, native) = server
        .post(
            "/v1/generations",
            json!({"baseModel": "tiny-sd15", "prompt": "a lighthouse", "negativePrompt": "fog",
                   "width": 64, "height": 48, "steps": 10, "guidanceScale": 6,
                   "scheduler": "ddim", "images": [{"seed": 1234}, {"seed": 1235}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{native}");
    let native = server.wait_done(native["id"].as_str().unwrap(), 300).await;
    assert_eq!(server.pixels(&leo).await.len(), 2);
    assert!(
        server.pixels(&leo).await == server.pixels(&native).await,
        "same pixels"
    );

    let (s, got) = server.get(&format!("{PATH}/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{got}");
    let g = &got["generations_by_pk"];
    assert_eq!(g["id"], id.as_str());
    assert_eq!(g["status"], "COMPLETE");
    assert_eq!(g["prompt"], "a lighthouse");
    assert_eq!(g["modelId"], "tiny-sd15");
    assert_eq!(g["imageWidth"], 64);
    assert_eq!(g["imageHeight"], 48);
    assert_eq!(g["seed"], 1234);
    let images = g["generated_images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for image in images {
        assert_eq!(image["nsfw"], false);
        assert!(
            image["url"].as_str().unwrap().contains("/v1/files/"),
            "{image}"
        );
        assert!(image["id"].as_str().is_some());
    }
    // The job is a native job: listed with the others.
    let (_, list) = server.get("/v1/generations").await;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str() && j["source"] == "leonardo"));
}
