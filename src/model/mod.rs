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
