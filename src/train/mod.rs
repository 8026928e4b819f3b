//! train — supervised fine-tuning of the trainable tensors (`lora::Trainable`) on chat examples,
//! loss on the response tokens only (DESIGN.md §1 step 6).
//!
//! In: a [`Decoder`] whose LoRA slots (or weights) hold the `Var`s of a [`Trainable`], tokenized
//! examples, a [`TrainConfig`]. Out: the trained `Var`s (in place), checkpoints, and
//! `loss_curve.jsonl` in the output directory.
//!
//! The whole step is in [`run`]'s loop: learning rate from [`lr_at`], micro-batches (forward,
//! response-token loss divided by the step's target count, backward, gradients summed), global
//! norm clipping, AdamW, logging, held-out loss, checkpoint. A resumed run equals an uninterrupted
//! one bit for bit (same machine and thread count): the batch order is a pure function of
//! `(seed, epoch)` and the checkpoint holds the f32 parameters and both moments exactly.
//!
//! With `dpo_weight > 0` each step also draws preference pairs and adds the DPO term ([`dpo`]):
//! its gradients are summed with the SFT ones before clipping, and its reference log-probs are
//! computed once into the output directory.

pub mod checkpoint;
pub mod data;
pub mod dpo;
pub mod fast;
pub mod loss;
pub mod optim;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lora::Trainable;
use crate::model::decoder::Decoder;
use crate::model::ModelError;

pub use data::{tokenize_chat, Batch, BatchPlan, ChatExample, Target, TokenizedExample};
pub use dpo::{dpo_loss_and_grads, DpoStats, PairBatch, TokenizedPair};
pub use loss::{response_token_loss, retain_kl_sum, LossOutput};
pub use optim::{clip_grad_norm, lr_at, AdamW};

/// Every setting of a training run. Saved into each checkpoint; a resume must match it. A
/// config file may name only some fields; the others take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate (after warm-up). 2e-4 is the usual LoRA SFT value (PEFT/TRL examples);
    /// full fine-tuning wants about ten times less.
    pub lr_peak: f64,
    /// Learning rate at the end of the cosine decay; a tenth of the peak, as nanoGPT.
    pub lr_min: f64,
    /// Optimizer steps of linear warm-up, so the first updates of the fresh moments stay small.
    pub warmup_steps: usize,
    /// Total optimizer steps; the cosine reaches `lr_min` here.
    pub max_steps: usize,
    /// Examples per micro-batch (left-padded to the longest; batches are length-bucketed).
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the loss is one mean over all their response tokens.
    pub grad_accum_steps: usize,
    /// Clip the global gradient L2 norm to this (as `clip_grad_norm_`); `None` = no clipping.
    /// 1.0 is HF Trainer's default.
    pub max_grad_norm: Option<f64>,
    /// Decoupled weight decay (AdamW), per step `p ← p·(1 − lr·wd)`. 0 is HF Trainer's default
    /// (torch's own AdamW default is 0.01, so it is set here explicitly).
    pub weight_decay: f64,
    /// AdamW β1 (first-moment decay), torch default.
    pub beta1: f64,
    /// AdamW β2 (second-moment decay), torch default.
    pub beta2: f64,
    /// AdamW ε, added after the bias correction (torch), torch default.
    pub eps: f64,
    /// Seed of the data order (shuffles and bucket order).
    pub seed: u64,
    /// Longest example in tokens; a longer one is an error (nothing is truncated silently).
    pub max_seq_len: usize,
    /// Held-out loss every this many optimizer steps (and at the end); `None` = never.
    pub eval_every: Option<usize>,
    /// Checkpoint every this many optimizer steps; one is always written at the end and on
    /// interruption. `None` = only those.
    pub checkpoint_every: Option<usize>,
    /// Weight λ of the retain term: each step's loss adds λ·Σ KL(base ‖ adapted) of the next-token
    /// distributions at the response tokens of retain (benign) examples, divided by the same
    /// target count as the NLL, so the adapter moves the model only where it must. The base is
    /// the model with the adapter switched off. 0 = no retain term (and no extra forward pass);
    /// left out of saved configs then, so those written before it existed still compare equal.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retain_kl: f64,
    /// Weight w of the DPO term ([`dpo`]): each step's loss adds w · the mean over the step's
    /// preference pairs of −log σ(margin). 0 = off (no pairs read, no reference computed); left
    /// out of saved configs then, as `retain_kl`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dpo_weight: f64,
    /// DPO's β: how far, in log-probability ratios to the reference, the model may move before a
    /// pair's loss saturates. 0.1 is the DPO paper's and TRL's default. Left out of saved
    /// configs at that value.
    #[serde(
        default = "default_dpo_beta",
        skip_serializing_if = "is_default_dpo_beta"
    )]
    pub dpo_beta: f64,
    /// Preference pairs per optimizer step; `None` = `batch_size` (each pair is two sequences,
    /// run in micro-batches of `batch_size / 2` pairs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo_pairs_per_step: Option<usize>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_dpo_beta() -> f64 {
    0.1
}

