//! The `input` of a Replicate prediction, translated into a native request.
//!
//! The fields, ranges and defaults are those of the flux-dev-lora input
//! schema (Replicate's model page, "Input schema"); [`FIELDS`] is the table
//! (name, type, range, default, what it maps to) that `docs/API.md` prints
//! and the tests walk. A value out of range, of the wrong type, or a field
//! not in the table is refused (422, naming `input.<field>` and the allowed
//! values); nothing is clamped. Accepted fields that change nothing in
//! easel (`disable_safety_checker`, an unused `width`) say so in `logs`.

use easel_core::{ImageDefinition, LoraRef, NativeRequest, OutputFormat};
use serde_json::{Map, Value};

use crate::replicate_error::ReplicateError;
use crate::AppState;

/// One input field: its name, JSON type, range, default and the native
/// field it becomes.
#[derive(Debug, Clone, Copy)]
pub struct FieldDoc {
    /// The input field name.
    pub name: &'static str,
    /// `string`, `integer`, `number`, `boolean`, or `enum` (a string of
    /// the listed values).
    pub kind: &'static str,
    /// The allowed range or values, as documented.
    pub range: &'static str,
    /// The default when absent (`-` = none).
    pub default: &'static str,
    /// What it maps to in the native request.
    pub maps_to: &'static str,
}

const fn f(
    name: &'static str,
    kind: &'static str,
    range: &'static str,
    default: &'static str,
    maps_to: &'static str,
) -> FieldDoc {
    FieldDoc {
        name,
        kind,
        range,
        default,
        maps_to,
    }
}

/// Every accepted input field (the flux-dev-lora schema plus its LoRA
/// inputs `lora_weights` / `hf_lora`).
pub const FIELDS: &[FieldDoc] = &[
    f("prompt", "string", "required", "-", "prompt"),
    f(
        "image",
        "string",
        "URL, data: URI, base64 or asset id",
        "-",
        "image (img2img; size fields ignored)",
    ),
    f(
        "mask",
        "string",
        "same forms as image; needs image",
        "-",
        "mask (white repaints)",
    ),
    f(
        "aspect_ratio",
        "enum",
        "1:1, 16:9, 21:9, 3:2, 2:3, 4:5, 5:4, 3:4, 4:3, 9:16, 9:21, custom",
        "1:1",
        "aspectRatio (+ megapixels), or width/height when custom",
    ),
    f(
        "height",
        "integer",
        "256..1440, rounded to the nearest multiple of 16",
        "-",
        "height (only with aspect_ratio custom)",
    ),
    f(
        "width",
        "integer",
        "256..1440, rounded to the nearest multiple of 16",
        "-",
        "width (only with aspect_ratio custom)",
    ),
    f(
        "prompt_strength",
        "number",
        "0..1",
        "0.8",
        "strength (img2img / inpainting)",
    ),
    f(
        "model",
        "enum",
        "dev, schnell",
        "dev",
        "baseModel (see model mapping)",
    ),
    f(
        "num_outputs",
        "integer",
        "1..4",
        "1",
        "one image definition per output, seeds seed, seed+1, ...",
    ),
    f(
        "num_inference_steps",
        "integer",
        "1..50",
        "28 (dev), 4 (schnell)",
        "steps",
    ),
    f("guidance_scale", "number", "0..10", "3", "guidanceScale"),
    f("seed", "integer", "0..2^63", "random below 2^32", "seed"),
    f(
        "output_format",
        "enum",
        "webp, jpg, png",
        "webp",
        "outputFormat",
    ),
    f(
        "output_quality",
        "integer",
        "0..100",
        "80",
        "outputQuality (0 becomes 1)",
    ),
    f(
        "disable_safety_checker",
        "boolean",
        "true, false",
        "false",
        "accepted; easel runs no safety checker",
    ),
    f(
        "go_fast",
        "boolean",
        "true, false",
        "false",
        "a quantized registry entry of the same model, else a warning in logs",
    ),
    f("megapixels", "enum", "1, 0.25", "1", "megapixels"),
    f(
        "lora_weights",
        "string",
        "LoRA reference",
        "-",
        "loras[0] (id, path or url)",
    ),
    f(
        "hf_lora",
        "string",
        "LoRA reference",
        "-",
        "loras[0] (alias of lora_weights)",
    ),
    f("lora_scale", "number", "-1..3", "1", "loras[0].scale"),
    f(
        "extra_lora",
        "string",
        "LoRA reference",
        "-",
        "loras[1] (id, path or url)",
    ),
    f("extra_lora_scale", "number", "-1..3", "1", "loras[1].scale"),
];

