//! Greedy Coordinate Gradient (Zou et al. 2023) with nanoGCG's settings and conventions.
//!
//! The conversation is the model's chat template around the request with the suffix appended to
//! it (no separator, as nanoGCG): `before ‖ suffix ‖ after ‖ target`, where `before` is the
//! template up to the end of the request, `after` the rest of the user turn and the assistant
//! header, `target` the opening the reply should have. One step:
//!
//! 1. the gradient of the target loss (mean cross-entropy of the target tokens) with respect to
//!    the suffix's one-hot token matrix: through the embedding, `∂L/∂onehot = (∂L/∂e) Eᵀ`;
//! 2. `search_width` candidates, each replacing `n_replace` random positions by tokens drawn from
//!    the `topk` most negative gradient entries there (non-ASCII and special tokens barred unless
//!    allowed); a candidate whose text does not tokenize back to its ids is dropped;
//! 3. every candidate's loss in batched forwards; the best candidate replaces the suffix when it
//!    beats the best so far (nanoGCG's buffer of one).
//!
//! Where the time goes: the template's beginning runs once per behaviour; each candidate runs
//! only from the first position it changes (it shares the cache of everything before it with the
//! current suffix), and only the target positions go through the vocabulary projection.

use super::{AttackError, Result};
use crate::model::chat::Message;
use crate::model::decoder::{Decoder, Forward, KvCache, Logits, ResidEdit};
use crate::model::generate::{argmax, generate, left_pad, log_sum_exp, GenerationConfig};
use crate::model::layers::compute_dtype;
use crate::model::load::ChatModel;
use crate::model::tokenizer::Tokenizer;
use crate::model::Resid;
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

/// Where the suffix goes in the rendered template; never part of a real request.
const PLACEHOLDER: &str = "{optim_str}";

/// The search's settings. The defaults are nanoGCG 0.3.0's, except `early_stop` (on here: a
/// behaviour whose target is reached needs no more steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcgConfig {
    pub steps: usize,
    /// Candidates per step.
    pub search_width: usize,
    /// Tokens per suffix position the candidates draw from.
    pub topk: usize,
    /// Positions each candidate changes.
    pub n_replace: usize,
    /// The suffix the search starts from.
    pub suffix_init: String,
    pub allow_non_ascii: bool,
    /// Drop candidates whose text tokenizes to other ids (what a user typing it would send).
    pub filter_ids: bool,
    /// Stop once greedy decoding of the best suffix gives exactly the target tokens.
    pub early_stop: bool,
    pub seed: u64,
    /// Candidates per forward pass.
    pub batch_size: usize,
    /// Length of the reply generated with the best suffix at the end.
    pub max_new_tokens: usize,
}

impl Default for GcgConfig {
    fn default() -> Self {
        Self {
            steps: 250,
            search_width: 512,
            topk: 256,
            n_replace: 1,
            suffix_init: ["x"; 20].join(" "),
            allow_non_ascii: false,
            filter_ids: true,
            early_stop: true,
            seed: 0,
            batch_size: 64,
            max_new_tokens: 64,
        }
    }
}

impl GcgConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(AttackError::Input(format!("GCG setting {what}")));
        if self.search_width == 0 {
            return bad("search_width must be at least 1");
        }
        if self.topk == 0 {
            return bad("topk must be at least 1");
        }
        if self.n_replace == 0 {
            return bad("n_replace must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.suffix_init.trim().is_empty() {
            return bad("suffix_init must not be empty");
        }
        Ok(())
    }
}

/// One request to attack and the reply opening the suffix should force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    pub id: String,
    pub prompt: String,
    pub target: String,
}

/// The token ids around the suffix.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The template up to the end of the request.
    pub before: Vec<u32>,
    /// The rest of the user turn and the assistant header.
    pub after: Vec<u32>,
    pub target: Vec<u32>,
}

impl Problem {
    /// Renders `prompt` with the model's template (its default system prompt) and splits it
    /// where the suffix goes; `before` and `after` are tokenized apart, as nanoGCG does.
    pub fn new(model: &ChatModel, prompt: &str, target: &str) -> Result<Self> {
        if prompt.contains(PLACEHOLDER) {
            return Err(AttackError::Input(format!(
                "the request contains {PLACEHOLDER}, which marks where the suffix goes"
            )));
        }
        let text = model
            .template
            .render(&[Message::user(format!("{prompt}{PLACEHOLDER}"))], true)
            .map_err(crate::model::ModelError::from)?;
        let (before, after) = text.split_once(PLACEHOLDER).ok_or_else(|| {
            AttackError::Input("the chat template dropped the request's text".into())
        })?;
        let tokens = |s: &str| {
            model
                .tokenizer
                .encode(s, false)
                .map_err(crate::model::ModelError::from)
        };
        let problem = Self {
            before: tokens(before)?,
            after: tokens(after)?,
            target: tokens(target)?,
        };
        if problem.target.is_empty() {
            return Err(AttackError::Input("the target string is empty".into()));
        }
        Ok(problem)
    }

