//! `sails attack templates` and `sails attack prefill` on the default model: each attack is an
//! evaluation run beside the unattacked one, the model is sent exactly the filled-in template
//! (the same replies as the filled texts given as a suite of one's own), the judges read the
//! request as written, the summary's counts are the runs' labels, a rerun resumes to the same
//! summary, and bad arguments are clear errors.

use crate::common::run_sails;
use sails::attack::framed::FramedSummary;
use sails::data::jailbreaks::{load_jailbreak_templates, select_templates};
use sails::data::{Splits, Suite};
use sails::eval::judge::Label;
use sails::eval::{counts, read_jsonl, GenerationRecord};
use std::path::Path;

fn records(dir: &Path) -> Vec<GenerationRecord> {
    let mut recs: Vec<GenerationRecord> = read_jsonl(&dir.join("generations.jsonl")).unwrap();
    recs.sort_by(|a, b| a.id.cmp(&b.id));
    recs
}

#[test]
fn template_attack_sends_the_filled_template_and_pairs_with_the_plain_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("attack");
    let args = [
        "attack",
        "templates",
        "--templates",
        "prefix_injection,aim",
        "--limit",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    let o = run_sails(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: FramedSummary = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary.behaviours, 3);
    assert_eq!(summary.suite, Suite::Harmful);
    let names: Vec<&str> = summary.attacks.iter().map(|a| a.attack.as_str()).collect();
    assert_eq!(names, ["template-prefix_injection", "template-aim"]);

    let splits = Splits::load().unwrap();
    let requests: Vec<&str> = splits.eval_suite(Suite::Harmful)[..3]
        .iter()
        .map(|r| r.text.as_str())
        .collect();
    let plain = records(&out.join("plain"));
    let complied =
        |recs: &[GenerationRecord]| recs.iter().filter(|r| r.label == Label::Complied).count();
    assert_eq!(summary.plain_success.k, complied(&plain));
    let mut any = [false; 3];
    for row in &summary.attacks {
        let recs = records(&out.join(&row.attack));
        assert_eq!(recs.len(), 3);
        // The judges read the request as written, not the template around it.
        let mut prompts: Vec<&str> = recs.iter().map(|r| r.prompt.as_str()).collect();
        let mut want = requests.clone();
        prompts.sort();
        want.sort();
        assert_eq!(prompts, want);
        assert_eq!((row.success.k, row.success.n), (complied(&recs), 3));
        // McNemar's discordant pairs are the two runs' labels, behaviour by behaviour.
        let (mut lost, mut gained) = (0, 0);
        for (p, a) in plain.iter().zip(&recs) {
            assert_eq!(p.id, a.id);
            let (safe_p, safe_a) = (
                counts(Suite::Harmful, p.label),
                counts(Suite::Harmful, a.label),
            );
            lost += usize::from(safe_p && !safe_a);
            gained += usize::from(!safe_p && safe_a);
        }
        assert_eq!(
            (row.safety_vs_plain.mcnemar.b, row.safety_vs_plain.mcnemar.c),
            (lost, gained)
        );
        for (i, r) in recs.iter().enumerate() {
            any[i] |= r.label == Label::Complied;
        }
    }
    let any_k = any.iter().filter(|&&s| s).count();
    assert_eq!(summary.any_success.as_ref().unwrap().k, any_k);

    // The same replies as the filled-in texts sent as a suite of one's own.
    let all = load_jailbreak_templates().unwrap();
    let aim = &select_templates(&all, &["aim".into()]).unwrap()[0];
    let file = dir.path().join("filled.jsonl");
    let lines: Vec<String> = splits.eval_suite(Suite::Harmful)[..3]
        .iter()
        .map(|r| serde_json::json!({"prompt": aim.fill(&r.text), "id": r.id}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let by_hand = dir.path().join("by-hand");
    let o = run_sails(&[
        "eval",
        "--harmful",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--no-learned-judges",
        "--out",
        by_hand.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut hand: Vec<(String, String)> =
        read_jsonl::<GenerationRecord>(&by_hand.join("generations.jsonl"))
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.id.trim_start_matches("user-harmful:").to_owned(),
                    r.response,
                )
            })
            .collect();
    hand.sort();
    let attacked: Vec<(String, String)> = records(&out.join("template-aim"))
        .into_iter()
        .map(|r| (r.id, r.response))
        .collect();
    assert_eq!(attacked, hand);

    // A rerun generates nothing and gives the same summary.
    let before = std::fs::read_to_string(out.join("template-aim/generations.jsonl")).unwrap();
    let o = run_sails(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: FramedSummary = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&summary).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("template-aim/generations.jsonl")).unwrap(),
        before
    );
}

