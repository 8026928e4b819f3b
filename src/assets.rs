//! assets — models and data sets fetched from the package registry, verified by sha256, cached.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AssetError {}