/// The native request an input translates to, with what the prediction's
/// `logs` say about it.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The native request (one image definition per output).
    pub request: NativeRequest,
    /// Lines for `logs`: the model used, the seed, fields that had no effect.
    pub logs: Vec<String>,
    /// The easel model that runs (the prediction's `version`).
    pub model: String,
}

/// Which model a prediction names before `input.model` is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The flux-dev-lora model: `input.model` (dev / schnell, default
    /// `default`) picks the configured model.
    Flux {
        /// The variant when `input.model` is absent.
        default: &'static str,
    },
    /// An easel model reference (a registry name or a cached repo id).
    Easel(String),
}

fn invalid(field: &str, detail: impl Into<String>) -> ReplicateError {
    ReplicateError::invalid(&format!("input.{field}"), detail)
}

/// Replicate model-name prefixes (lower case) that take the FLUX mapping
/// (`input.model`), with the model they default to: `flux-dev-lora`,
/// `flux.1-schnell`, ...
const REPLICATE_FLUX_NAMES: [(&str, &str); 4] = [
    ("flux-dev", "dev"),
    ("flux.1-dev", "dev"),
    ("flux-schnell", "schnell"),
    ("flux.1-schnell", "schnell"),
];

/// Resolve the route's `{owner}/{name}` (or a `version` of the form
/// `owner/name[:id]`): `flux-dev*` and `flux-schnell*` names are the FLUX
/// mapping; else `name` when it is a registry name or a model of
/// `GET /v1/models`; else `owner/name` when it resolves as a Hugging Face
/// repo id (in the hub cache).
///
/// # Errors
/// 404 when neither names a model easel knows.
pub fn route_target(state: &AppState, owner: &str, name: &str) -> Result<Target, ReplicateError> {
    let lower = name.to_ascii_lowercase();
    if let Some((_, default)) = REPLICATE_FLUX_NAMES
        .iter()
        .find(|(prefix, _)| lower.starts_with(prefix))
    {
        return Ok(Target::Flux { default });
    }
    let listed = state.config().models.contains_key(name)
        || state.models().list(&[]).iter().any(|m| m.id == name);
    if listed {
        return Ok(Target::Easel(name.to_string()));
    }
    let repo = format!("{owner}/{name}");
    if crate::models::is_repo_id(&repo) && state.models().resolve(&repo).is_ok() {
        return Ok(Target::Easel(repo));
    }
    Err(ReplicateError::new(
        axum::http::StatusCode::NOT_FOUND,
        "Not found",
        format!(
            "model `{owner}/{name}` is not known here: use a model name from GET /v1/models \
             (as /v1/models/easel/NAME/predictions), or flux-dev / flux-schnell"
        ),
    ))
}

/// The configured model for `variant` (`dev` or `schnell`): the registry
/// or model-folder name `flux-VARIANT` (or `flux.1-VARIANT`,
/// case-insensitive) if there is one, else the first (alphabetically) whose
/// name ends with it (`tiny-flux-dev`), else `default_model` (said in
/// `logs`).
fn flux_model(
    state: &AppState,
    variant: &str,
    logs: &mut Vec<String>,
) -> Result<String, ReplicateError> {
    let wanted = [format!("flux-{variant}"), format!("flux.1-{variant}")];
    let mut names: Vec<String> = state.models().list(&[]).into_iter().map(|m| m.id).collect();
    names.sort();
    let lower = |n: &str| n.to_ascii_lowercase();
    let exact = names.iter().find(|n| wanted.iter().any(|w| lower(n) == *w));
    let suffix = names
        .iter()
        .find(|n| wanted.iter().any(|w| lower(n).ends_with(&format!("-{w}"))));
    if let Some(name) = exact.or(suffix) {
        return Ok(name.clone());
    }
    match &state.config().default_model {
        Some(m) => {
            logs.push(format!(
                "warning: no model named flux-{variant} (or ending in -flux-{variant}) is \
                 configured; running default_model `{m}`"
            ));
            Ok(m.clone())
        }
        None => Err(invalid(
            "model",
            format!(
                "no model named flux-{variant} is configured and this server has no \
                 default_model; add one to the model registry"
            ),
        )),
    }
}

