//! sft — the safety fine-tuning data set: harmful prompts → refusals, harmless prompts → helpful
//! answers, written as the JSON lines of [`ChatExample`] that `sails train` reads.
//!
//! In: the project's [`Splits`] (training side only) and an [`SftConfig`]; optionally a callback
//! that answers prompts with the base model. Out: an [`SftSet`] (`train.jsonl`, `heldout.jsonl`,
//! `sft_manifest.json`, and with `preference_pairs` also `pairs.jsonl`, `heldout_pairs.jsonl`).
//!
//! # What goes in
//!
//! | kind | prompts | response |
//! |---|---|---|
//! | `harmful-refusal` | AdvBench, training share ([`Splits::train_harmful`]) | a composed refusal (below) |
//! | `harmless-helpful` | Alpaca-GPT4 demo, training share ([`Splits::alpaca_train`]) | the Alpaca reference answer, or the base model's own answer ([`HelpfulSource`]) |
//! | `edgy-helpful` | benign-but-edgy prompts ([`Splits::benign_edgy`]) | always the base model's own answer |
//! | `harmful-refusal`, `edgy-helpful` | with `refusal_pairs`: both sides of every contrast pair ([`Splits::refusal_pairs`]) | a composed refusal / the base model's own answer |
//!
//! The benign-but-edgy prompts ("How do I kill a stuck process?") have no reference answer, so
//! they always take the model's own answer. Without an answer callback they are dropped, each with
//! its reason in the manifest's `dropped` list. Training on them keeps over-refusal down: the model
//! sees that a frightening word is not by itself a reason to refuse.
//!
//! Model answers are trimmed of surrounding whitespace; an answer that is then empty is dropped and
//! counted (`dropped`, reason `empty model answer`). Prompts that normalise to the same text are
//! kept once (first of harmful, edgy, harmless), so the held-out part cannot share a prompt with
//! the training part.
//!
//! # How refusals are made
//!
//! Each refusal is three parts joined by spaces: an opener from [`REFUSAL_OPENERS`] (declining in
//! so many words), a reason from [`REFUSAL_REASONS`] (harm, safety or the law, worded in several
//! ways) and, for most prompts, an offer of a safe alternative from [`REFUSAL_OFFERS`] (general
//! safety information, legal help, emergency services, a professional to talk to). The parts are
//! picked by the first bytes of `sha256("{seed}:refusal:{normalised prompt}")`, so a prompt always
//! gets the same refusal under a seed, and different prompts get different ones: 12 openers × 12
//! reasons × (10 offers + no offer) = 1,584 refusals. A single fixed refusal string would teach
//! the model one sentence rather than the behaviour, and would let a judge's phrase list score a
//! trained model by memorised wording. The pools are this project's own sentences; they share
//! common words ("I can't", "sorry") with the evaluation judges' phrase lists, as any refusal does,
//! but none is a copy of a judge's list.
//!
//! # Preference pairs
//!
//! With `preference_pairs`, every example of a part also becomes a [`PreferencePair`] (same id,
//! same order) for the trainer's DPO term: a `harmful-refusal` example's refusal is `chosen` and
//! the base model's own greedy answer to its prompt `rejected` (so the pair says "refuse instead
//! of what you would have said"); any other example's answer is `chosen` and the composed
//! [`refusal`] of its prompt `rejected` ("answer instead of refusing"). A harmful prompt whose
//! model answer is empty gets no pair (`PairCounts::no_rejected`).
//!
//! # Sizes, order and the held-out part
//!
//! Every choice is a pure function of the prompts' ids and the seed: subsets are the first items
//! when ordered by `sha256("{seed}:pick:{id}")`; each kind's held-out part is the first
//! `round(heldout_frac × n)` of that order; the training file is ordered by
//! `sha256("{seed}:order:{id}")`. The same splits, config and answers give byte-identical files.
//!
//! Before anything is returned, every prompt of both parts is checked with
//! [`Splits::assert_disjoint`]: none may be (a duplicate of) an evaluation item of any suite or a
//! held-out Alpaca item.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{normalise, AnsweredPrompt, DataError, FileHash, PromptRecord, SplitConfig, Splits};
use crate::model::chat::Message;
use crate::train::ChatExample;

/// Error a model-answer callback may return.
pub type AnswerError = Box<dyn std::error::Error + Send + Sync>;

/// Answers a batch of prompts, one answer per prompt in order (the base model, or a stand-in).
pub type AnswerFn<'a> = dyn FnMut(&[String]) -> std::result::Result<Vec<String>, AnswerError> + 'a;

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error("sft config: {0}")]
    Config(String),
    #[error("asked for {requested} {kind} examples, but only {available} are available")]
    NotEnough {
        kind: Kind,
        requested: usize,
        available: usize,
    },
    #[error(
        "helpful = \"model\" needs the base model's answers, but no answer callback was given \
         (load a model, or use helpful = \"reference\")"
    )]
    NoAnswerer,
    #[error("answering {prompts} prompts with the model failed: {source}")]
    Answer { prompts: usize, source: AnswerError },
    #[error(
        "preference_pairs needs the base model's own answers to the harmful prompts (the \
         rejected side of their pairs), but no answer callback was given: load a model"
    )]
    PairsNeedModel,
    #[error("the answer callback returned {got} answers for {expected} prompts")]
    AnswerCount { expected: usize, got: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: sha256 {got} differs from {expected} recorded in sft_manifest.json")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("{path}: {got} examples, but sft_manifest.json lists {expected}")]
    CountMismatch {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

pub type Result<T> = std::result::Result<T, SftError>;

/// Where the helpful answers to harmless (Alpaca) prompts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HelpfulSource {
    /// The Alpaca-GPT4 reference answers: no model needed, but their style differs from the base
    /// model's, so training on them also moves the model's everyday answers.
    Reference,
    /// The base model's own greedy answers: training then changes little beyond refusing, which
    /// limits drift in capability and style.
    Model,
}

/// How many harmless Alpaca examples to take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HarmlessCount {
    /// Helpful examples (Alpaca and benign-but-edgy together) per harmful example; the Alpaca
    /// count is what remains after the benign-but-edgy ones (never below 0).
    PerHarmful(f64),
    /// Exactly this many Alpaca examples, whatever the number of harmful ones.
    Exactly(usize),
}

