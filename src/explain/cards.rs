//! Feature cards: what a selected feature responds to (its top-activating prompts, token by
//! token) and what it says to the output (the logit lens of its decoder direction).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{sae_for, ExplainConfig, ExplainError, Result};
use crate::features::{
    for_each_content_batch, prompt_tokens, FeatureScore, PromptTokens, Selection,
};
use crate::model::load::ChatModel;
use crate::model::Resid;
use crate::sae::Sae;

/// One prompt on which a feature fires strongly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Position of the prompt in the corpus.
    pub prompt_index: usize,
    pub prompt: String,
    /// Largest activation over the prompt's content tokens.
    pub max_activation: f32,
    /// The prompt's own tokens (no template), each decoded on its own.
    pub tokens: Vec<String>,
    /// The feature's activation on each of those tokens.
    pub activations: Vec<f32>,
}

/// One vocabulary entry of a logit lens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LensToken {
    pub id: u32,
    pub token: String,
    /// `E[id] · (w_norm ⊙ d)`.
    pub logit: f64,
}

/// What one selected feature is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureCard {
    pub hook: Resid,
    pub hook_name: String,
    /// The feature's scores as the selection recorded them (index, rank, Δ, diff, CI, freqs).
    pub score: FeatureScore,
    /// Corpus prompts with the largest max-over-content-tokens activation, descending; prompts
    /// where the feature never fires are left out, so there may be fewer than asked for.
    pub top_contexts: Vec<Context>,
    /// Highest logit-lens entries, descending.
    pub promoted_tokens: Vec<LensToken>,
    /// Lowest logit-lens entries, ascending (most suppressed first).
    pub suppressed_tokens: Vec<LensToken>,
}

/// One direction's logit lens: `(id, logit)` promoted (descending) and suppressed (ascending).
pub type Lens = (Vec<(u32, f64)>, Vec<(u32, f64)>);

/// Logit lens of directions: for each row `d` of `directions` `(k, d_model)`, the `n` largest and
/// `n` smallest entries of `E · (w_norm ⊙ d)` with `E = unembed (vocab, d_model)`.
///
/// This is what the direction would add to the logits if it reached the final norm on its own:
/// the norm's per-dimension weight is applied, but its input scale (`1/rms` of the whole
/// residual) is ignored, as is any final logit soft-cap (monotone, so the ranking is unchanged).
/// Returns `(id, logit)` pairs: promoted descending, suppressed ascending; ties by id.
pub fn logit_lens(
    unembed: &Tensor,
    norm_weight: &Tensor,
    directions: &Tensor,
    n: usize,
) -> Result<Vec<Lens>> {
    let (_, d_model) = unembed.dims2()?;
    let (_, d_dir) = directions.dims2()?;
    if d_dir != d_model || norm_weight.dims() != [d_model] {
        return Err(ExplainError::Width {
            what: format!(
                "logit lens: directions {:?} and norm weight {:?} against the unembedding {:?}",
                directions.dims(),
                norm_weight.dims(),
                unembed.dims()
            ),
            expected: d_model,
            got: d_dir,
        });
    }
    let device = unembed.device();
    let w = norm_weight.to_dtype(DType::F32)?.to_device(device)?;
    let v = directions
        .to_dtype(DType::F32)?
        .to_device(device)?
        .broadcast_mul(&w)?; // (k, d)
    let logits = v
        .matmul(&unembed.to_dtype(DType::F32)?.t()?)? // (k, vocab)
        .to_vec2::<f32>()?;
    Ok(logits
        .iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.sort_by(|&i, &j| row[j as usize].total_cmp(&row[i as usize]).then(i.cmp(&j)));
            let entry = |i: &u32| (*i, row[*i as usize] as f64);
            let top = order.iter().take(n).map(entry).collect();
            let mut bottom: Vec<(u32, f64)> = order.iter().rev().take(n).map(entry).collect();
            bottom.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            (top, bottom)
        })
        .collect())
}

/// A candidate context: (max activation, prompt, per-token activations).
type Candidate = (f32, usize, Vec<f32>);