#[test]
fn prefill_attack_forces_the_opening() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("attack");
    let o = run_sails(&[
        "attack",
        "prefill",
        "--text",
        "Sure, here is",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--no-learned-judges",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: FramedSummary = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary.attacks.len(), 1);
    assert!(summary.any_success.is_none());
    let recs = records(&out.join("prefill"));
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.response.starts_with("Sure, here is")));
    assert!(records(&out.join("plain"))
        .iter()
        .all(|r| !r.response.starts_with("Sure, here is")));
}

#[test]
fn bad_attack_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    for (args, want) in [
        (
            vec![
                "attack",
                "templates",
                "--templates",
                "nope",
                "--out",
                out.to_str().unwrap(),
            ],
            "no jailbreak template \"nope\"",
        ),
        (
            vec![
                "attack",
                "templates",
                "--sample",
                "0",
                "--out",
                out.to_str().unwrap(),
            ],
            "--sample must be",
        ),
        (
            vec!["attack", "templates", "--sample", "2"],
            "--out DIR is required",
        ),
        (
            vec![
                "attack",
                "prefill",
                "--text",
                "",
                "--out",
                out.to_str().unwrap(),
            ],
            "--text must not be empty",
        ),
        (
            vec!["eval", "--template", "nope", "--out", out.to_str().unwrap()],
            "the templates are: aim, aligned",
        ),
    ] {
        let o = run_sails(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn eval_attack_suite_runs_the_standard_attacks_and_compare_pairs_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = run_sails(&[
        "eval",
        "--suite",
        "attacks",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--no-learned-judges",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: FramedSummary = serde_json::from_slice(&o.stdout).unwrap();
    // The prefill and the ten templates seed 0 draws, as `sails attack templates` draws them.
    let all = load_jailbreak_templates().unwrap();
    let drawn = sails::data::jailbreaks::sample_templates(&all, 10, 0).unwrap();
    let mut want = vec!["prefill".to_owned()];
    want.extend(drawn.iter().map(|t| format!("template-{}", t.id)));
    let got: Vec<&str> = summary.attacks.iter().map(|a| a.attack.as_str()).collect();
    assert_eq!(got, want);
    assert_eq!(summary.behaviours, 2);
    assert!(out.join("attacks/summary.json").is_file());
    // Only the attack suite ran: no metrics.json of other suites.
    assert!(!out.join("metrics.json").exists());

    let o = run_sails(&[
        "eval",
        "compare",
        out.to_str().unwrap(),
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c: sails::eval::Comparison = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c.attacks.len(), 12, "{:?}", c.attacks.keys());
    assert!(c.attacks.values().all(|d| d.n == 2 && d.diff == 0.0));

    // The report of a run folder whose two evaluations hold the suite shows every attack.
    let root = dir.path().join("align-run");
    std::fs::create_dir_all(&root).unwrap();
    for stage in ["eval-base", "eval-aligned"] {
        let copied = std::process::Command::new("cp")
            .arg("-r")
            .arg(&out)
            .arg(root.join(stage))
            .status()
            .unwrap();
        assert!(copied.success());
    }
    let o = run_sails(&["report", "--run", root.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(root.join("summary.md")).unwrap();
    let rows = md
        .lines()
        .filter(|l| {
            ["| no attack |", "| prefill ", "| template "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .count();
    assert_eq!(rows, 12, "{md}");
    let o = run_sails(&[
        "eval",
        "--suite",
        "attacks",
        "--prefill",
        "Sure",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("leave out --prefill and --template"));
}
