//! GGUF files: metadata, tensors dequantised to f32 (every ggml type candle reads: F32, F16,
//! BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K), the quantised tensors themselves for a fast
//! inference path, Hugging Face tensor names, and llama.cpp's q/k row permutation undone so the
//! weights are in Hugging Face's rotate-half layout.
//!
//! The header is parsed by candle's `gguf_file::Content::read`; this module adds what a user needs
//! when a file is wrong: every error names the file, a cut-off file is reported as truncated
//! (checked for the header *and* for every tensor's data before anything is read), and an
//! unsupported ggml type, version or architecture is named.
//!
//! # The q/k permutation
//!
//! llama.cpp rotates adjacent pairs `(2i, 2i+1)` of each head for RoPE ("normal" rope type), while
//! Hugging Face Llama rotates the halves `(i, i + hd/2)`. Its converter
//! (`convert_hf_to_gguf.py`, `LlamaModel.permute`) therefore reorders the rows of `q_proj` and
//! `k_proj` of Llama checkpoints: GGUF row `h·hd + 2i + s` holds HF row `h·hd + s·hd/2 + i`
//! (h head, s ∈ {0, 1}, i < hd/2). [`GgufFile::load_hf_tensors`] undoes it. Qwen2 is converted
//! without that permutation (llama.cpp runs it with the "neox" rope type, i.e. rotate-half), so its
//! rows are left alone; [`qk_permuted`] records the choice per architecture.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::blocks::{BlockFormat, BlockRows};
use super::config::{Activation, Architecture, DecoderConfig};
use super::weights::WeightMap;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not a readable GGUF file: bad magic {got:?} (a GGUF file starts with \"GGUF\")"
    )]
    BadMagic { path: PathBuf, got: String },
    #[error(
        "{path}: not a readable GGUF file: version {version} is not supported (1, 2 and 3 are)"
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated: the GGUF header of this {len}-byte file ends early ({message})")]
    TruncatedHeader {
        path: PathBuf,
        len: u64,
        message: String,
    },
    #[error("{path}: not a readable GGUF file (malformed header): {message}")]
    BadHeader { path: PathBuf, message: String },
    #[error("{path}: a tensor has ggml type {type_id} ({type_name}), which is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)")]
    UnsupportedTensorType {
        path: PathBuf,
        type_id: u32,
        type_name: &'static str,
    },
    #[error("{path}: truncated: tensor {name} needs bytes up to {needed} but the file has {len}")]
    Truncated {
        path: PathBuf,
        name: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: metadata key {key} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key} is {got}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name}: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: architecture {arch:?} is not supported (supported: llama, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// Whether llama.cpp's converter permuted the q/k rows of this architecture (see the module doc).
pub fn qk_permuted(arch: Architecture) -> bool {
    match arch {
        Architecture::Llama => true,
        Architecture::Qwen2 | Architecture::Gemma2 => false,
    }
}

/// The hyper-parameters of a llama-family model, read from GGUF metadata. Serialised into run
/// manifests, so `defaults_applied` says which values did not come from the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GgufModelParams {
    pub architecture: Architecture,
    /// Rows of `token_embd.weight` (what the model can embed and predict).
    pub vocab_size: usize,
    /// Length of `tokenizer.ggml.tokens`, when the file has a tokenizer.
    pub tokenizer_tokens: Option<usize>,
    /// `{arch}.embedding_length`.
    pub hidden_size: usize,
    /// `{arch}.feed_forward_length`.
    pub intermediate_size: usize,
    /// `{arch}.block_count`.
    pub num_layers: usize,
    /// `{arch}.attention.head_count`.
    pub num_heads: usize,
    /// `{arch}.attention.head_count_kv` (llama.cpp: defaults to `head_count`).
    pub num_kv_heads: usize,
    /// `{arch}.attention.key_length`, else `hidden_size / num_heads`.
    pub head_dim: usize,
    /// `{arch}.attention.layer_norm_rms_epsilon` (stored as f32 in GGUF).
    pub rms_norm_eps: f64,
    /// `{arch}.rope.freq_base` (llama.cpp: defaults to 10000).
    pub rope_theta: f64,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// True when the file has no `output.weight`: logits use `token_embd.weight`.
    pub tie_word_embeddings: bool,
    /// True when `blk.0.attn_q.bias` exists (Qwen2).
    pub attention_bias: bool,
    /// Whether the q/k rows are stored in llama.cpp's permuted order.
    pub qk_permuted: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// `key = value` for each absent key whose default was used.
    pub defaults_applied: Vec<String>,
}

