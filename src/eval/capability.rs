//! Capability without generation: log-likelihood of given responses under the model.
//!
//! True/false statement pairs: each statement is scored as the assistant's reply to one fixed
//! request (chat template, default system prompt); the mean log-probability per reply token (its
//! content and the turn's closing tokens, which both choices share) picks the answer. Alpaca
//! held-out pairs: mean negative log-likelihood per response token.

use super::Result;
use crate::model::chat::Message;
use crate::model::decoder::{Forward, KvCache, Logits};
use crate::model::generate;
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
/// `(prompt_ids, reply_ids)`, in the order given. Sequences of similar length run together in
/// left-padded batches (sorted, so little of a batch is padding), and only the positions that
/// predict reply tokens go through the vocabulary projection.
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
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].0.len() + items[i].1.len());
    // The beginning every prompt shares (a chat template's system turn; the whole prompt when
    // all are alike) runs once, and each batch starts from a copy of its cache. It stops short
    // of every prompt's last token, so the positions that predict reply tokens all run below.
    let prompts: Vec<Vec<u32>> = items.iter().map(|(p, _)| p.clone()).collect();
    let shared = match generate::shared_prefix_len(&prompts) {
        n if n >= generate::MIN_SHARED_PREFIX && items.len() > 1 => n,
        _ => 0,
    };
    let prefix_cache = if shared > 0 {
        let mut one = KvCache::new();
        let ids = Tensor::from_slice(&prompts[0][..shared], (1, shared), &device)?;
        model.decoder.forward(
            Forward {
                input_ids: &ids,
                attention_mask: None,
                logits: Logits::Last,
                capture: &[],
                edit: None,
            },
            Some(&mut one),
        )?;
        Some(one)
    } else {
        None
    };
    let mut out = vec![(0.0, 0); items.len()];
    for batch in order.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = batch
            .iter()
            .map(|&i| {
                items[i].0[shared..]
                    .iter()
                    .chain(&items[i].1)
                    .copied()
                    .collect()
            })
            .collect();
        // Left padding puts every reply at the end of its row; logits at position j predict
        // token j + 1, so a reply of n tokens is predicted by the n positions before the last.
        let tail = batch.iter().map(|&i| items[i].1.len()).max().unwrap_or(0) + 1;
        let (ids_t, mask_t) = generate::left_pad(&seqs, pad, &device)?;
        let mut cache = match &prefix_cache {
            Some(one) => Some(one.repeat_batch(batch.len())?),
            None => None,
        };
        let logits = model
            .decoder
            .forward(
                Forward {
                    input_ids: &ids_t,
                    attention_mask: Some(&mask_t),
                    logits: Logits::Tail(tail),
                    capture: &[],
                    edit: None,
                },
                cache.as_mut(),
            )?
            .logits
            .ok_or_else(|| super::EvalError::Template("forward returned no logits".into()))?;
        for (row, &i) in batch.iter().enumerate() {
            let reply = &items[i].1;
            let lg = logits
                .get(row)?
                .narrow(0, tail - reply.len() - 1, reply.len())?
                .to_dtype(DType::F32)?;
            let lsm = candle_nn::ops::log_softmax(&lg, D::Minus1)?;
            let targets = Tensor::from_vec(reply.clone(), (reply.len(), 1), &device)?;
            let picked: Vec<f32> = lsm.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
            out[i] = (picked.iter().map(|&x| x as f64).sum(), reply.len());
        }
    }
    Ok(out)
}
