//! The safety fine-tuning set on the real prompt sets, with a stand-in for the model's answers:
//! no evaluation prompt leaks in, refusals vary, builds are deterministic, sizes follow the
//! config, the held-out part is separate, save → load is identity, and every example tokenizes
//! with the default model's chat template.
//!
//! The assets come from the cache ($SAILS_HOME), fetched on first use.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use sails::data::sft::{
    self, build, AnswerError, HarmlessCount, HelpfulSource, Kind, ModelAnswers, SftConfig,
    SftError, SftSet,
};
use sails::data::{normalise, Splits, Suite};
use sails::train::ChatExample;

fn splits() -> &'static Splits {
    static S: OnceLock<Splits> = OnceLock::new();
    S.get_or_init(|| Splits::load().expect("data assets"))
}

/// Stands in for the model: a fixed answer that names the prompt, padded with whitespace so the
/// trimming shows.
fn fake(prompts: &[String]) -> Result<Vec<String>, AnswerError> {
    Ok(prompts
        .iter()
        .map(|p| format!("  Here is a careful answer to: {p}\n"))
        .collect())
}

fn build_with_fake(cfg: &SftConfig) -> SftSet {
    let mut f = fake;
    build(
        splits(),
        cfg,
        Some(ModelAnswers {
            source: "fake".into(),
            answer: &mut f,
        }),
    )
    .unwrap()
}

fn prompt(e: &ChatExample) -> &str {
    &e.messages[0].content
}

fn response(e: &ChatExample) -> &str {
    &e.messages[e.messages.len() - 1].content
}

/// The example's response is one of the composed refusals.
fn assert_composed_refusal(e: &ChatExample) {
    assert!(
        sft::REFUSAL_OPENERS
            .iter()
            .any(|o| response(e).starts_with(o)),
        "{}",
        response(e)
    );
}

fn full_model_cfg() -> SftConfig {
    SftConfig {
        helpful: HelpfulSource::Model,
        ..SftConfig::default()
    }
}

#[test]
fn no_evaluation_prompt_reaches_train_or_heldout() {
    let s = splits();
    let eval: HashSet<String> = [Suite::Harmful, Suite::Overrefusal, Suite::XstestUnsafe]
        .iter()
        .flat_map(|&su| s.eval_suite(su).iter().map(|r| normalise(&r.text)))
        .chain(
            s.facts()
                .iter()
                .flat_map(|h| h.choices.iter().map(|c| normalise(c))),
        )
        .chain(s.alpaca_eval().iter().map(|p| normalise(&p.prompt)))
        .collect();
    assert!(eval.len() > 1000, "{} evaluation prompts", eval.len());
    for set in [
        build_with_fake(&full_model_cfg()),
        build(splits(), &SftConfig::default(), None).unwrap(),
    ] {
        assert!(set.train.len() > 300, "{}", set.train.len());
        for e in set.train.iter().chain(&set.heldout) {
            assert_eq!(e.messages.len(), 2);
            assert_eq!(e.messages[0].role, "user");
            assert_eq!(e.messages[1].role, "assistant");
            assert!(!eval.contains(&normalise(prompt(e))), "leak: {}", prompt(e));
        }
    }
}

