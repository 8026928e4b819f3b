//! dpo — the preference term beside SFT: Direct Preference Optimization (Rafailov et al. 2023,
//! arXiv 2305.18290) on (prompt, chosen, rejected) pairs, the reference being the same model with
//! its adapter switched off.
//!
//! For pair i, with log π(y) the summed log-probability of a response's targets (its tokens and
//! the end-of-turn token, exactly the tokens the SFT loss scores) and π_ref the reference:
//!
//! ```text
//! m_i = β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]     the margin
//! ℓ_i = −log σ(m_i) = softplus(−m_i)
//! ```
//!
//! A step's objective is its SFT mean NLL plus `w · mean_i ℓ_i` over the step's pairs (`w` =
//! `dpo_weight`). Since dℓ_i/d log π(c) = −β σ(−m_i) = −dℓ_i/d log π(r), and the gradient of
//! log π(y) in the logits of one of y's targets is `onehot − softmax`, every target of a chosen
//! row gets the logit gradient `k·(softmax − onehot)` with `k = β σ(−m_i)·w/n_pairs`, and every
//! target of its rejected row the same with `−k`: the SFT gradient with a per-row coefficient.
//! The hand-written step ([`super::fast::dpo_loss_and_grads`]) applies it after one forward that
//! gives both rows' log-probs; the autodiff path ([`autodiff_dpo_loss_and_grads`]) writes the
//! loss in candle ops.
//!
//! The reference log-probs are computed once before training, forward only, one pair per batch
//! (so a value does not depend on which pairs later share a batch), and stored in the run folder
//! (`dpo_reference.json`, keyed by pair id, with a sha256 of the tokenized pairs so a resumed run
//! on changed data is refused).
//!
//! **Batching.** Each optimizer step draws `dpo_pairs_per_step` pairs (default `batch_size`)
//! through a [`BatchPlan`] over the pairs, seeded from the run's seed: every pair once per epoch,
//! similar lengths together, a pure function of `(seed, step)`, so a resumed run draws the same
//! pairs. A step's pairs run in micro-batches of `max(1, batch_size / 2)` pairs, chosen and
//! rejected of a pair side by side (rows `2i` and `2i + 1`), so a pair micro-batch holds about as
//! many sequences as an SFT one.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{Batch, BatchPlan, Target, TokenizedExample};
use super::{fast, response_token_loss, GradSum, Result, TrainConfig, TrainError};
use crate::model::decoder::Decoder;

/// A preference pair, tokenized: `chosen` is preferred to `rejected` (same prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    /// The pair's id in the data folder (its example's id); keys the reference log-probs.
    pub id: String,
    pub chosen: TokenizedExample,
    pub rejected: TokenizedExample,
}

impl TokenizedPair {
    /// Tokens of the longer side (the pair's padded width in a batch).
    fn len(&self) -> usize {
        self.chosen.ids.len().max(self.rejected.ids.len())
    }
}

/// A micro-batch of pairs: rows `2i` (chosen) and `2i + 1` (rejected) of `batch` are pair i.
#[derive(Debug, Clone)]
pub struct PairBatch {
    pub batch: Batch,
    /// Per pair: the reference's log-probs of (chosen, rejected).
    pub reference: Vec<[f64; 2]>,
}

impl PairBatch {
    /// Left-pads the pairs' sequences into one batch, chosen before rejected.
    pub fn new(
        pairs: &[&TokenizedPair],
        reference: Vec<[f64; 2]>,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if reference.len() != pairs.len() {
            return Err(TrainError::Internal(format!(
                "{} reference values for {} pairs",
                reference.len(),
                pairs.len()
            )));
        }
        let rows: Vec<&TokenizedExample> = pairs
            .iter()
            .flat_map(|p| [&p.chosen, &p.rejected])
            .collect();
        Ok(Self {
            batch: Batch::left_padded(&rows, pad_id, device)?,
            reference,
        })
    }

    pub(super) fn pairs(&self) -> usize {
        self.reference.len()
    }
}

