//! The default SAE training corpus for a chat model: the project's instruction data and prompt
//! sets rendered with the model's chat template, plus the model's own greedy answers to some of
//! the instructions (so the SAE sees assistant-turn activations the model itself produces).
//!
//! Sources (fetched assets): alpaca-gpt4-demo instruction + answer pairs (full conversations),
//! AdvBench goals and the benign-but-edgy prompts (user turn + generation prompt). Conversations
//! are split into training and held-out sets by a seeded hash of their index, then the training
//! set is shuffled so every shard mixes sources.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::store::{Exclude, Sequence};
use super::{Result, SaeError};
use crate::model::chat::Message;
use crate::model::generate::{generate, GenerationConfig};
use crate::model::load::ChatModel;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Use at most this many alpaca instruction/answer pairs (999 exist).
    pub alpaca_max: usize,
    /// Include the 520 AdvBench goals as prompts.
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

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| SaeError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// `(instruction, answer)` pairs of an alpaca JSON file (`instruction`, `input`, `output`).
pub fn read_alpaca(path: &Path) -> Result<Vec<(String, String)>> {
    #[derive(Deserialize)]
    struct Item {
        instruction: String,
        #[serde(default)]
        input: String,
        output: String,
    }
    let items: Vec<Item> = serde_json::from_str(&read(path)?).map_err(|e| SaeError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(items
        .into_iter()
        .map(|i| {
            let q = if i.input.trim().is_empty() {
                i.instruction
            } else {
                format!("{}\n\n{}", i.instruction, i.input)
            };
            (q, i.output)
        })
        .collect())
}

/// The `- value:` entries of a PyRIT `.prompt` YAML file (continuation lines joined).
pub fn read_prompt_values(path: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut open = false;
    for line in read(path)?.lines() {
        if let Some(v) = line.strip_prefix("- value: ") {
            out.push(unquote(v.trim()));
            open = true;
        } else if open && line.starts_with("    ") && !line.trim_start().starts_with("- ") {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else {
            open = false;
        }
    }
    if out.is_empty() {
        return Err(SaeError::Source(format!(
            "{}: no `- value:` entries",
            path.display()
        )));
    }
    Ok(out)
}

fn unquote(v: &str) -> String {
    let b = v.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_string()
    }
}

/// The `text` fields of a JSON array of objects.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Item {
        text: String,
    }
    let items: Vec<Item> = serde_json::from_str(&read(path)?).map_err(|e| SaeError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(items.into_iter().map(|i| i.text).collect())
}

fn asset(name: &str, file: &str) -> Result<std::path::PathBuf> {
    crate::assets::ensure_file(name, file)
        .map_err(|e| SaeError::Source(format!("asset {name}/{file}: {e}")))
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
    let mut convs: Vec<Vec<u32>> = Vec::new();
    let mut sources = Vec::new();
    let alpaca = read_alpaca(&asset("alpaca-gpt4-demo", "alpaca_en_demo.json")?)?;
    let n_alpaca = alpaca.len().min(cfg.alpaca_max);
    for (q, a) in &alpaca[..n_alpaca] {
        convs.push(enc(&[Message::user(q), Message::assistant(a)], false)?);
    }
    sources.push(("alpaca-gpt4-demo".to_string(), n_alpaca));
    if cfg.advbench {
        let goals = read_prompt_values(&asset("advbench", "adv_bench.prompt")?)?;
        for g in &goals {
            convs.push(enc(&[Message::user(g)], true)?);
        }
        sources.push(("advbench".to_string(), goals.len()));
    }
    if cfg.benign_edgy {
        let mut n = 0;
        for f in ["benign_edgy_80.json", "expanded_70.json"] {
            for t in read_texts(&asset("benign-edgy", f)?)? {
                convs.push(enc(&[Message::user(&t)], true)?);
                n += 1;
            }
        }
        sources.push(("benign-edgy".to_string(), n));
    }
    if cfg.generated > 0 {
        // the last alpaca instructions (a different slice from the pairs' order start)
        let qs: Vec<&String> = alpaca
            .iter()
            .rev()
            .take(cfg.generated)
            .map(|p| &p.0)
            .collect();
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
