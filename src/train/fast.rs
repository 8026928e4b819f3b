//! The LoRA training step written out by hand for Llama-style decoders (Llama, Qwen2): the
//! forward keeps what the backward reads, the backward walks the blocks in reverse and writes
//! each LoRA factor's gradient once. Same numbers as candle's autodiff through
//! [`Decoder::forward`] (tested against it, and through [`super::loss_and_grads`] against the
//! PyTorch/PEFT golden gradients), without autodiff's bookkeeping: candle starts every node's
//! gradient as a fresh zero tensor and adds into it, every reshape or transpose between the ops
//! is a node of its own, and every sum is a separate pass. Here a product adds straight into its
//! destination (the residual stream, the sum of the three projections' input gradients).
//!
//! Gemma-2 (extra norms, soft-caps, sliding windows), full fine-tuning and non-f32 models take
//! the autodiff path ([`applies`] decides). The held-out loss ([`batch_loss`]) runs the same
//! forward without tapes for every f32 CPU Llama-style model, full fine-tuning included.
//!
//! With a retain term (λ > 0) a batch's retain rows also run that tape-free forward on the model
//! with its adapter switched off; the base logits at their targets enter the logit gradient
//! (`λ·unit·(softmax − p_base)`, [`cross_entropy_in_place`]) and nothing else changes.
//!
//! A DPO micro-batch ([`dpo_loss_and_grads`], [`super::dpo`]) runs the same forward; once the
//! logits give every row's log-prob, each target's logit gradient `softmax − onehot` is scaled by
//! its row's coefficient (`±β σ(−m)·w/n_pairs`) and the backward is the SFT one.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use super::data::Batch;
use super::dpo::{target_coefficients, DpoStats, PairBatch};
use super::{Result, StepLoss, TrainError};
use crate::lora::PEFT_PREFIX;
use crate::model::decoder::{Block, Decoder};
use crate::model::fused::{
    masked_softmax_bwd, masked_softmax_fwd, rms_backward, rms_forward, silu_mul_bwd, silu_mul_fwd,
    with_slice,
};
use crate::model::layers::{Linear, RmsNorm};

type CResult<T> = candle_core::Result<T>;

/// Whether the hand-written step computes these gradients: every trainable tensor is a LoRA
/// factor of an f32 CPU Llama-style model.
pub fn applies(decoder: &Decoder, params: &[(&String, &Var)]) -> bool {
    forward_applies(decoder)
        && !params.is_empty()
        && params.iter().all(|(name, _)| lora_factor(name).is_some())
}

/// Whether [`batch_loss`] can run this model: an f32 CPU Llama-style decoder.
pub fn forward_applies(decoder: &Decoder) -> bool {
    decoder.config.gemma.is_none() && decoder.dtype() == DType::F32 && decoder.device().is_cpu()
}

#[derive(Clone, Copy)]
enum Factor {
    A,
    B,
}

/// `base_model.model.<module>.lora_A.weight` ↦ `(<module>, A)`.
fn lora_factor(key: &str) -> Option<(&str, Factor)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        Some((module, Factor::A))
    } else {
        rest.strip_suffix(".lora_B.weight")
            .map(|module| (module, Factor::B))
    }
}

/// `(dA, dB)` of each adapted module, by full module name, row-major.
type FactorGrads = HashMap<String, (Vec<f32>, Vec<f32>)>;

/// Like [`super::loss_and_grads`]: the gradients of `(Σ NLL + retain_kl·Σ KL) / n_total` over
/// `batches`, in `params` order, and the step's loss.
pub fn loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[Batch],
    retain_kl: f64,
) -> Result<(StepLoss, Vec<Tensor>)> {
    let (loss, grads, _) = timed_loss_and_grads(decoder, params, batches, retain_kl)?;
    Ok((loss, grads))
}

/// Seconds a step spent in each half.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTiming {
    /// Embedding, blocks, head and loss (and the base model's forward for the retain term).
    pub forward_s: f64,
    /// The loss's gradient back through the head and the blocks, down to the LoRA factors.
    pub backward_s: f64,
}

/// [`loss_and_grads`] with the time spent in the forward and backward halves.
pub fn timed_loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[Batch],
    retain_kl: f64,
) -> Result<(StepLoss, Vec<Tensor>, StepTiming)> {
    let n_total: usize = batches.iter().map(|b| b.targets.len()).sum();
    if n_total == 0 {
        return Err(TrainError::Internal("a step with no target tokens".into()));
    }
    let base = (retain_kl > 0.0).then(|| super::without_adapter(decoder));
    let retain = base.as_ref().map(|base| (base, retain_kl as f32));
    let mut total: FactorGrads = HashMap::new();
    let mut timing = StepTiming::default();
    let (mut nll_sum, mut kl_sum, mut n_retain) = (0f64, 0f64, 0usize);
    for batch in batches {
        let sums = batch_grads(
            decoder,
            batch,
            1.0 / n_total as f32,
            retain,
            None,
            &mut total,
            &mut timing,
        )?;
        nll_sum += sums.nll;
        kl_sum += sums.kl;
        n_retain += sums.n_retain;
    }
    let grads = collect_grads(params, &total)?;
    let loss = StepLoss::new(nll_sum, kl_sum, n_retain, n_total, retain_kl);
    Ok((loss, grads, timing))
}

