//! `ImageGeneration`: the workflow builder's Image Generation step (the
//! seed document's "Configure a workflow step that generates one or more
//! images and returns uploaded asset records"), a thin translation into
//! the native request that `ImageGenerator` submits: ONE job of the run's
//! key through [`crate::flows::ServerImageBackend`] (same validation,
//! queue, per-image credit and worker as `POST /v1/generations`,
//! `source: flow`; the job is in `GET /v1/generations` and the web UI).
//!
//! Parameters ([`PARAMETERS`]; every one may also be a reference
//! `'$.input.x'`, checked when the step runs):
//!
//! | parameter | values | default | native request |
//! | --- | --- | --- | --- |
//! | `prompt` | text with `{{ }}` variables ([`crate::flows::variables`]); required | | `images[i].prompt` |
//! | `size` | [`SIZE_TILES`]: `auto`, `1024x1024`, `1536x1024`, `1024x1536` | `auto` | `width`/`height` (`auto`: the model's native size) |
//! | `count` | 1..=10 | 1 | that many image definitions |
//! | `quality` | [`QUALITIES`]: `auto`, `low`, `medium`, `high` | `auto` | accepted, no effect |
//! | `background` | `auto`, `opaque` ([`BACKGROUNDS`]); `transparent` refused | `auto` | no effect |
//! | `moderation` | [`MODERATIONS`]: `auto`, `low` | `auto` | accepted, no effect (easel runs no moderation) |
//! | `outputFormat` | [`OUTPUT_FORMATS`]: `png`, `jpeg`, `webp` | `png` | `outputFormat` |
//! | `outputCompression` | 0..=100 | 100 | `outputQuality` (0 → 1) for jpeg / webp; ignored for png |
//! | `chargeType` | [`CHARGE_TYPES`]: `hosted`, `personal` | `hosted` | accepted, no effect: billed to the run's key |
//! | `model` (easel) | a model reference | `default_model` | `baseModel` |
//! | `seed` (easel) | integer | random | `images[i].seed` = `seed + i` |
//!
//! Choice values match case-insensitively (`PNG`, `Transparent`). The
//! step's label is its `name` and "When the step fails" its `onFailure`
//! (`Terminate Workflow` / `Continue`), beside `parameters`.
//!
//! The result is the array of the job's asset records, the shape of
//! `GET /v1/assets` (`id`, `object`, `file_url`, `file_name`, `file_size`,
//! `file_type`, `width`, `height`, `seed`, `generation_id`, ...); the job
//! id is also the step record's `jobId`.

use std::sync::Arc;

use easel_flow::{
    is_dynamic, ImageBackend, ParamError, ParamPath, Step, StepContext, StepError, StepOutput,
};
use serde_json::{json, Map, Value};

use crate::flows::variables::translate_text;

/// The step type's name in flow documents.
pub const STEP_TYPE: &str = "ImageGeneration";

/// The parameters the step takes.
pub const PARAMETERS: [&str; 11] = [
    "prompt",
    "size",
    "count",
    "quality",
    "background",
    "moderation",
    "outputFormat",
    "outputCompression",
    "chargeType",
    "model",
    "seed",
];

/// The size tiles and the width/height each asks for (`None`: the
/// model's native size).
pub const SIZE_TILES: [(&str, Option<(u32, u32)>); 4] = [
    ("auto", None),
    ("1024x1024", Some((1024, 1024))),
    ("1536x1024", Some((1536, 1024))),
    ("1024x1536", Some((1024, 1536))),
];
/// `quality` values (accepted, no effect).
pub const QUALITIES: [&str; 4] = ["auto", "low", "medium", "high"];
/// `background` values easel draws (`transparent` is refused).
pub const BACKGROUNDS: [&str; 2] = ["auto", "opaque"];
/// `moderation` values (accepted, no effect).
pub const MODERATIONS: [&str; 2] = ["auto", "low"];
/// `outputFormat` values.
pub const OUTPUT_FORMATS: [&str; 3] = ["png", "jpeg", "webp"];
/// `chargeType` values (accepted, no effect).
pub const CHARGE_TYPES: [&str; 2] = ["hosted", "personal"];
/// The largest `count`.
pub const COUNT_MAX: u64 = 10;

/// The step type (see the module docs).
pub struct ImageGeneration {
    backend: Arc<dyn ImageBackend>,
    default_model: Option<String>,
}

impl ImageGeneration {
    /// The step on `backend`, with the server's `default_model` for steps
    /// that give no `model`.
    pub fn new(backend: Arc<dyn ImageBackend>, default_model: Option<String>) -> Self {
        Self {
            backend,
            default_model,
        }
    }
}

/// Whether a value is left for run time: only while validating a document.
fn deferred(value: &Value, lenient: bool) -> bool {
    lenient && is_dynamic(value)
}

fn path(key: &str) -> ParamPath {
    ParamPath::root().key(key)
}

