//! The response-only causal-LM loss: `Σ −log softmax(logits[b, t])[ids[b, t+1]]` over the batch's
//! target positions. The caller divides by the target count of the whole optimizer step (one mean
//! over all targets, as transformers' `ForCausalLMLoss`; with accumulation, as HF Trainer does).
//!
//! Only the target rows go through the final norm and the vocabulary projection: the body runs
//! once with the last block's output captured, and the head is applied to the gathered rows. This
//! is the decoder's own head (final norm, tied or separate `lm_head`, Gemma's logit soft-cap).
//!
//! The retain term ([`retain_kl_sum`]) compares those logits with the base model's at the same
//! targets.

use candle_core::{DType, Module, Tensor, D};

use super::data::Batch;
use super::Result;
use crate::model::decoder::{Decoder, Forward, Logits};
use crate::model::Resid;

/// The summed loss (differentiable) and each target's NLL.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar: the sum of the targets' NLL (not yet divided).
    pub sum: Tensor,
    /// `(n_targets,)`, in the batch's target order.
    pub token_nll: Tensor,
    pub n_targets: usize,
    /// `(n_targets, vocab)` f32, in the batch's target order.
    pub logits: Tensor,
}

/// `log softmax` over the last dimension; the max is detached (it cancels in the gradient).
pub(crate) fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Logits of the rows `h: (n, d_model)` (last block output, before the final norm).
pub fn head_logits(decoder: &Decoder, h: &Tensor) -> candle_core::Result<Tensor> {
    let h = decoder.norm.forward(h)?;
    let head = decoder.lm_head.as_ref().unwrap_or(&decoder.embed_tokens); // (vocab, d)
    let mut logits = if head.track_op() {
        h.matmul(&head.t()?)?
    } else {
        crate::model::frozen::frozen_matmul_t(&h, head)?
    }; // (n, vocab)
    if let Some(cap) = decoder
        .config
        .gemma
        .as_ref()
        .and_then(|g| g.final_logit_softcapping)
    {
        logits = ((logits / cap)?.tanh()? * cap)?;
    }
    Ok(logits)
}

/// Logits `(n_targets, vocab)` f32 of `batch`'s targets, in its target order.
fn target_logits(decoder: &Decoder, batch: &Batch) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dims2()?;
    let last = Resid::In(decoder.config.num_layers);
    let out = decoder.forward(
        Forward {
            input_ids: &batch.input_ids,
            attention_mask: Some(&batch.attention_mask),
            logits: Logits::None,
            capture: &[last],
            edit: None,
        },
        None,
    )?;
    let hidden = out
        .captured
        .get(&last)
        .ok_or(super::TrainError::NoCapture)?; // (b, t, d)
    let d = hidden.dim(D::Minus1)?;
    let rows: Vec<u32> = batch
        .targets
        .iter()
        .map(|x| (x.row * t + x.pos) as u32)
        .collect();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, hidden.device())?;
    let picked = hidden.reshape((b * t, d))?.index_select(&rows, 0)?; // (n, d)
    Ok(head_logits(decoder, &picked)?.to_dtype(DType::F32)?) // (n, vocab)
}

/// Forward pass on `batch` and the summed NLL of its targets.
pub fn response_token_loss(decoder: &Decoder, batch: &Batch) -> Result<LossOutput> {
    let logits = target_logits(decoder, batch)?; // (n, vocab)
    let token_ids: Vec<u32> = batch.targets.iter().map(|x| x.token).collect();
    let n = token_ids.len();
    let token_nll = if crate::model::fused::supported(&logits) {
        // One pass per row forward and backward instead of the (n, vocab) op chain.
        crate::model::fused::row_cross_entropy(&logits, &token_ids)?
    } else {
        let tokens = Tensor::from_vec(token_ids, (n, 1), logits.device())?;
        log_softmax(&logits)?
            .gather(&tokens, 1)?
            .squeeze(1)?
            .neg()?
    }; // (n,)
    Ok(LossOutput {
        sum: token_nll.sum_all()?,
        token_nll,
        n_targets: n,
        logits,
    })
}

/// `Σ KL(p_base ‖ p_θ)` over `batch`'s retain targets and their count, `None` when it has no
/// retain row. `logits` are the adapted model's, from [`response_token_loss`] (the sum is
/// differentiable through them); `base` is the same model with its adapter switched off, run
/// on the retain rows only and detached.
pub fn retain_kl_sum(
    base: &Decoder,
    batch: &Batch,
    logits: &Tensor,
) -> Result<Option<(Tensor, usize)>> {
    let Some(rows) = batch.retain_rows()? else {
        return Ok(None);
    };
    let base_logits = target_logits(base, &rows)?.detach(); // (n_retain, vocab)
    let picked: Vec<u32> = (0..batch.targets.len())
        .filter(|&i| batch.is_retain_target(i))
        .map(|i| i as u32)
        .collect();
    let n = picked.len();
    let adapted = logits.index_select(&Tensor::from_vec(picked, n, logits.device())?, 0)?;
    let log_p = log_softmax(&base_logits)?;
    let log_q = log_softmax(&adapted)?;
    // KL(p ‖ q) = Σ p·(log p − log q); its gradient in the adapted logits is q − p.
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum_all()?;
    Ok(Some((kl, n)))
}
