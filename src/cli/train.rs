//! `sails train` (LoRA / full SFT on chat examples) and `sails bench-train` (training throughput).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sails::data::sft::{Kind, PreferencePair, SftSet};
use sails::lora::{self, LoraConfig, LoraInit};
use sails::model::chat::Message;
use sails::model::load::{ChatModel, ModelSource};
use sails::subspace::Subspace;
use sails::train::{
    self, tokenize_chat, AdamW, Batch, ChatExample, RunOptions, Target, TokenizedPair, TrainConfig,
    TrainData,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// PEFT default: A kaiming-uniform, B = 0.
    Kaiming,
    /// PEFT "gaussian": A ~ N(0, 1/r²), B = 0.
    Gaussian,
    /// SAILS: A = Uᵀ (q, k, v, gate, up) or B = U (o, down) from --basis; the other factor 0.
    Subspace,
    /// Full fine-tuning of the targeted weights (no adapter).
    Full,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Model: `default` (SmolLM2-135M-Instruct), a GGUF file or a Hugging Face directory.
    #[arg(long, short = 'm', default_value = "default", value_name = "MODEL")]
    model: String,
    /// Training examples: JSON lines `{"messages": [...]}`, or a fine-tuning data folder.
    ///
    /// In a JSON-lines file the last message of each line is the assistant response the loss is
    /// taken on (its tokens and the end-of-turn token). A folder is what `sails data build`
    /// writes: its train.jsonl is trained on, its heldout.jsonl is the held-out set, and its
    /// sft_manifest.json gives each example's kind; every kind but harmful-refusal is a retain
    /// example for --retain-kl. Its pairs.jsonl and heldout_pairs.jsonl (`data build
    /// --preference-pairs`) are the preference pairs of --dpo-weight.
    #[arg(long, value_name = "FILE.jsonl|DIR")]
    data: PathBuf,
    /// Held-out examples (JSON lines) for the loss every `eval_every` steps; not with a data
    /// folder, which brings its own.
    #[arg(long, value_name = "FILE.jsonl")]
    eval_data: Option<PathBuf>,
    /// Output directory: adapter/ (PEFT layout), checkpoints/, loss_curve.jsonl.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue from the latest checkpoint in --out (same config and init required).
    #[arg(long)]
    resume: bool,
    /// How the adapter starts.
    #[arg(long, value_enum, default_value = "kaiming")]
    init: InitArg,
    /// Subspace bases for --init subspace: a `sails subspace` folder or its
    /// `subspace.safetensors` (one `(d_model, rank)` basis per layer, the residual stream
    /// entering block l; blocks without one take the nearest layer's). Its rank must be --rank.
    #[arg(long, value_name = "DIR|subspace.safetensors")]
    basis: Option<PathBuf>,
    /// Keep the basis factor fixed (no gradient), so updates stay in the subspace.
    #[arg(long)]
    freeze_basis: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (scale alpha/rank).
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Comma-separated module suffixes to adapt.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    targets: Vec<String>,
    /// rsLoRA scaling alpha/√rank.
    #[arg(long)]
    rslora: bool,
    /// Seed of the adapter's random init.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
    /// Training config (TOML, TrainConfig fields; those left out take their defaults); flags below
    /// override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Peak learning rate; the cosine floor becomes a tenth of it.
    #[arg(long)]
    lr: Option<f64>,
    /// Optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Warm-up steps.
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Data-order seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Weight λ of the retain term KL(base ‖ adapted) on the benign examples' response tokens.
    ///
    /// Each step's loss becomes (Σ NLL + λ·Σ KL) / targets, where the KL compares the next-token
    /// distributions of the model with and without the adapter on the retain examples, so the
    /// adapter changes their answers only as far as the NLL asks. Needs --data to be a data
    /// folder (its manifest says which examples are benign). 0 (the default) turns it off; the
    /// held-out loss stays the NLL alone either way.
    #[arg(long, value_name = "LAMBDA")]
    retain_kl: Option<f64>,
    /// Weight W of the DPO preference term (0, the default, turns it off).
    ///
    /// Each step's loss becomes the SFT mean NLL + W · the mean over the step's preference pairs
    /// of −log σ(β·[(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log
    /// π_ref(rejected))]), log π being a response's summed token log-probs and π_ref the model
    /// with the adapter off, computed once into --out/dpo_reference.json. Needs --data to be a
    /// data folder built with --preference-pairs. A step draws batch_size pairs
    /// (dpo_pairs_per_step in --config), run batch_size / 2 pairs per micro-batch; the loss curve
    /// gains dpo_loss, dpo_margin and dpo_accuracy, the held-out records the same on the held-out
    /// pairs.
    #[arg(long, value_name = "W")]
    dpo_weight: Option<f64>,
    /// DPO's β: the scale of the log-ratio margin (default 0.1).
    #[arg(long, value_name = "BETA")]
    dpo_beta: Option<f64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    // A second Ctrl-C ends the process at once.
    // SAFETY: `signal` is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

fn install_sigint() {
    // SAFETY: installs a handler that only stores to an atomic and resets the disposition.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<ChatExample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: not a {{\"messages\": [...]}} line",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// What `--data` and `--eval-data` hold.
struct Examples {
    /// Where the training examples were read (for error messages).
    train_path: PathBuf,
    train: Vec<ChatExample>,
    /// Per training example: whether it is a retain (benign) example.
    retain: Vec<bool>,
    eval: Option<(PathBuf, Vec<ChatExample>)>,
    /// The data folder's preference pairs (training, held-out); `None` for a JSON-lines file or a
    /// folder built without them.
    pairs: Option<(Vec<PreferencePair>, Vec<PreferencePair>)>,
}

/// The benign kinds: every one but the refusals, whose answers the adapter is there to change.
fn is_retain(kind: Kind) -> bool {
    kind != Kind::HarmfulRefusal
}

/// Reads a JSON-lines file (no example is a retain example) or a data folder (kinds from its
/// manifest, held-out part from its heldout.jsonl).
fn read_examples(data: &Path, eval_data: Option<&Path>) -> anyhow::Result<Examples> {
    if !data.is_dir() {
        let train = read_jsonl(data)?;
        let eval = match eval_data {
            Some(p) => Some((p.to_path_buf(), read_jsonl(p)?)),
            None => None,
        };
        return Ok(Examples {
            train_path: data.to_path_buf(),
            retain: vec![false; train.len()],
            train,
            eval,
            pairs: None,
        });
    }
    if let Some(p) = eval_data {
        bail!(
            "--eval-data {} with the data folder {}: the folder's heldout.jsonl is the held-out set",
            p.display(),
            data.display()
        );
    }
    let set = SftSet::load(data)
        .with_context(|| format!("reading the data folder {}", data.display()))?;
    Ok(Examples {
        train_path: data.join(sails::data::sft::TRAIN_FILE),
        retain: set
            .manifest
            .train
            .iter()
            .map(|m| is_retain(m.kind))
            .collect(),
        train: set.train,
        eval: Some((data.join(sails::data::sft::HELDOUT_FILE), set.heldout)),
        pairs: set
            .manifest
            .pairs
            .is_some()
            .then_some((set.pairs, set.heldout_pairs)),
    })
}

/// Tokenizes each pair's prompt with its chosen and its rejected answer.
fn tokenize_pairs(
    model: &ChatModel,
    path: &Path,
    pairs: &[PreferencePair],
) -> anyhow::Result<Vec<TokenizedPair>> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let side = |answer: &str| {
                let chat = ChatExample {
                    messages: vec![
                        Message::user(p.prompt.clone()),
                        Message::assistant(answer.to_owned()),
                    ],
                };
                tokenize_chat(&model.tokenizer, &model.template, &chat, i)
                    .with_context(|| format!("{}: pair {:?}", path.display(), p.id))
            };
            Ok(TokenizedPair {
                id: p.id.clone(),
                chosen: side(&p.chosen)?,
                rejected: side(&p.rejected)?,
            })
        })
        .collect()
}

