//! `sails generate` and `sails chat`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use sails::eval::GateReading;
use sails::model::chat::Message;
use sails::model::generate::{generate, FinishReason, Generation, GenerationConfig, Sampling};
use sails::model::load::ChatModel;
use serde::{Deserialize, Serialize};

use super::model_args::ModelArgs;

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Maximum number of new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens holding this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed for sampling; the same seed, prompts and batch give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a response when it contains this string (repeatable); the string is cut off.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn config(&self) -> anyhow::Result<GenerationConfig> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.temperature < 0.0 {
            bail!("--temperature must be ≥ 0, got {}", self.temperature);
        }
        let sampling = if self.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            }
        };
        Ok(GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            sampling,
            stop_strings: self.stop.clone(),
            ignore_eos: false,
            share_prefix: true,
        })
    }
}

/// Generate responses to prompts, rendered with the model's own chat template.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A user message (repeatable). Each becomes one conversation.
    #[arg(long, short = 'p', value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// JSONL file of prompts: each line `{"prompt": "..."}`, `{"messages": [{"role", "content"}, ...]}`
    /// or a JSON string.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// System message; without it the template's default applies (SmolLM2 adds its own).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts decoded together in one batch (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Switch the adapter on per prompt with a gate written by `sails gate` (as `sails eval
    /// --gate`): the base model reads each conversation's last user message on the gate's safety
    /// features; at or above the threshold the adapted model answers, else the base model.
    #[arg(long, value_name = "FILE", requires = "adapter")]
    pub gate: Option<PathBuf>,
    /// Print one JSON object per prompt (JSONL) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Text(String),
    Prompt { prompt: String },
    Messages { messages: Vec<Message> },
}

/// One line of `--json` output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRecord {
    pub index: usize,
    pub messages: Vec<Message>,
    pub response: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub finish: FinishReason,
    /// Under --gate: the gate's score of the last user message and whether it opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReading>,
}

/// One line of a `--prompts` file: a JSON string, `{"prompt": …}` or `{"messages": […]}`.
pub fn parse_prompt_line(line: &str) -> serde_json::Result<Vec<Message>> {
    Ok(match serde_json::from_str(line)? {
        PromptLine::Text(t) | PromptLine::Prompt { prompt: t } => vec![Message::user(t)],
        PromptLine::Messages { messages } => messages,
    })
}

fn conversations(args: &GenerateArgs) -> anyhow::Result<Vec<Vec<Message>>> {
    let with_system = |msgs: Vec<Message>| match &args.system {
        Some(s) if !msgs.iter().any(|m| m.role == "system") => {
            std::iter::once(Message::system(s.clone()))
                .chain(msgs)
                .collect()
        }
        _ => msgs,
    };
    let mut out: Vec<Vec<Message>> = args
        .prompt
        .iter()
        .map(|p| with_system(vec![Message::user(p.clone())]))
        .collect();
    if let Some(path) = &args.prompts {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let messages = parse_prompt_line(&line).with_context(|| {
                format!(
                    "{}:{}: expected a JSON string, {{\"prompt\"}} or {{\"messages\"}}",
                    path.display(),
                    n + 1
                )
            })?;
            out.push(with_system(messages));
        }
    }
    if out.is_empty() {
        bail!("no prompts: pass --prompt TEXT or --prompts FILE.jsonl");
    }
    Ok(out)
}

