//! References: JSONPath queries (RFC 9535) written in step parameters.
//!
//! A reference is a whole string that is a JSONPath query, rooted either at
//! the run's scope (`$`, which holds `input` and `results`) or, inside a
//! `@Map` template, at the current element (`$$`). This module parses and
//! classifies such strings; [`crate::resolve`] replaces them by values.
//!
//! The rules, in order, for a string parameter:
//!
//! 1. `\$...`: an escaped literal; the leading backslash is removed and the
//!    rest is kept as written (`"\\$.99 deal"` is the text `$.99 deal`).
//! 2. `$`, `$$`, or a string starting with `$.`, `$[`, `$$.` or `$$[`: a
//!    reference. The whole string must be a valid query, otherwise the flow
//!    is rejected as malformed.
//! 3. A string containing `{{ $...}}` pieces: a template; each piece is a
//!    reference whose value is inserted (strings raw, other values as JSON).
//!    `{{` not followed by `$` (after optional spaces) is kept as text.
//! 4. Anything else is a literal (`"$5 off"` included: not a query).
//!
//! `@Map(<query>)` strings are directives, meaningful only as the first item
//! of a two-item array (see [`crate::resolve`]).

use serde_json::Value;
use serde_json_path::JsonPath;

/// What a reference is rooted at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `$`: the run scope `{ "input": ..., "results": { stepId: result } }`.
    Scope,
    /// `$$`: the current element of the innermost `@Map`.
    Element,
}

/// A parsed reference: a JSONPath query and the root it applies to.
#[derive(Debug, Clone)]
pub struct Reference {
    text: String,
    root: Root,
    path: JsonPath,
    singular: bool,
    leading: Vec<String>,
}

impl Reference {
    /// Parses `text` (`$...` or `$$...`). The error says what is wrong and
    /// where, in the words of the JSONPath parser.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (root, query) = if let Some(rest) = text.strip_prefix("$$") {
            (Root::Element, format!("${rest}"))
        } else if text.starts_with('$') {
            (Root::Scope, text.to_string())
        } else {
            return Err(format!(
                "`{text}` is not a JSONPath query (it must start with `$`)"
            ));
        };
        let path = JsonPath::parse(&query).map_err(|e| {
            // Positions are reported in the text as written (`$$` is one
            // character longer than the `$` handed to the parser).
            let shift = usize::from(root == Root::Element);
            format!(
                "`{text}` is not a valid JSONPath query: {} (at character {})",
                e.message(),
                e.position() + shift
            )
        })?;
        // RFC 9535 only allows singular queries as comparables in filters,
        // and the parser enforces it: a query that parses there is singular.
        let singular = JsonPath::parse(&format!("$[?{query} == 0]")).is_ok();
        Ok(Self {
            text: text.to_string(),
            root,
            path,
            singular,
            leading: leading_names(&query),
        })
    }

    /// The reference as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The root it applies to.
    pub fn root(&self) -> Root {
        self.root
    }

    /// A singular query (only name and index selectors, no wildcards,
    /// slices, filters or descendants) selects at most one value and gives
    /// that value; any other query gives the array of what it selects.
    pub fn is_singular(&self) -> bool {
        self.singular
    }

    /// The member names the query starts with, up to its first segment that
    /// is not a plain name (`$.results.gen[0].file_url` → `results`, `gen`).
    pub fn leading_names(&self) -> &[String] {
        &self.leading
    }

    /// Applies the query to `target` (the scope or the element, as
    /// [`Self::root`] says). A singular query that selects nothing is an
    /// error (`None`); a non-singular one gives an array, possibly empty.
    pub fn select(&self, target: &Value) -> Option<Value> {
        let nodes = self.path.query(target);
        if self.singular {
            nodes.first().cloned()
        } else {
            Some(Value::Array(nodes.all().into_iter().cloned().collect()))
        }
    }
}

/// What a string parameter is.
#[derive(Debug, Clone)]
pub enum Text {
    /// Kept as is (escapes already removed).
    Literal(String),
    /// A whole-string reference.
    Reference(Reference),
    /// Literal text and references to insert.
    Template(Vec<Piece>),
    /// `@Map(<query>)`.
    Map(Reference),
}

/// A part of a template.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Text kept as written.
    Text(String),
    /// `{{ $... }}`: the value inserted (strings raw, others as JSON).
    Reference(Reference),
}