/// Like [`super::dpo::dpo_loss_and_grads`]: the gradients of `weight · mean ℓ_i` over the pairs
/// of `batches`, in `params` order, and the pairs' sums.
pub fn dpo_loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[PairBatch],
    beta: f64,
    weight: f64,
) -> Result<(DpoStats, Vec<Tensor>)> {
    let n_pairs: usize = batches.iter().map(PairBatch::pairs).sum();
    if n_pairs == 0 {
        return Err(TrainError::Internal("a DPO step with no pairs".into()));
    }
    let unit = weight / n_pairs as f64;
    let mut total: FactorGrads = HashMap::new();
    let mut timing = StepTiming::default();
    let mut stats = DpoStats::default();
    for pb in batches {
        let mut coefficients =
            |token_nll: &[f64]| target_coefficients(beta, unit, pb, token_nll, &mut stats);
        batch_grads(
            decoder,
            &pb.batch,
            1.0,
            None,
            Some(&mut coefficients),
            &mut total,
            &mut timing,
        )?;
    }
    Ok((stats, collect_grads(params, &total)?))
}

/// The summed factor gradients as tensors in `params` order.
fn collect_grads(params: &[(&String, &Var)], total: &FactorGrads) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(name, var)| {
            let missing = || TrainError::NoGradient {
                name: (*name).clone(),
            };
            let (module, factor) = lora_factor(name).ok_or_else(missing)?;
            let (da, db) = total.get(module).ok_or_else(missing)?;
            let values = match factor {
                Factor::A => da,
                Factor::B => db,
            };
            Ok(Tensor::from_slice(values, var.shape(), var.device())?)
        })
        .collect()
}

/// The shape of one batch: `b` sequences of `t` tokens, `h` query heads in `kv` groups of `g`,
/// `hd` dimensions per head.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    g: usize,
    hd: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.b * self.t
    }
}

/// What a block's backward reads, kept by its forward. Row-major `(b·t, features)` except the
/// attention tensors, which are head-major `(b, heads, t, ·)`: the `g` query heads that share a
/// KV head are consecutive there, so one product per KV head covers them.
struct Tape {
    x: Vec<f32>,
    n1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    h1: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// `x Aᵀ` of each LoRA projection (q, k, v, o, gate, up, down).
    low: [Option<Vec<f32>>; 7],
}

/// A batch checked and laid out for the kernels: its shape, rotary tables and attention mask.
struct Prepared {
    dims: Dims,
    cos: Vec<f32>,
    sin: Vec<f32>,
    mask: Vec<f32>,
    scale: f32,
}

impl Prepared {
    fn new(decoder: &Decoder, batch: &Batch) -> Result<Self> {
        let cfg = &decoder.config;
        let (b, t) = batch.input_ids.dims2()?;
        if batch.attention_mask.dims2()? != (b, t) {
            return Err(TrainError::Internal(format!(
                "attention mask {:?} does not match the ids ({b}, {t})",
                batch.attention_mask.dims()
            )));
        }
        if let Some(x) = batch.targets.iter().find(|x| x.row >= b || x.pos >= t) {
            return Err(TrainError::Internal(format!(
                "target at row {} position {} is outside the ({b}, {t}) batch",
                x.row, x.pos
            )));
        }
        let (cos, sin, mask) = decoder.batch_frame(&batch.attention_mask)?;
        Ok(Self {
            dims: Dims {
                b,
                t,
                h: cfg.num_heads,
                kv: cfg.num_kv_heads,
                g: cfg.num_kv_groups(),
                hd: cfg.head_dim,
            },
            cos: cos.flatten_all()?.to_vec1::<f32>()?,
            sin: sin.flatten_all()?.to_vec1::<f32>()?,
            mask,
            scale: cfg.query_scale as f32,
        })
    }

    fn frame(&self) -> Frame<'_> {
        Frame {
            dims: self.dims,
            cos: &self.cos,
            sin: &self.sin,
            mask: &self.mask,
            scale: self.scale,
        }
    }
}

