//! lora — the LoRA-initialisation stage: which modules get an adapter, how its factors start,
//! and what the trainer may change.
//!
//! In: a loaded [`Decoder`] (f32) and a [`LoraConfig`] (for SAILS, the per-layer subspace bases
//! `U_l`). Out: a [`Trainable`] — the training `Var`s by name, already placed in the model's LoRA
//! slots — which exports a PEFT adapter (`model::lora::Adapter`) plus a provenance file.
//!
//! The init methods (DESIGN.md §1 step 5):
//! - [`LoraInit::Kaiming`]: PEFT's default, `A ~ U(±1/√in)` (kaiming-uniform with a = √5), `B = 0`.
//! - [`LoraInit::Gaussian`]: PEFT's `"gaussian"`, `A ~ N(0, (1/r)²)`, `B = 0`.
//! - [`LoraInit::Subspace`]: read-side modules (q, k, v, gate, up: input = residual stream)
//!   `A = U_lᵀ`, `B = 0`; write-side modules (o, down: output = residual stream) `B = U_l`, `A = 0`.
//!   `U_l` is used as is (not rescaled by the preceding norm's weight).
//! - [`LoraInit::Full`]: full fine-tuning of the targeted weights; no adapter.
//!
//! Every method except `Full` gives `ΔW = B·A = 0` exactly, so the model's outputs are unchanged
//! at step 0. Random draws come from a seeded `StdRng` (candle's RNG cannot be seeded).

mod init;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use serde::Serialize;
use thiserror::Error;

use crate::model::lora::{Adapter, AdapterConfig};
use crate::model::ModelError;

pub use init::{inject, inject_adapter};

/// The modules that read the residual stream (their input is `d_model`).
pub const READ_SIDE: &[&str] = &["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
/// The modules that write to the residual stream (their output is `d_model`).
pub const WRITE_SIDE: &[&str] = &["o_proj", "down_proj"];

/// PEFT's key prefix: `base_model.model.<HF module name>.lora_{A,B}.weight`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What gets adapted and how it starts.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// LoRA rank r (the paper: 16).
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r` (`alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Module-name suffixes to adapt (`q_proj`) or full module names, as PEFT's `target_modules`.
    pub targets: Vec<String>,
    /// rsLoRA scaling `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    pub init: LoraInit,
}

impl LoraConfig {
    /// PEFT-like defaults: rank 16, alpha 32, q/k/v/o, Kaiming init.
    pub fn new(init: LoraInit) -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: default_targets(),
            rslora: false,
            init,
        }
    }

    /// The adapter's scale `alpha / r` (or `alpha / √r`).
    pub fn scale(&self) -> f64 {
        self.adapter_config(None).scale()
    }

    /// The PEFT `adapter_config.json` this configuration exports as.
    pub fn adapter_config(&self, base_model: Option<String>) -> AdapterConfig {
        AdapterConfig {
            r: self.rank,
            lora_alpha: self.alpha,
            target_modules: self.targets.clone(),
            lora_dropout: 0.0,
            use_rslora: self.rslora,
            base_model_name_or_path: base_model,
        }
    }
}

/// `q_proj, k_proj, v_proj, o_proj` (the paper's targets; 0.19 % of Gemma-2-9B at rank 16).
pub fn default_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// How the adapter's factors start.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// PEFT default: `A` kaiming-uniform (a = √5, i.e. `U(±1/√in)`), `B = 0`.
    Kaiming,
    /// PEFT `"gaussian"`: `A ~ N(0, (1/r)²)`, `B = 0`.
    Gaussian,
    /// SAILS: the SAE-feature subspace. `bases[l]` is `U_l`, `(d_model, r)` with orthonormal
    /// columns, for block `l` (the residual stream entering it, `Resid::In(l)`); a block without
    /// its own basis takes the nearest layer's (the lower one on a tie).
    Subspace {
        bases: BTreeMap<usize, Tensor>,
        /// The basis factor (`A` read-side, `B` write-side) stays a plain tensor with no gradient,
        /// so every update stays inside the subspace.
        freeze_basis: bool,
    },
    /// Full fine-tuning: the targeted weights themselves become trainable; no adapter.
    Full,
}