/// One pair's term: its margin, its loss and `β σ(−m)`, the size of its log-prob gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairOutcome {
    pub margin: f64,
    /// −log σ(margin).
    pub loss: f64,
    /// β·σ(−margin) = −dℓ/d log π(chosen) = dℓ/d log π(rejected).
    pub pull: f64,
}

/// The pair's term from the policy's and the reference's log-probs of (chosen, rejected).
pub fn pair_outcome(beta: f64, policy: [f64; 2], reference: [f64; 2]) -> PairOutcome {
    let margin = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]));
    PairOutcome {
        margin,
        // softplus(−m) = max(−m, 0) + ln(1 + e^(−|m|)): no overflow for either sign.
        loss: (-margin).max(0.0) + (-margin.abs()).exp().ln_1p(),
        pull: beta / (1.0 + margin.exp()),
    }
}

/// Sums over a set of pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpoStats {
    pub pairs: usize,
    pub loss_sum: f64,
    pub margin_sum: f64,
    /// Pairs with a positive margin (the policy prefers chosen more than the reference does).
    pub preferred: usize,
}

impl DpoStats {
    fn add(&mut self, o: &PairOutcome) {
        self.pairs += 1;
        self.loss_sum += o.loss;
        self.margin_sum += o.margin;
        self.preferred += usize::from(o.margin > 0.0);
    }

    /// Mean −log σ(margin).
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.pairs as f64
    }

    pub fn margin(&self) -> f64 {
        self.margin_sum / self.pairs as f64
    }

    /// Share of pairs with a positive margin.
    pub fn accuracy(&self) -> f64 {
        self.preferred as f64 / self.pairs as f64
    }
}

/// Σ log p over each of `rows` rows' targets: minus the sum of their NLL.
pub fn row_logps(targets: &[Target], token_nll: &[f64], rows: usize) -> Vec<f64> {
    let mut sums = vec![0f64; rows];
    for (x, nll) in targets.iter().zip(token_nll) {
        sums[x.row] -= nll;
    }
    sums
}

/// The outcome of every pair of `batch` from its rows' log-probs, in pair order.
fn outcomes(beta: f64, batch: &PairBatch, logps: &[f64]) -> Result<Vec<PairOutcome>> {
    if logps.len() != 2 * batch.pairs() {
        return Err(TrainError::Internal(format!(
            "{} row log-probs for {} pairs",
            logps.len(),
            batch.pairs()
        )));
    }
    Ok(batch
        .reference
        .iter()
        .zip(logps.chunks_exact(2))
        .map(|(r, l)| pair_outcome(beta, [l[0], l[1]], *r))
        .collect())
}

/// Each row's summed target log-prob of `batch`, forward only (the hand-written kernels where
/// they apply, else candle's forward).
pub fn sequence_logps(decoder: &Decoder, batch: &Batch) -> Result<Vec<f64>> {
    let nll = if fast::forward_applies(decoder) {
        fast::token_nll(decoder, batch)?
    } else {
        response_token_loss(decoder, batch)?
            .token_nll
            .detach()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
    };
    Ok(row_logps(&batch.targets, &nll, batch.input_ids.dim(0)?))
}

/// The log-probs of every pair's (chosen, rejected) under `reference` (the model with its
/// adapter off), one pair per batch.
pub fn reference_logps(
    reference: &Decoder,
    pairs: &[TokenizedPair],
    pad_id: u32,
) -> Result<Vec<[f64; 2]>> {
    pairs
        .iter()
        .map(|p| {
            let batch = Batch::left_padded(&[&p.chosen, &p.rejected], pad_id, reference.device())?;
            let l = sequence_logps(reference, &batch)?;
            Ok([l[0], l[1]])
        })
        .collect()
}