/// The residual stream after every block, `(b·t, d)`; each block's tape is pushed into `tapes`
/// when given (the backward's), else dropped at once.
fn forward_blocks(
    decoder: &Decoder,
    batch: &Batch,
    frame: &Frame,
    mut tapes: Option<&mut Vec<Tape>>,
) -> Result<Vec<f32>> {
    let mut h = decoder
        .embed_tokens
        .index_select(&batch.input_ids.flatten_all()?, 0)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for block in &decoder.layers {
        let (out, tape) = block_forward(block, h, frame)?;
        if let Some(tapes) = tapes.as_deref_mut() {
            tapes.push(tape);
        }
        h = out;
    }
    Ok(h)
}

/// The final norm's input and output at the target positions (the head sees only those rows).
struct Targets {
    /// Row of each target in `(b·t)`.
    rows: Vec<usize>,
    tokens: Vec<u32>,
    picked: Vec<f32>,
    normed: Vec<f32>,
}

impl Targets {
    fn new(decoder: &Decoder, batch: &Batch, t: usize, h: &[f32]) -> CResult<Self> {
        let d = decoder.config.hidden_size;
        let rows: Vec<usize> = batch.targets.iter().map(|x| x.row * t + x.pos).collect();
        let tokens = batch.targets.iter().map(|x| x.token).collect();
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| h[r * d..(r + 1) * d].iter().copied())
            .collect();
        let normed = rms(&decoder.norm, &picked)?;
        Ok(Self {
            rows,
            tokens,
            picked,
            normed,
        })
    }

    /// The head's logits `(n, vocab)`.
    fn logits(&self, decoder: &Decoder) -> CResult<Vec<f32>> {
        let d = decoder.config.hidden_size;
        let n = self.rows.len();
        with_slice::<f32, _>(head_weight(decoder), |e| {
            let vocab = e.len() / d;
            let mut logits = vec![0f32; n * vocab];
            product(
                &mut logits,
                View::rows(&self.normed, n, d),
                View::rows(e, vocab, d).t(),
                1.0,
                false,
            )?;
            Ok(logits)
        })
    }

    /// The head's logits turned in place into the gradient of `unit · (Σ NLL + λ·Σ KL)` (the KL
    /// part only with `retain`), and the NLL and KL sums; `then` gets that gradient (to rescale
    /// or read), each target's NLL, and the head's weights `(vocab, d)`.
    fn loss<T>(
        &self,
        decoder: &Decoder,
        unit: f32,
        retain: Option<&Retain>,
        then: impl FnOnce(&mut [f32], &[f64], View) -> CResult<T>,
    ) -> CResult<(LossSums, T)> {
        let d = decoder.config.hidden_size;
        let mut logits = self.logits(decoder)?;
        with_slice::<f32, _>(head_weight(decoder), |e| {
            let vocab = e.len() / d;
            let (sums, token_nll) =
                cross_entropy_in_place(&mut logits, vocab, &self.tokens, unit, retain)?;
            Ok((
                sums,
                then(&mut logits, &token_nll, View::rows(e, vocab, d))?,
            ))
        })
    }
}

/// The output projection `(vocab, d)`: `lm_head`, or the embeddings when tied.
fn head_weight(decoder: &Decoder) -> &Tensor {
    decoder.lm_head.as_ref().unwrap_or(&decoder.embed_tokens)
}

/// Sums over a batch's targets.
#[derive(Clone, Copy, Default)]
struct LossSums {
    nll: f64,
    /// Over the retain targets only.
    kl: f64,
    n_retain: usize,
}

/// The retain term of one batch: per target, the base model's logits row where it is a retain
/// target, and the weight λ.
struct Retain<'a> {
    base: Vec<Option<&'a [f32]>>,
    lambda: f32,
}

/// The logits `(n_retain, vocab)` of the model with its adapter switched off (`base`) at
/// `batch`'s retain targets, in target order, forward only; `None` when the batch has none.
fn base_logits(base: &Decoder, batch: &Batch) -> Result<Option<Vec<f32>>> {
    let Some(rows) = batch.retain_rows()? else {
        return Ok(None);
    };
    let prepared = Prepared::new(base, &rows)?;
    let h = forward_blocks(base, &rows, &prepared.frame(), None)?;
    let targets = Targets::new(base, &rows, prepared.dims.t, &h)?;
    Ok(Some(targets.logits(base)?))
}

/// The summed NLL of `batch`'s targets, forward only: each block's activations are dropped as
/// soon as the next block has read them, so memory stays near one block's worth (the held-out
/// loss during training; autodiff would keep every block's for a backward that never comes).
pub fn batch_loss(decoder: &Decoder, batch: &Batch) -> Result<f64> {
    Ok(forward_only(decoder, batch)?.0.nll)
}

/// Each target's NLL of `batch`, in its target order, forward only as [`batch_loss`] (the DPO
/// reference and held-out log-probs).
pub fn token_nll(decoder: &Decoder, batch: &Batch) -> Result<Vec<f64>> {
    Ok(forward_only(decoder, batch)?.1)
}

