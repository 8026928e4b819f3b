//! sae — sparse autoencoders on the residual stream: formats, encode/decode, training, evaluation.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SaeError {}