/// True when `s` is written as a reference (rule 2 of the module docs).
fn looks_like_reference(s: &str) -> bool {
    matches!(s, "$" | "$$")
        || s.starts_with("$.")
        || s.starts_with("$[")
        || s.starts_with("$$.")
        || s.starts_with("$$[")
}

/// Classifies a string parameter (see the module docs). The error is a
/// message without location; callers add the step and parameter path.
pub fn classify(s: &str) -> Result<Text, String> {
    if let Some(rest) = s.strip_prefix('\\') {
        if rest.starts_with('$') {
            return Ok(Text::Literal(rest.to_string()));
        }
    }
    if let Some(inner) = map_directive(s) {
        let inner = inner.trim();
        if !inner.starts_with('$') {
            return Err(format!(
                "@Map path `{inner}` is malformed: it must be a JSONPath query starting with `$` or `$$`"
            ));
        }
        return Reference::parse(inner)
            .map(Text::Map)
            .map_err(|e| format!("@Map path is malformed: {e}"));
    }
    if looks_like_reference(s) {
        return Reference::parse(s).map(Text::Reference).map_err(|e| {
            let hint = if s.contains('-') {
                " (names with `-` need brackets: `$.results['my-step']`)"
            } else {
                ""
            };
            format!("{e}{hint}; write `\\{s}` if this is meant as text, not a reference")
        });
    }
    if s.contains("{{") {
        return parse_template(s);
    }
    Ok(Text::Literal(s.to_string()))
}

/// The inside of `@Map(...)` when `s` is written as a map directive:
/// `@Map`, optional spaces, `(`. A directive that is not closed with `)`
/// gives an empty inside, reported as malformed.
fn map_directive(s: &str) -> Option<&str> {
    let rest = s.trim().strip_prefix("@Map")?.trim_start();
    let rest = rest.strip_prefix('(')?;
    Some(rest.strip_suffix(')').unwrap_or(""))
}

/// True when `s` is written as a `@Map(...)` directive.
pub fn is_map_directive(s: &str) -> bool {
    map_directive(s).is_some()
}

fn parse_template(s: &str) -> Result<Text, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        if !after.trim_start().starts_with('$') {
            // Not a reference: keep `{{` as text and go on after it.
            text.push_str(&rest[..open + 2]);
            rest = after;
            continue;
        }
        let Some(close) = after.find("}}") else {
            return Err(format!(
                "template `{{{{` at character {} is never closed with `}}}}`",
                s.len() - rest.len() + open
            ));
        };
        text.push_str(&rest[..open]);
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        let inner = after[..close].trim();
        let reference = Reference::parse(inner).map_err(|e| format!("in template: {e}"))?;
        pieces.push(Piece::Reference(reference));
        rest = &after[close + 2..];
    }
    text.push_str(rest);
    if pieces.is_empty() {
        return Ok(Text::Literal(text));
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(Text::Template(pieces))
}

/// The member names a valid query starts with (`$.a['b'].c[0]` → a, b, c).
/// Stops at the first segment that is not a name selector; escapes other
/// than the simple ones stop it too (the caller then treats the rest as
/// dynamic, which only weakens static checks).
fn leading_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let Some(mut rest) = query.strip_prefix('$') else {
        return names;
    };
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('.') {
            if r.starts_with('.') || r.starts_with('*') {
                break;
            }
            let end = r
                .char_indices()
                .find(|&(_, c)| !(c.is_alphanumeric() || c == '_' || !c.is_ascii()))
                .map_or(r.len(), |(i, _)| i);
            if end == 0 {
                break;
            }
            names.push(r[..end].to_string());
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let r = r.trim_start();
            let Some(quote) = r.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                break;
            };
            let Some((name, after)) = quoted(&r[1..], quote) else {
                break;
            };
            let Some(after) = after.trim_start().strip_prefix(']') else {
                break;
            };
            names.push(name);
            rest = after;
        } else {
            break;
        }
    }
    names
}

