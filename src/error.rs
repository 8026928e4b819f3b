//! The library's error type: one enum per stage, wrapped here so callers can match on the stage.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error(transparent)]
    Explain(#[from] crate::explain::ExplainError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Sae(#[from] crate::sae::SaeError),
    #[error(transparent)]
    Subspace(#[from] crate::subspace::SubspaceError),
    #[error(transparent)]
    Theory(#[from] crate::theory::TheoryError),
}

pub type Result<T> = std::result::Result<T, Error>;
