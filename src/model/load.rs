//! From what the user names (`default`, a GGUF file, a Hugging Face directory, or an `org/name`
//! hub id found in the local Hugging Face cache) to a ready [`ChatModel`]: decoder, tokenizer and
//! the model's own chat template.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;

use super::chat::{ChatTemplate, Message};
use super::config::DecoderConfig;
use super::decoder::Decoder;
use super::gguf::GgufFile;
use super::tokenizer::Tokenizer;
use super::weights::WeightMap;
use super::ModelError;

/// The default model's asset name (SmolLM2-135M-Instruct, GGUF Q4_1).
pub const DEFAULT_MODEL_ASSET: &str = "smollm2-135m-instruct-q4_1";

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum ModelSource {
    Gguf(PathBuf),
    /// A directory with `config.json`, `*.safetensors` and `tokenizer.json`.
    HfDir(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p,
        }
    }

    /// Resolves a `--model` argument. `default` fetches the default model on first use.
    pub fn resolve(spec: &str) -> Result<Self, ModelError> {
        if spec == "default" {
            let path = crate::assets::ensure(DEFAULT_MODEL_ASSET)
                .map_err(|e| ModelError::Asset(Box::new(e)))?;
            return Ok(ModelSource::Gguf(path));
        }
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelSource::HfDir(path.to_path_buf()));
            }
            return Err(ModelError::MissingFile {
                path: path.join("config.json"),
                what: "Hugging Face config (is this a model directory?)",
            });
        }
        let parts: Vec<&str> = spec.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) && !spec.starts_with('.') {
            return hub_snapshot(spec, &hub_cache_dir()).map(ModelSource::HfDir);
        }
        Err(ModelError::Input(format!(
            "{spec:?} is neither a file, a model directory nor an org/name hub id"
        )))
    }
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("huggingface")
        });
    home.join("hub")
}

/// The snapshot directory of `org/name` in a Hugging Face cache
/// (`models--org--name/snapshots/<commit of refs/main>`).
pub fn hub_snapshot(repo_id: &str, cache: &Path) -> Result<PathBuf, ModelError> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let not_cached = |detail: String| ModelError::NotCached {
        repo_id: repo_id.to_string(),
        cache: cache.to_path_buf(),
        detail,
    };
    if !repo_dir.is_dir() {
        return Err(not_cached(format!("{} does not exist", repo_dir.display())));
    }
    let refs = repo_dir.join("refs/main");
    let commit = std::fs::read_to_string(&refs)
        .map_err(|e| not_cached(format!("{}: {e}", refs.display())))?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    if !snapshot.join("config.json").is_file() {
        return Err(not_cached(format!(
            "{} has no config.json",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// A chat model ready to run.
#[derive(Debug)]
pub struct ChatModel {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub source: ModelSource,
    pub load_ms: u128,
}

impl ChatModel {
    /// Loads weights (dequantised to f32, then cast to `dtype`), tokenizer and chat template.
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let start = Instant::now();
        let (decoder, tokenizer) = match source {
            ModelSource::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let config = file.decoder_config()?;
                let tokenizer = Tokenizer::from_gguf_metadata(file.metadata(), path)?;
                let mut weights = file.load_weight_map(device)?;
                (
                    Decoder::load(config, &mut weights, device, dtype)?,
                    tokenizer,
                )
            }
            ModelSource::HfDir(dir) => {
                let config = DecoderConfig::from_hf_file(&dir.join("config.json"))?;
                let tok_path = dir.join("tokenizer.json");
                if !tok_path.is_file() {
                    return Err(ModelError::MissingFile {
                        path: tok_path,
                        what: "tokenizer (tokenizer.json)",
                    });
                }
                let tokenizer = Tokenizer::from_file(&tok_path)?;
                let mut weights = WeightMap::from_safetensors_dir(dir, device)?;
                (
                    Decoder::load(config, &mut weights, device, dtype)?,
                    tokenizer,
                )
            }
        };
        if tokenizer.vocab_size() > decoder.config.vocab_size {
            return Err(ModelError::Input(format!(
                "{}: tokenizer has {} tokens but the model's embedding has {} rows",
                source.path().display(),
                tokenizer.vocab_size(),
                decoder.config.vocab_size
            )));
        }
        let template = tokenizer.chat_template()?;
        let load_ms = start.elapsed().as_millis();
        tracing::info!(model = %source.path().display(), load_ms, "model loaded");
        Ok(Self {
            decoder,
            tokenizer,
            template,
            source: source.clone(),
            load_ms,
        })
    }

    /// Token ids of a conversation rendered with the model's template, ready for the assistant.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .tokenizer
            .apply_chat_template(&self.template, messages, true)?)
    }
}
