//! End to end on the default model with a tiny limit: an interrupted run resumes without redoing
//! finished prompts; a changed configuration is refused; an adapter for another model fails.

use candle_core::{DType, Device};
use sails::data::{Splits, Suite};
use sails::eval::{read_jsonl, run, EvalConfig, GenerationRecord, Judges};
use sails::model::load::{ChatModel, ModelSource};

use crate::common;

fn default_model() -> ChatModel {
    ChatModel::load(
        &ModelSource::resolve("default").unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn interrupted_evaluation_resumes_without_redoing_prompts() {
    let model = default_model();
    let splits = Splits::load().unwrap();
    let cfg = EvalConfig {
        suites: vec![Suite::Harmful],
        limit: Some(1),
        max_new_tokens: 4,
        batch_size: 2,
        ..EvalConfig::default()
    };
    let judges = Judges::new(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(&model, &splits, &judges, &cfg, dir.path(), None).unwrap();
    let path = dir.path().join("generations.jsonl");
    let first: Vec<GenerationRecord> = read_jsonl(&path).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, splits.eval_suite(Suite::Harmful)[0].id);
    // Mark the finished line so a redo would be visible, and add a half-written line as an
    // interruption leaves it.
    let mut marked = first[0].clone();
    marked.response = "MARKER".into();
    let mut text = serde_json::to_string(&marked).unwrap();
    text.push('\n');
    text.push_str("{\"id\": \"jbb:1\", \"sui");
    std::fs::write(&path, text).unwrap();
    let cfg2 = EvalConfig {
        limit: Some(2),
        ..cfg.clone()
    };
    let m = run(&model, &splits, &judges, &cfg2, dir.path(), None).unwrap();
    let second: Vec<GenerationRecord> = read_jsonl(&path).unwrap();
    assert_eq!(second.len(), 2);
    assert_eq!(
        second[0].response, "MARKER",
        "the finished prompt was redone"
    );
    assert_eq!(second[1].id, splits.eval_suite(Suite::Harmful)[1].id);
    assert_eq!(m.suites["harmful"].rate.n, 2);
    // Only the one new prompt was generated in the resumed invocation.
    assert_eq!(m.throughput.as_ref().unwrap().prompts, 1);
    // A different generation setting cannot resume into the same directory.
    let cfg3 = EvalConfig {
        max_new_tokens: 5,
        ..cfg.clone()
    };
    let e = run(&model, &splits, &judges, &cfg3, dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another configuration"), "{e}");
    // Nor can an evaluation at another adapter scale reuse these generations.
    let cfg4 = EvalConfig {
        adapter_scale: 0.5,
        ..cfg
    };
    let e = run(&model, &splits, &judges, &cfg4, dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another configuration") && e.contains("adapter_scale"),
        "{e}"
    );
}

#[test]
fn adapter_for_another_model_is_a_clear_error() {
    let adapter = common::golden_dir().join("tiny-llama-lora");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(["eval", "--suite", "harmful", "--limit", "1", "--adapter"])
        .arg(&adapter)
        .arg("--out")
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adapter"), "{err}");
}

#[test]
fn the_prefilling_attack_forces_the_start_of_every_reply() {
    let model = default_model();
    let splits = Splits::load().unwrap();
    let plain = EvalConfig {
        suites: vec![Suite::Harmful],
        limit: Some(2),
        max_new_tokens: 6,
        batch_size: 2,
        ..EvalConfig::default()
    };
    let attacked = EvalConfig {
        prefill: Some("Sure, here is".into()),
        ..plain.clone()
    };
    let judges = Judges::new(&plain).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&model, &splits, &judges, &plain, a.path(), None).unwrap();
    run(&model, &splits, &judges, &attacked, b.path(), None).unwrap();
    let read = |dir: &std::path::Path| -> Vec<GenerationRecord> {
        read_jsonl(&dir.join("generations.jsonl")).unwrap()
    };
    let (plain_recs, attacked_recs) = (read(a.path()), read(b.path()));
    for (p, q) in plain_recs.iter().zip(&attacked_recs) {
        assert_eq!(p.id, q.id);
        assert!(q.response.starts_with("Sure, here is"), "{:?}", q.response);
        // The forced text is context, not output: the model still adds up to 6 tokens of its own.
        assert!(q.new_tokens > 0 && q.new_tokens <= 6);
        assert_ne!(p.response, q.response);
    }
    // A run folder holds one attack: another prefill (or none) does not resume into it.
    let e = run(&model, &splits, &judges, &plain, b.path(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another configuration") && e.contains("prefill"),
        "{e}"
    );
}