/// An opened GGUF file: the parsed header; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    len: u64,
    content: Content,
}

/// The magic bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// Names of the ggml type ids candle does not read, for error messages (ggml.h `ggml_type`).
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3, removed from ggml",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

fn value_type_name(v: &Value) -> String {
    match v {
        Value::String(_) => "a string".into(),
        Value::Array(items) => format!("an array of {} items", items.len()),
        other => format!("{:?}", other.value_type()),
    }
}

impl GgufFile {
    /// Parses the header and checks that every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let path_buf = path.to_path_buf();
        let io = |source| GgufError::Io {
            path: path_buf.clone(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();

        // Magic and version first, so those two mistakes get their own message.
        let mut head = [0u8; 8];
        let got = read_up_to(&mut file, &mut head).map_err(io)?;
        let magic_seen = &head[..got.min(4)];
        if magic_seen != &MAGIC[..magic_seen.len()] {
            return Err(GgufError::BadMagic {
                path: path_buf,
                got: String::from_utf8_lossy(magic_seen).into_owned(),
            });
        }
        if got < 8 {
            return Err(GgufError::TruncatedHeader {
                path: path_buf,
                len,
                message: "no room for magic and version".into(),
            });
        }
        let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(1..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: path_buf,
                version,
            });
        }
        check_alignment(&mut file, path)?;
        let content = read_content(&mut file, path, len)?;

        for (name, info) in &content.tensor_infos {
            let bad = |message: String| GgufError::Tensor {
                path: path_buf.clone(),
                name: name.clone(),
                message,
            };
            let dims = info.shape.dims();
            let elems = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
            let block = info.ggml_dtype.block_size();
            // ggml quantises along ne[0], the last dimension here.
            let row = dims.last().copied().unwrap_or(1);
            if !row.is_multiple_of(block) {
                return Err(bad(format!(
                    "row length {row} is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
            let needed = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(bytes as u64))
                .ok_or_else(|| bad(format!("data offset {} overflows", info.offset)))?;
            if needed > len {
                return Err(GgufError::Truncated {
                    path: path_buf,
                    name: name.clone(),
                    needed,
                    len,
                });
            }
        }
        Ok(Self {
            path: path_buf,
            len,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw metadata map (`tokenizer.ggml.*`, `general.*`, `{arch}.*`).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The ggml type and the shape (`ne` reversed: `[rows, cols]` for a matrix) of a tensor.
    pub fn tensor_info(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.missing_tensor(name))?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
            })
    }

    fn wrong(&self, key: &str, expected: &'static str, got: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.into(),
            expected,
            got: value_type_name(got),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong(key, "a string", other)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong(key, "a bool", other)),
        }
    }

