//! `sails theory`: the controlled recovery-error experiment (see THEORY.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use sails::theory::{TheoryConfig, TheoryResults};

/// Where results go when --out is not given.
pub const DEFAULT_OUT: &str = "runs/theory";

/// Run the synthetic safety-subspace recovery experiment (SAE-based vs direct identification).
///
/// Draws activations in superposition from a generative model whose safety subspace U is known,
/// estimates U directly from the raw activations (difference of means, PCA of differences, logistic
/// probes) and through a dictionary (the true concepts; a TopK SAE trained on the samples) with
/// Δ-based feature selection, and measures the recovery error ‖P_Û − P_U‖_F. Sweeps sample size,
/// entanglement ρ, superposition n/d and SAE quality over several seeds, then writes results.json,
/// results.md and SVG figures into --out.
#[derive(Debug, clap::Args)]
pub struct TheoryArgs {
    /// TOML config (see configs/theory.toml); built-in defaults when absent.
    ///
    /// Fields left out keep their defaults; an unknown field is an error, so a typo cannot silently
    /// leave a setting at its default. The effective config is saved in results.json.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output folder [default: runs/theory].
    ///
    /// Created if missing. Each file is written atomically (temporary file, then rename), so an
    /// interrupted run never leaves a half-written results.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Seeds per point (overrides the config's `seeds`).
    ///
    /// Each seed redraws the concept directions, the samples and the SAE initialisation; tables and
    /// figures show mean ± sd over seeds. Three or more give a meaningful spread.
    #[arg(long, value_name = "N")]
    pub seeds: Option<usize>,
    /// Smoke-test size: two sample sizes, sweep ends only, one SAE variant, a quarter of the training.
    ///
    /// Applied after --config and before --seeds, so `--quick --seeds 3` runs the small sweep
    /// with three seeds. The numbers are noisier; use the full run for conclusions.
    #[arg(long)]
    pub quick: bool,
    /// Skip the SAE method (and the SAE-quality sweep); the fastest way to see the direct methods.
    #[arg(long)]
    pub no_sae: bool,
    /// Print the summary (summaries, floors, failure count) as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl TheoryArgs {
    /// Defaults < config file < --quick < flags.
    pub fn resolve(&self) -> anyhow::Result<TheoryConfig> {
        let mut cfg = match &self.config {
            Some(path) => TheoryConfig::from_toml(path)
                .with_context(|| format!("loading the theory config {}", path.display()))?,
            None => TheoryConfig::default(),
        };
        if self.quick {
            cfg = cfg.quick();
        }
        if let Some(seeds) = self.seeds {
            cfg.seeds = seeds;
        }
        if self.no_sae {
            cfg.sae.enabled = false;
        }
        cfg.validate().context("checking the theory config")?;
        Ok(cfg)
    }
}

pub fn run(args: TheoryArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.resolve()?;
    // candle splits every matmul over RAYON_NUM_THREADS threads (default: all cores). The SAEs
    // here are small (batch 256 × a few hundred latents), where that splitting cost ~4× the CPU
    // per SAE on a 2-core machine; the experiment runs its jobs in parallel instead. A value the
    // user set is respected. Set before any thread exists, so no other thread reads the
    // environment concurrently.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    let results = sails::theory::run(&cfg).context("running the theory experiment")?;
    results
        .save(&out)
        .with_context(|| format!("writing results into {}", out.display()))?;
    if args.json {
        let summary = results.summary(&out);
        println!(
            "{}",
            serde_json::to_string(&summary).context("serialising the summary")?
        );
    } else {
        print_brief(&results, &out);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_brief(results: &TheoryResults, out: &Path) {
    eprintln!(
        "theory: {} estimates ({} could not be made) in {:.1} s; tables in {}",
        results.records.len(),
        results.failures.len(),
        results.elapsed_ms as f64 / 1000.0,
        out.join("results.md").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> TheoryArgs {
        let cli = Cli::try_parse_from(args).expect("arguments parse");
        match cli.command {
            Command::Theory(a) => a,
            #[allow(unreachable_patterns)]
            _ => panic!("parsed into another subcommand"),
        }
    }

    #[test]
    fn defaults_resolve_to_the_library_defaults() {
        let a = parse(&["sails", "theory"]);
        assert!(a.out.is_none() && !a.quick && !a.json && !a.no_sae);
        assert_eq!(a.resolve().unwrap(), TheoryConfig::default());
    }

    #[test]
    fn flags_override_in_order_quick_then_seeds() {
        let a = parse(&[
            "sails", "theory", "--quick", "--seeds", "5", "--no-sae", "--out", "x",
        ]);
        let cfg = a.resolve().unwrap();
        assert_eq!(cfg.seeds, 5);
        assert!(!cfg.sae.enabled);
        assert_eq!(
            cfg.sweep.sample_sizes,
            TheoryConfig::default().quick().sweep.sample_sizes
        );
        assert_eq!(a.out, Some(PathBuf::from("x")));
    }

    #[test]
    fn zero_seeds_is_rejected() {
        let a = parse(&["sails", "theory", "--seeds", "0"]);
        assert!(a.resolve().is_err());
    }
}
