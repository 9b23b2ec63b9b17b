//! A small JSON Schema checker for `ObjectGenerator` answers.
//!
//! It checks the keywords that shape generated data: `type` (a name or a
//! list of names; `integer` accepts numbers without a fraction), `enum`,
//! `const`, `properties`, `required`, `additionalProperties` (`false` or a
//! schema), `items` (a schema), `minItems`, `maxItems`, `minLength`,
//! `maxLength`, `minimum`, `maximum`, `anyOf` and `oneOf` (both read as "at
//! least one matches"), `allOf`. Other keywords (`$ref`, `pattern`,
//! `format`, ...) are accepted and not checked.

use serde_json::{Map, Value};

use crate::path::type_name;

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// Problems with a schema itself (unknown type names, keywords of the
/// wrong kind), as `path: message` lines; empty when it is usable.
pub fn check_schema(schema: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check_schema_at(schema, "schema", &mut errors);
    errors
}

fn check_schema_at(schema: &Value, path: &str, errors: &mut Vec<String>) {
    let map = match schema {
        Value::Object(map) => map,
        Value::Bool(_) => return,
        other => {
            errors.push(format!(
                "{path}: a schema is an object, not {}",
                type_name(other)
            ));
            return;
        }
    };
    if let Some(t) = map.get("type") {
        let names: Vec<&Value> = match t {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for name in names {
            match name.as_str() {
                Some(n) if TYPES.contains(&n) => {}
                _ => errors.push(format!(
                    "{path}.type: {name} is not a JSON Schema type ({})",
                    TYPES.join(", ")
                )),
            }
        }
    }
    if let Some(props) = map.get("properties") {
        match props {
            Value::Object(props) => {
                for (key, sub) in props {
                    check_schema_at(sub, &format!("{path}.properties.{key}"), errors);
                }
            }
            other => errors.push(format!(
                "{path}.properties: must be an object, not {}",
                type_name(other)
            )),
        }
    }
    if let Some(items) = map.get("items") {
        check_schema_at(items, &format!("{path}.items"), errors);
    }
    if let Some(required) = map.get("required") {
        if !required
            .as_array()
            .is_some_and(|r| r.iter().all(Value::is_string))
        {
            errors.push(format!(
                "{path}.required: must be an array of property names"
            ));
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = map.get(key) {
            match list {
                Value::Array(subs) => {
                    for (i, sub) in subs.iter().enumerate() {
                        check_schema_at(sub, &format!("{path}.{key}[{i}]"), errors);
                    }
                }
                other => errors.push(format!(
                    "{path}.{key}: must be an array of schemas, not {}",
                    type_name(other)
                )),
            }
        }
    }
}

/// Checks `instance` against `schema`; the problems as
/// `` `$.prompts[3]`: expected a string, got a number `` lines (at most 20).
pub fn validate(schema: &Value, instance: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate_at(schema, instance, "$", &mut errors);
    errors.truncate(20);
    errors
}

fn matches_type(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn validate_at(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let map: &Map<String, Value> = match schema {
        Value::Object(map) => map,
        Value::Bool(false) => {
            errors.push(format!("`{path}`: no value is allowed here"));
            return;
        }
        _ => return,
    };
    if let Some(t) = map.get("type") {
        let names: Vec<&str> = match t {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            one => one.as_str().into_iter().collect(),
        };
        if !names.is_empty() && !names.iter().any(|n| matches_type(n, value)) {
            errors.push(format!(
                "`{path}`: expected {}, got {}",
                names.join(" or "),
                type_name(value)
            ));
            return;
        }
    }
    if let Some(Value::Array(options)) = map.get("enum") {
        if !options.contains(value) {
            errors.push(format!(
                "`{path}`: {value} is not one of {}",
                Value::Array(options.clone())
            ));
        }
    }
    if let Some(expected) = map.get("const") {
        if expected != value {
            errors.push(format!("`{path}`: expected {expected}, got {value}"));
        }
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = map.get(key) {
            if !subs.is_empty()
                && !subs.iter().any(|s| {
                    let mut sub_errors = Vec::new();
                    validate_at(s, value, path, &mut sub_errors);
                    sub_errors.is_empty()
                })
            {
                errors.push(format!("`{path}`: matches none of the `{key}` schemas"));
            }
        }
    }
    if let Some(Value::Array(subs)) = map.get("allOf") {
        for sub in subs {
            validate_at(sub, value, path, errors);
        }
    }
    match value {
        Value::Object(object) => {
            let props = map.get("properties").and_then(Value::as_object);
            if let Some(Value::Array(required)) = map.get("required") {
                for name in required.iter().filter_map(Value::as_str) {
                    if !object.contains_key(name) {
                        errors.push(format!("`{path}`: missing required property `{name}`"));
                    }
                }
            }
            for (key, item) in object {
                let item_path = format!("{path}.{key}");
                match props.and_then(|p| p.get(key)) {
                    Some(sub) => validate_at(sub, item, &item_path, errors),
                    None => match map.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            errors.push(format!("`{path}`: unexpected property `{key}`"))
                        }
                        Some(sub @ Value::Object(_)) => validate_at(sub, item, &item_path, errors),
                        _ => {}
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = map.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    errors.push(format!(
                        "`{path}`: {} items, at least {min} expected",
                        items.len()
                    ));
                }
            }
            if let Some(max) = map.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    errors.push(format!(
                        "`{path}`: {} items, at most {max} expected",
                        items.len()
                    ));
                }
            }
            if let Some(sub) = map.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_at(sub, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = map.get("minLength").and_then(Value::as_u64) {
                if len < min {
                    errors.push(format!("`{path}`: shorter than {min} characters"));
                }
            }
            if let Some(max) = map.get("maxLength").and_then(Value::as_u64) {
                if len > max {
                    errors.push(format!("`{path}`: longer than {max} characters"));
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = map.get("minimum").and_then(Value::as_f64) {
                if x < min {
                    errors.push(format!("`{path}`: {n} is less than {min}"));
                }
            }
            if let Some(max) = map.get("maximum").and_then(Value::as_f64) {
                if x > max {
                    errors.push(format!("`{path}`: {n} is more than {max}"));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_schema_accepts_prompts_and_rejects_wrong_types() {
        let schema = json!({"type": "object", "properties": {"prompts": {"type": "array", "items": {"type": "string"}}}});
        assert!(check_schema(&schema).is_empty());
        assert!(validate(&schema, &json!({"prompts": ["a", "b"]})).is_empty());
        assert_eq!(
            validate(&schema, &json!({"prompts": ["a", 3]})),
            ["`$.prompts[1]`: expected string, got a number"]
        );
        assert_eq!(
            validate(&schema, &json!(["a"])),
            ["`$`: expected object, got an array"]
        );
    }

    #[test]
    fn keywords() {
        let schema = json!({
            "type": "object",
            "required": ["name", "age"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "minLength": 2},
                "age": {"type": "integer", "minimum": 0},
                "kind": {"enum": ["a", "b"]},
                "tags": {"type": "array", "maxItems": 1},
                "either": {"anyOf": [{"type": "string"}, {"type": "null"}]}
            }
        });
        assert!(validate(&schema, &json!({"name": "Al", "age": 3.0, "either": null})).is_empty());
        let errors = validate(
            &schema,
            &json!({"name": "A", "age": -1, "kind": "c", "tags": [1, 2], "either": 1, "x": 0}),
        );
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(validate(&schema, &json!({"name": "Al"}))[0]
            .contains("missing required property `age`"));
    }

    #[test]
    fn bad_schemas() {
        assert_eq!(
            check_schema(&json!({"type": "obj", "properties": {"a": {"type": 3}}})),
            [
                "schema.type: \"obj\" is not a JSON Schema type (object, array, string, number, integer, boolean, null)",
                "schema.properties.a.type: 3 is not a JSON Schema type (object, array, string, number, integer, boolean, null)"
            ]
        );
        assert_eq!(
            check_schema(&json!("x")),
            ["schema: a schema is an object, not a string"]
        );
    }
}