impl LoraInit {
    /// The spelling used in provenance files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            LoraInit::Kaiming => "kaiming",
            LoraInit::Gaussian => "gaussian",
            LoraInit::Subspace { .. } => "subspace",
            LoraInit::Full => "full",
        }
    }
}

#[derive(Debug, Error)]
pub enum LoraError {
    #[error(
        "target module {target:?} matches no module of the model (modules look like {example:?})"
    )]
    NoMatchingModule { target: String, example: String },
    #[error("rank must be positive")]
    ZeroRank,
    #[error(
        "training needs an f32 model (f32 master weights in the LoRA slots); this one is {dtype:?}"
    )]
    NotF32 { dtype: candle_core::DType },
    #[error("{module} already carries a LoRA adapter; clear it before injecting a new one")]
    AlreadyAdapted { module: String },
    #[error("subspace init needs at least one layer basis")]
    NoBasis,
    #[error(
        "basis for layer {layer} has shape {got:?}, expected ({d_model}, {rank}) = (d_model, rank)"
    )]
    BasisShape {
        layer: usize,
        got: Vec<usize>,
        d_model: usize,
        rank: usize,
    },
    #[error("basis for layer {layer}, but the model has {num_layers} layers")]
    BasisLayer { layer: usize, num_layers: usize },
    #[error("{module}: subspace init knows read-side modules {READ_SIDE:?} and write-side modules {WRITE_SIDE:?}, not this one")]
    UnknownSide { module: String },
    #[error("{module}: its {side} dimension is {got}, not d_model {d_model}")]
    SideDim {
        module: String,
        side: &'static str,
        got: usize,
        d_model: usize,
    },
    #[error("{module}: adapter factors A {a:?} / B {b:?} do not fit, expected {expected_a:?} / {expected_b:?}")]
    AdapterShape {
        module: String,
        a: Vec<usize>,
        b: Vec<usize>,
        expected_a: Vec<usize>,
        expected_b: Vec<usize>,
    },
    #[error("full fine-tuning exports weights, not a LoRA adapter")]
    NotAnAdapter,
    #[error("{path}: weight {name:?} {problem}")]
    FullWeight {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LoraError>;

/// What an init did, written beside the exported adapter (`sails_lora.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub format_version: u32,
    pub init: &'static str,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub seed: u64,
    /// Subspace only: whether the basis factor was frozen.
    pub freeze_basis: Option<bool>,
    /// Subspace only: which basis layer each block took (block → basis layer).
    pub basis_for_block: BTreeMap<usize, usize>,
    /// Subspace only: how `U_l` entered the read-side `A` (`"as_is"`; not rescaled by the norm).
    pub read_side_basis: Option<&'static str>,
    pub adapted_modules: usize,
    pub trainable_params: usize,
}

/// The trainable side of a model after [`inject`]: the `Var`s by name, in a fixed order.
///
/// Names are PEFT keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) for
/// adapters and Hugging Face weight names (`model.layers.0.self_attn.q_proj.weight`) for full
/// fine-tuning. The model's slots hold the same storage, so updating a `Var` updates the model.
#[derive(Debug, Clone)]
pub struct Trainable {
    pub vars: BTreeMap<String, Var>,
    /// Factors that are part of the adapter but not trained (a frozen basis).
    pub frozen: BTreeMap<String, Tensor>,
    /// `None` for full fine-tuning.
    pub adapter: Option<AdapterConfig>,
    pub provenance: Provenance,
}

