//! The default SAE training corpus for a chat model: the project's instruction data and prompt
//! sets rendered with the model's chat template, plus the model's own greedy answers to some of
//! the instructions (so the SAE sees assistant-turn activations the model itself produces).
//!
//! Sources: the *training side* of the evaluation splits ([`Splits`]): alpaca-gpt4-demo
//! instruction + answer pairs outside the capability hold-out (full conversations), the AdvBench
//! goals outside the harmful suite and its duplicates, and the benign-but-edgy prompts (user
//! turn + generation prompt). No evaluation prompt, nor a duplicate of one, reaches the SAE; the
//! corpus is checked with [`Splits::assert_disjoint`]. Conversations are split into SAE-training
//! and SAE-held-out sets by a seeded draw, then the training set is shuffled so every shard
//! mixes sources.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::store::{Exclude, Sequence};
use super::{Result, SaeError};
use crate::data::Splits;
use crate::model::chat::Message;
use crate::model::generate::{generate, GenerationConfig};
use crate::model::load::ChatModel;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Use at most this many alpaca training pairs (about 900 of the 999 are on the training side).
    pub alpaca_max: usize,
    /// Include the AdvBench goals of the training side as prompts.
    pub advbench: bool,
    /// Include the 150 benign-but-edgy prompts.
    pub benign_edgy: bool,
    /// Alpaca instructions answered by the model itself (greedy), appended as conversations.
    pub generated: usize,
    /// Length cap of those answers, tokens.
    pub generated_max_tokens: usize,
    /// Fraction of conversations held out for evaluation.
    pub holdout_frac: f64,
    pub seed: u64,
    pub exclude: Exclude,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            alpaca_max: 999,
            advbench: true,
            benign_edgy: true,
            generated: 48,
            generated_max_tokens: 96,
            holdout_frac: 0.05,
            seed: 0,
            exclude: Exclude::default(),
        }
    }
}

pub struct Corpus {
    pub train: Vec<Sequence>,
    pub heldout: Vec<Sequence>,
    /// (source, conversations) counts
    pub sources: Vec<(String, usize)>,
}

fn sequence(model: &ChatModel, ids: Vec<u32>, exclude: Exclude) -> Sequence {
    let tok = &model.tokenizer;
    Sequence::new(ids, tok.bos_id(), |id| tok.is_special(id), exclude)
}

/// Build the default corpus (fetches the assets on first use; generation takes a few minutes
/// on a CPU for the default 48 answers).
pub fn default_corpus(model: &ChatModel, cfg: &CorpusConfig) -> Result<Corpus> {
    let enc = |msgs: &[Message], gen_prompt: bool| -> Result<Vec<u32>> {
        model
            .tokenizer
            .apply_chat_template(&model.template, msgs, gen_prompt)
            .map_err(|e| SaeError::Source(format!("chat template: {e}")))
    };
    let splits = Splits::load().map_err(|e| SaeError::Source(format!("data splits: {e}")))?;
    let mut convs: Vec<Vec<u32>> = Vec::new();
    let mut sources = Vec::new();
    let mut texts: Vec<&str> = Vec::new();
    let alpaca = splits.alpaca_train();
    let n_alpaca = alpaca.len().min(cfg.alpaca_max);
    for pair in &alpaca[..n_alpaca] {
        convs.push(enc(
            &[
                Message::user(&pair.prompt),
                Message::assistant(&pair.response),
            ],
            false,
        )?);
        texts.push(&pair.prompt);
    }
    sources.push(("alpaca-gpt4-demo (training side)".to_string(), n_alpaca));
    let prompt_sets = [
        (
            cfg.advbench,
            "advbench (training side)",
            splits.train_harmful(),
        ),
        (cfg.benign_edgy, "benign-edgy", splits.benign_edgy()),
    ];
    for (wanted, name, records) in prompt_sets {
        if !wanted {
            continue;
        }
        for r in records {
            convs.push(enc(&[Message::user(&r.text)], true)?);
            texts.push(&r.text);
        }
        sources.push((name.to_string(), records.len()));
    }
    if cfg.generated > 0 {
        // the last alpaca instructions (a different slice from the pairs' order start)
        let qs: Vec<&String> = alpaca
            .iter()
            .rev()
            .take(cfg.generated)
            .map(|p| &p.prompt)
            .collect();
        texts.extend(qs.iter().map(|q| q.as_str()));
        let prompts: Vec<Vec<u32>> = qs
            .iter()
            .map(|q| enc(&[Message::user(*q)], true))
            .collect::<Result<_>>()?;
        let gcfg = GenerationConfig {
            max_new_tokens: cfg.generated_max_tokens,
            ..Default::default()
        };
        for chunk in prompts.chunks(16) {
            let gens = generate(&model.decoder, &model.tokenizer, chunk, &gcfg, |_, _| {})
                .map_err(|e| SaeError::Source(format!("generation: {e}")))?;
            for (p, g) in chunk.iter().zip(gens) {
                let mut ids = p.clone();
                ids.extend(g.ids);
                convs.push(ids);
            }
        }
        sources.push(("model greedy answers".to_string(), qs.len()));
    }
    splits
        .assert_disjoint(texts)
        .map_err(|e| SaeError::Source(format!("SAE corpus: {e}")))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut train = Vec::new();
    let mut heldout = Vec::new();
    for ids in convs {
        let s = sequence(model, ids, cfg.exclude);
        if rng.random::<f64>() < cfg.holdout_frac {
            heldout.push(s);
        } else {
            train.push(s);
        }
    }
    train.shuffle(&mut rng);
    Ok(Corpus {
        train,
        heldout,
        sources,
    })
}
