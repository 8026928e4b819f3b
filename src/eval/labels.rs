//! Human-labelled responses from several independent sources, for checking judges on responses
//! they were not tuned on. Each source says what its people judged: whether the response refused
//! (fully or partly), whether it gave the harmful help asked for, or both.
//!
//! | source | refusal | harmful | what |
//! |---|---|---|---|
//! | `pyrit-refusal` | yes | – | PyRIT's refusal scorer sets |
//! | `pyrit-objective` | – | yes | PyRIT's "objective achieved" sets, 14 harm categories |
//! | `jbb-judge-comparison` | – | yes | JailbreakBench's judge comparison, human majority of three |
//! | `uncensorbench` | yes | yes | a written refusal and a complying answer per harmful prompt |
//! | `coconot` | yes | yes | CoCoNot's preferred (compliant, harmless) answers to benign requests with safety concerns |
//! | `smollm2` | yes | yes | this project's own models' responses, labelled by reading them (`data/judge/`) |

use super::{EvalError, Result};
use crate::data::{COCONOT_REFUSALS, COCONOT_SAFETY};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a labelled response comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelSource {
    PyritRefusal,
    PyritObjective,
    JbbJudgeComparison,
    #[serde(rename = "uncensorbench")]
    UncensorBench,
    Coconot,
    Smollm2,
}

impl LabelSource {
    pub const ALL: [LabelSource; 6] = [
        LabelSource::PyritRefusal,
        LabelSource::PyritObjective,
        LabelSource::JbbJudgeComparison,
        LabelSource::UncensorBench,
        LabelSource::Coconot,
        LabelSource::Smollm2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LabelSource::PyritRefusal => "pyrit-refusal",
            LabelSource::PyritObjective => "pyrit-objective",
            LabelSource::JbbJudgeComparison => "jbb-judge-comparison",
            LabelSource::UncensorBench => "uncensorbench",
            LabelSource::Coconot => "coconot",
            LabelSource::Smollm2 => "smollm2",
        }
    }
}

/// One response with what people said of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledResponse {
    pub source: LabelSource,
    /// Unique within the source, e.g. `refusal.csv:12`, `cyber_001:refusal`.
    pub id: String,
    pub prompt: String,
    pub response: String,
    /// Refused, fully or partly; `None` where the source does not say.
    pub refusal: Option<bool>,
    /// Gave the harmful help asked for; `None` where the source does not say.
    pub harmful: Option<bool>,
    /// Empty, looping or not language; `None` where the source does not say.
    pub degenerate: Option<bool>,
    /// Answers a request other than the one asked: true for the made pairs of
    /// [`crate::eval::probe::off_topic_pairs`], false for a compliant answer to its own request,
    /// `None` otherwise.
    #[serde(default)]
    pub off_topic: Option<bool>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(super::io_err(path))
}

fn parse_err(path: &Path, message: impl Into<String>) -> EvalError {
    EvalError::Parse {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// A 0/1 human score as a label.
fn binary(path: &Path, row: usize, column: &str, value: &str) -> Result<bool> {
    match value.trim() {
        "1" | "1.0" => Ok(true),
        "0" | "0.0" => Ok(false),
        other => Err(parse_err(
            path,
            format!("row {row}: {column} {other:?}, expected 0 or 1"),
        )),
    }
}

/// PyRIT's scorer-evaluation CSVs (`#` lines skipped): `objective`, `assistant_response` and a 0/1
/// `human_score` column, whose meaning the caller gives (refusal, or objective achieved).
fn load_pyrit(
    paths: &[PathBuf],
    source: LabelSource,
    label: fn(bool) -> (Option<bool>, Option<bool>),
) -> Result<Vec<LabelledResponse>> {
    let mut out = Vec::new();
    for path in paths {
        let rows = crate::data::parse_csv(&read(path)?, path, true)?;
        let col = |name: &str| rows.column(name, path).map_err(EvalError::from);
        let (o, r, h) = (
            col("objective")?,
            col("assistant_response")?,
            col("human_score")?,
        );
        for (i, row) in rows.rows.iter().enumerate() {
            let (refusal, harmful) = label(binary(path, i + 1, "human_score", &row[h])?);
            out.push(LabelledResponse {
                source,
                id: format!("{}:{}", file_name(path), i + 1),
                prompt: row[o].clone(),
                response: row[r].clone(),
                refusal,
                harmful,
                degenerate: None,
                off_topic: None,
            });
        }
    }
    Ok(out)
}

/// PyRIT's refusal sets: human_score 1 = the response refuses.
pub fn load_pyrit_refusal(paths: &[PathBuf]) -> Result<Vec<LabelledResponse>> {
    load_pyrit(paths, LabelSource::PyritRefusal, |refused| {
        (Some(refused), None)
    })
}

/// PyRIT's objective sets: human_score 1 = the response achieves the harmful objective.
pub fn load_pyrit_objective(paths: &[PathBuf]) -> Result<Vec<LabelledResponse>> {
    load_pyrit(paths, LabelSource::PyritObjective, |achieved| {
        (None, Some(achieved))
    })
}

/// JailbreakBench's judge comparison: the behaviour (`goal`) is the prompt a judge is asked about;
/// `human_majority` 1 = jailbroken, i.e. the response gives the harmful help.
pub fn load_jbb_comparison(path: &Path) -> Result<Vec<LabelledResponse>> {
    let rows = crate::data::parse_csv(&read(path)?, path, false)?;
    let col = |name: &str| rows.column(name, path).map_err(EvalError::from);
    let (g, r, h) = (
        col("goal")?,
        col("target_response")?,
        col("human_majority")?,
    );
    rows.rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            Ok(LabelledResponse {
                source: LabelSource::JbbJudgeComparison,
                id: format!("jbb-judge:{i}"),
                prompt: row[g].clone(),
                response: row[r].trim().to_owned(),
                refusal: None,
                harmful: Some(binary(path, i + 1, "human_majority", &row[h])?),
                degenerate: None,
                off_topic: None,
            })
        })
        .collect()
}

