//! Resolving a step's parameters against the run scope: references,
//! templates and `@Map` expansion.
//!
//! The scope a step sees is `{ "input": <run input>, "results": { <id>: <result> } }`
//! with the results of the steps that ran before it (a step that failed
//! with `onFailure: continue` has the result `{ "error": { "message": ... } }`).
//!
//! - A reference string is replaced by the value it selects (see
//!   [`crate::path`]). A singular query (names and indexes only:
//!   `$.results.gen[0].file_url`) must select a value: when it selects
//!   nothing the step fails with `parameters.x: `$.input.subject` selects
//!   nothing: the input has no `subject` (it has: style)`. A non-singular
//!   query (`$.results.gen[*].file_url`) gives the array of what it
//!   selects, possibly empty.
//! - A template string inserts each `{{ $... }}` piece: strings as they
//!   are, other values as compact JSON; a piece that selects nothing is an
//!   error as above.
//! - `['@Map(<query>)', template]` as an item of an array is replaced by one
//!   item per element of the array the query selects (zero items for an
//!   empty array); inside the template `$$` is the current element and
//!   `$$.field` / `$$[0]` select in it. Items around it are kept in order,
//!   so plain items and `@Map` items mix. The same pair written where a value
//!   goes (not inside an array) becomes the expanded array itself. `@Map` may
//!   nest: inside a template `$$` is the innermost element. The query must
//!   select an array; anything else is an error.

use serde_json::{Map, Value};

use crate::error::ParamPath;
use crate::path::{classify, is_map_directive, type_name, Piece, Reference, Root, Text};

/// Why a parameter could not be resolved: where, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveError {
    /// Where in the parameters (`parameters.images[0][1].prompt`).
    pub path: ParamPath,
    /// What went wrong (`` `$$.name` selects nothing ... (@Map item 2) ``).
    pub message: String,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ResolveError {}

/// Builds the scope a step sees from the run input and earlier results.
pub fn scope(input: &Value, results: Map<String, Value>) -> Value {
    let mut scope = Map::new();
    scope.insert("input".to_string(), input.clone());
    scope.insert("results".to_string(), Value::Object(results));
    Value::Object(scope)
}

/// Resolves every reference, template and `@Map` in `parameters` against
/// `scope` (see the module docs).
pub fn resolve_parameters(parameters: &Value, scope: &Value) -> Result<Value, ResolveError> {
    Resolver {
        scope,
        elements: Vec::new(),
    }
    .value(parameters, &ParamPath::root())
}

/// Resolves `value` found at `path` against `scope`: the same rules as
/// [`resolve_parameters`], for values that are not a step's parameters.
pub fn resolve_value(value: &Value, scope: &Value, path: ParamPath) -> Result<Value, ResolveError> {
    Resolver {
        scope,
        elements: Vec::new(),
    }
    .value(value, &path)
}

/// A `['@Map(<query>)', template]` pair, if `items` is written as one.
pub(crate) fn map_pair(items: &[Value]) -> Option<(&str, Option<&Value>, usize)> {
    match items.first() {
        Some(Value::String(s)) if is_map_directive(s) => Some((s, items.get(1), items.len())),
        _ => None,
    }
}

/// The message for a pair with the wrong number of items.
pub(crate) fn map_pair_shape(len: usize) -> String {
    format!(
        "a @Map item is written `['@Map(<query>)', template]`: two items, but this one has {len}"
    )
}

struct Resolver<'a> {
    scope: &'a Value,
    elements: Vec<Value>,
}

