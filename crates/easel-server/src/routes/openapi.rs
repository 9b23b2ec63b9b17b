//! `/openapi.json`, generated from the handlers' annotations and the
//! request/response types, and `/docs`, a page that renders it (no
//! external scripts: it works offline).

use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use easel_core::params::{
    BATCH_SIZE_RANGE, DEFAULT_SIZE_MULTIPLE, GUIDANCE_SCALE_MAX, OUTPUT_QUALITY_RANGE,
    PROMPT_MAX_CHARS, SIZE_MAX, SIZE_MIN, STEPS_RANGE,
};
use easel_core::request::{
    ASPECT_RATIOS, LORA_SCALE_MAX, LORA_SCALE_MIN, MEGAPIXELS, WEBHOOK_EVENTS,
};
use easel_core::{ImageDefinition, LoraRef, OutputFormat};
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::openai::ImagesRequest;
use crate::error::{ErrorBody, ErrorDetail};
use crate::family_defaults::FamilyDefaults;
use crate::job::{ItemStatus, JobError, JobStatus, Progress, ResolvedLora, ResolvedParameters};
use crate::lora_list::LoraEntry;
use crate::models::ModelEntry;
use crate::views::{
    AssetRecord, Cost, GenerationRecord, GenerationRequestDoc, ImageResult, JobLinks, LedgerEntry,
    PackRecord, PackRequestDoc, TrainingRecord, UsageRecord,
};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `easel keys create`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "AUTOMATIC1111 routes (`/sdapi/...`) only: any user name, the API key as the password",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "easel",
        description = "Self-hosted image generation: durable jobs with asset records \
            (native API) and OpenAI Images compatibility. Errors are \
            `{\"error\": {\"code\", \"message\", \"field\"}}`; see docs/API.md."
    ),
    paths(
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::generations::create_generation,
        super::generations::list_generations,
        super::generations::get_generation,
        super::generations::cancel_generation,
        super::generations::generation_events,
        super::assets::list_assets,
        super::assets::get_asset,
        super::assets::delete_asset,
        super::assets::get_asset_file,
        super::assets::get_file,
        super::models::list_models,
        super::loras::list_loras,
        super::trainings::create_training,
        super::trainings::list_trainings,
        super::trainings::get_training,
        super::trainings::delete_training,
        super::packs::create_pack,
        super::packs::list_packs,
        super::packs::get_pack,
        super::packs::delete_pack,
        super::usage::get_usage,
        super::usage::get_ledger,
        super::openai::generations,
        super::openai::edits,
        super::leonardo::create_generation,
        super::leonardo::get_generation,
        super::serverless::generate,
        super::replicate::create_prediction,
        super::replicate::create_model_prediction,
        super::replicate::list_predictions,
        super::replicate::get_prediction,
        super::replicate::cancel_prediction,
        super::replicate::webhook_secret,
        super::flows::create_flow,
        super::flows::list_flows,
        super::flows::get_flow,
        super::flows::delete_flow,
        super::flows::create_run,
        super::flows::list_runs,
        super::flows::get_run,
        super::flows::cancel_run,
        super::flows::run_events,
        super::a1111::txt2img,
        super::a1111::img2img,
        super::a1111::sd_models,
        super::a1111::samplers,
        super::a1111::schedulers,
        super::a1111::loras,
        super::a1111::get_options,
        super::a1111::set_options,
        super::a1111::progress,
        super::a1111::interrupt,
        super::a1111::info::png_info,
        super::a1111::info::upscalers,
        super::a1111::info::scripts,
    ),
    components(schemas(
        GenerationRequestDoc, PackRequestDoc, ImageDefinition, LoraRef, GenerationRecord,
        ImageResult, AssetRecord, Cost, JobLinks, JobStatus, ItemStatus, JobError, Progress,
        ResolvedParameters, ResolvedLora, TrainingRecord, PackRecord, UsageRecord, ModelEntry,
        FamilyDefaults, LoraEntry, LedgerEntry,
        ErrorBody, ErrorDetail, ImagesRequest, super::flows::FlowRecord,
        super::a1111::docs::Txt2ImgRequest, super::a1111::docs::Img2ImgRequest,
        super::a1111::docs::ImagesResponse, super::a1111::docs::SdModel,
        super::a1111::docs::SamplerItem, super::a1111::docs::SchedulerItem,
        super::a1111::docs::LoraItem, super::a1111::docs::ProgressResponse,
        super::a1111::docs::HttpError, super::a1111::docs::ValidationError,
        super::a1111::docs::PngInfoRequest, super::a1111::docs::PngInfoResponse,
        super::a1111::docs::UpscalerItem, super::a1111::docs::ScriptsList,
        super::replicate::Prediction, super::replicate::PredictionRequest,
        super::replicate::PredictionPage, super::replicate::WebhookSigningSecret,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// `GET /openapi.json`: [`document`].
pub async fn openapi_json() -> Response {
    Json(document()).into_response()
}

/// The OpenAPI 3.1 document served at `/openapi.json`: what utoipa derives
/// from the handlers, completed where derivation cannot say enough, so that
/// client generators and fuzzers (schemathesis) can use it:
///
/// - the image fields get their ranges, enums and multiples from the
///   constants `easel-core` validates with ([`patch_image_definition`]);
/// - the request bodies that take image fields at the top level are written
///   out as plain objects (a flattened `allOf` of a closed object and
///   another object admits no value);
/// - every operation lists every error status it can answer, with the error
///   schema of its family (native or OpenAI) (`add_error_responses`).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let schemas = &mut doc["components"]["schemas"];
    patch_image_definition(&mut schemas["ImageDefinition"]);
    patch_lora_ref(&mut schemas["LoraRef"]);
    // POST /sdapi/v1/options answers null, as the web UI's does.
    doc["paths"]["/sdapi/v1/options"]["post"]["responses"]["200"]["content"] =
        json!({"application/json": {"schema": {"type": "null"}}});
    let schemas = &mut doc["components"]["schemas"];
    // The web UI's two error shapes (see error_shape::a1111_error_body).
    schemas["A1111ErrorBody"] = json!({
        "description": "An error of the AUTOMATIC1111 routes (`/sdapi/...`): FastAPI's \
            validation error `{detail: [{loc, msg, type}]}` for a field, else the web UI's \
            `{error, detail, body, errors}`.",
        "anyOf": [
            {"$ref": "#/components/schemas/HttpError"},
            {"$ref": "#/components/schemas/ValidationError"},
        ],
    });
    let image_props = schemas["ImageDefinition"]["properties"].clone();
    schemas["GenerationRequestDoc"] = request_body_schema(
        &image_props,
        "The body of `POST /v1/generations`: every image field may also be given at the \
         top level as a default for all images. `images` may be left out only with \
         `inferencePackId`.",
        json!({
            "images": {"type": "array", "items": {"$ref": "#/components/schemas/ImageDefinition"},
                "maxItems": 100,
                "description": "The image definitions (at least one, unless `inferencePackId` gives some)."},
            "inferencePackId": {"type": ["string", "null"],
                "description": "An inference pack whose definitions run first."},
            "webhook": {"type": ["string", "null"], "format": "uri",
                "description": "An http(s) URL to POST signed events to."},
            "webhookEvents": {"type": ["array", "null"],
                "items": {"type": "string", "enum": WEBHOOK_EVENTS},
                "description": "Events to send (default `completed`)."},
        }),
    );
    schemas["GenerationRequestDoc"]["anyOf"] = json!([
        {"required": ["images"], "properties": {"images": {"minItems": 1}}},
        {"required": ["inferencePackId"], "properties": {"inferencePackId": {"type": "string"}}},
    ]);
    schemas["PackRequestDoc"] = request_body_schema(
        &image_props,
        "The body of `POST /v1/inference-packs`: a name, image definitions, and \
         defaults for them (any image field at the top level).",
        json!({
            "name": {"type": "string", "minLength": 1, "pattern": "\\S",
                "description": "A label (not blank)."},
            "images": {"type": "array", "items": {"$ref": "#/components/schemas/ImageDefinition"},
                "minItems": 1, "maxItems": 100, "description": "The pack's image definitions."},
        }),
    );
    schemas["PackRequestDoc"]["required"] = json!(["name", "images"]);
    schemas["ErrorBody"] = json!({
        "type": "object", "required": ["error"], "additionalProperties": false,
        "description": "A native error: `code` is stable, `field` the request field at fault.",
        "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
    });
    schemas["ErrorDetail"] = json!({
        "type": "object", "required": ["code", "message", "field"],
        "properties": {
            "code": {"type": "string", "description": "Stable machine-readable code."},
            "message": {"type": "string", "description": "What is wrong and what is allowed."},
            "field": {"type": ["string", "null"], "description": "Path of the request field at fault (`images[2].width`), or null."},
        },
    });
    schemas["OpenAiErrorBody"] = json!({
        "type": "object", "required": ["error"],
        "description": "An error of the OpenAI-compatible routes, in OpenAI's shape.",
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": ["invalid_request_error", "insufficient_quota", "requests", "server_error"]},
                "param": {"type": ["string", "null"], "description": "The OpenAI parameter at fault, or null."},
                "code": {"type": ["string", "null"]},
                "field": {"type": ["string", "null"], "description": "easel: equal to `param`."},
            },
        }},
    });
    patch_images_request(&mut schemas["ImagesRequest"]);
    schemas["PredictionRequest"]["properties"]["input"] = super::replicate::input::input_schema();
    schemas["PredictionRequest"]["properties"]["webhook_events_filter"]["items"] =
        json!({"type": "string", "enum": ["start", "output", "logs", "completed"]});
    schemas["ReplicateErrorBody"] = json!({
        "type": "object", "required": ["title", "detail", "status"],
        "description": "An error of the Replicate-style routes: RFC 7807 problem details, \
            as Replicate answers them.",
        "properties": {
            "title": {"type": "string"},
            "detail": {"type": "string", "description": "What is wrong, starting with the field (`input.num_outputs: ...`)."},
            "status": {"type": "integer"},
            "invalid_fields": {"type": "array", "items": {"type": "object",
                "required": ["type", "field", "description"],
                "properties": {"type": {"type": "string"}, "field": {"type": "string"},
                    "description": {"type": "string"}}}},
        },
    });
    let paths = &mut doc["paths"];
    set_body(
        &mut paths["/v1/flows"]["post"],
        "application/json",
        json!({"anyOf": [
            {"type": "object", "required": ["steps"], "properties": {
                "name": {"type": "string"},
                "steps": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["id", "type"],
                    "properties": {"id": {"type": "string", "minLength": 1},
                        "type": {"type": "string", "minLength": 1},
                        "parameters": {"type": "object"},
                        "onFailure": {"type": "string"}}}}}},
            {"type": "object", "required": ["document"], "additionalProperties": false,
                "properties": {"document": {"type": "string",
                    "description": "The flow document as JSON or JSON5 text."}}},
        ]}),
    );
    set_body(
        &mut paths["/v1/flows/{id}/runs"]["post"],
        "application/json",
        json!({
        "type": "object", "additionalProperties": false,
        "properties": {"input": {"type": "object", "description": "`$.input` of the flow."}}}),
    );
    set_body(
        &mut paths["/v1/trainings"]["post"],
        "multipart/form-data",
        json!({
        "type": "object", "required": ["file", "baseModel"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream",
                "description": "The LoRA `.safetensors` file."},
            "baseModel": {"type": "string", "minLength": 1,
                "description": "The model it was trained on."},
            "name": {"type": "string"}},
        "additionalProperties": false}),
    );
    let mut edit_props = doc["components"]["schemas"]["ImagesRequest"]["properties"].clone();
    if let Some(props) = edit_props.as_object_mut() {
        // Form fields are text: no nulls.
        for prop in props.values_mut() {
            if let Some(types) = prop["type"].as_array() {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if kept.len() == 1 {
                    prop["type"] = kept[0].clone();
                }
            }
            if let Some(values) = prop.get_mut("enum").and_then(Value::as_array_mut) {
                values.retain(|v| !v.is_null());
            }
        }
        props.insert(
            "image".into(),
            json!({"type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "The PNG, JPEG or WebP image to edit."}),
        );
        props.insert(
            "mask".into(),
            json!({"type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "Optional: transparent (with alpha) or white (without) repaints."}),
        );
    }
    set_body(
        &mut doc["paths"]["/v1/images/edits"]["post"],
        "multipart/form-data",
        json!({
        "type": "object", "required": ["image", "prompt"], "properties": edit_props,
        "additionalProperties": false}),
    );
    super::leonardo::patch_openapi(&mut doc);
    super::serverless::patch_openapi(&mut doc);
    add_error_responses(&mut doc);
    doc
}

/// Replace the request body schema of `op` with `schema` under `content_type`.
fn set_body(op: &mut Value, content_type: &str, schema: Value) {
    if op.is_object() {
        let description = op["requestBody"]["description"].clone();
        op["requestBody"] =
            json!({"required": true, "content": {content_type: {"schema": schema}}});
        if description.is_string() {
            op["requestBody"]["description"] = description;
        }
    }
}

/// The OpenAI request fields' enums and ranges (as [`super::openai`] checks).
fn patch_images_request(schema: &mut Value) {
    let nullable_enum = |values: &[&str]| {
        let mut e: Vec<Value> = values.iter().map(|v| json!(v)).collect();
        e.push(Value::Null);
        json!({"type": ["string", "null"], "enum": e})
    };
    let p = &mut schema["properties"];
    p["prompt"] =
        json!({"type": "string", "maxLength": PROMPT_MAX_CHARS, "description": "What to draw."});
    p["n"] = json!({"type": ["integer", "null"], "minimum": 1, "maximum": 10,
        "description": "Images, 1..=10 (default 1)."});
    p["size"] = json!({"type": ["string", "null"], "pattern": "^(auto|[0-9]{1,4}[xX][0-9]{1,4})$",
        "description": "`WIDTHxHEIGHT` (each 8..=2048, a multiple of 8; 16 for FLUX) or `auto`."});
    p["response_format"] = nullable_enum(&["url", "b64_json"]);
    p["output_format"] = nullable_enum(&["png", "jpeg", "webp"]);
    p["output_compression"] = json!({"type": ["integer", "null"], "minimum": 0, "maximum": 100});
    p["background"] = nullable_enum(&["auto", "opaque"]);
    p["quality"] = nullable_enum(&["auto", "low", "medium", "high", "standard", "hd"]);
    p["moderation"] = nullable_enum(&["auto", "low"]);
    p["style"] = nullable_enum(&["vivid", "natural"]);
    p["input_fidelity"] = nullable_enum(&["low", "high"]);
    p["stream"] = json!({"type": ["boolean", "null"], "enum": [false, null],
        "description": "Streaming is not supported."});
    p["partial_images"] = json!({"type": ["integer", "null"], "enum": [0, null],
        "description": "Streaming is not supported."});
    schema["additionalProperties"] = json!(false);
}

/// Ranges, enums and multiples of the image fields, from the constants
/// `easel-core` validates with (`params.rs`, `request.rs`).
pub fn patch_image_definition(schema: &mut Value) {
    let ratios: Vec<&str> = ASPECT_RATIOS.iter().map(|(n, _)| *n).collect();
    let formats: Vec<&str> = OutputFormat::ALL.iter().map(|f| f.as_str()).collect();
    let p = &mut schema["properties"];
    let set = |v: &mut Value, extra: Value| {
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            for (k, e) in extra {
                v.insert(k.clone(), e.clone());
            }
        }
    };
    for text in ["prompt", "negativePrompt"] {
        set(&mut p[text], json!({"maxLength": PROMPT_MAX_CHARS}));
    }
    set(
        &mut p["steps"],
        json!({"minimum": *STEPS_RANGE.start(), "maximum": *STEPS_RANGE.end()}),
    );
    for side in ["width", "height"] {
        set(
            &mut p[side],
            json!({"minimum": SIZE_MIN, "maximum": SIZE_MAX,
            "multipleOf": DEFAULT_SIZE_MULTIPLE}),
        );
    }
    set(&mut p["aspectRatio"], json!({"enum": ratios}));
    set(&mut p["megapixels"], json!({"enum": MEGAPIXELS}));
    set(
        &mut p["guidanceScale"],
        json!({"minimum": 0.0, "maximum": GUIDANCE_SCALE_MAX}),
    );
    set(
        &mut p["scale"],
        json!({"minimum": LORA_SCALE_MIN, "maximum": LORA_SCALE_MAX}),
    );
    set(
        &mut p["batchSize"],
        json!({"minimum": *BATCH_SIZE_RANGE.start(), "maximum": *BATCH_SIZE_RANGE.end()}),
    );
    // 0 never leaves a denoising step on any model; the per-model rule
    // (Stable Diffusion: floor(steps x strength) >= 1) is checked before 202.
    set(
        &mut p["strength"],
        json!({"exclusiveMinimum": 0.0, "maximum": 1.0}),
    );
    set(
        &mut p["outputQuality"],
        json!({"minimum": *OUTPUT_QUALITY_RANGE.start(), "maximum": *OUTPUT_QUALITY_RANGE.end()}),
    );
    set(&mut p["seed"], json!({"minimum": 0, "maximum": u64::MAX}));
    // utoipa writes `format: int64` for a u64, which tools read as at most
    // 2^63 - 1; the server takes any u64.
    if let Some(seed) = p["seed"].as_object_mut() {
        seed.remove("format");
    }
    p["precision"] = json!({"type": ["string", "null"], "enum": ["fp16", "bf16", null],
        "description": "GPU compute dtype (default fp16); the CPU computes in f32."});
    let mut format_enum: Vec<Value> = formats.iter().map(|f| json!(f)).collect();
    format_enum.push(Value::Null);
    p["outputFormat"] = json!({"type": ["string", "null"], "enum": format_enum,
        "description": "Image format (default webp)."});
    if let Some(ratio_enum) = p["aspectRatio"]["enum"].as_array_mut() {
        ratio_enum.push(Value::Null);
    }
    if let Some(mp) = p["megapixels"]["enum"].as_array_mut() {
        mp.push(Value::Null);
    }
}

/// `LoraRef`: the scale range, and exactly one of `id`, `path`, `url` as a
/// string (a null one counts as absent, as the server reads it).
fn patch_lora_ref(schema: &mut Value) {
    if let Some(scale) = schema["properties"]["scale"].as_object_mut() {
        scale.insert("minimum".into(), json!(LORA_SCALE_MIN));
        scale.insert("maximum".into(), json!(LORA_SCALE_MAX));
    }
    schema["oneOf"] = json!(["id", "path", "url"]
        .iter()
        .map(|k| json!({"required": [k], "properties": {*k: {"type": "string"}}}))
        .collect::<Vec<_>>());
}

/// A closed object schema with the image fields and `extra` properties.
fn request_body_schema(image_props: &Value, description: &str, extra: Value) -> Value {
    let mut props = image_props.as_object().cloned().unwrap_or_default();
    if let Some(extra) = extra.as_object() {
        for (k, v) in extra {
            props.insert(k.clone(), v.clone());
        }
    }
    json!({"type": "object", "description": description, "properties": props,
        "additionalProperties": false})
}

/// The error statuses of one operation.
fn error_statuses(method: &str, path: &str, op: &Value) -> Vec<u16> {
    let mut codes = vec![];
    let has_params = op["parameters"].as_array().is_some_and(|p| !p.is_empty());
    let has_body = op.get("requestBody").is_some();
    if has_params || has_body {
        codes.push(400);
    }
    if op.get("security").is_some() {
        codes.push(401);
    }
    if path.contains('{') {
        codes.push(404);
    }
    if has_body {
        // 403: a model or LoRA path outside the model roots, wherever a
        // body can name one.
        codes.extend([403, 413, 422]);
        if op["requestBody"]["content"]
            .get("multipart/form-data")
            .is_some()
        {
            codes.push(415);
        }
    }
    let has_limit = op["parameters"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["name"] == "limit"));
    if has_limit {
        codes.push(422);
    }
    let submits = method == "post"
        && (path == "/v1/generations"
            || path.starts_with("/v1/images/")
            || path == "/api/rest/v1/generations"
            || path == crate::error_shape::SERVERLESS_PATH
            || path == "/v1/flows/{id}/runs"
            || super::replicate::is_replicate_path(path) && !path.ends_with("/cancel"));
    if submits {
        codes.extend([402, 403, 409, 429, 503]);
    }
    if path.starts_with("/sdapi/v1/") && method == "post" && path.ends_with("2img") {
        codes.extend([402, 403, 429, 500, 503, 504]);
    }
    if path == crate::error_shape::SERVERLESS_PATH {
        codes.push(504);
    }
    if path.starts_with("/v1/images/") {
        // OpenAI answers 400 where easel's native routes answer 422.
        codes.retain(|c| *c != 422);
        codes.extend([400, 504]);
    }
    codes.sort_unstable();
    codes.dedup();
    codes
}

fn error_description(code: u16) -> &'static str {
    match code {
        400 => "Malformed request: JSON, query string or a parameter of the wrong type",
        401 => "Missing, malformed or revoked API key",
        402 => "The key's credit limit is used up",
        403 => "A path outside the server's model roots",
        404 => "No such resource (or not this key's)",
        409 => "Conflict: an Idempotency-Key reused with another body, or the resource is finished",
        413 => "The body is larger than max_body_bytes",
        415 => "Not multipart/form-data",
        422 => "A field out of range or not allowed; `field` names it",
        429 => "Too many requests or the queue is full; see Retry-After",
        500 => "The generation failed",
        503 => "Shutting down or not ready; see Retry-After",
        504 => "The images were not ready within max_wait_seconds (the job goes on)",
        _ => "Error",
    }
}