    /// `suffix ‖ after ‖ target` without the target's last token: the positions whose logits
    /// predict the target tokens are the last `target.len()`.
    fn continuation(&self, suffix: &[u32]) -> Vec<u32> {
        let mut ids = suffix.to_vec();
        ids.extend_from_slice(&self.after);
        ids.extend_from_slice(&self.target[..self.target.len() - 1]);
        ids
    }
}

/// Runs `ids` (one sequence) into `cache` without gradients.
pub fn prefill(decoder: &Decoder, ids: &[u32], cache: &mut KvCache) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    crate::model::generate::prefill(decoder, &[ids.to_vec()], 0, false, cache)?;
    Ok(())
}

/// The target loss and its gradient with respect to the suffix's one-hot matrix, `(n_suffix,
/// vocab)` row-major f32, given `prefix` = the cache of `problem.before`.
pub fn token_gradients(
    decoder: &Decoder,
    prefix: &KvCache,
    suffix: &[u32],
    problem: &Problem,
) -> Result<(f64, Vec<f32>)> {
    let device = decoder.device();
    let ids = problem.continuation(suffix);
    let (t, n) = (ids.len(), suffix.len());
    let d = decoder.config.hidden_size;
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    // A zero added to the suffix's embedded rows: its gradient is the rows' gradient, and the
    // forward pass is the plain one.
    let delta = Var::zeros((1, n, d), decoder.dtype(), device)?;
    let rest = Tensor::zeros((1, t - n, d), decoder.dtype(), device)?;
    let shift = Tensor::cat(&[delta.as_tensor(), &rest], 1)?;
    let add_shift = |h: &Tensor| h + &shift;
    let mut cache = prefix.clone();
    let out = decoder.forward(
        Forward {
            logits: Logits::Tail(problem.target.len()),
            edit: Some(ResidEdit {
                at: Resid::In(0),
                edit: &add_shift,
            }),
            ..Forward::logits(&input, None)
        },
        Some(&mut cache),
    )?;
    let logits = out
        .logits
        .ok_or_else(|| AttackError::Input("the forward pass returned no logits".into()))?
        .squeeze(0)?
        .to_dtype(compute_dtype(decoder.dtype()))?;
    let log_probs = crate::train::loss::log_softmax(&logits)?;
    let target = Tensor::new(problem.target.as_slice(), device)?.unsqueeze(1)?;
    let loss = log_probs.gather(&target, 1)?.mean_all()?.neg()?;
    let grads = loss.backward()?;
    let row_grad = grads
        .get(delta.as_tensor())
        .ok_or_else(|| AttackError::Input("no gradient reached the suffix".into()))?
        .squeeze(0)?;
    let mut grad = row_grad.matmul(&decoder.embed_tokens.t()?)?;
    if let Some(scale) = decoder.embedding_scale()? {
        grad = grad.broadcast_mul(&scale)?;
    }
    let grad = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grad))
}

/// One candidate's loss and whether greedy decoding gives exactly the target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateLoss {
    pub loss: f64,
    pub exact: bool,
}