/// The gradients of `weight · mean ℓ_i` over the pairs of `batches`, for every `Var` in `params`
/// order, and the pairs' sums. LoRA factors of Llama-style models take the hand-written step,
/// everything else candle's autodiff (as [`super::loss_and_grads`]).
pub fn dpo_loss_and_grads(
    decoder: &Decoder,
    params: &[(&String, &Var)],
    batches: &[PairBatch],
    beta: f64,
    weight: f64,
) -> Result<(DpoStats, Vec<Tensor>)> {
    if fast::applies(decoder, params) {
        fast::dpo_loss_and_grads(decoder, params, batches, beta, weight)
    } else {
        autodiff_dpo_loss_and_grads(decoder, params, batches, beta, weight)
    }
}

/// The per-target coefficients of the hand-written step: `+k` on a chosen row's targets, `−k` on
/// its rejected row's, `k = pull · unit` (`unit` = w / the step's pair count); each pair's
/// outcome is added to `stats`.
pub(super) fn target_coefficients(
    beta: f64,
    unit: f64,
    batch: &PairBatch,
    token_nll: &[f64],
    stats: &mut DpoStats,
) -> Result<Vec<f32>> {
    let rows = 2 * batch.pairs();
    let logps = row_logps(&batch.batch.targets, token_nll, rows);
    let mut row_k = vec![0f32; rows];
    for (i, o) in outcomes(beta, batch, &logps)?.iter().enumerate() {
        stats.add(o);
        row_k[2 * i] = (o.pull * unit) as f32;
        row_k[2 * i + 1] = -(o.pull * unit) as f32;
    }
    Ok(batch.batch.targets.iter().map(|x| row_k[x.row]).collect())
}

/// [`dpo_loss_and_grads`] through candle's autodiff: row log-probs as a product of a row
/// membership matrix with the targets' NLL, the margin and softplus in candle ops.
pub fn autodiff_dpo_loss_and_grads(
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
    let mut grads = GradSum::new(params);
    let mut stats = DpoStats::default();
    for pb in batches {
        let out = response_token_loss(decoder, &pb.batch)?;
        let (rows, n, p) = (2 * pb.pairs(), out.n_targets, pb.pairs());
        let device = out.token_nll.device();
        let member: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let targets = &pb.batch.targets;
                targets.iter().map(move |x| f32::from(u8::from(x.row == r)))
            })
            .collect();
        let logps = Tensor::from_vec(member, (rows, n), device)?
            .matmul(&out.token_nll.unsqueeze(1)?)?
            .neg()?
            .reshape((p, 2))?; // (pairs, [chosen, rejected])
        let reference: Vec<f32> = pb.reference.iter().flatten().map(|&x| x as f32).collect();
        let ratio = (&logps - Tensor::from_vec(reference, (p, 2), device)?)?;
        let margin = ((ratio.narrow(1, 0, 1)? - ratio.narrow(1, 1, 1)?)? * beta)?; // (pairs, 1)
                                                                                   // softplus(−m) = relu(−m) + ln(1 + e^(−|m|)), as pair_outcome.
        let loss = (margin.neg()?.relu()? + (margin.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let store = (loss.sum_all()? * (weight / n_pairs as f64))?.backward()?;
        grads.add(&store)?;
        let values: Vec<f64> = logps
            .detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        for o in outcomes(beta, pb, &values)? {
            stats.add(&o);
        }
    }
    Ok((stats, grads.finish()?))
}

/// sha256 over the tokenized pairs of both parts (ids, token ids, target spans): what the
/// reference log-probs were computed from.
pub fn pairs_sha256(train: &[TokenizedPair], heldout: &[TokenizedPair]) -> String {
    let mut h = Sha256::new();
    for (part, pairs) in [("train", train), ("heldout", heldout)] {
        h.update(format!("{part}:{}\n", pairs.len()));
        for p in pairs {
            h.update(format!("{}\n", p.id));
            for e in [&p.chosen, &p.rejected] {
                h.update(format!("{}..{}:", e.target_start, e.target_end));
                for id in &e.ids {
                    h.update(id.to_le_bytes());
                }
            }
        }
    }
    hex::encode(h.finalize())
}

pub const REFERENCE_FILE: &str = "dpo_reference.json";

