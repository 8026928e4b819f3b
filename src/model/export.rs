//! The model as loaded here (a GGUF dequantised, an adapter merged) written out for other tools:
//!
//! - a Hugging Face directory that `transformers` and this project load: `config.json`,
//!   `model.safetensors` under the Hugging Face tensor names, and with a tokenizer
//!   `tokenizer.json`, `tokenizer_config.json` (its chat template) and `generation_config.json`;
//! - a GGUF file for llama.cpp and its kin: llama.cpp's tensor names and q/k row order, the
//!   matrices in f32, f16 or Q8_0 (norms and biases in f32), the tokenizer's metadata carried over
//!   from the GGUF the model was loaded from.
//!
//! Llama and Qwen2 only: Gemma-2's config (soft-caps, sliding windows, the query scale) is not
//! written yet, and is refused rather than written wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::config::{Activation, Architecture, DecoderConfig};
use super::decoder::Decoder;
use super::tokenizer::Tokenizer;
use super::ModelError;

/// What [`write_hf_dir`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    /// The directory or file written.
    pub path: PathBuf,
    pub tensors: usize,
    pub parameters: usize,
    pub dtype: String,
    pub files: Vec<String>,
}

/// `config.json` for `cfg` (the keys of transformers 4.x and 5.x both).
pub fn hf_config(cfg: &DecoderConfig, dtype: DType) -> Result<Value, ModelError> {
    let (model_type, class) = match cfg.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Architecture::Gemma2 => {
            return Err(ModelError::Input(
                "export writes Llama and Qwen2 models; Gemma-2 is not supported yet".into(),
            ))
        }
    };
    let act = match cfg.activation {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    };
    let eos: Value = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype_name(dtype)?,
        "use_cache": true,
    });
    if cfg.architecture == Architecture::Llama {
        config["attention_bias"] = json!(cfg.attention_bias);
        config["mlp_bias"] = json!(false);
    } else if !cfg.attention_bias {
        return Err(ModelError::Input(
            "a Qwen2 model without q/k/v biases cannot be written as Qwen2".into(),
        ));
    }
    Ok(config)
}

fn dtype_name(dtype: DType) -> Result<&'static str, ModelError> {
    match dtype {
        DType::F32 => Ok("float32"),
        DType::BF16 => Ok("bfloat16"),
        DType::F16 => Ok("float16"),
        other => Err(ModelError::Input(format!(
            "export writes f32, bf16 or f16 weights, not {other:?}"
        ))),
    }
}

/// Every weight of `model` under its Hugging Face name, in `dtype`. LoRA slots must be merged
/// first ([`super::lora::merge_into`]): an unmerged adapter would be silently left out.
pub fn hf_tensors(model: &Decoder, dtype: DType) -> Result<Vec<(String, Tensor)>, ModelError> {
    dtype_name(dtype)?;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        model.embed_tokens.clone(),
    )];
    for (name, linear) in model.linear_layers() {
        if linear.lora.is_some() {
            return Err(ModelError::Input(format!(
                "{name} still holds an unmerged LoRA adapter; merge it before export"
            )));
        }
        out.push((format!("{name}.weight"), linear.weight.clone()));
        if let Some(b) = &linear.bias {
            out.push((format!("{name}.bias"), b.clone()));
        }
    }
    for (l, block) in model.layers.iter().enumerate() {
        out.push((
            format!("model.layers.{l}.input_layernorm.weight"),
            block.input_layernorm.weight.clone(),
        ));
        out.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            block.post_attention_layernorm.weight.clone(),
        ));
    }
    out.push(("model.norm.weight".into(), model.norm.weight.clone()));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".into(), head.clone()));
    }
    out.into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect()
}