/// Keeps the `n` best candidates, descending by activation, ties by the earlier prompt.
fn offer(best: &mut Vec<Candidate>, n: usize, cand: Candidate) {
    if n == 0 || cand.0 <= 0.0 {
        return;
    }
    if best.len() == n {
        let worst = &best[n - 1];
        if cand.0 < worst.0 || (cand.0 == worst.0 && cand.1 > worst.1) {
            return;
        }
    }
    let at = best
        .iter()
        .position(|b| cand.0 > b.0 || (cand.0 == b.0 && cand.1 < b.1))
        .unwrap_or(best.len());
    best.insert(at, cand);
    best.truncate(n);
}

fn decode_tokens(model: &ChatModel, ids: &[u32]) -> Result<Vec<String>> {
    ids.iter()
        .map(|&id| Ok(model.tokenizer.decode(&[id], false)?))
        .collect()
}

/// A card for every selected feature: top contexts from `corpus` and the logit lens.
///
/// One forward pass per batch of `cfg.batch_size` corpus prompts captures every selected layer at
/// once (no logits). `saes` must hold one SAE per selected layer (matched by hook). Cards come in
/// the selection's order: layer, then rank.
pub fn feature_cards(
    model: &ChatModel,
    saes: &[Sae],
    selection: &Selection,
    corpus: &[String],
    cfg: &ExplainConfig,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Vec<FeatureCard>> {
    let d_model = model.decoder.config.hidden_size;
    let device = model.decoder.device().clone();
    let layers: Vec<(&crate::features::LayerSelection, Sae)> = selection
        .layers
        .iter()
        .map(|l| {
            let sae = sae_for(saes, l)?;
            sae.check_against_model(d_model, model.decoder.config.num_layers)?;
            Ok((l, sae.to_device(&device)?))
        })
        .collect::<Result<_>>()?;
    let hooks: Vec<Resid> = layers.iter().map(|(l, _)| l.hook).collect();

    // best[layer][feature] = kept candidates
    let mut best: Vec<Vec<Vec<Candidate>>> = layers
        .iter()
        .map(|(l, _)| vec![Vec::new(); l.features.len()])
        .collect();
    let tokens: Vec<PromptTokens> = corpus
        .iter()
        .map(|p| prompt_tokens(model, p))
        .collect::<std::result::Result<_, _>>()?;
    if !hooks.is_empty() && cfg.contexts > 0 {
        let mut done = 0;
        for_each_content_batch(model, &tokens, &hooks, cfg.batch_size, &mut |batch| {
            for (li, (layer, sae)) in layers.iter().enumerate() {
                let resid = batch
                    .resid
                    .get(&layer.hook)
                    .ok_or(ExplainError::Capture { hook: layer.hook })?;
                let chosen: Vec<u32> = layer.features.iter().map(|f| f.index as u32).collect();
                let chosen = Tensor::from_vec(chosen.clone(), chosen.len(), resid.device())?;
                let acts = sae
                    .encode(resid)? // (n_content, d_sae)
                    .index_select(&chosen, 1)? // (n_content, k)
                    .t()?
                    .contiguous()?
                    .to_vec2::<f32>()?; // (k, n_content)
                for (fi, row) in acts.iter().enumerate() {
                    for (&i, span) in batch.prompts.iter().zip(&batch.spans) {
                        let per_token = &row[span.clone()];
                        let max = per_token.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        offer(
                            &mut best[li][fi],
                            cfg.contexts,
                            (max, i, per_token.to_vec()),
                        );
                    }
                }
            }
            done += batch.prompts.len();
            on_batch(done);
            Ok::<(), ExplainError>(())
        })?;
    }

    let unembed = model
        .decoder
        .lm_head
        .as_ref()
        .unwrap_or(&model.decoder.embed_tokens);
    let mut cards = Vec::new();
    for ((layer, sae), best) in layers.iter().zip(best) {
        let chosen: Vec<u32> = layer.features.iter().map(|f| f.index as u32).collect();
        let chosen = Tensor::from_vec(chosen.clone(), chosen.len(), sae.w_dec.device())?;
        let rows = sae.w_dec.index_select(&chosen, 0)?; // (k, d)
        let norms = rows
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        let units = rows.broadcast_div(&norms)?;
        let lens = logit_lens(unembed, &model.decoder.norm.weight, &units, cfg.lens_tokens)?;
        for ((score, contexts), (top, bottom)) in layer.features.iter().zip(best).zip(lens) {
            let named = |list: Vec<(u32, f64)>| -> Result<Vec<LensToken>> {
                list.into_iter()
                    .map(|(id, logit)| {
                        Ok(LensToken {
                            id,
                            token: model.tokenizer.decode(&[id], false)?,
                            logit,
                        })
                    })
                    .collect()
            };
            let top_contexts = contexts
                .into_iter()
                .map(|(max_activation, i, activations)| {
                    let pt = &tokens[i];
                    Ok(Context {
                        prompt_index: i,
                        prompt: corpus[i].clone(),
                        max_activation,
                        tokens: decode_tokens(model, &pt.ids[pt.content.clone()])?,
                        activations,
                    })
                })
                .collect::<Result<_>>()?;
            cards.push(FeatureCard {
                hook: layer.hook,
                hook_name: layer.hook_name.clone(),
                score: score.clone(),
                top_contexts,
                promoted_tokens: named(top)?,
                suppressed_tokens: named(bottom)?,
            });
        }
    }
    Ok(cards)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
        crate::linalg::standard_normals(rng, n)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    #[test]
    fn a_norm_adjusted_token_embedding_promotes_that_token_first() {
        let (vocab, d) = (64, 32);
        let mut rng = StdRng::seed_from_u64(7);
        let e = randn(&mut rng, vocab * d);
        // norm weights far from 1, so skipping the norm adjustment would change the direction
        let w: Vec<f32> = (0..d).map(|i| 0.25 + 2.0 * (i % 4) as f32).collect();
        let embed = Tensor::from_vec(e.clone(), (vocab, d), &Device::Cpu).unwrap();
        let weight = Tensor::from_vec(w.clone(), d, &Device::Cpu).unwrap();
        // tied embeddings: the unembedding is the embedding. d_t = e_t / w, so w ⊙ d_t = e_t and
        // E·e_t peaks at t (‖e_t‖² ≈ d against cross terms of size ≈ √d); -d_t sinks it last.
        for t in [3usize, 40] {
            let dir: Vec<f32> = (0..d).map(|i| e[t * d + i] / w[i]).collect();
            let neg: Vec<f32> = dir.iter().map(|v| -v).collect();
            let dirs = Tensor::from_vec([dir, neg].concat(), (2, d), &Device::Cpu).unwrap();
            let lens = logit_lens(&embed, &weight, &dirs, 5).unwrap();
            let (top, bottom) = &lens[0];
            assert_eq!(top[0].0, t as u32, "{top:?}");
            assert_eq!(top.len(), 5);
            assert!(top.windows(2).all(|p| p[0].1 >= p[1].1), "descending");
            assert!(bottom.windows(2).all(|p| p[0].1 <= p[1].1), "ascending");
            // its logit is ‖e_t‖² (w ⊙ d_t = e_t)
            let norm2: f64 = e[t * d..(t + 1) * d]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum();
            assert!((top[0].1 - norm2).abs() < 1e-3 * norm2);
            assert_eq!(
                lens[1].1[0].0, t as u32,
                "the negated direction suppresses t most"
            );
        }
    }

    #[test]
    fn the_lens_rejects_mismatched_widths() {
        let embed = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let dirs = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            logit_lens(&embed, &w, &dirs, 3),
            Err(ExplainError::Width {
                expected: 4,
                got: 5,
                ..
            })
        ));
    }

    #[test]
    fn offer_keeps_the_n_largest_positive_candidates_in_order() {
        let mut best = Vec::new();
        for (max, i) in [
            (0.5, 0),
            (0.0, 1),
            (2.0, 2),
            (1.0, 3),
            (2.0, 4),
            (0.7, 5),
            (-1.0, 6),
        ] {
            offer(&mut best, 3, (max, i, vec![max]));
        }
        let got: Vec<(f32, usize)> = best.iter().map(|c| (c.0, c.1)).collect();
        // ties by the earlier prompt; zero and negative maxima never count as firing
        assert_eq!(got, vec![(2.0, 2), (2.0, 4), (1.0, 3)]);
        let mut few = Vec::new();
        offer(&mut few, 3, (0.0, 0, vec![]));
        assert!(few.is_empty());
    }
}