/// The target loss of each candidate suffix (same length as `current`), given `state` = the
/// cache of `problem.before ‖ current`. A candidate runs only from the first position where it
/// differs from `current`, on the cache of everything before it; candidates sorted by that
/// position fill batches of `batch_size`, each row's cache and new tokens padded on the left
/// (a row's cached and new lengths always add up to the same total).
pub fn candidate_losses(
    decoder: &Decoder,
    state: &KvCache,
    current: &[u32],
    candidates: &[Vec<u32>],
    problem: &Problem,
    batch_size: usize,
) -> Result<Vec<CandidateLoss>> {
    let before = problem.before.len();
    let n_target = problem.target.len();
    let mut order = Vec::with_capacity(candidates.len());
    for (i, candidate) in candidates.iter().enumerate() {
        if candidate.len() != current.len() {
            return Err(AttackError::Input(format!(
                "candidate of {} tokens for a suffix of {}",
                candidate.len(),
                current.len()
            )));
        }
        let first = (0..current.len())
            .find(|&p| candidate[p] != current[p])
            .unwrap_or(current.len());
        order.push((first, i));
    }
    order.sort_unstable();
    let mut prefixes: BTreeMap<usize, KvCache> = BTreeMap::new();
    let mut out = vec![
        CandidateLoss {
            loss: f64::NAN,
            exact: false,
        };
        candidates.len()
    ];
    for chunk in order.chunks(batch_size) {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < chunk.len() {
            let first = chunk[start].0;
            let end = start + chunk[start..].iter().take_while(|c| c.0 == first).count();
            let prefix = match prefixes.entry(first) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(state.prefix(before + first)?)
                }
            };
            parts.push(prefix.repeat_batch(end - start)?);
            start = end;
        }
        let mut cache = KvCache::stack(parts)?;
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&(first, i)| problem.continuation(&candidates[i][first..]))
            .collect();
        let (input, mask) = left_pad(&rows, problem.target[0], decoder.device())?;
        let logits = decoder
            .forward(
                Forward {
                    logits: Logits::Tail(n_target),
                    ..Forward::logits(&input, Some(&mask))
                },
                Some(&mut cache),
            )?
            .logits
            .ok_or_else(|| AttackError::Input("the forward pass returned no logits".into()))?
            .to_dtype(DType::F32)?;
        let vocab = logits.dim(2)?;
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        for (row, &(_, i)) in chunk.iter().enumerate() {
            let row_logits = &values[row * n_target * vocab..(row + 1) * n_target * vocab];
            out[i] = target_loss(row_logits, vocab, &problem.target);
        }
    }
    Ok(out)
}

/// Mean negative log-likelihood of `target` under `logits` (`target.len()` rows of `vocab`),
/// summed in f64.
fn target_loss(logits: &[f32], vocab: usize, target: &[u32]) -> CandidateLoss {
    let mut nll = 0.0;
    let mut exact = true;
    for (row, &want) in logits.chunks_exact(vocab).zip(target) {
        nll += log_sum_exp(row) - f64::from(row[want as usize]);
        exact &= argmax(row) == want;
    }
    CandidateLoss {
        loss: nll / target.len() as f64,
        exact,
    }
}

/// Which token ids a suffix may use: not special, inside the tokenizer's vocabulary, and (unless
/// `allow_non_ascii`) decoding to printable ASCII, as nanoGCG's `get_nonascii_toks` bars.
pub fn allowed_tokens(tokenizer: &Tokenizer, vocab: usize, allow_non_ascii: bool) -> Vec<bool> {
    (0..vocab as u32)
        .map(|id| {
            if id as usize >= tokenizer.vocab_size() || tokenizer.is_special(id) {
                return false;
            }
            allow_non_ascii
                || tokenizer.decode(&[id], false).is_ok_and(|text| {
                    !text.is_empty() && text.chars().all(|c| c.is_ascii() && !c.is_ascii_control())
                })
        })
        .collect()
}

/// `search_width` candidates from the one-hot gradient (`n` rows of `vocab`): each changes
/// `n_replace` distinct random positions to random picks among that position's `topk` allowed
/// tokens with the most negative gradient.
pub fn sample_candidates(
    grad: &[f32],
    current: &[u32],
    allowed: &[bool],
    cfg: &GcgConfig,
    rng: &mut StdRng,
) -> Vec<Vec<u32>> {
    let vocab = allowed.len();
    let top: Vec<Vec<u32>> = grad
        .chunks_exact(vocab)
        .map(|row| {
            let mut ids: Vec<u32> = (0..vocab as u32).filter(|&i| allowed[i as usize]).collect();
            let k = cfg.topk.min(ids.len());
            let order =
                |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
            if k < ids.len() {
                ids.select_nth_unstable_by(k, order);
                ids.truncate(k);
            }
            ids.sort_unstable_by(order);
            ids
        })
        .collect();
    let n_replace = cfg.n_replace.min(current.len());
    (0..cfg.search_width)
        .map(|_| {
            let mut candidate = current.to_vec();
            for p in rand::seq::index::sample(rng, current.len(), n_replace) {
                if !top[p].is_empty() {
                    candidate[p] = top[p][rng.random_range(0..top[p].len())];
                }
            }
            candidate
        })
        .collect()
}

/// Whether `ids` decode to a text that tokenizes back to the same ids.
pub fn round_trips(tokenizer: &Tokenizer, ids: &[u32]) -> bool {
    tokenizer
        .decode(ids, false)
        .and_then(|text| tokenizer.encode(&text, false))
        .is_ok_and(|back| back == ids)
}

