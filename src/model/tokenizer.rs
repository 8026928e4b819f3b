//! Tokenizers from `tokenizer.json` or from GGUF metadata.
//!
//! Both sources end up as one [`tokenizers::Tokenizer`] plus the ids a generation loop needs
//! (BOS, the end-of-generation set, padding) and the model's chat template source.
//!
//! From GGUF, two vocabularies are understood:
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` + `merges`; the pre-split is
//!   chosen by `tokenizer.ggml.pre` (see [`PRE_TOKENIZERS`]); an unknown name is an error, never a
//!   silent fallback, because a different split changes the ids.
//! * `tokenizer.ggml.model = "llama"`: SentencePiece-style pieces + scores (`▁` for a space,
//!   `<0xXX>` byte-fallback pieces). SentencePiece BPE merges the adjacent pair whose concatenation
//!   is the highest-scoring piece; this is expressed as BPE merges ranked by the merged piece's
//!   score, which gives the same result.
//!
//! Tokens of type control (3) or unknown (2) become special added tokens, matched whole in text
//! (as Hugging Face does by default); user-defined tokens (4) become non-special added tokens.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use thiserror::Error;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::chat::{ChatError, ChatTemplate, Message};

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: GGUF metadata has no `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: GGUF metadata `{key}` should be {expected}, got {got}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("{path}: tokenizer model `{model}` is not supported (supported: \"gpt2\", \"llama\")")]
    UnknownModel { path: PathBuf, model: String },
    #[error(
        "{path}: pre-tokenizer `tokenizer.ggml.pre = \"{pre}\"` is not supported (supported: {known:?}); \
         using another split would give different token ids"
    )]
    UnknownPre {
        path: PathBuf,
        pre: String,
        known: Vec<&'static str>,
    },
    #[error("{path}: {what}: {message}")]
    Inconsistent {
        path: PathBuf,
        what: String,
        message: String,
    },
    #[error("{path}: {what} id {id} is outside the vocabulary of {vocab_size} tokens")]
    BadSpecialId {
        path: PathBuf,
        what: &'static str,
        id: u32,
        vocab_size: usize,
    },
    #[error("{path}: cannot build the tokenizer: {message}")]
    Build { path: PathBuf, message: String },
    #[error("cannot encode {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error("cannot decode {ids:?}: {message}")]
    Decode { ids: Vec<u32>, message: String },
    #[error("{path}: the tokenizer has no chat template")]
    NoChatTemplate { path: PathBuf },
    #[error(transparent)]
    Chat(#[from] ChatError),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// GGUF `tokenizer.ggml.pre` names this module understands, for byte-level BPE vocabularies.
/// Names on one line share one split in llama.cpp.
///
/// * `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`: every
///   `\p{N}` character alone, then the GPT-2 regex (HF: `Digits(individual_digits)` + `ByteLevel`).
/// * `gpt2`, `mpt`, `olmo`, `jais`: the GPT-2 regex.
/// * `default` (also a GGUF without a `pre` key): llama.cpp's fallback, four regex splits one
///   after the other: punctuation runs, the GPT-2 regex, `\p{N}+`, then groups of three ASCII
///   digits.
/// * `llama-bpe`, `llama3`, `smaug-bpe`, `dbrx`: the Llama 3 regex (digits in groups of up to three).
/// * `qwen2`, `qwen2.5`, `qwen-2.5`, `deepseek-r1-qwen`, `stablelm2`: the Qwen2 regex (every digit
///   alone).
pub const PRE_TOKENIZERS: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
    "gpt2",
    "mpt",
    "olmo",
    "jais",
    "default",
    "llama-bpe",
    "llama3",
    "smaug-bpe",
    "dbrx",
    "qwen2",
    "qwen2.5",
    "qwen-2.5",
    "deepseek-r1-qwen",
    "stablelm2",
];

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const DEFAULT_PUNCT_REGEX: &str = r"[\p{P}\$\+<=>\^~\|]+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token names that end a turn, looked up in the vocabulary to complete the end-of-generation set.
const END_OF_TURN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<eos>",
    "</s>",
];

