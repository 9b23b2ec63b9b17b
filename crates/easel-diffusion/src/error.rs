//! The engine's one error type.
//!
//! Every variant names what went wrong and, where there is one, the fix: the
//! CLI prints `Display` as its one-line message.

use std::path::PathBuf;

/// Errors of the diffusion engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside a kernel, dtype, device).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (`model_index.json`, a `config.json`, a tokenizer file) is malformed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A component config has a value the engine does not support.
    #[error("{component} config: {message}")]
    Config { component: String, message: String },

    /// The model reference could not be resolved to a local directory.
    #[error("{0}")]
    ModelNotFound(String),

    /// A component folder or file that the pipeline needs is missing.
    #[error("model {model}: missing {what} (expected at {})", path.display())]
    MissingComponent {
        model: String,
        what: String,
        path: PathBuf,
    },

    /// A component ships its weights only in a format the engine does not
    /// read (pickle `.bin` / `.ckpt` / `.pt`, Flax `.msgpack`, ...).
    #[error(
        "model {model}: component `{component}` has no .safetensors weights, only {} (in {}); \
         only safetensors are supported: convert it (diffusers: `save_pretrained(dir, safe_serialization=True)`) \
         or use a repository that ships .safetensors",
        found.join(", "),
        dir.display()
    )]
    UnsupportedWeights {
        model: String,
        component: String,
        found: Vec<String>,
        dir: PathBuf,
    },

    /// A weight tensor is missing from the checkpoint.
    #[error("{component}: weight `{tensor}` is missing from {}", file.display())]
    MissingTensor {
        component: String,
        tensor: String,
        file: PathBuf,
    },

    /// A weight tensor's shape does not match what the component config implies.
    #[error(
        "{component}: weight `{tensor}` has shape {found:?} but the config implies {expected:?}"
    )]
    ShapeMismatch {
        component: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A scheduler name that is not in the table.
    #[error("unknown scheduler `{name}`; valid names: {valid}")]
    UnknownScheduler { name: String, valid: String },

    /// A request argument is out of its range or inconsistent with the model.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },

    /// The tokenizer could not be loaded or failed on the input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A download from the Hugging Face hub failed.
    #[error("{0}")]
    Hub(String),

    /// The job was canceled through its cancel token.
    #[error("canceled")]
    Canceled,
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Config`] for `component`.
    pub fn config(component: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            component: component.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