/// A registry entry that loads the same model as `name` quantized (its
/// `quantize` set), or `name` itself when it is quantized.
fn quantized_twin(state: &AppState, name: &str) -> Option<String> {
    let models = &state.config().models;
    let entry = models.get(name)?;
    if entry.quantize().is_some() {
        return Some(name.to_string());
    }
    models
        .iter()
        .find(|(n, t)| t.target() == entry.target() && t.quantize().is_some() && *n != name)
        .map(|(n, _)| n.clone())
}

struct Reader<'a> {
    input: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.input.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, ReplicateError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(name, format!("expected a string, got {other}"))),
        }
    }

    fn choice(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, ReplicateError> {
        let value = match self.get(name) {
            // `megapixels` is a string enum; a number is accepted too.
            Some(Value::Number(n)) if name == "megapixels" => Some(n.to_string()),
            _ => self.string(name)?,
        };
        match value {
            Some(v) if !allowed.contains(&v.as_str()) => Err(invalid(
                name,
                format!("`{v}` is not allowed (allowed: {})", allowed.join(", ")),
            )),
            v => Ok(v),
        }
    }

    fn integer(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ReplicateError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let n = v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e18)
                    .map(|x| x as i64)
            })
            .ok_or_else(|| invalid(name, format!("expected an integer, got {v}")))?;
        if n < min || n > max {
            return Err(invalid(
                name,
                format!("{n} is out of range (allowed: {min} to {max})"),
            ));
        }
        Ok(Some(n))
    }

    fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ReplicateError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v
            .as_f64()
            .ok_or_else(|| invalid(name, format!("expected a number, got {v}")))?;
        if !(min..=max).contains(&x) {
            return Err(invalid(
                name,
                format!("{x} is out of range (allowed: {min} to {max})"),
            ));
        }
        Ok(Some(x))
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ReplicateError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(invalid(
                name,
                format!("expected true or false, got {other}"),
            )),
        }
    }
}

/// A LoRA reference of `lora_weights` / `extra_lora` as a native `loras`
/// entry: a training id (UUID) is `id`; `huggingface.co/ORG/NAME[/FILE]`
/// (with or without `https://`) and `ORG/NAME[/FILE.safetensors]` are a
/// Hugging Face repo `url`; another `http(s)` URL is `url` (a
/// `.safetensors` file); an absolute path or a bare name is `path` (a file
/// under the model roots, or a LoRA of a model folder by name).
/// CivitAI model pages are refused (they are not files).
fn lora_ref(field: &str, reference: &str, scale: f64) -> Result<LoraRef, ReplicateError> {
    let r = reference.trim();
    let stripped = r
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_start_matches("www.");
    let mut lora = LoraRef {
        scale: Some(scale),
        ..LoraRef::default()
    };
    if r.is_empty() {
        return Err(invalid(
            field,
            "is empty: give a LoRA reference or leave it out",
        ));
    }
    if stripped.starts_with("civitai.com/") {
        return Err(invalid(
            field,
            "CivitAI model pages are not supported: give the .safetensors file's URL, a \
             Hugging Face repo (ORG/NAME) or a LoRA name from GET /v1/loras",
        ));
    }
    if crate::util::is_uuid(r) {
        lora.id = Some(r.to_string());
    } else if r.starts_with('/') {
        lora.path = Some(r.to_string());
    } else if let Some(repo) = stripped.strip_prefix("huggingface.co/") {
        lora.url = Some(repo.trim_end_matches('/').to_string());
    } else if r.starts_with("http://") || r.starts_with("https://") || r.contains('/') {
        lora.url = Some(r.to_string());
    } else {
        lora.path = Some(r.to_string());
    }
    Ok(lora)
}

/// Nearest multiple of 16 (halves round up), as the schema documents.
fn round16(n: i64) -> u32 {
    (((n + 8) / 16) * 16) as u32
}

