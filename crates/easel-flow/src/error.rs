//! Errors: loading and validating flow documents, and parameter paths.

use std::fmt;

/// A location inside a step's parameters, written the way a reader finds
/// it in the document: `parameters.images[0].prompt`,
/// `parameters["odd key"]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParamPath(String);

impl ParamPath {
    /// `parameters`, the root of every step's parameters.
    pub fn root() -> Self {
        Self("parameters".to_string())
    }

    /// A path from its written form (used for document-level fields such
    /// as `id` or `onFailure`).
    pub fn field(name: &str) -> Self {
        Self(name.to_string())
    }

    /// The member `key` of the value at this path.
    pub fn key(&self, key: &str) -> Self {
        let plain = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if plain {
            Self(format!("{}.{key}", self.0))
        } else {
            let quoted = serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""));
            Self(format!("{}[{quoted}]", self.0))
        }
    }

    /// The item `index` of the array at this path.
    pub fn index(&self, index: usize) -> Self {
        Self(format!("{}[{index}]", self.0))
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ParamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An error in one parameter of one step, reported by [`crate::Step::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// Where: `parameters.images[0].prompt`.
    pub path: ParamPath,
    /// What is wrong, and where possible what would be right.
    pub message: String,
}

impl ParamError {
    /// An error at `path`.
    pub fn new(path: ParamPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// One thing wrong with a flow document, found before anything runs.
///
/// Displayed as `steps[1] (dynamicImageGenerator).parameters.images[0]: message`;
/// document-level errors have no step (`steps: a flow needs at least one step`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The step's position in `steps`, when the error is in a step.
    pub step_index: Option<usize>,
    /// The step's id, when it has one.
    pub step_id: Option<String>,
    /// Where in the step (`parameters.images[0]`, `type`, `onFailure`), or
    /// in the document when there is no step; may be empty (the step itself).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ValidationError {
    /// An error in step `index` (with its id, if known) at `path`.
    pub fn in_step(
        index: usize,
        id: Option<&str>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            step_index: Some(index),
            step_id: id.map(str::to_string),
            path: path.into(),
            message: message.into(),
        }
    }

    /// An error in the document outside any step.
    pub fn in_document(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            step_index: None,
            step_id: None,
            path: path.into(),
            message: message.into(),
        }
    }

    /// `steps[1] (gen).parameters.images[0]`: where the error is.
    pub fn location(&self) -> String {
        let mut out = match (self.step_index, &self.step_id) {
            (Some(i), Some(id)) => format!("steps[{i}] ({id})"),
            (Some(i), None) => format!("steps[{i}]"),
            (None, _) => String::new(),
        };
        if !self.path.is_empty() {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&self.path);
        }
        out
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let location = self.location();
        if location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{location}: {}", self.message)
        }
    }
}

/// Everything wrong with a flow document (at least one error), in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// The errors.
    pub fn errors(&self) -> &[ValidationError] {
        &self.0
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems in the flow:", many.len())?;
                for e in many {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ValidationErrors {}

/// Why a flow could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The text is neither JSON nor JSON5.
    #[error("the flow is not valid JSON or JSON5: {0}")]
    Parse(String),
    /// The document parsed but is not a valid flow.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_paths() {
        let p = ParamPath::root().key("images").index(0).key("prompt");
        assert_eq!(p.as_str(), "parameters.images[0].prompt");
        assert_eq!(
            ParamPath::root().key("odd key").as_str(),
            "parameters[\"odd key\"]"
        );
        assert_eq!(ParamPath::root().key("9x").as_str(), "parameters[\"9x\"]");
    }

    #[test]
    fn locations() {
        let e = ValidationError::in_step(1, Some("gen"), "parameters.images[0]", "bad");
        assert_eq!(e.to_string(), "steps[1] (gen).parameters.images[0]: bad");
        let e = ValidationError::in_step(2, None, "id", "missing");
        assert_eq!(e.to_string(), "steps[2].id: missing");
        let e = ValidationError::in_document("steps", "empty");
        assert_eq!(e.to_string(), "steps: empty");
    }
}