    /// Any non-negative integer type, as GGUF writers differ in which they use.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        let n = match v {
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
        n.ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// Any integer type whose value fits a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let n = self.get_u64(key)?;
        u32::try_from(n).map_err(|_| GgufError::WrongType {
            path: self.path.clone(),
            key: key.into(),
            expected: "an integer that fits 32 bits",
            got: n.to_string(),
        })
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let n = self.get_u64(key)?;
        usize::try_from(n).map_err(|_| GgufError::WrongType {
            path: self.path.clone(),
            key: key.into(),
            expected: "an integer that fits usize",
            got: n.to_string(),
        })
    }

    /// An F32 value (an F64 is accepted and rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => Err(self.wrong(key, "a float", other)),
        }
    }

    /// An F32 or F64 value, widened to f64 (an F32 keeps its exact f32 value).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(f64::from(*x)),
            Value::F64(x) => Ok(*x),
            other => Err(self.wrong(key, "a float", other)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            other => Err(self.wrong(key, "an array", other)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let items = self.get_array(key)?;
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong(key, "an array of strings", other)),
            })
            .collect()
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let items = self.get_array(key)?;
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                other => Err(self.wrong(key, "an array of f32", other)),
            })
            .collect()
    }

    /// `Ok(None)` for a missing key; a present key of the wrong type stays an error.
    fn optional<T>(&self, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `general.architecture` as written in the file.
    pub fn architecture_name(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// `general.architecture`, if this runtime supports it.
    pub fn architecture(&self) -> Result<Architecture> {
        match self.architecture_name()? {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(GgufError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch: other.into(),
            }),
        }
    }

    fn missing_tensor(&self, name: &str) -> GgufError {
        GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
        }
    }

    fn tensor_error(&self, name: &str, e: candle_core::Error) -> GgufError {
        GgufError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            message: without_backtrace(e).to_string(),
        }
    }

    fn reopen(&self) -> Result<File> {
        File::open(&self.path).map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn read_qtensor(&self, file: &mut File, name: &str, device: &Device) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(self.missing_tensor(name));
        };
        // candle views the (then empty, unaligned) buffer as blocks; nothing to read in any case.
        if info.shape.elem_count() == 0 {
            return Err(GgufError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                message: format!("shape {:?} has no elements", info.shape.dims()),
            });
        }
        self.content
            .tensor(file, name, device)
            .map_err(|e| self.tensor_error(name, e))
    }

    /// The quantised tensor as stored (for a quantised inference path), shape `ne` reversed.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let mut file = self.reopen()?;
        self.read_qtensor(&mut file, name, device)
    }

    /// The tensor dequantised to f32, in GGUF row order, shape `(rows, cols)` = `ne` reversed.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        let mut file = self.reopen()?;
        self.tensor_f32_from(&mut file, name, device)
    }

    fn tensor_f32_from(&self, file: &mut File, name: &str, device: &Device) -> Result<Tensor> {
        self.read_qtensor(file, name, device)?
            .dequantize(device)
            .map_err(|e| self.tensor_error(name, e))
    }

    /// The llama hyper-parameters from `{arch}.*` and `tokenizer.*` metadata.
    pub fn model_params(&self) -> Result<GgufModelParams> {
        let architecture = self.architecture()?;
        let arch = self.architecture_name()?;
        let key = |k: &str| format!("{arch}.{k}");
        let mut defaults_applied = Vec::new();

        // Rope scaling would change the math and the decoder does not implement it.
        if let Some(kind) = self.optional(self.get_str(&key("rope.scaling.type")))? {
            if kind != "none" {
                return Err(GgufError::Unsupported {
                    path: self.path.clone(),
                    what: format!("rope scaling {kind:?} ({})", key("rope.scaling.type")),
                });
            }
        }
        if self.has_tensor("rope_freqs.weight") {
            return Err(GgufError::Unsupported {
                path: self.path.clone(),
                what: "per-frequency rope factors (tensor rope_freqs.weight, Llama 3 rope scaling)"
                    .into(),
            });
        }

        let hidden_size = self.get_usize(&key("embedding_length"))?;
        let num_heads = self.get_usize(&key("attention.head_count"))?;
        let num_kv_heads = match self.optional(self.get_usize(&key("attention.head_count_kv")))? {
            Some(n) => n,
            None => {
                defaults_applied.push(format!("{} = {num_heads}", key("attention.head_count_kv")));
                num_heads
            }
        };
        let head_dim = match self.optional(self.get_usize(&key("attention.key_length")))? {
            Some(n) => n,
            None => {
                let hd = hidden_size.checked_div(num_heads).unwrap_or(0);
                defaults_applied.push(format!(
                    "{} = {hd} (embedding_length / head_count)",
                    key("attention.key_length")
                ));
                hd
            }
        };
        let rope_theta = match self.optional(self.get_f64(&key("rope.freq_base")))? {
            Some(t) => t,
            None => {
                // llama.cpp's default when the key is absent.
                defaults_applied.push(format!("{} = 10000", key("rope.freq_base")));
                10_000.0
            }
        };
        let (_, embd_shape) = self.tensor_info("token_embd.weight")?;
        let vocab_size = match embd_shape.as_slice() {
            [rows, cols] if *cols == hidden_size => *rows,
            other => {
                return Err(GgufError::Tensor {
                    path: self.path.clone(),
                    name: "token_embd.weight".into(),
                    message: format!(
                        "shape {other:?}, expected [vocab, {hidden_size}] (embedding_length)"
                    ),
                })
            }
        };
        let tokenizer_tokens = self
            .optional(self.get_array("tokenizer.ggml.tokens"))?
            .map(<[Value]>::len);
        let token_id = |k: &str| self.optional(self.get_u32(k));
        Ok(GgufModelParams {
            architecture,
            vocab_size,
            tokenizer_tokens,
            hidden_size,
            intermediate_size: self.get_usize(&key("feed_forward_length"))?,
            num_layers: self.get_usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            context_length: self.get_usize(&key("context_length"))?,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            qk_permuted: qk_permuted(architecture),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: token_id("tokenizer.ggml.padding_token_id")?,
            chat_template: self
                .optional(self.get_str("tokenizer.chat_template"))?
                .map(str::to_string),
            defaults_applied,
        })
    }

    /// The resolved decoder configuration (see [`GgufFile::model_params`]).
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let p = self.model_params()?;
        for d in &p.defaults_applied {
            tracing::info!(file = %self.path.display(), "GGUF default applied: {d}");
        }
        let cfg = DecoderConfig {
            architecture: p.architecture,
            vocab_size: p.vocab_size,
            hidden_size: p.hidden_size,
            intermediate_size: p.intermediate_size,
            num_layers: p.num_layers,
            num_heads: p.num_heads,
            num_kv_heads: p.num_kv_heads,
            head_dim: p.head_dim,
            rms_norm_eps: p.rms_norm_eps,
            rope_theta: p.rope_theta,
            max_position_embeddings: p.context_length,
            tie_word_embeddings: p.tie_word_embeddings,
            attention_bias: p.attention_bias,
            activation: Activation::Silu,
            query_scale: (p.head_dim as f64).powf(-0.5),
            gemma: None,
            bos_token_id: p.bos_token_id,
            eos_token_ids: p.eos_token_id.into_iter().collect(),
            pad_token_id: p.pad_token_id,
        };
        cfg.validate().map_err(|message| GgufError::BadHeader {
            path: self.path.clone(),
            message: format!("inconsistent model metadata: {message}"),
        })?;
        Ok(cfg)
    }

    /// Every tensor as f32 under its Hugging Face name, with the q/k rows in rotate-half order
    /// (un-permuted for architectures whose converter permuted them, see [`qk_permuted`]).
    /// A tensor without a Hugging Face equivalent is an error, not skipped.
    pub fn load_hf_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        Ok(self.load_hf(device, false)?.0)
    }

    /// The weights for [`Decoder::load`](super::decoder::Decoder::load): the f32 tensors of
    /// [`Self::load_hf_tensors`] plus, for 2-D tensors stored as Q4_1 or Q8_0, the blocks
    /// themselves (rows in the same order), which decode steps can stream instead.
    pub fn load_weight_map(&self, device: &Device) -> Result<WeightMap> {
        let (tensors, blocks) = self.load_hf(device, true)?;
        Ok(WeightMap::new(tensors, self.path.clone()).with_blocks(blocks))
    }

    fn load_hf(
        &self,
        device: &Device,
        keep_blocks: bool,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, BlockRows>)> {
        let p = self.model_params()?;
        let mut file = self.reopen()?;
        let mut out = HashMap::with_capacity(self.content.tensor_infos.len());
        let mut blocks = HashMap::new();
        for name in self.tensor_names() {
            let hf = hf_name(name).ok_or_else(|| GgufError::Tensor {
                path: self.path.clone(),
                name: name.into(),
                message: "no Hugging Face equivalent known".into(),
            })?;
            let q = self.read_qtensor(&mut file, name, device)?;
            let mut t = q
                .dequantize(device)
                .map_err(|e| self.tensor_error(name, e))?;
            let mut stored = match (keep_blocks, BlockFormat::from_ggml(q.dtype()), t.dims()) {
                (true, Some(format), &[rows, cols]) => {
                    let bytes = q.data().map_err(|e| self.tensor_error(name, e))?;
                    BlockRows::new(format, rows, cols, bytes.into_owned())
                }
                _ => None,
            };
            if p.qk_permuted {
                let heads = if name.contains(".attn_q.") {
                    Some(p.num_heads)
                } else if name.contains(".attn_k.") {
                    Some(p.num_kv_heads)
                } else {
                    None
                };
                if let Some(heads) = heads {
                    t = unpermute_rows(&t, heads, p.head_dim).map_err(|message| {
                        GgufError::Tensor {
                            path: self.path.clone(),
                            name: name.into(),
                            message,
                        }
                    })?;
                    stored =
                        stored.map(|b| b.with_row_order(&unpermuted_row_order(heads, p.head_dim)));
                }
            }
            if let Some(b) = stored {
                blocks.insert(hf.clone(), b);
            }
            out.insert(hf, t);
        }
        Ok((out, blocks))
    }
}

