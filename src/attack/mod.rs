//! attack — optimised jailbreaks against a model and its adapter, to measure whether an aligned
//! model's refusals survive an adversary who can search for a prompt.
//!
//! - [`gcg`]: Greedy Coordinate Gradient (Zou et al. 2023): a suffix of tokens appended to the
//!   request, optimised so the reply starts with a target string ("Sure, here is").
//!
//! The prefilling attack (the reply forced to start with a compliant opening) needs no search
//! and lives in the evaluation (`sails eval --prefill`).

pub mod gcg;

use crate::model::ModelError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AttackError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = AttackError> = std::result::Result<T, E>;
