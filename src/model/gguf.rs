//! GGUF files: metadata, tensors dequantised to f32, llama.cpp's q/k permutation undone.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GgufError {}
