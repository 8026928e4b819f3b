//! Named weight tensors from safetensors files, taken one by one with shape checks, so a missing,
//! misshapen or unexpected tensor is an error that names the tensor and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::blocks::BlockRows;
use super::ModelError;

/// Tensors by Hugging Face name. `take` removes them; `finish` refuses leftovers.
#[derive(Debug)]
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    /// Quantised blocks some tensors were dequantised from (GGUF), by the same names.
    blocks: HashMap<String, BlockRows>,
    /// Where the tensors came from, for error messages.
    source: PathBuf,
}

/// Tensors the runtime recomputes itself and may find in older checkpoints.
const IGNORABLE_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

impl WeightMap {
    pub fn new(tensors: HashMap<String, Tensor>, source: PathBuf) -> Self {
        Self {
            tensors,
            blocks: HashMap::new(),
            source,
        }
    }

    pub fn with_blocks(mut self, blocks: HashMap<String, BlockRows>) -> Self {
        self.blocks = blocks;
        self
    }

    /// Removes and returns the blocks `name` was dequantised from, when they are a
    /// `(rows, cols)` matrix.
    pub fn take_blocks(&mut self, name: &str, rows: usize, cols: usize) -> Option<BlockRows> {
        self.blocks
            .remove(name)
            .filter(|b| b.rows == rows && b.cols == cols)
    }

    /// Loads every `*.safetensors` file of a Hugging Face model directory (one file or shards
    /// listed by `model.safetensors.index.json`), as f32 on `device`.
    pub fn from_safetensors_dir(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index.clone(),
                    message: format!("not valid JSON: {e}"),
                })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    message: "no \"weight_map\" object".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::MissingFile {
                    path: single,
                    what: "model weights (model.safetensors or model.safetensors.index.json)",
                });
            }
            vec![single]
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for (name, tensor) in load_safetensors_file(file, device)? {
                tensors.insert(name, tensor);
            }
        }
        Ok(Self::new(tensors, dir.to_path_buf()))
    }

    /// Removes and returns `name`, checking its shape; converts to f32.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                path: self.source.clone(),
            })?;
        if tensor.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: self.source.clone(),
                expected: shape.to_vec(),
                got: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.to_dtype(DType::F32)?)
    }

    /// Errors if tensors were left untaken: a checkpoint with weights the model does not use is
    /// a different model.
    pub fn finish(&mut self) -> Result<(), ModelError> {
        let mut left: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !IGNORABLE_SUFFIXES.iter().any(|s| k.ends_with(s)))
            .cloned()
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(ModelError::UnexpectedTensors {
            path: self.source.clone(),
            names: left,
        })
    }
}

/// Reads one safetensors file, with errors naming it (a truncated file is caught by the header's
/// offsets running past the end).
pub fn load_safetensors_file(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| ModelError::CorruptFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes tensors to a safetensors file atomically (temp file + rename, as
/// [`crate::model::write_atomic`]).
pub fn save_safetensors_atomic(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), ModelError> {
    let tmp = crate::model::atomic_temp(path)?;
    candle_core::safetensors::save(tensors, tmp.path()).map_err(|e| match io_cause(&e) {
        // A full disk or a lost mount reads as the file it hit, not as a tensor error.
        Some(source) => ModelError::Io {
            path: path.to_path_buf(),
            source,
        },
        None => ModelError::Tensor(e),
    })?;
    crate::model::persist_atomic(tmp, path)
}

/// The operating system's error at the root of `err`, if there is one.
fn io_cause(err: &(dyn std::error::Error + 'static)) -> Option<std::io::Error> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(match io.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(io.kind(), io.to_string()),
            });
        }
        cause = e.source();
    }
    None
}