/// For [`unpermute_rows`]: HF row `h·hd + s·hd/2 + i` comes from GGUF row `h·hd + 2i + s`.
fn unpermuted_row_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (s, i) = (within / half, within % half);
            h * head_dim + 2 * i + s
        })
        .collect()
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set; it has no place in a
/// message about a file.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// Refuses a `general.alignment` of 0 or one that is not a power of two (llama.cpp refuses both):
/// candle's reader divides by it unchecked. Walks the metadata the way `Content::read` will; a
/// header it cannot walk is left for `Content::read` to report.
fn check_alignment(file: &mut File, path: &Path) -> Result<()> {
    use std::io::{BufReader, Seek};
    file.rewind().map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = BufReader::new(&mut *file);
    let alignment = match find_alignment(&mut r) {
        Ok(Some(a)) => a,
        Ok(None) | Err(_) => return Ok(()),
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadHeader {
            path: path.to_path_buf(),
            message: format!("general.alignment is {alignment}; it must be a power of two"),
        });
    }
    Ok(())
}

/// The integer value of `general.alignment` when the metadata sets one (as `Content::read` reads
/// it: an unsigned or non-negative signed integer of at most 32 bits; anything else is ignored).
fn find_alignment<R: std::io::BufRead + std::io::Seek>(r: &mut R) -> std::io::Result<Option<u64>> {
    fn u32_of<R: Read>(r: &mut R) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of<R: Read>(r: &mut R) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn too_long() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "length out of range")
    }
    /// Skips one value of GGUF type `ty` (arrays at most `depth` deep).
    fn skip<R: std::io::BufRead + std::io::Seek>(
        r: &mut R,
        ty: u32,
        v1: bool,
        depth: usize,
    ) -> std::io::Result<()> {
        let len = |r: &mut R| {
            if v1 {
                u32_of(r).map(u64::from)
            } else {
                u64_of(r)
            }
        };
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1i64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(n) = fixed(ty) {
            return r.seek_relative(n);
        }
        match ty {
            8 => {
                let n = i64::try_from(len(r)?).map_err(|_| too_long())?;
                r.seek_relative(n)
            }
            9 if depth > 0 => {
                let item = u32_of(r)?;
                let count = len(r)?;
                if let Some(size) = fixed(item) {
                    let bytes = i64::try_from(count)
                        .ok()
                        .and_then(|c| c.checked_mul(size))
                        .ok_or_else(too_long)?;
                    return r.seek_relative(bytes);
                }
                for _ in 0..count {
                    // Each item takes at least one byte: a count beyond the file ends in EOF.
                    if r.fill_buf()?.is_empty() {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    skip(r, item, v1, depth - 1)?;
                }
                Ok(())
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unknown value type",
            )),
        }
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let v1 = head[4..8] == 1u32.to_le_bytes();
    let count = |r: &mut R| {
        if v1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    };
    let _tensors = count(r)?;
    let kvs = count(r)?;
    let mut alignment = None;
    for _ in 0..kvs {
        let key_len = count(r)?;
        if key_len > 1 << 20 {
            return Err(too_long());
        }
        let mut key = vec![0u8; key_len as usize];
        r.read_exact(&mut key)?;
        let ty = u32_of(r)?;
        // As candle reads keys: trailing NULs dropped; a later duplicate replaces an earlier one.
        while key.last() == Some(&0) {
            key.pop();
        }
        if key == b"general.alignment" {
            alignment = None;
        }
        if key == b"general.alignment" && ty <= 5 {
            let mut b = [0u8; 4];
            let n = [1, 1, 2, 2, 4, 4][ty as usize];
            r.read_exact(&mut b[..n])?;
            let signed_negative = matches!(ty, 1 | 3 | 5) && b[n - 1] & 0x80 != 0;
            alignment = if signed_negative {
                None
            } else {
                Some(u64::from(u32::from_le_bytes(b)))
            };
        } else {
            // candle refuses arrays nested deeper than 64.
            skip(r, ty, v1, 65)?;
        }
    }
    Ok(alignment)
}

