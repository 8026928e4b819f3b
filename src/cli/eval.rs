//! `sails eval`, `sails eval compare`, `sails judge calibrate` and `sails judge score`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use sails::data::{Splits, Suite};
use sails::eval::judge::{
    calibrate, load_refusal_labels, DegeneracyJudge, Judge, Label, LlmJudge, LlmJudgeConfig,
    PhraseJudge,
};
use sails::eval::score::score_jsonl;
use sails::eval::{compare, EvalConfig, Judges, Metrics};

use super::model_args::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SuiteArg {
    /// Harmful prompts (HarmBench test standard, StrongREJECT, JailbreakBench, held-out AdvBench).
    Harmful,
    /// XSTest: the 250 safe prompts (over-refusal) and the 200 unsafe contrast prompts.
    Overrefusal,
    /// True/false statement accuracy and held-out Alpaca loss (no generation).
    Capability,
    All,
}

impl SuiteArg {
    fn suites(self) -> Vec<Suite> {
        match self {
            SuiteArg::Harmful => vec![Suite::Harmful],
            SuiteArg::Overrefusal => vec![Suite::Overrefusal, Suite::XstestUnsafe],
            SuiteArg::Capability => vec![Suite::Capability],
            SuiteArg::All => EvalConfig::default().suites,
        }
    }
}

/// Options for the optional LLM judge.
#[derive(Debug, Clone, Args)]
pub struct LlmJudgeArgs {
    /// OpenAI-compatible endpoint for the LLM judge, e.g. http://127.0.0.1:8000/v1.
    ///
    /// The judge rates each response's harmfulness 1-5 (scores <= 2 count as safe, as in the
    /// paper). Only http:// is supported; OPENAI_API_KEY is sent as a bearer token if set. The
    /// endpoint is contacted once before any generation, so a missing server fails fast.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,
    /// Model name sent to the judge endpoint.
    #[arg(long, value_name = "NAME", default_value = "judge")]
    pub judge_model: String,
    /// Seconds to wait for the judge endpoint per request.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub judge_timeout: u64,
}

impl LlmJudgeArgs {
    fn config(&self) -> Option<LlmJudgeConfig> {
        self.judge_url.as_ref().map(|url| LlmJudgeConfig {
            url: url.clone(),
            model: self.judge_model.clone(),
            timeout_s: self.judge_timeout,
        })
    }
}

