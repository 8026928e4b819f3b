//! model — the runtime every stage stands on: load real chat models (GGUF, Hugging Face
//! safetensors directories, hub ids from the local cache), tokenize, render chat templates,
//! run a differentiable forward pass with residual-stream capture and LoRA slots, generate.

pub mod attend;
pub mod batcher;
pub mod blocks;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod export;
pub mod frozen;
pub mod fused;
pub mod gemv;
pub mod generate;
pub mod gguf;
pub mod layers;
pub mod load;
pub mod lora;
pub mod tokenizer;
pub mod weights;

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: missing {what}")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{path}: corrupt or truncated file: {message}")]
    CorruptFile { path: PathBuf, message: String },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { name: String, path: PathBuf },
    #[error("{path}: tensor {name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensors the model does not use: {names:?}")]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },
    #[error("adapter {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error("the input needs {tokens} positions but the model supports at most {max}")]
    ContextTooLong { tokens: usize, max: usize },
    #[error("model {repo_id} is not in the local Hugging Face cache {cache} ({detail}); nothing can be downloaded here: copy the model into that cache or pass a directory or GGUF file")]
    NotCached {
        repo_id: String,
        cache: PathBuf,
        detail: String,
    },
    #[error(transparent)]
    Asset(Box<crate::assets::AssetError>),
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Writes a file atomically: a temp file in the same directory, flushed to disk, then a rename,
/// so a crash or a full disk leaves the previous file (or none), never a part of the new one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), ModelError> {
    use std::io::Write;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = atomic_temp(path)?;
    tmp.write_all(bytes).map_err(io)?;
    persist_atomic(tmp, path)
}

/// The temp file [`write_atomic`] writes into: in `path`'s folder (created if missing), so the
/// final rename stays on one filesystem.
pub(crate) fn atomic_temp(path: &std::path::Path) -> Result<tempfile::NamedTempFile, ModelError> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    tempfile::NamedTempFile::new_in(dir).map_err(io)
}

/// Flushes a written temp file to disk, makes it readable by others (tempfile creates 0600
/// files; artifacts are meant to be shared) and renames it to `path`.
pub(crate) fn persist_atomic(
    tmp: tempfile::NamedTempFile,
    path: &std::path::Path,
) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Which residual-stream position a capture or an SAE refers to. Never a bare `usize` whose
/// meaning shifts by one: `In(l)` is the input of block `l` (Hugging Face `hidden_states[l]`),
/// `Out(l)` its raw output (before any final norm; SAELens' `blocks.l.hook_resid_post`).
/// `Out(l)` and `In(l + 1)` are the same tensor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Resid {
    In(usize),
    Out(usize),
}

impl Resid {
    /// The block-input index this position equals (`Out(l)` is `In(l + 1)`).
    pub fn block_input_index(self) -> usize {
        match self {
            Resid::In(l) => l,
            Resid::Out(l) => l + 1,
        }
    }
}

impl std::fmt::Display for Resid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resid::In(l) => write!(f, "resid_in[{l}]"),
            Resid::Out(l) => write!(f, "resid_out[{l}]"),
        }
    }
}
