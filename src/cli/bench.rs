//! `sails bench`: the runtime's speed on the standard shapes, for BENCHMARKS.md.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sails::model::chat::Message;
use sails::model::decoder::{Forward, Logits};
use sails::model::generate::{generate, GenerationConfig};
use serde::{Deserialize, Serialize};

use super::model_args::ModelArgs;

/// Measure model load time, prefill throughput (batch × tokens, all-position logits), greedy
/// generation at batch 1 and 8 (fixed 64 new tokens from ~35-token chat prompts, prefill
/// included), and peak resident memory. Medians over --repeats timed runs after a warm-up.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Timed repetitions per measurement (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// New tokens per generated sequence.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    pub load_ms: u128,
    pub prefill_batch: usize,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub generate_new_tokens: usize,
    pub generate_b1_prompt_tokens: usize,
    pub generate_b1_tokens_per_s: f64,
    pub generate_b8_tokens_per_s: f64,
    pub peak_rss_mib: f64,
}

/// Eight different short requests (the batch-8 shape; the first is the batch-1 prompt).
const MESSAGES: [&str; 8] = [
    "Write a short poem about the sea.",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle in two sentences.",
    "Suggest a name for a friendly robot.",
    "How do I make a cup of green tea?",
    "Summarise the plot of a detective story.",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed<T>(repeats: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut secs = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    Ok(median(secs))
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load()?;
    let decoder = &model.decoder;
    let device = decoder.device().clone();

    let (batch, tokens) = (4, 128);
    let mut rng = StdRng::seed_from_u64(0);
    let vocab = decoder.config.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * tokens)
        .map(|_| rng.random_range(100..vocab))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, tokens), &device)?;
    let prefill_s = timed(args.repeats, || {
        Ok(decoder.forward(
            Forward {
                input_ids: &ids,
                attention_mask: None,
                logits: Logits::All,
                capture: &[],
                edit: None,
            },
            None,
        )?)
    })?;

    let cfg = GenerationConfig {
        max_new_tokens: args.new_tokens,
        ignore_eos: true,
        share_prefix: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = MESSAGES
        .iter()
        .map(|m| model.encode_chat(&[Message::user(*m)]))
        .collect::<Result<_, _>>()?;
    let run = |p: &[Vec<u32>]| -> anyhow::Result<()> {
        let g = generate(decoder, &model.tokenizer, p, &cfg, |_, _| {})?;
        anyhow::ensure!(
            g.iter().all(|g| g.ids.len() == args.new_tokens),
            "a sequence stopped early"
        );
        Ok(())
    };
    let b1_s = timed(args.repeats, || run(&prompts[..1])).context("batch-1 generation")?;
    let b8_s = timed(args.repeats, || run(&prompts)).context("batch-8 generation")?;

    let report = BenchReport {
        model: model.source.path().display().to_string(),
        threads: rayon::current_num_threads(),
        load_ms: model.load_ms,
        prefill_batch: batch,
        prefill_tokens: tokens,
        prefill_tokens_per_s: (batch * tokens) as f64 / prefill_s,
        generate_new_tokens: args.new_tokens,
        generate_b1_prompt_tokens: prompts[0].len(),
        generate_b1_tokens_per_s: args.new_tokens as f64 / b1_s,
        generate_b8_tokens_per_s: (8 * args.new_tokens) as f64 / b8_s,
        peak_rss_mib: peak_rss_mib(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model            {}", report.model);
        println!("threads          {}", report.threads);
        println!("load             {} ms", report.load_ms);
        println!(
            "prefill {}×{}    {:.0} tokens/s",
            batch, tokens, report.prefill_tokens_per_s
        );
        println!(
            "generate b1      {:.1} new tokens/s ({}-token prompt, {} new)",
            report.generate_b1_tokens_per_s, report.generate_b1_prompt_tokens, args.new_tokens
        );
        println!(
            "generate b8      {:.1} new tokens/s",
            report.generate_b8_tokens_per_s
        );
        println!("peak RSS         {:.0} MiB", report.peak_rss_mib);
    }
    Ok(ExitCode::SUCCESS)
}