/// Translate `input` for `target` (see the module docs and [`FIELDS`]).
///
/// # Errors
/// A 422 [`ReplicateError`] naming `input.<field>` for a missing prompt, an
/// unknown field, a wrong type or a value out of range.
pub fn translate(
    state: &AppState,
    target: &Target,
    input: &Map<String, Value>,
) -> Result<Translated, ReplicateError> {
    if let Some(unknown) = input.keys().find(|k| !FIELDS.iter().any(|f| f.name == *k)) {
        let allowed: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        return Err(invalid(
            unknown,
            format!("unknown input field (allowed: {})", allowed.join(", ")),
        ));
    }
    let r = Reader { input };
    let mut logs = Vec::new();
    let prompt = r
        .string("prompt")?
        .ok_or_else(|| invalid("prompt", "missing: every prediction needs a prompt"))?;
    let image = r.string("image")?;
    let mask = r.string("mask")?;
    if mask.is_some() && image.is_none() {
        return Err(invalid("mask", "needs `image` (the image to inpaint)"));
    }
    let ratios: Vec<&str> = easel_core::request::ASPECT_RATIOS
        .iter()
        .map(|(n, _)| *n)
        .chain(["custom"])
        .collect();
    let aspect_ratio = r.choice("aspect_ratio", &ratios)?;
    let height = r.integer("height", 256, 1440)?;
    let width = r.integer("width", 256, 1440)?;
    let strength = r.number("prompt_strength", 0.0, 1.0)?;
    let variant = r.choice("model", &["dev", "schnell"])?;
    let num_outputs = r.integer("num_outputs", 1, 4)?.unwrap_or(1) as u32;
    let steps = r.integer("num_inference_steps", 1, 50)?;
    let guidance = r.number("guidance_scale", 0.0, 10.0)?.unwrap_or(3.0);
    let seed = r.integer("seed", 0, i64::MAX)?;
    let format = r.choice("output_format", &["webp", "jpg", "png"])?;
    let quality = r.integer("output_quality", 0, 100)?.unwrap_or(80) as u32;
    r.boolean("disable_safety_checker")?;
    let go_fast = r.boolean("go_fast")?.unwrap_or(false);
    let megapixels = r.choice("megapixels", &["1", "0.25"])?;
    let lora_weights = r.string("lora_weights")?;
    let hf_lora = r.string("hf_lora")?;
    let lora_scale = r.number("lora_scale", -1.0, 3.0)?.unwrap_or(1.0);
    let extra_lora = r.string("extra_lora")?;
    let extra_lora_scale = r.number("extra_lora_scale", -1.0, 3.0)?.unwrap_or(1.0);

    // The model.
    let (mut model, variant) = match target {
        Target::Flux { default } => {
            let v = variant.as_deref().unwrap_or(default).to_string();
            (flux_model(state, &v, &mut logs)?, Some(v))
        }
        Target::Easel(name) => {
            if let Some(v) = &variant {
                logs.push(format!(
                    "input.model `{v}` has no effect: this prediction runs `{name}`"
                ));
            }
            (name.clone(), None)
        }
    };
    if go_fast {
        match quantized_twin(state, &model) {
            Some(q) => model = q,
            None => logs.push(format!(
                "warning: go_fast: the model registry has no quantized entry of `{model}` (an \
                 entry with the same path and `quantize` set); ran it unquantized"
            )),
        }
    }
    logs.push(format!("Using model: {model}"));
    let steps = steps.unwrap_or(if variant.as_deref() == Some("schnell") {
        4
    } else {
        28
    }) as u32;

    // The size.
    let mut definition = ImageDefinition::default();
    if image.is_some() {
        for field in ["aspect_ratio", "width", "height", "megapixels"] {
            if r.get(field).is_some() {
                logs.push(format!(
                    "input.{field} is ignored: the size is the input image's"
                ));
            }
        }
    } else if aspect_ratio.as_deref() == Some("custom") {
        let (Some(w), Some(h)) = (width, height) else {
            let missing = if width.is_none() { "width" } else { "height" };
            return Err(invalid(
                missing,
                "missing: aspect_ratio `custom` needs width and height (256 to 1440)",
            ));
        };
        definition.width = Some(round16(w));
        definition.height = Some(round16(h));
        if r.get("megapixels").is_some() {
            logs.push("input.megapixels is ignored with aspect_ratio custom".into());
        }
    } else {
        for field in ["width", "height"] {
            if r.get(field).is_some() {
                logs.push(format!(
                    "input.{field} is ignored: it only applies with aspect_ratio custom"
                ));
            }
        }
        definition.aspect_ratio = Some(aspect_ratio.unwrap_or_else(|| "1:1".into()));
        definition.megapixels = Some(match megapixels.as_deref() {
            Some("0.25") => 0.25,
            _ => 1.0,
        });
    }

    // LoRAs.
    let mut loras = Vec::new();
    let main = match (lora_weights, hf_lora) {
        (Some(_), Some(_)) => {
            return Err(invalid("hf_lora", "give lora_weights or hf_lora, not both"))
        }
        (Some(l), None) => Some(("lora_weights", l)),
        (None, Some(l)) => Some(("hf_lora", l)),
        (None, None) => None,
    };
    if let Some((field, reference)) = main {
        loras.push(lora_ref(field, &reference, lora_scale)?);
    }
    if let Some(reference) = extra_lora {
        loras.push(lora_ref("extra_lora", &reference, extra_lora_scale)?);
    }

    let seed = match seed {
        Some(s) => s as u64,
        None => u64::from(rand::random::<u32>()),
    };
    logs.push(format!("Using seed: {seed}"));
    let format: OutputFormat = format
        .as_deref()
        .unwrap_or("webp")
        .parse()
        .map_err(|e| invalid("output_format", format!("{e}")))?;
    let strength = match (&image, strength) {
        (Some(_), s) => Some(s.unwrap_or(easel_core::request::DEFAULT_STRENGTH)),
        (None, Some(_)) => {
            logs.push("input.prompt_strength is ignored without an input image".into());
            None
        }
        (None, None) => None,
    };
    let defaults = ImageDefinition {
        prompt: Some(prompt),
        base_model: Some(model.clone()),
        loras: (!loras.is_empty()).then_some(loras),
        steps: Some(steps),
        guidance_scale: Some(guidance),
        image,
        mask,
        strength,
        output_format: Some(format),
        output_quality: Some(quality.max(1)),
        ..definition
    };
    // One definition per output: billed per image, seeds seed, seed+1, ...
    let images = (0..u64::from(num_outputs))
        .map(|i| ImageDefinition {
            seed: Some(seed + i),
            ..ImageDefinition::default()
        })
        .collect();
    Ok(Translated {
        request: NativeRequest {
            defaults,
            images,
            ..NativeRequest::default()
        },
        logs,
        model,
    })
}