fn forward_only(decoder: &Decoder, batch: &Batch) -> Result<(LossSums, Vec<f64>)> {
    let prepared = Prepared::new(decoder, batch)?;
    let h = forward_blocks(decoder, batch, &prepared.frame(), None)?;
    let targets = Targets::new(decoder, batch, prepared.dims.t, &h)?;
    Ok(targets.loss(decoder, 1.0, None, |_, nll, _| Ok(nll.to_vec()))?)
}

/// Maps each target's NLL to a factor its logit gradient is multiplied by (DPO's per-row
/// coefficients), once the forward is done.
type Rescale<'a> = &'a mut dyn FnMut(&[f64]) -> Result<Vec<f32>>;

/// The loss sums of one batch; adds the LoRA gradients of `(Σ NLL + λ·Σ KL) · unit` (`unit` =
/// 1 / the step's target count) into `grads`. `retain`: the model with its adapter switched off
/// and λ, when the step has a retain term. `rescale`: per-target factors applied to the logit
/// gradient before the backward (DPO).
fn batch_grads(
    decoder: &Decoder,
    batch: &Batch,
    unit: f32,
    retain: Option<(&Decoder, f32)>,
    rescale: Option<Rescale>,
    grads: &mut FactorGrads,
    timing: &mut StepTiming,
) -> Result<LossSums> {
    let start = Instant::now();
    let prepared = Prepared::new(decoder, batch)?;
    let base = match retain {
        Some((base, _)) => base_logits(base, batch)?,
        None => None,
    };
    let vocab = decoder.config.vocab_size;
    let retain = match (base.as_deref(), retain) {
        (Some(base), Some((_, lambda))) => {
            let mut rows = base.chunks_exact(vocab);
            let base = (0..batch.targets.len())
                .map(|i| {
                    if batch.is_retain_target(i) {
                        rows.next()
                            .ok_or_else(|| {
                                TrainError::Internal("fewer base rows than retain targets".into())
                            })
                            .map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Retain { base, lambda })
        }
        _ => None,
    };
    let frame = prepared.frame();
    let dims = prepared.dims;
    let d = decoder.config.hidden_size;

    // Forward: embed, the blocks (keeping their tapes), the head on the target rows only.
    let mut tapes = Vec::with_capacity(decoder.layers.len());
    let h = forward_blocks(decoder, batch, &frame, Some(&mut tapes))?;
    let targets = Targets::new(decoder, batch, dims.t, &h)?;
    let n = targets.rows.len();
    let mut forward_s = 0.0;
    let (sums, dnormed) = targets.loss(decoder, unit, retain.as_ref(), |dlogits, nll, head| {
        // The logits now hold their gradient.
        forward_s = start.elapsed().as_secs_f64();
        let vocab = head.rows;
        if let Some(rescale) = rescale {
            let factors = rescale(nll).map_err(candle_core::Error::wrap)?;
            if factors.len() != n {
                candle_core::bail!("{} gradient factors for {n} targets", factors.len());
            }
            dlogits
                .par_chunks_mut(vocab)
                .zip(factors.par_iter())
                .for_each(|(row, &k)| row.iter_mut().for_each(|g| *g *= k));
        }
        let mut dnormed = vec![0f32; n * d];
        product(
            &mut dnormed,
            View::rows(dlogits, n, vocab),
            head,
            1.0,
            false,
        )?;
        Ok(dnormed)
    })?;

    // Backward: the head's gradient back to the target rows, then the blocks in reverse.
    let dpicked = rms_grad(&decoder.norm, &targets.picked, &dnormed)?;
    let mut dh = vec![0f32; dims.rows() * d];
    for (i, &r) in targets.rows.iter().enumerate() {
        for (o, &x) in dh[r * d..(r + 1) * d].iter_mut().zip(&dpicked[i * d..]) {
            *o += x;
        }
    }
    for (l, (block, tape)) in decoder.layers.iter().zip(&tapes).enumerate().rev() {
        dh = block_backward(block, tape, dh, &frame, l, grads)?;
    }
    timing.forward_s += forward_s;
    timing.backward_s += start.elapsed().as_secs_f64() - forward_s;
    Ok(sums)
}

/// Per-batch constants of attention: rotary tables `(b, t, hd)`, the additive mask `(b, t, t)`.
struct Frame<'a> {
    dims: Dims,
    cos: &'a [f32],
    sin: &'a [f32],
    mask: &'a [f32],
    scale: f32,
}

/// One block forward on `x: (b·t, d)`; returns its output and tape.
fn block_forward(block: &Block, x: Vec<f32>, frame: &Frame) -> CResult<(Vec<f32>, Tape)> {
    let dims = frame.dims;
    let Dims { h, kv, .. } = dims;
    let n = dims.rows();
    let attn = &block.self_attn;
    let mlp = &block.mlp;

    let n1 = rms(&block.input_layernorm, &x)?;
    let (q, low_q) = linear(&attn.q_proj, &n1, n, None)?;
    let (k, low_k) = linear(&attn.k_proj, &n1, n, None)?;
    let (v, low_v) = linear(&attn.v_proj, &n1, n, None)?;
    let q = relayout(&q, dims, h, Layout::HeadMajor, Some((frame, 1.0)));
    let k = relayout(&k, dims, kv, Layout::HeadMajor, Some((frame, 1.0)));
    let v = relayout(&v, dims, kv, Layout::HeadMajor, None);
    let (probs, ctx) = attention(&q, &k, &v, frame)?;
    let ctx = relayout(&ctx, dims, h, Layout::TokenMajor, None);
    let (h1, low_o) = linear(&attn.o_proj, &ctx, n, Some(x.clone()))?;

    let n2 = rms(&block.post_attention_layernorm, &h1)?;
    let (gate, low_gate) = linear(&mlp.gate_proj, &n2, n, None)?;
    let (up, low_up) = linear(&mlp.up_proj, &n2, n, None)?;
    let act = silu_mul_fwd(&gate, &up);
    let (out, low_down) = linear(&mlp.down_proj, &act, n, Some(h1.clone()))?;
    let tape = Tape {
        x,
        n1,
        q,
        k,
        v,
        probs,
        ctx,
        h1,
        n2,
        gate,
        up,
        act,
        low: [low_q, low_k, low_v, low_o, low_gate, low_up, low_down],
    };
    Ok((out, tape))
}

/// One block backward: the gradient of the block's input from its output's `dout`; the LoRA
/// factors' gradients are added into `grads`.
fn block_backward(
    block: &Block,
    tape: &Tape,
    dout: Vec<f32>,
    frame: &Frame,
    layer: usize,
    grads: &mut FactorGrads,
) -> CResult<Vec<f32>> {
    let dims = frame.dims;
    let Dims { h, kv, .. } = dims;
    let n = dims.rows();
    let attn = &block.self_attn;
    let mlp = &block.mlp;
    let [low_q, low_k, low_v, low_o, low_gate, low_up, low_down] = &tape.low;
    let mut back = |lin: &Linear, name: &str, x: &[f32], low: &Option<Vec<f32>>, dy: &[f32], dx| {
        let module = format!("model.layers.{layer}.{name}");
        linear_grad(lin, x, low.as_deref(), dy, n, dx, &module, grads)
    };

    // MLP: the three projections, SiLU·up, the norm; the residual passes `dout` through.
    let dact = back(
        &mlp.down_proj,
        "mlp.down_proj",
        &tape.act,
        low_down,
        &dout,
        None,
    )?;
    let (dgate, dup) = silu_mul_bwd(&tape.gate, &tape.up, &dact);
    let dn2 = back(
        &mlp.gate_proj,
        "mlp.gate_proj",
        &tape.n2,
        low_gate,
        &dgate,
        None,
    )?;
    let dn2 = back(
        &mlp.up_proj,
        "mlp.up_proj",
        &tape.n2,
        low_up,
        &dup,
        Some(dn2),
    )?;
    let dh1 = add(
        rms_grad(&block.post_attention_layernorm, &tape.h1, &dn2)?,
        &dout,
    );

    // Attention: o, the scores and softmax, the rotations, q/k/v, the norm.
    let dctx = back(
        &attn.o_proj,
        "self_attn.o_proj",
        &tape.ctx,
        low_o,
        &dh1,
        None,
    )?;
    let dctx = relayout(&dctx, dims, h, Layout::HeadMajor, None);
    let (dq, dk, dv) = attention_grad(tape, &dctx, frame)?;
    let dq = relayout(&dq, dims, h, Layout::TokenMajor, Some((frame, -1.0)));
    let dk = relayout(&dk, dims, kv, Layout::TokenMajor, Some((frame, -1.0)));
    let dv = relayout(&dv, dims, kv, Layout::TokenMajor, None);
    let dn1 = back(&attn.q_proj, "self_attn.q_proj", &tape.n1, low_q, &dq, None)?;
    let dn1 = back(
        &attn.k_proj,
        "self_attn.k_proj",
        &tape.n1,
        low_k,
        &dk,
        Some(dn1),
    )?;
    let dn1 = back(
        &attn.v_proj,
        "self_attn.v_proj",
        &tape.n1,
        low_v,
        &dv,
        Some(dn1),
    )?;
    Ok(add(rms_grad(&block.input_layernorm, &tape.x, &dn1)?, &dh1))
}

/// Causal attention in the head-major layout: `softmax(q kᵀ · scale + mask) v` per head, the
/// `g` heads of a KV group as one `(g·t, hd)` block. Returns the probabilities and the context.
fn attention(q: &[f32], k: &[f32], v: &[f32], frame: &Frame) -> CResult<(Vec<f32>, Vec<f32>)> {
    let Dims { b, t, h, g, hd, .. } = frame.dims;
    let rows = g * t;
    let mut scores = vec![0f32; b * h * t * t];
    scores
        .par_chunks_mut(rows * t)
        .enumerate()
        .try_for_each(|(grp, s)| {
            let qg = View::rows(&q[grp * rows * hd..(grp + 1) * rows * hd], rows, hd);
            let kg = View::rows(&k[grp * t * hd..(grp + 1) * t * hd], t, hd);
            product_serial(s, qg, kg.t(), 1.0, false)
        })?;
    let probs = masked_softmax_fwd(&scores, frame.mask, (b, h, t, t), frame.scale);
    let mut ctx = vec![0f32; b * h * t * hd];
    ctx.par_chunks_mut(rows * hd)
        .enumerate()
        .try_for_each(|(grp, c)| {
            let p = View::rows(&probs[grp * rows * t..(grp + 1) * rows * t], rows, t);
            let vg = View::rows(&v[grp * t * hd..(grp + 1) * t * hd], t, hd);
            product_serial(c, p, vg, 1.0, false)
        })?;
    Ok((probs, ctx))
}

/// The gradients of [`attention`]'s `q`, `k`, `v` (head-major) from the context's `dctx`.
fn attention_grad(
    tape: &Tape,
    dctx: &[f32],
    frame: &Frame,
) -> CResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let Dims {
        b, t, kv, g, hd, ..
    } = frame.dims;
    let rows = g * t;
    let groups = b * kv;
    // dP = dctx vᵀ, dv = Pᵀ dctx (summed over the group's heads by the product itself).
    let mut dprobs = vec![0f32; groups * rows * t];
    let mut dv = vec![0f32; groups * t * hd];
    dprobs
        .par_chunks_mut(rows * t)
        .zip(dv.par_chunks_mut(t * hd))
        .enumerate()
        .try_for_each(|(grp, (dp, dvg))| {
            let dc = block(dctx, grp, rows, hd);
            product_serial(dp, dc, block(&tape.v, grp, t, hd).t(), 1.0, false)?;
            product_serial(dvg, block(&tape.probs, grp, rows, t).t(), dc, 1.0, false)
        })?;
    let dscores = masked_softmax_bwd(&tape.probs, &dprobs, t, frame.scale);
    drop(dprobs);
    // dq = dS k, dk = dSᵀ q.
    let mut dq = vec![0f32; groups * rows * hd];
    let mut dk = vec![0f32; groups * t * hd];
    dq.par_chunks_mut(rows * hd)
        .zip(dk.par_chunks_mut(t * hd))
        .enumerate()
        .try_for_each(|(grp, (dqg, dkg))| {
            let ds = block(&dscores, grp, rows, t);
            product_serial(dqg, ds, block(&tape.k, grp, t, hd), 1.0, false)?;
            product_serial(dkg, ds.t(), block(&tape.q, grp, rows, hd), 1.0, false)
        })?;
    Ok((dq, dk, dv))
}

