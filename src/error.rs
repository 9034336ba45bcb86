//! The one error type of safeshard.
//!
//! Every message is one line that names the file, tensor, spec line or flag involved and what
//! is wrong with it. [`Error::exit_code`] maps an error to the CLI's exit status:
//! 1 for bad data (files, indexes, specs, configs, I/O), 2 for bad usage (flags, topology).

use std::path::PathBuf;

/// `Result` with safeshard's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, with plain one-line messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file whose header or layout is malformed.
    #[error("{file}: {reason}")]
    InvalidFile {
        /// File name (as given, or relative to the checkpoint directory).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// One tensor entry of a safetensors header is malformed.
    #[error("{file}: tensor {tensor:?}: {reason}")]
    InvalidTensor {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A `model.safetensors.index.json` that is malformed or inconsistent with its files.
    #[error("{file}: {reason}")]
    InvalidIndex {
        /// Index file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint path that is neither a safetensors file, an index nor a directory with one.
    #[error("{}: {reason}", path.display())]
    NotACheckpoint {
        /// The path given.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },
    /// A value from `config.json` (or `--set`) that is missing or has the wrong type.
    #[error("config: {0}")]
    Config(String),
    /// A sharding spec that does not parse or does not type-check. The message starts with
    /// `file:line:col:` and may be followed by the source line and a caret on further lines.
    #[error("{0}")]
    Spec(String),
    /// A spec that cannot place some tensors of a checkpoint (unmatched names, bad splits).
    #[error("{0}")]
    Placement(String),
    /// A plan that cannot be built or does not match the files it was made for.
    #[error("{0}")]
    Plan(String),
    /// A failure while loading a rank's tensors.
    #[error("{0}")]
    Load(String),
    /// A failure of the communicator (launcher environment, MPI, NCCL).
    #[error("{0}")]
    Comm(String),
    /// Bad usage: invalid flags, topology or arguments. Exit status 2.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Exit status for the CLI: 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