/// Add every error status an operation can answer (see [`error_statuses`]),
/// with the native or OpenAI error schema; keeps what the handler declared.
fn add_error_responses(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let (schema, content_type) = match crate::error_shape::Shape::of(path) {
                crate::error_shape::Shape::OpenAi => ("OpenAiErrorBody", "application/json"),
                crate::error_shape::Shape::Leonardo => ("LeonardoErrorBody", "application/json"),
                crate::error_shape::Shape::Serverless => {
                    ("ServerlessErrorBody", "application/json")
                }
                crate::error_shape::Shape::A1111 => ("A1111ErrorBody", "application/json"),
                crate::error_shape::Shape::Replicate => {
                    ("ReplicateErrorBody", "application/problem+json")
                }
                crate::error_shape::Shape::Native => ("ErrorBody", "application/json"),
            };
            let error_content = json!({content_type: {"schema":
                {"$ref": format!("#/components/schemas/{schema}")}}});
            let codes = error_statuses(method, path, op);
            let responses = &mut op["responses"];
            for code in codes {
                let key = code.to_string();
                if responses.get(&key).is_none() {
                    responses[&key] = json!({"description": error_description(code)});
                }
                responses[&key]["content"] = error_content.clone();
            }
            // Declared errors of the family schema too (handlers wrote ErrorBody).
            if let Some(map) = responses.as_object_mut() {
                for (code, r) in map.iter_mut() {
                    if code.starts_with('4') || code.starts_with('5') {
                        r["content"] = error_content.clone();
                    }
                }
            }
        }
    }
}