/// `Content::read` with its errors sorted into truncation, unsupported type and malformed header.
fn read_content(file: &mut File, path: &Path, len: u64) -> Result<Content> {
    use std::io::Seek;
    file.rewind().map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // candle's reader checks lengths against the file size, but a crafted header (alignment 0)
    // can still make it divide by zero; a panic must not escape for a bad file.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(file)));
    let err = match read {
        Ok(Ok(content)) => return Ok(content),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(GgufError::BadHeader {
                path: path.to_path_buf(),
                message: "the header reader panicked (inconsistent header values)".into(),
            })
        }
    };
    let err = without_backtrace(err);
    let message = err.to_string();
    if let Some(id) = message
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|rest| rest.trim().parse::<u32>().ok())
    {
        return Err(GgufError::UnsupportedTensorType {
            path: path.to_path_buf(),
            type_id: id,
            type_name: ggml_type_name(id),
        });
    }
    let eof = matches!(&err, candle_core::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
        || message.contains("failed to fill whole buffer")
        || message.contains("remaining");
    if eof {
        return Err(GgufError::TruncatedHeader {
            path: path.to_path_buf(),
            len,
            message,
        });
    }
    Err(GgufError::BadHeader {
        path: path.to_path_buf(),
        message,
    })
}

/// Undoes llama.cpp's q/k permutation of a weight `(heads·hd, cols)` or a bias `(heads·hd)`:
/// GGUF row `h·hd + 2i + s` → HF row `h·hd + s·hd/2 + i` (h head, s ∈ {0, 1}, i < hd/2).
pub fn unpermute_rows(
    w: &Tensor,
    heads: usize,
    head_dim: usize,
) -> std::result::Result<Tensor, String> {
    reorder_qk_rows(w, heads, head_dim, false)
}