/// `y = base + x Wᵀ (+ bias) + s·(x Aᵀ) Bᵀ` for `x: (n, in)`, where `base` is zero or a residual
/// the output is added to. Also returns `x Aᵀ` for the backward.
fn linear(
    lin: &Linear,
    x: &[f32],
    n: usize,
    base: Option<Vec<f32>>,
) -> CResult<(Vec<f32>, Option<Vec<f32>>)> {
    let (out, inp) = lin.weight.dims2()?;
    let accumulate = base.is_some();
    let mut y = base.unwrap_or_else(|| vec![0f32; n * out]);
    let xv = View::rows(x, n, inp);
    with_slice::<f32, _>(&lin.weight, |w| {
        product(&mut y, xv, View::rows(w, out, inp).t(), 1.0, accumulate)
    })?;
    if let Some(bias) = &lin.bias {
        with_slice::<f32, _>(bias, |bias| {
            y.par_chunks_mut(out).for_each(|row| {
                for (o, &c) in row.iter_mut().zip(bias) {
                    *o += c;
                }
            });
            Ok(())
        })?;
    }
    let Some(slot) = &lin.lora else {
        return Ok((y, None));
    };
    let r = slot.rank();
    let mut low = vec![0f32; n * r];
    with_slice::<f32, _>(&slot.a, |a| {
        product(&mut low, xv, View::rows(a, r, inp).t(), 1.0, false)
    })?;
    with_slice::<f32, _>(&slot.b, |bw| {
        let low = View::rows(&low, n, r);
        product(
            &mut y,
            low,
            View::rows(bw, out, r).t(),
            slot.scale as f32,
            true,
        )
    })?;
    Ok((y, Some(low)))
}