/// `GET /docs`: the endpoints, their parameters and schemas, rendered in
/// the browser from `/openapi.json`.
pub async fn docs_page() -> Html<&'static str> {
    Html(DOCS_HTML)
}

const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>easel API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;border-radius:4px}
pre{padding:.6em;overflow:auto} .op{border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.2em .8em}
.m{display:inline-block;min-width:4.5em;font-weight:700;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.delete{color:#c33} .tag{margin-top:1.6em;border-bottom:2px solid #eee}
details summary{cursor:pointer}
</style></head><body>
<h1>easel API</h1>
<p>Generated from <a href="/openapi.json">/openapi.json</a>. Authenticate with
<code>Authorization: Bearer &lt;key&gt;</code> (<code>easel keys create</code>). Errors are
<code>{"error": {"code", "message", "field"}}</code>.</p>
<div id="out">Loading…</div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
  const out=document.getElementById('out'); out.textContent='';
  const esc=s=>String(s??'').replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));
  const byTag={};
  for(const [path,item] of Object.entries(doc.paths)){
    for(const [method,op] of Object.entries(item)){
      const tag=(op.tags||['other'])[0]; (byTag[tag]=byTag[tag]||[]).push([method,path,op]);
    }
  }
  for(const [tag,ops] of Object.entries(byTag)){
    const h=document.createElement('h2'); h.className='tag'; h.textContent=tag; out.appendChild(h);
    for(const [method,path,op] of ops){
      const d=document.createElement('div'); d.className='op';
      const params=(op.parameters||[]).map(p=>`<li><code>${esc(p.name)}</code> (${esc(p.in)}) ${esc(p.description)}</li>`).join('');
      const resp=Object.entries(op.responses||{}).map(([c,r])=>`<li><code>${c}</code> ${esc(r.description)}</li>`).join('');
      const body=op.requestBody?`<p>Body: ${esc(op.requestBody.description||Object.keys(op.requestBody.content||{}).join(', '))}</p>`:'';
      d.innerHTML=`<p><span class="m ${method}">${method}</span> <code>${esc(path)}</code> ${op.security?'🔑':''}</p>
        <p>${esc(op.description||op.summary||'')}</p>${body}
        ${params?`<p>Parameters:</p><ul>${params}</ul>`:''}<p>Responses:</p><ul>${resp}</ul>`;
      out.appendChild(d);
    }
  }
  const h=document.createElement('h2'); h.className='tag'; h.textContent='schemas'; out.appendChild(h);
  for(const [name,s] of Object.entries((doc.components||{}).schemas||{})){
    const d=document.createElement('details');
    d.innerHTML=`<summary><code>${esc(name)}</code> ${esc(s.description||'')}</summary><pre>${esc(JSON.stringify(s,null,2))}</pre>`;
    out.appendChild(d);
  }
}).catch(e=>{document.getElementById('out').textContent='Could not load /openapi.json: '+e});
</script></body></html>"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/generations",
            "/v1/generations/{id}",
            "/v1/generations/{id}/events",
            "/v1/generations/{id}/cancel",
            "/v1/assets",
            "/v1/assets/{id}",
            "/v1/models",
            "/v1/trainings",
            "/v1/trainings/{id}",
            "/v1/inference-packs",
            "/v1/inference-packs/{id}",
            "/v1/usage",
            "/v1/images/generations",
            "/v1/images/edits",
            "/v1/predictions",
            "/v1/predictions/{id}",
            "/v1/predictions/{id}/cancel",
            "/v1/models/{owner}/{name}/predictions",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let image = &schemas["ImageDefinition"]["properties"];
        assert!(image.get("guidanceScale").is_some(), "{image}");
        assert!(image.get("negativePrompt").is_some());
    }
}
