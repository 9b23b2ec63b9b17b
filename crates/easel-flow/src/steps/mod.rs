//! The built-in step types.
//!
//! | type | parameters | result |
//! | --- | --- | --- |
//! | `ImageGenerator` | the native generation request (`images`, `baseModel`, `trainingId`, `inferencePackId`, ...) | the array of asset records `{ id, file_url, file_name, file_size, file_type, job_id, ... }` |
//! | `ObjectGenerator` | `description`, `schema`, `input`, `amount`, `model`, `temperature` | the value filling `schema` |
//! | `Constant` | `value` | `value`, references resolved |
//! | `List` | `value` (must resolve to an array) | the array |
//! | `Template` | `template` (a string or any JSON with `{{ $... }}` pieces) | the rendered template |

mod basic;
mod image;
mod object;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use basic::{Constant, List, Template};
pub use image::{AssetRecord, ImageBackend, ImageGenerator, ImageJobResult, NoImageBackend};
pub use object::{ChatConfig, ObjectGenerator, ResponseFormat};

use crate::error::{ParamError, ParamPath};
use crate::path::type_name;
use crate::step::{is_dynamic, StepRegistry};

impl StepRegistry {
    /// `Constant`, `List` and `Template`: the steps that need no backend.
    pub fn with_basic_steps() -> Self {
        let mut registry = Self::new();
        registry
            .register("Constant", Constant)
            .register("List", List)
            .register("Template", Template);
        registry
    }

    /// Every built-in step: the basic ones, `ImageGenerator` on `backend`
    /// and `ObjectGenerator` on `chat` (without one it is still known, so
    /// flows load, but a run that uses it is refused with a clear message).
    pub fn standard(backend: Arc<dyn ImageBackend>, chat: Option<ChatConfig>) -> Self {
        let mut registry = Self::with_basic_steps();
        registry
            .register("ImageGenerator", ImageGenerator::new(backend))
            .register("ObjectGenerator", ObjectGenerator::new(chat));
        registry
    }
}

/// The parameters as an object (documents guarantee it; resolved values too).
pub(crate) fn object(parameters: &Value) -> Result<&Map<String, Value>, ParamError> {
    parameters.as_object().ok_or_else(|| {
        ParamError::new(
            ParamPath::root(),
            format!("must be an object, not {}", type_name(parameters)),
        )
    })
}

/// Errors for parameters this step type does not take.
pub(crate) fn unknown_parameters(
    map: &Map<String, Value>,
    known: &[&str],
    step_type: &str,
    errors: &mut Vec<ParamError>,
) {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            let suggestion = known
                .iter()
                .find(|k| k.eq_ignore_ascii_case(key))
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            errors.push(ParamError::new(
                ParamPath::root().key(key),
                format!(
                    "unknown parameter (`{step_type}` takes {}){suggestion}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
}

/// An error unless the literal value at `key` is a string (references pass).
pub(crate) fn expect_string(map: &Map<String, Value>, key: &str, errors: &mut Vec<ParamError>) {
    if let Some(value) = map.get(key) {
        if !value.is_string() && !is_dynamic(value) {
            errors.push(ParamError::new(
                ParamPath::root().key(key),
                format!("must be a string, not {}", type_name(value)),
            ));
        }
    }
}

fn finish(errors: Vec<ParamError>) -> Result<(), Vec<ParamError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