/// UncensorBench: each harmful prompt's written refusal (refused, harmless) and complying answer
/// (not refused, harmful).
pub fn load_uncensorbench(path: &Path) -> Result<Vec<LabelledResponse>> {
    let mut out = Vec::new();
    for p in crate::data::load_uncensorbench(path)? {
        for (kind, response, refused) in [
            ("refusal", p.censored_response, true),
            ("answer", p.uncensored_response, false),
        ] {
            out.push(LabelledResponse {
                source: LabelSource::UncensorBench,
                id: format!("{}:{kind}", p.id),
                prompt: p.prompt.clone(),
                response,
                refusal: Some(refused),
                harmful: Some(!refused),
                degenerate: Some(false),
                off_topic: None,
            });
        }
    }
    Ok(out)
}

/// CoCoNot: the preferred (`chosen`) answer to each benign request with safety concerns, harmless
/// and compliant except the [`COCONOT_REFUSALS`]. The other categories' preferred answers ask for
/// clarification or decline an impossible task, and the `rejected` answers are not uniformly
/// refusals, so neither is used as a label here.
pub fn load_coconot(path: &Path) -> Result<Vec<LabelledResponse>> {
    Ok(crate::data::load_coconot(path)?
        .into_iter()
        .filter(|row| row.category == COCONOT_SAFETY)
        .map(|row| LabelledResponse {
            source: LabelSource::Coconot,
            refusal: Some(COCONOT_REFUSALS.contains(&row.id.as_str())),
            id: format!("coconot:{}", row.id),
            prompt: row.prompt,
            response: row.chosen,
            harmful: Some(false),
            degenerate: Some(false),
            off_topic: None,
        })
        .collect())
}

/// One line of the hand labels (a `note` field, for people, is not read).
#[derive(Deserialize)]
struct HandLabel {
    id: String,
    model: String,
    prompt: String,
    response: String,
    refusal: String,
    degenerate: bool,
    harm: u8,
}

/// The project's hand labels (`data/judge/smollm2_responses.jsonl`, rules in `LABELLING.md`):
/// refusal `full` or `partial` counts as refused, harm ≥ 3 as harmful.
pub fn load_hand_labels(path: &Path) -> Result<Vec<LabelledResponse>> {
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| parse_err(path, format!("line {}: {m}", i + 1));
        let h: HandLabel = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let refusal = match h.refusal.as_str() {
            "full" | "partial" => true,
            "none" => false,
            other => {
                return Err(bad(format!(
                    "refusal {other:?}, expected full, partial or none"
                )))
            }
        };
        if !(1..=5).contains(&h.harm) {
            return Err(bad(format!("harm {}, expected 1 to 5", h.harm)));
        }
        out.push(LabelledResponse {
            source: LabelSource::Smollm2,
            id: format!("{}:{}", h.model, h.id),
            prompt: h.prompt,
            response: h.response,
            refusal: Some(refusal),
            harmful: Some(h.harm >= 3),
            degenerate: Some(h.degenerate),
            off_topic: None,
        });
    }
    Ok(out)
}

/// The assets [`load_all`] reads.
pub const LABEL_ASSETS: [&str; 6] = [
    "pyrit-refusal",
    "pyrit-objective",
    "jbb-judge-comparison",
    "uncensorbench",
    "coconot",
    "smollm2-hand-labels",
];

/// Every source, from the asset cache (fetched on first use).
pub fn load_all() -> Result<Vec<LabelledResponse>> {
    use crate::assets::{ensure, ensure_all, ensure_file};
    let mut out = load_pyrit_refusal(&ensure_all("pyrit-refusal")?.files)?;
    out.extend(load_pyrit_objective(&ensure_all("pyrit-objective")?.files)?);
    out.extend(load_jbb_comparison(&ensure("jbb-judge-comparison")?)?);
    out.extend(load_uncensorbench(&ensure_file(
        "uncensorbench",
        "prompts.json",
    )?)?);
    out.extend(load_coconot(&ensure_file(
        "coconot",
        "coconot_pref.jsonl",
    )?)?);
    out.extend(load_hand_labels(&ensure_file(
        "smollm2-hand-labels",
        "smollm2_responses.jsonl",
    )?)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_are_their_json_names() {
        for s in LabelSource::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }
}
