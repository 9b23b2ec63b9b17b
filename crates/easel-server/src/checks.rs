//! The engine's own rules, applied before a job is accepted.
//!
//! Everything the worker would refuse and that can be known from the
//! request, the model's family and its config files is checked here,
//! by calling the same engine functions the pipelines call when they run
//! (`easel_diffusion`): the inputs a model family takes
//! ([`easel_diffusion::pipelines::check_inputs_for_family`]), the mask's
//! aspect ratio ([`easel_diffusion::image_processor::check_mask_shape`]),
//! whether `strength` leaves a denoising step
//! ([`easel_diffusion::pipelines::init_image::strength_start_step`]), the
//! scheduler's family ([`easel_diffusion::schedulers::check_scheduler_for`])
//! and whether a LoRA file is one ([`easel_diffusion::lora::check_lora_file`]).
//! [`crate::submit::prepare`] calls these for the native, OpenAI and flow
//! routes, and [`crate::flows`] for the static parameters of a flow document.

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use easel_core::ImageDefinition;
use easel_diffusion::loader::ModelFamily;
use easel_diffusion::pipelines::init_image::{strength_start_step, StrengthRule};
use easel_diffusion::schedulers::{self, SchedulerFamily};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::job::ModelSpec;
use crate::models::{ModelRefError, ModelRegistry};