#[test]
fn refusals_are_varied_and_only_on_harmful_prompts() {
    let set = build_with_fake(&full_model_cfg());
    let m = &set.manifest;
    let all: Vec<(&sft::ExampleMeta, &ChatExample)> = m
        .train
        .iter()
        .zip(&set.train)
        .chain(m.heldout.iter().zip(&set.heldout))
        .collect();
    let refusals: Vec<&str> = all
        .iter()
        .filter(|(meta, _)| meta.kind == Kind::HarmfulRefusal)
        .map(|(_, e)| response(e))
        .collect();
    assert_eq!(refusals.len(), splits().train_harmful().len());
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for r in &refusals {
        *uses.entry(r).or_default() += 1;
    }
    assert!(uses.len() >= 50, "{} distinct refusals", uses.len());
    assert_eq!(uses.len(), m.distinct_refusals);
    let most = uses.values().copied().max().unwrap();
    assert!(
        most * 20 <= refusals.len(),
        "one refusal used {most} times of {}",
        refusals.len()
    );
    // Every opener is used (12 openers over ~400 prompts), none for more than a quarter.
    for opener in sft::REFUSAL_OPENERS {
        let n = refusals.iter().filter(|r| r.starts_with(opener)).count();
        assert!(
            n > 0 && n * 4 < refusals.len(),
            "opener {opener:?} used {n} times"
        );
    }
    // Helpful examples never get a refusal.
    let openers: HashSet<&str> = sft::REFUSAL_OPENERS.iter().copied().collect();
    for (meta, e) in &all {
        if meta.kind != Kind::HarmfulRefusal {
            assert!(response(e).starts_with("Here is a careful answer to: "));
            assert!(!openers.iter().any(|o| response(e).starts_with(o)));
        }
    }
}

fn save_bytes(set: &mut SftSet) -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    set.save(dir.path()).unwrap();
    let bytes = [sft::TRAIN_FILE, sft::HELDOUT_FILE, sft::MANIFEST_FILE]
        .iter()
        .map(|f| std::fs::read(dir.path().join(f)).unwrap())
        .collect();
    (dir, bytes)
}

#[test]
fn same_inputs_give_identical_bytes_and_another_seed_changes_them() {
    let cfg = full_model_cfg();
    let (_a, a) = save_bytes(&mut build_with_fake(&cfg));
    let (_b, b) = save_bytes(&mut build_with_fake(&cfg));
    assert_eq!(a, b);
    let other = SftConfig { seed: 7, ..cfg };
    let mut set7 = build_with_fake(&other);
    let (_c, c) = save_bytes(&mut set7);
    assert_ne!(a[0], c[0]);
    assert_ne!(a[1], c[1]);
    // Same prompts overall (every harmful and edgy prompt is taken) but other refusal wording.
    let base = build_with_fake(&full_model_cfg());
    let refusal_of = |s: &SftSet| -> HashMap<String, String> {
        s.train
            .iter()
            .chain(&s.heldout)
            .zip(s.manifest.train.iter().chain(&s.manifest.heldout))
            .filter(|(_, m)| m.kind == Kind::HarmfulRefusal)
            .map(|(e, _)| (prompt(e).to_owned(), response(e).to_owned()))
            .collect()
    };
    let (r0, r7) = (refusal_of(&base), refusal_of(&set7));
    assert_eq!(
        r0.keys().collect::<HashSet<_>>(),
        r7.keys().collect::<HashSet<_>>()
    );
    let changed = r0.iter().filter(|(p, r)| r7[*p] != **r).count();
    assert!(
        changed * 10 > r0.len() * 8,
        "{changed}/{} changed",
        r0.len()
    );
}

