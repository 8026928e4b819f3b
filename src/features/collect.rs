//! Prompts → the model's residual stream at the SAEs' layers → SAE feature activations, pooled
//! per prompt over the prompt's own content tokens.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::score::PooledSet;
use super::{FeatureError, Result};
use crate::model::chat::Message;
use crate::model::decoder::{Forward, Logits};
use crate::model::generate::left_pad;
use crate::model::load::ChatModel;
use crate::model::Resid;
use crate::sae::Sae;

/// How a prompt's per-token activations become one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the prompt's content tokens (the paper's default).
    #[default]
    Mean,
    /// The last content token only.
    Last,
    /// Element-wise maximum over the content tokens.
    Max,
}

/// A prompt as the model sees it: the chat-formatted ids (with the generation prompt) and the
/// positions holding the user's own text (no system prompt, no template markers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    pub ids: Vec<u32>,
    pub content: Range<usize>,
}

/// Tokenises `prompt` as a single user turn and finds its content span.
///
/// The rendered template is cut where the prompt's text starts and ends; the ids of the text up
/// to each cut must be a prefix of the whole conversation's ids (true whenever the template puts
/// a separator such as a newline or a special token on both sides of the content, as every chat
/// template here does). Anything else is an error rather than a silently shifted span.
pub fn prompt_tokens(model: &ChatModel, prompt: &str) -> Result<PromptTokens> {
    let messages = [Message::user(prompt)];
    let rendered = model.template.render(&messages, true)?;
    let ids = model.tokenizer.encode(&rendered, false)?;
    let bad = |why: &str| FeatureError::ContentSpan {
        prompt: prompt.chars().take(80).collect(),
        why: why.to_string(),
    };
    let trimmed = prompt.trim();
    if trimmed.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    let start = rendered
        .rfind(trimmed)
        .ok_or_else(|| bad("the rendered template does not contain the prompt's text"))?;
    let end = start + trimmed.len();
    let before = model.tokenizer.encode(&rendered[..start], false)?;
    let through = model.tokenizer.encode(&rendered[..end], false)?;
    if !ids.starts_with(&before) || !ids.starts_with(&through) || through.len() <= before.len() {
        return Err(bad("the tokens before and through the content are not a prefix of the whole conversation's tokens"));
    }
    Ok(PromptTokens {
        ids,
        content: before.len()..through.len(),
    })
}

/// Pooled rows of every prompt, per layer: SAE features and the raw residual stream.
#[derive(Debug, Clone, Default)]
pub struct Pooled {
    pub features: BTreeMap<Resid, PooledSet>,
    pub resid: BTreeMap<Resid, PooledSet>,
}

/// One prompt's pooled SAE features, which features fired anywhere, and its pooled residual.
#[derive(Debug, Clone)]
struct PromptRow {
    features: Vec<f32>,
    fired: Vec<bool>,
    resid: Vec<f32>,
}

/// Pools rows `(n_tok, width)` into one row and a fired-anywhere mask.
fn pool(rows: &[Vec<f32>], pooling: Pooling) -> (Vec<f32>, Vec<bool>) {
    let width = rows.first().map_or(0, Vec::len);
    let mut fired = vec![false; width];
    for row in rows {
        for (f, v) in fired.iter_mut().zip(row) {
            *f |= *v > 0.0;
        }
    }
    let pooled = match pooling {
        Pooling::Mean => {
            let mut sum = vec![0.0f64; width];
            for row in rows {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += *v as f64;
                }
            }
            sum.iter().map(|s| (s / rows.len() as f64) as f32).collect()
        }
        Pooling::Last => rows.last().cloned().unwrap_or_default(),
        Pooling::Max => {
            let mut max = vec![f32::NEG_INFINITY; width];
            for row in rows {
                for (m, v) in max.iter_mut().zip(row) {
                    *m = m.max(*v);
                }
            }
            max
        }
    };
    (pooled, fired)
}

/// One batch of prompts after the forward pass: the content-token residuals at each hook,
/// `(n_content, d)` f32, and for each prompt (by index into the caller's list) its rows there.
pub struct ContentBatch {
    pub prompts: Vec<usize>,
    pub spans: Vec<Range<usize>>,
    pub resid: BTreeMap<Resid, Tensor>,
}

