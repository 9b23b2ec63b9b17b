//! JSON as Python writes it.
//!
//! diffusers saves configs with Python's `json`, which writes the
//! non-standard tokens `Infinity`, `-Infinity` and `NaN` (for example
//! DPMSolver's `lambda_min_clipped: -Infinity`). Strict JSON parsers reject
//! them; [`parse_lenient`] keeps them as the strings `"Infinity"`,
//! `"-Infinity"` and `"NaN"`, which the config readers turn back into floats.

use serde_json::Value;

/// Parse `text` as JSON, accepting Python's `Infinity`, `-Infinity` and
/// `NaN` outside strings (they become the strings of the same spelling).
///
/// Errors: anything else that is not JSON, as `serde_json` reports it.
pub fn parse_lenient(text: &str) -> serde_json::Result<Value> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let mut replaced = false;
        for token in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(token) {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                replaced = true;
                break;
            }
        }
        if replaced {
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_tokens_become_strings_outside_strings_only() {
        let v = parse_lenient(r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity"}"#)
            .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "NaN");
        assert_eq!(v["b"][1], "Infinity");
        assert_eq!(v["c"], "NaN -Infinity");
        assert!(parse_lenient("{").is_err());
    }
}