/// How the fine-tuning set is drawn; copied into `sft_manifest.json`. A config file may set any
/// subset of the fields; the rest take [`SftConfig::default`] (the one place defaults live).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Harmful training prompts to answer with a refusal; `None` takes every one the split
    /// allows for training (AdvBench minus its held-out share and the evaluation duplicates).
    pub harmful: Option<usize>,
    /// How many harmless Alpaca prompts to answer helpfully: a ratio to the harmful count (the
    /// default, 1.0: as many helpful as refusing examples, so neither behaviour dominates the loss)
    /// or an exact number.
    pub harmless: HarmlessCount,
    /// Include the benign-but-edgy prompts, answered helpfully by the base model. On by default:
    /// refusal training without them teaches the model to refuse anything that sounds dangerous.
    pub include_edgy: bool,
    /// At most this many benign-but-edgy prompts (`None`: all of them), to keep the model-answer
    /// generation short in a quick run.
    pub max_edgy: Option<usize>,
    /// Share of each kind held out for validation loss (~10 %: enough to see overfitting, little
    /// taken from training).
    pub heldout_frac: f64,
    /// Seed for the subsets, the held-out choice, the order and the refusal wording.
    pub seed: u64,
    /// Where the helpful answers to Alpaca prompts come from.
    pub helpful: HelpfulSource,
    /// Token budget of each model answer (greedy decoding). 128 covers most short answers of a
    /// small chat model; longer ones are cut, which the trainer sees as an unfinished answer.
    pub max_new_tokens: usize,
    /// Also refuse each harmful prompt asked as a question ([`question_form`]): AdvBench's
    /// prompts are imperatives, while people (and StrongREJECT) ask "How can I …?".
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub question_forms: bool,
    /// Also train on the contrast pairs ([`Splits::refusal_pairs`]): each harmful question refused
    /// beside a harmless question on a neighbouring topic answered by the base model, so that
    /// what is asked, not how it is asked, decides a refusal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refusal_pairs: bool,
    /// CoCoNot's benign requests with safety concerns ("How can I protect my bank account from
    /// being hacked?") answered with CoCoNot's preferred answer: what not to refuse, in the words
    /// that sound dangerous. This many, drawn by the seed (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub coconot: usize,
    /// Longest CoCoNot answer kept, in characters; a longer one is cut at its last paragraph or
    /// sentence end before this (its many-paragraph answers would otherwise dominate the tokens).
    #[serde(default = "default_reference_max_chars")]
    pub reference_max_chars: usize,
    /// UncensorBench's harmful prompts, refused in UncensorBench's own words (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uncensorbench: usize,
    /// PyRIT's many-shot harmful questions that are no evaluation item, refused (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub many_shot: usize,
    /// Also write preference pairs for the DPO term (`pairs.jsonl`, `heldout_pairs.jsonl`, one
    /// per example): a harmful prompt's refusal preferred to the base model's own greedy answer,
    /// every other prompt's answer preferred to its composed refusal ([`refusal`]). Needs the
    /// model even when nothing else does.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub preference_pairs: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_reference_max_chars() -> usize {
    1200
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            harmful: None,
            harmless: HarmlessCount::PerHarmful(1.0),
            include_edgy: true,
            max_edgy: None,
            heldout_frac: 0.1,
            seed: 20251223,
            helpful: HelpfulSource::Reference,
            max_new_tokens: 128,
            question_forms: false,
            refusal_pairs: false,
            coconot: 0,
            reference_max_chars: default_reference_max_chars(),
            uncensorbench: 0,
            many_shot: 0,
            preference_pairs: false,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.heldout_frac) {
            return Err(SftError::Config(format!(
                "heldout_frac must be in [0, 1), got {}",
                self.heldout_frac
            )));
        }
        if let HarmlessCount::PerHarmful(r) = self.harmless {
            if !(r.is_finite() && r >= 0.0) {
                return Err(SftError::Config(format!(
                    "harmless per_harmful must be a finite number ≥ 0, got {r}"
                )));
            }
        }
        if self.max_new_tokens == 0 {
            return Err(SftError::Config("max_new_tokens must be positive".into()));
        }
        if self.reference_max_chars < 200 {
            return Err(SftError::Config(format!(
                "reference_max_chars must be at least 200, got {}",
                self.reference_max_chars
            )));
        }
        Ok(())
    }
}

/// What an example teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A harmful prompt answered with a refusal.
    HarmfulRefusal,
    /// An Alpaca prompt answered helpfully.
    HarmlessHelpful,
    /// A benign-but-edgy prompt answered helpfully.
    EdgyHelpful,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::HarmfulRefusal => "harmful-refusal",
            Kind::HarmlessHelpful => "harmless-helpful",
            Kind::EdgyHelpful => "edgy-helpful",
        })
    }
}

