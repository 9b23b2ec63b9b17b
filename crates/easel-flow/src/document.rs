//! Flow documents: parsing JSON / JSON5 text into [`FlowDocument`].

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FlowError, ValidationError, ValidationErrors};
use crate::path::type_name;

/// What a failing step does to the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stop the flow: the run is `failed`, later steps are `skipped`. The default.
    #[default]
    Terminate,
    /// Record `{ "error": { "message": ... } }` as the step's result and go on.
    Continue,
}

impl OnFailure {
    /// The name written in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminate => "terminate",
            Self::Continue => "continue",
        }
    }
}

/// One step of a flow, as written (parameters unresolved).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    /// Unique in the flow: letters, digits, `_` and `-`. Later steps read
    /// the result as `$.results.<id>` (`$.results['my-id']` with a `-`).
    pub id: String,
    /// A step type known to the [`crate::StepRegistry`] (`ImageGenerator`, ...).
    #[serde(rename = "type")]
    pub step_type: String,
    /// The step's parameters: a JSON object that may hold references,
    /// templates and `@Map` items.
    pub parameters: Value,
    /// What a failure of this step does to the run: `terminate` or
    /// `continue` (the workflow builder's `Terminate Workflow` and
    /// `Continue` are accepted as the same).
    pub on_failure: OnFailure,
    /// A label for people (dashboards), not used by the engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A longer note for people, not used by the engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A flow: steps run in order, each seeing the input and earlier results.
///
/// Serializes as `{ "steps": [...] }` (with `name` / `description` when
/// set); deserializes with the same checks as [`FlowDocument::from_value`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct FlowDocument {
    /// A label for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A longer note for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The steps, in the order they run.
    pub steps: Vec<StepSpec>,
}

impl TryFrom<Value> for FlowDocument {
    type Error = ValidationErrors;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::from_value(&value)
    }
}

/// Parses JSON, or failing that JSON5 (unquoted keys, single quotes,
/// trailing commas, comments), into a JSON value.
pub fn parse_json_or_json5(text: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(value) => Ok(value),
        Err(_) => json5::from_str::<Value>(text).map_err(|e| e.to_string()),
    }
}

const DOCUMENT_FIELDS: [&str; 3] = ["steps", "name", "description"];
const STEP_FIELDS: [&str; 6] = [
    "id",
    "type",
    "parameters",
    "onFailure",
    "name",
    "description",
];

impl FlowDocument {
    /// Parses a flow from JSON or JSON5 text and checks its shape (fields,
    /// ids, `onFailure`). Step types and references are checked by
    /// [`crate::FlowRunner::validate`], which knows the registry.
    ///
    /// The text is `{ "steps": [ ... ] }` or just the array of steps.
    pub fn parse(text: &str) -> Result<Self, FlowError> {
        let value = parse_json_or_json5(text).map_err(FlowError::Parse)?;
        Ok(Self::from_value(&value)?)
    }

