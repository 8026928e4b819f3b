//! One loader per data set file. Each checks the item count the pinned asset has, so a truncated
//! or different file fails loudly, naming the file.

use super::csv;
use super::{sha256_file, DataError, FileHash, PromptRecord, Result, Source, Split};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Paths of every data set file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFiles {
    pub advbench: PathBuf,
    pub harmbench_test: PathBuf,
    pub harmbench_val: PathBuf,
    pub strongreject: PathBuf,
    pub jbb: PathBuf,
    pub xstest: PathBuf,
    pub benign_edgy: Vec<PathBuf>,
    /// The contrast pairs' files (50 + 100 pairs).
    pub refusal_pairs: Vec<PathBuf>,
    pub alpaca: PathBuf,
    /// hhh_alignment `task.json` files.
    pub hhh: Vec<PathBuf>,
}

impl DataFiles {
    /// Resolves every file through the asset cache, fetching what is missing.
    pub fn from_assets() -> Result<Self> {
        use crate::assets::{ensure, ensure_all};
        Ok(Self {
            advbench: ensure("advbench")?,
            harmbench_test: ensure("harmbench-test")?,
            harmbench_val: ensure("harmbench-val")?,
            strongreject: ensure("strongreject")?,
            jbb: ensure("jbb-behaviors")?,
            xstest: crate::assets::ensure_file("xstest", "xstest_prompts.csv")?,
            benign_edgy: ensure_all("benign-edgy")?.files,
            refusal_pairs: ensure_all("refusal-pairs")?.files,
            alpaca: ensure("alpaca-gpt4-demo")?,
            hhh: ensure_all("bbh-hhh-alignment")?.files,
        })
    }

    fn all(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![
            &self.advbench,
            &self.harmbench_test,
            &self.harmbench_val,
            &self.strongreject,
            &self.jbb,
            &self.xstest,
            &self.alpaca,
        ];
        v.extend(self.benign_edgy.iter().map(PathBuf::as_path));
        v.extend(self.refusal_pairs.iter().map(PathBuf::as_path));
        v.extend(self.hhh.iter().map(PathBuf::as_path));
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
pub struct AlpacaPair {
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
pub fn load_alpaca(path: &Path) -> Result<Vec<AlpacaPair>> {
    let rows: Vec<AlpacaRow> =
        serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
    expect_count(path, 999, rows.len())?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| AlpacaPair {
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
    /// The hhh_alignment task (harmless, helpful, honest, other).
    pub category: String,
    pub input: String,
    pub choices: Vec<String>,
    pub correct: usize,
    pub split: Split,
}

#[derive(Deserialize)]
struct HhhTask {
    examples: Vec<HhhExample>,
}

#[derive(Deserialize)]
struct HhhExample {
    input: String,
    target_scores: serde_json::Map<String, serde_json::Value>,
}

/// BIG-bench hhh_alignment (221 items over four `task.json` files, named by their folder).
pub fn load_hhh(paths: &[PathBuf]) -> Result<Vec<ChoiceItem>> {
    let mut out = Vec::new();
    for path in paths {
        let task = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|s| s.to_str())
            .ok_or_else(|| parse_err(path, "cannot name the task from the folder"))?
            .to_owned();
        let t: HhhTask =
            serde_json::from_str(&read(path)?).map_err(|e| parse_err(path, e.to_string()))?;
        for (i, ex) in t.examples.into_iter().enumerate() {
            let mut choices = Vec::new();
            let mut correct = Vec::new();
            for (k, (text, score)) in ex.target_scores.into_iter().enumerate() {
                let s = score.as_f64().ok_or_else(|| {
                    parse_err(path, format!("example {i}: non-numeric target score"))
                })?;
                if s == 1.0 {
                    correct.push(k);
                }
                choices.push(text);
            }
            if choices.len() != 2 || correct.len() != 1 {
                return Err(parse_err(
                    path,
                    format!(
                        "example {i}: expected two choices, one scored 1 (got {} choices, {} correct)",
                        choices.len(),
                        correct.len()
                    ),
                ));
            }
            out.push(ChoiceItem {
                id: format!("hhh:{task}:{i}"),
                category: task.clone(),
                input: ex.input,
                choices,
                correct: correct[0],
                split: Split::Eval,
            });
        }
    }
    if let Some(p) = paths.first() {
        expect_count(p, 221, out.len())?;
    }
    Ok(out)
}
