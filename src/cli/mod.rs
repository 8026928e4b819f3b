//! Argument parsing and dispatch. Arg structs live here and convert into library configs.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod align;
mod assets;
mod attack;
mod bench;
mod compare;
mod data;
mod eval;
mod explain;
mod export;
mod features;
mod frames;
mod gate;
pub mod generate;
mod model_args;
mod report;
mod sae;
mod serve;
mod theory;
mod train;

#[derive(Debug, Parser)]
#[command(name = "sails", version, about = "Interpretable safety alignment: SAE features -> subspace -> LoRA", long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline into one run folder: SAEs → features → subspace → data → LoRA →
    /// evaluation → explanations → report.
    Align(align::AlignArgs),
    /// SAILS against standard LoRA, random and direct bases and full fine-tuning, several seeds.
    Compare(compare::CompareArgs),
    /// Rewrite a run folder's report.html and summary.md from its artifacts.
    Report(report::ReportArgs),
    /// Generate responses to prompts with the model's chat template.
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (streams tokens, shows tokens/s).
    Chat(generate::ChatArgs),
    /// Measure load time, prefill and generation speed, and peak memory.
    Bench(bench::BenchArgs),
    Assets(assets::AssetsArgs),
    Theory(theory::TheoryArgs),
    /// Fine-tune a LoRA adapter (or the full weights) on chat examples, response tokens only.
    Train(train::TrainArgs),
    /// Measure LoRA training throughput (tokens/s) and peak memory.
    BenchTrain(train::BenchTrainArgs),
    /// Measure evaluation generation throughput on JailbreakBench + XSTest safe (the peer's set).
    BenchEval(eval::BenchEvalArgs),
    /// Sparse autoencoders: collect activations, train TopK SAEs, evaluate them.
    Sae(sae::SaeArgs),
    /// Evaluate safety, over-refusal and capability, with intervals; compare two runs.
    Eval(eval::EvalArgs),
    /// Fit a gate that switches an adapter on only for prompts the safety features call harmful.
    Gate(gate::GateArgs),
    /// Judges on their own (calibration on human-labelled refusals).
    Judge(eval::JudgeArgs),
    /// Score SAE features on harmful vs harmless prompts and keep the top-k per layer.
    Features(features::FeaturesArgs),
    /// Selected features → an orthonormal LoRA basis per layer (or a baseline basis).
    Subspace(features::SubspaceArgs),
    /// Data sets built from the prompt splits (the safety fine-tuning set).
    Data(data::DataArgs),
    /// Explain the selected features (top contexts, logit lens) and a trained adapter's update.
    Explain(explain::ExplainArgs),
    /// Write the model with its adapter merged as a Hugging Face directory or a GGUF file.
    Export(export::ExportArgs),
    Serve(serve::ServeArgs),
    /// Attack a model and its adapter (GCG suffixes, jailbreak templates, prefilling) and judge the replies.
    Attack(attack::AttackArgs),
}

/// Takes `dir`'s one-writer lock for this process (named by its command line), or fails at once
/// naming the process that holds it.
fn lock_run_folder(dir: &std::path::Path) -> anyhow::Result<sails::manifest::RunLock> {
    let command: Vec<String> = std::env::args().collect();
    Ok(sails::manifest::RunLock::acquire(dir, &command.join(" "))?)
}

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("sails={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Align(args) => align::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Report(args) => report::run(args),
        Command::Generate(args) => generate::run_generate(args),
        Command::Chat(args) => generate::run_chat(args),
        Command::Bench(args) => bench::run(args),
        Command::Assets(args) => assets::run(args),
        Command::Theory(args) => theory::run(args),
        Command::Train(args) => train::run(args),
        Command::BenchTrain(args) => train::run_bench(args),
        Command::BenchEval(args) => eval::run_bench(args),
        Command::Eval(args) => eval::run(args),
        Command::Gate(args) => gate::run(args),
        Command::Judge(args) => eval::run_judge(args),
        Command::Data(args) => data::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Attack(args) => attack::run(args),
        Command::Sae(args) => sae::run(args),
        Command::Features(args) => features::run_features(args),
        Command::Subspace(args) => features::run_subspace(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