#[test]
fn counts_follow_the_config() {
    // Exact numbers, no edgy prompts: 50 harmful, 30 harmless; 10 % of each held out.
    let cfg = SftConfig {
        harmful: Some(50),
        harmless: HarmlessCount::Exactly(30),
        include_edgy: false,
        ..SftConfig::default()
    };
    let m = build(splits(), &cfg, None).unwrap().manifest;
    assert_eq!(
        (
            m.train_counts.harmful_refusal,
            m.train_counts.harmless_helpful,
            m.train_counts.edgy_helpful
        ),
        (45, 27, 0)
    );
    assert_eq!(
        (
            m.heldout_counts.harmful_refusal,
            m.heldout_counts.harmless_helpful
        ),
        (5, 3)
    );
    // A ratio of 2 helpful per harmful, 20 of them edgy: 40 harmful → 80 helpful → 60 Alpaca.
    let cfg = SftConfig {
        harmful: Some(40),
        harmless: HarmlessCount::PerHarmful(2.0),
        max_edgy: Some(20),
        heldout_frac: 0.0,
        helpful: HelpfulSource::Reference,
        ..SftConfig::default()
    };
    let set = build_with_fake(&cfg);
    let c = set.manifest.train_counts;
    assert_eq!(
        (c.harmful_refusal, c.harmless_helpful, c.edgy_helpful),
        (40, 60, 20)
    );
    assert!(set.heldout.is_empty());
    // Reference answers are the Alpaca answers, trimmed.
    let reference: HashMap<&str, &str> = splits()
        .alpaca_train()
        .iter()
        .map(|p| (p.prompt.as_str(), p.response.as_str()))
        .collect();
    for (e, meta) in set.train.iter().zip(&set.manifest.train) {
        if meta.kind == Kind::HarmlessHelpful {
            assert_eq!(response(e), reference[prompt(e)].trim());
        }
    }
    // More than there is: an error naming the numbers.
    let too_many = SftConfig {
        harmful: Some(100_000),
        ..SftConfig::default()
    };
    match build(splits(), &too_many, None) {
        Err(SftError::NotEnough {
            kind: Kind::HarmfulRefusal,
            requested: 100_000,
            available,
        }) => assert_eq!(available, splits().train_harmful().len()),
        other => panic!("expected NotEnough, got {other:?}"),
    }
}

#[test]
fn heldout_is_disjoint_from_train_and_about_a_tenth() {
    let set = build_with_fake(&full_model_cfg());
    let train: HashSet<String> = set.train.iter().map(|e| normalise(prompt(e))).collect();
    assert_eq!(train.len(), set.train.len(), "a prompt twice in train");
    for e in &set.heldout {
        assert!(!train.contains(&normalise(prompt(e))), "{}", prompt(e));
    }
    let total = set.train.len() + set.heldout.len();
    let frac = set.heldout.len() as f64 / total as f64;
    assert!((0.09..0.11).contains(&frac), "held-out share {frac}");
    let h = set.manifest.heldout_counts;
    assert!(h.harmful_refusal > 0 && h.harmless_helpful > 0 && h.edgy_helpful > 0);
}

#[test]
fn save_then_load_is_identity_and_a_changed_file_is_refused() {
    let mut set = build_with_fake(&SftConfig {
        harmful: Some(30),
        max_edgy: Some(10),
        ..SftConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    set.save(dir.path()).unwrap();
    assert_eq!(set.manifest.files.len(), 2);
    let back = SftSet::load(dir.path()).unwrap();
    assert_eq!(back, set);
    // The files are what `sails train --data` reads: one ChatExample per line.
    let lines = sft::read_jsonl(&dir.path().join(sft::TRAIN_FILE)).unwrap();
    assert_eq!(lines, set.train);
    let path = dir.path().join(sft::HELDOUT_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"\n");
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        SftSet::load(dir.path()),
        Err(SftError::HashMismatch { .. })
    ));
}

