//! Chat examples → token ids with the response span marked → left-padded, length-bucketed batches
//! in a seeded order that is a pure function of `(seed, epoch)`, so a resumed run sees exactly
//! the batches an uninterrupted one would.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{Result, TrainError};
use crate::model::chat::{ChatTemplate, Message};
use crate::model::tokenizer::Tokenizer;

/// One conversation; the last message is the assistant response the loss is taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatExample {
    pub messages: Vec<Message>,
}

/// Token ids of a whole conversation; tokens `target_start..target_end` are the targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub target_start: usize,
    pub target_end: usize,
    /// A retain example (a benign one): with `retain_kl > 0` its targets also pay
    /// KL(base ‖ adapted), so the adapter leaves the model's answers to such prompts alone.
    pub retain: bool,
}

impl TokenizedExample {
    pub fn num_targets(&self) -> usize {
        self.target_end - self.target_start
    }
}

/// Tokenizes a conversation with the model's template and marks the response tokens. The
/// example is not a retain example; the caller, who knows its kind, sets `retain`.
///
/// The targets are the assistant's content and the special token that closes its turn
/// (`<|im_end|>` for ChatML), not the turn header and not what the template writes after the end
/// token (ChatML's `\n`). The prompt part is the template with a generation prompt on all but the
/// last message; it must be a prefix of the whole conversation's ids.
pub fn tokenize_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    example: &ChatExample,
    index: usize,
) -> Result<TokenizedExample> {
    let bad = |message: String| TrainError::Example { index, message };
    let (last, prompt) = example
        .messages
        .split_last()
        .ok_or_else(|| bad("no messages".into()))?;
    if last.role != "assistant" {
        return Err(bad(format!(
            "the last message is from {:?}, not the assistant",
            last.role
        )));
    }
    if last.content.is_empty() {
        return Err(bad("the assistant response is empty".into()));
    }
    let model_err = |e: crate::model::tokenizer::TokenizerError| bad(e.to_string());
    let prompt_ids = tokenizer
        .apply_chat_template(template, prompt, true)
        .map_err(model_err)?;
    let ids = tokenizer
        .apply_chat_template(template, &example.messages, false)
        .map_err(model_err)?;
    if !ids.starts_with(&prompt_ids) {
        return Err(bad(
            "the prompt with a generation prompt is not a prefix of the whole conversation; \
             this template cannot mark the response"
                .into(),
        ));
    }
    let start = prompt_ids.len();
    if start == 0 {
        return Err(bad(
            "empty prompt: the first target needs a token before it".into(),
        ));
    }
    let end_token = ids[start..]
        .iter()
        .position(|&id| tokenizer.is_special(id))
        .ok_or_else(|| bad("no end-of-turn token after the response".into()))?;
    if end_token == 0 {
        return Err(bad("the response starts with a special token".into()));
    }
    Ok(TokenizedExample {
        ids,
        target_start: start,
        target_end: start + end_token + 1,
        retain: false,
    })
}

/// One scored prediction: `logits[row, pos]` should predict `token` (= `ids[row][pos + 1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub row: usize,
    pub pos: usize,
    pub token: u32,
}

/// A left-padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(b, t)` u32.
    pub input_ids: Tensor,
    /// `(b, t)` u32, 1 real, 0 pad.
    pub attention_mask: Tensor,
    pub targets: Vec<Target>,
    /// Per row: whether it is a retain example ([`TokenizedExample::retain`]).
    pub retain: Vec<bool>,
    /// Real (non-pad) tokens in the batch.
    pub real_tokens: usize,
}

impl Batch {
    /// Left-pads `examples` to the longest one with `pad_id`.
    pub fn left_padded(
        examples: &[&TokenizedExample],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let b = examples.len();
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        let mut targets = Vec::new();
        for (row, e) in examples.iter().enumerate() {
            let pad = t - e.ids.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            mask.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(&e.ids);
            mask.extend(std::iter::repeat_n(1u32, e.ids.len()));
            for i in e.target_start..e.target_end {
                targets.push(Target {
                    row,
                    pos: pad + i - 1,
                    token: e.ids[i],
                });
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            targets,
            retain: examples.iter().map(|e| e.retain).collect(),
            real_tokens: examples.iter().map(|e| e.ids.len()).sum(),
        })
    }

    /// Whether target `i` is on a retain row.
    pub fn is_retain_target(&self, i: usize) -> bool {
        self.retain.get(self.targets[i].row) == Some(&true)
    }

