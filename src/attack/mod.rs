//! attack — optimised jailbreaks against a model and its adapter, to measure whether an aligned
//! model's refusals survive an adversary who can search for a prompt.
//!
//! - [`gcg`]: Greedy Coordinate Gradient (Zou et al. 2023): a suffix of tokens appended to the
//!   request, optimised so the reply starts with a target string ("Sure, here is").
//! - [`framed`]: attacks that need no search: the request inside a jailbreak template, or the
//!   reply forced to start with a compliant opening (prefilling); each an evaluation run paired
//!   with the unattacked one.

pub mod framed;
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
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Boxed: an evaluation error is large and rare here.
    #[error(transparent)]
    Eval(Box<crate::eval::EvalError>),
}

impl From<crate::eval::EvalError> for AttackError {
    fn from(e: crate::eval::EvalError) -> Self {
        AttackError::Eval(Box::new(e))
    }
}

pub type Result<T, E = AttackError> = std::result::Result<T, E>;
