//! Steps that need no backend: `Constant`, `List`, `Template`.

use serde_json::Value;

use super::{finish, object, unknown_parameters};
use crate::error::{ParamError, ParamPath};
use crate::path::type_name;
use crate::step::{is_dynamic, Step, StepContext, StepError, StepOutput};

/// `Constant`: returns its `value` parameter, references resolved.
///
/// `{ id: 'settings', type: 'Constant', parameters: { value: { steps: 30, model: '$.input.model' } } }`
#[derive(Debug, Clone, Copy, Default)]
pub struct Constant;

impl Step for Constant {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let map = object(parameters).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        unknown_parameters(map, &["value"], "Constant", &mut errors);
        if !map.contains_key("value") {
            errors.push(ParamError::new(
                ParamPath::root().key("value"),
                "missing: `Constant` returns its `value`",
            ));
        }
        finish(errors)
    }

    fn run(&self, mut parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        Ok(parameters
            .get_mut("value")
            .map(Value::take)
            .unwrap_or(Value::Null)
            .into())
    }
}

/// `List`: returns its `value` parameter, which must be (or resolve to) an
/// array: a list to `@Map` over without an LLM.
///
/// `{ id: 'subjects', type: 'List', parameters: { value: ['a fox', 'an owl', '$.input.extra'] } }`
#[derive(Debug, Clone, Copy, Default)]
pub struct List;

impl Step for List {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let map = object(parameters).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        unknown_parameters(map, &["value"], "List", &mut errors);
        match map.get("value") {
            None => errors.push(ParamError::new(
                ParamPath::root().key("value"),
                "missing: `List` returns its `value`, an array",
            )),
            Some(v) if !v.is_array() && !is_dynamic(v) => errors.push(ParamError::new(
                ParamPath::root().key("value"),
                format!("must be an array, not {}", type_name(v)),
            )),
            Some(_) => {}
        }
        finish(errors)
    }

    fn run(&self, mut parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        match parameters.get_mut("value").map(Value::take) {
            Some(array @ Value::Array(_)) => Ok(array.into()),
            Some(other) => Err(StepError::failed(format!(
                "parameters.value: `List` returns an array, but this resolved to {}",
                type_name(&other)
            ))),
            None => Err(StepError::failed("parameters.value: missing")),
        }
    }
}

/// `Template`: renders `template`, a string with `{{ $... }}` pieces or any
/// JSON value holding such strings, references and `@Map` items.
///
/// `{ id: 'caption', type: 'Template', parameters: { template: 'A {{ $.input.style }} photo of {{ $.input.subject }}' } }`
#[derive(Debug, Clone, Copy, Default)]
pub struct Template;

impl Step for Template {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let map = object(parameters).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        unknown_parameters(map, &["template"], "Template", &mut errors);
        if !map.contains_key("template") {
            errors.push(ParamError::new(
                ParamPath::root().key("template"),
                "missing: `Template` renders its `template`",
            ));
        }
        finish(errors)
    }

    fn run(&self, mut parameters: Value, _ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        Ok(parameters
            .get_mut("template")
            .map(Value::take)
            .unwrap_or(Value::Null)
            .into())
    }
}