#[test]
fn model_answers_are_trimmed_and_empty_ones_dropped_and_counted() {
    let cfg = SftConfig {
        harmful: Some(20),
        harmless: HarmlessCount::Exactly(20),
        max_edgy: Some(10),
        helpful: HelpfulSource::Model,
        heldout_frac: 0.0,
        ..SftConfig::default()
    };
    let mut asked = 0;
    // Every third answer is only whitespace.
    let mut answer = |ps: &[String]| -> Result<Vec<String>, AnswerError> {
        asked += ps.len();
        Ok(ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i % 3 == 0 {
                    " \n\t".to_owned()
                } else {
                    format!("\n answer: {p} ")
                }
            })
            .collect())
    };
    let set = build(
        splits(),
        &cfg,
        Some(ModelAnswers {
            source: "fake".into(),
            answer: &mut answer,
        }),
    )
    .unwrap();
    // 20 Alpaca + 10 edgy prompts asked; 10 of the 30 empty.
    assert_eq!(asked, 30);
    let empty = set
        .manifest
        .dropped
        .iter()
        .filter(|d| d.reason == "empty model answer")
        .count();
    assert_eq!(empty, 10);
    let c = set.manifest.train_counts;
    assert_eq!(c.harmful_refusal, 20);
    assert_eq!(c.harmless_helpful + c.edgy_helpful, 20);
    assert_eq!(set.manifest.answer_source.as_deref(), Some("fake"));
    for e in &set.train {
        let r = response(e);
        assert_eq!(r, r.trim());
        assert!(!r.is_empty());
    }
    // The wrong number of answers is an error, not a silent misalignment.
    let mut short =
        |ps: &[String]| -> Result<Vec<String>, AnswerError> { Ok(vec!["x".into(); ps.len() - 1]) };
    let err = build(
        splits(),
        &cfg,
        Some(ModelAnswers {
            source: "fake".into(),
            answer: &mut short,
        }),
    );
    assert!(matches!(
        err,
        Err(SftError::AnswerCount {
            expected: 30,
            got: 29
        })
    ));
}

#[test]
fn without_a_model_edgy_prompts_are_dropped_with_a_reason_and_model_answers_refused() {
    let set = build(splits(), &SftConfig::default(), None).unwrap();
    let m = &set.manifest;
    assert_eq!(
        m.train_counts.edgy_helpful + m.heldout_counts.edgy_helpful,
        0
    );
    let edgy_dropped = m
        .dropped
        .iter()
        .filter(|d| d.kind == Kind::EdgyHelpful)
        .count();
    assert_eq!(edgy_dropped, splits().benign_edgy().len());
    assert!(m.answer_source.is_none());
    // With no edgy answers available the ratio is filled by Alpaca alone: 1 helpful per harmful.
    let harmful = m.train_counts.harmful_refusal + m.heldout_counts.harmful_refusal;
    let harmless = m.train_counts.harmless_helpful + m.heldout_counts.harmless_helpful;
    let other: Vec<_> = m
        .dropped
        .iter()
        .filter(|d| d.kind != Kind::EdgyHelpful)
        .collect();
    assert_eq!(harmful, harmless);
    // Alpaca repeats a few of its own prompts; the repeats left the pool before the draw.
    assert!(!other.is_empty());
    assert!(
        other.iter().all(
            |d| d.kind == Kind::HarmlessHelpful && d.reason.starts_with("duplicate of alpaca:")
        ),
        "{other:?}"
    );
    assert!(matches!(
        build(splits(), &full_model_cfg(), None),
        Err(SftError::NoAnswerer)
    ));
}

#[test]
fn every_example_tokenizes_with_the_default_chat_template() {
    use sails::model::gguf::GgufFile;
    use sails::model::load::DEFAULT_MODEL_ASSET;
    use sails::model::tokenizer::Tokenizer;
    let gguf = match std::env::var_os("SAILS_SMOLLM2_GGUF") {
        Some(p) => p.into(),
        None => sails::assets::ensure(DEFAULT_MODEL_ASSET).expect("default model asset"),
    };
    // Only the metadata is needed: tokenizer and template, no weights.
    let file = GgufFile::open(&gguf).unwrap();
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata(), &gguf).unwrap();
    let template = tokenizer.chat_template().unwrap();
    let set = build_with_fake(&full_model_cfg());
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    for (i, e) in set.train.iter().chain(&set.heldout).enumerate() {
        let t = sails::train::tokenize_chat(&tokenizer, &template, e, i).unwrap();
        assert!(
            t.num_targets() >= 2,
            "example {i}: {} targets",
            t.num_targets()
        );
        // The targets end with the end-of-turn token.
        assert_eq!(t.ids[t.target_end - 1], im_end);
    }
}

