//! `sails align` on the real default model with a small SAE, up to the subspace: the manifest
//! records every input's hash, an unchanged rerun skips every stage, a config change reruns the
//! stage and what depends on it, and a lost output is rebuilt alone.

use crate::common;

use std::path::Path;
use std::process::Command;

use sails::manifest::{hash_path, RunManifest};
use sails::model::Resid;

/// A random TopK SAE on `Resid::In(6)` of SmolLM2 (d_model 576), in SAELens layout.
fn write_sae(dir: &Path) {
    common::random_topk_sae(Resid::In(6), 576, 64, 11)
        .save_saelens(dir)
        .unwrap();
}

fn align(run: &Path, sae: &Path, config: &Path) -> RunManifest {
    let out = Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(["align", "--until", "subspace", "--out"])
        .arg(run)
        .arg("--sae")
        .arg(sae)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "align failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    RunManifest::load(run).unwrap().expect("manifest.json")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn skipped(m: &RunManifest) -> Vec<(String, bool)> {
    m.last_invocation
        .iter()
        .map(|t| (t.stage.clone(), t.skipped))
        .collect()
}

fn stages(names: &[(&str, bool)]) -> Vec<(String, bool)> {
    names.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

#[test]
fn align_records_inputs_skips_what_is_done_and_reruns_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = tmp.path().join("sae");
    write_sae(&sae);
    let run = tmp.path().join("run");
    let config = tmp.path().join("run.toml");
    let base_cfg = "feature_prompts = 4\n[features]\ntop_k = 4\nbootstrap = 10\n\
                    [subspace]\nrank = 2\n[lora]\nrank = 2\n";
    std::fs::write(&config, base_cfg).unwrap();

    let m = align(&run, &sae, &config);
    assert_eq!(
        skipped(&m),
        stages(&[("sae", false), ("features", false), ("subspace", false)])
    );
    // every input of the features stage is recorded with its hash
    let features = m.record("features").unwrap();
    let model = sails::assets::ensure(sails::model::load::DEFAULT_MODEL_ASSET).unwrap();
    assert_eq!(
        features.inputs[&model.display().to_string()],
        hash_path(&model).unwrap()
    );
    assert_eq!(
        features.inputs[&sae.display().to_string()],
        hash_path(&sae).unwrap()
    );
    assert_eq!(features.config["features"]["top_k"], 4);
    let subspace = m.record("subspace").unwrap();
    assert_eq!(
        subspace.outputs["subspace"],
        hash_path(&run.join("subspace")).unwrap()
    );

    // unchanged: nothing runs
    let m = align(&run, &sae, &config);
    assert_eq!(
        skipped(&m),
        stages(&[("sae", true), ("features", true), ("subspace", true)])
    );

    // a copy of the run folder elsewhere matches its own manifest: nothing runs
    let copy = tmp.path().join("copy");
    copy_dir(&run, &copy);
    let m = align(&copy, &sae, &config);
    assert_eq!(
        skipped(&m),
        stages(&[("sae", true), ("features", true), ("subspace", true)])
    );

    // a features setting changed: features and the subspace built from them rerun
    std::fs::write(&config, base_cfg.replace("top_k = 4", "top_k = 3")).unwrap();
    let m = align(&run, &sae, &config);
    assert_eq!(
        skipped(&m),
        stages(&[("sae", true), ("features", false), ("subspace", false)])
    );
    let sel = sails::features::Selection::load(&run.join("features/features.json")).unwrap();
    assert_eq!(sel.layers[0].features.len(), 3);

    // a lost output (an interrupted or damaged stage) is rebuilt, the rest kept
    std::fs::remove_file(run.join("subspace/subspace.json")).unwrap();
    let m = align(&run, &sae, &config);
    assert_eq!(
        skipped(&m),
        stages(&[("sae", true), ("features", true), ("subspace", false)])
    );
    assert!(run.join("subspace/subspace.json").exists());

    // `sails train` reads the subspace through the same checked loader, and a rank that is not
    // the adapter's fails before any model is loaded.
    let train = |basis: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sails"))
            .args([
                "train",
                "--init",
                "subspace",
                "--rank",
                "16",
                "--data",
                "nowhere.jsonl",
            ])
            .arg("--basis")
            .arg(basis)
            .arg("--out")
            .arg(tmp.path().join("train"))
            .output()
            .unwrap()
    };
    for basis in [
        run.join("subspace"),
        run.join("subspace/subspace.safetensors"),
    ] {
        let out = train(&basis);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("the subspace has rank 2, the adapter --rank 16"),
            "{err}"
        );
    }
    let stray = tmp.path().join("bases.safetensors");
    std::fs::copy(run.join("subspace/subspace.safetensors"), &stray).unwrap();
    let err = String::from_utf8_lossy(&train(&stray).stderr).into_owned();
    assert!(err.contains("expected a `sails subspace` folder"), "{err}");
    std::fs::remove_file(run.join("subspace/subspace.json")).unwrap();
    let err = String::from_utf8_lossy(&train(&run.join("subspace")).stderr).into_owned();
    assert!(
        err.contains("reading the subspace") && err.contains("subspace.json"),
        "{err}"
    );
}