/// A choice parameter: its canonical value, or an error listing the allowed ones.
fn choice(
    map: &Map<String, Value>,
    key: &str,
    allowed: &[&'static str],
    lenient: bool,
    errors: &mut Vec<ParamError>,
) -> &'static str {
    let default = allowed[0];
    let value = match map.get(key) {
        None | Some(Value::Null) => return default,
        Some(v) if deferred(v, lenient) => return default,
        Some(v) => v,
    };
    let list = allowed.join(", ");
    match value.as_str() {
        Some(text) => {
            let wanted = text.trim();
            if let Some(found) = allowed.iter().find(|a| a.eq_ignore_ascii_case(wanted)) {
                return found;
            }
            let message = if key == "background" && wanted.eq_ignore_ascii_case("transparent") {
                format!(
                    "`transparent` is not supported: diffusion models draw no alpha channel \
                     (allowed: {list})"
                )
            } else {
                format!("unknown {key} `{text}` (allowed: {list})")
            };
            errors.push(ParamError::new(path(key), message));
        }
        None => errors.push(ParamError::new(
            path(key),
            format!("must be a string, one of: {list}; not {value}"),
        )),
    }
    default
}

/// An integer parameter in `range`, or an error naming the range.
fn integer(
    map: &Map<String, Value>,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
    lenient: bool,
    errors: &mut Vec<ParamError>,
) -> Option<u64> {
    let value = match map.get(key) {
        None | Some(Value::Null) => return None,
        Some(v) if deferred(v, lenient) => return None,
        Some(v) => v,
    };
    match value.as_u64().filter(|n| range.contains(n)) {
        Some(n) => Some(n),
        None => {
            errors.push(ParamError::new(
                path(key),
                format!(
                    "must be an integer from {} to {}, not {value}",
                    range.start(),
                    range.end()
                ),
            ));
            None
        }
    }
}

