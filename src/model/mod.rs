//! model — the runtime every stage stands on: load real chat models (GGUF, Hugging Face
//! safetensors directories, hub ids from the local cache), tokenize, render chat templates,
//! run a differentiable forward pass with residual-stream capture and LoRA slots, generate.

pub mod chat;
pub mod gguf;
pub mod tokenizer;

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
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Which residual-stream position a capture or an SAE refers to. Never a bare `usize` whose
/// meaning shifts by one: `In(l)` is the input of block `l` (Hugging Face `hidden_states[l]`),
/// `Out(l)` its raw output (before any final norm; SAELens' `blocks.l.hook_resid_post`).
/// `Out(l)` and `In(l + 1)` are the same tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
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
