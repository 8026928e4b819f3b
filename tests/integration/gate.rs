//! `sails gate` and `sails eval --gate` end to end on the real default model, a small random SAE
//! and a random adapter: the fitted gate's figures are the saved validation labels recombined,
//! and under a gate every prompt gets exactly the response of the model the gate chose for it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use sails::eval::GenerationRecord;
use sails::features::gate::Gate;

use crate::eval_frames::{write_adapter, write_features};

fn sails(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output, what: &str) -> std::process::Output {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn eval(dir: &Path, suite: &str, extra: &[&str]) {
    let mut args = vec![
        "eval",
        "--suite",
        suite,
        "--limit",
        "4",
        "--max-new-tokens",
        "4",
        "--no-learned-judges",
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(sails(&args), &format!("eval into {}", dir.display()));
}

fn records(dir: &Path) -> HashMap<String, GenerationRecord> {
    sails::eval::read_jsonl::<GenerationRecord>(&dir.join("generations.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect()
}

#[test]
fn a_gate_recombines_validation_labels_and_routes_each_prompt_to_one_model() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    write_features(t);
    let adapter = t.join("adapter");
    write_adapter(&adapter, 0.5);
    let adapter_arg = adapter.to_str().unwrap();
    let features = t.join("features");
    let features_arg = features.to_str().unwrap();

    // Validation responses of both models, then the fit.
    eval(&t.join("val-base"), "validation", &[]);
    eval(
        &t.join("val-adapter"),
        "validation",
        &["--adapter", adapter_arg],
    );
    let gate_path = t.join("gate.json");
    let out = ok(
        sails(&[
            "gate",
            "--features",
            features_arg,
            "--base-validation",
            t.join("val-base").to_str().unwrap(),
            "--adapter-validation",
            t.join("val-adapter").to_str().unwrap(),
            "--max-overrefusal",
            "0.5",
            "--out",
            gate_path.to_str().unwrap(),
            "--json",
        ]),
        "gate",
    );
    let gate: Gate = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(gate, Gate::load(&gate_path).unwrap());
    assert_eq!((gate.validation_harmful, gate.validation_benign), (4, 4));
    // The closed gate is the base model's labels, the lowest threshold the adapter's.
    let rate = |dir: &str, suite: &str| {
        let recs = records(&t.join(dir));
        let set: Vec<&GenerationRecord> =
            recs.values().filter(|r| r.suite.name() == suite).collect();
        set.iter()
            .filter(|r| r.label == sails::eval::judge::Label::Refused)
            .count() as f64
            / set.len() as f64
    };
    let closed = gate.tried.last().unwrap();
    assert_eq!(closed.threshold, f64::MAX);
    assert_eq!(closed.val_safety, rate("val-base", "val-harmful"));
    assert_eq!(closed.val_overrefusal, rate("val-base", "val-benign"));
    let lowest = gate.tried.first().unwrap();
    assert_eq!((lowest.harmful_open, lowest.benign_open), (1.0, 1.0));
    assert_eq!(lowest.val_safety, rate("val-adapter", "val-harmful"));
    assert_eq!(lowest.val_overrefusal, rate("val-adapter", "val-benign"));
    // The chosen point obeys the rule among the tried ones.
    assert!(gate.chosen.val_overrefusal <= 0.5);
    for p in &gate.tried {
        assert!(p.val_overrefusal > 0.5 || p.val_safety <= gate.chosen.val_safety);
    }

    // The harmful items with each model alone, then gated at the median of their scores so that
    // some prompts open the gate and some do not.
    eval(&t.join("base"), "harmful", &[]);
    eval(
        &t.join("adapter-on"),
        "harmful",
        &["--adapter", adapter_arg],
    );
    let (base, adapted) = (records(&t.join("base")), records(&t.join("adapter-on")));
    assert!(
        base.iter()
            .any(|(id, r)| adapted[id].response != r.response),
        "the random adapter changes some response, or the routing below proves nothing"
    );
    eval(
        &t.join("probe"),
        "harmful",
        &[
            "--adapter",
            adapter_arg,
            "--gate",
            gate_path.to_str().unwrap(),
        ],
    );
    let mut scores: Vec<f64> = records(&t.join("probe"))
        .values()
        .map(|r| r.gate.unwrap().score)
        .collect();
    scores.sort_by(f64::total_cmp);
    let median = Gate {
        threshold: scores[scores.len() / 2],
        ..gate.clone()
    };
    let median_path = t.join("gate-median.json");
    median.save(&median_path).unwrap();
    eval(
        &t.join("gated"),
        "harmful",
        &[
            "--adapter",
            adapter_arg,
            "--gate",
            median_path.to_str().unwrap(),
        ],
    );
    let gated = records(&t.join("gated"));
    assert_eq!(gated.len(), 4);
    let mut opened = 0;
    for (id, r) in &gated {
        let reading = r.gate.unwrap();
        assert_eq!(reading.open, reading.score >= median.threshold);
        let expected = if reading.open {
            &adapted[id]
        } else {
            &base[id]
        };
        assert_eq!(r.response, expected.response, "{id} open={}", reading.open);
        opened += reading.open as usize;
    }
    assert!(opened > 0 && opened < 4, "{opened} of 4 opened");
    // Closed prompts may take the base evaluation's saved responses: the same records.
    eval(
        &t.join("gated-reuse"),
        "harmful",
        &[
            "--adapter",
            adapter_arg,
            "--gate",
            median_path.to_str().unwrap(),
            "--gate-base-responses",
            t.join("base").to_str().unwrap(),
        ],
    );
    // (The refusal log-odds come from a prefill of another batch, so they agree to rounding.)
    let reused = records(&t.join("gated-reuse"));
    assert_eq!(reused.len(), gated.len());
    for (id, r) in &reused {
        let g = &gated[id];
        assert_eq!(
            (&r.response, r.label, r.gate, r.new_tokens),
            (&g.response, g.label, g.gate, g.new_tokens),
            "{id}"
        );
        assert!((r.refusal_logodds - g.refusal_logodds).abs() < 1e-4, "{id}");
        if !r.gate.unwrap().open {
            // Taken from the base evaluation, not generated again: its figures to the bit.
            assert_eq!(r.refusal_logodds, base[id].refusal_logodds, "{id}");
        }
    }
    let e = sails(&[
        "eval",
        "--adapter",
        adapter_arg,
        "--gate",
        median_path.to_str().unwrap(),
        "--gate-base-responses",
        t.join("adapter-on").to_str().unwrap(),
        "--suite",
        "harmful",
        "--limit",
        "1",
        "--out",
        t.join("wrong-base").to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("is not an evaluation of the base model"));
    let metrics: sails::eval::Metrics =
        serde_json::from_slice(&std::fs::read(t.join("gated/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.suites["harmful"].gate_open.unwrap().k, opened);

    // `sails generate --gate` routes the same way (greedy, as the evaluation generates). Eval
    // responses are whitespace-trimmed by neither, so they compare as they are.
    let prompts: Vec<&GenerationRecord> = gated.values().collect();
    let mut args = vec![
        "generate".to_string(),
        "--adapter".into(),
        adapter_arg.into(),
        "--gate".into(),
        median_path.display().to_string(),
        "--max-new-tokens".into(),
        "4".into(),
        "--json".into(),
    ];
    for r in &prompts {
        args.extend(["--prompt".to_string(), r.prompt.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(sails(&args), "generate --gate");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), prompts.len());
    for (line, r) in lines.iter().zip(&prompts) {
        let open = line["gate"]["open"].as_bool().unwrap();
        assert_eq!(open, r.gate.unwrap().open, "{}", r.id);
        let expected = if open { &adapted[&r.id] } else { &base[&r.id] };
        assert_eq!(
            line["response"].as_str().unwrap(),
            expected.response,
            "{}",
            r.id
        );
    }

    // Under a template attack the gate reads the request inside its template, and each prompt
    // again gets the response of the model the gate chose for what it was sent.
    eval(&t.join("tpl-base"), "harmful", &["--template", "aim"]);
    eval(
        &t.join("tpl-adapter"),
        "harmful",
        &["--template", "aim", "--adapter", adapter_arg],
    );
    let attack = t.join("attack");
    ok(
        sails(&[
            "attack",
            "templates",
            "--templates",
            "aim",
            "--limit",
            "4",
            "--max-new-tokens",
            "4",
            "--no-learned-judges",
            "--adapter",
            adapter_arg,
            "--gate",
            median_path.to_str().unwrap(),
            "--out",
            attack.to_str().unwrap(),
        ]),
        "attack templates --gate",
    );
    let (tpl_base, tpl_adapted) = (
        records(&t.join("tpl-base")),
        records(&t.join("tpl-adapter")),
    );
    let attacked = records(&attack.join("template-aim"));
    assert_eq!(attacked.len(), 4);
    let plain = records(&attack.join("plain"));
    for (id, r) in &attacked {
        let reading = r.gate.unwrap();
        assert_eq!(reading.open, reading.score >= median.threshold);
        assert_eq!(
            plain[id].gate, gated[id].gate,
            "{id}: the plain run reads the request"
        );
        assert_ne!(
            reading.score,
            gated[id].gate.unwrap().score,
            "{id}: the template is read"
        );
        let expected = if reading.open {
            &tpl_adapted[id]
        } else {
            &tpl_base[id]
        };
        assert_eq!(r.response, expected.response, "{id} open={}", reading.open);
    }
    let summary: sails::attack::framed::FramedSummary =
        serde_json::from_slice(&std::fs::read(attack.join("summary.json")).unwrap()).unwrap();
    let opened = attacked.values().filter(|r| r.gate.unwrap().open).count();
    assert_eq!(summary.attacks[0].gate_open.unwrap().k, opened);

    // A gate whose selection changed is refused.
    let sel = features.join("features.json");
    let text = std::fs::read_to_string(&sel).unwrap();
    std::fs::write(&sel, format!("{text}\n")).unwrap();
    let out = sails(&[
        "eval",
        "--adapter",
        adapter_arg,
        "--gate",
        gate_path.to_str().unwrap(),
        "--suite",
        "harmful",
        "--limit",
        "1",
        "--out",
        t.join("stale").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed since the gate"));
}