impl Trainable {
    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The current factors as a PEFT adapter (plain tensors, detached from training).
    pub fn to_adapter(&self) -> Result<Adapter> {
        let config = self.adapter.clone().ok_or(LoraError::NotAnAdapter)?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let all = self
            .vars
            .iter()
            .map(|(k, v)| (k, v.as_tensor()))
            .chain(self.frozen.iter());
        for (key, tensor) in all {
            let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
            let tensor = tensor.detach().copy()?;
            if let Some(module) = rest.strip_suffix(".lora_A.weight") {
                halves.entry(module.to_string()).or_default().0 = Some(tensor);
            } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
                halves.entry(module.to_string()).or_default().1 = Some(tensor);
            }
        }
        let mut weights = std::collections::HashMap::new();
        for (module, pair) in halves {
            if let (Some(a), Some(b)) = pair {
                weights.insert(module, (a, b));
            }
        }
        Ok(Adapter { config, weights })
    }

    /// Writes the trained state: a PEFT adapter directory (adapter) or `model.safetensors` with
    /// the trained weights (full fine-tuning), plus `sails_lora.json` (provenance).
    pub fn save(&self, dir: &Path) -> Result<()> {
        match &self.adapter {
            Some(_) => self.to_adapter()?.save(dir)?,
            None => {
                let tensors = self
                    .vars
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
                    .collect::<Result<std::collections::HashMap<_, _>>>()?;
                crate::model::weights::save_safetensors_atomic(
                    &tensors,
                    &dir.join("model.safetensors"),
                )?;
            }
        }
        let json = serde_json::to_string_pretty(&self.provenance).map_err(|e| LoraError::Io {
            path: dir.join("sails_lora.json"),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(&dir.join("sails_lora.json"), json.as_bytes())?;
        Ok(())
    }
}

/// File of the trained weights that full fine-tuning writes instead of an adapter.
pub const FULL_WEIGHTS_FILE: &str = "model.safetensors";

/// Puts the weights a full fine-tuning run saved (`dir/model.safetensors`, Hugging Face names
/// `model.layers.N.self_attn.q_proj.weight`) into `model`, checking every name and shape; the
/// inverse of [`Trainable::save`] for [`LoraInit::Full`]. Call it before
/// `Decoder::set_decode_weights`, which copies the weights for decoding. Returns how many weights
/// were replaced.
///
/// `adapter_scale` multiplies the update as it does an adapter's: each weight becomes
/// `s·W_trained + (1 − s)·W_base`, i.e. `W_base + s·(W_trained − W_base)`, written so that s = 1
/// gives the trained weight and s = 0 the base weight bit for bit.
pub fn apply_full_weights(
    model: &mut crate::model::decoder::Decoder,
    dir: &Path,
    adapter_scale: f64,
) -> Result<usize> {
    let path = dir.join(FULL_WEIGHTS_FILE);
    crate::model::lora::check_adapter_scale(adapter_scale)?;
    let mut tensors = crate::model::weights::load_safetensors_file(&path, model.device())?;
    let bad = |name: &str, problem: String| LoraError::FullWeight {
        path: path.clone(),
        name: name.to_string(),
        problem,
    };
    let mut replaced = 0;
    for (module, linear) in model.linear_layers_mut() {
        let key = format!("{module}.weight");
        if let Some(t) = tensors.remove(&key) {
            if t.dims() != linear.weight.dims() {
                return Err(bad(
                    &key,
                    format!(
                        "is {:?}, the model's is {:?}",
                        t.dims(),
                        linear.weight.dims()
                    ),
                ));
            }
            let t = t.to_dtype(linear.weight.dtype())?;
            let t = ((t * adapter_scale)? + (&linear.weight * (1.0 - adapter_scale))?)?;
            linear.set_weight(t)?;
            replaced += 1;
        }
    }
    if let Some(name) = tensors.keys().next() {
        return Err(bad(name, "matches no linear layer of the model".into()));
    }
    Ok(replaced)
}