/// Translates the step's parameters into the native generation request
/// (see the module docs' table).
///
/// `lenient` is for validating a document: values that are references are
/// left out (a reference `model` or `prompt` is passed through as written,
/// for [`ImageBackend::check_static`] to skip). When running, parameters
/// are resolved and `lenient` is false.
///
/// # Errors
/// Every parameter that is wrong, each naming it and the allowed values.
pub fn native_request(
    parameters: &Value,
    default_model: Option<&str>,
    lenient: bool,
) -> Result<Value, Vec<ParamError>> {
    let Some(map) = parameters.as_object() else {
        return Err(vec![ParamError::new(
            ParamPath::root(),
            "must be an object with a `prompt`",
        )]);
    };
    let mut errors = Vec::new();
    for key in map.keys() {
        if PARAMETERS.contains(&key.as_str()) {
            continue;
        }
        let hint = match key.as_str() {
            "name" | "onFailure" => {
                format!("; `{key}` is the step's own field, written beside `parameters`")
            }
            _ => PARAMETERS
                .iter()
                .find(|p| p.eq_ignore_ascii_case(key))
                .map(|p| format!("; did you mean `{p}`?"))
                .unwrap_or_default(),
        };
        errors.push(ParamError::new(
            path(key),
            format!(
                "unknown parameter (`{STEP_TYPE}` takes {}){hint}",
                PARAMETERS.join(", ")
            ),
        ));
    }
    let prompt = match map.get("prompt") {
        None | Some(Value::Null) => {
            errors.push(ParamError::new(
                path("prompt"),
                "missing: the step needs a `prompt` (text; `{{ name }}` inserts a flow input)",
            ));
            Value::Null
        }
        Some(v @ Value::String(text)) => {
            if let Err(e) = translate_text(text) {
                errors.push(ParamError::new(path("prompt"), e));
            } else if text.trim().is_empty() {
                errors.push(ParamError::new(path("prompt"), "must not be empty"));
            }
            v.clone()
        }
        Some(v) if deferred(v, lenient) => v.clone(),
        Some(v) => {
            errors.push(ParamError::new(
                path("prompt"),
                format!("must be a string, not {v}"),
            ));
            Value::Null
        }
    };
    let tiles: Vec<&'static str> = SIZE_TILES.iter().map(|(name, _)| *name).collect();
    let tile = choice(map, "size", &tiles, lenient, &mut errors);
    let size = SIZE_TILES
        .iter()
        .find(|(name, _)| *name == tile)
        .and_then(|(_, size)| *size);
    let count = integer(map, "count", 1..=COUNT_MAX, lenient, &mut errors).unwrap_or(1);
    choice(map, "quality", &QUALITIES, lenient, &mut errors);
    choice(map, "background", &BACKGROUNDS, lenient, &mut errors);
    choice(map, "moderation", &MODERATIONS, lenient, &mut errors);
    choice(map, "chargeType", &CHARGE_TYPES, lenient, &mut errors);
    let format = choice(map, "outputFormat", &OUTPUT_FORMATS, lenient, &mut errors);
    let compression = integer(map, "outputCompression", 0..=100, lenient, &mut errors);
    let seed = match map.get("seed") {
        Some(v) if deferred(v, lenient) => Some(v.clone()),
        _ => integer(map, "seed", 0..=u64::from(u32::MAX), lenient, &mut errors).map(Value::from),
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => match default_model {
            Some(m) => Value::from(m),
            None => {
                errors.push(ParamError::new(
                    path("model"),
                    "missing: this server has no default_model; give `model` (an easel \
                     model: GET /v1/models lists them) or set default_model in the config",
                ));
                Value::Null
            }
        },
        Some(v @ Value::String(m)) if !m.trim().is_empty() => v.clone(),
        Some(v) if deferred(v, lenient) => v.clone(),
        Some(v) => {
            errors.push(ParamError::new(
                path("model"),
                format!("must be a model name or path (GET /v1/models lists them), not {v}"),
            ));
            Value::Null
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let images: Vec<Value> = (0..count)
        .map(|i| {
            let mut image = json!({ "prompt": prompt });
            match &seed {
                Some(Value::Number(n)) => {
                    let s = n.as_u64().unwrap_or(0).saturating_add(i);
                    image["seed"] = Value::from(s);
                }
                Some(dynamic) if i == 0 => image["seed"] = dynamic.clone(),
                _ => {}
            }
            image
        })
        .collect();
    let mut request = json!({
        "baseModel": model,
        "outputFormat": format,
        "images": images,
    });
    if format != "png" {
        request["outputQuality"] = Value::from(compression.unwrap_or(100).max(1));
    }
    if let Some((width, height)) = size {
        request["width"] = Value::from(width);
        request["height"] = Value::from(height);
    }
    Ok(request)
}

/// The step parameter a native request field comes from
/// (`images[0].width` → `size`); `None` for fields the step does not set.
pub fn step_field(native: &str) -> Option<&'static str> {
    let last = native.rsplit('.').next().unwrap_or(native);
    let last = last.split('[').next().unwrap_or(last);
    Some(match last {
        "baseModel" | "model" => "model",
        "width" | "height" | "aspectRatio" | "megapixels" => "size",
        "outputFormat" => "outputFormat",
        "outputQuality" => "outputCompression",
        "seed" => "seed",
        "prompt" => "prompt",
        "images" | "batchSize" => "count",
        _ => return None,
    })
}

/// A backend error (`parameters.images[0].width: ...`, or a job's error
/// `job <id> failed: parameters.baseModel: ...`) in the step's words.
fn rename_fields(message: &str) -> String {
    let Some(at) = message.find("parameters.") else {
        return message.to_string();
    };
    let rest = &message[at + "parameters.".len()..];
    let Some(colon) = rest.find(':') else {
        return message.to_string();
    };
    match step_field(&rest[..colon]) {
        Some(field) => format!("{}parameters.{field}{}", &message[..at], &rest[colon..]),
        None => message.to_string(),
    }
}

impl Step for ImageGeneration {
    fn translate(&self, parameters: &Value) -> Option<Value> {
        let text = parameters.get("prompt")?.as_str()?;
        let rewritten = translate_text(text).ok()??;
        let mut out = parameters.clone();
        out["prompt"] = Value::String(rewritten);
        Some(out)
    }

    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let request = native_request(parameters, self.default_model.as_deref(), true)?;
        let errors: Vec<ParamError> = self
            .backend
            .check_static(&request)
            .into_iter()
            .map(|e| {
                let native = e.path.as_str().trim_start_matches("parameters.");
                match step_field(native) {
                    Some(field) => ParamError::new(path(field), e.message),
                    None => e,
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn preflight(&self, _parameters: &Value) -> Result<(), String> {
        self.backend.available()
    }

    fn run(&self, parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let request = native_request(&parameters, self.default_model.as_deref(), false).map_err(
            |errors| {
                StepError::failed(
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            },
        )?;
        if ctx.is_canceled() {
            return Err(StepError::canceled());
        }
        let job = self.backend.generate(request, ctx).map_err(|e| StepError {
            canceled: e.canceled,
            message: rename_fields(&e.message),
        })?;
        let assets = job
            .assets
            .into_iter()
            .map(|asset| serde_json::to_value(asset).unwrap_or(Value::Null))
            .collect();
        Ok(StepOutput {
            result: Value::Array(assets),
            job_id: Some(job.job_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_name_the_step_parameter() {
        assert_eq!(
            rename_fields("parameters.images[0].width: 1001 is not a multiple of 8"),
            "parameters.size: 1001 is not a multiple of 8"
        );
        assert_eq!(
            rename_fields("job j1 failed: parameters.baseModel: no model `x`"),
            "job j1 failed: parameters.model: no model `x`"
        );
        assert_eq!(rename_fields("job store: gone"), "job store: gone");
        assert_eq!(rename_fields("parameters.loras: x"), "parameters.loras: x");
    }
}
