//! Tokenizers from `tokenizer.json` or from GGUF metadata.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {}
