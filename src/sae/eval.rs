//! SAE evaluation on held-out sequences: reconstruction metrics on the captured residuals, and
//! the next-token loss when the reconstruction is spliced into the model in place of the residual.
//!
//! Splicing replaces the residual at the SAE's hook, at the positions the SAE is meant for (the
//! sequences' `keep` positions: BOS and special tokens stay clean, as they were never in the
//! training data), by `x̂`; the zero-ablation baseline puts 0 there instead. Cross-entropy is the
//! mean next-token loss over every real position that has a next token; KL is
//! `mean_t KL(p_clean,t ‖ p_other,t)` over the same positions, in nats.
//!
//! `ce_loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)`.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::store::Sequence;
use super::{metrics, Result, Sae, SaeError};
use crate::model::decoder::{Decoder, Forward, Logits, ResidEdit};
use crate::model::Resid;

/// The formula, as printed beside the results.
pub const CE_RECOVERED_FORMULA: &str =
    "ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpliceResult {
    pub ce_clean: f64,
    pub ce_spliced: f64,
    pub ce_zero_ablation: f64,
    pub ce_loss_recovered: f64,
    /// mean KL(clean ‖ spliced) per predicted token, nats
    pub kl_spliced: f64,
    /// mean KL(clean ‖ zero-ablated) per predicted token, nats
    pub kl_zero_ablation: f64,
    /// predicted tokens the losses average over
    pub predicted_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeEvalReport {
    pub hook: String,
    pub d_sae: usize,
    /// held-out tokens (kept positions) the reconstruction metrics use
    pub tokens: u64,
    pub l0: f64,
    pub explained_variance: f64,
    pub mean_cosine: f64,
    /// latents that never fired on the held-out tokens
    pub dead_frac: f64,
    /// latents firing on more than 10 % of the held-out tokens
    pub dense_frac: f64,
    pub splice: SpliceResult,
    pub formula: String,
}

/// Batching for evaluation forwards (full logits: keep batches small).
#[derive(Debug, Clone, Copy)]
pub struct EvalBatching {
    pub batch_tokens: usize,
    pub max_seq_len: usize,
}

impl Default for EvalBatching {
    fn default() -> Self {
        EvalBatching {
            batch_tokens: 1024,
            max_seq_len: 512,
        }
    }
}

fn log_softmax_rows(logits: &[f32], v: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(v) {
        let lse = crate::model::generate::log_sum_exp(row);
        out.extend(row.iter().map(|&x| x as f64 - lse));
    }
    out
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    /// (b, t, 1) f32: 1 where the residual is replaced
    edit_mask: Tensor,
    /// per row: (pad, len)
    rows: Vec<(usize, usize)>,
    t: usize,
}

/// Held-out tokens [`evaluate`] measures on: kept positions within `max_seq_len`.
pub fn evaluated_tokens(seqs: &[Sequence], b: EvalBatching) -> u64 {
    seqs.iter()
        .map(|s| s.keep.iter().take(b.max_seq_len).filter(|&&k| k).count() as u64)
        .sum()
}

fn batches(seqs: &[Sequence], b: EvalBatching, device: &Device) -> Result<Vec<Batch>> {
    let mut out = Vec::new();
    let mut next = 0;
    while next < seqs.len() {
        let mut end = next;
        let mut longest = 0;
        while end < seqs.len() {
            let l = longest.max(seqs[end].ids.len().min(b.max_seq_len));
            if end > next && l * (end - next + 1) > b.batch_tokens {
                break;
            }
            longest = l;
            end += 1;
        }
        let n = end - next;
        let mut ids = vec![0u32; n * longest];
        let mut mask = vec![0u32; n * longest];
        let mut em = vec![0f32; n * longest];
        let mut rows = Vec::new();
        for (r, s) in seqs[next..end].iter().enumerate() {
            let len = s.ids.len().min(b.max_seq_len);
            let pad = longest - len;
            for p in 0..len {
                ids[r * longest + pad + p] = s.ids[p];
                mask[r * longest + pad + p] = 1;
                em[r * longest + pad + p] = if s.keep[p] { 1.0 } else { 0.0 };
            }
            rows.push((pad, len));
        }
        if longest > 0 {
            out.push(Batch {
                ids: Tensor::from_vec(ids, (n, longest), device)?,
                mask: Tensor::from_vec(mask, (n, longest), device)?,
                edit_mask: Tensor::from_vec(em, (n, longest, 1), device)?,
                rows,
                t: longest,
            });
        }
        next = end;
    }
    Ok(out)
}

