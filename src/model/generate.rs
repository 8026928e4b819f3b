//! Text generation with a KV cache: left-padded batches of different lengths, greedy or seeded
//! temperature / top-p sampling, stopping at EOS, stop strings or a token budget.

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::decoder::{Decoder, Forward, KvCache, Logits};
use super::tokenizer::Tokenizer;
use super::ModelError;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampling {
    Greedy,
    /// Softmax at `temperature`, keep the smallest set of tokens whose mass reaches `top_p`,
    /// draw from it with a `StdRng` seeded by `seed` (the same seed gives the same text).
    TopP {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

impl Sampling {
    /// The generator a sampled sequence draws from (none for greedy decoding).
    pub(crate) fn rng(&self) -> Option<StdRng> {
        match self {
            Sampling::TopP { seed, .. } => Some(StdRng::seed_from_u64(*seed)),
            Sampling::Greedy => None,
        }
    }

    /// The next token from one position's logits.
    pub(crate) fn pick(&self, logits: &[f32], rng: Option<&mut StdRng>) -> u32 {
        match (self, rng) {
            (
                Sampling::TopP {
                    temperature, top_p, ..
                },
                Some(rng),
            ) => sample_top_p(logits, *temperature, *top_p, rng),
            _ => argmax(logits),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a sequence ends when its decoded text contains one of these; the text is
    /// cut before it.
    pub stop_strings: Vec<String>,
    /// Keep going past EOS to exactly `max_new_tokens` (for benchmarks with a fixed length).
    pub ignore_eos: bool,
    /// Run the beginning all prompts of a batch share once (see [`prefill`]); the same tokens
    /// either way, off only to measure what it saves.
    #[serde(default = "yes")]
    pub share_prefix: bool,
}

fn yes() -> bool {
    true
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            stop_strings: Vec::new(),
            ignore_eos: false,
            share_prefix: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    MaxNewTokens,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// New token ids, the EOS token included when it was produced.
    pub ids: Vec<u32>,
    /// Decoded text, special tokens skipped, cut at a stop string.
    pub text: String,
    pub finish: FinishReason,
}

/// Generates continuations of `prompts` (token ids) in one batch. `on_token(row, id)` is called
/// for every new token, e.g. to stream text.
pub fn generate(
    model: &Decoder,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_token: impl FnMut(usize, u32) + Send,
) -> Result<Vec<Generation>, ModelError> {
    generate_with_prompt_logits(model, tokenizer, prompts, cfg, |_, _| {}, on_token)
}

/// [`generate`], also handing each row's logits at the first response position (what a
/// generation-free refusal score reads) to `on_prompt_logits(row, logits)`, from the same prefill.
pub fn generate_with_prompt_logits(
    model: &Decoder,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_prompt_logits: impl FnMut(usize, &[f32]) + Send,
    on_token: impl FnMut(usize, u32) + Send,
) -> Result<Vec<Generation>, ModelError> {
    // On a rayon worker, the many small parallel loops of a decode step fork inside the pool
    // instead of handing each one over from outside and sleeping until it is done.
    rayon::scope(|_| generate_in_pool(model, tokenizer, prompts, cfg, on_prompt_logits, on_token))
}

/// Shortest shared beginning worth computing once for a whole batch.
pub(crate) const MIN_SHARED_PREFIX: usize = 4;

/// Length of the beginning all `prompts` share, leaving every prompt at least one token of its
/// own (whose logits start its generation).
pub(crate) fn shared_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    let mut len = first.len().saturating_sub(1);
    for p in rest {
        let common = first.iter().zip(p).take_while(|(a, b)| a == b).count();
        len = len.min(common).min(p.len().saturating_sub(1));
    }
    len
}

/// The prefill: logits at each prompt's last position, the cache filled with every prompt
/// token. Prompts that begin alike (a chat template's system turn) run that beginning once as a
/// single sequence whose cache is then copied to every row; the rest is left-padded after it.
/// Pads in the middle of a row's cache are masked like pads at its start, and positions count
/// real tokens only, so every row sees what it would see alone.
pub(crate) fn prefill(
    model: &Decoder,
    prompts: &[Vec<u32>],
    pad: u32,
    share_prefix: bool,
    cache: &mut KvCache,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let device = model.device();
    let shared = shared_prefix_len(prompts);
    if !share_prefix || prompts.len() < 2 || shared < MIN_SHARED_PREFIX {
        let (ids, mask) = left_pad(prompts, pad, device)?;
        return last_logits(model, &ids, &mask, cache);
    }
    let mut one = KvCache::new();
    let prefix = Tensor::from_slice(&prompts[0][..shared], (1, shared), device)?;
    let all_real = Tensor::ones((1, shared), DType::U32, device)?;
    last_logits(model, &prefix, &all_real, &mut one)?;
    *cache = one.repeat_batch(prompts.len())?;
    let rest: Vec<Vec<u32>> = prompts.iter().map(|p| p[shared..].to_vec()).collect();
    let (ids, mask) = left_pad(&rest, pad, device)?;
    last_logits(model, &ids, &mask, cache)
}

fn generate_in_pool(
    model: &Decoder,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    mut on_prompt_logits: impl FnMut(usize, &[f32]),
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>, ModelError> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Input(format!("prompt {i} has no tokens")));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = model.config.max_position_embeddings;
    if longest + cfg.max_new_tokens > limit {
        return Err(ModelError::ContextTooLong {
            tokens: longest + cfg.max_new_tokens,
            max: limit,
        });
    }
    let (eos, pad) = eos_and_pad(model, tokenizer);
    let b = prompts.len();
    let device = model.device();

    let mut cache = KvCache::new();
    let mut logits = prefill(model, prompts, pad, cfg.share_prefix, &mut cache)?;
    for (row, row_logits) in logits.iter().enumerate() {
        on_prompt_logits(row, row_logits);
    }

    let mut rng = cfg.sampling.rng();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_tokens: p.len(),
            ids: Vec::new(),
            text: String::new(),
            finish: FinishReason::MaxNewTokens,
        })
        .collect();
    let mut done = vec![false; b];
    // The cache's rows: which prompt each one decodes (finished ones leave, below).
    let mut rows: Vec<usize> = (0..b).collect();
    for _ in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(rows.len());
        for (&row, row_logits) in rows.iter().zip(&logits) {
            if done[row] {
                next.push(pad);
                continue;
            }
            let token = cfg.sampling.pick(row_logits, rng.as_mut());
            next.push(token);
            on_token(row, token);
            let g = &mut out[row];
            g.ids.push(token);
            if eos.contains(&token) && !cfg.ignore_eos {
                g.finish = FinishReason::Eos;
                done[row] = true;
            } else if !cfg.stop_strings.is_empty() {
                let text = tokenizer.decode(&g.ids, true)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    g.finish = FinishReason::StopString;
                    done[row] = true;
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // Finished sequences leave the batch once they are a quarter of it: every later step
        // is then that much cheaper, for one copy of the cache. The others' numbers do not
        // change (a sequence's attention skips masked positions, its products are its own).
        let finished = rows.iter().filter(|&&r| done[r]).count();
        if finished > 0 && 4 * finished >= rows.len() {
            let keep: Vec<usize> = (0..rows.len()).filter(|&i| !done[rows[i]]).collect();
            cache.keep_rows(&keep)?;
            next = keep.iter().map(|&i| next[i]).collect();
            rows = keep.iter().map(|&i| rows[i]).collect();
        }
        let step_mask: Vec<u32> = rows.iter().map(|&r| u32::from(!done[r])).collect();
        let ids = Tensor::from_vec(next, (rows.len(), 1), device)?;
        let mask = Tensor::from_vec(step_mask, (rows.len(), 1), device)?;
        logits = last_logits(model, &ids, &mask, &mut cache)?;
    }
    for g in &mut out {
        let mut text = tokenizer.decode(&g.ids, true)?;
        if let Some(cut) = cfg
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        g.text = text;
    }
    Ok(out)
}

/// The tokens that end a response (the tokenizer's, else the model config's) and the padding
/// token (the tokenizer's, else the first end token).
pub(crate) fn eos_and_pad(model: &Decoder, tokenizer: &Tokenizer) -> (Vec<u32>, u32) {
    let eos: Vec<u32> = if tokenizer.eos_ids().is_empty() {
        model.config.eos_token_ids.clone()
    } else {
        tokenizer.eos_ids().to_vec()
    };
    let pad = tokenizer.pad_id().or(eos.first().copied()).unwrap_or(0);
    (eos, pad)
}

/// Left-pads sequences to one length so each one's last token sits in the last column:
/// `(ids, attention_mask)`, both `(b, t)` u32, the mask 0 on pads.
pub fn left_pad(
    seqs: &[Vec<u32>],
    pad: u32,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        let pads = t - s.len();
        ids.extend(std::iter::repeat_n(pad, pads).chain(s.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, pads).chain(std::iter::repeat_n(1u32, s.len())));
    }
    Ok((
        Tensor::from_vec(ids, (seqs.len(), t), device)?,
        Tensor::from_vec(mask, (seqs.len(), t), device)?,
    ))
}