fn is_default_dpo_beta(x: &f64) -> bool {
    *x == default_dpo_beta()
}

impl TrainConfig {
    /// Preference pairs per optimizer step ([`TrainConfig::dpo_pairs_per_step`]).
    pub fn dpo_pairs(&self) -> usize {
        self.dpo_pairs_per_step.unwrap_or(self.batch_size)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr_peak: 2e-4,
            lr_min: 2e-5,
            warmup_steps: 10,
            max_steps: 200,
            batch_size: 4,
            grad_accum_steps: 1,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            max_seq_len: 1024,
            eval_every: Some(50),
            checkpoint_every: Some(50),
            retain_kl: 0.0,
            dpo_weight: 0.0,
            dpo_beta: default_dpo_beta(),
            dpo_pairs_per_step: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("example {index}: {message}")]
    Example { index: usize, message: String },
    #[error("example {index} has {len} tokens, more than max_seq_len {max}")]
    TooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("no training examples")]
    NoData,
    #[error("invalid config: {0}")]
    Config(String),
    #[error("step {step}: the loss is {loss} (not finite); training stopped. Last good checkpoint: {}", last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string()))]
    NonFiniteLoss {
        step: usize,
        loss: f64,
        last_checkpoint: Option<PathBuf>,
    },
    #[error("step {step}: the gradient norm is {norm} (not finite); training stopped. Last good checkpoint: {}", last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string()))]
    NonFiniteGradient {
        step: usize,
        norm: f64,
        last_checkpoint: Option<PathBuf>,
    },
    #[error("step {step}: parameter {name} is not finite after the update; training stopped. Last good checkpoint: {}", last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string()))]
    NonFiniteParameter {
        name: String,
        step: usize,
        last_checkpoint: Option<PathBuf>,
    },
    #[error("{name} received no gradient: something on its path does not record a backward")]
    NoGradient { name: String },
    #[error("step {step}: the checkpoint could not be written: {source}. Training stopped; last complete checkpoint: {}", last_checkpoint.as_ref().map_or("none (nothing to resume)".to_string(), |p| format!("{} (free space, then rerun with --resume)", p.display())))]
    CheckpointWrite {
        step: usize,
        source: Box<TrainError>,
        last_checkpoint: Option<PathBuf>,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(
        "resuming with a different config than the checkpoint's: {field} was {saved}, now {now}"
    )]
    ConfigChanged {
        field: String,
        saved: String,
        now: String,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "{path}: the DPO reference was computed for preference pairs with sha256 {saved}, but \
         the pairs now hash to {now}; resume with the same data (and model), or start afresh"
    )]
    DpoDataChanged {
        path: PathBuf,
        saved: String,
        now: String,
    },
    #[error("the last block's output was not captured")]
    NoCapture,
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// The examples of a run.
#[derive(Debug, Clone, Copy)]
pub struct TrainData<'a> {
    pub train: &'a [TokenizedExample],
    pub eval: &'a [TokenizedExample],
    /// Preference pairs for the DPO term (read only when `dpo_weight > 0`).
    pub pairs: &'a [TokenizedPair],
    /// Held-out preference pairs, scored with the held-out loss.
    pub eval_pairs: &'a [TokenizedPair],
    /// Id written at pad positions (masked, never scored).
    pub pad_id: u32,
}