fn forward_logits(
    decoder: &Decoder,
    batch: &Batch,
    capture: &[Resid],
    edit: Option<ResidEdit<'_>>,
) -> Result<(Vec<f32>, Option<Tensor>)> {
    let out = decoder
        .forward(
            Forward {
                input_ids: &batch.ids,
                attention_mask: Some(&batch.mask),
                logits: Logits::All,
                capture,
                edit,
            },
            None,
        )
        .map_err(|e| SaeError::Source(format!("model forward: {e}")))?;
    let logits = out
        .logits
        .ok_or_else(|| SaeError::Source("the forward returned no logits".into()))?;
    let captured = capture.first().and_then(|h| out.captured.get(h).cloned());
    Ok((
        logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        captured,
    ))
}

/// Accumulates CE and KL over predicted positions.
#[derive(Default)]
struct LossSums {
    ce: f64,
    kl: f64,
}

/// CE of `logp` at the targets and KL(clean ‖ logp), over the batch's predicted positions.
fn accumulate(
    batch: &Batch,
    ids: &[u32],
    vocab: usize,
    clean: &[f64],
    other: &[f64],
    sums: &mut LossSums,
) -> u64 {
    let t = batch.t;
    let mut count = 0;
    for (r, &(pad, len)) in batch.rows.iter().enumerate() {
        for p in pad..pad + len.saturating_sub(1) {
            let at = (r * t + p) * vocab;
            let target = ids[r * t + p + 1] as usize;
            sums.ce -= other[at + target];
            let (pc, po) = (&clean[at..at + vocab], &other[at..at + vocab]);
            sums.kl += pc
                .iter()
                .zip(po)
                .map(|(&a, &b)| a.exp() * (a - b))
                .sum::<f64>();
            count += 1;
        }
    }
    count
}

/// Splice evaluation with an arbitrary reconstruction `recon` ((n, d) → (n, d)) at `hook`.
/// Returns the splice result and the captured clean residuals at kept positions (n, d).
pub fn splice_eval(
    decoder: &Decoder,
    seqs: &[Sequence],
    hook: Resid,
    recon: &dyn Fn(&Tensor) -> Result<Tensor>,
    batching: EvalBatching,
) -> Result<(SpliceResult, Tensor)> {
    let device = decoder.device().clone();
    let vocab = decoder.config.vocab_size;
    let d = decoder.config.hidden_size;
    let mut clean_sums = LossSums::default();
    let mut zero_sums = LossSums::default();
    let mut spliced_sums = LossSums::default();
    let mut predicted = 0u64;
    let mut kept_rows: Vec<f32> = Vec::new();
    for batch in batches(seqs, batching, &device)? {
        let ids: Vec<u32> = batch.ids.flatten_all()?.to_vec1()?;
        let (clean_logits, captured) = forward_logits(decoder, &batch, &[hook], None)?;
        let clean = log_softmax_rows(&clean_logits, vocab);
        drop(clean_logits);
        let x = captured.ok_or_else(|| SaeError::Source(format!("{hook} was not captured")))?;
        let (b, t, _) = x.dims3()?;
        // kept rows of the clean residual
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let em: Vec<f32> = batch.edit_mask.flatten_all()?.to_vec1()?;
        for (i, &m) in em.iter().enumerate() {
            if m > 0.0 {
                kept_rows.extend_from_slice(&xs[i * d..(i + 1) * d]);
            }
        }
        // reconstruction at every position, then mixed in where edit_mask is 1
        let x_hat = recon(&x.reshape((b * t, d))?.to_dtype(DType::F32)?)?
            .reshape((b, t, d))?
            .to_dtype(x.dtype())?;
        let em_t = batch.edit_mask.to_dtype(x.dtype())?;
        let splice = |h: &Tensor| -> candle_core::Result<Tensor> {
            let keep = (1.0 - &em_t)?;
            h.broadcast_mul(&keep)? + x_hat.broadcast_mul(&em_t)?
        };
        let zero = |h: &Tensor| -> candle_core::Result<Tensor> { h.broadcast_mul(&(1.0 - &em_t)?) };
        let n = accumulate(&batch, &ids, vocab, &clean, &clean, &mut clean_sums);
        predicted += n;
        let (zl, _) = forward_logits(
            decoder,
            &batch,
            &[],
            Some(ResidEdit {
                at: hook,
                edit: &zero,
            }),
        )?;
        accumulate(
            &batch,
            &ids,
            vocab,
            &clean,
            &log_softmax_rows(&zl, vocab),
            &mut zero_sums,
        );
        drop(zl);
        let (sl, _) = forward_logits(
            decoder,
            &batch,
            &[],
            Some(ResidEdit {
                at: hook,
                edit: &splice,
            }),
        )?;
        accumulate(
            &batch,
            &ids,
            vocab,
            &clean,
            &log_softmax_rows(&sl, vocab),
            &mut spliced_sums,
        );
    }
    if predicted == 0 {
        return Err(SaeError::Metric {
            metric: "splice",
            message: "no position has a next token".into(),
        });
    }
    let p = predicted as f64;
    let (ce_clean, ce_zero, ce_spliced) =
        (clean_sums.ce / p, zero_sums.ce / p, spliced_sums.ce / p);
    let n_kept = kept_rows.len() / d.max(1);
    let kept = Tensor::from_vec(kept_rows, (n_kept, d), &Device::Cpu)?;
    Ok((
        SpliceResult {
            ce_clean,
            ce_spliced,
            ce_zero_ablation: ce_zero,
            ce_loss_recovered: metrics::ce_loss_recovered(ce_clean, ce_spliced, ce_zero)?,
            kl_spliced: spliced_sums.kl / p,
            kl_zero_ablation: zero_sums.kl / p,
            predicted_tokens: predicted,
        },
        kept,
    ))
}