/// The JSON schema of `input` (for the OpenAPI document): the [`FIELDS`]
/// with their types, ranges and enums; closed (`additionalProperties`
/// false); `prompt` required.
pub fn input_schema() -> Value {
    let ratios: Vec<&str> = easel_core::request::ASPECT_RATIOS
        .iter()
        .map(|(n, _)| *n)
        .chain(["custom"])
        .collect();
    let mut props = Map::new();
    for field in FIELDS {
        let description = format!(
            "{} Default: {}. Maps to: {}.",
            field.range, field.default, field.maps_to
        );
        let schema = match field.name {
            "aspect_ratio" => serde_json::json!({"type": "string", "enum": ratios}),
            "model" => serde_json::json!({"type": "string", "enum": ["dev", "schnell"]}),
            "output_format" => {
                serde_json::json!({"type": "string", "enum": ["webp", "jpg", "png"]})
            }
            "megapixels" => serde_json::json!({"type": "string", "enum": ["1", "0.25"]}),
            "height" | "width" => {
                serde_json::json!({"type": "integer", "minimum": 256, "maximum": 1440})
            }
            "prompt_strength" => serde_json::json!({"type": "number", "minimum": 0, "maximum": 1}),
            "num_outputs" => serde_json::json!({"type": "integer", "minimum": 1, "maximum": 4}),
            "num_inference_steps" => {
                serde_json::json!({"type": "integer", "minimum": 1, "maximum": 50})
            }
            "guidance_scale" => serde_json::json!({"type": "number", "minimum": 0, "maximum": 10}),
            "seed" => serde_json::json!({"type": "integer", "minimum": 0, "maximum": i64::MAX}),
            "output_quality" => {
                serde_json::json!({"type": "integer", "minimum": 0, "maximum": 100})
            }
            "lora_scale" | "extra_lora_scale" => {
                serde_json::json!({"type": "number", "minimum": -1, "maximum": 3})
            }
            "disable_safety_checker" | "go_fast" => serde_json::json!({"type": "boolean"}),
            _ => serde_json::json!({"type": "string"}),
        };
        let mut schema = schema;
        if field.name != "prompt" {
            // Replicate's clients send `null` for a field left at its
            // default, and `get` reads it so: every optional field is
            // nullable (an enum lists `null` too).
            let ty = schema["type"].clone();
            schema["type"] = serde_json::json!([ty, "null"]);
            if let Some(values) = schema.get_mut("enum").and_then(Value::as_array_mut) {
                values.push(Value::Null);
            }
        }
        schema["description"] = Value::String(description);
        props.insert(field.name.into(), schema);
    }
    serde_json::json!({"type": "object", "required": ["prompt"], "properties": props,
        "additionalProperties": false,
        "description": "The flux-dev-lora input (docs/API.md, Replicate-style predictions)."})
}