/// Reads a quoted name up to `quote`; `None` on escapes it does not know.
fn quoted(s: &str, quote: char) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            return Some((out, &s[i + 1..]));
        }
        if c == '\\' {
            let (_, e) = chars.next()?;
            match e {
                '\'' | '"' | '\\' | '/' => out.push(e),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// A short name of a JSON value's type, for messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn singular_and_non_singular_queries() {
        for q in ["$", "$.a", "$.a.b", "$.a[0]", "$['a'][\"b\"]", "$.a[-1].b"] {
            assert!(Reference::parse(q).unwrap().is_singular(), "{q}");
        }
        for q in [
            "$.a.*",
            "$..a",
            "$.a[0:2]",
            "$.a[?@.x]",
            "$.a[0,1]",
            "$.a['b','c']",
        ] {
            assert!(!Reference::parse(q).unwrap().is_singular(), "{q}");
        }
    }

    #[test]
    fn element_references() {
        let r = Reference::parse("$$").unwrap();
        assert_eq!(r.root(), Root::Element);
        assert_eq!(r.select(&json!("x")), Some(json!("x")));
        let r = Reference::parse("$$.a.b").unwrap();
        assert_eq!(r.select(&json!({"a": {"b": 3}})), Some(json!(3)));
        assert_eq!(r.select(&json!({"a": {}})), None);
        let r = Reference::parse("$$[1]").unwrap();
        assert_eq!(r.select(&json!([1, 2])), Some(json!(2)));
    }

    #[test]
    fn non_singular_selects_an_array() {
        let r = Reference::parse("$.a[*].b").unwrap();
        let v = json!({"a": [{"b": 1}, {"c": 2}, {"b": 3}]});
        assert_eq!(r.select(&v), Some(json!([1, 3])));
        assert_eq!(r.select(&json!({})), Some(json!([])));
    }

    #[test]
    fn leading_names_of_queries() {
        let names = |q: &str| Reference::parse(q).unwrap().leading_names().to_vec();
        assert_eq!(names("$.results.gen[0].file_url"), ["results", "gen"]);
        assert_eq!(
            names("$['results']['my step'].x"),
            ["results", "my step", "x"]
        );
        assert_eq!(names("$.results.*.id"), ["results"]);
        assert_eq!(names("$..id"), Vec::<String>::new());
        assert_eq!(names("$.input"), ["input"]);
        assert_eq!(names("$$.name"), ["name"]);
    }

    #[test]
    fn classify_strings() {
        assert!(matches!(classify("hello").unwrap(), Text::Literal(s) if s == "hello"));
        assert!(matches!(classify("$5 off").unwrap(), Text::Literal(_)));
        assert!(matches!(classify("\\$.input").unwrap(), Text::Literal(s) if s == "$.input"));
        assert!(matches!(classify("$.input.x").unwrap(), Text::Reference(_)));
        assert!(matches!(classify("$$").unwrap(), Text::Reference(_)));
        assert!(matches!(
            classify("@Map($.results.a)").unwrap(),
            Text::Map(_)
        ));
        assert!(matches!(classify("@Map( $$.tags )").unwrap(), Text::Map(_)));
        assert!(
            matches!(classify("{{ not a ref }}").unwrap(), Text::Literal(s) if s == "{{ not a ref }}")
        );
        match classify("a {{ $.input.x }} and {{$$}}!").unwrap() {
            Text::Template(p) => assert_eq!(p.len(), 5),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_strings() {
        let e = classify("$.input[").unwrap_err();
        assert!(e.contains("not a valid JSONPath query"), "{e}");
        assert!(e.contains("\\$.input["), "{e}");
        let e = classify("$.results.my-step.id").unwrap_err();
        assert!(e.contains("$.results['my-step']"), "{e}");
        assert!(matches!(
            classify("$.results['my-step'].id").unwrap(),
            Text::Reference(_)
        ));
        let e = classify("@Map(results.x)").unwrap_err();
        assert!(e.contains("@Map path `results.x` is malformed"), "{e}");
        let e = classify("@Map($.a[)").unwrap_err();
        assert!(e.starts_with("@Map path is malformed"), "{e}");
        let e = classify("@Map($.a").unwrap_err();
        assert!(e.contains("malformed"), "{e}");
        assert!(matches!(
            classify("@Maple leaves").unwrap(),
            Text::Literal(_)
        ));
        let e = classify("x {{ $.a ").unwrap_err();
        assert!(e.contains("never closed"), "{e}");
        let e = classify("x {{ $.a[ }}").unwrap_err();
        assert!(e.contains("in template"), "{e}");
    }
}
