//! Judging responses from anywhere: a JSONL file of `{"prompt": …, "response": …}` lines (any
//! other fields are kept) gets each judge's verdict per line, and the label the evaluation would
//! count (degeneracy first, then the refusal vote and the off-topic judge), so responses of any
//! model can be scored, and the judges checked against labels this project does not have.

use super::judge::{
    combined, learned_verdicts, Judge, JudgeInput, Label, OffTopicJudge, Verdict, VoteJudge,
};
use super::LearnedInputs;
use super::{EvalError, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// One judged line: the input object with `verdicts` (judge name → verdict) and `label` added.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredLine {
    /// 1-based line number in the input.
    pub line: usize,
    pub label: Label,
    pub verdicts: BTreeMap<String, Verdict>,
    /// The input object with the two fields added.
    pub output: Map<String, Value>,
}

/// The learned judges (the refusal vote, the off-topic judge) and how to compute their inputs
/// for `(prompt, response)` pairs, in order ([`super::JudgeModel::inputs`]).
pub type Learned<'a> = (
    &'a VoteJudge,
    &'a OffTopicJudge,
    &'a dyn Fn(&[(&str, &str)]) -> Result<Vec<LearnedInputs>>,
);

/// Judges every non-blank line of `text` (read from `path`, named in errors). `degeneracy` and
/// the learned judges decide the label when given (else `refusal`, the phrase list, does);
/// `refusal` and `others` add their verdicts. A line that is not a JSON object
/// with string `prompt` and `response` fields, or that already has a `verdicts` or `label` field,
/// is an error naming the line; nothing is judged until every line has been read.
pub fn score_jsonl(
    path: &Path,
    text: &str,
    degeneracy: &dyn Judge,
    refusal: &dyn Judge,
    learned: Option<Learned<'_>>,
    others: &[&dyn Judge],
) -> Result<Vec<ScoredLine>> {
    let bad = |line: usize, message: String| EvalError::Parse {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    };
    let mut objects = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(raw).map_err(|e| bad(line, format!("not JSON ({e})")))?;
        let Value::Object(object) = value else {
            return Err(bad(line, "expected a JSON object".into()));
        };
        for field in ["prompt", "response"] {
            if !object.get(field).is_some_and(Value::is_string) {
                return Err(bad(line, format!("needs a string field \"{field}\"")));
            }
        }
        for field in ["verdicts", "label"] {
            if object.contains_key(field) {
                return Err(bad(
                    line,
                    format!("already has a \"{field}\" field, which the output would overwrite"),
                ));
            }
        }
        objects.push((line, object));
    }
    let inputs = match learned {
        Some((_, _, compute)) => {
            let text_of = |o: &Map<String, Value>, f: &str| {
                o.get(f).and_then(Value::as_str).unwrap_or("").to_owned()
            };
            let owned: Vec<(String, String)> = objects
                .iter()
                .map(|(_, o)| (text_of(o, "prompt"), text_of(o, "response")))
                .collect();
            let pairs: Vec<(&str, &str)> = owned
                .iter()
                .map(|(p, r)| (p.as_str(), r.as_str()))
                .collect();
            compute(&pairs)?
        }
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(objects.len());
    for (line, mut object) in objects {
        let text_of = |field: &str| object.get(field).and_then(Value::as_str).unwrap_or("");
        let input = JudgeInput {
            prompt: text_of("prompt"),
            response: text_of("response"),
            refusal_logodds: None,
            prompt_pmi: None,
            refusal_probe: None,
        };
        let degenerate = degeneracy.judge(&input)?;
        let refused = refusal.judge(&input)?;
        let mut verdicts = BTreeMap::new();
        let label = match learned {
            Some((vote, off_topic, _)) => {
                let l = inputs.get(out.len());
                let input = JudgeInput {
                    prompt_pmi: l.and_then(|l| l.prompt_pmi),
                    refusal_probe: l.and_then(|l| l.refusal_probe),
                    ..input
                };
                let (vote_verdict, either) = learned_verdicts(vote, off_topic, &input)?;
                let label = combined(&degenerate, &vote_verdict, Some(&either));
                verdicts.insert(format!("{}|{}", vote.name(), off_topic.name()), either);
                verdicts.insert(vote.name(), vote_verdict);
                label
            }
            None => combined(&degenerate, &refused, None),
        };
        for judge in others {
            verdicts.insert(judge.name(), judge.judge(&input)?);
        }
        verdicts.insert(degeneracy.name(), degenerate);
        verdicts.insert(refusal.name(), refused);
        let write_err = |e: serde_json::Error| bad(line, format!("cannot write the verdict: {e}"));
        object.insert(
            "verdicts".into(),
            serde_json::to_value(&verdicts).map_err(write_err)?,
        );
        object.insert(
            "label".into(),
            serde_json::to_value(label).map_err(write_err)?,
        );
        out.push(ScoredLine {
            line,
            label,
            verdicts,
            output: object,
        });
    }
    Ok(out)
}