    /// A flow from a parsed JSON value (see [`Self::parse`]).
    pub fn from_value(value: &Value) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        let (steps_value, name, description) = match value {
            Value::Array(_) => (Some(value), None, None),
            Value::Object(map) => {
                for key in map.keys() {
                    if !DOCUMENT_FIELDS.contains(&key.as_str()) {
                        errors.push(ValidationError::in_document(
                            key.clone(),
                            unknown_field(key, &DOCUMENT_FIELDS, "a flow"),
                        ));
                    }
                }
                let name = optional_string(map, "name", None, &mut errors);
                let description = optional_string(map, "description", None, &mut errors);
                (map.get("steps"), name, description)
            }
            other => {
                return Err(ValidationErrors(vec![ValidationError::in_document(
                    "",
                    format!(
                    "a flow is an object `{{ \"steps\": [...] }}` (or an array of steps), not {}",
                    type_name(other)
                ),
                )]))
            }
        };
        let mut steps = Vec::new();
        match steps_value {
            None => errors.push(ValidationError::in_document(
                "steps",
                "missing: a flow has `steps`, an array of `{ id, type, parameters, onFailure }`",
            )),
            Some(Value::Array(items)) if items.is_empty() => errors.push(
                ValidationError::in_document("steps", "a flow needs at least one step"),
            ),
            Some(Value::Array(items)) => {
                let mut seen: HashMap<String, usize> = HashMap::new();
                for (index, item) in items.iter().enumerate() {
                    if let Some(step) = parse_step(index, item, &mut errors) {
                        if let Some(first) = seen.get(&step.id) {
                            errors.push(ValidationError::in_step(
                                index,
                                Some(&step.id),
                                "id",
                                format!("duplicate step id `{}` (also steps[{first}])", step.id),
                            ));
                        } else {
                            seen.insert(step.id.clone(), index);
                        }
                        steps.push(step);
                    }
                }
            }
            Some(other) => errors.push(ValidationError::in_document(
                "steps",
                format!("must be an array of steps, not {}", type_name(other)),
            )),
        }
        if errors.is_empty() {
            Ok(Self {
                name,
                description,
                steps,
            })
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The step with this id, and its index.
    pub fn step(&self, id: &str) -> Option<(usize, &StepSpec)> {
        self.steps.iter().enumerate().find(|(_, s)| s.id == id)
    }
}

fn parse_step(index: usize, item: &Value, errors: &mut Vec<ValidationError>) -> Option<StepSpec> {
    let Value::Object(map) = item else {
        errors.push(ValidationError::in_step(
            index,
            None,
            "",
            format!(
                "a step is an object `{{ id, type, parameters, onFailure }}`, not {}",
                type_name(item)
            ),
        ));
        return None;
    };
    let before = errors.len();
    let id = match map.get("id") {
        Some(Value::String(id)) if valid_id(id) => Some(id.clone()),
        Some(Value::String(id)) => {
            errors.push(ValidationError::in_step(
                index,
                None,
                "id",
                format!("`{id}` is not a valid step id: use letters, digits, `_` and `-` (like `promptsGenerator`)"),
            ));
            None
        }
        Some(other) => {
            errors.push(ValidationError::in_step(
                index,
                None,
                "id",
                format!("must be a string, not {}", type_name(other)),
            ));
            None
        }
        None => {
            errors.push(ValidationError::in_step(
                index,
                None,
                "id",
                "missing: every step has an `id`",
            ));
            None
        }
    };
    let id_ref = id.as_deref();
    for key in map.keys() {
        if !STEP_FIELDS.contains(&key.as_str()) {
            errors.push(ValidationError::in_step(
                index,
                id_ref,
                key.clone(),
                unknown_field(key, &STEP_FIELDS, "a step"),
            ));
        }
    }
    let step_type = match map.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
        Some(other) => {
            errors.push(ValidationError::in_step(
                index,
                id_ref,
                "type",
                format!("must be a step type name, not {}", short(other)),
            ));
            None
        }
        None => {
            errors.push(ValidationError::in_step(
                index,
                id_ref,
                "type",
                "missing: every step has a `type` (`ImageGenerator`, `ObjectGenerator`, ...)",
            ));
            None
        }
    };
    let parameters = match map.get("parameters") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            errors.push(ValidationError::in_step(
                index,
                id_ref,
                "parameters",
                format!("must be an object, not {}", type_name(other)),
            ));
            Value::Null
        }
    };
    let on_failure = match map.get("onFailure") {
        None | Some(Value::Null) => OnFailure::Terminate,
        // The workflow builder's labels ("When the step fails": Terminate
        // Workflow / Continue) are accepted as written.
        Some(Value::String(s)) if s == "terminate" || s == "Terminate Workflow" => {
            OnFailure::Terminate
        }
        Some(Value::String(s)) if s == "continue" || s == "Continue" => OnFailure::Continue,
        Some(other) => {
            errors.push(ValidationError::in_step(
                index,
                id_ref,
                "onFailure",
                format!(
                    "must be `terminate` (the default) or `continue` (also written \
                     `Terminate Workflow` / `Continue`), not {}",
                    short(other)
                ),
            ));
            OnFailure::Terminate
        }
    };
    let name = optional_string(map, "name", Some((index, id_ref)), errors);
    let description = optional_string(map, "description", Some((index, id_ref)), errors);
    if errors.len() > before {
        return None;
    }
    Some(StepSpec {
        id: id?,
        step_type: step_type?,
        parameters,
        on_failure,
        name,
        description,
    })
}