impl Resolver<'_> {
    fn value(&mut self, value: &Value, path: &ParamPath) -> Result<Value, ResolveError> {
        match value {
            Value::String(s) => self.string(s, path),
            Value::Array(items) => {
                if map_pair(items).is_some() {
                    return self.expand(items, path).map(Value::Array);
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_path = path.index(i);
                    match item {
                        Value::Array(inner) if map_pair(inner).is_some() => {
                            out.extend(self.expand(inner, &item_path)?);
                        }
                        _ => out.push(self.value(item, &item_path)?),
                    }
                }
                Ok(Value::Array(out))
            }
            Value::Object(map) => {
                let mut out = Map::with_capacity(map.len());
                for (key, item) in map {
                    out.insert(key.clone(), self.value(item, &path.key(key))?);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    fn string(&mut self, s: &str, path: &ParamPath) -> Result<Value, ResolveError> {
        let text = classify(s).map_err(|message| error(path, message))?;
        match text {
            Text::Literal(t) => Ok(Value::String(t)),
            Text::Reference(r) => self.select(&r, path),
            Text::Template(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.push_str(&t),
                        Piece::Reference(r) => match self.select(&r, path)? {
                            Value::String(v) => out.push_str(&v),
                            other => out.push_str(&other.to_string()),
                        },
                    }
                }
                Ok(Value::String(out))
            }
            Text::Map(_) => Err(error(path, misplaced_map())),
        }
    }

    fn expand(&mut self, items: &[Value], path: &ParamPath) -> Result<Vec<Value>, ResolveError> {
        let Some((directive, Some(template), 2)) = map_pair(items) else {
            return Err(error(path, map_pair_shape(items.len())));
        };
        let reference = match classify(directive).map_err(|m| error(path, m))? {
            Text::Map(r) => r,
            _ => return Err(error(path, "@Map path is malformed")),
        };
        let source = self.select(&reference, path)?;
        let Value::Array(elements) = source else {
            return Err(error(
                path,
                format!(
                    "@Map path `{}` selects {}, not an array",
                    reference.text(),
                    type_name(&source)
                ),
            ));
        };
        let template_path = path.index(1);
        let mut out = Vec::with_capacity(elements.len());
        for (i, element) in elements.into_iter().enumerate() {
            self.elements.push(element);
            let item = self.value(template, &template_path);
            self.elements.pop();
            out.push(item.map_err(|mut e| {
                e.message = format!("{} (@Map item {i})", e.message);
                e
            })?);
        }
        Ok(out)
    }

    fn select(&self, reference: &Reference, path: &ParamPath) -> Result<Value, ResolveError> {
        let target = match reference.root() {
            Root::Scope => self.scope,
            Root::Element => self.elements.last().ok_or_else(|| {
                error(
                    path,
                    format!(
                        "`{}`: `$$` is only meaningful inside a @Map template",
                        reference.text()
                    ),
                )
            })?,
        };
        reference
            .select(target)
            .ok_or_else(|| error(path, nothing_selected(reference, target)))
    }
}

fn error(path: &ParamPath, message: impl Into<String>) -> ResolveError {
    ResolveError {
        path: path.clone(),
        message: message.into(),
    }
}

/// The message for a `@Map(...)` string that is not the first of a pair.
pub(crate) fn misplaced_map() -> String {
    "`@Map(...)` must be the first item of a two-item array `['@Map(<query>)', template]`"
        .to_string()
}

/// `` `$.input.subject` selects nothing: the input has no `subject` (it has: style) ``.
pub(crate) fn nothing_selected(reference: &Reference, target: &Value) -> String {
    let mut message = format!("`{}` selects nothing", reference.text());
    let mut current = target;
    let mut where_ = match reference.root() {
        Root::Scope => "$".to_string(),
        Root::Element => "$$".to_string(),
    };
    for name in reference.leading_names() {
        let described = describe(&where_);
        match current {
            Value::Object(map) => match map.get(name) {
                Some(next) => {
                    current = next;
                    where_ = format!("{where_}.{name}");
                }
                None => {
                    let keys: Vec<&str> = map.keys().map(String::as_str).take(12).collect();
                    let has = if keys.is_empty() {
                        " (it is empty)".to_string()
                    } else {
                        format!(" (it has: {})", keys.join(", "))
                    };
                    message.push_str(&format!(": {described} has no `{name}`{has}"));
                    return message;
                }
            },
            other => {
                message.push_str(&format!(
                    ": {described} is {}, not an object",
                    type_name(other)
                ));
                return message;
            }
        }
    }
    message
}

fn describe(where_: &str) -> String {
    match where_ {
        "$" => "the scope".to_string(),
        "$.input" => "the input".to_string(),
        "$.results" => "the results of earlier steps".to_string(),
        "$$" => "the @Map element".to_string(),
        w => match w.strip_prefix("$.results.") {
            Some(step) if !step.contains('.') => format!("the result of step `{step}`"),
            _ => format!("`{w}`"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(parameters: Value, scope: Value) -> Result<Value, ResolveError> {
        resolve_parameters(&parameters, &scope)
    }

    fn sample_scope() -> Value {
        json!({
            "input": {"promptType": "noir", "subject": "a cat", "count": 3,
                      "people": [{"name": "Ada", "tags": ["x", "y"]}, {"name": "Alan", "tags": []}],
                      "empty": []},
            "results": {
                "promptsGenerator": {"prompts": ["p1", "p2", "p3"]},
                "myTrainingStep": {"id": "4716c93e"},
                "gen": [{"id": "a1", "file_url": "file:///a1.webp"}, {"id": "a2", "file_url": "file:///a2.webp"}]
            }
        })
    }

    #[test]
    fn whole_string_references_take_the_selected_type() {
        let out = run(
            json!({"a": "$.input.promptType", "n": "$.input.count", "id": "$.results.myTrainingStep.id",
                   "url": "$.results.gen[0].file_url", "last": "$.results.gen[-1].id",
                   "list": "$.results.gen", "lit": 5, "text": "plain"}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"a": "noir", "n": 3, "id": "4716c93e", "url": "file:///a1.webp", "last": "a2",
                   "list": [{"id": "a1", "file_url": "file:///a1.webp"}, {"id": "a2", "file_url": "file:///a2.webp"}],
                   "lit": 5, "text": "plain"})
        );
    }

    #[test]
    fn non_singular_references_give_arrays() {
        let out = run(
            json!({"urls": "$.results.gen[*].file_url", "none": "$.input.empty[*]"}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"urls": ["file:///a1.webp", "file:///a2.webp"], "none": []})
        );
    }

    #[test]
    fn templates_insert_strings_raw_and_other_values_as_json() {
        let out = run(
            json!({"prompt": "A {{ $.input.subject }} in {{$.input.promptType}} style, x{{ $.input.count }}, {{ $.results.promptsGenerator.prompts }} {{ not ref }}"}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(
            out["prompt"],
            "A a cat in noir style, x3, [\"p1\",\"p2\",\"p3\"] {{ not ref }}"
        );
    }

    #[test]
    fn escaped_dollar_is_literal() {
        let out = run(json!({"p": "\\$.input.subject"}), sample_scope()).unwrap();
        assert_eq!(out["p"], "$.input.subject");
    }

    #[test]
    fn reference_to_nothing_names_the_parameter_and_the_missing_member() {
        let e = run(
            json!({"images": [{"prompt": "$.input.missing"}]}),
            sample_scope(),
        )
        .unwrap_err();
        assert_eq!(e.path.as_str(), "parameters.images[0].prompt");
        assert!(
            e.message.starts_with(
                "`$.input.missing` selects nothing: the input has no `missing` (it has: "
            ),
            "{}",
            e.message
        );
        let e = run(json!({"x": "$.results.gen[5].file_url"}), sample_scope()).unwrap_err();
        assert_eq!(e.message, "`$.results.gen[5].file_url` selects nothing");
        let e = run(json!({"x": "$.results.nope.id"}), sample_scope()).unwrap_err();
        assert!(
            e.message
                .contains("the results of earlier steps has no `nope`"),
            "{}",
            e.message
        );
        let e = run(
            json!({"x": "$.results.myTrainingStep.uuid"}),
            sample_scope(),
        )
        .unwrap_err();
        assert!(
            e.message
                .contains("the result of step `myTrainingStep` has no `uuid` (it has: id)"),
            "{}",
            e.message
        );
        let e = run(json!({"x": "{{ $.input.nope }}!"}), sample_scope()).unwrap_err();
        assert!(e.message.contains("selects nothing"), "{}", e.message);
    }

    #[test]
    fn map_expands_exactly_as_in_the_seed_example() {
        let out = run(
            json!({"images": [["@Map($.results.promptsGenerator.prompts)",
                               {"prompt": "$$", "negativePrompt": "ugly, blurry", "steps": 30}]]}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(
            out["images"],
            json!([
                {"prompt": "p1", "negativePrompt": "ugly, blurry", "steps": 30},
                {"prompt": "p2", "negativePrompt": "ugly, blurry", "steps": 30},
                {"prompt": "p3", "negativePrompt": "ugly, blurry", "steps": 30}
            ])
        );
    }

    #[test]
    fn map_over_empty_array_gives_zero_items() {
        let out = run(
            json!({"images": [["@Map($.input.empty)", {"prompt": "$$"}]]}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(out["images"], json!([]));
    }

    #[test]
    fn map_over_arrays_of_objects_with_fields_and_templates() {
        let out = run(
            json!({"images": [["@Map($.input.people)", {"prompt": "portrait of {{ $$.name }}", "who": "$$.name", "all": "$$", "n": "$.input.count"}]]}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(out["images"][0]["prompt"], "portrait of Ada");
        assert_eq!(out["images"][1]["who"], "Alan");
        assert_eq!(out["images"][1]["all"], json!({"name": "Alan", "tags": []}));
        assert_eq!(out["images"][0]["n"], 3);
    }

    #[test]
    fn map_mixes_with_plain_items_and_nests() {
        let out = run(
            json!({"images": [
                {"prompt": "first"},
                ["@Map($.results.gen)", {"prompt": "from {{ $$.id }}"}],
                {"prompt": "last"},
                ["@Map($.input.people)", {"prompt": "$$.name", "tags": [["@Map($$.tags)", "tag {{ $$ }}"]]}]
            ]}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(
            out["images"],
            json!([
                {"prompt": "first"},
                {"prompt": "from a1"},
                {"prompt": "from a2"},
                {"prompt": "last"},
                {"prompt": "Ada", "tags": ["tag x", "tag y"]},
                {"prompt": "Alan", "tags": []}
            ])
        );
    }

    #[test]
    fn map_pair_in_value_position_is_the_array() {
        let out = run(
            json!({"images": ["@Map($.results.promptsGenerator.prompts)", {"prompt": "$$"}]}),
            sample_scope(),
        )
        .unwrap();
        assert_eq!(out["images"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn map_over_non_array_and_missing_fields_are_errors() {
        let e = run(
            json!({"images": [["@Map($.input.subject)", {"prompt": "$$"}]]}),
            sample_scope(),
        )
        .unwrap_err();
        assert_eq!(e.path.as_str(), "parameters.images[0]");
        assert_eq!(
            e.message,
            "@Map path `$.input.subject` selects a string, not an array"
        );
        let e = run(
            json!({"images": [["@Map($.input.people)", {"prompt": "$$.age"}]]}),
            sample_scope(),
        )
        .unwrap_err();
        assert_eq!(e.path.as_str(), "parameters.images[0][1].prompt");
        assert!(
            e.message
                .contains("the @Map element has no `age` (it has: name, tags)"),
            "{}",
            e.message
        );
        assert!(e.message.ends_with("(@Map item 0)"), "{}", e.message);
        let e = run(
            json!({"images": [["@Map($.input.people)"]]}),
            sample_scope(),
        )
        .unwrap_err();
        assert!(
            e.message.contains("two items, but this one has 1"),
            "{}",
            e.message
        );
        let e = run(json!({"p": "$$"}), sample_scope()).unwrap_err();
        assert!(
            e.message.contains("only meaningful inside a @Map template"),
            "{}",
            e.message
        );
        let e = run(json!({"p": ["x", "@Map($.input.empty)"]}), sample_scope()).unwrap_err();
        assert!(
            e.message.contains("must be the first item"),
            "{}",
            e.message
        );
        assert_eq!(e.path.as_str(), "parameters.p[1]");
    }
}
