//! Static checks of a flow against a registry (and, when known, the input),
//! before anything runs.
//!
//! For every step: its type is registered; the type's own
//! [`crate::Step::validate`] accepts the parameters; every reference and
//! (in the parameters as [`crate::Step::translate`] rewrites them)
//! `@Map` path is a valid JSONPath query; `$$` appears only inside `@Map`
//! templates; references start at `$.input` or `$.results` (or are
//! whole-scope queries such as `$..id`); a `$.results.<id>` reference names
//! a step that exists and runs earlier. With the input known, a singular
//! `$.input...` reference must select something, and a `@Map` over the
//! input must select an array. References into results are checked for
//! shape only when the step runs.

use std::collections::HashMap;

use serde_json::Value;

use crate::document::FlowDocument;
use crate::error::{ParamPath, ValidationError, ValidationErrors};
use crate::path::{classify, type_name, Piece, Reference, Root, Text};
use crate::resolve::{map_pair, map_pair_shape, misplaced_map, nothing_selected};
use crate::step::StepRegistry;

/// Checks `flow` against `registry`, and against `input` when given (see
/// the module docs). All errors are reported, in document order.
pub fn validate_flow(
    flow: &FlowDocument,
    registry: &StepRegistry,
    input: Option<&Value>,
) -> Result<(), ValidationErrors> {
    let positions: HashMap<&str, usize> = flow
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let ids: Vec<&str> = flow.steps.iter().map(|s| s.id.as_str()).collect();
    let scope_input = input.map(|input| crate::resolve::scope(input, Default::default()));
    let mut errors = Vec::new();
    for (index, step) in flow.steps.iter().enumerate() {
        let mut check = Checker {
            index,
            id: &step.id,
            positions: &positions,
            ids: &ids,
            scope: scope_input.as_ref(),
            errors: &mut errors,
        };
        let kind = registry.get(&step.step_type);
        let translated = kind.and_then(|k| k.translate(&step.parameters));
        check.walk(
            translated.as_ref().unwrap_or(&step.parameters),
            &ParamPath::root(),
            0,
        );
        match kind {
            None => {
                let known: Vec<&str> = registry.names().collect();
                errors.push(ValidationError::in_step(
                    index,
                    Some(&step.id),
                    "type",
                    format!(
                        "unknown step type `{}` (known: {})",
                        step.step_type,
                        known.join(", ")
                    ),
                ));
            }
            Some(kind) => {
                if let Err(param_errors) = kind.validate(&step.parameters) {
                    for e in param_errors {
                        errors.push(ValidationError::in_step(
                            index,
                            Some(&step.id),
                            e.path.as_str(),
                            e.message,
                        ));
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

struct Checker<'a> {
    index: usize,
    id: &'a str,
    positions: &'a HashMap<&'a str, usize>,
    ids: &'a [&'a str],
    scope: Option<&'a Value>,
    errors: &'a mut Vec<ValidationError>,
}

impl Checker<'_> {
    fn error(&mut self, path: &ParamPath, message: impl Into<String>) {
        self.errors.push(ValidationError::in_step(
            self.index,
            Some(self.id),
            path.as_str(),
            message,
        ));
    }

    fn walk(&mut self, value: &Value, path: &ParamPath, depth: usize) {
        match value {
            Value::String(s) => match classify(s) {
                Err(message) => self.error(path, message),
                Ok(Text::Literal(_)) => {}
                Ok(Text::Reference(r)) => self.reference(&r, path, depth, false),
                Ok(Text::Template(pieces)) => {
                    for piece in pieces {
                        if let Piece::Reference(r) = piece {
                            self.reference(&r, path, depth, false);
                        }
                    }
                }
                Ok(Text::Map(_)) => self.error(path, misplaced_map()),
            },
            Value::Array(items) => {
                if map_pair(items).is_some() {
                    self.map(items, path, depth);
                    return;
                }
                for (i, item) in items.iter().enumerate() {
                    let item_path = path.index(i);
                    match item {
                        Value::Array(inner) if map_pair(inner).is_some() => {
                            self.map(inner, &item_path, depth)
                        }
                        _ => self.walk(item, &item_path, depth),
                    }
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    self.walk(item, &path.key(key), depth);
                }
            }
            _ => {}
        }
    }

    fn map(&mut self, items: &[Value], path: &ParamPath, depth: usize) {
        if items.len() != 2 {
            self.error(path, map_pair_shape(items.len()));
            return;
        }
        let Value::String(directive) = &items[0] else {
            return;
        };
        match classify(directive) {
            Err(message) => self.error(path, message),
            Ok(Text::Map(r)) => self.reference(&r, path, depth, true),
            Ok(_) => self.error(path, "@Map path is malformed"),
        }
        self.walk(&items[1], &path.index(1), depth + 1);
    }

    fn reference(&mut self, r: &Reference, path: &ParamPath, depth: usize, is_map: bool) {
        let what = if is_map { "@Map path" } else { "reference" };
        if r.root() == Root::Element {
            if depth == 0 {
                self.error(
                    path,
                    format!(
                        "{what} `{}`: `$$` is only meaningful inside a @Map template",
                        r.text()
                    ),
                );
            }
            return;
        }
        let names = r.leading_names();
        match names.first().map(String::as_str) {
            None => {}
            Some("input") => {
                if let Some(scope) = self.scope {
                    match r.select(scope) {
                        None => self.error(path, nothing_selected(r, scope)),
                        Some(value) if is_map && !value.is_array() => self.error(
                            path,
                            format!(
                                "@Map path `{}` selects {} in the input, not an array",
                                r.text(),
                                type_name(&value)
                            ),
                        ),
                        Some(_) => {}
                    }
                }
            }
            Some("results") => {
                let Some(step) = names.get(1) else {
                    return;
                };
                match self.positions.get(step.as_str()) {
                    None => {
                        let message = format!(
                            "{what} `{}` refers to step `{step}`, which does not exist (steps: {})",
                            r.text(),
                            self.ids.join(", ")
                        );
                        self.error(path, message);
                    }
                    Some(&j) if j == self.index => self.error(
                        path,
                        format!(
                            "{what} `{}` refers to this step's own result; a step reads only earlier results",
                            r.text()
                        ),
                    ),
                    Some(&j) if j > self.index => self.error(
                        path,
                        format!(
                            "{what} `{}` refers to step `{step}` (steps[{j}]), which runs later; a step reads only earlier results",
                            r.text()
                        ),
                    ),
                    Some(_) => {}
                }
            }
            Some(other) => self.error(
                path,
                format!(
                    "{what} `{}` starts at `{other}`: references start at `$.input` (the run input) or `$.results` (earlier steps' results)",
                    r.text()
                ),
            ),
        }
    }
}
