//! Chat templates: the model's own Jinja template rendered with minijinja.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ChatError {}