/// The input's gradient of [`linear`] from the output's `dy`, added to `base` when given:
/// `dx = dy W + (s·dy B) A`. With LoRA also `dA = (s·dy B)ᵀ x` and `dB = s·dyᵀ (x Aᵀ)`, added
/// into `grads[module]`.
#[allow(clippy::too_many_arguments)]
fn linear_grad(
    lin: &Linear,
    x: &[f32],
    low: Option<&[f32]>,
    dy: &[f32],
    n: usize,
    base: Option<Vec<f32>>,
    module: &str,
    grads: &mut FactorGrads,
) -> CResult<Vec<f32>> {
    let (out, inp) = lin.weight.dims2()?;
    let accumulate = base.is_some();
    let mut dx = base.unwrap_or_else(|| vec![0f32; n * inp]);
    let dyv = View::rows(dy, n, out);
    with_slice::<f32, _>(&lin.weight, |w| {
        product(&mut dx, dyv, View::rows(w, out, inp), 1.0, accumulate)
    })?;
    let (Some(slot), Some(low)) = (&lin.lora, low) else {
        return Ok(dx);
    };
    let r = slot.rank();
    let scale = slot.scale as f32;
    let (da, db) = grads
        .entry(module.to_string())
        .or_insert_with(|| (vec![0f32; r * inp], vec![0f32; out * r]));
    // dlow = s·dy B, (n, r)
    let mut dlow = vec![0f32; n * r];
    with_slice::<f32, _>(&slot.b, |bw| {
        product(&mut dlow, dyv, View::rows(bw, out, r), scale, false)
    })?;
    let dlowv = View::rows(&dlow, n, r);
    product(da, dlowv.t(), View::rows(x, n, inp), 1.0, true)?;
    product(db, dyv.t(), View::rows(low, n, r), scale, true)?;
    with_slice::<f32, _>(&slot.a, |a| {
        product(&mut dx, dlowv, View::rows(a, r, inp), 1.0, true)
    })?;
    Ok(dx)
}