/// llama.cpp's q/k row order for a Hugging Face weight or bias: the inverse of
/// [`unpermute_rows`] (HF row `h·hd + s·hd/2 + i` → GGUF row `h·hd + 2i + s`).
pub fn permute_rows(
    w: &Tensor,
    heads: usize,
    head_dim: usize,
) -> std::result::Result<Tensor, String> {
    reorder_qk_rows(w, heads, head_dim, true)
}

/// Within each head, interleaves the two halves of the rows (`to_gguf`) or splits the
/// interleaved rows back into halves: a transpose of the head's `(2, hd/2)` and `(hd/2, 2)` views.
fn reorder_qk_rows(
    w: &Tensor,
    heads: usize,
    head_dim: usize,
    to_gguf: bool,
) -> std::result::Result<Tensor, String> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if !head_dim.is_multiple_of(2) || heads * head_dim != rows || dims.len() > 2 || dims.is_empty()
    {
        return Err(format!(
            "shape {dims:?} does not hold {heads} heads of even size {head_dim} for the q/k row order"
        ));
    }
    let cols = dims.get(1).copied().unwrap_or(1);
    let view = if to_gguf {
        (heads, 2, head_dim / 2, cols)
    } else {
        (heads, head_dim / 2, 2, cols)
    };
    w.reshape(view)
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims.as_slice()))
        .map_err(|e| without_backtrace(e).to_string())
}