/// Where and how a run goes, apart from its config.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions<'a> {
    /// Checkpoints and `loss_curve.jsonl` go here.
    pub out_dir: &'a Path,
    /// Continue from `out_dir`'s latest checkpoint.
    pub resume: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
    /// Stop, with a checkpoint, once this many steps are done, as if interrupted there.
    pub stop_after: Option<usize>,
    /// Show a progress bar on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
}

/// One line of `loss_curve.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CurveRecord {
    Train {
        /// Optimizer steps done, this one included.
        step: usize,
        loss: f64,
        lr: f64,
        /// Before clipping.
        grad_norm: f64,
        targets: usize,
        /// Real tokens of the step's SFT batches and, with DPO, of its pairs.
        tokens: usize,
        tokens_per_s: f64,
        /// Mean KL(base ‖ adapted) over the step's retain targets; absent when `retain_kl` is 0
        /// or the step had none. `loss` is the NLL alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retain_kl: Option<f64>,
        /// Mean DPO loss −log σ(m) of the step's pairs (absent without DPO).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_loss: Option<f64>,
        /// Mean margin m of the step's pairs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_margin: Option<f64>,
        /// Share of the step's pairs with m > 0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_accuracy: Option<f64>,
    },
    Eval {
        step: usize,
        loss: f64,
        targets: usize,
        /// The same three over the held-out pairs (absent without DPO or held-out pairs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_loss: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_margin: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dpo_accuracy: Option<f64>,
    },
}

impl CurveRecord {
    pub fn step(&self) -> usize {
        match self {
            CurveRecord::Train { step, .. } | CurveRecord::Eval { step, .. } => *step,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps completed (in total, including those before a resume).
    pub steps: usize,
    pub resumed_from: Option<usize>,
    /// Stopped early by the stop flag or `stop_after`.
    pub interrupted: bool,
    /// Mean NLL of the last step (without the retain term).
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub tokens_per_s: f64,
}

/// What a step's loss is made of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    /// `(Σ NLL + λ·Σ KL) / n_total`: the objective the step's gradients are of.
    pub total: f64,
    /// `Σ NLL / n_total`: the mean NLL of the step's targets.
    pub nll: f64,
    /// `Σ KL / n_retain`: the mean KL(base ‖ adapted) of the step's retain targets; `None` when
    /// λ = 0 or the step has none.
    pub retain_kl: Option<f64>,
}

impl StepLoss {
    fn new(nll_sum: f64, kl_sum: f64, n_retain: usize, n_total: usize, retain_kl: f64) -> Self {
        Self {
            total: (nll_sum + retain_kl * kl_sum) / n_total as f64,
            nll: nll_sum / n_total as f64,
            retain_kl: (n_retain > 0).then(|| kl_sum / n_retain as f64),
        }
    }
}

/// The same model with every LoRA slot removed: the base distribution of the retain term and the
/// DPO reference. The clone shares the weights' storage, so it costs no copy.
fn without_adapter(decoder: &Decoder) -> Decoder {
    let mut base = decoder.clone();
    crate::model::lora::clear(&mut base);
    base
}

/// Sum of the gradients of `(Σ NLL + retain_kl·Σ KL) / n_total` over `batches`, for every `Var`
/// in `params` order, and the step's loss. LoRA factors of Llama-style models take the
/// hand-written step ([`fast`]), everything else candle's autodiff ([`autodiff_loss_and_grads`]).
pub fn loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[Batch],
    retain_kl: f64,
) -> Result<(StepLoss, Vec<Tensor>)> {
    if fast::applies(decoder, params) {
        fast::loss_and_grads(decoder, params, batches, retain_kl)
    } else {
        autodiff_loss_and_grads(decoder, params, batches, retain_kl)
    }
}

/// [`loss_and_grads`] through candle's autodiff over [`Decoder::forward`]: any architecture, any
/// trainable tensor.
pub fn autodiff_loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[Batch],
    retain_kl: f64,
) -> Result<(StepLoss, Vec<Tensor>)> {
    let n_total: usize = batches.iter().map(|b| b.targets.len()).sum();
    if n_total == 0 {
        return Err(TrainError::Internal("a step with no target tokens".into()));
    }
    let base = (retain_kl > 0.0).then(|| without_adapter(decoder));
    let mut grads = GradSum::new(params);
    let (mut nll_sum, mut kl_sum, mut n_retain) = (0f64, 0f64, 0usize);
    let scalar = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
    };
    for batch in batches {
        let out = response_token_loss(decoder, batch)?;
        nll_sum += scalar(&out.sum)?;
        let mut objective = out.sum.clone();
        if let Some(base) = &base {
            if let Some((kl, n)) = retain_kl_sum(base, batch, &out.logits)? {
                kl_sum += scalar(&kl)?;
                n_retain += n;
                objective = (objective + (kl * retain_kl)?)?;
            }
        }
        grads.add(&(objective / n_total as f64)?.backward()?)?;
    }
    Ok((
        StepLoss::new(nll_sum, kl_sum, n_retain, n_total, retain_kl),
        grads.finish()?,
    ))
}

