//! `sails explain`: feature cards for the selected features (top contexts, logit lens) and, with
//! an adapter, where its update lies and how it moved the features.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use sails::data::{hash_unit, Splits};
use sails::explain::{
    self, ExplainConfig, Explanations, FeatureCard, FeatureShift, ModuleAttribution,
};
use sails::features::{PromptSetInfo, Selection, SELECTION_FILE};
use sails::model::lora::Adapter;
use sails::sae::Sae;
use sails::subspace::Subspace;

use super::features::load_saes;
use super::model_args::ModelArgs;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Base model; `--adapter` names the trained adapter to attribute (it is not applied to the
    /// feature cards, which describe the base model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder written by `sails features` (features.json). The SAEs are reloaded from the
    /// paths it records.
    #[arg(long, value_name = "DIR")]
    pub features: PathBuf,
    /// Folder written by `sails subspace`: with an adapter, report the share of each module's
    /// update energy inside the subspace.
    #[arg(long, value_name = "DIR")]
    pub subspace: Option<PathBuf>,
    /// Output file (explain.json).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Top-activating prompts kept per feature [default: 5].
    #[arg(long, value_name = "N")]
    pub contexts: Option<usize>,
    /// Tokens listed as promoted and as suppressed per feature [default: 10].
    #[arg(long, value_name = "N")]
    pub lens_tokens: Option<usize>,
    /// Prompts per forward pass [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Use at most this many prompts of each set (quick runs).
    ///
    /// The corpus is the harmful and the harmless prompts the features stage used (rebuilt from
    /// the training splits and checked against the hashes in features.json), or the files given.
    /// The same prompts measure the activation shift.
    #[arg(long, value_name = "N")]
    pub max_prompts: Option<usize>,
    /// Harmful prompts, one per line (default: those of the features stage).
    #[arg(long, value_name = "FILE")]
    pub harmful_file: Option<PathBuf>,
    /// Harmless prompts, one per line (default: those of the features stage).
    #[arg(long, value_name = "FILE")]
    pub harmless_file: Option<PathBuf>,
    /// With an adapter, skip the before/after activation shift (two more passes per set).
    #[arg(long)]
    pub no_shift: bool,
    /// Print explain.json on stdout.
    #[arg(long)]
    pub json: bool,
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The features stage's default prompt sets, rebuilt: the first harmful training prompts and the
/// harmless training instructions ordered by the seeded hash, as many as features.json counts.
fn selection_prompts(sel: &Selection) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let splits = Splits::load().context("loading the prompt splits")?;
    let harmful: Vec<String> = splits
        .train_harmful()
        .iter()
        .take(sel.harmful.count)
        .map(|r| r.text.clone())
        .collect();
    let mut pool: Vec<(f64, String)> = splits
        .alpaca_train()
        .iter()
        .map(|p| (hash_unit(sel.config.seed, &p.prompt), p.prompt.clone()))
        .collect();
    pool.sort_by(|a, b| a.0.total_cmp(&b.0));
    let harmless = pool
        .into_iter()
        .take(sel.harmless.count)
        .map(|(_, p)| p)
        .collect();
    Ok((harmful, harmless))
}

fn prompt_sets(args: &ExplainArgs, sel: &Selection) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut harmful, mut harmless) = match (&args.harmful_file, &args.harmless_file) {
        (Some(h), Some(b)) => (read_lines(h)?, read_lines(b)?),
        (None, None) => {
            let (h, b) = selection_prompts(sel)?;
            for (set, prompts, want) in [
                ("harmful", &h, &sel.harmful),
                ("harmless", &b, &sel.harmless),
            ] {
                if PromptSetInfo::of(prompts) != *want {
                    tracing::warn!(
                        set,
                        "the rebuilt prompt set differs from the one features.json records \
                         (another prompt file?); pass --harmful-file/--harmless-file"
                    );
                }
            }
            (h, b)
        }
        _ => bail!("give both --harmful-file and --harmless-file, or neither"),
    };
    if let Some(n) = args.max_prompts {
        harmful.truncate(n);
        harmless.truncate(n);
    }
    Ok((harmful, harmless))
}

fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} prompts eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let defaults = ExplainConfig::default();
    let cfg = ExplainConfig {
        contexts: args.contexts.unwrap_or(defaults.contexts),
        lens_tokens: args.lens_tokens.unwrap_or(defaults.lens_tokens),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
    };
    let sel_path = args.features.join(SELECTION_FILE);
    let selection =
        Selection::load(&sel_path).with_context(|| format!("loading {}", sel_path.display()))?;
    let specs: Vec<String> = selection.layers.iter().map(|l| l.sae.clone()).collect();
    let saes: Vec<Sae> = load_saes(&specs, &Device::Cpu)?
        .into_iter()
        .map(|s| s.sae)
        .collect();
    let subspace = match &args.subspace {
        Some(dir) => {
            Some(Subspace::load(dir).with_context(|| format!("loading {}", dir.display()))?)
        }
        None => None,
    };
    let adapter_dir = args.model.adapter.clone();
    let (harmful, harmless) = prompt_sets(&args, &selection)?;
    let mut base_args = args.model.clone();
    base_args.adapter = None;
    let mut model = base_args.load()?;

    let corpus: Vec<String> = harmful.iter().chain(&harmless).cloned().collect();
    tracing::info!(
        prompts = corpus.len(),
        features = selection
            .layers
            .iter()
            .map(|l| l.features.len())
            .sum::<usize>(),
        "feature cards"
    );
    let bar = progress(corpus.len() as u64, "contexts");
    let cards = explain::feature_cards(&model, &saes, &selection, &corpus, &cfg, &mut |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();

    let (attribution, shift) = match &adapter_dir {
        Some(dir) => {
            let adapter = Adapter::load(dir, &Device::Cpu)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            let directions = explain::feature_directions(&selection, &saes)?;
            let att = explain::attribution(&adapter, subspace.as_ref(), &directions)?;
            let shift = if args.no_shift {
                None
            } else {
                let bar = progress(2 * corpus.len() as u64, "shift");
                let s = explain::activation_shift_with_adapter(
                    &mut model,
                    dir,
                    &saes,
                    &selection,
                    &harmful,
                    &harmless,
                    cfg.batch_size,
                    &mut |n| bar.set_position(n as u64),
                )?;
                bar.finish_and_clear();
                Some(s)
            };
            (Some(att), shift)
        }
        None => (None, None),
    };
    let explanations = Explanations::new(cfg, corpus.len(), cards, attribution, shift);
    explanations
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanations)?);
    } else {
        print_summary(&explanations)?;
        println!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` on one line, at most `n` characters.
fn clip(text: &str, n: usize) -> String {
    let one: String = text.replace(['\n', '\t', '\r'], " ");
    if one.chars().count() <= n {
        one
    } else {
        format!("{}…", one.chars().take(n - 1).collect::<String>())
    }
}

/// The context's tokens with the most active one in ⟦brackets⟧, cut to about 110 characters
/// around it.
fn marked(c: &explain::Context) -> String {
    let peak = c
        .activations
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let piece = |t: &String| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let before: String = c.tokens[..peak.min(c.tokens.len())]
        .iter()
        .map(String::as_str)
        .collect();
    let before = before.split_whitespace().collect::<Vec<_>>().join(" ");
    let lead = if c
        .tokens
        .get(peak)
        .is_some_and(|t| t.starts_with(char::is_whitespace))
    {
        " "
    } else {
        ""
    };
    // a whitespace-only token (a newline) is shown escaped, so the marker is never empty
    let peak_text = c
        .tokens
        .get(peak)
        .map(|t| match piece(t) {
            p if p.is_empty() => t.escape_debug().to_string(),
            p => p,
        })
        .unwrap_or_default();
    let after: String = c.tokens.iter().skip(peak + 1).map(String::as_str).collect();
    let after = after.split_whitespace().collect::<Vec<_>>().join(" ");
    let after_lead = if c
        .tokens
        .get(peak + 1)
        .is_some_and(|t| t.starts_with(char::is_whitespace))
    {
        " "
    } else {
        ""
    };
    let n_before = before.chars().count();
    let before = if n_before > 45 {
        format!(
            "…{}",
            before.chars().skip(n_before - 44).collect::<String>()
        )
    } else {
        before
    };
    clip(
        &format!("{before}{lead}⟦{peak_text}⟧{after_lead}{after}"),
        110,
    )
}

fn token_list(tokens: &[explain::LensToken], n: usize) -> String {
    tokens
        .iter()
        .take(n)
        .map(|t| format!("{:?}", t.token))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_card(out: &mut impl Write, card: &FeatureCard) -> anyhow::Result<()> {
    let s = &card.score;
    writeln!(
        out,
        "  #{:<2} latent {:<5} diff {:+.3} [{:+.3}, {:+.3}]  fires on {:.0}% harmful / {:.0}% harmless",
        s.rank,
        s.index,
        s.diff,
        s.diff_ci95[0],
        s.diff_ci95[1],
        100.0 * s.freq_harmful,
        100.0 * s.freq_harmless
    )?;
    writeln!(
        out,
        "      promotes:  {}",
        token_list(&card.promoted_tokens, 8)
    )?;
    writeln!(
        out,
        "      suppresses: {}",
        token_list(&card.suppressed_tokens, 8)
    )?;
    for c in card.top_contexts.iter().take(3) {
        writeln!(out, "      {:>6.2}  {}", c.max_activation, marked(c))?;
    }
    Ok(())
}

fn print_summary(e: &Explanations) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "feature cards from {} prompts (strongest 3 per layer):",
        e.corpus_prompts
    )?;
    let mut last = None;
    let mut shown = 0;
    for card in &e.cards {
        if last != Some(card.hook) {
            writeln!(out, "{}", card.hook_name)?;
            last = Some(card.hook);
            shown = 0;
        }
        if shown < 3 {
            print_card(&mut out, card)?;
            shown += 1;
        }
    }
    if let Some(att) = &e.attribution {
        writeln!(
            out,
            "adapter: rank {}, scale {}, {} modules; update energy in the subspace: {}",
            att.rank,
            att.scale,
            att.modules.len(),
            pct(att.share_in_subspace)
        )?;
        writeln!(
            out,
            "{:>6} {:>8} {:>12} {:>9} {:>9} {:>9}  top features (share of energy)",
            "block", "modules", "‖ΔW‖²", "in U", "read", "write"
        )?;
        for l in &att.layers {
            let top: Vec<String> = l
                .top_features
                .iter()
                .take(3)
                .map(|f| format!("{}:{:.1}%", f.index, 100.0 * f.share))
                .collect();
            writeln!(
                out,
                "{:>6} {:>8} {:>12.4e} {:>9} {:>9} {:>9}  {}",
                l.layer,
                l.modules,
                l.update_energy,
                pct(l.share_in_subspace),
                pct(l.read_share_in_subspace),
                pct(l.write_share_in_subspace),
                top.join(" ")
            )?;
        }
        if let Some(m) = largest(&att.modules) {
            writeln!(
                out,
                "largest update: {} (‖ΔW‖ {:.4})",
                m.module, m.update_norm
            )?;
        }
    }
    if let Some(shift) = &e.shift {
        print_shift(&mut out, shift)?;
    }
    Ok(())
}

fn largest(modules: &[ModuleAttribution]) -> Option<&ModuleAttribution> {
    modules
        .iter()
        .max_by(|a, b| a.update_norm.total_cmp(&b.update_norm))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", 100.0 * v))
}

fn print_shift(out: &mut impl Write, shift: &[FeatureShift]) -> anyhow::Result<()> {
    writeln!(
        out,
        "activation shift (strongest 3 per layer): harmful before→after | harmless before→after"
    )?;
    for f in shift.iter().filter(|f| f.rank < 3) {
        writeln!(
            out,
            "  {:<10} latent {:<5} {:>7.3}→{:<7.3} | {:>7.3}→{:<7.3}",
            f.hook.to_string(),
            f.index,
            f.harmful_before,
            f.harmful_after,
            f.harmless_before,
            f.harmless_after
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct E {
        #[command(flatten)]
        a: ExplainArgs,
    }

    #[test]
    fn explain_flags_are_optional_over_the_config_defaults() {
        let e = E::try_parse_from(["x", "--features", "f", "--out", "o.json"])
            .unwrap()
            .a;
        assert_eq!(
            (e.contexts, e.lens_tokens, e.batch_size),
            (None, None, None)
        );
        assert!(e.subspace.is_none() && e.model.adapter.is_none() && !e.no_shift);
        let e = E::try_parse_from([
            "x",
            "--features",
            "f",
            "--out",
            "o.json",
            "--adapter",
            "ad",
            "--subspace",
            "s",
            "--contexts",
            "3",
            "--max-prompts",
            "20",
        ])
        .unwrap()
        .a;
        assert_eq!(e.model.adapter, Some(PathBuf::from("ad")));
        assert_eq!((e.contexts, e.max_prompts), (Some(3), Some(20)));
        assert!(
            E::try_parse_from(["x", "--out", "o"]).is_err(),
            "--features is required"
        );
    }

    #[test]
    fn the_peak_token_is_marked() {
        let c = explain::Context {
            prompt_index: 0,
            prompt: "How to pick".into(),
            max_activation: 3.0,
            tokens: vec!["How".into(), " to".into(), " pick".into()],
            activations: vec![0.0, 1.0, 3.0],
        };
        assert_eq!(marked(&c), "How to ⟦pick⟧");
        let long = explain::Context {
            tokens: (0..40).map(|i| format!(" w{i}")).collect(),
            activations: (0..40).map(|i| if i == 30 { 1.0 } else { 0.0 }).collect(),
            ..c
        };
        let m = marked(&long);
        assert!(m.starts_with('…') && m.contains(" ⟦w30⟧ w31"), "{m}");
        let newline = explain::Context {
            tokens: vec!["Hi".into(), "\n".into()],
            activations: vec![0.0, 2.0],
            ..long
        };
        assert_eq!(marked(&newline), "Hi ⟦\\n⟧");
    }
}