// GGUF token types (llama.cpp `llama_token_type`).
const TT_UNKNOWN: i32 = 2;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_UNUSED: i32 = 5;
const TT_BYTE: i32 = 6;

/// A tokenizer with the special ids a chat model needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    add_bos_token: bool,
    chat_template: Option<String>,
    special: HashSet<u32>,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("add_bos_token", &self.add_bos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. A `tokenizer_config.json` beside it, when present,
    /// supplies `bos_token`, `eos_token`, `pad_token`, `add_bos_token` and `chat_template`; a
    /// `generation_config.json` beside it adds its `eos_token_id`(s) to the end-of-generation set.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let load = |message: String| TokenizerError::Load {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // tokenizers panics ("Helper") on a JSON error inside the "decoder" value (a syntax error,
        // text that is not UTF-8) instead of returning it, so the file is parsed as JSON first.
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| load(format!("not valid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| load("the tokenizers library panicked while reading it".into()))?
            .map_err(|e| load(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_opt(&dir.join("generation_config.json"))?;

        let token_of = |key: &str| -> Option<String> {
            match config.as_ref()?.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let id_of =
            |what: &'static str, name: Option<String>| -> Result<Option<u32>> {
                match name {
                    None => Ok(None),
                    Some(n) => inner.token_to_id(&n).map(Some).ok_or_else(|| {
                        TokenizerError::Inconsistent {
                            path: path.to_path_buf(),
                            what: format!("tokenizer_config.json {what}"),
                            message: format!("token {n:?} is not in the vocabulary"),
                        }
                    }),
                }
            };
        let bos_id = id_of("bos_token", token_of("bos_token"))?;
        let eos_id = id_of("eos_token", token_of("eos_token"))?;
        let pad_id = id_of("pad_token", token_of("pad_token"))?;
        let add_bos_token = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let chat_template = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                // Named templates: [{"name": "default", "template": "..."}, ...].
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            }
            Some(other) => {
                return Err(TokenizerError::Inconsistent {
                    path: dir.join("tokenizer_config.json"),
                    what: "chat_template".into(),
                    message: format!("expected a string or a list of named templates, got {other}"),
                })
            }
        };

        let special: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(g) = generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<u64> = match g {
                serde_json::Value::Number(n) => n.as_u64().into_iter().collect(),
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
                _ => Vec::new(),
            };
            for id in ids {
                push_unique(&mut eos_ids, id as u32);
            }
        }
        add_end_of_turn_tokens(&mut eos_ids, |n| inner.token_to_id(n), &special);
        let tok = Self {
            inner,
            bos_id,
            eos_ids,
            pad_id,
            add_bos_token,
            chat_template,
            special,
            source: path.to_path_buf(),
        };
        tok.check_ids()?;
        Ok(tok)
    }

    /// Builds the tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*` and
    /// `tokenizer.chat_template`). `path` only names the file in errors.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = Meta { md, path };
        let model = meta.string("tokenizer.ggml.model")?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(_) => meta.ints("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Inconsistent {
                path: path.to_path_buf(),
                what: "tokenizer.ggml.token_type".into(),
                message: format!("{} types for {} tokens", types.len(), tokens.len()),
            });
        }
        let add_bos_token = meta.bool_opt("tokenizer.ggml.add_bos_token")?;
        let add_eos_token = meta
            .bool_opt("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let bos_id = meta.u32_opt("tokenizer.ggml.bos_token_id")?;
        let eos_id = meta.u32_opt("tokenizer.ggml.eos_token_id")?;
        let pad_id = meta.u32_opt("tokenizer.ggml.padding_token_id")?;
        let unk_id = meta.u32_opt("tokenizer.ggml.unknown_token_id")?;
        let chat_template = match md.get("tokenizer.chat_template") {
            Some(_) => Some(meta.string("tokenizer.chat_template")?),
            None => None,
        };
        for (what, id) in [
            ("bos", bos_id),
            ("eos", eos_id),
            ("pad", pad_id),
            ("unk", unk_id),
        ] {
            if let Some(id) = id {
                if id as usize >= tokens.len() {
                    return Err(TokenizerError::BadSpecialId {
                        path: path.to_path_buf(),
                        what,
                        id,
                        vocab_size: tokens.len(),
                    });
                }
            }
        }

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(TokenizerError::Inconsistent {
                path: path.to_path_buf(),
                what: "tokenizer.ggml.tokens".into(),
                message: format!(
                    "{} tokens but only {} distinct strings",
                    tokens.len(),
                    vocab.len()
                ),
            });
        }
        let build_err = |e: tokenizers::Error| TokenizerError::Build {
            path: path.to_path_buf(),
            message: e.to_string(),
        };

        let (mut inner, add_bos_default) = match model.as_str() {
            "gpt2" => {
                let merges = meta
                    .strings("tokenizer.ggml.merges")?
                    .iter()
                    .enumerate()
                    .map(|(i, m)| split_merge(m, i, path))
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(build_err)?;
                let pre_name = match md.get("tokenizer.ggml.pre") {
                    Some(_) => meta.string("tokenizer.ggml.pre")?,
                    None => "default".to_owned(),
                };
                let pre = byte_level_pre_tokenizer(&pre_name, path)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(pre));
                t.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
                (t, false)
            }
            "llama" => {
                let scores = meta.floats("tokenizer.ggml.scores")?;
                if scores.len() != tokens.len() {
                    return Err(TokenizerError::Inconsistent {
                        path: path.to_path_buf(),
                        what: "tokenizer.ggml.scores".into(),
                        message: format!("{} scores for {} tokens", scores.len(), tokens.len()),
                    });
                }
                let merges = sentencepiece_merges(&tokens, &scores, &types, &vocab);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk_id {
                    builder = builder.unk_token(tokens[unk as usize].clone());
                }
                let bpe = builder.build().map_err(build_err)?;
                let add_space_prefix = meta
                    .bool_opt("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let scheme = if add_space_prefix {
                    PrependScheme::First
                } else {
                    PrependScheme::Never
                };
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
                let mut decoders: Vec<DecoderWrapper> = vec![
                    Replace::new("▁", " ").map_err(build_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if add_space_prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                t.with_decoder(Some(DecoderSequence::new(decoders)));
                (t, true)
            }
            other => {
                return Err(TokenizerError::UnknownModel {
                    path: path.to_path_buf(),
                    model: other.to_owned(),
                })
            }
        };
        let add_bos_token = add_bos_token.unwrap_or(add_bos_default);

        // Control / unknown tokens are special and matched whole; user-defined ones are matched
        // whole too but are ordinary text when decoding.
        let mut special = HashSet::new();
        let mut specials = Vec::new();
        let mut user = Vec::new();
        for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            match *ty {
                TT_CONTROL | TT_UNKNOWN => {
                    special.insert(i as u32);
                    specials.push(AddedToken::from(tok.clone(), true).normalized(false));
                }
                TT_USER_DEFINED => {
                    user.push(AddedToken::from(tok.clone(), false).normalized(false));
                }
                _ => {}
            }
        }
        inner.add_special_tokens(specials).map_err(build_err)?;
        inner.add_tokens(user).map_err(build_err)?;

        if add_bos_token || add_eos_token {
            let mut single = Vec::new();
            let mut pair = Vec::new();
            let mut marks = Vec::new();
            let bos = match (add_bos_token, bos_id) {
                (true, Some(id)) => Some((tokens[id as usize].clone(), id)),
                (true, None) => {
                    return Err(TokenizerError::MissingKey {
                        path: path.to_path_buf(),
                        key: "tokenizer.ggml.bos_token_id (add_bos_token is set)".into(),
                    })
                }
                _ => None,
            };
            let eos = match (add_eos_token, eos_id) {
                (true, Some(id)) => Some((tokens[id as usize].clone(), id)),
                (true, None) => {
                    return Err(TokenizerError::MissingKey {
                        path: path.to_path_buf(),
                        key: "tokenizer.ggml.eos_token_id (add_eos_token is set)".into(),
                    })
                }
                _ => None,
            };
            for (seq, piece) in [("$A", &mut single), ("$B:1", &mut pair)] {
                if let Some((name, _)) = &bos {
                    piece.push(name.clone());
                }
                piece.push(seq.to_owned());
                if let Some((name, _)) = &eos {
                    piece.push(name.clone());
                }
            }
            let pair: Vec<String> = single.iter().cloned().chain(pair).collect();
            marks.extend(bos.clone());
            marks.extend(eos.clone());
            let post = TemplateProcessing::builder()
                .try_single(single)
                .and_then(|b| b.try_pair(pair))
                .map_err(|e| TokenizerError::Build {
                    path: path.to_path_buf(),
                    message: e,
                })?
                .special_tokens(marks)
                .build()
                .map_err(|e| TokenizerError::Build {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            inner.with_post_processor(Some(post));
        }

        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        add_end_of_turn_tokens(&mut eos_ids, |n| inner.token_to_id(n), &special);
        let tok = Self {
            inner,
            bos_id,
            eos_ids,
            pad_id,
            add_bos_token,
            chat_template,
            special,
            source: path.to_path_buf(),
        };
        tok.check_ids()?;
        Ok(tok)
    }

    fn check_ids(&self) -> Result<()> {
        let n = self.vocab_size();
        let mut all: Vec<(&'static str, u32)> = Vec::new();
        all.extend(self.bos_id.map(|i| ("bos", i)));
        all.extend(self.pad_id.map(|i| ("pad", i)));
        all.extend(self.eos_ids.iter().map(|i| ("eos", *i)));
        for (what, id) in all {
            if id as usize >= n {
                return Err(TokenizerError::BadSpecialId {
                    path: self.source.clone(),
                    what,
                    id,
                    vocab_size: n,
                });
            }
        }
        Ok(())
    }

    /// Token ids of `text`. With `add_special_tokens`, the BOS/EOS the tokenizer is configured
    /// to add are added; special tokens written in the text are matched whole either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TokenizerError::Encode {
                    text: text.to_owned(),
                    message: e.to_string(),
                })?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] over several texts.
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), add_special_tokens)
            .map_err(|e| TokenizerError::Encode {
                text: texts.join("\u{241e}"),
                message: e.to_string(),
            })?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(TokenizerError::Decode {
                ids: ids.to_vec(),
                message: format!("id {bad} is outside the vocabulary of {n} tokens"),
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                ids: ids.to_vec(),
                message: e.to_string(),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Ids that end generation: the declared EOS first, then end-of-turn tokens found in the
    /// vocabulary as special tokens (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The chat template's Jinja source, when the tokenizer carries one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The file this tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The wrapped `tokenizers` tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The tokenizer's chat template, with `bos_token` / `eos_token` set from its special ids.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source =
            self.chat_template
                .as_deref()
                .ok_or_else(|| TokenizerError::NoChatTemplate {
                    path: self.source.clone(),
                })?;
        let mut t = ChatTemplate::new(source)?;
        if let Some(bos) = self.bos_id.and_then(|i| self.id_to_token(i)) {
            t = t.with_bos_token(bos);
        }
        if let Some(eos) = self.eos_ids.first().and_then(|&i| self.id_to_token(i)) {
            t = t.with_eos_token(eos);
        }
        Ok(t)
    }

    /// Renders `messages` with `template` and encodes the result. The template writes its own
    /// special tokens (BOS included, if the model wants one), so nothing is added here, as in
    /// Hugging Face's `apply_chat_template(..., tokenize=True)`.
    pub fn apply_chat_template(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = template.render(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// The pre-tokenizer for a byte-level BPE vocabulary, by GGUF `tokenizer.ggml.pre` name.
fn byte_level_pre_tokenizer(name: &str, path: &Path) -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(re.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| TokenizerError::Build {
            path: path.to_path_buf(),
            message: format!("pre-tokenizer regex for {name:?}: {e}"),
        })
    };
    // Regex splits one after the other, then the byte-to-character mapping alone.
    let splits_then_bytes = |res: &[&str]| -> Result<PreTokenizerWrapper> {
        let mut seq = res.iter().map(|r| split(r)).collect::<Result<Vec<_>>>()?;
        seq.push(ByteLevel::new(false, true, false).into());
        Ok(PreSequence::new(seq).into())
    };
    match name {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            Ok(PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into())
        }
        "gpt2" | "mpt" | "olmo" | "jais" => Ok(ByteLevel::new(false, true, true).into()),
        "default" => splits_then_bytes(&[
            DEFAULT_PUNCT_REGEX,
            GPT2_REGEX,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ]),
        "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx" => splits_then_bytes(&[LLAMA3_REGEX]),
        "qwen2" | "qwen2.5" | "qwen-2.5" | "deepseek-r1-qwen" | "stablelm2" => {
            splits_then_bytes(&[QWEN2_REGEX])
        }
        other => Err(TokenizerError::UnknownPre {
            path: path.to_path_buf(),
            pre: other.to_owned(),
            known: PRE_TOKENIZERS.to_vec(),
        }),
    }
}

