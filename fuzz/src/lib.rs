//! The entry functions of the fuzz targets: each takes the bytes of one kind of file a user can be
//! handed and runs the library's own loader on them, through a scratch file where the loader
//! reads a path. A loader may accept or refuse its input; it must not panic, hang or allocate
//! without bound. The main test suite replays `fuzz/corpus/<target>/*` through these same
//! functions (`tests/integration/fuzz_corpus.rs`), so every input the fuzzers kept is checked by
//! `cargo test` too.
//!
//! The two command-line parsers (the `sails align --config` TOML and the `sails generate
//! --prompts` lines) live in the binary; their targets compile its `cli` module in.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use sails::model::chat::{ChatTemplate, Message};
use sails::model::Resid;

use candle_core::Device;

/// The adapter_config.json, subspace.json and SAELens cfg.json written beside a fuzzed
/// safetensors file, so that each loader gets as far as the tensors.
const ADAPTER_CONFIG: &str = include_str!("../fixtures/adapter_config.json");
const SUBSPACE_JSON: &str = include_str!("../fixtures/subspace.json");
const SAELENS_CFG: &str = include_str!("../fixtures/cfg.json");

/// The conversation every chat template is rendered with.
fn conversation() -> Vec<Message> {
    vec![
        Message::system("You are helpful."),
        Message::user("Hello <b>there</b>"),
        Message::assistant("Hi! {{ not a tag }}"),
        Message::user("Bye"),
    ]
}

thread_local! {
    /// One scratch folder per thread, in memory where `/dev/shm` exists.
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// `<scratch>/<sub>`, created empty of nothing but what the caller writes (stale files of an
/// earlier input are removed).
fn scratch(sub: &str) -> PathBuf {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() {
                tempfile::Builder::new()
                    .prefix("sails-fuzz")
                    .tempdir_in(shm)
            } else {
                tempfile::Builder::new().prefix("sails-fuzz").tempdir()
            };
            *s = Some(dir.expect("a scratch folder"));
        }
        let dir = s.as_ref().map(|d| d.path().join(sub)).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch subfolder");
        dir
    })
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("writing a scratch file");
}

/// Renders the template for a conversation, with and without the generation prompt.
fn render(template: &ChatTemplate) {
    let messages = conversation();
    let _ = template.render(&messages, true);
    let _ = template.render(&messages[..1], false);
}

/// A GGUF file: header, metadata, tensor infos and data bounds ([`sails::model::gguf::GgufFile`]),
/// then everything a model load reads from it: the hyper-parameters, the tokenizer built from
/// its metadata (encoding a short string), its chat template, every tensor dequantised.
pub fn gguf(data: &[u8]) {
    use sails::model::gguf::GgufFile;
    use sails::model::tokenizer::Tokenizer;
    let path = scratch("gguf").join("model.gguf");
    write(&path, data);
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    let _ = file.model_params();
    let _ = file.decoder_config();
    if let Ok(tok) = Tokenizer::from_gguf_metadata(file.metadata(), &path) {
        if let Ok(ids) = tok.encode("Hello, world! It's 2026.", true) {
            let _ = tok.decode(&ids, false);
        }
        if let Ok(t) = tok.chat_template() {
            render(&t);
        }
    }
    for name in file.tensor_names() {
        let _ = file.tensor_f32(name, &Device::Cpu);
    }
    let _ = file.load_weight_map(&Device::Cpu);
}

/// A safetensors file as each of the project's loaders reads one: model weights
/// (`model.safetensors`), a PEFT adapter (`adapter_model.safetensors`), a subspace
/// (`subspace.safetensors`) and a SAELens SAE (`sae_weights.safetensors`), each beside a valid
/// config.
pub fn safetensors(data: &[u8]) {
    use sails::model::lora::Adapter;
    use sails::model::weights::{load_safetensors_file, WeightMap};
    let dir = scratch("safetensors");
    let model = dir.join("model.safetensors");
    write(&model, data);
    let _ = load_safetensors_file(&model, &Device::Cpu);
    if let Ok(mut w) = WeightMap::from_safetensors_dir(&dir, &Device::Cpu) {
        let _ = w.take("model.embed_tokens.weight", &[4, 4]);
        let _ = w.finish();
    }
    write(&dir.join("adapter_config.json"), ADAPTER_CONFIG.as_bytes());
    write(&dir.join("adapter_model.safetensors"), data);
    let _ = Adapter::load(&dir, &Device::Cpu);
    write(&dir.join("subspace.json"), SUBSPACE_JSON.as_bytes());
    write(&dir.join("subspace.safetensors"), data);
    if let Ok(s) = sails::subspace::Subspace::load(&dir) {
        let _ = s.tensors(&Device::Cpu);
    }
    write(&dir.join("cfg.json"), SAELENS_CFG.as_bytes());
    write(&dir.join("sae_weights.safetensors"), data);
    let _ = sails::sae::format::load_saelens(&dir, &Device::Cpu);
}

/// A Gemma Scope `params.npz`.
pub fn sae_npz(data: &[u8]) {
    let path = scratch("npz").join("params.npz");
    write(&path, data);
    let _ = sails::sae::format::load_gemma_scope(&path, Resid::Out(0), &Device::Cpu);
}

/// A SAELens `cfg.json` (the text as read; a file that is not UTF-8 fails before parsing).
pub fn saelens_cfg(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = sails::sae::format::parse_saelens_cfg(Path::new("cfg.json"), text) {
        let _ = sails::sae::format::saelens_cfg_json(&cfg);
    }
}