/// Where a behaviour's search stands: saved after every step, so an interrupted run resumes
/// at the step it reached and ends as an uninterrupted one would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcgState {
    pub id: String,
    pub config: GcgConfig,
    /// Steps done.
    pub step: usize,
    pub current: Vec<u32>,
    pub best: Vec<u32>,
    pub best_loss: f64,
    pub best_step: usize,
    pub best_exact: bool,
    /// The loss of each step's chosen candidate.
    pub losses: Vec<f64>,
    /// Distinct candidates evaluated, over all steps.
    pub candidates: usize,
    /// Seconds spent in steps, over all sittings.
    pub seconds: f64,
}

/// A finished behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GcgResult {
    pub id: String,
    /// The request, without the suffix.
    pub prompt: String,
    pub target: String,
    pub suffix: String,
    pub suffix_ids: Vec<u32>,
    /// The request as attacked: `prompt` with the suffix appended.
    pub attack_prompt: String,
    pub loss: f64,
    pub best_step: usize,
    pub steps: usize,
    /// Greedy decoding after the best suffix gives exactly the target tokens.
    pub target_reached: bool,
    /// The loss of each step's chosen candidate.
    pub losses: Vec<f64>,
    pub candidates: usize,
    pub seconds: f64,
    pub steps_per_s: f64,
    /// The greedy reply to `before ‖ suffix ‖ after`, the ids the search optimised.
    pub response: String,
}

