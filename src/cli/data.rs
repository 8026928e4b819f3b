//! `sails data build`: the safety fine-tuning set (harmful → refusal, harmless → helpful).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sails::data::sft::{self, HarmlessCount, HelpfulSource, ModelAnswers, SftConfig, SftSet};
use sails::model::chat::Message;
use sails::model::generate::{generate, GenerationConfig, Sampling};
use sails::model::load::ChatModel;
use serde::{Deserialize, Serialize};

use super::model_args::ModelArgs;

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Build the fine-tuning set: train.jsonl, heldout.jsonl and sft_manifest.json.
    Build(BuildArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HelpfulArg {
    /// The Alpaca-GPT4 reference answers (no model needed).
    Reference,
    /// The base model's own greedy answers (limits drift).
    Model,
}

impl From<HelpfulArg> for HelpfulSource {
    fn from(h: HelpfulArg) -> Self {
        match h {
            HelpfulArg::Reference => HelpfulSource::Reference,
            HelpfulArg::Model => HelpfulSource::Model,
        }
    }
}

/// Build the safety fine-tuning set from the training side of the data split.
///
/// Harmful training prompts (AdvBench) get varied refusals composed from fixed pools; Alpaca
/// prompts get their reference answer or the base model's own; benign-but-edgy prompts always get
/// the model's own answer (they have no reference). No prompt of any evaluation suite or of the
/// held-out Alpaca items can enter: the build fails if one would. Model answers are cached in
/// DIR/answers.jsonl, so an interrupted build resumes without generating them again.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory: train.jsonl, heldout.jsonl, sft_manifest.json, answers.jsonl.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    keep_out: super::eval::KeepOutArgs,
    /// Fine-tuning set config (TOML, SftConfig fields); the flags below override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Where helpful answers to Alpaca prompts come from.
    ///
    /// `reference` uses the Alpaca-GPT4 answers; `model` generates the base model's own (greedy),
    /// so training changes the model's everyday answers less. Default: reference.
    #[arg(long, value_enum)]
    helpful: Option<HelpfulArg>,
    /// Seed of the subsets, held-out choice, order and refusal wording.
    #[arg(long)]
    seed: Option<u64>,
    /// Harmful examples (default: every harmful prompt of the training split).
    #[arg(long, value_name = "N")]
    harmful: Option<usize>,
    /// Exactly this many Alpaca examples (instead of a ratio to the harmful ones).
    #[arg(long, value_name = "N", conflicts_with = "per_harmful")]
    harmless: Option<usize>,
    /// Helpful examples (Alpaca + benign-but-edgy) per harmful example (default 1).
    #[arg(long, value_name = "RATIO")]
    per_harmful: Option<f64>,
    /// Leave out the benign-but-edgy prompts (then no model is needed with --helpful reference).
    #[arg(long)]
    no_edgy: bool,
    /// At most this many benign-but-edgy prompts.
    #[arg(long, value_name = "N")]
    max_edgy: Option<usize>,
    /// Also refuse each harmful prompt asked as a question ("How would I …?"); AdvBench's
    /// prompts are all commands.
    #[arg(long)]
    question_forms: bool,
    /// Also train on the 150 contrast pairs: a harmful question refused, a harmless question on a
    /// neighbouring topic answered by the model ("How do I make a pipe bomb?" / "How do I bake
    /// cookies?").
    #[arg(long)]
    refusal_pairs: bool,
    /// Also write preference pairs for DPO training (pairs.jsonl, heldout_pairs.jsonl).
    ///
    /// One pair per example: a harmful prompt's refusal is preferred to the base model's own
    /// greedy answer (generated here, so this needs the model), any other prompt's answer to the
    /// composed refusal of that prompt. `sails train --dpo-weight` trains on them.
    #[arg(long)]
    preference_pairs: bool,
    /// Share of each kind held out (default 0.1).
    #[arg(long, value_name = "FRAC")]
    heldout_frac: Option<f64>,
    /// Token budget of each model answer (default 128).
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Prompts generated together (left-padded batch).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    model: ModelArgs,
    /// Print sft_manifest.json on stdout instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DataArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Build(a) => build(a),
    }
}

/// Defaults < config file < flags.
fn config(args: &BuildArgs) -> anyhow::Result<SftConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => SftConfig::default(),
    };
    if let Some(h) = args.helpful {
        cfg.helpful = h.into();
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(n) = args.harmful {
        cfg.harmful = Some(n);
    }
    if let Some(n) = args.harmless {
        cfg.harmless = HarmlessCount::Exactly(n);
    }
    if let Some(r) = args.per_harmful {
        cfg.harmless = HarmlessCount::PerHarmful(r);
    }
    if args.no_edgy {
        cfg.include_edgy = false;
    }
    if args.question_forms {
        cfg.question_forms = true;
    }
    if args.refusal_pairs {
        cfg.refusal_pairs = true;
    }
    if args.preference_pairs {
        cfg.preference_pairs = true;
    }
    if let Some(n) = args.max_edgy {
        cfg.max_edgy = Some(n);
    }
    if let Some(f) = args.heldout_frac {
        cfg.heldout_frac = f;
    }
    if let Some(n) = args.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// One line of `answers.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedAnswer {
    generator: String,
    prompt: String,
    answer: String,
}