pub fn run_generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let convs = conversations(&args)?;
    let cfg = args.sampling.config()?;
    let model = args.model.load()?;
    let gate = match &args.gate {
        Some(path) => Some(super::gate::LoadedGate::load(path, &args.model)?),
        None => None,
    };
    let start = Instant::now();
    let mut new_tokens = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (chunk_index, chunk) in convs.chunks(args.batch_size.max(1)).enumerate() {
        // Under a gate each conversation goes to the model the gate picks for it.
        let readings: Vec<Option<GateReading>> = match &gate {
            Some(g) => {
                let last_user: Vec<String> =
                    chunk.iter().map(|c| last_user(c).to_owned()).collect();
                g.as_gated(Default::default())
                    .read(&last_user, args.batch_size.max(1))?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => vec![None; chunk.len()],
        };
        let mut gens: Vec<Option<Generation>> = (0..chunk.len()).map(|_| None).collect();
        for open in [true, false] {
            let rows: Vec<usize> = (0..chunk.len())
                .filter(|&i| readings[i].is_none_or(|r| r.open) == open)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let answering = match (&gate, open) {
                (Some(g), false) => &g.base,
                _ => &model,
            };
            let ids = rows
                .iter()
                .map(|&i| answering.encode_chat(&chunk[i]))
                .collect::<Result<Vec<_>, _>>()?;
            let made = generate(
                &answering.decoder,
                &answering.tokenizer,
                &ids,
                &cfg,
                |_, _| {},
            )?;
            for (&i, g) in rows.iter().zip(made) {
                gens[i] = Some(g);
            }
        }
        for (i, ((conv, g), reading)) in chunk.iter().zip(gens).zip(&readings).enumerate() {
            let g = g.context("a conversation got no response")?;
            let index = chunk_index * args.batch_size.max(1) + i;
            new_tokens += g.ids.len();
            if args.json {
                let rec = GenerationRecord {
                    index,
                    messages: conv.clone(),
                    response: g.text,
                    prompt_tokens: g.prompt_tokens,
                    new_tokens: g.ids.len(),
                    finish: g.finish,
                    gate: *reading,
                };
                writeln!(out, "{}", serde_json::to_string(&rec)?)?;
            } else {
                writeln!(out, "### {}\n{}\n", last_user(conv), g.text.trim_end())?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} prompts, {new_tokens} new tokens in {secs:.2} s ({:.1} tokens/s)",
        convs.len(),
        new_tokens as f64 / secs
    );
    Ok(ExitCode::SUCCESS)
}

/// The conversation's last user message (empty without one).
fn last_user(conv: &[Message]) -> &str {
    conv.iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str())
}

/// Chat with the model in the terminal; the conversation is kept until /reset.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run_chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = args.sampling.config()?;
    if cfg.max_new_tokens == 64 {
        cfg.max_new_tokens = 256;
    }
    let model = args.model.load()?;
    eprintln!(
        "chatting with {} — /reset clears the conversation, /exit or Ctrl-D ends",
        model.source.path().display()
    );
    let fresh = || {
        args.system
            .iter()
            .map(|s| Message::system(s.clone()))
            .collect::<Vec<_>>()
    };
    let mut conversation = fresh();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conversation = fresh();
                continue;
            }
            _ => {}
        }
        conversation.push(Message::user(line));
        let reply = respond(&model, &conversation, &cfg)?;
        conversation.push(Message::assistant(reply));
    }
    Ok(ExitCode::SUCCESS)
}

/// Streams one reply to stdout and returns its text.
fn respond(
    model: &ChatModel,
    conversation: &[Message],
    cfg: &GenerationConfig,
) -> anyhow::Result<String> {
    let ids = model.encode_chat(conversation)?;
    let start = Instant::now();
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0;
    let stdout = std::io::stdout();
    let gens = generate(&model.decoder, &model.tokenizer, &[ids], cfg, |_, token| {
        so_far.push(token);
        // Decode the whole reply each time: a token can end in the middle of a character.
        if let Ok(text) = model.tokenizer.decode(&so_far, true) {
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{FFFD}')
            {
                let mut out = stdout.lock();
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        }
    })?;
    let g = gens.into_iter().next().context("no generation")?;
    let mut out = stdout.lock();
    if g.text.len() > printed {
        write!(out, "{}", &g.text[printed.min(g.text.len())..])?;
    }
    writeln!(out)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} tokens, {:.1} tokens/s]",
        g.ids.len(),
        g.ids.len() as f64 / secs
    );
    Ok(g.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lines_take_three_spellings() {
        let user = |t: &str| vec![Message::user(t)];
        assert_eq!(parse_prompt_line(r#""hi""#).unwrap(), user("hi"));
        assert_eq!(
            parse_prompt_line(r#"{"prompt": "hi"}"#).unwrap(),
            user("hi")
        );
        let m = parse_prompt_line(r#"{"messages": [{"role": "system", "content": "s"}]}"#);
        assert_eq!(m.unwrap(), vec![Message::system("s")]);
        assert!(parse_prompt_line(r#"{"prompt": 3}"#).is_err());
        assert!(parse_prompt_line("[").is_err());
    }

    /// Every `--prompts` file the fuzzer kept (`fuzz/corpus/prompt_lines/`) and its seeds, line
    /// by line: parsed or refused, never a panic.
    #[test]
    fn fuzz_corpus_prompt_lines_replay_without_panics() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for sub in ["corpus/prompt_lines", "seeds/prompt_lines"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(sub)) else {
                continue;
            };
            for entry in entries {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                for line in String::from_utf8_lossy(&bytes).lines() {
                    let _ = parse_prompt_line(line);
                }
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no prompt_lines corpus under {fuzz:?}");
    }
}