#[test]
fn cli_json_prints_the_saved_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(["data", "build", "--out"])
        .arg(dir.path())
        .args(["--helpful", "reference", "--no-edgy"])
        .args([
            "--harmful",
            "10",
            "--harmless",
            "6",
            "--seed",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SftManifest denies unknown fields, so the printed format cannot drift from the type.
    let printed: sft::SftManifest = serde_json::from_slice(&out.stdout).unwrap();
    let saved = SftSet::load(dir.path()).unwrap();
    assert_eq!(printed, saved.manifest);
    assert_eq!(printed.config.seed, 3);
    let c = printed.train_counts;
    let h = printed.heldout_counts;
    assert_eq!(
        (
            c.harmful_refusal + h.harmful_refusal,
            c.harmless_helpful + h.harmless_helpful
        ),
        (10, 6)
    );
    // No model was needed: nothing was generated.
    assert!(printed.answer_source.is_none());
    assert!(!dir.path().join("answers.jsonl").exists());
}

#[test]
fn question_forms_double_the_refusals_and_stay_beside_their_prompt() {
    let plain = build_with_fake(&full_model_cfg());
    let cfg = SftConfig {
        question_forms: true,
        ..full_model_cfg()
    };
    let set = build_with_fake(&cfg);
    let refusals = |s: &SftSet| {
        s.manifest.train_counts.harmful_refusal + s.manifest.heldout_counts.harmful_refusal
    };
    assert_eq!(refusals(&set), 2 * refusals(&plain));
    // As many helpful examples as refusals, as without question forms.
    let c = set.manifest.train_counts;
    let h = set.manifest.heldout_counts;
    assert_eq!(
        c.harmless_helpful + c.edgy_helpful + h.harmless_helpful + h.edgy_helpful,
        refusals(&set)
    );
    // Each question form is in the same part as the prompt it was made from.
    let part = |metas: &[sft::ExampleMeta]| -> HashSet<String> {
        metas.iter().map(|m| m.id.clone()).collect()
    };
    let (train, heldout) = (part(&set.manifest.train), part(&set.manifest.heldout));
    let questions: Vec<&String> = train
        .iter()
        .chain(&heldout)
        .filter(|id| id.ends_with("~question"))
        .collect();
    assert_eq!(questions.len(), refusals(&plain));
    for q in questions {
        let base = q.trim_end_matches("~question").to_string();
        assert_eq!(
            train.contains(q),
            train.contains(&base),
            "{q} and {base} split apart"
        );
        assert_eq!(
            heldout.contains(q),
            heldout.contains(&base),
            "{q} and {base} split apart"
        );
    }
    // They are questions, answered with a composed refusal, and (as every prompt) none is an
    // evaluation item.
    for (e, m) in set.train.iter().zip(&set.manifest.train) {
        if m.id.ends_with("~question") {
            assert!(prompt(e).ends_with('?'), "{}", prompt(e));
            assert_composed_refusal(e);
        }
    }
    splits()
        .assert_disjoint(set.train.iter().chain(&set.heldout).map(prompt))
        .unwrap();
}

#[test]
fn refusal_pairs_refuse_one_side_and_answer_the_other() {
    let plain = build_with_fake(&full_model_cfg());
    let set = build_with_fake(&SftConfig {
        refusal_pairs: true,
        ..full_model_cfg()
    });
    let pairs = splits().refusal_pairs();
    // 13 pairs leave because one side is a paraphrase of an evaluation item (splits.json).
    assert_eq!(pairs.len(), 137);
    let total = |s: &SftSet, kind: Kind| {
        let count = |c: sft::KindCounts| match kind {
            Kind::HarmfulRefusal => c.harmful_refusal,
            Kind::EdgyHelpful => c.edgy_helpful,
            Kind::HarmlessHelpful => c.harmless_helpful,
        };
        count(s.manifest.train_counts) + count(s.manifest.heldout_counts)
    };
    assert_eq!(
        total(&set, Kind::HarmfulRefusal),
        total(&plain, Kind::HarmfulRefusal) + pairs.len()
    );
    assert_eq!(
        total(&set, Kind::EdgyHelpful),
        total(&plain, Kind::EdgyHelpful) + pairs.len()
    );
    // Helpful examples still balance the refusals.
    assert_eq!(
        total(&set, Kind::EdgyHelpful) + total(&set, Kind::HarmlessHelpful),
        total(&set, Kind::HarmfulRefusal)
    );
    let by_id: HashMap<&str, &ChatExample> = set
        .manifest
        .train
        .iter()
        .zip(&set.train)
        .chain(set.manifest.heldout.iter().zip(&set.heldout))
        .map(|(m, e)| (m.id.as_str(), e))
        .collect();
    for pair in pairs {
        let harmful = by_id[pair.harmful.id.as_str()];
        let benign = by_id[pair.benign.id.as_str()];
        assert_eq!(prompt(harmful), pair.harmful.text);
        assert_composed_refusal(harmful);
        assert_eq!(prompt(benign), pair.benign.text);
        assert_eq!(
            response(benign),
            format!("Here is a careful answer to: {}", pair.benign.text)
        );
    }
}

#[test]
fn coconot_uncensorbench_and_many_shot_join_with_their_own_answers() {
    let cfg = SftConfig {
        harmful: Some(20),
        harmless: HarmlessCount::PerHarmful(1.0),
        include_edgy: false,
        heldout_frac: 0.0,
        coconot: 30,
        reference_max_chars: 400,
        uncensorbench: 12,
        many_shot: 8,
        ..SftConfig::default()
    };
    let set = build(splits(), &cfg, None).unwrap();
    let c = set.manifest.train_counts;
    // 20 + 12 + 8 refusals; as many helpful answers, 30 of them CoCoNot's → 10 Alpaca.
    assert_eq!(
        (c.harmful_refusal, c.edgy_helpful, c.harmless_helpful),
        (40, 30, 10)
    );
    let coconot: HashMap<&str, &str> = splits()
        .coconot()
        .iter()
        .map(|p| (p.prompt.as_str(), p.response.as_str()))
        .collect();
    let uncensored: HashMap<&str, &str> = splits()
        .uncensored()
        .iter()
        .map(|p| (p.prompt.as_str(), p.response.as_str()))
        .collect();
    let mut cut = 0;
    for (e, meta) in set.train.iter().zip(&set.manifest.train) {
        let source = meta.id.split(':').next().unwrap();
        match source {
            // UncensorBench's own refusal, word for word.
            "uncensorbench" => assert_eq!(response(e), uncensored[prompt(e)].trim()),
            "many-shot" | "advbench" => assert_composed_refusal(e),
            // CoCoNot's preferred answer, cut at a paragraph or sentence end within the limit.
            "coconot" => {
                let full = coconot[prompt(e)].trim();
                assert!(full.starts_with(response(e)), "{}", meta.id);
                assert!(response(e).chars().count() <= 400);
                if response(e).len() < full.len() {
                    cut += 1;
                    let rest = &full[response(e).len()..];
                    // A hard cut only where the limit's second half has no boundary.
                    assert!(
                        response(e).ends_with(['.', '!', '?'])
                            || rest.starts_with("\n\n")
                            || response(e).chars().count() > 390,
                        "{} cut before {:?}",
                        meta.id,
                        rest.chars().take(20).collect::<String>()
                    );
                }
            }
            "alpaca" => assert_eq!(meta.kind, Kind::HarmlessHelpful),
            other => panic!("unexpected source {other}"),
        }
    }
    assert!(
        cut > 10,
        "{cut} of 30 CoCoNot answers cut at 400 characters"
    );
    // None of it is an evaluation item or a paraphrase of one.
    assert!(splits()
        .assert_disjoint(set.train.iter().map(prompt))
        .is_ok());
    // More than the guard leaves: an error naming the numbers.
    let too_many = SftConfig {
        many_shot: 400,
        ..cfg
    };
    match build(splits(), &too_many, None) {
        Err(SftError::NotEnough {
            kind: Kind::HarmfulRefusal,
            requested: 400,
            available,
        }) => assert_eq!(available, splits().many_shot().len()),
        other => panic!("expected NotEnough, got {other:?}"),
    }
}

/// With `preference_pairs`: one pair per example of each part, same id and order; a harmful
/// prompt's refusal is chosen over the model's own (stand-in) answer, any other answer over the
/// prompt's composed refusal; no pair prompt is an evaluation item; the files are deterministic,
/// load back, and a tampered pairs file is refused. Without it nothing in the manifest changes.
#[test]
fn preference_pairs_follow_the_kinds_and_are_deterministic_leak_free_and_checked() {
    let cfg = SftConfig {
        harmful: Some(40),
        harmless: HarmlessCount::Exactly(20),
        max_edgy: Some(10),
        preference_pairs: true,
        ..SftConfig::default()
    };
    assert!(matches!(
        build(splits(), &cfg, None),
        Err(SftError::PairsNeedModel)
    ));
    let mut set = build_with_fake(&cfg);
    let counts = set.manifest.pairs.clone().unwrap();
    assert_eq!(
        (counts.train, counts.heldout),
        (set.train.len(), set.heldout.len())
    );
    assert!(counts.no_rejected.is_empty());
    let mut kinds = HashSet::new();
    for (pairs, metas, examples) in [
        (&set.pairs, &set.manifest.train, &set.train),
        (&set.heldout_pairs, &set.manifest.heldout, &set.heldout),
    ] {
        assert_eq!(pairs.len(), examples.len());
        for ((pair, meta), e) in pairs.iter().zip(metas).zip(examples) {
            assert_eq!(pair.id, meta.id);
            assert_eq!(
                (pair.prompt.as_str(), pair.chosen.as_str()),
                (prompt(e), response(e))
            );
            kinds.insert(meta.kind);
            match meta.kind {
                Kind::HarmfulRefusal => {
                    assert_composed_refusal(e);
                    let own = format!("Here is a careful answer to: {}", pair.prompt);
                    assert_eq!(pair.rejected, own);
                }
                Kind::HarmlessHelpful | Kind::EdgyHelpful => {
                    assert_eq!(pair.rejected, sft::refusal(cfg.seed, &pair.prompt));
                }
            }
        }
    }
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    splits()
        .assert_disjoint(
            set.pairs
                .iter()
                .chain(&set.heldout_pairs)
                .map(|p| p.prompt.as_str()),
        )
        .unwrap();

    let (dir, a) = save_bytes(&mut set);
    let pair_bytes = |d: &Path| {
        [sft::PAIRS_FILE, sft::HELDOUT_PAIRS_FILE].map(|f| std::fs::read(d.join(f)).unwrap())
    };
    let (dir2, b) = save_bytes(&mut build_with_fake(&cfg));
    assert_eq!(a, b);
    assert_eq!(pair_bytes(dir.path()), pair_bytes(dir2.path()));
    let manifest: serde_json::Value = serde_json::from_slice(&a[2]).unwrap();
    assert!(manifest["files"][sft::PAIRS_FILE].is_string());
    assert!(manifest["files"][sft::HELDOUT_PAIRS_FILE].is_string());
    assert_eq!(SftSet::load(dir.path()).unwrap(), set);

    let path = dir.path().join(sft::PAIRS_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("\"chosen\":\"", "\"chosen\":\"Sure. ", 1),
    )
    .unwrap();
    assert!(matches!(
        SftSet::load(dir.path()),
        Err(SftError::HashMismatch { .. })
    ));

    let plain = build_with_fake(&SftConfig {
        preference_pairs: false,
        ..cfg
    });
    assert!(plain.pairs.is_empty() && plain.manifest.pairs.is_none());
    let json = serde_json::to_value(&plain.manifest).unwrap();
    assert!(json.get("pairs").is_none() && json["config"].get("preference_pairs").is_none());
}