/// Last-position logits of each sequence, as f32 rows.
pub(crate) fn last_logits(
    model: &Decoder,
    ids: &Tensor,
    mask: &Tensor,
    cache: &mut KvCache,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let req = Forward {
        input_ids: ids,
        attention_mask: Some(mask),
        logits: Logits::Last,
        capture: &[],
        edit: None,
    };
    let logits = model
        .forward(req, Some(cache))?
        .logits
        .ok_or_else(|| ModelError::Input("no logits".into()))?;
    Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// `ln Σ exp(logits)`, summed in f64 from the row's maximum (no overflow).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    logits
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

/// Index of the largest logit; the first one on ties, as PyTorch's argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for (id, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *id;
        }
    }
    probs.last().map_or(0, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_leaves_every_prompt_a_token_of_its_own() {
        assert_eq!(
            shared_prefix_len(&[vec![1, 2, 3, 4], vec![1, 2, 3, 5, 6]]),
            3
        );
        assert_eq!(shared_prefix_len(&[vec![1, 2, 3], vec![1, 2, 3, 4]]), 2);
        assert_eq!(shared_prefix_len(&[vec![1, 2, 3], vec![1, 2, 3]]), 2);
        assert_eq!(shared_prefix_len(&[vec![7, 2], vec![1, 2]]), 0);
        assert_eq!(shared_prefix_len(&[vec![1, 2, 3]]), 2);
        assert_eq!(shared_prefix_len(&[]), 0);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, -1.0]), 1);
    }

    #[test]
    fn top_p_sampling_is_seeded_and_stays_in_the_nucleus() {
        // Probabilities ∝ exp(l): 0.64, 0.24, 0.09, 0.03 → top_p 0.8 keeps ids 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0, -1.2];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| sample_top_p(&logits, 1.0, 0.8, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        assert!(a.iter().all(|&t| t <= 1));
        assert!(a.contains(&0) && a.contains(&1));
    }
}