/// The step's own generator: the same seed, behaviour and step draw the same candidates,
/// whether or not the run was interrupted before it.
fn step_rng(seed: u64, id: &str, step: usize) -> StdRng {
    let digest = Sha256::digest(format!("gcg:{seed}:{id}:{step}"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    StdRng::seed_from_u64(u64::from_le_bytes(bytes))
}

/// Attacks one behaviour from `resume` (a saved state of the same behaviour and settings) or
/// from the start; `on_step` sees the state after every step (to save it, to show progress).
pub fn attack(
    model: &ChatModel,
    behaviour: &Behaviour,
    cfg: &GcgConfig,
    resume: Option<GcgState>,
    mut on_step: impl FnMut(&GcgState) -> Result<()>,
) -> Result<GcgResult> {
    cfg.check()?;
    let decoder = &model.decoder;
    let tokenizer = &model.tokenizer;
    let problem = Problem::new(model, &behaviour.prompt, &behaviour.target)?;
    let allowed = allowed_tokens(tokenizer, decoder.config.vocab_size, cfg.allow_non_ascii);
    let mut state = match resume {
        Some(state) if state.id != behaviour.id || &state.config != cfg => {
            return Err(AttackError::Input(format!(
                "the saved search of {} was made for another behaviour or other settings",
                state.id
            )))
        }
        Some(state) => state,
        None => {
            let init = tokenizer
                .encode(&cfg.suffix_init, false)
                .map_err(crate::model::ModelError::from)?;
            GcgState {
                id: behaviour.id.clone(),
                config: cfg.clone(),
                step: 0,
                current: init.clone(),
                best: init,
                best_loss: f64::INFINITY,
                best_step: 0,
                best_exact: false,
                losses: Vec::new(),
                candidates: 0,
                seconds: 0.0,
            }
        }
    };
    let mut before = KvCache::new();
    prefill(decoder, &problem.before, &mut before)?;
    while state.step < cfg.steps && !(cfg.early_stop && state.best_exact) {
        let start = Instant::now();
        let mut rng = step_rng(cfg.seed, &behaviour.id, state.step);
        let (_, grad) = token_gradients(decoder, &before, &state.current, &problem)?;
        let mut candidates = sample_candidates(&grad, &state.current, &allowed, cfg, &mut rng);
        // A candidate drawn twice has one loss: score it once (the first stays first, so the
        // choice below is the one scoring every copy would make).
        let mut seen = HashSet::new();
        candidates.retain(|c| seen.insert(c.clone()));
        if cfg.filter_ids {
            candidates.retain(|c| round_trips(tokenizer, c));
        }
        if candidates.is_empty() {
            return Err(AttackError::Input(format!(
                "{}: no candidate suffix at step {} tokenizes back to itself; try --no-filter-ids",
                behaviour.id, state.step
            )));
        }
        let mut current = before.clone();
        prefill(decoder, &state.current, &mut current)?;
        let losses = candidate_losses(
            decoder,
            &current,
            &state.current,
            &candidates,
            &problem,
            cfg.batch_size,
        )?;
        let (chosen, picked) = losses
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.loss.total_cmp(&b.1.loss))
            .map(|(i, l)| (i, *l))
            .ok_or_else(|| AttackError::Input("no candidate was scored".into()))?;
        if !picked.loss.is_finite() {
            return Err(AttackError::Input(format!(
                "{}: the target loss is {} at step {}",
                behaviour.id, picked.loss, state.step
            )));
        }
        state.losses.push(picked.loss);
        state.candidates += candidates.len();
        if picked.loss < state.best_loss {
            state.best = candidates[chosen].clone();
            state.best_loss = picked.loss;
            state.best_step = state.step;
            state.best_exact = picked.exact;
        }
        state.current = state.best.clone();
        state.step += 1;
        state.seconds += start.elapsed().as_secs_f64();
        on_step(&state)?;
    }
    finish(model, behaviour, &problem, state)
}

/// The result of a finished search: the best suffix's text and greedy reply.
fn finish(
    model: &ChatModel,
    behaviour: &Behaviour,
    problem: &Problem,
    state: GcgState,
) -> Result<GcgResult> {
    let suffix = model
        .tokenizer
        .decode(&state.best, false)
        .map_err(crate::model::ModelError::from)?;
    let mut ids = problem.before.clone();
    ids.extend_from_slice(&state.best);
    ids.extend_from_slice(&problem.after);
    let reply = generate(
        &model.decoder,
        &model.tokenizer,
        &[ids],
        &GenerationConfig {
            max_new_tokens: state.config.max_new_tokens,
            ..GenerationConfig::default()
        },
        |_, _| {},
    )?;
    let response = reply.into_iter().next().map(|g| g.text).unwrap_or_default();
    let steps = state.losses.len();
    Ok(GcgResult {
        id: behaviour.id.clone(),
        prompt: behaviour.prompt.clone(),
        target: behaviour.target.clone(),
        attack_prompt: format!("{}{suffix}", behaviour.prompt),
        suffix,
        suffix_ids: state.best,
        loss: state.best_loss,
        best_step: state.best_step,
        steps,
        target_reached: state.best_exact,
        losses: state.losses,
        candidates: state.candidates,
        seconds: state.seconds,
        steps_per_s: if state.seconds > 0.0 {
            steps as f64 / state.seconds
        } else {
            0.0
        },
        response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_loss_is_the_mean_nll_and_exact_follows_the_argmax() {
        // Two positions over a vocabulary of 3.
        let logits = [0.5f32, 2.0, -1.0, 1.5, 0.0, 3.0];
        let nll = |row: &[f32], i: usize| {
            let z: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
            z.ln() - f64::from(row[i])
        };
        let got = target_loss(&logits, 3, &[1, 2]);
        let want = (nll(&logits[..3], 1) + nll(&logits[3..], 2)) / 2.0;
        assert!((got.loss - want).abs() < 1e-12, "{} vs {want}", got.loss);
        assert!(got.exact);
        assert!(!target_loss(&logits, 3, &[0, 2]).exact);
    }

    #[test]
    fn candidates_change_n_replace_positions_to_top_k_allowed_tokens() {
        let vocab = 10;
        // Position 0 prefers tokens 9, 8, 7 (most negative first); position 1 prefers 0, 1, 2.
        let mut grad = vec![0f32; 2 * vocab];
        for v in 0..vocab {
            grad[v] = -(v as f32);
            grad[vocab + v] = v as f32;
        }
        let mut allowed = vec![true; vocab];
        allowed[9] = false; // barred: never drawn although its gradient is the best
        let cfg = GcgConfig {
            topk: 2,
            search_width: 200,
            n_replace: 1,
            ..GcgConfig::default()
        };
        let current = [5u32, 5];
        let mut rng = StdRng::seed_from_u64(3);
        let cands = sample_candidates(&grad, &current, &allowed, &cfg, &mut rng);
        assert_eq!(cands.len(), 200);
        let mut seen = std::collections::BTreeSet::new();
        for c in &cands {
            let changed: Vec<usize> = (0..2).filter(|&p| c[p] != current[p]).collect();
            assert_eq!(changed.len(), 1, "{c:?}");
            let p = changed[0];
            let want: &[u32] = if p == 0 { &[8, 7] } else { &[0, 1] };
            assert!(want.contains(&c[p]), "{c:?}");
            seen.insert((p, c[p]));
        }
        assert_eq!(seen.len(), 4, "every top-k choice is drawn: {seen:?}");
        // The same generator state draws the same candidates.
        let again = sample_candidates(
            &grad,
            &current,
            &allowed,
            &cfg,
            &mut StdRng::seed_from_u64(3),
        );
        assert_eq!(again, cands);
    }

    #[test]
    fn a_bad_setting_is_refused_before_any_work() {
        let cfg = GcgConfig {
            search_width: 0,
            ..GcgConfig::default()
        };
        assert!(cfg
            .check()
            .unwrap_err()
            .to_string()
            .contains("search_width"));
    }
}
