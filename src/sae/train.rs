//! TopK SAE training on activations (Gao et al., 2024, "Scaling and evaluating sparse
//! autoencoders"): normalised-MSE loss plus an auxiliary-k loss on dead latents, Adam (our own,
//! so its state can be checkpointed), unit-norm decoder rows with the parallel gradient component
//! removed, a constant input scale folded back into the weights at the end, and checkpoints that
//! resume to the bit-identical result.
//!
//! The step, on one screen, is `Trainer::step`.
//!
//! A checkpoint directory holds `state.json` (config, step, tokens seen, input scale, per-latent
//! firing statistics, the activation source's position, the log) and the `params-<step>.safetensors`
//! it names (weights and both Adam moments). Randomness is drawn only at initialisation (seeded
//! `StdRng`); after that a step is a pure function of the parameters, the moments, the latent
//! statistics and the batch, so these files are the whole state and a resumed run is bit-identical
//! (on the same device and thread count: matmul reduction order depends on both).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{
    fast, metrics, sparse, topk_mask, Architecture, Normalization, Result, Sae, SaeConfig, SaeError,
};
use crate::model::Resid;

/// Size of the auxiliary-k selection among dead latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxK {
    /// `d_in / 2`, Gao et al.'s choice ("k_aux = d_model/2").
    HalfDIn,
    /// A fixed count.
    Fixed(usize),
}