/// Full evaluation of `sae` on held-out `seqs`.
pub fn evaluate(
    decoder: &Decoder,
    sae: &Sae,
    seqs: &[Sequence],
    batching: EvalBatching,
) -> Result<SaeEvalReport> {
    sae.check_against_model(decoder.config.hidden_size, decoder.config.num_layers)?;
    let hook = sae.hook();
    let recon = |x: &Tensor| -> Result<Tensor> { sae.forward(&x.to_device(sae.device())?) };
    let (splice, x) = splice_eval(decoder, seqs, hook, &recon, batching)?;
    let x = x.to_device(sae.device())?;
    let n = x.dims()[0];
    if n < 2 {
        return Err(SaeError::Metric {
            metric: "evaluate",
            message: format!("{n} held-out tokens; need at least 2"),
        });
    }
    // encode in chunks to bound the (n, d_sae) activations
    let mut l0_sum = 0f64;
    let mut fires = vec![0u64; sae.d_sae()];
    let mut x_hat_parts = Vec::new();
    for start in (0..n).step_by(2048) {
        let len = 2048.min(n - start);
        let xc = x.narrow(0, start, len)?;
        let f = sae.encode(&xc)?;
        l0_sum += metrics::l0(&f)? * len as f64;
        for (c, v) in fires.iter_mut().zip(metrics::fire_counts(&f)?) {
            *c += v;
        }
        x_hat_parts.push(sae.decode(&f)?);
    }
    let x_hat = Tensor::cat(&x_hat_parts, 0)?;
    Ok(SaeEvalReport {
        hook: super::hook_name(hook),
        d_sae: sae.d_sae(),
        tokens: n as u64,
        l0: l0_sum / n as f64,
        explained_variance: metrics::explained_variance(&x, &x_hat)?,
        mean_cosine: metrics::mean_cosine(&x, &x_hat)?,
        dead_frac: metrics::dead_fraction(&fires)?,
        dense_frac: metrics::dense_fraction(&fires, n as u64)?,
        splice,
        formula: CE_RECOVERED_FORMULA.to_string(),
    })
}

/// A readable table of reports, one row per SAE.
pub fn table(reports: &[SaeEvalReport]) -> String {
    let mut s = format!(
        "{:<26} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>7}\n",
        "hook",
        "L0",
        "EV",
        "cos",
        "dead",
        "dense",
        "CErec",
        "CEclean",
        "CEsplice",
        "CEzero",
        "KL",
        "tokens"
    );
    for r in reports {
        s += &format!(
            "{:<26} {:>6.1} {:>7.4} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>8.4} {:>8.4} {:>8.4} {:>7.4} {:>7}\n",
            r.hook,
            r.l0,
            r.explained_variance,
            r.mean_cosine,
            r.dead_frac,
            r.dense_frac,
            r.splice.ce_loss_recovered,
            r.splice.ce_clean,
            r.splice.ce_spliced,
            r.splice.ce_zero_ablation,
            r.splice.kl_spliced,
            r.tokens
        );
    }
    s += &format!("{CE_RECOVERED_FORMULA}; splice and zero-ablation at content positions only (BOS/special kept clean); KL = mean KL(clean || spliced), nats\n");
    s
}