const ANSWERS_FILE: &str = "answers.jsonl";

/// Reads the answer cache. A last line cut short by an interruption is dropped (and the file
/// rewritten without it); any other bad line, or an answer made by another generator, is an error.
fn read_cache(path: &Path, generator: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut good = String::new();
    for (i, line) in lines.iter().enumerate() {
        let rec: CachedAnswer = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                tracing::warn!(path = %path.display(), "dropping an unfinished last line");
                break;
            }
            Err(e) => bail!("{}:{}: {e}", path.display(), i + 1),
        };
        if rec.generator != generator {
            bail!(
                "{}:{}: answer made by {:?}, but this build uses {:?}; use another --out or \
                 delete the file",
                path.display(),
                i + 1,
                rec.generator,
                generator
            );
        }
        good.push_str(line);
        good.push('\n');
        out.insert(rec.prompt, rec.answer);
    }
    if good.len() != text.len() {
        sails::model::write_atomic(path, good.as_bytes())?;
    }
    Ok(out)
}

/// Answers prompts with the model, from the cache where it can, loading the model only when a
/// prompt is not cached.
struct Answerer<'a> {
    args: &'a BuildArgs,
    generator: String,
    max_new_tokens: usize,
    cache_path: PathBuf,
    model: Option<ChatModel>,
}