/// `dpo_reference.json`: the reference log-probs `[chosen, rejected]` of each pair, by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceFile {
    pub format_version: u32,
    /// [`pairs_sha256`] of the pairs these were computed from.
    pub data_sha256: String,
    pub train: BTreeMap<String, [f64; 2]>,
    pub heldout: BTreeMap<String, [f64; 2]>,
}

impl ReferenceFile {
    fn read(path: &Path) -> Result<Self> {
        let io = |message: String| TrainError::Io {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| io(e.to_string()))
    }

    /// The values of `pairs` in their order.
    fn lookup(
        map: &BTreeMap<String, [f64; 2]>,
        pairs: &[TokenizedPair],
        path: &Path,
    ) -> Result<Vec<[f64; 2]>> {
        pairs
            .iter()
            .map(|p| {
                map.get(&p.id).copied().ok_or_else(|| TrainError::Io {
                    path: path.to_path_buf(),
                    message: format!("no reference log-probs for pair {:?}", p.id),
                })
            })
            .collect()
    }
}

/// The DPO side of a run: the reference log-probs of both parts and the pair draw.
pub(super) struct DpoRun {
    train_reference: Vec<[f64; 2]>,
    heldout_reference: Vec<[f64; 2]>,
    plan: BatchPlan,
    pairs_per_micro_batch: usize,
}

impl DpoRun {
    /// Reads the reference log-probs from `out_dir` when they were computed for these pairs,
    /// else computes and writes them. A resumed run whose pairs changed is refused. The values
    /// used are always those read back from the file, so a resumed run uses exactly the numbers
    /// an uninterrupted one did.
    pub(super) fn prepare(
        cfg: &TrainConfig,
        decoder: &Decoder,
        train: &[TokenizedPair],
        heldout: &[TokenizedPair],
        pad_id: u32,
        out_dir: &Path,
        resumed: bool,
    ) -> Result<Self> {
        let path = out_dir.join(REFERENCE_FILE);
        let sha = pairs_sha256(train, heldout);
        let saved = if path.exists() {
            Some(ReferenceFile::read(&path)?)
        } else {
            None
        };
        match saved {
            Some(f) if resumed && f.data_sha256 != sha => {
                return Err(TrainError::DpoDataChanged {
                    path,
                    saved: f.data_sha256,
                    now: sha,
                })
            }
            Some(_) if resumed => tracing::info!(path = %path.display(), "DPO reference read"),
            _ => write_reference(decoder, train, heldout, pad_id, &path, sha)?,
        }
        let file = ReferenceFile::read(&path)?;
        Ok(Self {
            train_reference: ReferenceFile::lookup(&file.train, train, &path)?,
            heldout_reference: ReferenceFile::lookup(&file.heldout, heldout, &path)?,
            plan: BatchPlan::new(
                train.iter().map(TokenizedPair::len).collect(),
                cfg.dpo_pairs(),
                cfg.seed ^ DPO_SEED_SALT,
            ),
            pairs_per_micro_batch: (cfg.batch_size / 2).max(1),
        })
    }

    /// The pair micro-batches of optimizer step `step` (0-based).
    pub(super) fn step_batches(
        &mut self,
        step: usize,
        pairs: &[TokenizedPair],
        pad_id: u32,
        device: &Device,
    ) -> Result<Vec<PairBatch>> {
        let picked = self.plan.micro_batch(step);
        picked
            .chunks(self.pairs_per_micro_batch)
            .map(|chunk| {
                let group: Vec<&TokenizedPair> = chunk.iter().map(|&i| &pairs[i]).collect();
                let reference = chunk.iter().map(|&i| self.train_reference[i]).collect();
                PairBatch::new(&group, reference, pad_id, device)
            })
            .collect()
    }