/// `x + y`, reusing `x`.
fn add(mut x: Vec<f32>, y: &[f32]) -> Vec<f32> {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(a, b)| {
            for (p, &q) in a.iter_mut().zip(b) {
                *p += q;
            }
        });
    x
}

fn rms(norm: &RmsNorm, x: &[f32]) -> CResult<Vec<f32>> {
    with_slice::<f32, _>(&norm.weight, |w| Ok(rms_forward(x, w, norm.eps)))
}

fn rms_grad(norm: &RmsNorm, x: &[f32], dy: &[f32]) -> CResult<Vec<f32>> {
    with_slice::<f32, _>(&norm.weight, |w| Ok(rms_backward(x, w, dy, norm.eps)))
}

/// Summed NLL of `tokens` under `logits: (n, vocab)` and each row's NLL; overwrites the logits
/// with the gradient of `unit · Σ NLL` (`unit · (softmax − onehot)` per row), one exponential
/// per element. With `retain`, a row with base logits also pays `λ · KL(p_base ‖ softmax)`,
/// whose gradient adds `λ · unit · (softmax − p_base)`; its KL is summed into the result's `kl`.
fn cross_entropy_in_place(
    logits: &mut [f32],
    vocab: usize,
    tokens: &[u32],
    unit: f32,
    retain: Option<&Retain>,
) -> CResult<(LossSums, Vec<f64>)> {
    if tokens.iter().any(|&t| t as usize >= vocab) || logits.len() != tokens.len() * vocab {
        candle_core::bail!(
            "cross-entropy: {} tokens do not fit logits of {vocab}",
            tokens.len()
        );
    }
    if let Some(r) = retain {
        if r.base.len() != tokens.len() || r.base.iter().flatten().any(|b| b.len() != vocab) {
            candle_core::bail!("cross-entropy: base logits do not match the targets");
        }
    }
    let rows: Vec<(f64, f64, usize)> = logits
        .par_chunks_mut(vocab)
        .zip(tokens.par_iter())
        .enumerate()
        .map(|(i, (row, &tok))| {
            let target = row[tok as usize];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // KL(p ‖ q) = Σ p·(z_base − z) + lse(z) − lse(z_base); the first part reads the
            // logits before they turn into the gradient.
            let base = retain
                .and_then(|r| r.base[i].map(|b| (b, r.lambda)))
                .map(|(b, lambda)| {
                    let (max_b, sum_b) = exp_sum(b);
                    let inv = 1.0 / sum_b;
                    let cross: f64 = b
                        .iter()
                        .zip(row.iter())
                        .map(|(&zb, &z)| ((zb - max_b).exp() as f64 * inv) * (zb - z) as f64)
                        .sum();
                    (b, lambda, max_b, sum_b, cross)
                });
            // Long rows: sum in f64 so the f32 sum does not drift.
            let mut sum = 0f64;
            for z in row.iter_mut() {
                *z = (*z - max).exp();
                sum += *z as f64;
            }
            let scale = unit / sum as f32;
            for z in row.iter_mut() {
                *z *= scale;
            }
            let mut kl = 0f64;
            if let Some((b, lambda, max_b, sum_b, cross)) = base {
                // p_base's row scaled by `unit` exactly as the softmax was: where the two logit
                // rows are equal, the added gradient is exactly 0.
                let scale_b = unit / sum_b as f32;
                for (g, &zb) in row.iter_mut().zip(b) {
                    *g += lambda * (*g - (zb - max_b).exp() * scale_b);
                }
                kl = cross + (max as f64 + sum.ln()) - (max_b as f64 + sum_b.ln());
            }
            row[tok as usize] -= unit;
            let nll = sum.ln() + (max - target) as f64;
            (nll, kl, usize::from(base.is_some()))
        })
        .collect();
    let (nll, kl, n_retain) = rows
        .iter()
        .fold((0.0, 0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let token_nll = rows.into_iter().map(|r| r.0).collect();
    Ok((LossSums { nll, kl, n_retain }, token_nll))
}

/// The max of a row of logits and `Σ exp(z − max)`, summed in f64 as [`cross_entropy_in_place`]
/// sums the softmax.
fn exp_sum(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = row.iter().map(|&z| (z - max).exp() as f64).sum();
    (max, sum)
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// `(b, t, heads, hd)`, i.e. `(b·t, heads·hd)`: what the projections read and write.
    TokenMajor,
    /// `(b, heads, t, hd)`: what attention reads.
    HeadMajor,
}

/// `x` moved into layout `to` (from the other one), each head vector rotated by its position's
/// angle when a frame is given (`sign` 1: the rotary embedding, −1: its transpose, the backward).
fn relayout(
    x: &[f32],
    dims: Dims,
    heads: usize,
    to: Layout,
    rotate: Option<(&Frame, f32)>,
) -> Vec<f32> {
    let Dims { t, hd, .. } = dims;
    let half = hd / 2;
    let mut out = vec![0f32; x.len()];
    // One output row of `hd` per (sequence, head, position) or (sequence, position, head).
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
        let (bi, head, ti) = match to {
            Layout::HeadMajor => (i / (heads * t), (i / t) % heads, i % t),
            Layout::TokenMajor => (i / (t * heads), i % heads, (i / heads) % t),
        };
        let src = match to {
            Layout::HeadMajor => ((bi * t + ti) * heads + head) * hd,
            Layout::TokenMajor => ((bi * heads + head) * t + ti) * hd,
        };
        let xr = &x[src..src + hd];
        match rotate {
            None => o.copy_from_slice(xr),
            Some((frame, sign)) => {
                let at = (bi * t + ti) * hd;
                let (c, s) = (&frame.cos[at..at + hd], &frame.sin[at..at + hd]);
                for j in 0..half {
                    let (x1, x2) = (xr[j], xr[j + half]);
                    o[j] = x1 * c[j] - sign * x2 * s[j];
                    o[j + half] = x2 * c[j + half] + sign * x1 * s[j + half];
                }
            }
        }
    });
    out
}