/// The message of an engine error, without the field the API error names
/// separately (`InvalidArgument`'s `field: ` prefix).
pub fn engine_message(e: &easel_diffusion::Error) -> String {
    match e {
        easel_diffusion::Error::InvalidArgument { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A 422 `invalid_value` for `field` carrying the engine's message.
fn invalid(field: String, e: &easel_diffusion::Error) -> ApiError {
    ApiError::invalid("invalid_value", field, engine_message(e))
}

/// The scheduler family of `model`: from its `scheduler/scheduler_config.json`
/// when the model is a local folder (the config the worker will read), else
/// from its model family; `None` when neither says (the fake engine, or a
/// repo not downloaded yet).
fn model_family(model: &ModelSpec) -> Option<(SchedulerFamily, String)> {
    let config_path = Path::new(&model.load).join("scheduler/scheduler_config.json");
    if let Ok(text) = std::fs::read_to_string(&config_path) {
        if let Ok(config) = serde_json::from_str::<serde_json::Value>(&text) {
            let label = config
                .get("_class_name")
                .and_then(|c| c.as_str())
                .unwrap_or("(no _class_name)")
                .to_string();
            return Some((schedulers::config_family(&config), label));
        }
    }
    let family = model.family()?;
    let class = model.pipeline_class.clone().unwrap_or_default();
    Some((family.scheduler_family(), class))
}

/// Check `scheduler` (a name the request gives) against `model`'s family.
///
/// # Errors
/// 422 `invalid_value` for `field`: an unknown scheduler name, or one of the
/// other family, listing the schedulers that fit.
pub fn check_scheduler(
    name: &str,
    model: Option<&ModelSpec>,
    field: String,
) -> Result<(), ApiError> {
    let result = match model.and_then(model_family) {
        Some((family, label)) => schedulers::check_scheduler_for(name, family, &label),
        None => schedulers::resolve_scheduler_name(name).map(|_| ()),
    };
    result.map_err(|e| invalid(field, &e))
}

/// Check a merged image definition against its model, given whether it has
/// an init image and a mask: the model family must take those inputs, and
/// `strength` must leave a denoising step with the family's rule and steps
/// (the definition's `steps`, else the family's default). `field` turns a
/// field name into its path. (`strength` without `image` is refused by
/// [`ImageDefinition::validate`].)
///
/// # Errors
/// The first problem, as a 422 `invalid_value` naming the field.
pub fn check_definition(
    def: &ImageDefinition,
    model: &ModelSpec,
    has_image: bool,
    has_mask: bool,
    field: &dyn Fn(&str) -> String,
) -> Result<(), ApiError> {
    let family = model.family();
    easel_diffusion::pipelines::check_inputs_for_family(family, has_image, has_mask).map_err(
        |e| match &e {
            easel_diffusion::Error::InvalidArgument { field: f, .. } => invalid(field(f), &e),
            _ => invalid(field("baseModel"), &e),
        },
    )?;
    if has_image {
        let default_strength = family.map_or(
            easel_core::request::DEFAULT_STRENGTH,
            ModelFamily::default_strength,
        );
        let strength = def.strength.unwrap_or(default_strength);
        // Unknown classes (the fake engine) get the rule that refuses only
        // what every pipeline refuses (strength 0).
        let rule = family.map_or(StrengthRule::Fractional, ModelFamily::strength_rule);
        // FLUX without steps: its rule does not depend on them.
        let steps = def
            .steps
            .map(|s| s as usize)
            .or_else(|| family.and_then(ModelFamily::default_steps))
            .unwrap_or(*easel_core::params::STEPS_RANGE.end() as usize);
        strength_start_step(rule, steps, strength).map_err(|e| {
            let f = if def.strength.is_some() {
                "strength"
            } else {
                "steps"
            };
            invalid(field(f), &e)
        })?;
    }
    Ok(())
}

/// Check that a mask of `mask` pixels `(width, height)` fits an init image
/// of `image` pixels (the same aspect ratio within 1 %, as the engine
/// requires).
///
/// # Errors
/// 422 `invalid_value` for `field`.
pub fn check_mask_shape(
    mask: (u32, u32),
    image: (u32, u32),
    field: String,
) -> Result<(), ApiError> {
    easel_diffusion::image_processor::check_mask_shape(
        (mask.0 as usize, mask.1 as usize),
        (image.0 as usize, image.1 as usize),
    )
    .map_err(|e| invalid(field, &e))
}

/// Check that the file at `path` is a LoRA of a layout the engine reads,
/// from its safetensors header only (a few kilobytes are read).
///
/// # Errors
/// 422 `invalid_value` for `field`, with the engine's reason.
pub fn check_lora(path: &Path, field: String) -> Result<(), ApiError> {
    easel_diffusion::lora::check_lora_file(path).map_err(|e| invalid(field, &e))
}

/// Resolve a `loras[].path` under the model roots (or, for a bare file name
/// that is no file here, the LoRA of that name in the roots' A1111 /
/// ComfyUI `Lora` / `loras` folders) and check it is a LoRA `.safetensors`
/// file; returns its canonical path.
///
/// # Errors
/// 403 `path_not_allowed` outside the roots, 422 `unknown_model` when
/// nothing is there (or a name is ambiguous), 422 `invalid_value` for
/// another kind of file.
pub fn lora_path(registry: &ModelRegistry, path: &str, field: String) -> Result<PathBuf, ApiError> {
    let by_name = if !path.contains(['/', '\\']) && !Path::new(path).exists() {
        registry
            .lora_by_name(path)
            .map_err(|e| model_error(e, field.clone()))?
    } else {
        None
    };
    let path = by_name
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| path.to_string());
    let path = path.as_str();
    let canonical = registry
        .check_path(path)
        .map_err(|e| model_error(e, field.clone()))?;
    if !canonical.is_file() || canonical.extension().is_none_or(|e| e != "safetensors") {
        return Err(ApiError::invalid(
            "invalid_value",
            field,
            format!("`{path}` is not a .safetensors file"),
        ));
    }
    check_lora(&canonical, field)?;
    Ok(canonical)
}

/// The keys of an image definition whose dynamic value stands for a given
/// one: replaced by a placeholder so that rules about their presence
/// (`strength` needs `image`, a mask needs a Fill model) still apply.
const PRESENCE_KEYS: [&str; 3] = ["prompt", "image", "mask"];

/// `definition` with its dynamic values (references, templates, `@Map`)
/// removed, or replaced by a placeholder for [`PRESENCE_KEYS`].
fn static_part(definition: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in definition {
        let dynamic = easel_flow::is_dynamic(value)
            || (key == "loras"
                && value.as_array().is_some_and(|l| {
                    l.iter().any(|v| {
                        easel_flow::is_dynamic(v)
                            || v.as_object()
                                .is_some_and(|o| o.values().any(easel_flow::is_dynamic))
                    })
                }));
        if !dynamic {
            out.insert(key.clone(), value.clone());
        } else if PRESENCE_KEYS.contains(&key.as_str()) {
            out.insert(key.clone(), Value::from("(given at run time)"));
        }
    }
    out
}

/// Check the static parameters of a flow's `ImageGenerator` step with the
/// rules of a generation request (see [`crate::submit::prepare`]): types and
/// ranges, the model (path roots), the model's size multiple, the scheduler
/// and its family, LoRA paths and files, and the inputs the model takes.
/// Dynamic values are skipped; a definition whose `baseModel` is dynamic
/// gets the checks that need no model. Trainings, inference packs and image
/// inputs are looked up when the step runs.
///
/// # Errors
/// The first problem, as an [`ApiError`] whose field is the parameter path
/// inside the step (`images[0].width`).
pub fn check_flow_request(registry: &ModelRegistry, parameters: &Value) -> Result<(), ApiError> {
    let Some(map) = parameters.as_object() else {
        return Ok(());
    };
    let mut top = static_part(map);
    let images: Vec<Value> = match map.get("images") {
        Some(v @ Value::Array(items)) if !easel_flow::is_dynamic(v) => items
            .iter()
            .filter_map(|i| match i {
                Value::Object(o) => Some(Value::Object(static_part(o))),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let has_images = !images.is_empty();
    // No static definition: check the defaults on their own.
    let images = if has_images {
        images
    } else {
        vec![serde_json::json!({"prompt": "(given at run time)"})]
    };
    let pack = top.contains_key("inferencePackId") || map.contains_key("inferencePackId");
    top.remove("inferencePackId");
    top.insert("images".into(), Value::Array(images));
    let request =
        easel_core::NativeRequest::from_json(Value::Object(top)).map_err(ApiError::from)?;
    let model_dynamic = map.get("baseModel").is_some_and(easel_flow::is_dynamic);
    for (i, (prefix, mut def)) in request.merged_images().into_iter().enumerate() {
        let field = |name: &str| format!("{prefix}.{name}");
        let item_model_dynamic = match parameters["images"].get(i) {
            Some(item) if has_images => item
                .get("baseModel")
                .map_or(model_dynamic, easel_flow::is_dynamic),
            _ => model_dynamic,
        };
        def.prompt
            .get_or_insert_with(|| "(given at run time)".into());
        let options = easel_core::ValidateOptions::default().field_prefix(prefix.clone());
        let Some(reference) = def.base_model.clone() else {
            if item_model_dynamic || pack {
                def.base_model = Some("(given at run time)".into());
            }
            def.validate(&options)?;
            continue;
        };
        let model = registry
            .resolve(&reference)
            .map_err(|e| model_error(e, field("baseModel")))?;
        let multiple = ModelRegistry::size_multiple(model.family());
        def.validate(&options.size_multiple(multiple))?;
        if let Some(name) = &def.scheduler {
            check_scheduler(name, Some(&model), field("scheduler"))?;
        }
        for (j, lora) in def.loras.iter().flatten().enumerate() {
            if let Some(path) = &lora.path {
                lora_path(registry, path, field(&format!("loras[{j}].path")))?;
            }
        }
        check_definition(
            &def,
            &model,
            def.image.is_some(),
            def.mask.is_some(),
            &field,
        )?;
    }
    Ok(())
}

/// A model reference error as the API error for `field` (403
/// `path_not_allowed` or 422 `unknown_model`).
pub(crate) fn model_error(e: ModelRefError, field: String) -> ApiError {
    match e {
        ModelRefError::NotAllowed(m) => {
            ApiError::new(StatusCode::FORBIDDEN, "path_not_allowed", m).with_field(field)
        }
        ModelRefError::Unknown(m) => ApiError::invalid("unknown_model", field, m),
    }
}