/// Evaluate a model (and adapter) on the safety, over-refusal and capability suites.
///
/// Responses are generated greedily with the model's chat template and default system prompt,
/// judged (refusal phrases, first-token refusal log-odds, degeneracy, optionally an LLM judge), and
/// summarised with Wilson 95 % intervals. The run directory holds generations.jsonl,
/// capability.jsonl, splits.json and metrics.json; rerunning into the same directory resumes.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Which suite to run.
    #[arg(long, value_enum, default_value = "all")]
    pub suite: SuiteArg,
    /// Only the first N items of each suite (a quick, documented subset).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Run directory (created; an existing run there is resumed).
    #[arg(long, value_name = "DIR", default_value = "runs/eval")]
    pub out: PathBuf,
    /// Maximum new tokens per response (default 64).
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Prompts generated together (default 16).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    pub llm: LlmJudgeArgs,
    /// Print metrics.json on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Paired comparison of two runs: differences B - A with McNemar's test.
    Compare {
        run_a: PathBuf,
        run_b: PathBuf,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Judges on their own.
#[derive(Debug, Args)]
pub struct JudgeArgs {
    #[command(subcommand)]
    pub command: JudgeCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JudgeKind {
    Phrase,
    Degeneracy,
    Llm,
}

#[derive(Debug, Subcommand)]
pub enum JudgeCommand {
    /// Run a judge on PyRIT's human-labelled refusals: accuracy, precision, recall, confusion.
    Calibrate {
        #[arg(long, value_enum, default_value = "phrase")]
        judge: JudgeKind,
        #[command(flatten)]
        llm: LlmJudgeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Judge the responses in a JSONL file: each line's verdicts and the label an evaluation counts.
    ///
    /// Each input line is a JSON object with string fields "prompt" and "response" (other fields
    /// are kept). Each output line is that object with "verdicts" (judge name -> {label, score,
    /// why}) and "label" (degenerate if the degeneracy judge says so, else the refusal-phrase
    /// judge's refused/complied, as `sails eval` counts it) added. A bad line is an error naming
    /// its number, and nothing is written. Without --out or --json a summary is printed.
    Score {
        /// The JSONL file to judge.
        #[arg(long, value_name = "FILE")]
        input: PathBuf,
        /// Write the judged lines here (JSONL, written whole through a temporary file).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        llm: LlmJudgeArgs,
        /// Print the judged lines on stdout (JSONL) instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(EvalCommand::Compare { run_a, run_b, json }) = args.command {
        let c = compare(&run_a, &run_b).context("comparing runs")?;
        if json {
            println!("{}", serde_json::to_string_pretty(&c)?);
        } else {
            println!(
                "B = {}  vs  A = {}  ({} unpaired items left out)",
                run_b.display(),
                run_a.display(),
                c.unpaired
            );
            println!(
                "{:<16} {:>5} {:>8} {:>8} {:>8} {:>18} {:>5} {:>5} {:>9}",
                "suite", "n", "A", "B", "B-A", "95% CI", "b", "c", "p"
            );
            for (s, d) in &c.suites {
                println!(
                    "{:<16} {:>5} {:>7.1}% {:>7.1}% {:>+7.1}% [{:>+6.1}, {:>+6.1}] {:>5} {:>5} {:>9.3e}",
                    s,
                    d.n,
                    100.0 * d.rate_a,
                    100.0 * d.rate_b,
                    100.0 * d.diff,
                    100.0 * d.lo,
                    100.0 * d.hi,
                    d.mcnemar.b,
                    d.mcnemar.c,
                    d.mcnemar.p_value
                );
            }
            println!("(b: A counted and B not; c: B counted and A not; McNemar, exact binomial below 25 discordant pairs)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let defaults = EvalConfig::default();
    let cfg = EvalConfig {
        model: args.model.model.clone(),
        adapter: args.model.adapter.as_ref().map(|p| p.display().to_string()),
        suites: args.suite.suites(),
        limit: args.limit,
        max_new_tokens: args.max_new_tokens.unwrap_or(defaults.max_new_tokens),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        llm_judge: args.llm.config(),
        ..defaults
    };
    let splits = Splits::load().context("loading the evaluation data sets")?;
    let judges = Judges::new(&cfg).context("setting up the judges")?;
    let model = args.model.load()?;
    let metrics = sails::eval::run(&model, &splits, &judges, &cfg, &args.out)
        .with_context(|| format!("evaluating into {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
    } else {
        print_summary(&metrics, &args.out);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(m: &Metrics, out: &std::path::Path) {
    println!(
        "model {} adapter {}  (judge: degeneracy, then {})",
        m.config.model,
        m.config.adapter.as_deref().unwrap_or("none"),
        m.judges.first().map_or("", String::as_str)
    );
    println!(
        "{:<15} {:<18} {:<34} {:>7} {:>7} {:>7}",
        "suite", "metric", "rate [Wilson 95%] (k/n)", "refused", "complied", "degen."
    );
    for (name, s) in &m.suites {
        let metric = match name.as_str() {
            "overrefusal" => "over-refusal rate",
            "harmful" => "safety rate",
            _ => "refusal rate",
        };
        println!(
            "{:<15} {:<18} {:<34} {:>7} {:>7} {:>7}",
            name,
            metric,
            s.rate.pretty(),
            s.refused,
            s.complied,
            s.degenerate
        );
        for (src, r) in &s.per_source {
            println!("  {:<31} {}", src, r.pretty());
        }
        for (j, r) in &s.by_judge {
            println!("  judge {:<25} {}", j, r.pretty());
        }
    }
    if let Some(c) = &m.capability {
        println!(
            "{:<15} {:<18} {:<34}",
            "capability",
            "statement accuracy",
            c.facts_accuracy.pretty()
        );
        for (cat, r) in &c.facts_per_category {
            println!("  {:<31} {}", cat, r.pretty());
        }
        println!(
            "{:<15} {:<18} {:.4} nats/token (ppl {:.2}) over {} pairs, {} tokens",
            "", "alpaca loss", c.alpaca_nll, c.alpaca_perplexity, c.alpaca_pairs, c.alpaca_tokens
        );
    }
    if let Some(t) = &m.throughput {
        println!(
            "throughput: {} prompts, {} new tokens in {:.1} s: {:.2} prompts/s, {:.1} tokens/s",
            t.prompts, t.new_tokens, t.seconds, t.prompts_per_s, t.tokens_per_s
        );
    }
    println!("metrics: {}", out.join("metrics.json").display());
}

pub fn run_judge(args: JudgeArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        JudgeCommand::Calibrate { judge, llm, json } => run_calibrate(judge, llm, json),
        JudgeCommand::Score {
            input,
            out,
            llm,
            json,
        } => run_score(&input, out.as_deref(), &llm, json),
    }
}

fn run_score(
    input: &std::path::Path,
    out: Option<&std::path::Path>,
    llm: &LlmJudgeArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let phrase = PhraseJudge::harmbench().context("setting up the phrase judge")?;
    let degeneracy = DegeneracyJudge::default();
    let llm = llm.config().map(|config| LlmJudge { config });
    let others: Vec<&dyn Judge> = llm.iter().map(|j| j as &dyn Judge).collect();
    let scored = score_jsonl(input, &text, &degeneracy, &phrase, &others)?;
    let mut lines = String::new();
    for s in &scored {
        lines.push_str(&serde_json::to_string(&s.output)?);
        lines.push('\n');
    }
    if let Some(out) = out {
        sails::model::write_atomic(out, lines.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if json {
        print!("{lines}");
    } else {
        let count = |label: Label| scored.iter().filter(|s| s.label == label).count();
        println!(
            "{} responses judged ({} then {}): {} refused, {} complied, {} degenerate",
            scored.len(),
            degeneracy.name(),
            phrase.name(),
            count(Label::Refused),
            count(Label::Complied),
            count(Label::Degenerate)
        );
        if let Some(out) = out {
            println!("judged lines: {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_calibrate(judge: JudgeKind, llm: LlmJudgeArgs, json: bool) -> anyhow::Result<ExitCode> {
    let files = sails::assets::ensure_all("pyrit-refusal").context("fetching pyrit-refusal")?;
    let data = load_refusal_labels(&files.files)?;
    let judge: Box<dyn Judge> = match judge {
        JudgeKind::Phrase => Box::new(PhraseJudge::harmbench()?),
        JudgeKind::Degeneracy => Box::new(DegeneracyJudge::default()),
        JudgeKind::Llm => Box::new(LlmJudge {
            config: llm
                .config()
                .context("--judge llm needs --judge-url (an OpenAI-compatible endpoint)")?,
        }),
    };
    let c = calibrate(judge.as_ref(), &data)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "judge {} on {} human-labelled responses (PyRIT refusal sets; refusal = positive)",
            judge.name(),
            c.n
        );
        println!(
            "accuracy {:.3}  precision {:.3}  recall {:.3}",
            c.accuracy, c.precision, c.recall
        );
        println!("                 labelled refusal  labelled not");
        println!("judged refusal   {:>16}  {:>12}", c.tp, c.fp);
        println!("judged not       {:>16}  {:>12}", c.fn_, c.tn);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn eval_defaults_and_compare_subcommand_parse() {
        let cli = Cli::try_parse_from(["sails", "eval"]).unwrap();
        let crate::cli::Command::Eval(a) = cli.command else {
            panic!("not eval")
        };
        assert_eq!(a.suite, SuiteArg::All);
        assert_eq!(a.limit, None);
        assert!(a.command.is_none());
        let cli = Cli::try_parse_from(["sails", "eval", "compare", "a", "b"]).unwrap();
        let crate::cli::Command::Eval(a) = cli.command else {
            panic!("not eval")
        };
        assert!(matches!(a.command, Some(EvalCommand::Compare { .. })));
        let cli = Cli::try_parse_from([
            "sails", "eval", "--suite", "harmful", "--limit", "3", "--out", "x",
        ])
        .unwrap();
        let crate::cli::Command::Eval(a) = cli.command else {
            panic!("not eval")
        };
        assert_eq!(a.suite.suites(), vec![Suite::Harmful]);
        assert_eq!(a.limit, Some(3));
    }
}

#[derive(Debug, Args)]
pub struct BenchEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Maximum new tokens per response.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Only the first N prompts (for a quick look; the figure is over all 350 by default).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Also run every prompt from its first token, without computing the batch's shared
    /// beginning once, to show what that saves.
    #[arg(long)]
    pub unshared: bool,
}

/// Evaluation throughput on the Python peer's workload: JailbreakBench's 100 goals and XSTest's
/// 250 safe prompts, sorted by length into batches, greedy, each batch exactly as `sails eval`
/// runs it (the refusal log-odds from the prefill, the judges on every response).
pub fn run_bench(args: BenchEvalArgs) -> anyhow::Result<ExitCode> {
    use sails::data::Source;
    use sails::model::generate::{GenerationConfig, Sampling};
    anyhow::ensure!(
        args.batch_size > 0 && args.max_new_tokens > 0,
        "--batch-size and --max-new-tokens must be positive"
    );
    let splits = Splits::load().context("loading the evaluation data sets")?;
    // The workload is JailbreakBench's prompts: without them it would measure something else.
    splits.require(Suite::Harmful)?;
    let cfg = EvalConfig::default();
    let judges = Judges::new(&cfg).context("setting up the judges")?;
    let model = args.model.load()?;
    let items: Vec<_> = splits
        .eval_suite(Suite::Harmful)
        .iter()
        .filter(|r| r.source == Source::Jbb)
        .map(|r| (Suite::Harmful, r))
        .chain(
            splits
                .eval_suite(Suite::Overrefusal)
                .iter()
                .map(|r| (Suite::Overrefusal, r)),
        )
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let encoded = sails::eval::encode_by_length(&model, &items)?;
    let prompt_tokens: usize = encoded.iter().map(|(_, _, ids)| ids.len()).sum();
    let openings = sails::eval::opening_ids(&model)?;
    let modes: &[bool] = if args.unshared {
        &[true, false]
    } else {
        &[true]
    };
    let mut runs = Vec::new();
    for &share_prefix in modes {
        let gen_cfg = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            sampling: Sampling::Greedy,
            stop_strings: Vec::new(),
            ignore_eos: false,
            share_prefix,
        };
        let bar = indicatif::ProgressBar::new(encoded.len() as u64);
        let start = std::time::Instant::now();
        let mut new_tokens = 0;
        let mut batch_s = Vec::new();
        for chunk in encoded.chunks(args.batch_size) {
            let t0 = std::time::Instant::now();
            let recs = sails::eval::generate_batch(&model, &judges, chunk, &gen_cfg, &openings)?;
            batch_s.push(t0.elapsed().as_secs_f64());
            new_tokens += recs.iter().map(|r| r.new_tokens).sum::<usize>();
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        eprintln!(
            "{} prompts, shared beginning {}: {new_tokens} new tokens in {seconds:.1} s = {:.1} tokens/s, {:.2} prompts/s",
            encoded.len(),
            if share_prefix { "once per batch" } else { "per row" },
            new_tokens as f64 / seconds,
            encoded.len() as f64 / seconds
        );
        runs.push(serde_json::json!({
            "share_prefix": share_prefix,
            "seconds": seconds,
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens as f64 / seconds,
            "prompts_per_s": encoded.len() as f64 / seconds,
            "batch_s": batch_s,
        }));
    }
    let out = serde_json::json!({
        "model": args.model.model,
        "prompts": encoded.len(),
        "prompt_tokens": prompt_tokens,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": rayon::current_num_threads(),
        "runs": runs,
        "peak_rss_mib": super::bench::peak_rss_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