/// SentencePiece BPE as ranked merges: every way of writing a normal piece as the concatenation
/// of two pieces is a merge, ranked by the merged piece's score (highest first).
fn sentencepiece_merges(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mergeable = |id: u32| {
        !matches!(
            types[id as usize],
            TT_CONTROL | TT_UNKNOWN | TT_UNUSED | TT_BYTE
        )
    };
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !mergeable(id as u32) {
            continue;
        }
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                if mergeable(li) && mergeable(ri) {
                    ranked.push((scores[id], id as u32, li, ri));
                }
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

/// `"a b"` → `("a", "b")`; the separator is the first space after the first character.
fn split_merge(m: &str, index: usize, path: &Path) -> Result<(String, String)> {
    let first_len = m.chars().next().map(char::len_utf8).unwrap_or(0);
    match m[first_len..].find(' ') {
        Some(p) => {
            let at = first_len + p;
            Ok((m[..at].to_owned(), m[at + 1..].to_owned()))
        }
        None => Err(TokenizerError::Inconsistent {
            path: path.to_path_buf(),
            what: format!("tokenizer.ggml.merges[{index}]"),
            message: format!("{m:?} is not two tokens separated by a space"),
        }),
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

fn add_end_of_turn_tokens(
    eos_ids: &mut Vec<u32>,
    lookup: impl Fn(&str) -> Option<u32>,
    special: &HashSet<u32>,
) {
    for name in END_OF_TURN_NAMES {
        if let Some(id) = lookup(name) {
            if special.contains(&id) {
                push_unique(eos_ids, id);
            }
        }
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Typed access to GGUF metadata with errors naming the key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md.get(key).ok_or_else(|| TokenizerError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str, got: &Value) -> TokenizerError {
        TokenizerError::WrongType {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            expected,
            got: format!("{:?}", got.value_type()),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x),
                Value::U32(x) => {
                    i32::try_from(*x).map_err(|_| self.wrong(key, "small integers", v))
                }
                Value::I8(x) => Ok(i32::from(*x)),
                Value::U8(x) => Ok(i32::from(*x)),
                Value::I16(x) => Ok(i32::from(*x)),
                Value::U16(x) => Ok(i32::from(*x)),
                v => Err(self.wrong(key, "an array of integers", v)),
            })
            .collect()
    }

    fn floats(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(self.wrong(key, "an array of floats", v)),
            })
            .collect()
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let x: Option<u64> = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        x.and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| self.wrong(key, "a token id", v))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_lines_split_after_first_char() {
        let p = Path::new("x.gguf");
        assert_eq!(
            split_merge("Ġ t", 0, p).unwrap(),
            ("Ġ".to_owned(), "t".to_owned())
        );
        assert!(split_merge("abc", 3, p).is_err());
    }
}
