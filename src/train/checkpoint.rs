//! Checkpoints: `checkpoints/step-NNNNNN/{params,optimizer}.safetensors` + `state.json`, written
//! into a temporary directory and renamed into place, then `checkpoints/latest` names the newest.
//! A crash mid-write leaves the previous checkpoint and `latest` untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::{Result, TrainConfig, TrainError};
use crate::lora::Trainable;
use crate::model::weights::{load_safetensors_file, save_safetensors_atomic};

pub const FORMAT_VERSION: u32 = 1;

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// The optimizer's own step counter (bias corrections).
    pub optimizer_t: u64,
    /// The configuration the run was started with; a resume must use the same.
    pub config: TrainConfig,
    /// Names of the trained tensors, in order.
    pub params: Vec<String>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Saves parameters, optimizer moments and state after `step` optimizer steps. If the write
/// fails (a full disk, say), the partial checkpoint is removed and the error names the last
/// complete one, which `--resume` continues from.
pub fn save(
    out: &Path,
    step: usize,
    cfg: &TrainConfig,
    trainable: &Trainable,
    opt: &AdamW,
) -> Result<PathBuf> {
    if let Some(name) = super::first_non_finite(trainable)? {
        return Err(TrainError::NonFiniteParameter {
            name,
            step,
            last_checkpoint: latest(out)?,
        });
    }
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
    remove_partial(&root)?;
    let name = format!("step-{step:06}");
    let tmp = root.join(format!("{PARTIAL_PREFIX}{name}-{}", std::process::id()));
    let written = write_files(&tmp, step, cfg, trainable, opt).and_then(|()| {
        let dest = root.join(&name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
        crate::model::write_atomic(&root.join("latest"), name.as_bytes())?;
        Ok(dest)
    });
    match written {
        Ok(dest) => {
            tracing::debug!(path = %dest.display(), step, "checkpoint written");
            Ok(dest)
        }
        Err(source) => {
            // Best effort: a full disk would otherwise stay full of the part written.
            let _ = std::fs::remove_dir_all(&tmp);
            Err(TrainError::CheckpointWrite {
                step,
                source: Box::new(source),
                last_checkpoint: latest(out).ok().flatten(),
            })
        }
    }
}

/// Name prefix of a checkpoint being written.
const PARTIAL_PREFIX: &str = ".tmp-";

/// Removes what a killed run left half-written. Safe because one process writes a run folder
/// at a time (the run lock).
fn remove_partial(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
        let path = entry.map_err(|e| io(root, e))?.path();
        let partial = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PARTIAL_PREFIX));
        if partial && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

fn write_files(
    dir: &Path,
    step: usize,
    cfg: &TrainConfig,
    trainable: &Trainable,
    opt: &AdamW,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut params = HashMap::new();
    let mut moments = HashMap::new();
    for (key, var) in &trainable.vars {
        let value = var.as_tensor().detach();
        params.insert(key.clone(), value.copy()?);
        if let (Some(m), Some(v)) = (opt.exp_avg.get(key), opt.exp_avg_sq.get(key)) {
            moments.insert(format!("{key}.exp_avg"), m.clone());
            moments.insert(format!("{key}.exp_avg_sq"), v.clone());
        }
    }
    save_safetensors_atomic(&params, &dir.join("params.safetensors"))?;
    save_safetensors_atomic(&moments, &dir.join("optimizer.safetensors"))?;
    let state = CheckpointState {
        format_version: FORMAT_VERSION,
        step,
        optimizer_t: opt.t,
        config: cfg.clone(),
        params: trainable.vars.keys().cloned().collect(),
    };
    let json = serde_json::to_string_pretty(&state).map_err(|e| io(dir, e))?;
    crate::model::write_atomic(&dir.join("state.json"), json.as_bytes())?;
    Ok(())
}

/// The checkpoint `checkpoints/latest` names, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints_dir(out).join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(|e| io(&pointer, e))?;
    let dir = checkpoints_dir(out).join(name.trim());
    if !dir.join("state.json").is_file() {
        return Err(io(
            &pointer,
            format!("names {} which has no state.json", dir.display()),
        ));
    }
    Ok(Some(dir))
}

pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| io(&path, e))?;
    if state.format_version != FORMAT_VERSION {
        return Err(io(
            &path,
            format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    Ok(state)
}

/// Loads a checkpoint's parameters into the `Var`s and its moments into the optimizer.
pub fn restore(
    dir: &Path,
    trainable: &Trainable,
    opt: &mut AdamW,
    device: &Device,
) -> Result<CheckpointState> {
    let state = read_state(dir)?;
    let names: Vec<String> = trainable.vars.keys().cloned().collect();
    if state.params != names {
        return Err(io(
            dir,
            format!(
                "holds {} tensors that differ from the {} trainable ones (another init or targets?)",
                state.params.len(),
                names.len()
            ),
        ));
    }
    let params_path = dir.join("params.safetensors");
    let params = load_safetensors_file(&params_path, device)?;
    let moments_path = dir.join("optimizer.safetensors");
    let moments = load_safetensors_file(&moments_path, device)?;
    let take = |map: &HashMap<String, Tensor>, key: &str, path: &Path| {
        map.get(key)
            .cloned()
            .ok_or_else(|| io(path, format!("missing tensor {key}")))
    };
    opt.exp_avg.clear();
    opt.exp_avg_sq.clear();
    for (key, var) in &trainable.vars {
        let value = take(&params, key, &params_path)?;
        if value.dims() != var.dims() {
            return Err(io(
                &params_path,
                format!(
                    "{key} has shape {:?}, the model's is {:?}",
                    value.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&value)?;
        if state.optimizer_t > 0 {
            opt.exp_avg.insert(
                key.clone(),
                take(&moments, &format!("{key}.exp_avg"), &moments_path)?,
            );
            opt.exp_avg_sq.insert(
                key.clone(),
                take(&moments, &format!("{key}.exp_avg_sq"), &moments_path)?,
            );
        }
    }
    opt.t = state.optimizer_t;
    Ok(state)
}