    /// The DPO sums of the held-out pairs under `decoder` (forward only), shortest first.
    pub(super) fn heldout_stats(
        &self,
        decoder: &Decoder,
        pairs: &[TokenizedPair],
        beta: f64,
        pad_id: u32,
    ) -> Result<DpoStats> {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| pairs[i].len());
        let mut stats = DpoStats::default();
        for chunk in order.chunks(self.pairs_per_micro_batch) {
            let group: Vec<&TokenizedPair> = chunk.iter().map(|&i| &pairs[i]).collect();
            let reference = chunk.iter().map(|&i| self.heldout_reference[i]).collect();
            let pb = PairBatch::new(&group, reference, pad_id, decoder.device())?;
            let logps = sequence_logps(decoder, &pb.batch)?;
            for o in outcomes(beta, &pb, &logps)? {
                stats.add(&o);
            }
        }
        Ok(stats)
    }
}

/// Mixed into the run's seed for the pair draw, so pairs and SFT batches are drawn apart.
const DPO_SEED_SALT: u64 = 0xD90_D90_D90;

/// Computes the reference log-probs of both parts with the adapter switched off and writes them.
fn write_reference(
    decoder: &Decoder,
    train: &[TokenizedPair],
    heldout: &[TokenizedPair],
    pad_id: u32,
    path: &Path,
    data_sha256: String,
) -> Result<()> {
    let base = super::without_adapter(decoder);
    tracing::info!(
        pairs = train.len() + heldout.len(),
        "computing the DPO reference log-probs"
    );
    let by_id = |pairs: &[TokenizedPair]| -> Result<BTreeMap<String, [f64; 2]>> {
        let values = reference_logps(&base, pairs, pad_id)?;
        Ok(pairs.iter().map(|p| p.id.clone()).zip(values).collect())
    };
    let file = ReferenceFile {
        format_version: 1,
        data_sha256,
        train: by_id(train)?,
        heldout: by_id(heldout)?,
    };
    let text =
        serde_json::to_string_pretty(&file).map_err(|e| TrainError::Internal(e.to_string()))?;
    crate::model::write_atomic(path, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_outcome_is_stable_and_its_pull_is_the_loss_derivative() {
        // m = 0: ℓ = ln 2, pull = β/2.
        let o = pair_outcome(0.1, [-3.0, -5.0], [-3.0, -5.0]);
        assert_eq!(o.margin, 0.0);
        assert!((o.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert!((o.pull - 0.05).abs() < 1e-15);
        // m = 0.1·((−2 − −3) − (−6 − −5)) = 0.2.
        let o = pair_outcome(0.1, [-2.0, -6.0], [-3.0, -5.0]);
        assert!((o.margin - 0.2).abs() < 1e-12);
        assert!((o.loss - (1.0 + (-0.2f64).exp()).ln()).abs() < 1e-12);
        // dℓ/d log π(c) by central differences = −pull.
        let h = 1e-6;
        let up = pair_outcome(0.1, [-2.0 + h, -6.0], [-3.0, -5.0]).loss;
        let down = pair_outcome(0.1, [-2.0 - h, -6.0], [-3.0, -5.0]).loss;
        assert!(((up - down) / (2.0 * h) + o.pull).abs() < 1e-8);
        // Far margins neither overflow nor lose the loss: ℓ(−1000) ≈ 1000, ℓ(1000) ≈ 0.
        let bad = pair_outcome(1.0, [-1000.0, 0.0], [0.0, 0.0]);
        assert!((bad.loss - 1000.0).abs() < 1e-9 && (bad.pull - 1.0).abs() < 1e-12);
        let good = pair_outcome(1.0, [0.0, -1000.0], [0.0, 0.0]);
        assert!(good.loss >= 0.0 && good.loss < 1e-300 && good.pull == 0.0);
    }

    #[test]
    fn stats_average_over_pairs_and_count_positive_margins() {
        let mut s = DpoStats::default();
        for m in [0.5, -0.25, 0.0, 1.0] {
            s.add(&pair_outcome(1.0, [m, 0.0], [0.0, 0.0]));
        }
        assert_eq!((s.pairs, s.preferred), (4, 2));
        assert!((s.margin() - 0.3125).abs() < 1e-15);
        assert_eq!(s.accuracy(), 0.5);
    }
}