/// Runs the frozen model over `tokens` in batches of `batch_size` (left-padded, similar lengths
/// together, the pass stopping after the deepest hook) and hands each batch's content-token
/// residuals to `visit`. The one forward loop behind feature pooling and feature cards.
pub fn for_each_content_batch<E: From<FeatureError>>(
    model: &ChatModel,
    tokens: &[PromptTokens],
    hooks: &[Resid],
    batch_size: usize,
    visit: &mut dyn FnMut(ContentBatch) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let device = model.decoder.device().clone();
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| (tokens[i].ids.len(), i));
    let pad = model.tokenizer.pad_id().unwrap_or(0);
    let run = |batch: &[usize]| -> Result<ContentBatch> {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|&i| tokens[i].ids.clone()).collect();
        let (ids, mask) = left_pad(&seqs, pad, &device)?;
        let t = ids.dim(1)?;
        let out = model.decoder.forward(
            Forward {
                input_ids: &ids,
                attention_mask: Some(&mask),
                logits: Logits::None,
                capture: hooks,
                edit: None,
            },
            None,
        )?;
        // Row indices (into the flattened (b·t) positions) of every prompt's content tokens.
        let mut index = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for (row, &i) in batch.iter().enumerate() {
            let offset = row * t + (t - tokens[i].ids.len());
            let first = index.len();
            index.extend(tokens[i].content.clone().map(|p| (offset + p) as u32));
            spans.push(first..index.len());
        }
        let index = Tensor::from_vec(index.clone(), index.len(), &device)?;
        let mut resid = BTreeMap::new();
        for &hook in hooks {
            let captured = out
                .captured
                .get(&hook)
                .ok_or(FeatureError::Capture { hook })?;
            let rows = captured
                .flatten_to(1)? // (b·t, d)
                .to_dtype(DType::F32)?
                .index_select(&index, 0)?; // (n_content, d)
            resid.insert(hook, rows);
        }
        Ok(ContentBatch {
            prompts: batch.to_vec(),
            spans,
            resid,
        })
    };
    for batch in order.chunks(batch_size.max(1)) {
        visit(run(batch)?)?;
    }
    Ok(())
}

/// Runs the frozen model over `prompts` and pools, per prompt, each SAE's features and the raw
/// residual at its layer. `on_batch(prompts_done)` is called after every batch. Prompt order is
/// kept in the output.
pub fn collect(
    model: &ChatModel,
    saes: &[Sae],
    prompts: &[String],
    pooling: Pooling,
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Pooled> {
    let d_model = model.decoder.config.hidden_size;
    for sae in saes {
        sae.check_against_model(d_model, model.decoder.config.num_layers)?;
    }
    let hooks: Vec<Resid> = saes.iter().map(Sae::hook).collect();
    let tokens = prompts
        .iter()
        .map(|p| prompt_tokens(model, p))
        .collect::<Result<Vec<_>>>()?;
    // rows[sae][prompt]
    let mut rows: Vec<Vec<Option<PromptRow>>> = vec![vec![None; prompts.len()]; saes.len()];
    let mut done = 0;
    for_each_content_batch(model, &tokens, &hooks, batch_size, &mut |batch| {
        for (s, sae) in saes.iter().enumerate() {
            let resid = &batch.resid[&sae.hook()];
            let feats = sae.encode(resid)?.to_vec2::<f32>()?; // (n_content, d_sae)
            let resid = resid.to_vec2::<f32>()?;
            for (&i, span) in batch.prompts.iter().zip(&batch.spans) {
                let (features, fired) = pool(&feats[span.clone()], pooling);
                let (resid, _) = pool(&resid[span.clone()], pooling);
                rows[s][i] = Some(PromptRow {
                    features,
                    fired,
                    resid,
                });
            }
        }
        done += batch.prompts.len();
        on_batch(done);
        Ok::<(), FeatureError>(())
    })?;
    let mut pooled = Pooled::default();
    for (s, sae) in saes.iter().enumerate() {
        let mut features = PooledSet::new(sae.d_sae());
        let mut resid = PooledSet::new(d_model);
        for row in rows[s].iter().flatten() {
            features.push(&row.features, &row.fired);
            resid.push(&row.resid, &vec![true; d_model]);
        }
        pooled.features.insert(sae.hook(), features);
        pooled.resid.insert(sae.hook(), resid);
    }
    Ok(pooled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_a_constant_sequence_returns_the_constant() {
        let rows = vec![vec![0.5, 0.0, 2.0]; 4];
        for p in [Pooling::Mean, Pooling::Last, Pooling::Max] {
            let (row, fired) = pool(&rows, p);
            assert_eq!(row, vec![0.5, 0.0, 2.0], "{p:?}");
            assert_eq!(fired, vec![true, false, true]);
        }
    }

    #[test]
    fn pooling_modes_differ_as_documented() {
        let rows = vec![vec![1.0, 0.0], vec![3.0, 0.0], vec![2.0, 4.0]];
        assert_eq!(pool(&rows, Pooling::Mean).0, vec![2.0, 4.0 / 3.0]);
        assert_eq!(pool(&rows, Pooling::Last).0, vec![2.0, 4.0]);
        assert_eq!(pool(&rows, Pooling::Max).0, vec![3.0, 4.0]);
    }
}