/// A PEFT `adapter_config.json`.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("adapter_config.json");
    if let Ok(cfg) = sails::model::lora::AdapterConfig::from_json(text, path) {
        let _ = cfg.scale();
        let _ = cfg.targets("model.layers.0.self_attn.q_proj");
        let _ = cfg.to_peft_json();
    }
}

/// A Hugging Face `tokenizer.json`, encoding and decoding a short string with what loads.
pub fn tokenizer_json(data: &[u8]) {
    use sails::model::tokenizer::Tokenizer;
    let path = scratch("tokenizer").join("tokenizer.json");
    write(&path, data);
    let Ok(tok) = Tokenizer::from_file(&path) else {
        return;
    };
    for text in ["Hello, world!", " <|im_start|>user\nÅ\u{1F600}\t  x"] {
        if let Ok(ids) = tok.encode(text, true) {
            let _ = tok.decode(&ids, false);
            let _ = tok.decode(&ids, true);
        }
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX], false);
    let _ = tok.vocab_size();
}

/// A chat template (as found in a GGUF's `tokenizer.chat_template` or `tokenizer_config.json`),
/// compiled and rendered.
pub fn chat_template(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(source) else {
        return;
    };
    render(&t.with_bos_token("<s>").with_eos_token("</s>"));
}

/// A run folder's `manifest.json`.
pub fn run_manifest(data: &[u8]) {
    let dir = scratch("manifest");
    write(&dir.join(sails::manifest::MANIFEST_FILE), data);
    if let Ok(Some(m)) = sails::manifest::RunManifest::load(&dir) {
        let _ = m.record("train");
        let _ = serde_json::to_vec(&m);
    }
}

/// The JSONL input of `sails judge score`: every line judged by the phrase list, the degeneracy
/// judge and the shipped refusal vote and off-topic probes (their model-computed inputs fixed).
pub fn judge_jsonl(data: &[u8]) {
    use sails::eval::judge::{DegeneracyJudge, OffTopicJudge, PhraseJudge, VoteJudge};
    use sails::eval::LearnedInputs;
    thread_local! {
        static JUDGES: (PhraseJudge, DegeneracyJudge, VoteJudge, OffTopicJudge) = {
            let phrase = PhraseJudge {
                version: "fuzz".into(),
                phrases: vec!["I cannot".into(), "I'm sorry".into()],
            };
            let vote = VoteJudge::shipped(phrase.clone()).expect("the shipped vote");
            let off_topic = OffTopicJudge::shipped().expect("the shipped off-topic probe");
            (phrase, DegeneracyJudge::default(), vote, off_topic)
        };
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("responses.jsonl");
    JUDGES.with(|(phrase, degeneracy, vote, off_topic)| {
        #[allow(clippy::result_large_err)]
        // the library's error type, as every eval function returns
        let inputs = |pairs: &[(&str, &str)]| -> sails::eval::Result<Vec<LearnedInputs>> {
            Ok(pairs
                .iter()
                .map(|_| LearnedInputs {
                    refusal_probe: Some(0.25),
                    prompt_pmi: Some(-1.0),
                })
                .collect())
        };
        let _ = sails::eval::score::score_jsonl(path, text, degeneracy, phrase, None, &[]);
        let _ = sails::eval::score::score_jsonl(
            path,
            text,
            degeneracy,
            phrase,
            Some((vote, off_topic, &inputs)),
            &[phrase as &dyn sails::eval::judge::Judge],
        );
    });
}

/// A fuzz target's entry function.
pub type Entry = fn(&[u8]);

/// A user suite file (`sails eval --harmful/--benign`): the first byte picks JSONL or CSV, the
/// suite and whether a category column is named; the rest is the file.
pub fn user_suite(data: &[u8]) {
    use sails::data::user::{Columns, UserSuite};
    use sails::data::Suite;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let suite = UserSuite {
        suite: if pick & 2 == 0 {
            Suite::UserHarmful
        } else {
            Suite::UserBenign
        },
        path: PathBuf::from(if pick & 1 == 0 { "s.jsonl" } else { "s.csv" }),
        columns: Columns {
            prompt: "prompt".into(),
            category: (pick & 4 != 0).then(|| "category".to_string()),
            id: None,
        },
    };
    let _ = suite.parse(text);
}

/// A `POST /v1/chat/completions` body as `sails serve` reads it: parsed, then checked against a
/// budget limit (what the server answers with a reply or a 400).
pub fn chat_request(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<sails::serve::api::ChatRequest>(data) {
        let _ = request.check(64);
    }
}

/// Every target of the library's parsers, by corpus folder name.
pub const LIBRARY_TARGETS: &[(&str, Entry)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("sae_npz", sae_npz),
    ("saelens_cfg", saelens_cfg),
    ("adapter_config", adapter_config),
    ("tokenizer_json", tokenizer_json),
    ("chat_template", chat_template),
    ("run_manifest", run_manifest),
    ("judge_jsonl", judge_jsonl),
    ("user_suite", user_suite),
    ("chat_request", chat_request),
];

/// The files of `fuzz/corpus/<target>` (none when the folder is missing), sorted.
pub fn corpus_files(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    files_in(&fuzz_dir.join("corpus").join(target))
}

/// The files of `fuzz/seeds/<target>` (written by `fuzz/make_seeds.py`), sorted.
pub fn seed_files(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    files_in(&fuzz_dir.join("seeds").join(target))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