/// Examples per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindCounts {
    pub harmful_refusal: usize,
    pub harmless_helpful: usize,
    pub edgy_helpful: usize,
}

impl KindCounts {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::HarmfulRefusal => self.harmful_refusal += 1,
            Kind::HarmlessHelpful => self.harmless_helpful += 1,
            Kind::EdgyHelpful => self.edgy_helpful += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.harmful_refusal + self.harmless_helpful + self.edgy_helpful
    }
}

/// Where one line of `train.jsonl` / `heldout.jsonl` came from (same order as the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleMeta {
    /// The prompt's id in the data layer (`advbench:7`, `alpaca:12`, `benign-edgy:…`).
    pub id: String,
    pub kind: Kind,
    /// Where the response came from: `refusal`, `reference` or `model`.
    pub response: ResponseSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResponseSource {
    Refusal,
    Reference,
    Model,
}

/// A selected prompt left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropped {
    pub id: String,
    pub kind: Kind,
    pub reason: String,
}

/// One line of `pairs.jsonl` / `heldout_pairs.jsonl`: for the example `id` (same id as its
/// [`ExampleMeta`]), `chosen` is the preferred answer to `prompt` and `rejected` the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePair {
    pub id: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// The preference pairs' counts in `sft_manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairCounts {
    pub train: usize,
    pub heldout: usize,
    /// Harmful examples left without a pair: the base model's answer was empty once trimmed.
    pub no_rejected: Vec<String>,
}

/// `sft_manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftManifest {
    pub format_version: u32,
    pub config: SftConfig,
    /// What produced the model answers (model, decoding), or `None` when no model was used.
    pub answer_source: Option<String>,
    /// The split the prompts come from: its config, membership hash and input files (by name).
    pub split_config: SplitConfig,
    pub split_membership_sha256: String,
    pub split_files: Vec<FileHash>,
    /// Sizes of the refusal pools (openers, reasons, offers).
    pub refusal_pools: [usize; 3],
    /// Distinct refusal texts over both parts.
    pub distinct_refusals: usize,
    pub train_counts: KindCounts,
    pub heldout_counts: KindCounts,
    pub dropped: Vec<Dropped>,
    pub train: Vec<ExampleMeta>,
    pub heldout: Vec<ExampleMeta>,
    /// With `preference_pairs`: how many pairs each part has (absent otherwise, so manifests
    /// written before pairs existed read the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<PairCounts>,
    /// File name → sha256 of the written bytes; filled by [`SftSet::save`].
    pub files: BTreeMap<String, String>,
}

/// The fine-tuning set.
#[derive(Debug, Clone, PartialEq)]
pub struct SftSet {
    pub train: Vec<ChatExample>,
    pub heldout: Vec<ChatExample>,
    /// Preference pairs of the training part (empty without `preference_pairs`).
    pub pairs: Vec<PreferencePair>,
    /// Preference pairs of the held-out part.
    pub heldout_pairs: Vec<PreferencePair>,
    pub manifest: SftManifest,
}

/// Answers prompts with the base model, for [`build`].
pub struct ModelAnswers<'a> {
    /// Recorded in the manifest, e.g. `default (SmolLM2-135M-Instruct) greedy max_new_tokens=128`.
    pub source: String,
    /// Returns one answer per prompt, in order.
    pub answer: &'a mut AnswerFn<'a>,
}

// Refusals are composed as `opener + " " + reason [+ " " + offer]`, each part chosen by a hash of
// the seed and the normalised prompt (see the module docs). Every entry is a whole sentence so that
// any combination reads naturally.

/// Declining, in different words.
pub const REFUSAL_OPENERS: &[&str] = &[
    "I can't help with that.",
    "I'm sorry, but I won't help with this.",
    "I won't be able to assist with this request.",
    "Sorry, that's not something I can help with.",
    "I'm not going to help with that.",
    "I have to decline this request.",
    "I can't assist with that request.",
    "That's something I won't do.",
    "I'm sorry, but I can't provide that.",
    "I must decline.",
    "No, I can't help with this one.",
    "I'm afraid I can't do that.",
];

/// Why: harm, safety, the law.
pub const REFUSAL_REASONS: &[&str] = &[
    "It could be used to seriously hurt people.",
    "Helping with this could put people's safety at risk.",
    "What you're asking for is against the law in most places, and it could cause real harm.",
    "Providing these details could enable violence or other serious harm.",
    "This could be used to harm others, and that's a line I don't cross.",
    "Instructions like these could lead to injury, financial loss or legal trouble for the people involved.",
    "It would mean helping to deceive or exploit other people.",
    "The risk of this being misused to hurt someone is too high.",
    "Doing so could facilitate a crime and put others in danger.",
    "This kind of information can do real damage in the wrong hands.",
    "I don't give help that could endanger anyone's safety or break the law.",
    "It could cause serious harm to people, property or computer systems.",
];

/// A safe alternative; some refusals end without one.
pub const REFUSAL_OFFERS: &[&str] = &[
    "If you're interested in the topic for safety reasons, I can share general information on how people protect themselves.",
    "If you or someone else is in danger, please contact your local emergency services.",
    "If you're dealing with a legal problem, a lawyer or a local legal aid service can advise you.",
    "If something is weighing on you, talking to a counsellor or another professional you trust can really help.",
    "I'm happy to help with a related question that doesn't put anyone at risk.",
    "If your goal is research or education, I can point you to general, publicly available safety resources.",
    "If you're worried about being targeted by something like this, I can explain how to recognise and report it.",
    "If you'd like, I can suggest lawful ways to reach what you're actually trying to achieve.",
    "If this is about security, I can talk about defensive practices and responsible disclosure instead.",
    "Is there something else I can help you with?",
];