    /// The retain rows alone, same width; their targets in the same order as here. `None` when
    /// the batch has none.
    pub fn retain_rows(&self) -> Result<Option<Batch>> {
        let b = self.input_ids.dim(0)?;
        if self.retain.len() != b {
            return Err(TrainError::Internal(format!(
                "{} retain flags for a batch of {b} rows",
                self.retain.len()
            )));
        }
        let rows: Vec<u32> = (0..b as u32).filter(|&r| self.retain[r as usize]).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        // New index of each kept row.
        let mut new_row = vec![None; b];
        for (i, &r) in rows.iter().enumerate() {
            new_row[r as usize] = Some(i);
        }
        let targets = self
            .targets
            .iter()
            .filter_map(|x| new_row[x.row].map(|row| Target { row, ..*x }))
            .collect();
        let n = rows.len();
        let index = Tensor::from_vec(rows, n, self.input_ids.device())?;
        let attention_mask = self.attention_mask.index_select(&index, 0)?;
        let real_tokens = attention_mask.sum_all()?.to_scalar::<u32>()? as usize;
        Ok(Some(Batch {
            input_ids: self.input_ids.index_select(&index, 0)?,
            attention_mask,
            targets,
            retain: vec![true; n],
            real_tokens,
        }))
    }
}

/// How many consecutive batches share one length-sorted window: big enough that batches hold
/// similar lengths (little padding), small enough that the order stays well mixed.
const BUCKET_WINDOW_BATCHES: usize = 16;

/// The micro-batch order: epoch `e` shuffles the examples with a seed derived from `(seed, e)`,
/// sorts windows of `16 × batch_size` by length, cuts them into batches and shuffles the batches.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    cached: Option<(usize, Vec<Vec<usize>>)>,
}

impl BatchPlan {
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Self {
        Self {
            lengths,
            batch_size: batch_size.max(1),
            seed,
            cached: None,
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.batch_size)
    }

    fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        order.shuffle(&mut rng);
        let mut batches = Vec::with_capacity(self.batches_per_epoch());
        for window in order.chunks_mut(self.batch_size * BUCKET_WINDOW_BATCHES) {
            window.sort_by_key(|&i| self.lengths[i]);
            batches.extend(window.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// Example indices of micro-batch `k` of the endless stream (epoch after epoch).
    pub fn micro_batch(&mut self, k: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, i) = (k / per_epoch, k % per_epoch);
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            self.cached = Some((epoch, self.epoch(epoch)));
        }
        self.cached
            .as_ref()
            .map(|c| c.1[i].clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_example_once_per_epoch_and_repeats_by_seed() {
        let lengths: Vec<usize> = (0..37).map(|i| (i * 7919) % 53).collect();
        let mut plan = BatchPlan::new(lengths.clone(), 4, 11);
        assert_eq!(plan.batches_per_epoch(), 10);
        for epoch in 0..2 {
            let mut seen: Vec<usize> = (0..10)
                .flat_map(|k| plan.micro_batch(epoch * 10 + k))
                .collect();
            seen.sort();
            assert_eq!(seen, (0..37).collect::<Vec<_>>());
        }
        let mut again = BatchPlan::new(lengths.clone(), 4, 11);
        assert_eq!(plan.micro_batch(13), again.micro_batch(13));
        let mut other = BatchPlan::new(lengths, 4, 12);
        let a: Vec<_> = (0..10).map(|k| plan.micro_batch(k)).collect();
        let b: Vec<_> = (0..10).map(|k| other.micro_batch(k)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn left_padding_shifts_targets_by_the_pad_count() {
        let long = TokenizedExample {
            ids: vec![5, 6, 7, 8, 9],
            target_start: 3,
            target_end: 5,
            retain: false,
        };
        let short = TokenizedExample {
            ids: vec![1, 2, 3],
            target_start: 2,
            target_end: 3,
            retain: true,
        };
        let batch = Batch::left_padded(&[&long, &short], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 8, 9], vec![0, 0, 1, 2, 3]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1]]
        );
        // Token 3 of the short row sits at padded index 4 and is predicted from index 3.
        assert_eq!(
            batch.targets,
            vec![
                Target {
                    row: 0,
                    pos: 2,
                    token: 8
                },
                Target {
                    row: 0,
                    pos: 3,
                    token: 9
                },
                Target {
                    row: 1,
                    pos: 3,
                    token: 3
                },
            ]
        );
        assert_eq!(batch.real_tokens, 8);
    }
}