/// The gradients of several backward passes, summed per `Var` in `params` order.
pub(crate) struct GradSum<'a> {
    params: &'a [(&'a String, &'a Var)],
    sums: Vec<Option<Tensor>>,
}

impl<'a> GradSum<'a> {
    pub(crate) fn new(params: &'a [(&'a String, &'a Var)]) -> Self {
        Self {
            params,
            sums: vec![None; params.len()],
        }
    }

    /// Adds one backward pass; every `Var` must have received a gradient.
    pub(crate) fn add(&mut self, store: &GradStore) -> Result<()> {
        for (slot, (name, var)) in self.sums.iter_mut().zip(self.params) {
            let g = store
                .get(var.as_tensor())
                .ok_or_else(|| TrainError::NoGradient {
                    name: (*name).clone(),
                })?;
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<Vec<Tensor>> {
        self.sums
            .into_iter()
            .map(|g| g.ok_or_else(|| TrainError::Internal("empty step".into())))
            .collect()
    }
}

/// Mean response-token loss over `examples` (no gradient taken).
pub fn eval_loss(
    decoder: &Decoder,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    let mut order: Vec<&TokenizedExample> = examples.iter().collect();
    order.sort_by_key(|e| e.ids.len());
    let forward_only = fast::forward_applies(decoder);
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = Batch::left_padded(chunk, pad_id, decoder.device())?;
        if forward_only {
            sum += fast::batch_loss(decoder, &batch)?;
            n += batch.targets.len();
        } else {
            let out = response_token_loss(decoder, &batch)?;
            sum += out
                .sum
                .detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            n += out.n_targets;
        }
    }
    Ok((if n == 0 { f64::NAN } else { sum / n as f64 }, n))
}

/// The first trainable tensor holding a NaN or an infinity.
pub fn first_non_finite(trainable: &Trainable) -> Result<Option<String>> {
    for (name, var) in &trainable.vars {
        let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        if values.iter().any(|x| !x.is_finite()) {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

fn validate(cfg: &TrainConfig, data: &TrainData<'_>, trainable: &Trainable) -> Result<()> {
    let bad = |m: &str| Err(TrainError::Config(m.to_string()));
    if cfg.batch_size == 0 || cfg.grad_accum_steps == 0 {
        return bad("batch_size and grad_accum_steps must be positive");
    }
    if cfg.warmup_steps > cfg.max_steps {
        return bad("warmup_steps exceeds max_steps");
    }
    if !(cfg.lr_peak >= 0.0 && cfg.lr_min >= 0.0) {
        return bad("learning rates must be non-negative");
    }
    if cfg.eval_every == Some(0) || cfg.checkpoint_every == Some(0) {
        return bad("eval_every / checkpoint_every must be positive (or absent)");
    }
    if !(cfg.retain_kl.is_finite() && cfg.retain_kl >= 0.0) {
        return bad("retain_kl must be finite and non-negative");
    }
    if !(cfg.dpo_weight.is_finite() && cfg.dpo_weight >= 0.0) {
        return bad("dpo_weight must be finite and non-negative");
    }
    if !(cfg.dpo_beta.is_finite() && cfg.dpo_beta > 0.0) {
        return bad("dpo_beta must be finite and positive");
    }
    if cfg.dpo_pairs_per_step == Some(0) {
        return bad("dpo_pairs_per_step must be positive (or absent: batch_size)");
    }
    if data.train.is_empty() {
        return Err(TrainError::NoData);
    }
    if cfg.dpo_weight > 0.0 {
        // The reference is the model with the adapter off; full fine-tuning has none.
        if trainable.adapter.is_none() {
            return bad("dpo_weight needs a LoRA adapter (full fine-tuning has no reference)");
        }
        if data.pairs.is_empty() {
            return bad("dpo_weight is set but there are no preference pairs");
        }
        let mut ids = std::collections::HashSet::new();
        if let Some(p) = data
            .pairs
            .iter()
            .chain(data.eval_pairs)
            .find(|p| !ids.insert(&p.id))
        {
            return bad(&format!("preference pair id {:?} appears twice", p.id));
        }
    }
    if cfg.retain_kl > 0.0 {
        // The base is the model with the adapter off; full fine-tuning changes the base itself.
        if trainable.adapter.is_none() {
            return bad("retain_kl needs a LoRA adapter (full fine-tuning has no base to keep)");
        }
        if !data.train.iter().any(|e| e.retain) {
            return bad("retain_kl is set but no training example is a retain example");
        }
    }
    let pair_rows = data
        .pairs
        .iter()
        .chain(data.eval_pairs)
        .filter(|_| cfg.dpo_weight > 0.0)
        .flat_map(|p| [&p.chosen, &p.rejected]);
    for (index, e) in data
        .train
        .iter()
        .chain(data.eval)
        .chain(pair_rows)
        .enumerate()
    {
        if e.ids.len() > cfg.max_seq_len {
            return Err(TrainError::TooLong {
                index,
                len: e.ids.len(),
                max: cfg.max_seq_len,
            });
        }
        if e.target_start == 0 || e.target_end <= e.target_start || e.target_end > e.ids.len() {
            return Err(TrainError::Example {
                index,
                message: format!(
                    "target span {}..{} does not fit {} tokens",
                    e.target_start,
                    e.target_end,
                    e.ids.len()
                ),
            });
        }
    }
    Ok(())
}

/// Names the first field that differs between two configs. A field left out of one side (one
/// at its neutral value, see [`TrainConfig::retain_kl`]) differs from any value on the other.
fn config_difference(saved: &TrainConfig, now: &TrainConfig) -> Option<TrainError> {
    let a = serde_json::to_value(saved).ok()?;
    let b = serde_json::to_value(now).ok()?;
    let (a, b) = (a.as_object()?, b.as_object()?);
    let shown = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
    a.keys()
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
        .find_map(|k| {
            let (v, w) = (a.get(k), b.get(k));
            (v != w).then(|| TrainError::ConfigChanged {
                field: k.clone(),
                saved: shown(v),
                now: shown(w),
            })
        })
}

/// Appends records to `loss_curve.jsonl`; on resume, drops the records after the checkpoint.
struct Curve {
    path: PathBuf,
    file: std::fs::File,
}

impl Curve {
    fn open(out: &Path, keep_until: Option<usize>) -> Result<Self> {
        let path = out.join("loss_curve.jsonl");
        let io = |e: std::io::Error| TrainError::Io {
            path: path.clone(),
            message: e.to_string(),
        };
        let kept: Vec<String> = match keep_until {
            Some(step) if path.exists() => std::fs::read_to_string(&path)
                .map_err(io)?
                .lines()
                .filter(|l| serde_json::from_str::<CurveRecord>(l).is_ok_and(|r| r.step() <= step))
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => Vec::new(),
        };
        crate::model::write_atomic(&path, kept.concat().as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Self { path, file })
    }

    fn push(&mut self, record: &CurveRecord) -> Result<()> {
        let line =
            serde_json::to_string(record).map_err(|e| TrainError::Internal(e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Io {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

fn progress_bar(cfg: &TrainConfig, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(cfg.max_steps as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Trains `trainable` (whose `Var`s are in `decoder`'s slots) for `cfg.max_steps` steps.
pub fn run(
    cfg: &TrainConfig,
    decoder: &Decoder,
    trainable: &Trainable,
    data: TrainData<'_>,
    opts: RunOptions<'_>,
) -> Result<TrainSummary> {
    validate(cfg, &data, trainable)?;
    let params: Vec<(&String, &Var)> = trainable.vars.iter().collect();
    let mut opt = AdamW::from_config(cfg);
    let mut done = 0usize;
    let mut resumed_from = None;
    let mut last_checkpoint = None;
    if opts.resume {
        if let Some(dir) = checkpoint::latest(opts.out_dir)? {
            let state = checkpoint::read_state(&dir)?;
            if let Some(diff) = config_difference(&state.config, cfg) {
                return Err(diff);
            }
            checkpoint::restore(&dir, trainable, &mut opt, decoder.device())?;
            done = state.step;
            resumed_from = Some(done);
            tracing::info!(step = done, checkpoint = %dir.display(), "resumed");
            last_checkpoint = Some(dir);
        }
    }
    let mut curve = Curve::open(opts.out_dir, resumed_from)?;
    let mut dpo = if cfg.dpo_weight > 0.0 {
        Some(dpo::DpoRun::prepare(
            cfg,
            decoder,
            data.pairs,
            data.eval_pairs,
            data.pad_id,
            opts.out_dir,
            resumed_from.is_some(),
        )?)
    } else {
        None
    };
    let mut plan = BatchPlan::new(
        data.train.iter().map(|e| e.ids.len()).collect(),
        cfg.batch_size,
        cfg.seed,
    );
    let bar = progress_bar(cfg, opts.progress);
    bar.set_position(done as u64);
    let (mut last_loss, mut last_eval) = (None, None);
    let (mut tokens_seen, started) = (0usize, Instant::now());
    let mut interrupted = false;

    while done < cfg.max_steps {
        if opts.stop.load(Ordering::SeqCst) || opts.stop_after == Some(done) {
            interrupted = true;
            break;
        }
        let step_start = Instant::now();
        let lr = lr_at(cfg, done);
        let batches = (0..cfg.grad_accum_steps)
            .map(|j| {
                let picked: Vec<&TokenizedExample> = plan
                    .micro_batch(done * cfg.grad_accum_steps + j)
                    .into_iter()
                    .map(|i| &data.train[i])
                    .collect();
                Batch::left_padded(&picked, data.pad_id, decoder.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let (step_loss, mut grads) = loss_and_grads(decoder, &params, &batches, cfg.retain_kl)?;
        let mut pair_tokens = 0;
        let dpo_stats = match dpo.as_mut() {
            Some(run) => {
                let pair_batches =
                    run.step_batches(done, data.pairs, data.pad_id, decoder.device())?;
                pair_tokens = pair_batches.iter().map(|p| p.batch.real_tokens).sum();
                let (stats, dpo_grads) = dpo_loss_and_grads(
                    decoder,
                    &params,
                    &pair_batches,
                    cfg.dpo_beta,
                    cfg.dpo_weight,
                )?;
                for (g, d) in grads.iter_mut().zip(dpo_grads) {
                    *g = (&*g + d)?;
                }
                Some(stats)
            }
            None => None,
        };
        let total = step_loss.total + dpo_stats.map_or(0.0, |s| cfg.dpo_weight * s.loss());
        if !total.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: done + 1,
                loss: total,
                last_checkpoint,
            });
        }
        let loss = step_loss.nll;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteGradient {
                step: done + 1,
                norm: grad_norm,
                last_checkpoint,
            });
        }
        opt.step(&params, &grads, lr)?;
        done += 1;
        if let Some(name) = first_non_finite(trainable)? {
            return Err(TrainError::NonFiniteParameter {
                name,
                step: done,
                last_checkpoint,
            });
        }

        let tokens: usize = batches.iter().map(|b| b.real_tokens).sum::<usize>() + pair_tokens;
        let targets: usize = batches.iter().map(|b| b.targets.len()).sum();
        tokens_seen += tokens;
        let tokens_per_s = tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        curve.push(&CurveRecord::Train {
            step: done,
            loss,
            lr,
            grad_norm,
            targets,
            tokens,
            tokens_per_s,
            retain_kl: step_loss.retain_kl,
            dpo_loss: dpo_stats.map(|s| s.loss()),
            dpo_margin: dpo_stats.map(|s| s.margin()),
            dpo_accuracy: dpo_stats.map(|s| s.accuracy()),
        })?;
        last_loss = Some(loss);
        bar.set_position(done as u64);
        let kl = step_loss
            .retain_kl
            .map_or(String::new(), |kl| format!("  kl {kl:.4}"));
        let pref = dpo_stats.map_or(String::new(), |s| {
            format!("  dpo {:.4} acc {:.2}", s.loss(), s.accuracy())
        });
        bar.set_message(format!(
            "loss {loss:.4}{kl}{pref}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
        ));
        tracing::debug!(
            step = done,
            loss,
            retain_kl = step_loss.retain_kl,
            dpo_loss = dpo_stats.map(|s| s.loss()),
            lr,
            grad_norm,
            tokens_per_s,
            "step"
        );

        let at_end = done == cfg.max_steps;
        if !data.eval.is_empty()
            && cfg
                .eval_every
                .is_some_and(|n| done.is_multiple_of(n) || at_end)
        {
            let (loss, targets) = eval_loss(decoder, data.eval, cfg.batch_size, data.pad_id)?;
            let pairs = match &dpo {
                Some(run) if !data.eval_pairs.is_empty() => {
                    Some(run.heldout_stats(decoder, data.eval_pairs, cfg.dpo_beta, data.pad_id)?)
                }
                _ => None,
            };
            curve.push(&CurveRecord::Eval {
                step: done,
                loss,
                targets,
                dpo_loss: pairs.map(|s| s.loss()),
                dpo_margin: pairs.map(|s| s.margin()),
                dpo_accuracy: pairs.map(|s| s.accuracy()),
            })?;
            tracing::info!(
                step = done,
                eval_loss = loss,
                eval_dpo_accuracy = pairs.map(|s| s.accuracy()),
                "held-out loss"
            );
            last_eval = Some(loss);
        }
        if cfg.checkpoint_every.is_some_and(|n| done.is_multiple_of(n)) && !at_end {
            last_checkpoint = Some(checkpoint::save(opts.out_dir, done, cfg, trainable, &opt)?);
        }
    }
    bar.finish_and_clear();
    let checkpoint = match (&last_checkpoint, resumed_from) {
        // Nothing new since the checkpoint we resumed from or just wrote.
        (Some(dir), _) if checkpoint::read_state(dir)?.step == done => dir.clone(),
        _ => checkpoint::save(opts.out_dir, done, cfg, trainable, &opt)?,
    };
    Ok(TrainSummary {
        steps: done,
        resumed_from,
        interrupted,
        last_loss,
        last_eval_loss: last_eval,
        checkpoint,
        tokens_per_s: tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_without_retain_kl_load_and_compare_equal() {
        let cfg = TrainConfig::default();
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json.get("retain_kl").is_none(), "{json}");
        // A config saved before the field existed: the default's keys, without it.
        let old: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.retain_kl, 0.0);
        assert!(config_difference(&old, &cfg).is_none());
        let with = TrainConfig {
            retain_kl: 0.25,
            ..cfg.clone()
        };
        assert!(serde_json::to_value(&with).unwrap()["retain_kl"] == 0.25);
        for (saved, now) in [(&with, &cfg), (&cfg, &with)] {
            match config_difference(saved, now) {
                Some(TrainError::ConfigChanged { field, .. }) => assert_eq!(field, "retain_kl"),
                other => panic!("expected ConfigChanged, got {other:?}"),
            }
        }
        let parsed: TrainConfig = toml::from_str(&toml::to_string(&with).unwrap()).unwrap();
        assert_eq!(parsed, with);
    }

    #[test]
    fn dpo_keys_are_left_out_at_their_defaults_and_compared_when_set() {
        let cfg = TrainConfig::default();
        let json = serde_json::to_value(&cfg).unwrap();
        for key in ["dpo_weight", "dpo_beta", "dpo_pairs_per_step"] {
            assert!(json.get(key).is_none(), "{key}: {json}");
        }
        let old: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old, cfg);
        assert_eq!((old.dpo_beta, old.dpo_pairs()), (0.1, cfg.batch_size));
        let with = TrainConfig {
            dpo_weight: 0.5,
            dpo_beta: 0.2,
            dpo_pairs_per_step: Some(3),
            ..cfg.clone()
        };
        assert_eq!(with.dpo_pairs(), 3);
        match config_difference(&cfg, &with) {
            Some(TrainError::ConfigChanged { field, .. }) => assert!(field.starts_with("dpo_")),
            other => panic!("expected ConfigChanged, got {other:?}"),
        }
        let parsed: TrainConfig = toml::from_str(&toml::to_string(&with).unwrap()).unwrap();
        assert_eq!(parsed, with);
    }
}