/// Refusals end without an offer in `NO_OFFER_SLOTS / (offers + NO_OFFER_SLOTS)` of prompts.
const NO_OFFER_SLOTS: usize = 1;

/// The refusal for `prompt` under `seed` (see the module docs).
pub fn refusal(seed: u64, prompt: &str) -> String {
    let d = Sha256::digest(format!("{seed}:refusal:{}", normalise(prompt)).as_bytes());
    let pick = |i: usize, n: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i * 8..i * 8 + 8]);
        (u64::from_be_bytes(b) % n as u64) as usize
    };
    let opener = REFUSAL_OPENERS[pick(0, REFUSAL_OPENERS.len())];
    let reason = REFUSAL_REASONS[pick(1, REFUSAL_REASONS.len())];
    match REFUSAL_OFFERS.get(pick(2, REFUSAL_OFFERS.len() + NO_OFFER_SLOTS)) {
        Some(offer) => format!("{opener} {reason} {offer}"),
        None => format!("{opener} {reason}"),
    }
}

/// Question wordings of a request, `{}` standing for the request from its verb on.
pub const QUESTION_FORMS: [&str; 8] = [
    "Can you {}?",
    "Could you please {}?",
    "How would I {}?",
    "What is the best way to {}?",
    "I want to {}. How do I do it?",
    "Is there a way to {}?",
    "How can someone {}?",
    "Ways to {}?",
];

/// Marks the id of a prompt's question form (`advbench:7~question`).
const QUESTION_SUFFIX: &str = "~question";

/// The imperative `prompt` ("Write a tutorial on X.") asked as a question ("How would I write a
/// tutorial on X?"), the wording picked by `sha256("{seed}:question:{id}")`.
pub fn question_form(seed: u64, id: &str, prompt: &str) -> String {
    let d = Sha256::digest(format!("{seed}:question:{id}").as_bytes());
    let form = QUESTION_FORMS[d[0] as usize % QUESTION_FORMS.len()];
    let request = prompt.trim().trim_end_matches(['.', '!', '?']);
    let mut chars = request.chars();
    let request = match (chars.next(), chars.clone().next()) {
        // Lower the first letter unless the word is an acronym ("DDoS", "AI").
        (Some(first), Some(second)) if !second.is_uppercase() => {
            first.to_lowercase().chain(chars).collect()
        }
        _ => request.to_string(),
    };
    form.replace("{}", &request)
}

/// `text` cut to at most `max_chars` characters at its last paragraph break or sentence end
/// within the limit (a hard cut at the limit when neither is in the limit's second half).
pub fn cut_answer(text: &str, max_chars: usize) -> String {
    let text = text.trim();
    let Some((limit, _)) = text.char_indices().nth(max_chars) else {
        return text.to_owned();
    };
    let head = &text[..limit];
    let paragraph = head.rfind("\n\n");
    let sentence = head.rfind(['.', '!', '?']).map(|i| i + 1);
    let at = paragraph
        .max(sentence)
        .filter(|&i| i >= limit / 2)
        .unwrap_or(limit);
    head[..at].trim_end().to_owned()
}

/// The id a question form was made from (the id itself for every other prompt).
fn base_id(id: &str) -> &str {
    id.strip_suffix(QUESTION_SUFFIX).unwrap_or(id)
}

fn key(seed: u64, purpose: &str, id: &str) -> [u8; 32] {
    Sha256::digest(format!("{seed}:{purpose}:{id}").as_bytes()).into()
}

/// A prompt on its way to becoming an example.
struct Item {
    id: String,
    kind: Kind,
    prompt: String,
    /// `None` until answered (model answers).
    response: Option<String>,
    source: ResponseSource,
}

/// Orders `items` by `sha256("{seed}:pick:{id}")` and keeps the first `n`.
fn pick<T>(items: Vec<&T>, n: usize, seed: u64, id: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut keyed: Vec<([u8; 32], &T)> = items
        .into_iter()
        .map(|t| (key(seed, "pick", id(t)), t))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    keyed.into_iter().take(n).map(|(_, t)| t).collect()
}

/// [`pick`]s `n` of `pool`, or fails naming the kind when the pool is smaller.
fn draw<T>(
    pool: Vec<&T>,
    n: usize,
    kind: Kind,
    seed: u64,
    id: impl Fn(&T) -> &str,
) -> Result<Vec<&T>> {
    if n > pool.len() {
        return Err(SftError::NotEnough {
            kind,
            requested: n,
            available: pool.len(),
        });
    }
    Ok(pick(pool, n, seed, id))
}

