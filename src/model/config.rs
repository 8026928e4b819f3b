//! Model configurations: each architecture's raw Hugging Face `config.json` (both the 4.x and the
//! 5.x layouts) resolved once into a [`DecoderConfig`] that the forward pass reads, with no
//! `Option` left that secretly means "default".

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::ModelError;

/// The architectures this runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
    Gemma2,
}

/// Feed-forward non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh` (Gemma-2): the tanh approximation.
    GeluTanh,
}

/// Everything the decoder needs, resolved. Serialised into run manifests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2).
    pub attention_bias: bool,
    pub activation: Activation,
    /// Attention scores are scaled by `query_scale` (1/√head_dim, or Gemma-2's
    /// `query_pre_attn_scalar^-0.5`).
    pub query_scale: f64,
    /// Gemma-2 specifics; all off for Llama and Qwen2.
    pub gemma: Option<GemmaExtras>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaExtras {
    /// `tanh(s / cap) · cap` on attention scores before the mask.
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh(l / cap) · cap` on the final logits.
    pub final_logit_softcapping: Option<f64>,
    /// Per layer: `Some(w)` = sliding window of `w` keys (the query included), `None` = global.
    pub sliding_window: Vec<Option<usize>>,
}

impl DecoderConfig {
    /// Parses a Hugging Face `config.json`, dispatching on `model_type`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&text).map_err(|message| ModelError::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the text of a `config.json`; the error is a message the caller attaches a path to.
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or("no \"model_type\" key")?
            .to_string();
        let raw: RawHfConfig =
            serde_json::from_value(value).map_err(|e| format!("bad config: {e}"))?;
        match model_type.as_str() {
            "llama" => raw.resolve(Architecture::Llama),
            "qwen2" => raw.resolve(Architecture::Qwen2),
            "gemma2" => raw.resolve(Architecture::Gemma2),
            other => Err(format!(
                "unknown architecture (model_type {other:?}); supported: llama, qwen2, gemma2"
            )),
        }
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if let Some(g) = &self.gemma {
            if g.sliding_window.len() != self.num_layers {
                return Err("sliding-window list does not cover every layer".into());
            }
        }
        Ok(())
    }
}

/// One id or a list (`eos_token_id` is either in the wild).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The union of the keys the three architectures use. Keys that would change the math and that
/// this runtime does not implement (rope scaling, MLP bias, …) are read so they can be refused.
#[derive(Debug, Clone, Deserialize)]
struct RawHfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    /// 4.x layout.
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// 5.x layout.
    rope_parameters: Option<RopeParameters>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
}

impl RawHfConfig {
    fn rope_theta(&self) -> Result<f64, String> {
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(format!("rope_scaling {scaling} is not supported"));
            }
        }
        if let Some(p) = &self.rope_parameters {
            if let Some(kind) = p.rope_type.as_deref() {
                if kind != "default" {
                    return Err(format!("rope_type {kind:?} is not supported"));
                }
            }
            if let Some(theta) = p.rope_theta {
                return Ok(theta);
            }
        }
        // transformers' own default when neither layout names it.
        Ok(self.rope_theta.unwrap_or(10_000.0))
    }

    fn resolve(self, architecture: Architecture) -> Result<DecoderConfig, String> {
        if self.mlp_bias == Some(true) {
            return Err("mlp_bias = true is not supported".into());
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let act_name = self
            .hidden_activation
            .clone()
            .or(self.hidden_act.clone())
            .unwrap_or_else(|| "silu".into());
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return Err(format!("activation {other:?} is not supported")),
        };
        let gemma = if architecture == Architecture::Gemma2 {
            let window = self.sliding_window;
            let sliding = match (&self.layer_types, window) {
                (Some(types), Some(w)) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(Some(w)),
                        "full_attention" => Ok(None),
                        other => Err(format!("unknown layer type {other:?}")),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                // 4.x layout: even layers slide.
                (None, Some(w)) => (0..self.num_hidden_layers)
                    .map(|i| (i % 2 == 0).then_some(w))
                    .collect(),
                (_, None) => vec![None; self.num_hidden_layers],
            };
            if sliding.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types has {} entries for {} layers",
                    sliding.len(),
                    self.num_hidden_layers
                ));
            }
            Some(GemmaExtras {
                attn_logit_softcapping: self.attn_logit_softcapping,
                final_logit_softcapping: self.final_logit_softcapping,
                sliding_window: sliding,
            })
        } else {
            if self.use_sliding_window == Some(true) {
                return Err("use_sliding_window = true is not supported for qwen2".into());
            }
            None
        };
        let query_scale = match (architecture, self.query_pre_attn_scalar) {
            (Architecture::Gemma2, Some(s)) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let cfg = DecoderConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta()?,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self
                .tie_word_embeddings
                .unwrap_or(architecture == Architecture::Gemma2),
            attention_bias: match architecture {
                Architecture::Qwen2 => self.attention_bias.unwrap_or(true),
                _ => self.attention_bias.unwrap_or(false),
            },
            activation,
            query_scale,
            gemma,
            bos_token_id: self.bos_token_id,
            eos_token_ids: match self.eos_token_id {
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
                None => vec![],
            },
            pad_token_id: self.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