/// TopK training configuration. Every field lands in the checkpoint; resuming with a different
/// config is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeTrainConfig {
    /// Number of latents. 8× a 576-wide residual stream gives 4608, a common width for small models.
    pub d_sae: usize,
    /// Active latents per token. 32 keeps L0 small while reconstructing well at this width
    /// (Gao et al. sweep 32–256).
    pub k: usize,
    /// Tokens per optimiser step. 4096 follows SAELens' default batch.
    pub batch_size: usize,
    /// Training length in tokens; steps = ceil(total_tokens / batch_size).
    pub total_tokens: u64,
    /// Peak Adam learning rate. Gao et al. use 2e-4 at 16k latents (scaling as 1/√(latents/2^14)).
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`: Adam's early moment estimates are noisy.
    pub lr_warmup_steps: usize,
    /// Fraction of the steps at the end over which the lr decays linearly to 0 (SAELens' usual 0.2).
    pub lr_decay_frac: f64,
    /// Adam β₁ (Gao et al.: 0.9).
    pub adam_beta1: f64,
    /// Adam β₂ (Gao et al.: 0.999).
    pub adam_beta2: f64,
    /// Adam ε (Gao et al.: 6.25e-10; inputs are normalised so gradients are small).
    pub adam_eps: f64,
    /// Auxiliary-k: how many dead latents reconstruct the residual.
    pub aux_k: AuxK,
    /// Weight of the auxiliary-k loss (Gao et al.: 1/32).
    pub aux_coef: f64,
    /// A latent is dead when it has not fired in this many tokens (Gao et al.: 10M).
    pub dead_tokens_threshold: u64,
    /// Tokens drawn at the start to estimate the input scale and initialise `b_dec` (geometric
    /// median). These tokens are consumed from the source.
    pub init_sample_tokens: usize,
    /// Seed of the weight initialisation.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end or at an early stop).
    pub checkpoint_every: usize,
    /// Record a [`StepLog`] every this many steps, and window for the dense-latent count.
    pub log_every: usize,
}

impl Default for SaeTrainConfig {
    fn default() -> Self {
        SaeTrainConfig {
            d_sae: 4608,
            k: 32,
            batch_size: 4096,
            total_tokens: 50_000_000,
            lr: 2e-4,
            lr_warmup_steps: 100,
            lr_decay_frac: 0.2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 6.25e-10,
            aux_k: AuxK::HalfDIn,
            aux_coef: 1.0 / 32.0,
            dead_tokens_threshold: 10_000_000,
            init_sample_tokens: 8192,
            seed: 0,
            checkpoint_every: 1000,
            log_every: 50,
        }
    }
}

impl SaeTrainConfig {
    pub fn n_steps(&self) -> usize {
        self.total_tokens.div_ceil(self.batch_size as u64) as usize
    }

    fn validate(&self, d_in: usize) -> Result<()> {
        let bad = |m: String| Err(SaeError::TrainConfig(m));
        if self.k == 0 || self.k > self.d_sae {
            return bad(format!(
                "k = {} must be in 1..=d_sae ({})",
                self.k, self.d_sae
            ));
        }
        if self.batch_size == 0 || self.total_tokens == 0 {
            return bad("batch_size and total_tokens must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr = {} must be positive", self.lr));
        }
        if !(0.0..=1.0).contains(&self.lr_decay_frac) {
            return bad(format!(
                "lr_decay_frac = {} must be in [0, 1]",
                self.lr_decay_frac
            ));
        }
        if self.init_sample_tokens < 2 {
            return bad("init_sample_tokens must be at least 2".into());
        }
        if self.log_every == 0 {
            return bad("log_every must be positive".into());
        }
        if d_in == 0 {
            return bad("the activation source has d_in = 0".into());
        }
        Ok(())
    }

    fn aux_k_for(&self, d_in: usize) -> usize {
        match self.aux_k {
            AuxK::HalfDIn => (d_in / 2).max(1),
            AuxK::Fixed(n) => n,
        }
    }

    /// Learning rate at `step` (0-based): linear warm-up, flat, linear decay to 0 over the last
    /// `lr_decay_frac` of the steps.
    pub fn lr_at(&self, step: usize) -> f64 {
        let n = self.n_steps();
        let warm = if self.lr_warmup_steps > 0 {
            ((step + 1) as f64 / self.lr_warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        let decay_steps = (self.lr_decay_frac * n as f64).round() as usize;
        let decay_start = n - decay_steps.min(n);
        let decay = if decay_steps > 0 && step >= decay_start {
            (n - step) as f64 / decay_steps as f64
        } else {
            1.0
        };
        self.lr * warm * decay
    }
}

/// Where training activations come from. Batches are (n, d_in) f32 on any device.
pub trait ActivationSource {
    fn d_in(&self) -> usize;
    /// The residual position the activations were captured at (becomes the SAE's hook).
    fn hook(&self) -> Resid;
    fn next_batch(&mut self, n: usize) -> Result<Tensor>;
    /// Position for resuming: restoring it makes the following batches equal those an
    /// uninterrupted run would have drawn.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
}

/// Activations held in memory, served in a seeded shuffled order, reshuffled each epoch.
pub struct InMemoryActivations {
    /// (n, d_in) f32
    data: Tensor,
    hook: Resid,
    seed: u64,
    order: Vec<u32>,
    position: usize,
    epoch: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct InMemoryState {
    seed: u64,
    n: usize,
    epoch: u64,
    position: usize,
}

impl InMemoryActivations {
    pub fn new(data: Tensor, hook: Resid, seed: u64) -> Result<Self> {
        let (n, _) = data.dims2()?;
        if n == 0 {
            return Err(SaeError::Source("no activations".into()));
        }
        let data = data.to_dtype(DType::F32)?;
        let mut s = InMemoryActivations {
            data,
            hook,
            seed,
            order: Vec::new(),
            position: 0,
            epoch: 0,
        };
        s.shuffle();
        Ok(s)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.dims()[0]
    }

    /// Always false: construction refuses empty data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Full passes over the data completed so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn shuffle(&mut self) {
        let n = self.data.dims()[0];
        let mut order: Vec<u32> = (0..n as u32).collect();
        // one RNG per epoch, derived from (seed, epoch): the order is a pure function of both
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        self.order = order;
    }
}

impl ActivationSource for InMemoryActivations {
    fn d_in(&self) -> usize {
        self.data.dims()[1]
    }

    fn hook(&self) -> Resid {
        self.hook
    }

    fn next_batch(&mut self, n: usize) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(n);
        while idx.len() < n {
            if self.position == self.order.len() {
                self.epoch += 1;
                self.position = 0;
                self.shuffle();
            }
            let take = (n - idx.len()).min(self.order.len() - self.position);
            idx.extend_from_slice(&self.order[self.position..self.position + take]);
            self.position += take;
        }
        let idx = Tensor::from_vec(idx, n, self.data.device())?;
        Ok(self.data.index_select(&idx, 0)?)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(InMemoryState {
            seed: self.seed,
            n: self.data.dims()[0],
            epoch: self.epoch,
            position: self.position,
        })
        .expect("InMemoryState serialises: plain integers")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: InMemoryState = serde_json::from_value(state.clone())
            .map_err(|e| SaeError::Source(format!("bad in-memory source state: {e}")))?;
        if s.seed != self.seed || s.n != self.data.dims()[0] || s.position > s.n {
            return Err(SaeError::Source(format!(
                "state {s:?} does not fit this source (seed {}, {} rows)",
                self.seed,
                self.data.dims()[0]
            )));
        }
        self.epoch = s.epoch;
        self.position = s.position;
        self.shuffle();
        Ok(())
    }
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub lr: f64,
    /// Normalised MSE = fraction of variance unexplained on the batch.
    pub loss: f64,
    pub aux_loss: f64,
    pub l0: f64,
    pub explained_variance: f64,
    pub dead_frac: f64,
    /// Fraction of latents firing on more than [`metrics::DENSE_FIRING_RATE`] of the tokens of
    /// the last `log_every` steps.
    pub dense_frac: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub tokens: u64,
    /// The constant `s` inputs were multiplied by during training (E‖s·x‖² = d_in); folded
    /// into the returned weights.
    pub input_scale: f64,
    pub last: Option<StepLog>,
    pub history: Vec<StepLog>,
    /// Throughput of this call (excluding the initialisation sample).
    pub tokens_per_s: f64,
    /// Whether the run resumed from a checkpoint.
    pub resumed_from_step: Option<usize>,
}

const PARAM_NAMES: [&str; 4] = ["W_enc", "b_enc", "W_dec", "b_dec"];
const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointState {
    format_version: u32,
    config: SaeTrainConfig,
    d_in: usize,
    step: usize,
    tokens_seen: u64,
    input_scale: f64,
    params_file: String,
    since_fired: Vec<u64>,
    window_fires: Vec<u64>,
    window_tokens: u64,
    source: serde_json::Value,
    history: Vec<StepLog>,
}

/// Adam moments of one parameter.
struct AdamSlot {
    m: Tensor,
    v: Tensor,
}

struct Trainer<'a> {
    cfg: &'a SaeTrainConfig,
    d_in: usize,
    aux_k: usize,
    /// [W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)], normalised space
    params: [Var; 4],
    adam: [AdamSlot; 4],
    step: usize,
    tokens_seen: u64,
    input_scale: f64,
    /// tokens since each latent last fired
    since_fired: Vec<u64>,
    window_fires: Vec<u64>,
    window_tokens: u64,
    history: Vec<StepLog>,
}

/// Train a TopK SAE on `source` for `cfg.total_tokens` tokens. With `checkpoint_dir`, a
/// checkpoint there is resumed (same config required) and new ones are written every
/// `cfg.checkpoint_every` steps and at the end.
pub fn train_topk(
    cfg: &SaeTrainConfig,
    source: &mut dyn ActivationSource,
    device: &Device,
    checkpoint_dir: Option<&Path>,
) -> Result<(Sae, TrainReport)> {
    train_topk_until(cfg, source, device, checkpoint_dir, None)
}

/// As [`train_topk`], but stop (and checkpoint) once `stop_at_step` steps are done; the run can
/// then be resumed from `checkpoint_dir` and ends exactly as an uninterrupted one.
pub fn train_topk_until(
    cfg: &SaeTrainConfig,
    source: &mut dyn ActivationSource,
    device: &Device,
    checkpoint_dir: Option<&Path>,
    stop_at_step: Option<usize>,
) -> Result<(Sae, TrainReport)> {
    let d_in = source.d_in();
    cfg.validate(d_in)?;
    let n_steps = cfg.n_steps();
    let end = stop_at_step.map_or(n_steps, |s| s.min(n_steps));

    let resumed = match checkpoint_dir {
        Some(dir) if dir.join(STATE_FILE).exists() => {
            Some(Trainer::load(cfg, d_in, dir, device, source)?)
        }
        _ => None,
    };
    let resumed_from_step = resumed.as_ref().map(|t| t.step);
    let mut trainer = match resumed {
        Some(t) => t,
        None => Trainer::init(cfg, d_in, source, device)?,
    };

    let bar = progress_bar(n_steps as u64, trainer.step as u64);
    let started = Instant::now();
    let start_tokens = trainer.tokens_seen;
    while trainer.step < end {
        let x = source
            .next_batch(cfg.batch_size)?
            .to_device(device)?
            .to_dtype(DType::F32)?;
        let log = trainer.step(&x)?;
        bar.set_position(trainer.step as u64);
        if let Some(log) = log {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4} L0 {:.1} EV {:.3} dead {:.3} {:.0} tok/s",
                log.loss,
                log.l0,
                log.explained_variance,
                log.dead_frac,
                (trainer.tokens_seen - start_tokens) as f64 / secs
            ));
        }
        if let Some(dir) = checkpoint_dir {
            if cfg.checkpoint_every > 0
                && trainer.step.is_multiple_of(cfg.checkpoint_every)
                && trainer.step < end
            {
                trainer.save(dir, source)?;
            }
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if let Some(dir) = checkpoint_dir {
        trainer.save(dir, source)?;
    }
    let report = TrainReport {
        steps: trainer.step,
        tokens: trainer.tokens_seen,
        input_scale: trainer.input_scale,
        last: trainer.history.last().cloned(),
        history: trainer.history.clone(),
        tokens_per_s: (trainer.tokens_seen - start_tokens) as f64 / secs,
        resumed_from_step,
    };
    Ok((trainer.to_sae(source.hook())?, report))
}

fn progress_bar(len: u64, pos: u64) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "sae {bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta}]",
    ) {
        bar.set_style(style);
    }
    bar.set_position(pos);
    bar
}

/// An (rows, cols) matrix of standard normals, row-major, as f32.
fn gaussian(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    crate::linalg::standard_normals(rng, rows * cols)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// Geometric median of the rows of `x` (n, d) by Weiszfeld iterations from the mean (f64).
fn geometric_median(x: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut m = vec![0f64; d];
    for row in x.chunks(d) {
        for (mj, &v) in m.iter_mut().zip(row) {
            *mj += v as f64 / n as f64;
        }
    }
    for _ in 0..30 {
        let mut num = vec![0f64; d];
        let mut den = 0f64;
        for row in x.chunks(d) {
            let dist = row
                .iter()
                .zip(&m)
                .map(|(&v, &mj)| (v as f64 - mj).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            for (nj, &v) in num.iter_mut().zip(row) {
                *nj += v as f64 / dist;
            }
            den += 1.0 / dist;
        }
        m = num.iter().map(|v| v / den).collect();
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// Σ over rows of ‖x − mean(x)‖², a constant (no gradient): the normaliser of the MSE.
fn total_variance(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(0)?;
    Ok(x.broadcast_sub(&mean)?.sqr()?.sum_all()?.detach())
}

impl<'a> Trainer<'a> {
    fn init(
        cfg: &'a SaeTrainConfig,
        d_in: usize,
        source: &mut dyn ActivationSource,
        device: &Device,
    ) -> Result<Self> {
        let d_sae = cfg.d_sae;
        // Input scale and b_dec from a sample: s² = d_in / E‖x‖², b_dec = geometric median of s·x.
        let sample = source
            .next_batch(cfg.init_sample_tokens)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let n = sample.dims()[0];
        let mut xs: Vec<f32> = sample.flatten_all()?.to_vec1()?;
        let mean_sq = xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        if !(mean_sq > 0.0 && mean_sq.is_finite()) {
            return Err(SaeError::Source(format!(
                "the initial sample has mean squared norm {mean_sq}; cannot normalise"
            )));
        }
        let input_scale = (d_in as f64 / mean_sq).sqrt();
        xs.iter_mut().for_each(|v| *v *= input_scale as f32);
        let b_dec = geometric_median(&xs, n, d_in);

        // W_dec rows: random unit vectors; W_enc = W_decᵀ (Gao et al.); b_enc = 0.
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut w_dec = gaussian(&mut rng, d_sae, d_in);
        for row in w_dec.chunks_mut(d_in) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        let w_dec = Tensor::from_vec(w_dec, (d_sae, d_in), device)?;
        let w_enc = w_dec.t()?.contiguous()?;
        let b_enc = Tensor::zeros(d_sae, DType::F32, device)?;
        let b_dec = Tensor::from_vec(b_dec, d_in, device)?;
        let params = [
            Var::from_tensor(&w_enc)?,
            Var::from_tensor(&b_enc)?,
            Var::from_tensor(&w_dec)?,
            Var::from_tensor(&b_dec)?,
        ];
        let adam = Self::zero_moments(&params)?;
        Ok(Trainer {
            cfg,
            d_in,
            aux_k: cfg.aux_k_for(d_in),
            params,
            adam,
            step: 0,
            tokens_seen: 0,
            input_scale,
            since_fired: vec![0; d_sae],
            window_fires: vec![0; d_sae],
            window_tokens: 0,
            history: Vec::new(),
        })
    }

    fn zero_moments(params: &[Var; 4]) -> Result<[AdamSlot; 4]> {
        let slot = |p: &Var| -> Result<AdamSlot> {
            Ok(AdamSlot {
                m: p.as_tensor().zeros_like()?,
                v: p.as_tensor().zeros_like()?,
            })
        };
        Ok([
            slot(&params[0])?,
            slot(&params[1])?,
            slot(&params[2])?,
            slot(&params[3])?,
        ])
    }

    /// The loss of one batch `x` (already scaled), as a differentiable scalar, plus the pieces
    /// the step logs: (loss, main, aux, fired mask (n, d_sae)).
    fn losses(
        &self,
        x: &Tensor,
        dead: Option<&[bool]>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Tensor)> {
        let [w_enc, b_enc, w_dec, b_dec] = &self.params;
        // (x − b_dec)·W_enc written as x·W_enc − b_dec·W_enc: the data term needs no input
        // gradient, and b_dec's gradient then costs a (1, d_sae) product, not an (n, d_in) one
        let b_dec_enc = b_dec.unsqueeze(0)?.matmul(w_enc)?; // (1, d_sae)
        let pre = sparse::matmul_weight_grad(x, w_enc)?
            .broadcast_sub(&b_dec_enc)?
            .broadcast_add(b_enc)?; // (n, d_sae)
        let mask = topk_mask(&pre, self.cfg.k, None)?; // (n, d_sae), no grad
        let f = (pre.relu()? * &mask)?;
        let x_hat = sparse::sparse_decode(&f, w_dec)?.broadcast_add(b_dec)?; // (n, d_in)
        let main = ((x - &x_hat)?.sqr()?.sum_all()? / total_variance(x)?)?;
        let fired = f.detach().gt(0f64)?;
        // Auxiliary-k: the k_aux largest pre-activations among dead latents reconstruct the
        // residual e = x − x̂ (no b_dec: e already contains it), normalised like the main loss.
        let aux = match dead {
            Some(dead) => {
                let e = (x - &x_hat)?.detach();
                let aux_mask = topk_mask(&pre, self.aux_k, Some(dead))?;
                let e_hat = sparse::sparse_decode(&(pre.relu()? * aux_mask)?, w_dec)?;
                Some(((&e - e_hat)?.sqr()?.sum_all()? / total_variance(&e)?)?)
            }
            None => None,
        };
        let loss = match &aux {
            Some(a) => (&main + (a * self.cfg.aux_coef)?)?,
            None => main.clone(),
        };
        Ok((loss, main, aux, fired))
    }

    /// One optimiser step on raw batch `x` (n, d_in). Returns a log entry every `log_every` steps.
    fn step(&mut self, x: &Tensor) -> Result<Option<StepLog>> {
        let n = x.dims()[0];
        let x = (x * self.input_scale)?;
        let dead: Vec<bool> = self
            .since_fired
            .iter()
            .map(|&t| t >= self.cfg.dead_tokens_threshold)
            .collect();
        let n_dead = dead.iter().filter(|&&d| d).count();
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut p: Vec<Vec<f32>> = self
            .params
            .iter()
            .map(|v| host(v.as_tensor()))
            .collect::<Result<_>>()?;
        let hg = fast::loss_and_grads(
            &fast::HostParams {
                w_enc: &p[0],
                b_enc: &p[1],
                w_dec: &p[2],
                b_dec: &p[3],
            },
            &host(&x)?,
            &fast::LossSpec {
                d_in: self.d_in,
                d_sae: self.cfg.d_sae,
                k: self.cfg.k,
                aux_k: self.aux_k,
                aux_coef: self.cfg.aux_coef,
                dead: (n_dead > 0).then_some(&dead[..]),
            },
        )?;
        let (main, aux) = (hg.main, hg.aux);
        let mut grads = [hg.w_enc, hg.b_enc, hg.w_dec, hg.b_dec];
        // decoder rows: remove the gradient component parallel to each row
        fast::project_out_parallel(&mut grads[2], &p[2], self.d_in);

        let lr = self.cfg.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let betas = (self.cfg.adam_beta1, self.cfg.adam_beta2, self.cfg.adam_eps);
        for (i, g) in grads.iter().enumerate() {
            let slot = &mut self.adam[i];
            let mut m = host(&slot.m)?;
            let mut v = host(&slot.v)?;
            fast::adam_update(&mut p[i], &mut m, &mut v, g, lr, betas, t);
            if i == 2 {
                // decoder rows back to unit norm
                fast::normalise_rows(&mut p[i], self.d_in);
            }
            let shape = slot.m.shape().clone();
            let device = slot.m.device().clone();
            slot.m = Tensor::from_vec(m, shape.clone(), &device)?;
            slot.v = Tensor::from_vec(v, shape.clone(), &device)?;
            self.params[i].set(&Tensor::from_vec(
                std::mem::take(&mut p[i]),
                shape,
                &device,
            )?)?;
        }

        // latent statistics
        let fires = hg.fires;
        for ((since, window), &c) in self
            .since_fired
            .iter_mut()
            .zip(&mut self.window_fires)
            .zip(&fires)
        {
            if c > 0 {
                *since = 0;
            } else {
                *since += n as u64;
            }
            *window += c as u64;
        }
        self.window_tokens += n as u64;
        self.tokens_seen += n as u64;
        self.step += 1;

        if self.step.is_multiple_of(self.cfg.log_every) || self.step == self.cfg.n_steps() {
            let aux = aux.unwrap_or(0.0);
            let l0 = fires.iter().map(|&c| c as f64).sum::<f64>() / n as f64;
            let dead_now = self
                .since_fired
                .iter()
                .filter(|&&t| t >= self.cfg.dead_tokens_threshold)
                .count();
            let log = StepLog {
                step: self.step,
                lr,
                loss: main,
                aux_loss: aux,
                l0,
                explained_variance: 1.0 - main,
                dead_frac: dead_now as f64 / self.cfg.d_sae as f64,
                dense_frac: metrics::dense_fraction(&self.window_fires, self.window_tokens)?,
            };
            self.window_fires.iter_mut().for_each(|c| *c = 0);
            self.window_tokens = 0;
            self.history.push(log.clone());
            return Ok(Some(log));
        }
        Ok(None)
    }

    /// The trained SAE, taking raw activations: with training on s·x, `pre_raw = pre/s` when
    /// `b_dec_raw = b_dec/s` and `b_enc_raw = b_enc/s` (W_enc unchanged); top-k and ReLU commute
    /// with the positive factor, so `f_raw = f/s`, and `x̂_raw = x̂/s` keeps W_dec (unit rows).
    fn to_sae(&self, hook: Resid) -> Result<Sae> {
        let s = self.input_scale;
        let [w_enc, b_enc, w_dec, b_dec] = &self.params;
        let cfg = SaeConfig {
            architecture: Architecture::TopK {
                k: self.cfg.k,
                rescale_acts_by_decoder_norm: false,
            },
            d_in: self.d_in,
            d_sae: self.cfg.d_sae,
            hook,
            apply_b_dec_to_input: true,
            normalize_activations: Normalization::ExpectedAverageOnlyIn,
            metadata: serde_json::Map::new(),
        };
        Sae::new(
            cfg,
            w_enc.as_tensor().copy()?,
            (b_enc.as_tensor() / s)?,
            w_dec.as_tensor().copy()?,
            (b_dec.as_tensor() / s)?,
            None,
        )
    }

    fn save(&self, dir: &Path, source: &dyn ActivationSource) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SaeError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let params_file = format!("params-{:08}.safetensors", self.step);
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, name) in PARAM_NAMES.iter().enumerate() {
            tensors.insert(name.to_string(), self.params[i].as_tensor().clone());
            tensors.insert(format!("adam_m.{name}"), self.adam[i].m.clone());
            tensors.insert(format!("adam_v.{name}"), self.adam[i].v.clone());
        }
        super::format::write_safetensors_atomic(&tensors, &dir.join(&params_file))?;
        let state = CheckpointState {
            format_version: FORMAT_VERSION,
            config: self.cfg.clone(),
            d_in: self.d_in,
            step: self.step,
            tokens_seen: self.tokens_seen,
            input_scale: self.input_scale,
            params_file: params_file.clone(),
            since_fired: self.since_fired.clone(),
            window_fires: self.window_fires.clone(),
            window_tokens: self.window_tokens,
            source: source.state(),
            history: self.history.clone(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|e| SaeError::Json {
            path: dir.join(STATE_FILE),
            source: e,
        })?;
        // state.json is the commit point: it names the params file it belongs to
        super::format::write_bytes_atomic(&json, &dir.join(STATE_FILE))?;
        // older params files are now unreferenced
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("params-")
                    && name.ends_with(".safetensors")
                    && name != params_file
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn load(
        cfg: &'a SaeTrainConfig,
        d_in: usize,
        dir: &Path,
        device: &Device,
        source: &mut dyn ActivationSource,
    ) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let bad = |message: String| SaeError::Checkpoint {
            path: path.clone(),
            message,
        };
        let text = std::fs::read(&path).map_err(|e| SaeError::Io {
            path: path.clone(),
            source: e,
        })?;
        let st: CheckpointState = serde_json::from_slice(&text).map_err(|e| SaeError::Json {
            path: path.clone(),
            source: e,
        })?;
        if st.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} (expected {FORMAT_VERSION})",
                st.format_version
            )));
        }
        if &st.config != cfg {
            return Err(bad(format!(
                "was written with a different training config: {:?} vs now {:?}",
                st.config, cfg
            )));
        }
        if st.d_in != d_in {
            return Err(bad(format!("d_in {} but the source has {d_in}", st.d_in)));
        }
        if st.since_fired.len() != cfg.d_sae || st.window_fires.len() != cfg.d_sae {
            return Err(bad("latent statistics have the wrong length".into()));
        }
        let ppath = dir.join(&st.params_file);
        let tensors =
            candle_core::safetensors::load(&ppath, device).map_err(|e| SaeError::TensorFile {
                path: ppath.clone(),
                source: e,
            })?;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| SaeError::MissingTensor {
                path: ppath.clone(),
                name: name.to_string(),
                found: tensors.keys().cloned().collect(),
            })?;
            super::check_shape(name, t, shape)?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let shapes: [Vec<usize>; 4] = [
            vec![d_in, cfg.d_sae],
            vec![cfg.d_sae],
            vec![cfg.d_sae, d_in],
            vec![d_in],
        ];
        let mut params = Vec::new();
        let mut adam = Vec::new();
        for (name, shape) in PARAM_NAMES.iter().zip(&shapes) {
            params.push(Var::from_tensor(&get(name, shape)?)?);
            adam.push(AdamSlot {
                m: get(&format!("adam_m.{name}"), shape)?,
                v: get(&format!("adam_v.{name}"), shape)?,
            });
        }
        source.restore(&st.source)?;
        let params: [Var; 4] = params
            .try_into()
            .map_err(|_| bad("parameter count".into()))?;
        let adam: [AdamSlot; 4] = adam.try_into().map_err(|_| bad("moment count".into()))?;
        Ok(Trainer {
            cfg,
            d_in,
            aux_k: cfg.aux_k_for(d_in),
            params,
            adam,
            step: st.step,
            tokens_seen: st.tokens_seen,
            input_scale: st.input_scale,
            since_fired: st.since_fired,
            window_fires: st.window_fires,
            window_tokens: st.window_tokens,
            history: st.history,
        })
    }
}

/// Which implementation of the optimiser step [`bench_steps`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepImpl {
    /// The training path: host loss and sparse exact gradients (see `fast.rs`), host Adam.
    Host,
    /// The same loss through candle autodiff and tensor Adam (the earlier implementation), kept
    /// as a reference for measurements.
    Autodiff,
}

/// Throughput of `steps` optimiser steps (tokens/s) on batches from `source`, after one warm-up
/// step; parameters start from a fresh initialisation. With `all_dead`, every latent counts as
/// dead so the auxiliary loss runs too.
pub fn bench_steps(
    cfg: &SaeTrainConfig,
    source: &mut dyn ActivationSource,
    device: &Device,
    imp: StepImpl,
    steps: usize,
    all_dead: bool,
) -> Result<f64> {
    let d_in = source.d_in();
    cfg.validate(d_in)?;
    let mut trainer = Trainer::init(cfg, d_in, source, device)?;
    if all_dead {
        trainer
            .since_fired
            .iter_mut()
            .for_each(|t| *t = cfg.dead_tokens_threshold);
    }
    let mut started = Instant::now();
    for i in 0..=steps {
        if i == 1 {
            started = Instant::now();
        }
        let x = source.next_batch(cfg.batch_size)?.to_device(device)?;
        match imp {
            StepImpl::Host => {
                trainer.step(&x)?;
            }
            StepImpl::Autodiff => trainer.step_autodiff(&x)?,
        }
        if all_dead {
            trainer
                .since_fired
                .iter_mut()
                .for_each(|t| *t = cfg.dead_tokens_threshold);
        }
    }
    Ok((steps * cfg.batch_size) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

impl Trainer<'_> {
    /// The optimiser step through autodiff (no latent statistics): reference for [`bench_steps`].
    fn step_autodiff(&mut self, x: &Tensor) -> Result<()> {
        let x = (x * self.input_scale)?;
        let dead: Vec<bool> = self
            .since_fired
            .iter()
            .map(|&t| t >= self.cfg.dead_tokens_threshold)
            .collect();
        let any_dead = dead.iter().any(|&d| d);
        let (loss, _, _, _) = self.losses(&x, any_dead.then_some(&dead[..]))?;
        let grads = loss.backward()?;
        let lr = self.cfg.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let (b1, b2, eps) = (self.cfg.adam_beta1, self.cfg.adam_beta2, self.cfg.adam_eps);
        for (i, p) in self.params.iter().enumerate() {
            let mut g = grads
                .get(p.as_tensor())
                .ok_or_else(|| SaeError::NoGradient {
                    name: PARAM_NAMES[i].into(),
                })?
                .clone();
            if i == 2 {
                let w = p.as_tensor();
                let along = (&g * w)?.sum_keepdim(candle_core::D::Minus1)?;
                g = (g - w.broadcast_mul(&along)?)?;
            }
            let slot = &mut self.adam[i];
            slot.m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&slot.m / (1.0 - b1.powi(t)))?;
            let v_hat = (&slot.v / (1.0 - b2.powi(t)))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            p.set(&(p.as_tensor() - (update * lr)?)?)?;
        }
        let w_dec = self.params[2].as_tensor();
        let norms = w_dec.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
        self.params[2].set(&w_dec.broadcast_div(&norms)?)?;
        self.step += 1;
        Ok(())
    }
}

/// Gradients of the training loss on one batch for each parameter, by name, for a fresh
/// initialisation: lets tests check that every parameter receives a gradient (candle drops
/// gradients silently through some ops). All latents are treated as dead when `all_dead`, so the
/// auxiliary path is exercised too.
pub fn initial_gradients(
    cfg: &SaeTrainConfig,
    source: &mut dyn ActivationSource,
    device: &Device,
    all_dead: bool,
) -> Result<Vec<(String, Tensor)>> {
    let d_in = source.d_in();
    cfg.validate(d_in)?;
    let trainer = Trainer::init(cfg, d_in, source, device)?;
    let x = (source.next_batch(cfg.batch_size)?.to_device(device)? * trainer.input_scale)?;
    let dead = vec![true; cfg.d_sae];
    let (loss, _, _, _) = trainer.losses(&x, all_dead.then_some(&dead[..]))?;
    let grads = loss.backward()?;
    trainer
        .params
        .iter()
        .zip(PARAM_NAMES)
        .map(|(p, name)| {
            grads
                .get(p.as_tensor())
                .cloned()
                .map(|g| (name.to_string(), g))
                .ok_or_else(|| SaeError::NoGradient { name: name.into() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host gradients equal candle's autodiff gradients of the same loss (with and without
    /// the auxiliary loss), so the fast step optimises exactly the function `losses` defines.
    #[test]
    fn host_gradients_match_autodiff() {
        let (n, d_in) = (64usize, 12usize);
        let mut rng = StdRng::seed_from_u64(3);
        let data = Tensor::from_vec(gaussian(&mut rng, n, d_in), (n, d_in), &Device::Cpu).unwrap();
        let cfg = SaeTrainConfig {
            d_sae: 40,
            k: 4,
            batch_size: n,
            total_tokens: n as u64,
            init_sample_tokens: n,
            aux_k: AuxK::Fixed(6),
            aux_coef: 0.5,
            ..Default::default()
        };
        for all_dead in [false, true] {
            let mut src = InMemoryActivations::new(data.clone(), Resid::In(0), 1).unwrap();
            let trainer = Trainer::init(&cfg, d_in, &mut src, &Device::Cpu).unwrap();
            // move b_enc off zero so both signs of pre occur at the selected latents
            let b_enc = Tensor::from_vec(
                (0..40)
                    .map(|j| (j as f32 - 20.0) * 0.05)
                    .collect::<Vec<_>>(),
                40,
                &Device::Cpu,
            )
            .unwrap();
            trainer.params[1].set(&b_enc).unwrap();
            let x = (src.next_batch(n).unwrap() * trainer.input_scale).unwrap();
            let dead: Vec<bool> = (0..40).map(|j| all_dead && j % 3 != 0).collect();
            let (loss, main, _, _) = trainer.losses(&x, all_dead.then_some(&dead[..])).unwrap();
            let grads = loss.backward().unwrap();
            let p: Vec<Vec<f32>> = trainer
                .params
                .iter()
                .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            let hg = fast::loss_and_grads(
                &fast::HostParams {
                    w_enc: &p[0],
                    b_enc: &p[1],
                    w_dec: &p[2],
                    b_dec: &p[3],
                },
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &fast::LossSpec {
                    d_in,
                    d_sae: 40,
                    k: 4,
                    aux_k: 6,
                    aux_coef: 0.5,
                    dead: all_dead.then_some(&dead[..]),
                },
            )
            .unwrap();
            let main: f32 = main.to_scalar().unwrap();
            assert!(
                (hg.main - main as f64).abs() < 1e-5,
                "{} vs {main}",
                hg.main
            );
            assert_eq!(hg.aux.is_some(), all_dead);
            for (i, host) in [&hg.w_enc, &hg.b_enc, &hg.w_dec, &hg.b_dec]
                .iter()
                .enumerate()
            {
                let want: Vec<f32> = grads
                    .get(trainer.params[i].as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
                assert!(scale > 0.0, "{} has a zero gradient", PARAM_NAMES[i]);
                for (g, w) in host.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * scale,
                        "{} (aux {all_dead}): host {g} vs autodiff {w}",
                        PARAM_NAMES[i]
                    );
                }
            }
        }
    }

    #[test]
    fn lr_schedule_warms_up_holds_and_decays_to_zero() {
        let cfg = SaeTrainConfig {
            batch_size: 10,
            total_tokens: 1000, // 100 steps
            lr: 1.0,
            lr_warmup_steps: 10,
            lr_decay_frac: 0.2,
            ..Default::default()
        };
        assert_eq!(cfg.n_steps(), 100);
        assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12); // (0+1)/10
        assert!((cfg.lr_at(4) - 0.5).abs() < 1e-12);
        assert_eq!(cfg.lr_at(50), 1.0);
        assert_eq!(cfg.lr_at(79), 1.0);
        assert!((cfg.lr_at(80) - 1.0).abs() < 1e-12); // (100-80)/20
        assert!((cfg.lr_at(90) - 0.5).abs() < 1e-12); // (100-90)/20
        assert!((cfg.lr_at(99) - 0.05).abs() < 1e-12); // last step: 1/20
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let mut v = serde_json::to_value(SaeTrainConfig::default()).unwrap();
        v.as_object_mut()
            .unwrap()
            .insert("l1_coef".into(), 1.into());
        assert!(serde_json::from_value::<SaeTrainConfig>(v).is_err());
    }

    #[test]
    fn geometric_median_resists_an_outlier() {
        // points 0, 1, 2 and 1000 on a line: mean 250.75, median anywhere in [1, 2]
        let x = [0f32, 1.0, 2.0, 1000.0];
        let m = geometric_median(&x, 4, 1)[0];
        assert!((1.0..=2.0).contains(&m), "{m}");
    }

    #[test]
    fn in_memory_source_covers_every_row_once_per_epoch_and_restores() {
        let data = Tensor::arange(0f32, 10.0, &Device::Cpu)
            .unwrap()
            .reshape((10, 1))
            .unwrap();
        let mut s = InMemoryActivations::new(data.clone(), Resid::In(0), 7).unwrap();
        let mut a: Vec<f32> = s
            .next_batch(10)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        a.sort_by(f32::total_cmp);
        assert_eq!(a, (0..10).map(|v| v as f32).collect::<Vec<_>>());
        let _ = s.next_batch(3).unwrap();
        let state = s.state();
        let want: Vec<f32> = s
            .next_batch(12)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut t = InMemoryActivations::new(data, Resid::In(0), 7).unwrap();
        t.restore(&state).unwrap();
        let got: Vec<f32> = t
            .next_batch(12)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(t.epoch(), 2);
    }
}