fn optional_string(
    map: &Map<String, Value>,
    key: &str,
    step: Option<(usize, Option<&str>)>,
    errors: &mut Vec<ValidationError>,
) -> Option<String> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            let message = format!("must be a string, not {}", type_name(other));
            errors.push(match step {
                Some((index, id)) => ValidationError::in_step(index, id, key, message),
                None => ValidationError::in_document(key, message),
            });
            None
        }
    }
}

/// Letters, digits, `_` and `-`, not empty.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn unknown_field(key: &str, known: &[&str], what: &str) -> String {
    let suggestion = known
        .iter()
        .find(|k| k.eq_ignore_ascii_case(key))
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    format!(
        "unknown field `{key}` ({what} has {}){suggestion}",
        known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A value for a message: strings quoted, others as JSON (cut short).
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_json5_literals() {
        let flow = FlowDocument::parse(
            "{ steps: [ { id: 'a', type: 'Constant', parameters: { value: [1, 2,], }, onFailure: 'continue', }, ], }",
        )
        .unwrap();
        assert_eq!(flow.steps.len(), 1);
        assert_eq!(flow.steps[0].parameters, json!({"value": [1, 2]}));
        assert_eq!(flow.steps[0].on_failure, OnFailure::Continue);
    }

    #[test]
    fn parses_plain_json_and_bare_step_arrays() {
        let flow = FlowDocument::parse(r#"[{"id": "a", "type": "Constant"}]"#).unwrap();
        assert_eq!(flow.steps[0].parameters, json!({}));
        assert_eq!(flow.steps[0].on_failure, OnFailure::Terminate);
    }

    #[test]
    fn reports_parse_errors_with_position() {
        let e = FlowDocument::parse("{ steps: [ { id: 'a' ").unwrap_err();
        assert!(matches!(e, FlowError::Parse(_)), "{e}");
    }

    #[test]
    fn duplicate_ids() {
        let e = FlowDocument::from_value(&json!({"steps": [
            {"id": "a", "type": "X"}, {"id": "b", "type": "X"}, {"id": "a", "type": "X"}
        ]}))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "steps[2] (a).id: duplicate step id `a` (also steps[0])"
        );
    }

    #[test]
    fn shape_errors_name_the_step_and_field() {
        let e = FlowDocument::from_value(&json!({"steps": [
            {"type": "X"},
            {"id": "b c", "type": "X"},
            {"id": "c", "type": 3, "parameters": [], "onFailure": "stop", "onfailure": "x"},
            "nope"
        ], "title": 1}))
        .unwrap_err();
        let lines: Vec<String> = e.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            [
                "title: unknown field `title` (a flow has `steps`, `name`, `description`)",
                "steps[0].id: missing: every step has an `id`",
                "steps[1].id: `b c` is not a valid step id: use letters, digits, `_` and `-` (like `promptsGenerator`)",
                "steps[2] (c).onfailure: unknown field `onfailure` (a step has `id`, `type`, `parameters`, `onFailure`, `name`, `description`); did you mean `onFailure`?",
                "steps[2] (c).type: must be a step type name, not 3",
                "steps[2] (c).parameters: must be an object, not an array",
                "steps[2] (c).onFailure: must be `terminate` (the default) or `continue` (also written `Terminate Workflow` / `Continue`), not \"stop\"",
                "steps[3]: a step is an object `{ id, type, parameters, onFailure }`, not a string",
            ]
        );
    }

    #[test]
    fn empty_and_missing_steps() {
        let e = FlowDocument::from_value(&json!({"steps": []})).unwrap_err();
        assert_eq!(e.to_string(), "steps: a flow needs at least one step");
        let e = FlowDocument::from_value(&json!({})).unwrap_err();
        assert!(e.to_string().starts_with("steps: missing"));
        let e = FlowDocument::from_value(&json!("x")).unwrap_err();
        assert!(e.to_string().starts_with("a flow is an object"));
    }

    #[test]
    fn serde_round_trip() {
        let flow = FlowDocument::parse(
            "{steps: [{id: 'a', type: 'Constant', parameters: {value: 1}, name: 'A'}]}",
        )
        .unwrap();
        let text = serde_json::to_string(&flow).unwrap();
        assert_eq!(
            text,
            r#"{"steps":[{"id":"a","type":"Constant","parameters":{"value":1},"onFailure":"terminate","name":"A"}]}"#
        );
        let back: FlowDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(back, flow);
        assert!(serde_json::from_str::<FlowDocument>(r#"{"steps": []}"#).is_err());
    }
}