impl Answerer<'_> {
    fn answer(&mut self, prompts: &[String]) -> anyhow::Result<Vec<String>> {
        let mut cache = read_cache(&self.cache_path, &self.generator)?;
        let mut missing: Vec<&String> =
            prompts.iter().filter(|p| !cache.contains_key(*p)).collect();
        missing.sort();
        missing.dedup();
        tracing::info!(
            prompts = prompts.len(),
            cached = prompts.len() - missing.len(),
            to_generate = missing.len(),
            "model answers"
        );
        if !missing.is_empty() {
            if self.model.is_none() {
                self.model = Some(self.args.model.load()?);
            }
            let model = self.model.as_ref().context("model loaded just above")?;
            let mut encoded = missing
                .iter()
                .map(|p| Ok((*p, model.encode_chat(&[Message::user(p.as_str())])?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Similar lengths together: less padding.
            encoded.sort_by_key(|(_, ids)| ids.len());
            let gen_cfg = GenerationConfig {
                max_new_tokens: self.max_new_tokens,
                sampling: Sampling::Greedy,
                stop_strings: Vec::new(),
                ignore_eos: false,
                share_prefix: true,
            };
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.cache_path)
                .with_context(|| format!("opening {}", self.cache_path.display()))?;
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(encoded.len() as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} answers  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            for chunk in encoded.chunks(self.args.batch_size.max(1)) {
                let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
                let gens = generate(&model.decoder, &model.tokenizer, &ids, &gen_cfg, |_, _| {})?;
                let mut lines = String::new();
                for ((prompt, _), g) in chunk.iter().zip(gens) {
                    let rec = CachedAnswer {
                        generator: self.generator.clone(),
                        prompt: (*prompt).clone(),
                        answer: g.text,
                    };
                    lines.push_str(&serde_json::to_string(&rec)?);
                    lines.push('\n');
                    cache.insert(rec.prompt, rec.answer);
                }
                file.write_all(lines.as_bytes())
                    .and_then(|_| file.flush())
                    .with_context(|| format!("writing {}", self.cache_path.display()))?;
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
        }
        prompts
            .iter()
            .map(|p| {
                cache
                    .get(p)
                    .cloned()
                    .with_context(|| format!("no answer for {p:?} after generation"))
            })
            .collect()
    }
}

fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let cfg = config(&args)?;
    let splits = args.keep_out.splits()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let needs_model = cfg.helpful == HelpfulSource::Model
        || cfg.include_edgy
        || cfg.refusal_pairs
        || cfg.preference_pairs;
    let generator = format!(
        "model={} adapter={} dtype={:?} decode_weights={:?} greedy max_new_tokens={}",
        args.model.model,
        args.model
            .adapter
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
        args.model.dtype,
        args.model.decode_weights,
        cfg.max_new_tokens
    );
    let mut answerer = Answerer {
        args: &args,
        generator: generator.clone(),
        max_new_tokens: cfg.max_new_tokens,
        cache_path: args.out.join(ANSWERS_FILE),
        model: None,
    };
    let mut callback = |prompts: &[String]| -> Result<Vec<String>, sft::AnswerError> {
        answerer
            .answer(prompts)
            .map_err(|e| format!("{e:#}").into())
    };
    let answers = if needs_model {
        Some(ModelAnswers {
            source: generator,
            answer: &mut callback,
        })
    } else {
        None
    };
    let mut set: SftSet = sft::build(&splits, &cfg, answers).context("building the SFT set")?;
    set.save(&args.out)
        .with_context(|| format!("saving to {}", args.out.display()))?;

    let m = &set.manifest;
    if args.json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        let row = |name: &str, c: &sft::KindCounts| {
            format!(
                "{name:<8} {:>6} harmful→refusal  {:>6} harmless→helpful  {:>6} edgy→helpful  ({} total)",
                c.harmful_refusal,
                c.harmless_helpful,
                c.edgy_helpful,
                c.total()
            )
        };
        println!("{}", row("train", &m.train_counts));
        println!("{}", row("heldout", &m.heldout_counts));
        if let Some(p) = &m.pairs {
            println!(
                "pairs    {:>6} train  {:>6} heldout  ({} harmful without a model answer)",
                p.train,
                p.heldout,
                p.no_rejected.len()
            );
        }
        println!(
            "refusals: {} distinct over {} harmful examples (pools {}×{}×{})",
            m.distinct_refusals,
            m.train_counts.harmful_refusal + m.heldout_counts.harmful_refusal,
            m.refusal_pools[0],
            m.refusal_pools[1],
            m.refusal_pools[2]
        );
        // Duplicates name the prompt they repeat; the summary only counts them.
        let mut reasons: HashMap<String, usize> = HashMap::new();
        for d in &m.dropped {
            let reason = if d.reason.starts_with("duplicate of ") {
                "duplicate prompt"
            } else {
                d.reason.as_str()
            };
            *reasons.entry(format!("{}: {reason}", d.kind)).or_default() += 1;
        }
        let mut reasons: Vec<_> = reasons.into_iter().collect();
        reasons.sort();
        for (reason, n) in reasons {
            println!("dropped {n:>4}  {reason}");
        }
        println!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: BuildArgs,
    }

    fn parse(extra: &[&str]) -> BuildArgs {
        let mut argv = vec!["t", "--out", "o"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn no_flags_give_the_library_defaults() {
        let a = parse(&[]);
        assert_eq!(config(&a).unwrap(), SftConfig::default());
        assert_eq!(a.batch_size, 8);
        assert_eq!(a.model.model, "default");
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.toml");
        std::fs::write(
            &path,
            "seed = 7\nheldout_frac = 0.2\nharmless = { exactly = 40 }\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let cfg = config(&parse(&["--config", p, "--seed", "9"])).unwrap();
        assert_eq!(cfg.seed, 9);
        assert_eq!(cfg.heldout_frac, 0.2);
        assert_eq!(cfg.harmless, HarmlessCount::Exactly(40));
        assert!(cfg.include_edgy);
        let cfg = config(&parse(&[
            "--config",
            p,
            "--per-harmful",
            "2",
            "--no-edgy",
            "--helpful",
            "model",
            "--harmful",
            "8",
        ]))
        .unwrap();
        assert_eq!(cfg.harmless, HarmlessCount::PerHarmful(2.0));
        assert!(!cfg.include_edgy);
        assert_eq!(cfg.helpful, HelpfulSource::Model);
        assert_eq!(cfg.harmful, Some(8));
        assert!(!cfg.preference_pairs);
        assert!(
            config(&parse(&["--preference-pairs"]))
                .unwrap()
                .preference_pairs
        );
    }

    #[test]
    fn contradictory_or_out_of_range_flags_are_refused() {
        let argv = ["t", "--out", "o", "--harmless", "3", "--per-harmful", "1"];
        assert!(T::try_parse_from(argv).is_err());
        assert!(config(&parse(&["--heldout-frac", "1.5"])).is_err());
        assert!(T::try_parse_from(["t", "--out", "o", "--helpful", "both"]).is_err());
    }

    #[test]
    fn answer_cache_drops_an_unfinished_last_line_and_refuses_another_generator() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ANSWERS_FILE);
        let line = |p: &str| {
            serde_json::to_string(&CachedAnswer {
                generator: "g".into(),
                prompt: p.into(),
                answer: "ans".into(),
            })
            .unwrap()
        };
        std::fs::write(&path, format!("{}\n{}\n{{\"gener", line("a"), line("b"))).unwrap();
        let cache = read_cache(&path, "g").unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n{}\n", line("a"), line("b"))
        );
        assert!(read_cache(&path, "other").is_err());
        std::fs::write(&path, format!("not json\n{}\n", line("a"))).unwrap();
        assert!(read_cache(&path, "g").is_err());
    }
}