/// Writes `model` (and `tokenizer`, when given) into the new directory `out`: every file goes
/// into a temporary directory beside it, renamed into place when all are written, so `out` is
/// either complete or absent. An existing `out` is refused.
pub fn write_hf_dir(
    model: &Decoder,
    tokenizer: Option<&Tokenizer>,
    dtype: DType,
    out: &Path,
) -> Result<ExportSummary, ModelError> {
    if out.exists() {
        return Err(ModelError::Input(format!(
            "{} exists; export writes a new directory",
            out.display()
        )));
    }
    let config = hf_config(&model.config, dtype)?;
    let tensors = hf_tensors(model, dtype)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".export-")
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    let mut files = vec!["config.json".to_string(), "model.safetensors".to_string()];
    let write_json = |name: &str, value: &Value| -> Result<(), ModelError> {
        let path = tmp.path().join(name);
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| ModelError::Input(format!("{name}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(io(&path))
    };
    write_json("config.json", &config)?;
    let parameters = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let count = tensors.len();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let weights = tmp.path().join("model.safetensors");
    super::weights::save_safetensors_atomic(&map, &weights)?;
    if let Some(tok) = tokenizer {
        let path = tmp.path().join("tokenizer.json");
        let text = tok
            .inner()
            .to_string(true)
            .map_err(|e| ModelError::Input(format!("serialising the tokenizer: {e}")))?;
        std::fs::write(&path, text).map_err(io(&path))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
        let mut tok_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.config.max_position_embeddings,
            "add_bos_token": tok.add_bos_token(),
            "bos_token": name(tok.bos_id()),
            "eos_token": name(tok.eos_ids().first().copied()),
            "pad_token": name(tok.pad_id()),
        });
        if let Some(t) = tok.chat_template_source() {
            tok_config["chat_template"] = json!(t);
        }
        write_json("tokenizer_config.json", &tok_config)?;
        let eos: Vec<u32> = tok.eos_ids().to_vec();
        write_json(
            "generation_config.json",
            &json!({
                "bos_token_id": tok.bos_id(),
                "eos_token_id": eos,
                "pad_token_id": tok.pad_id(),
            }),
        )?;
        files.extend(
            [
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
            ]
            .map(String::from),
        );
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|source| {
        let _ = std::fs::remove_dir_all(&kept);
        ModelError::Io {
            path: out.to_path_buf(),
            source,
        }
    })?;
    Ok(ExportSummary {
        path: out.to_path_buf(),
        tensors: count,
        parameters,
        dtype: dtype_name(dtype)?.into(),
        files,
    })
}

/// The precision of a GGUF export's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufPrecision {
    F32,
    F16,
    /// Blocks of 32 weights as 8-bit integers with one f16 scale (llama.cpp's `Q8_0`).
    Q8_0,
}