/// Builds the fine-tuning set from the training side of `splits`.
pub fn build(
    splits: &Splits,
    cfg: &SftConfig,
    answers: Option<ModelAnswers<'_>>,
) -> Result<SftSet> {
    cfg.validate()?;
    if cfg.helpful == HelpfulSource::Model && answers.is_none() {
        return Err(SftError::NoAnswerer);
    }
    if cfg.preference_pairs && answers.is_none() {
        return Err(SftError::PairsNeedModel);
    }
    let mut answers = answers;
    let seed = cfg.seed;
    let mut dropped = Vec::new();

    // Candidate pools, in priority order harmful, edgy, Alpaca, each in data order: a prompt
    // whose normalised text an earlier candidate already has is dropped here, before any subset
    // is drawn, so the counts asked for are the counts delivered.
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut fresh = |id: &str, kind: Kind, text: &str, dropped: &mut Vec<Dropped>| match seen
        .entry(normalise(text))
    {
        Entry::Occupied(first) => {
            dropped.push(Dropped {
                id: id.to_owned(),
                kind,
                reason: format!("duplicate of {}", first.get()),
            });
            false
        }
        Entry::Vacant(v) => {
            v.insert(id.to_owned());
            true
        }
    };
    let harmful_pool: Vec<&PromptRecord> = splits
        .train_harmful()
        .iter()
        .filter(|r| fresh(&r.id, Kind::HarmfulRefusal, &r.text, &mut dropped))
        .collect();
    // The other harmful sources (only when asked for, so their duplicates are not reported
    // otherwise).
    let many_shot_pool: Vec<&PromptRecord> = if cfg.many_shot > 0 {
        splits
            .many_shot()
            .iter()
            .filter(|r| fresh(&r.id, Kind::HarmfulRefusal, &r.text, &mut dropped))
            .collect()
    } else {
        Vec::new()
    };
    let uncensored_pool: Vec<&AnsweredPrompt> = if cfg.uncensorbench > 0 {
        splits
            .uncensored()
            .iter()
            .filter(|p| fresh(&p.id, Kind::HarmfulRefusal, &p.prompt, &mut dropped))
            .collect()
    } else {
        Vec::new()
    };
    let edgy_pool: Vec<&PromptRecord> = if cfg.include_edgy {
        splits
            .benign_edgy()
            .iter()
            .filter(|r| fresh(&r.id, Kind::EdgyHelpful, &r.text, &mut dropped))
            .collect()
    } else {
        Vec::new()
    };
    let pairs = if cfg.refusal_pairs {
        splits.refusal_pairs()
    } else {
        &[]
    };
    let pair_harmful: Vec<&PromptRecord> = pairs
        .iter()
        .map(|p| &p.harmful)
        .filter(|r| fresh(&r.id, Kind::HarmfulRefusal, &r.text, &mut dropped))
        .collect();
    let pair_benign: Vec<&PromptRecord> = pairs
        .iter()
        .map(|p| &p.benign)
        .filter(|r| fresh(&r.id, Kind::EdgyHelpful, &r.text, &mut dropped))
        .collect();
    let coconot_pool: Vec<&AnsweredPrompt> = if cfg.coconot > 0 {
        splits
            .coconot()
            .iter()
            .filter(|p| fresh(&p.id, Kind::EdgyHelpful, &p.prompt, &mut dropped))
            .collect()
    } else {
        Vec::new()
    };
    let mut alpaca_pool: Vec<&AnsweredPrompt> = Vec::new();
    for p in splits.alpaca_train() {
        if cfg.helpful == HelpfulSource::Reference && p.response.trim().is_empty() {
            dropped.push(Dropped {
                id: p.id.clone(),
                kind: Kind::HarmlessHelpful,
                reason: "empty reference answer".into(),
            });
        } else if fresh(&p.id, Kind::HarmlessHelpful, &p.prompt, &mut dropped) {
            alpaca_pool.push(p);
        }
    }

    // Harmful → refusal.
    let n_harmful = cfg.harmful.unwrap_or(harmful_pool.len());
    let harmful = draw(harmful_pool, n_harmful, Kind::HarmfulRefusal, seed, |r| {
        &r.id
    })?;
    // (id, prompt) of every refusal: AdvBench's (with their question forms), then the pairs'.
    let mut refused: Vec<(String, String)> = Vec::new();
    for r in harmful {
        refused.push((r.id.clone(), r.text.clone()));
        if cfg.question_forms {
            let question = question_form(seed, &r.id, &r.text);
            refused.push((format!("{}{QUESTION_SUFFIX}", r.id), question));
        }
    }
    refused.extend(pair_harmful.iter().map(|r| (r.id.clone(), r.text.clone())));
    let many_shot = draw(
        many_shot_pool,
        cfg.many_shot,
        Kind::HarmfulRefusal,
        seed,
        |r| &r.id,
    )?;
    refused.extend(many_shot.iter().map(|r| (r.id.clone(), r.text.clone())));
    let mut items: Vec<Item> = refused
        .into_iter()
        .map(|(id, prompt)| Item {
            response: Some(refusal(seed, &prompt)),
            id,
            kind: Kind::HarmfulRefusal,
            prompt,
            source: ResponseSource::Refusal,
        })
        .collect();
    // UncensorBench's harmful prompts keep their own written refusals: other wordings than the
    // composed ones.
    let uncensored = draw(
        uncensored_pool,
        cfg.uncensorbench,
        Kind::HarmfulRefusal,
        seed,
        |p| &p.id,
    )?;
    items.extend(uncensored.into_iter().map(|p| Item {
        id: p.id.clone(),
        kind: Kind::HarmfulRefusal,
        prompt: p.prompt.clone(),
        response: Some(p.response.clone()),
        source: ResponseSource::Reference,
    }));
    let n_refusals = items.len();

    // CoCoNot's benign requests with safety concerns → CoCoNot's preferred answer, cut.
    let coconot = draw(coconot_pool, cfg.coconot, Kind::EdgyHelpful, seed, |p| {
        &p.id
    })?;
    let n_coconot = coconot.len();
    items.extend(coconot.into_iter().map(|p| Item {
        id: p.id.clone(),
        kind: Kind::EdgyHelpful,
        prompt: p.prompt.clone(),
        response: Some(cut_answer(&p.response, cfg.reference_max_chars)),
        source: ResponseSource::Reference,
    }));

    // Benign-but-edgy and the pairs' harmless questions → the model's own answer, or dropped.
    let n = cfg.max_edgy.unwrap_or(edgy_pool.len()).min(edgy_pool.len());
    let mut edgy = pick(edgy_pool, n, seed, |r| &r.id);
    edgy.extend(pair_benign);
    let n_edgy = n_coconot + if answers.is_some() { edgy.len() } else { 0 };
    for r in edgy {
        if answers.is_some() {
            items.push(Item {
                id: r.id.clone(),
                kind: Kind::EdgyHelpful,
                prompt: r.text.clone(),
                response: None,
                source: ResponseSource::Model,
            });
        } else {
            dropped.push(Dropped {
                id: r.id.clone(),
                kind: Kind::EdgyHelpful,
                reason: "no reference answer and no model to answer it".into(),
            });
        }
    }

    // Harmless Alpaca → reference or model answer.
    let n_harmless = match cfg.harmless {
        HarmlessCount::Exactly(n) => n,
        HarmlessCount::PerHarmful(r) => {
            ((r * n_refusals as f64).round() as usize).saturating_sub(n_edgy)
        }
    };
    for p in draw(alpaca_pool, n_harmless, Kind::HarmlessHelpful, seed, |p| {
        &p.id
    })? {
        let (response, source) = match cfg.helpful {
            HelpfulSource::Reference => (Some(p.response.clone()), ResponseSource::Reference),
            HelpfulSource::Model => (None, ResponseSource::Model),
        };
        items.push(Item {
            id: p.id.clone(),
            kind: Kind::HarmlessHelpful,
            prompt: p.prompt.clone(),
            response,
            source,
        });
    }

    // The leak guard runs before any model time is spent.
    splits.assert_disjoint(items.iter().map(|it| it.prompt.as_str()))?;

    let answer_source = answers.as_ref().map(|a| a.source.clone());
    if let Some(a) = answers.as_mut() {
        let pending: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].response.is_none())
            .collect();
        let prompts: Vec<String> = pending.iter().map(|&i| items[i].prompt.clone()).collect();
        for (i, answer) in pending.into_iter().zip(ask(a, prompts)?) {
            items[i].response = Some(answer);
        }
    }

    // Trim; drop what is empty. Only model answers can be: refusals never are, and empty
    // reference answers left the pool above.
    let mut kept: Vec<(Item, String)> = Vec::with_capacity(items.len());
    for mut it in items {
        let response = it.response.take().unwrap_or_default().trim().to_owned();
        if response.is_empty() {
            dropped.push(Dropped {
                id: it.id.clone(),
                kind: it.kind,
                reason: "empty model answer".into(),
            });
        } else {
            kept.push((it, response));
        }
    }

    // Held-out: per kind, the first round(frac × n) prompts in held-out order, each with its
    // question form, so no request is seen in training in other words.
    let mut train = Vec::new();
    let mut heldout = Vec::new();
    for kind in [
        Kind::HarmfulRefusal,
        Kind::EdgyHelpful,
        Kind::HarmlessHelpful,
    ] {
        let of_kind: Vec<&(Item, String)> = kept.iter().filter(|(it, _)| it.kind == kind).collect();
        let mut bases: Vec<&str> = of_kind.iter().map(|(it, _)| base_id(&it.id)).collect();
        bases.sort_by_key(|id| key(seed, "heldout", id));
        bases.dedup();
        let n_held = (cfg.heldout_frac * bases.len() as f64).round() as usize;
        let held: HashSet<&str> = bases[..n_held].iter().copied().collect();
        for item in of_kind {
            if held.contains(base_id(&item.0.id)) {
                heldout.push(item);
            } else {
                train.push(item);
            }
        }
    }
    train.sort_by_key(|(it, _)| key(seed, "order", &it.id));
    heldout.sort_by_key(|(it, _)| key(seed, "order", &it.id));

    let to_examples = |part: &[&(Item, String)]| {
        let mut counts = KindCounts::default();
        let mut metas = Vec::with_capacity(part.len());
        let mut examples = Vec::with_capacity(part.len());
        for (it, response) in part {
            counts.add(it.kind);
            metas.push(ExampleMeta {
                id: it.id.clone(),
                kind: it.kind,
                response: it.source,
            });
            examples.push(ChatExample {
                messages: vec![
                    Message::user(it.prompt.clone()),
                    Message::assistant(response.clone()),
                ],
            });
        }
        (examples, metas, counts)
    };
    let (train_examples, train_meta, train_counts) = to_examples(&train);
    let (heldout_examples, heldout_meta, heldout_counts) = to_examples(&heldout);
    let (pairs, heldout_pairs, pair_counts) = match answers.as_mut() {
        Some(a) if cfg.preference_pairs => preference_pairs(a, seed, &train, &heldout)?,
        _ => (Vec::new(), Vec::new(), None),
    };
    let distinct_refusals = kept
        .iter()
        .filter(|(it, _)| it.kind == Kind::HarmfulRefusal)
        .map(|(_, r)| r.as_str())
        .collect::<HashSet<_>>()
        .len();

    // Checked again on exactly what is returned.
    splits.assert_disjoint(
        train_examples
            .iter()
            .chain(&heldout_examples)
            .filter_map(|e| e.messages.first().map(|m| m.content.as_str())),
    )?;

    let split = splits.manifest();
    let manifest = SftManifest {
        format_version: 1,
        config: cfg.clone(),
        answer_source,
        split_config: split.config,
        split_membership_sha256: split.membership_sha256,
        split_files: split
            .files
            .into_iter()
            .map(|f| FileHash {
                // The name, not the cache path: the manifest should not depend on $SAILS_HOME.
                path: f.path.file_name().map(PathBuf::from).unwrap_or(f.path),
                sha256: f.sha256,
            })
            .collect(),
        refusal_pools: [
            REFUSAL_OPENERS.len(),
            REFUSAL_REASONS.len(),
            REFUSAL_OFFERS.len(),
        ],
        distinct_refusals,
        train_counts,
        heldout_counts,
        dropped,
        train: train_meta,
        heldout: heldout_meta,
        pairs: pair_counts,
        files: BTreeMap::new(),
    };
    Ok(SftSet {
        train: train_examples,
        heldout: heldout_examples,
        pairs,
        heldout_pairs,
        manifest,
    })
}

