//! SAILS — interpretable safety alignment of language models.
//!
//! The pipeline, one module per stage, each speaking in typed artifacts:
//!
//! ```text
//! assets ─► model (runtime: load, tokenize, chat, forward, capture, generate)
//!        ─► sae (activations, SAE formats, training, evaluation)
//!        ─► features ─► subspace ─► lora ─► train ─► eval ─► report
//! ```
//!
//! `attack` searches for jailbreaks of a model and its adapter (GCG).
//! `serve` puts a model and its adapter behind an OpenAI-compatible HTTP API.
//! `theory` is the controlled recovery-error experiment behind the method's claim.
//! The `sails` binary is a thin CLI over this library.

pub mod assets;
pub mod attack;
pub mod data;
pub mod error;
pub mod eval;
pub mod explain;
pub mod features;
pub mod linalg;
pub mod lora;
pub mod manifest;
pub mod model;
pub mod report;
pub mod sae;
pub mod serve;
pub mod subspace;
pub mod theory;
pub mod train;

pub use error::{Error, Result};
