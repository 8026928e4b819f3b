//! Capability without generation: log-likelihood of given responses under the model.
//!
//! hhh_alignment: each choice is scored as the assistant's reply to the item's input (chat template,
//! default system prompt); the sum of the log-probabilities of the reply's tokens (its content and
//! the turn's closing tokens, which both choices share) picks the answer. Alpaca held-out pairs:
//! mean negative log-likelihood per response token.

use super::Result;
use crate::model::chat::Message;
use crate::model::decoder::{Forward, Logits};
use crate::model::load::ChatModel;
use candle_core::{DType, Tensor, D};

/// Prompt ids (with generation prompt) and the full conversation's ids for one reply.
pub fn reply_ids(
    model: &ChatModel,
    prompt: &str,
    reply: &str,
    max_reply_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let user = [Message::user(prompt)];
    let prompt_ids = model.encode_chat(&user)?;
    let full = model.tokenizer.apply_chat_template(
        &model.template,
        &[Message::user(prompt), Message::assistant(reply)],
        false,
    )?;
    if !full.starts_with(&prompt_ids) || full.len() <= prompt_ids.len() {
        return Err(super::EvalError::Template(
            "the prompt with a generation prompt is not a prefix of the conversation".into(),
        ));
    }
    let mut reply_ids = full[prompt_ids.len()..].to_vec();
    reply_ids.truncate(max_reply_tokens);
    Ok((prompt_ids, reply_ids))
}

/// Sum of log p(reply token | everything before), and the number of reply tokens, for each
/// `(prompt_ids, reply_ids)`; sequences are run together in left-padded batches.
pub fn reply_logprobs(
    model: &ChatModel,
    items: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<(f64, usize)>> {
    let device = model.decoder.device().clone();
    let pad = model
        .tokenizer
        .pad_id()
        .or_else(|| model.tokenizer.eos_ids().first().copied())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(p, r)| p.iter().chain(r).copied().collect())
            .collect();
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (ids_t, mask_t) = crate::model::generate::left_pad(&seqs, pad, &device)?;
        let logits = model
            .decoder
            .forward(
                Forward {
                    input_ids: &ids_t,
                    attention_mask: Some(&mask_t),
                    logits: Logits::All,
                    capture: &[],
                    edit: None,
                },
                None,
            )?
            .logits
            .ok_or_else(|| super::EvalError::Template("forward returned no logits".into()))?;
        for (row, (p, r)) in chunk.iter().enumerate() {
            let padn = t - p.len() - r.len();
            // Logits at position j predict token j + 1: the reply's tokens are predicted from
            // positions padn + |p| − 1 .. padn + |p| + |r| − 1.
            let start = padn + p.len() - 1;
            let lg = logits
                .get(row)?
                .narrow(0, start, r.len())?
                .to_dtype(DType::F32)?;
            let lsm = candle_nn::ops::log_softmax(&lg, D::Minus1)?;
            let targets = Tensor::from_vec(r.clone(), (r.len(), 1), &device)?;
            let picked: Vec<f32> = lsm.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
            out.push((picked.iter().map(|&x| x as f64).sum(), r.len()));
        }
    }
    Ok(out)
}
