//! The workflow builder's prompt variables (`{{ subject }}`,
//! `{{ gen.output[0].file_url }}`), rewritten into the flow engine's
//! templates so the engine checks and resolves them with its own rules
//! (see `easel_flow::path`).
//!
//! Inside `{{ ... }}` (spaces around are ignored):
//!
//! | written | engine template | reads |
//! | --- | --- | --- |
//! | `{{ $... }}` | kept as written | the engine's own JSONPath template |
//! | `{{ name }}`, `{{ name.field[0] }}` | `{{ $.input.name.field[0] }}` | the run input |
//! | `{{ step.output }}`, `{{ step.output[0].file_url }}` | `{{ $.results.step[0].file_url }}` | an earlier step's result |
//!
//! A variable is a name (letters, digits, `_`, `-`) followed by `.name` and
//! `[index]` segments; a second segment that is exactly `output` makes it a
//! step reference (an input with an `output` member is read with
//! `{{ $.input.name.output }}`). Anything else between `{{` and `}}` is an
//! error naming it, and so is a `{{` never closed.

/// One segment of a variable path.
enum Segment {
    Name(String),
    Index(i64),
}

/// The characters a variable name may use (step ids' alphabet).
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Parses `name(.name|[n])*`; `None` when it is not that.
fn parse_path(text: &str) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut rest = text;
    let take_name = |s: &str| -> Option<(String, usize)> {
        let end = s.find(|c: char| !name_char(c)).unwrap_or(s.len());
        (end > 0).then(|| (s[..end].to_string(), end))
    };
    let (first, used) = take_name(rest)?;
    segments.push(Segment::Name(first));
    rest = &rest[used..];
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let (name, used) = take_name(r)?;
            segments.push(Segment::Name(name));
            rest = &r[used..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let close = r.find(']')?;
            let index: i64 = r[..close].trim().parse().ok()?;
            segments.push(Segment::Index(index));
            rest = &r[close + 1..];
        } else {
            return None;
        }
    }
    Some(segments)
}

/// A name as a JSONPath segment: `.name`, or `['na-me']` when it is not a
/// plain identifier.
fn name_segment(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        format!(".{name}")
    } else {
        format!("['{name}']")
    }
}

/// The engine reference a variable stands for (see the module docs), or
/// an error naming it.
pub fn variable_reference(variable: &str) -> Result<String, String> {
    let Some(segments) = parse_path(variable) else {
        return Err(format!(
            "`{{{{ {variable} }}}}` is not a variable: write `{{{{ name }}}}` for a flow input, \
             `{{{{ step.output }}}}` (or `{{{{ step.output[0].file_url }}}}`) for an earlier \
             step's result, or `{{{{ $.JSONPath }}}}`"
        ));
    };
    let mut iter = segments.iter();
    let Some(Segment::Name(first)) = iter.next() else {
        return Err(format!("`{{{{ {variable} }}}}` is not a variable"));
    };
    let is_step = matches!(segments.get(1), Some(Segment::Name(n)) if n == "output");
    let mut out = if is_step {
        iter.next();
        format!("$.results{}", name_segment(first))
    } else {
        format!("$.input{}", name_segment(first))
    };
    for segment in iter {
        match segment {
            Segment::Name(n) => out.push_str(&name_segment(n)),
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    Ok(out)
}

/// Rewrites every variable of `text` into an engine template piece.
/// `Ok(None)` when `text` has no variable (nothing to rewrite); the error
/// names the first variable that is not one.
pub fn translate_text(text: &str) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(format!(
                "`{{{{` at character {} is never closed with `}}}}`",
                text.len() - rest.len() + open
            ));
        };
        out.push_str(&rest[..open]);
        let inner = after[..close].trim();
        if inner.starts_with('$') {
            // The engine's own template: kept for the engine.
            out.push_str(&rest[open..open + 2 + close + 2]);
        } else {
            out.push_str(&format!("{{{{ {} }}}}", variable_reference(inner)?));
            changed = true;
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_become_engine_references() {
        for (written, reference) in [
            ("subject", "$.input.subject"),
            ("person.name", "$.input.person.name"),
            ("tags[1]", "$.input.tags[1]"),
            ("my-input", "$.input['my-input']"),
            ("gen.output", "$.results.gen"),
            ("gen.output[0].file_url", "$.results.gen[0].file_url"),
            ("gen.output[-1].id", "$.results.gen[-1].id"),
            ("step_2.output.score", "$.results.step_2.score"),
            ("my-step.output", "$.results['my-step']"),
        ] {
            assert_eq!(variable_reference(written).unwrap(), reference, "{written}");
        }
        for bad in ["a b", "", ".x", "a..b", "a[x]", "a[0", "a+b"] {
            let e = variable_reference(bad).unwrap_err();
            assert!(e.contains(&format!("`{{{{ {bad} }}}}`")), "{e}");
        }
    }

    #[test]
    fn texts_keep_engine_templates_and_report_unclosed_braces() {
        assert_eq!(
            translate_text("a {{subject}} by {{ $.input.artist }}, {{ gen.output[0].id }}")
                .unwrap()
                .unwrap(),
            "a {{ $.input.subject }} by {{ $.input.artist }}, {{ $.results.gen[0].id }}"
        );
        assert_eq!(translate_text("plain {{ $.input.x }}").unwrap(), None);
        assert_eq!(translate_text("no braces").unwrap(), None);
        let e = translate_text("a {{ x").unwrap_err();
        assert!(e.contains("never closed"), "{e}");
        let e = translate_text("a {{ x y }}").unwrap_err();
        assert!(e.contains("`{{ x y }}` is not a variable"), "{e}");
    }
}
