//! The library's error type: each stage's error, wrapped here so that code calling several stages
//! can use one `Result` and still match on the stage that failed.
//!
//! ```
//! use std::path::Path;
//!
//! /// A run's subspace and the labelled responses beside it: two stages, one error type.
//! fn subspace_and_labels(run: &Path) -> sails::Result<usize> {
//!     let subspace = sails::subspace::Subspace::load(&run.join("subspace"))?;
//!     let labels = sails::eval::labels::load_xstest_completions(&[])?;
//!     Ok(subspace.bases.len() + labels.len())
//! }
//! assert!(matches!(
//!     subspace_and_labels(Path::new("/nonexistent-run")),
//!     Err(sails::Error::Subspace(_))
//! ));
//! ```

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Sft(#[from] crate::data::sft::SftError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Frames(#[from] crate::eval::frames::FramesError),
    #[error(transparent)]
    Explain(#[from] crate::explain::ExplainError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Linalg(#[from] crate::linalg::LinalgError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    #[error(transparent)]
    Sae(#[from] crate::sae::SaeError),
    #[error(transparent)]
    Subspace(#[from] crate::subspace::SubspaceError),
    #[error(transparent)]
    Theory(#[from] crate::theory::TheoryError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
}

pub type Result<T> = std::result::Result<T, Error>;