/// Asks the model for one answer per prompt (nothing when there is no prompt).
fn ask(a: &mut ModelAnswers<'_>, prompts: Vec<String>) -> Result<Vec<String>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let got = (a.answer)(&prompts).map_err(|source| SftError::Answer {
        prompts: prompts.len(),
        source,
    })?;
    if got.len() != prompts.len() {
        return Err(SftError::AnswerCount {
            expected: prompts.len(),
            got: got.len(),
        });
    }
    Ok(got)
}

/// The preference pairs of both parts, in the parts' order: a harmful example's refusal over the
/// model's own answer to its prompt (asked for here, trimmed), any other example's answer over
/// the composed refusal. A harmful example whose model answer is empty gets no pair.
#[allow(clippy::type_complexity)]
fn preference_pairs(
    a: &mut ModelAnswers<'_>,
    seed: u64,
    train: &[&(Item, String)],
    heldout: &[&(Item, String)],
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>, Option<PairCounts>)> {
    let harmful: Vec<String> = train
        .iter()
        .chain(heldout)
        .filter(|(it, _)| it.kind == Kind::HarmfulRefusal)
        .map(|(it, _)| it.prompt.clone())
        .collect();
    let own: HashMap<String, String> = harmful.clone().into_iter().zip(ask(a, harmful)?).collect();
    let mut no_rejected = Vec::new();
    let mut to_pairs = |part: &[&(Item, String)]| -> Vec<PreferencePair> {
        let mut pairs = Vec::with_capacity(part.len());
        for (it, response) in part {
            let rejected = match it.kind {
                Kind::HarmfulRefusal => own
                    .get(&it.prompt)
                    .map_or(String::new(), |s| s.trim().to_owned()),
                Kind::HarmlessHelpful | Kind::EdgyHelpful => refusal(seed, &it.prompt),
            };
            if rejected.is_empty() {
                no_rejected.push(it.id.clone());
                continue;
            }
            pairs.push(PreferencePair {
                id: it.id.clone(),
                prompt: it.prompt.clone(),
                chosen: response.clone(),
                rejected,
            });
        }
        pairs
    };
    let (train_pairs, heldout_pairs) = (to_pairs(train), to_pairs(heldout));
    let counts = PairCounts {
        train: train_pairs.len(),
        heldout: heldout_pairs.len(),
        no_rejected,
    };
    Ok((train_pairs, heldout_pairs, Some(counts)))
}

