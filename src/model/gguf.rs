//! GGUF files: metadata, tensors dequantised to f32 (every ggml type candle reads: F32, F16,
//! BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K), and llama.cpp's q/k row permutation undone so
//! the weights are in Hugging Face's rotate-half layout.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use thiserror::Error;

use super::config::{Activation, Architecture, DecoderConfig};

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable GGUF file (bad magic, unsupported version or truncated header): {message}")]
    BadHeader { path: PathBuf, message: String },
    #[error("{path}: truncated: tensor {name} needs bytes up to {needed} but the file has {len}")]
    Truncated {
        path: PathBuf,
        name: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: metadata key {key} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key} is not {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
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
}

type Result<T> = std::result::Result<T, GgufError>;

/// An opened GGUF file: the parsed header; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    /// Parses the header and checks that every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let content = Content::read(&mut file).map_err(|e| GgufError::BadHeader {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = (elems / block) * info.ggml_dtype.type_size();
            let needed = content.tensor_data_offset + info.offset + bytes as u64;
            if needed > len {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    needed,
                    len,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.content.tensor_infos.keys()
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

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|_| self.wrong(key, "a string"))
    }

    /// Any integer type, as GGUF writers differ in which they use.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(self.wrong(key, "a non-negative integer")),
        };
        Ok(n as usize)
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            _ => Err(self.wrong(key, "a float")),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.into(),
            expected,
        }
    }

    fn optional<T>(&self, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn architecture(&self) -> Result<Architecture> {
        match self.get_str("general.architecture")? {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(GgufError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch: other.into(),
            }),
        }
    }

    /// The quantised tensor as stored (for a quantised inference path).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            });
        }
        let mut file = File::open(&self.path).map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.content
            .tensor(&mut file, name, device)
            .map_err(|e| self.tensor_error(name, e))
    }

    /// The tensor dequantised to f32, in GGUF row order, shape `(rows, cols)` = ne reversed.
    pub fn tensor_f32(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.qtensor(name, device)?
            .dequantize(device)
            .map_err(|e| self.tensor_error(name, e))
    }

    fn tensor_error(&self, name: &str, e: candle_core::Error) -> GgufError {
        GgufError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            message: e.to_string(),
        }
    }

    /// The hyper-parameters of a llama-family model from `{arch}.*` metadata.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let architecture = self.architecture()?;
        let arch = self.get_str("general.architecture")?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.get_usize(&key("embedding_length"))?;
        let heads = self.get_usize(&key("attention.head_count"))?;
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => {
                return Err(GgufError::MissingTensor {
                    path: self.path.clone(),
                    name: "token_embd.weight".into(),
                })
            }
        };
        let head_dim = self
            .optional(self.get_usize(&key("attention.key_length")))?
            .unwrap_or(hidden / heads.max(1));
        let eos = self.optional(self.get_usize("tokenizer.ggml.eos_token_id"))?;
        let cfg = DecoderConfig {
            architecture,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.get_usize(&key("feed_forward_length"))?,
            num_layers: self.get_usize(&key("block_count"))?,
            num_heads: heads,
            num_kv_heads: self
                .optional(self.get_usize(&key("attention.head_count_kv")))?
                .unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            // llama.cpp's default when the key is absent.
            rope_theta: self
                .optional(self.get_f64(&key("rope.freq_base")))?
                .unwrap_or(10_000.0),
            max_position_embeddings: self.get_usize(&key("context_length"))?,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            activation: Activation::Silu,
            query_scale: (head_dim as f64).powf(-0.5),
            gemma: None,
            bos_token_id: self
                .optional(self.get_usize("tokenizer.ggml.bos_token_id"))?
                .map(|v| v as u32),
            eos_token_ids: eos.map(|v| vec![v as u32]).unwrap_or_default(),
            pad_token_id: self
                .optional(self.get_usize("tokenizer.ggml.padding_token_id"))?
                .map(|v| v as u32),
        };
        cfg.validate().map_err(|message| GgufError::Tensor {
            path: self.path.clone(),
            name: "(metadata)".into(),
            message,
        })?;
        Ok(cfg)
    }

    /// Every tensor as f32 under its Hugging Face name. llama.cpp's converter permutes the q and
    /// k rows of Llama models for its adjacent-pair RoPE; they are put back in rotate-half order
    /// (Qwen2 files are not permuted).
    pub fn load_hf_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let cfg = self.decoder_config()?;
        let permuted = cfg.architecture == Architecture::Llama;
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            let hf = hf_name(name).ok_or_else(|| GgufError::Tensor {
                path: self.path.clone(),
                name: name.clone(),
                message: "no Hugging Face equivalent known".into(),
            })?;
            let mut t = self.tensor_f32(name, device)?;
            if permuted {
                if name.ends_with("attn_q.weight") {
                    t = unpermute_rows(&t, cfg.num_heads)
                        .map_err(|e| self.tensor_error(name, e))?;
                } else if name.ends_with("attn_k.weight") {
                    t = unpermute_rows(&t, cfg.num_kv_heads)
                        .map_err(|e| self.tensor_error(name, e))?;
                }
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

/// GGUF row `h·hd + 2i + s` → HF row `h·hd + s·hd/2 + i` (h head, s ∈ {0, 1}, i < hd/2).
pub fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    // (heads, hd/2, 2, cols) → (heads, 2, hd/2, cols)
    w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
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
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
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
