//! The error type of the model core. Every variant names what went wrong in words a user
//! can act on (which file, which tensor, which limit).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("invalid model config: {0}")]
    Config(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("tensor `{name}`: {message}")]
    Weight { name: String, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid input: {0}")]
    Input(String),

    #[error("device `{0}`: {1}")]
    Device(String, String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), message: message.to_string() }
    }

    pub fn io(context: impl std::fmt::Display, source: std::io::Error) -> Self {
        Error::Io { context: context.to_string(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