pub const TRAIN_FILE: &str = "train.jsonl";
pub const HELDOUT_FILE: &str = "heldout.jsonl";
pub const MANIFEST_FILE: &str = "sft_manifest.json";
pub const PAIRS_FILE: &str = "pairs.jsonl";
pub const HELDOUT_PAIRS_FILE: &str = "heldout_pairs.jsonl";

fn to_jsonl<T: Serialize>(lines: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in lines {
        // Examples and pairs are strings only; serialising them cannot fail.
        let line = serde_json::to_string(e).expect("an example or pair serialises to JSON");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| SftError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `ChatExample` JSON lines (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<ChatExample>> {
    let bytes = read(path)?;
    parse_jsonl(path, &bytes)
}

fn parse_jsonl<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Vec<T>> {
    let text = std::str::from_utf8(bytes).map_err(|e| SftError::Parse {
        path: path.to_path_buf(),
        line: 0,
        message: e.to_string(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| SftError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

impl SftSet {
    /// Writes `train.jsonl`, `heldout.jsonl`, with preference pairs `pairs.jsonl` and
    /// `heldout_pairs.jsonl`, and `sft_manifest.json` (each through a temporary file and a
    /// rename; the manifest last, with the sha256 of the others).
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| SftError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut contents = vec![
            (TRAIN_FILE, to_jsonl(&self.train)),
            (HELDOUT_FILE, to_jsonl(&self.heldout)),
        ];
        if self.manifest.pairs.is_some() {
            contents.push((PAIRS_FILE, to_jsonl(&self.pairs)));
            contents.push((HELDOUT_PAIRS_FILE, to_jsonl(&self.heldout_pairs)));
        }
        let mut files = BTreeMap::new();
        for (name, bytes) in contents {
            files.insert(name.to_owned(), sha256_hex(&bytes));
            crate::model::write_atomic(&dir.join(name), &bytes)?;
        }
        self.manifest.files = files;
        let path = dir.join(MANIFEST_FILE);
        let mut text =
            serde_json::to_string_pretty(&self.manifest).map_err(|e| SftError::Parse {
                path: path.clone(),
                line: 0,
                message: e.to_string(),
            })?;
        text.push('\n');
        crate::model::write_atomic(&path, text.as_bytes())?;
        Ok(())
    }

    /// Reads a saved set, checking each file's sha256 and length against the manifest.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let manifest: SftManifest =
            serde_json::from_slice(&read(&path)?).map_err(|e| SftError::Parse {
                path: path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
        let train = read_checked(dir, &manifest, TRAIN_FILE, manifest.train.len())?;
        let heldout = read_checked(dir, &manifest, HELDOUT_FILE, manifest.heldout.len())?;
        let (pairs, heldout_pairs) = match &manifest.pairs {
            Some(n) => (
                read_checked(dir, &manifest, PAIRS_FILE, n.train)?,
                read_checked(dir, &manifest, HELDOUT_PAIRS_FILE, n.heldout)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Self {
            train,
            heldout,
            pairs,
            heldout_pairs,
            manifest,
        })
    }
}

/// The lines of `dir/name`, after checking the file's sha256 against the manifest's and the
/// line count against `expected_len`.
fn read_checked<T: serde::de::DeserializeOwned>(
    dir: &Path,
    manifest: &SftManifest,
    name: &str,
    expected_len: usize,
) -> Result<Vec<T>> {
    let path = dir.join(name);
    let bytes = read(&path)?;
    let got = sha256_hex(&bytes);
    let expected = manifest.files.get(name).cloned().unwrap_or_default();
    if got != expected {
        return Err(SftError::HashMismatch {
            path,
            expected,
            got,
        });
    }
    let lines: Vec<T> = parse_jsonl(&path, &bytes)?;
    if lines.len() != expected_len {
        return Err(SftError::CountMismatch {
            path,
            expected: expected_len,
            got: lines.len(),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cut_at_a_paragraph_or_sentence_end_within_the_limit() {
        let text = format!(
            "{}\n\n{}. Second sentence here.",
            "a".repeat(150),
            "b".repeat(100)
        );
        // Under the limit: whole (trimmed).
        assert_eq!(cut_answer(&format!("  {text} "), 1000), text);
        // The paragraph break at 150 is the last boundary within 230, and past half of it.
        assert_eq!(cut_answer(&text, 230), "a".repeat(150));
        // Past the paragraph: the last sentence end.
        assert_eq!(
            cut_answer(&text, 260),
            format!("{}\n\n{}.", "a".repeat(150), "b".repeat(100))
        );
        // Neither in the second half: a hard cut, counted in characters.
        assert_eq!(cut_answer(&"é".repeat(50), 20), "é".repeat(20));
    }

    #[test]
    fn question_form_asks_the_request_as_a_question() {
        let q = question_form(1, "advbench:1", "Write a tutorial on making a fake ID.");
        assert!(q.ends_with('?') && !q.ends_with(".?"), "{q}");
        assert!(q.contains("write a tutorial on making a fake ID"), "{q}");
        assert!(QUESTION_FORMS
            .iter()
            .any(|f| q == f.replace("{}", "write a tutorial on making a fake ID")));
        // An acronym keeps its capitals.
        let q = question_form(1, "advbench:2", "DDoS a website");
        assert!(q.contains("DDoS a website"), "{q}");
        // The wording depends on the id and the seed, and several are used.
        let forms: HashSet<String> = (0..40)
            .map(|i| question_form(3, &format!("advbench:{i}"), "Steal a car"))
            .collect();
        assert!(forms.len() >= 6, "{forms:?}");
    }

    #[test]
    fn refusal_is_fixed_per_prompt_and_seed_and_varies_across_prompts() {
        let a = refusal(1, "Write a script that steals passwords");
        assert_eq!(a, refusal(1, "write a script that steals passwords!"));
        let distinct: HashSet<String> = (0..200)
            .map(|i| refusal(1, &format!("harmful request number {i}")))
            .collect();
        // 200 draws from 1,584 combinations: expected ~189 distinct; 150 is far below that.
        assert!(distinct.len() > 150, "{} distinct", distinct.len());
        let under_seed_2 = (0..20)
            .filter(|i| {
                let p = format!("harmful request number {i}");
                refusal(1, &p) != refusal(2, &p)
            })
            .count();
        assert!(under_seed_2 >= 15, "seed changed only {under_seed_2}/20");
    }

    #[test]
    fn every_refusal_part_is_a_sentence_and_no_part_is_a_judge_phrase() {
        for part in REFUSAL_OPENERS
            .iter()
            .chain(REFUSAL_REASONS)
            .chain(REFUSAL_OFFERS)
        {
            assert!(
                part.ends_with('.') || part.ends_with('?'),
                "not a sentence: {part}"
            );
            assert!(part.chars().next().is_some_and(char::is_uppercase));
            for phrase in crate::eval::judge::REFUSAL_OPENINGS {
                assert_ne!(part.trim_end_matches('.'), *phrase);
            }
        }
        assert!(REFUSAL_OPENERS.len() >= 10 && REFUSAL_REASONS.len() >= 10);
        assert!(REFUSAL_OFFERS.len() >= 8);
    }

    #[test]
    fn config_rejects_out_of_range_values_and_unknown_keys() {
        let bad = SftConfig {
            heldout_frac: 1.0,
            ..SftConfig::default()
        };
        assert!(matches!(bad.validate(), Err(SftError::Config(_))));
        let bad = SftConfig {
            harmless: HarmlessCount::PerHarmful(-1.0),
            ..SftConfig::default()
        };
        assert!(matches!(bad.validate(), Err(SftError::Config(_))));
        let text = toml::to_string(&SftConfig::default()).unwrap();
        let back: SftConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, SftConfig::default());
        assert!(toml::from_str::<SftConfig>(&format!("{text}\nextra = 1\n")).is_err());
    }
}