/// The bases of a `sails subspace` folder (given as the folder or its `subspace.safetensors`),
/// read and checked by [`Subspace::load`]; their rank must be the adapter's.
fn read_bases(path: &Path, rank: usize) -> anyhow::Result<BTreeMap<usize, Tensor>> {
    let dir = if path.is_dir() {
        path
    } else if path.file_name() == Some(std::ffi::OsStr::new(sails::subspace::BASIS_FILE)) {
        path.parent().unwrap_or(Path::new("."))
    } else {
        bail!(
            "--basis {}: expected a `sails subspace` folder or its {}",
            path.display(),
            sails::subspace::BASIS_FILE
        );
    };
    let subspace = Subspace::load(dir)
        .with_context(|| format!("reading the subspace in {}", dir.display()))?;
    let basis_rank = subspace.summary.config.rank;
    if basis_rank != rank {
        bail!(
            "--basis {}: the subspace has rank {basis_rank}, the adapter --rank {rank}; \
             build the subspace with --rank {rank} or train with --rank {basis_rank}",
            path.display()
        );
    }
    Ok(subspace.tensors(&Device::Cpu)?)
}

impl TrainArgs {
    fn train_config(&self) -> anyhow::Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(p) => toml::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{}: not a TrainConfig", p.display()))?,
            None => TrainConfig::default(),
        };
        if let Some(v) = self.lr {
            cfg.lr_peak = v;
            cfg.lr_min = v / 10.0;
        }
        if let Some(v) = self.max_steps {
            cfg.max_steps = v;
            cfg.warmup_steps = cfg.warmup_steps.min(v);
        }
        if let Some(v) = self.batch_size {
            cfg.batch_size = v;
        }
        if let Some(v) = self.grad_accum {
            cfg.grad_accum_steps = v;
        }
        if let Some(v) = self.warmup_steps {
            cfg.warmup_steps = v;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        if let Some(v) = self.retain_kl {
            cfg.retain_kl = v;
        }
        if let Some(v) = self.dpo_weight {
            cfg.dpo_weight = v;
        }
        if let Some(v) = self.dpo_beta {
            cfg.dpo_beta = v;
        }
        Ok(cfg)
    }

    fn lora_config(&self) -> anyhow::Result<LoraConfig> {
        let init = match self.init {
            InitArg::Kaiming => LoraInit::Kaiming,
            InitArg::Gaussian => LoraInit::Gaussian,
            InitArg::Full => LoraInit::Full,
            InitArg::Subspace => {
                let path = self
                    .basis
                    .as_ref()
                    .context("--init subspace needs --basis")?;
                LoraInit::Subspace {
                    bases: read_bases(path, self.rank)?,
                    freeze_basis: self.freeze_basis,
                }
            }
        };
        if self.basis.is_some() && self.init != InitArg::Subspace {
            bail!("--basis is only used with --init subspace");
        }
        Ok(LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            rslora: self.rslora,
            init,
        })
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    // candle's element-wise pool spin-waits between ops while the products run on rayon's
    // threads, which halves their speed on two cores; the training path's element-wise work is
    // in fused rayon ops, so the pool stays on the calling thread unless the user set it.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cfg = args.train_config()?;
    let lora_cfg = args.lora_config()?;
    let _lock = super::lock_run_folder(&args.out)?;
    let source = ModelSource::resolve(&args.model)?;
    let mut model = ChatModel::load(&source, &Device::Cpu, DType::F32)
        .with_context(|| format!("loading {}", source.path().display()))?;
    let trainable = lora::inject(&mut model.decoder, &lora_cfg, args.init_seed)
        .context("initialising the adapter")?;
    tracing::info!(
        init = lora_cfg.init.name(),
        params = trainable.num_params(),
        "trainable tensors ready"
    );
    let examples = read_examples(&args.data, args.eval_data.as_deref())?;
    if cfg.retain_kl > 0.0 && !args.data.is_dir() {
        bail!(
            "--retain-kl needs to know which examples are benign: pass the data folder \
             (with sft_manifest.json) as --data instead of {}",
            args.data.display()
        );
    }
    let tokenize = |path: &Path,
                    chats: &[ChatExample],
                    retain: &[bool]|
     -> anyhow::Result<Vec<train::TokenizedExample>> {
        chats
            .iter()
            .zip(retain)
            .enumerate()
            .map(|(i, (e, &retain))| {
                let t = tokenize_chat(&model.tokenizer, &model.template, e, i)
                    .with_context(|| format!("{}", path.display()))?;
                Ok(train::TokenizedExample { retain, ..t })
            })
            .collect()
    };
    let train_set = tokenize(&examples.train_path, &examples.train, &examples.retain)?;
    let eval_set = match &examples.eval {
        Some((path, chats)) => tokenize(path, chats, &vec![false; chats.len()])?,
        None => Vec::new(),
    };
    let (pairs, eval_pairs) = match (&examples.pairs, cfg.dpo_weight > 0.0) {
        (_, false) => (Vec::new(), Vec::new()),
        (Some((train, heldout)), true) => (
            tokenize_pairs(&model, &args.data.join(sails::data::sft::PAIRS_FILE), train)?,
            tokenize_pairs(
                &model,
                &args.data.join(sails::data::sft::HELDOUT_PAIRS_FILE),
                heldout,
            )?,
        ),
        (None, true) => bail!(
            "--dpo-weight needs preference pairs: pass a data folder built with \
             `sails data build --preference-pairs` as --data instead of {}",
            args.data.display()
        ),
    };
    let pad_id = model
        .tokenizer
        .pad_id()
        .or(model.tokenizer.eos_ids().first().copied())
        .unwrap_or(0);
    std::fs::create_dir_all(&args.out)?;
    install_sigint();
    let summary = train::run(
        &cfg,
        &model.decoder,
        &trainable,
        TrainData {
            train: &train_set,
            eval: &eval_set,
            pairs: &pairs,
            eval_pairs: &eval_pairs,
            pad_id,
        },
        RunOptions {
            out_dir: &args.out,
            resume: args.resume,
            stop: &STOP,
            stop_after: None,
            progress: true,
        },
    )?;
    let mut trainable = trainable;
    trainable.adapter = trainable.adapter.map(|mut a| {
        a.base_model_name_or_path = Some(source.path().display().to_string());
        a
    });
    if summary.interrupted {
        // No adapter is written for an unfinished run: a pipeline must not take it as done.
        eprintln!(
            "interrupted at step {}; checkpoint {}; continue with --resume",
            summary.steps,
            summary.checkpoint.display()
        );
        return Ok(ExitCode::from(130));
    }
    trainable.save(&args.out.join("adapter"))?;
    let json = serde_json::to_string_pretty(&summary)?;
    sails::model::write_atomic(&args.out.join("train_summary.json"), json.as_bytes())?;
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Model to train (default: SmolLM2-135M-Instruct).
    #[arg(long, short = 'm', default_value = "default", value_name = "MODEL")]
    model: String,
    /// Timed steps per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Only this target set (comma-separated projections); default: all seven, then q,k,v,o.
    #[arg(long, value_name = "LIST")]
    targets: Option<String>,
    /// Also time the same step through candle's autodiff (after the others, so the reported
    /// peak memory stays the hand-written step's).
    #[arg(long)]
    autodiff: bool,
    /// Time the step with a retain term of this weight, every sequence a retain example (the
    /// most the term can cost: one more forward of the whole batch without the adapter).
    #[arg(long, value_name = "LAMBDA", default_value_t = 0.0)]
    retain_kl: f64,
}