/// The llama-family GGUF name of a Hugging Face tensor: the inverse of [`hf_name`].
pub fn gguf_name(hf: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = direct {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    let name = format!("blk.{layer}.{gguf_module}.{kind}");
    // Only names that read back to `hf` (a canonical layer number, weight or bias).
    (hf_name(&name).as_deref() == Some(hf)).then_some(name)
}

/// The Hugging Face name of a llama-family GGUF tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = direct {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Only canonical decimal layer numbers ("01" or "+1" would be a different name).
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_cover_the_llama_layout() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.29.attn_output.weight",
                "model.layers.29.self_attn.o_proj.weight",
            ),
            (
                "blk.1.ffn_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
            ),
        ];
        for (g, hf) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(hf), "{g}");
            assert_eq!(gguf_name(hf).as_deref(), Some(g), "{hf}");
        }
        for hf in [
            "model.layers.01.self_attn.q_proj.weight",
            "model.layers.1.self_attn.rotary_emb.inv_freq",
            "model.layers.1.mlp.gate_proj.scale",
            "lm_head.bias",
        ] {
            assert_eq!(gguf_name(hf), None, "{hf}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_q.scale",
            "blk.1.ffn_gate_exps.weight",
            "blk..attn_q.weight",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
    }

    #[test]
    fn unpermute_follows_the_index_formula() -> candle_core::Result<()> {
        // Row r of the input holds the value r, so the output lists source rows.
        let (heads, hd, cols) = (3usize, 8usize, 2usize);
        let rows = heads * hd;
        let data: Vec<f32> = (0..rows * cols).map(|k| (k / cols) as f32).collect();
        let w = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        let out = unpermute_rows(&w, heads, hd).map_err(candle_core::Error::msg)?;
        let out = out.to_vec2::<f32>()?;
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    let hf = h * hd + s * hd / 2 + i;
                    let gguf = h * hd + 2 * i + s;
                    assert_eq!(out[hf], vec![gguf as f32; cols], "h {h} s {s} i {i}");
                }
            }
        }
        let bias = Tensor::arange(0f32, rows as f32, &Device::Cpu)?;
        let b = unpermute_rows(&bias, heads, hd).map_err(candle_core::Error::msg)?;
        let b = b.to_vec1::<f32>()?;
        assert_eq!(&b[..hd], &[0., 2., 4., 6., 1., 3., 5., 7.]);
        assert!(unpermute_rows(&w, 5, hd).is_err());
        assert!(unpermute_rows(&w, 8, 3).is_err());
        // The writer's permutation is its inverse, on weights and biases.
        let noise: Vec<f32> = (0..rows * cols)
            .map(|k| ((k * 7919) % 101) as f32 - 50.0)
            .collect();
        let w = Tensor::from_vec(noise, (rows, cols), &Device::Cpu)?;
        for t in [&w, &bias] {
            let there = permute_rows(t, heads, hd).map_err(candle_core::Error::msg)?;
            let back = unpermute_rows(&there, heads, hd).map_err(candle_core::Error::msg)?;
            assert_eq!(
                back.flatten_all()?.to_vec1::<f32>()?,
                t.flatten_all()?.to_vec1::<f32>()?
            );
            assert_ne!(
                there.flatten_all()?.to_vec1::<f32>()?,
                t.flatten_all()?.to_vec1::<f32>()?
            );
        }
        assert!(permute_rows(&bias.reshape((rows, 1))?, 5, hd).is_err());
        Ok(())
    }
}
