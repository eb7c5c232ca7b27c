//! One error type for the whole engine: every failure says what was wrong and where
//! (which file, which tensor, which field), so the CLI and the server can show it as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// The GPU backend failed: no adapter, an out-of-memory or lost device, a kernel limit.
    #[error("GPU: {0}")]
    Gpu(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request parameter that cannot be honoured (zero steps, bad size, unknown scheduler...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Two tensors that an op cannot combine: a bug in model code or an unsupported config.
    #[error("shape error in {op}: {message}")]
    Shape { op: &'static str, message: String },

    /// A generation produced NaN or infinity (`what`: "the denoised latents", "the decoded
    /// image"): the weights or configs are broken, and the image would be black.
    #[error("{what} contain NaN or infinite values: the model's weights or configs produce non-finite numbers")]
    NonFinite { what: &'static str },

    #[error("generation cancelled")]
    Cancelled,

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            op,
            message: message.into(),
        }
    }
}