/// Block `grp` of a stack of row-major `(r, c)` matrices.
fn block(x: &[f32], grp: usize, r: usize, c: usize) -> View<'_> {
    View::rows(&x[grp * r * c..(grp + 1) * r * c], r, c)
}

/// A strided matrix: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `(rows, cols)`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// One past the last element the view reads.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst (m, n) ← [dst +] scale · a b` on rayon's pool.
fn product(dst: &mut [f32], a: View, b: View, scale: f32, accumulate: bool) -> CResult<()> {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    product_with(dst, a, b, scale, accumulate, parallelism)
}

/// [`product`] on the calling thread, for many small products run side by side.
fn product_serial(dst: &mut [f32], a: View, b: View, scale: f32, accumulate: bool) -> CResult<()> {
    product_with(dst, a, b, scale, accumulate, gemm::Parallelism::None)
}

fn product_with(
    dst: &mut [f32],
    a: View,
    b: View,
    scale: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> CResult<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.len() != m * n || a.extent() > a.data.len() || b.extent() > b.data.len() {
        candle_core::bail!(
            "product: ({m}, {k}) · ({}, {n}) into {} values, views of {} / {} values",
            b.rows,
            dst.len(),
            a.data.len(),
            b.data.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the checks above keep every index the kernel reads inside `a.data` and `b.data`,
    // and every index it writes inside `dst` (row-major, m·n); the three do not overlap since
    // `dst` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