impl GgufPrecision {
    pub fn name(self) -> &'static str {
        match self {
            GgufPrecision::F32 => "f32",
            GgufPrecision::F16 => "f16",
            GgufPrecision::Q8_0 => "q8_0",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufPrecision::F32 => GgmlDType::F32,
            GgufPrecision::F16 => GgmlDType::F16,
            GgufPrecision::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_Q8_0`).
    fn file_type(self) -> u32 {
        match self {
            GgufPrecision::F32 => 0,
            GgufPrecision::F16 => 1,
            GgufPrecision::Q8_0 => 7,
        }
    }
}

/// The GGUF tensors of `model`: llama.cpp's names, q/k rows in its order for Llama (see
/// [`super::gguf::permute_rows`]), matrices in `precision`, vectors in f32.
pub fn gguf_tensors(
    model: &Decoder,
    precision: GgufPrecision,
) -> Result<Vec<(String, QTensor)>, ModelError> {
    let cfg = &model.config;
    let permuted = super::gguf::qk_permuted(cfg.architecture);
    let bad = |name: &str, message: String| ModelError::Input(format!("{name}: {message}"));
    let mut out = Vec::new();
    for (hf, t) in hf_tensors(model, DType::F32)? {
        let name = super::gguf::gguf_name(&hf)
            .ok_or_else(|| bad(&hf, "no llama.cpp name for this tensor".into()))?;
        let heads = match (
            permuted,
            name.contains(".attn_q."),
            name.contains(".attn_k."),
        ) {
            (true, true, _) => Some(cfg.num_heads),
            (true, _, true) => Some(cfg.num_kv_heads),
            _ => None,
        };
        let t = match heads {
            Some(h) => super::gguf::permute_rows(&t, h, cfg.head_dim).map_err(|m| bad(&name, m))?,
            None => t,
        };
        let dtype = if t.rank() == 2 {
            precision.ggml()
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dtype).map_err(|e| bad(&name, e.to_string()))?;
        out.push((name, q));
    }
    Ok(out)
}

/// The GGUF metadata of `model`: its architecture's keys as llama.cpp reads them, and every
/// `tokenizer.*` key of `tokenizer_metadata` (the GGUF the model was loaded from).
pub fn gguf_metadata(
    model: &Decoder,
    tokenizer_metadata: &HashMap<String, gguf_file::Value>,
    name: &str,
    precision: GgufPrecision,
) -> Result<Vec<(String, gguf_file::Value)>, ModelError> {
    use gguf_file::Value as V;
    let cfg = &model.config;
    let arch = match cfg.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Gemma2 => {
            return Err(ModelError::Input(
                "export writes Llama and Qwen2 models; Gemma-2 is not supported yet".into(),
            ))
        }
    };
    let u32_of = |n: usize| V::U32(n as u32);
    let mut md = vec![
        ("general.architecture".to_string(), V::String(arch.into())),
        ("general.name".to_string(), V::String(name.into())),
        (
            "general.file_type".to_string(),
            V::U32(precision.file_type()),
        ),
        (
            format!("{arch}.context_length"),
            u32_of(cfg.max_position_embeddings),
        ),
        (format!("{arch}.embedding_length"), u32_of(cfg.hidden_size)),
        (format!("{arch}.block_count"), u32_of(cfg.num_layers)),
        (
            format!("{arch}.feed_forward_length"),
            u32_of(cfg.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u32_of(cfg.num_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32_of(cfg.num_kv_heads),
        ),
        (format!("{arch}.attention.key_length"), u32_of(cfg.head_dim)),
        (
            format!("{arch}.attention.value_length"),
            u32_of(cfg.head_dim),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{arch}.rope.dimension_count"), u32_of(cfg.head_dim)),
        (
            format!("{arch}.rope.freq_base"),
            V::F32(cfg.rope_theta as f32),
        ),
        (format!("{arch}.vocab_size"), u32_of(cfg.vocab_size)),
    ];
    let mut tokenizer: Vec<(&String, &V)> = tokenizer_metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    if tokenizer.is_empty() {
        return Err(ModelError::Input(
            "no tokenizer.* metadata to carry over: a GGUF export needs the model loaded from a \
             GGUF file"
                .into(),
        ));
    }
    tokenizer.sort_by(|a, b| a.0.cmp(b.0));
    md.extend(tokenizer.into_iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(md)
}

/// Writes `model` as the new GGUF file `out` (through a temporary file renamed into place).
pub fn write_gguf(
    model: &Decoder,
    tokenizer_metadata: &HashMap<String, gguf_file::Value>,
    name: &str,
    precision: GgufPrecision,
    out: &Path,
) -> Result<ExportSummary, ModelError> {
    if out.exists() {
        return Err(ModelError::Input(format!(
            "{} exists; export writes a new file",
            out.display()
        )));
    }
    let metadata = gguf_metadata(model, tokenizer_metadata, name, precision)?;
    let tensors = gguf_tensors(model, precision)?;
    let parameters = tensors.iter().map(|(_, q)| q.shape().elem_count()).sum();
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, q)| (k.as_str(), q)).collect();
    let mut tmp = super::atomic_temp(out)?;
    gguf_file::write(tmp.as_file_mut(), &md, &ts).map_err(|e| ModelError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    super::persist_atomic(tmp, out)?;
    Ok(ExportSummary {
        path: out.to_path_buf(),
        tensors: tensors.len(),
        parameters,
        dtype: precision.name().into(),
        files: vec![out
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned())],
    })
}
