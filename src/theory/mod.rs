//! theory — the recovery-error experiment: SAE-based vs direct identification of a safety subspace.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TheoryError {}
