//! Continuous batching: sequences join a batch that is already decoding and leave it the step
//! they finish, so a server answers many clients with one decode step per token for all of them.
//!
//! [`generate`](super::generate::generate) decodes a fixed batch until its longest member ends.
//! Here each sequence has its own sampling, budget and stop strings; newly admitted prompts are
//! prefilled together in a cache of their own, which is then stacked onto the running batch's
//! ([`KvCache::stack`]), and a finished sequence's rows are dropped from it
//! ([`KvCache::keep_rows`]). Masks and per-sequence positions make every sequence see exactly
//! its own tokens, as it would alone: greedy replies are those of `generate`.

use candle_core::Tensor;
use rand::rngs::StdRng;

use super::decoder::{Decoder, KvCache};
use super::generate::{eos_and_pad, last_logits, prefill, FinishReason, Generation, Sampling};
use super::tokenizer::Tokenizer;
use super::ModelError;

/// The caller's name for a sequence.
pub type SequenceId = u64;

/// A sequence to admit: its name, its prompt's token ids and how to generate it.
pub type NewSequence = (SequenceId, Vec<u32>, SequenceParams);

/// How one sequence is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceParams {
    pub max_new_tokens: usize,
    /// A sequence with top-p sampling draws from its own `StdRng` seeded by its seed: the same
    /// seed gives the text a one-prompt `generate` gives, whatever else shares the batch.
    pub sampling: Sampling,
    pub stop_strings: Vec<String>,
}

/// What one decode step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub id: SequenceId,
    /// Text that is now final (empty while a token completes no character, or while the text
    /// could still turn into a stop string).
    pub delta: String,
    /// Set on the step the sequence ends; it has then left the batch.
    pub finished: Option<Generation>,
}

struct Running {
    id: SequenceId,
    params: SequenceParams,
    prompt_tokens: usize,
    ids: Vec<u32>,
    /// Logits of the next position.
    logits: Vec<f32>,
    rng: Option<StdRng>,
    /// Text handed out so far; always a prefix of the decoded text.
    sent: String,
}

/// A batch that sequences join and leave between decode steps.
pub struct Batcher<'m> {
    model: &'m Decoder,
    tokenizer: &'m Tokenizer,
    eos: Vec<u32>,
    pad: u32,
    cache: KvCache,
    rows: Vec<Running>,
}

impl<'m> Batcher<'m> {
    pub fn new(model: &'m Decoder, tokenizer: &'m Tokenizer) -> Self {
        let (eos, pad) = eos_and_pad(model, tokenizer);
        Self {
            model,
            tokenizer,
            eos,
            pad,
            cache: KvCache::new(),
            rows: Vec::new(),
        }
    }