/// LoRA SFT throughput: forward, backward (loss on every next-token position, as a plain causal
/// LM step), clipping and AdamW on a fixed random batch; median step time after warm-up.
pub fn run_bench(args: BenchTrainArgs) -> anyhow::Result<ExitCode> {
    // candle's element-wise pool spin-waits between ops while the matrix products run on rayon's
    // threads; on two cores that halves the products' speed. The training path's large
    // element-wise work is in fused rayon ops, so the pool is kept to the calling thread unless
    // the user chose otherwise. Set before the first tensor op creates the pool.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    anyhow::ensure!(
        args.steps > 0 && args.batch > 0 && args.seq_len > 1,
        "--steps and --batch must be at least 1 and --seq-len at least 2"
    );
    anyhow::ensure!(
        args.retain_kl.is_finite() && args.retain_kl >= 0.0,
        "--retain-kl must be finite and non-negative"
    );
    let source = ModelSource::resolve(&args.model)?;
    let mut model = ChatModel::load(&source, &Device::Cpu, DType::F32)?;
    let device = Device::Cpu;
    let (b, t) = (args.batch, args.seq_len);
    let mut rng = StdRng::seed_from_u64(0);
    let vocab = model.decoder.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(100..vocab)).collect();
    let mut targets = Vec::new();
    for row in 0..b {
        for pos in 0..t - 1 {
            targets.push(Target {
                row,
                pos,
                token: ids[row * t + pos + 1],
            });
        }
    }
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &device)?,
        attention_mask: Tensor::ones((b, t), DType::U32, &device)?,
        targets,
        retain: vec![args.retain_kl > 0.0; b],
        real_tokens: b * t,
    };
    let all7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
    let sets = match &args.targets {
        Some(list) => vec![list.as_str()],
        None => vec![all7, "q_proj,k_proj,v_proj,o_proj"],
    };
    let mut results = Vec::new();
    for targets in &sets {
        let (trainable, median, split) =
            time_steps(&mut model.decoder, &args, targets, &batch, false)?;
        results.push(serde_json::json!({
            "targets": targets,
            "rank": args.rank,
            "trainable_params": trainable,
            "batch": b,
            "seq_len": t,
            "retain_kl": args.retain_kl,
            "median_step_s": median,
            "tokens_per_s": (b * t) as f64 / median,
            "split_step_s": split,
            "peak_rss_mib_so_far": super::bench::peak_rss_mib(),
        }));
    }
    if args.autodiff {
        for (targets, result) in sets.iter().zip(&mut results) {
            let (_, median, _) = time_steps(&mut model.decoder, &args, targets, &batch, true)?;
            result["autodiff"] = serde_json::json!({
                "median_step_s": median,
                "tokens_per_s": (b * t) as f64 / median,
            });
        }
    }
    let out = serde_json::json!({
        "model": source.path().display().to_string(),
        "threads": rayon::current_num_threads(),
        "candle_elementwise_threads": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Times LoRA steps on `targets` (a fresh Kaiming adapter): the median step after warm-up and one
/// more step split into forward, backward and clipping with AdamW. `autodiff` takes candle's
/// autodiff instead of the step [`train::loss_and_grads`] chooses.
fn time_steps(
    decoder: &mut sails::model::decoder::Decoder,
    args: &BenchTrainArgs,
    targets: &str,
    batch: &Batch,
    autodiff: bool,
) -> anyhow::Result<(usize, f64, serde_json::Value)> {
    sails::model::lora::clear(decoder);
    let cfg = LoraConfig {
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        targets: targets.split(',').map(String::from).collect(),
        rslora: false,
        init: LoraInit::Kaiming,
    };
    let trainable = lora::inject(decoder, &cfg, 0)?;
    let params: Vec<_> = trainable.vars.iter().collect();
    let batches = std::slice::from_ref(batch);
    let grads_of = |decoder: &sails::model::decoder::Decoder| {
        if autodiff {
            train::autodiff_loss_and_grads(decoder, &params, batches, args.retain_kl)
        } else {
            train::loss_and_grads(decoder, &params, batches, args.retain_kl)
        }
    };
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut secs = Vec::new();
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let (_loss, mut grads) = grads_of(decoder)?;
        train::clip_grad_norm(&mut grads, Some(1.0))?;
        opt.step(&params, &grads, 1e-4)?;
        if i >= args.warmup {
            secs.push(start.elapsed().as_secs_f64());
        }
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let split = if autodiff || !train::fast::applies(decoder, &params) {
        serde_json::Value::Null
    } else {
        let (_loss, mut grads, timing) =
            train::fast::timed_loss_and_grads(decoder, &params, batches, args.retain_kl)?;
        let start = Instant::now();
        train::clip_grad_norm(&mut grads, Some(1.0))?;
        opt.step(&params, &grads, 1e-4)?;
        serde_json::json!({
            "forward": timing.forward_s,
            "backward": timing.backward_s,
            "clip_adamw": start.elapsed().as_secs_f64(),
        })
    };
    let trainable_params = trainable.num_params();
    sails::model::lora::clear(decoder);
    Ok((trainable_params, median, split))
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn train_flags_parse_with_defaults_and_overrides() {
        let t = T::try_parse_from(["t", "--data", "d.jsonl", "--out", "o"]).unwrap();
        assert_eq!(t.args.init, InitArg::Kaiming);
        assert_eq!(t.args.targets, ["q_proj", "k_proj", "v_proj", "o_proj"]);
        assert_eq!(t.args.train_config().unwrap(), TrainConfig::default());
        let t = T::try_parse_from([
            "t",
            "--data",
            "d",
            "--out",
            "o",
            "--init",
            "subspace",
            "--basis",
            "b.safetensors",
            "--targets",
            "q_proj,down_proj",
            "--lr",
            "1e-3",
            "--max-steps",
            "5",
        ])
        .unwrap();
        let cfg = t.args.train_config().unwrap();
        assert_eq!((cfg.lr_peak, cfg.max_steps, cfg.warmup_steps), (1e-3, 5, 5));
        assert_eq!(cfg.retain_kl, 0.0);
        assert_eq!(t.args.targets, ["q_proj", "down_proj"]);
        let t =
            T::try_parse_from(["t", "--data", "d", "--out", "o", "--retain-kl", "0.3"]).unwrap();
        assert_eq!(t.args.train_config().unwrap().retain_kl, 0.3);
        let t = T::try_parse_from([
            "t",
            "--data",
            "d",
            "--out",
            "o",
            "--dpo-weight",
            "1",
            "--dpo-beta",
            "0.2",
        ])
        .unwrap();
        let cfg = t.args.train_config().unwrap();
        assert_eq!((cfg.dpo_weight, cfg.dpo_beta), (1.0, 0.2));
        assert!(T::try_parse_from(["t", "--out", "o"]).is_err());
    }
}