    /// Sequences decoding now.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether a prompt of `prompt_tokens` with a budget of `max_new_tokens` fits the model.
    pub fn check(&self, prompt_tokens: usize, max_new_tokens: usize) -> Result<(), ModelError> {
        if prompt_tokens == 0 {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        let max = self.model.config.max_position_embeddings;
        if prompt_tokens + max_new_tokens > max {
            return Err(ModelError::ContextTooLong {
                tokens: prompt_tokens + max_new_tokens,
                max,
            });
        }
        Ok(())
    }

    /// Prefills `new` sequences together and adds them to the batch; their first tokens come
    /// with the next [`Self::step`]. Nothing is added when any of them is refused.
    pub fn admit(&mut self, new: Vec<NewSequence>) -> Result<(), ModelError> {
        if new.is_empty() {
            return Ok(());
        }
        for (_, prompt, params) in &new {
            self.check(prompt.len(), params.max_new_tokens)?;
        }
        let prompts: Vec<Vec<u32>> = new.iter().map(|(_, p, _)| p.clone()).collect();
        let mut cache = KvCache::new();
        let logits = prefill(self.model, &prompts, self.pad, true, &mut cache)?;
        self.cache = KvCache::stack(vec![std::mem::take(&mut self.cache), cache])?;
        for ((id, prompt, params), logits) in new.into_iter().zip(logits) {
            let rng = params.sampling.rng();
            self.rows.push(Running {
                id,
                params,
                prompt_tokens: prompt.len(),
                ids: Vec::new(),
                logits,
                rng,
                sent: String::new(),
            });
        }
        Ok(())
    }

    /// Drops a sequence (its client went away). Unknown ids are ignored.
    pub fn cancel(&mut self, id: SequenceId) -> Result<(), ModelError> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.rows[i].id != id)
            .collect();
        self.retain(&keep)
    }

    /// Keeps the sequences at the indices `keep` (ascending), in the batch and in its cache.
    fn retain(&mut self, keep: &[usize]) -> Result<(), ModelError> {
        if keep.len() == self.rows.len() {
            return Ok(());
        }
        self.cache.keep_rows(keep)?;
        let mut index = 0;
        self.rows.retain(|_| {
            index += 1;
            keep.binary_search(&(index - 1)).is_ok()
        });
        Ok(())
    }

    /// One token for every sequence: finished ones leave the batch, the others run one decode
    /// step together.
    pub fn step(&mut self) -> Result<Vec<StepOutput>, ModelError> {
        let mut outputs = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            let token = row.params.sampling.pick(&row.logits, row.rng.as_mut());
            row.ids.push(token);
            let text = self.tokenizer.decode(&row.ids, true)?;
            let stop_at = first_stop(&text, &row.params.stop_strings);
            let finish = if self.eos.contains(&token) {
                Some(FinishReason::Eos)
            } else if stop_at.is_some() {
                Some(FinishReason::StopString)
            } else if row.ids.len() >= row.params.max_new_tokens {
                Some(FinishReason::MaxNewTokens)
            } else {
                None
            };
            let (delta, finished) = match finish {
                Some(finish) => {
                    let text = match stop_at {
                        Some(cut) => text[..cut].to_owned(),
                        None => text,
                    };
                    let delta = text
                        .strip_prefix(row.sent.as_str())
                        .unwrap_or("")
                        .to_owned();
                    let generation = Generation {
                        prompt_tokens: row.prompt_tokens,
                        ids: row.ids.clone(),
                        text,
                        finish,
                    };
                    (delta, Some(generation))
                }
                None => {
                    keep.push(i);
                    let safe = safe_prefix_len(&text, &row.params.stop_strings);
                    let delta = match text[..safe].strip_prefix(row.sent.as_str()) {
                        Some(rest) => rest.to_owned(),
                        None => String::new(),
                    };
                    row.sent.push_str(&delta);
                    (delta, None)
                }
            };
            outputs.push(StepOutput {
                id: row.id,
                delta,
                finished,
            });
        }
        self.retain(&keep)?;
        if !self.rows.is_empty() {
            let b = self.rows.len();
            let device = self.model.device();
            let next: Vec<u32> = self.rows.iter().map(|r| r.ids[r.ids.len() - 1]).collect();
            let ids = Tensor::from_vec(next, (b, 1), device)?;
            let mask = Tensor::ones((b, 1), candle_core::DType::U32, device)?;
            let logits = last_logits(self.model, &ids, &mask, &mut self.cache)?;
            for (row, logits) in self.rows.iter_mut().zip(logits) {
                row.logits = logits;
            }
        }
        Ok(outputs)
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` is final: not an unfinished character at its end (the tokenizer's
/// replacement character while a multi-byte character is incomplete), and not an end that
/// could still grow into a stop string.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let whole = text.trim_end_matches('\u{FFFD}');
    let mut hold = 0;
    for stop in stops {
        for (cut, _) in stop.char_indices().skip(1) {
            if whole.ends_with(&stop[..cut]) {
                hold = hold.max(cut);
            }
        }
    }
    whole.len() - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_could_become_a_stop_string_is_held_back() {
        let stops = vec!["</answer>".to_owned()];
        assert_eq!(safe_prefix_len("Paris</an", &stops), "Paris".len());
        assert_eq!(safe_prefix_len("Paris<", &stops), "Paris".len());
        assert_eq!(safe_prefix_len("Paris is", &stops), "Paris is".len());
        assert_eq!(safe_prefix_len("caf\u{FFFD}", &[]), "caf".len());
        assert_eq!(first_stop("a</answer>b</answer>", &stops), Some(1));
        assert_eq!(first_stop("a", &[String::new()]), None);
    }
}
