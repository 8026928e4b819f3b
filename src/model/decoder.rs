//! The decoder-only transformer shared by Llama, Qwen2 and Gemma-2, read top to bottom:
//! embed → blocks (norm, attention, add; norm, MLP, add) → final norm → logits.
//!
//! Architecture differences are data in [`DecoderConfig`], not separate code paths: Qwen2 adds q/k/v
//! biases; Gemma-2 scales the embeddings, wraps attention and MLP in extra norms, soft-caps scores
//! and logits, and alternates sliding-window layers.
//!
//! Residual positions: `Resid::In(l)` is the input of block `l` (HF `hidden_states[l]`),
//! `Resid::Out(l)` its raw output. Capture and edit hooks act on those positions.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use super::attend::{attend, KvBuffer, Scoring};
use super::blocks::BlockRows;
use super::config::{Activation, DecoderConfig};
use super::layers::{
    apply_rope, compute_dtype, needs_no_grad, repeat_kv, soft_cap, DecodeWeight, Linear, RmsNorm,
    Rope,
};
use super::weights::WeightMap;
use super::{ModelError, Resid};

/// The projections of a block, in the order [`Decoder::linear_layers`] lists them.
const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// An additive attention mask, built once per forward pass: the values for the inference
/// kernel and the same numbers as a `(b, 1, t, s)` tensor for the differentiable path.
struct AttentionBias {
    values: Vec<f32>,
    tensor: Tensor,
}

/// Large finite negative for masked scores: `-inf` would turn a pad row into NaN, and NaN keys
/// poison every query that multiplies them, even masked ones.
const MASKED: f32 = -1.0e30;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        if self.activation == Activation::Silu && super::fused::supported(&gate) {
            let up = self.up_proj.forward(x)?;
            return self.down_proj.forward(&super::fused::silu_mul(&gate, &up)?);
        }
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Llama/Qwen2: the norm before the MLP. Gemma-2: the norm after attention.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma-2 only.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: Mlp,
    /// `Some(w)`: a query sees the `w` most recent keys, itself included.
    pub sliding_window: Option<usize>,
}

/// A decoder-only causal language model.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: DecoderConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// What decode steps stream for the output projection.
    head_decode_weight: Option<DecodeWeight>,
    /// The file's quantised blocks of the output projection (see [`Linear::source_blocks`]).
    head_blocks: Option<Arc<BlockRows>>,
    rope: Rope,
    dtype: DType,
    device: Device,
}

/// The precision of the weights a decode step streams (see [`Decoder::set_decode_weights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeWeights {
    #[default]
    F32,
    Bf16,
    /// The GGUF file's own Q4_1 / Q8_0 blocks where the weights came from them (f32 elsewhere).
    Gguf,
}

/// Which logits a forward pass computes (the vocabulary projection dominates short prompts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
    /// The last `n` positions of every row (`(b, n, vocab)`): scoring a reply that ends a
    /// left-padded sequence needs no logits over its prompt.
    Tail(usize),
    /// None: the pass stops after the last block a capture needs.
    None,
}

/// Replaces the residual stream at one position, e.g. with an SAE reconstruction.
pub struct ResidEdit<'a> {
    pub at: Resid,
    pub edit: &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
}

pub struct Forward<'a> {
    /// `(b, t)` u32 token ids of the new tokens (left-padded batches: pads first).
    pub input_ids: &'a Tensor,
    /// `(b, t)` 1 for real tokens, 0 for pads; `None` means all real.
    pub attention_mask: Option<&'a Tensor>,
    pub logits: Logits,
    pub capture: &'a [Resid],
    pub edit: Option<ResidEdit<'a>>,
}

impl<'a> Forward<'a> {
    pub fn logits(input_ids: &'a Tensor, attention_mask: Option<&'a Tensor>) -> Self {
        Self {
            input_ids,
            attention_mask,
            logits: Logits::All,
            capture: &[],
            edit: None,
        }
    }
}

#[derive(Debug)]
pub struct ForwardOutput {
    /// `(b, t, vocab)`, or `(b, 1, vocab)` for [`Logits::Last`], `(b, n, vocab)` for [`Logits::Tail`].
    pub logits: Option<Tensor>,
    /// `(b, t, d_model)` per requested position.
    pub captured: BTreeMap<Resid, Tensor>,
}

/// Keys, values and mask of the tokens seen so far, per sequence of a batch.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer keys and values of every cached position.
    layers: Vec<LayerKv>,
    /// Per sequence: 1 for real keys, 0 for pads, over all `s` cached positions.
    key_mask: Vec<Vec<u8>>,
    /// Per sequence: the position id the next real token gets.
    next_position: Vec<u32>,
}

/// One layer's cache: candle tensors `(b, kv_heads, s, head_dim)` on the differentiable path, a
/// buffer written in place on the inference path ([`attend`](super::attend)).
#[derive(Debug, Clone, Default)]
enum LayerKv {
    #[default]
    Empty,
    Tensors(Tensor, Tensor),
    Buffer(KvBuffer),
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each layer's cache made from the same layer of this one.
    fn map_layers(
        &self,
        f: impl Fn(&LayerKv) -> Result<LayerKv, ModelError>,
    ) -> Result<Vec<LayerKv>, ModelError> {
        self.layers.iter().map(f).collect()
    }

    /// A cache of one sequence copied to `b` sequences: a prompt prefix computed once serves a
    /// whole batch.
    pub fn repeat_batch(&self, b: usize) -> Result<Self, ModelError> {
        if self.key_mask.len() != 1 {
            return Err(ModelError::Input(format!(
                "only a cache of one sequence can be repeated (this one holds {})",
                self.key_mask.len()
            )));
        }
        let layers = self.map_layers(|layer| {
            Ok(match layer {
                LayerKv::Empty => LayerKv::Empty,
                LayerKv::Buffer(buffer) => LayerKv::Buffer(buffer.repeat_batch(b)),
                LayerKv::Tensors(k, v) => {
                    LayerKv::Tensors(k.repeat((b, 1, 1, 1))?, v.repeat((b, 1, 1, 1))?)
                }
            })
        })?;
        Ok(Self {
            layers,
            key_mask: vec![self.key_mask[0].clone(); b],
            next_position: vec![self.next_position[0]; b],
        })
    }

    /// The first `len` positions of a cache of one sequence without pads: the shared beginning
    /// of sequences that differ after it (an attack's candidates, which change one token each).
    pub fn prefix(&self, len: usize) -> Result<Self, ModelError> {
        if self.key_mask.len() != 1 || self.key_mask[0].contains(&0) {
            return Err(ModelError::Input(
                "only a cache of one sequence without pads has a prefix".into(),
            ));
        }
        if len > self.len() {
            return Err(ModelError::Input(format!(
                "a prefix of {len} positions is longer than the cache's {}",
                self.len()
            )));
        }
        let layers = self.map_layers(|layer| {
            Ok(match layer {
                LayerKv::Empty => LayerKv::Empty,
                LayerKv::Buffer(buffer) => {
                    let mut buffer = buffer.clone();
                    buffer.truncate(len);
                    LayerKv::Buffer(buffer)
                }
                LayerKv::Tensors(k, v) => {
                    LayerKv::Tensors(k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)
                }
            })
        })?;
        Ok(Self {
            layers,
            key_mask: vec![vec![1; len]],
            next_position: vec![len as u32],
        })
    }

    /// The sequences of several caches of the same model as one batch, in order: what lets a
    /// server add newly prefilled requests to a batch already decoding. A shorter cache is
    /// padded at its start with masked positions, so every sequence attends to what it did.
    pub fn stack(parts: Vec<KvCache>) -> Result<Self, ModelError> {
        let parts: Vec<KvCache> = parts
            .into_iter()
            .filter(|c| !c.key_mask.is_empty())
            .collect();
        let Some(first) = parts.first() else {
            return Ok(Self::new());
        };
        let num_layers = first.layers.len();
        if parts.iter().any(|c| c.layers.len() != num_layers) {
            return Err(ModelError::Input(
                "caches of models with different depths cannot be stacked".into(),
            ));
        }
        let len = parts.iter().map(KvCache::len).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let buffers: Option<Vec<&KvBuffer>> = parts
                .iter()
                .map(|c| match &c.layers[l] {
                    LayerKv::Buffer(b) => Some(b),
                    _ => None,
                })
                .collect();
            layers.push(match buffers {
                Some(buffers) => LayerKv::Buffer(KvBuffer::stack(&buffers)),
                None => {
                    let mut ks = Vec::with_capacity(parts.len());
                    let mut vs = Vec::with_capacity(parts.len());
                    for c in &parts {
                        let (k, v) = match &c.layers[l] {
                            LayerKv::Tensors(k, v) => (k.clone(), v.clone()),
                            LayerKv::Buffer(b) => b.to_tensors(&Device::Cpu)?,
                            LayerKv::Empty => {
                                return Err(ModelError::Input(
                                    "a cache with an empty layer cannot be stacked".into(),
                                ))
                            }
                        };
                        let pad = len - c.len();
                        let left_pad = |x: Tensor| -> Result<Tensor, ModelError> {
                            if pad == 0 {
                                return Ok(x);
                            }
                            let (b, kv, _, hd) = x.dims4()?;
                            let zeros = Tensor::zeros((b, kv, pad, hd), x.dtype(), x.device())?;
                            Ok(Tensor::cat(&[&zeros, &x], 2)?)
                        };
                        ks.push(left_pad(k)?);
                        vs.push(left_pad(v)?);
                    }
                    LayerKv::Tensors(Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
                }
            });
        }
        let mut key_mask = Vec::new();
        let mut next_position = Vec::new();
        for c in &parts {
            let pad = len - c.len();
            for row in &c.key_mask {
                key_mask.push(
                    std::iter::repeat_n(0, pad)
                        .chain(row.iter().copied())
                        .collect(),
                );
            }
            next_position.extend_from_slice(&c.next_position);
        }
        Ok(Self {
            layers,
            key_mask,
            next_position,
        })
    }

    /// Keeps the sequences `keep` (indices, in the order given) and drops the positions at the
    /// start that every kept sequence masks, so a long-lived batch does not grow with the pads
    /// of sequences that have left it.
    pub fn keep_rows(&mut self, keep: &[usize]) -> Result<(), ModelError> {
        if let Some(&bad) = keep.iter().find(|&&i| i >= self.key_mask.len()) {
            return Err(ModelError::Input(format!(
                "sequence {bad} is not in a cache of {}",
                self.key_mask.len()
            )));
        }
        if keep.is_empty() {
            *self = Self::new();
            return Ok(());
        }
        let skip = keep
            .iter()
            .map(|&i| self.key_mask[i].iter().take_while(|&&m| m == 0).count())
            .min()
            .unwrap_or(0);
        let index = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
            keep.len(),
            &Device::Cpu,
        )?;
        for layer in &mut self.layers {
            *layer = match std::mem::take(layer) {
                LayerKv::Empty => LayerKv::Empty,
                LayerKv::Buffer(b) => LayerKv::Buffer(b.select(keep, skip)),
                LayerKv::Tensors(k, v) => {
                    let s = k.dim(2)?;
                    let pick = |x: &Tensor| -> Result<Tensor, ModelError> {
                        let x = x.index_select(&index.to_device(x.device())?, 0)?;
                        Ok(x.narrow(2, skip, s - skip)?.contiguous()?)
                    };
                    LayerKv::Tensors(pick(&k)?, pick(&v)?)
                }
            };
        }
        self.key_mask = keep
            .iter()
            .map(|&i| self.key_mask[i][skip..].to_vec())
            .collect();
        self.next_position = keep.iter().map(|&i| self.next_position[i]).collect();
        Ok(())
    }

    /// Sequences in the cache.
    pub fn batch(&self) -> usize {
        self.key_mask.len()
    }
}

/// The `(b, t)` 0/1 mask of the new tokens (all real when absent), checked against the ids' shape.
fn read_mask(mask: Option<&Tensor>, b: usize, t: usize) -> Result<Vec<Vec<u8>>, ModelError> {
    let rows: Vec<Vec<u8>> = match mask {
        Some(m) => m.to_dtype(DType::U8)?.to_vec2::<u8>()?,
        None => vec![vec![1u8; t]; b],
    };
    if rows.len() != b || rows.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input(format!(
            "attention_mask shape does not match input_ids ({b}, {t})"
        )));
    }
    Ok(rows)
}

impl Decoder {
    pub fn load(
        config: DecoderConfig,
        weights: &mut WeightMap,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let cfg = &config;
        let d = cfg.hidden_size;
        let (q_out, kv_out) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let gemma = cfg.gemma.is_some();
        let norm = |w: &mut WeightMap, name: &str| -> Result<RmsNorm, ModelError> {
            let mut weight = w.take(name, &[d])?;
            if gemma {
                // Gemma stores w for x·(1 + w); fold the offset in once.
                weight = (weight + 1.0)?;
            }
            Ok(RmsNorm {
                weight: weight.to_dtype(dtype)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let linear =
            |w: &mut WeightMap,
             name: &str,
             out: usize,
             inp: usize,
             bias: bool|
             -> Result<Linear, ModelError> {
                let weight = w
                    .take(&format!("{name}.weight"), &[out, inp])?
                    .to_dtype(dtype)?;
                let bias = if bias {
                    Some(w.take(&format!("{name}.bias"), &[out])?.to_dtype(dtype)?)
                } else {
                    None
                };
                let blocks = w.take_blocks(&format!("{name}.weight"), out, inp);
                Ok(Linear::new(weight, bias)
                    .with_source_blocks(blocks.filter(|_| dtype == DType::F32)))
            };
        let embed_tokens = weights
            .take("model.embed_tokens.weight", &[cfg.vocab_size, d])?
            .to_dtype(dtype)?;
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head_blocks = weights
            .take_blocks(head_name, cfg.vocab_size, d)
            .filter(|_| dtype == DType::F32)
            .map(Arc::new);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            let self_attn = Attention {
                q_proj: linear(weights, &format!("{p}.self_attn.q_proj"), q_out, d, bias)?,
                k_proj: linear(weights, &format!("{p}.self_attn.k_proj"), kv_out, d, bias)?,
                v_proj: linear(weights, &format!("{p}.self_attn.v_proj"), kv_out, d, bias)?,
                o_proj: linear(weights, &format!("{p}.self_attn.o_proj"), d, q_out, false)?,
            };
            let i = cfg.intermediate_size;
            let mlp = Mlp {
                gate_proj: linear(weights, &format!("{p}.mlp.gate_proj"), i, d, false)?,
                up_proj: linear(weights, &format!("{p}.mlp.up_proj"), i, d, false)?,
                down_proj: linear(weights, &format!("{p}.mlp.down_proj"), d, i, false)?,
                activation: cfg.activation,
            };
            let (pre_ff, post_ff) = if gemma {
                (
                    Some(norm(
                        weights,
                        &format!("{p}.pre_feedforward_layernorm.weight"),
                    )?),
                    Some(norm(
                        weights,
                        &format!("{p}.post_feedforward_layernorm.weight"),
                    )?),
                )
            } else {
                (None, None)
            };
            layers.push(Block {
                input_layernorm: norm(weights, &format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: norm(
                    weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                )?,
                pre_feedforward_layernorm: pre_ff,
                post_feedforward_layernorm: post_ff,
                mlp,
                sliding_window: cfg.gemma.as_ref().and_then(|g| g.sliding_window[l]),
            });
        }
        let norm_out = norm(weights, "model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(
                weights
                    .take("lm_head.weight", &[cfg.vocab_size, d])?
                    .to_dtype(dtype)?,
            )
        };
        weights.finish()?;
        let rope = Rope::new(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.max_position_embeddings,
            dtype,
            device,
        )?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm: norm_out,
            lm_head,
            head_decode_weight: None,
            head_blocks,
            rope,
            dtype,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The factor embedding rows are multiplied by on the way in: Gemma-2's √d_model, rounded to
    /// the activation dtype as HF does; `None` for the other architectures.
    pub fn embedding_scale(&self) -> Result<Option<Tensor>, ModelError> {
        if self.config.gemma.is_none() {
            return Ok(None);
        }
        let scale = (self.config.hidden_size as f32).sqrt();
        Ok(Some(
            Tensor::new(scale, &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// The forward pass. With a cache, the new tokens attend to everything cached and are appended.
    pub fn forward(
        &self,
        req: Forward<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<ForwardOutput, ModelError> {
        let cfg = &self.config;
        let (b, t) = req.input_ids.dims2()?;
        let new_mask = read_mask(req.attention_mask, b, t)?;
        let mut scratch = KvCache::new();
        let cache = cache.unwrap_or(&mut scratch);
        self.prepare_cache(cache, b)?;
        let past = cache.len();
        let (cos, sin) = self.place_new_tokens(&new_mask, cache)?;
        let global_mask = self.attention_bias(&cache.key_mask, past, t, None)?;
        let window_mask = match cfg
            .gemma
            .as_ref()
            .and_then(|g| g.sliding_window.iter().flatten().next())
        {
            Some(&w) => Some(self.attention_bias(&cache.key_mask, past, t, Some(w))?),
            None => None,
        };

        // Stop after the deepest block a capture or edit needs when no logits are wanted.
        let wanted_inputs: Vec<usize> = req.capture.iter().map(|r| r.block_input_index()).collect();
        if let Some(&bad) = wanted_inputs.iter().find(|&&i| i > cfg.num_layers) {
            return Err(ModelError::Input(format!(
                "residual position {bad} is past the model's {} layers",
                cfg.num_layers
            )));
        }
        let last_block = match req.logits {
            Logits::None => wanted_inputs.iter().copied().max().unwrap_or(0),
            _ => cfg.num_layers,
        };
        let edit_at = req.edit.as_ref().map(|e| e.at.block_input_index());

        let mut captured = BTreeMap::new();
        let mut h = self
            .embed_tokens
            .index_select(&req.input_ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        if let Some(scale) = self.embedding_scale()? {
            h = h.broadcast_mul(&scale)?;
        }
        for index in 0..=last_block {
            if edit_at == Some(index) {
                if let Some(edit) = &req.edit {
                    h = (edit.edit)(&h)?;
                }
            }
            for &r in req.capture {
                if r.block_input_index() == index {
                    captured.insert(r, h.clone());
                }
            }
            if index == cfg.num_layers || (req.logits == Logits::None && index == last_block) {
                break;
            }
            let block = &self.layers[index];
            let mask = match (block.sliding_window, &window_mask) {
                (Some(_), Some(m)) => m,
                _ => &global_mask,
            };
            h = self.block_forward(block, index, &h, &cos, &sin, mask, &mut cache.layers[index])?;
        }

        let logits = match req.logits {
            Logits::None => None,
            wanted => {
                let positions = match wanted {
                    Logits::Last => 1,
                    Logits::Tail(n) => n.min(t),
                    _ => t,
                };
                let h = h.narrow(1, t - positions, positions)?;
                let h = self.norm.forward(&h)?;
                let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
                let mut head = Linear::new(head.clone(), None);
                head.decode_weight = self.head_decode_weight.clone();
                let mut logits = head.forward(&h)?;
                if let Some(cap) = cfg.gemma.as_ref().and_then(|g| g.final_logit_softcapping) {
                    logits = soft_cap(&logits, cap)?;
                }
                Some(logits)
            }
        };
        Ok(ForwardOutput { logits, captured })
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        index: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionBias,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let _span = tracing::trace_span!("block", index).entered();
        let attn_in = block.input_layernorm.forward(x)?;
        let mut attn = self.attention(&block.self_attn, &attn_in, cos, sin, mask, cache)?;
        let h = match &block.pre_feedforward_layernorm {
            // Gemma-2: norm the attention output, add, then norm before the MLP.
            Some(pre_ff) => {
                attn = block.post_attention_layernorm.forward(&attn)?;
                let h = (x + attn)?;
                let mut mlp = block.mlp.forward(&pre_ff.forward(&h)?)?;
                if let Some(post_ff) = &block.post_feedforward_layernorm {
                    mlp = post_ff.forward(&mlp)?;
                }
                (h + mlp)?
            }
            None => {
                let h = (x + attn)?;
                let mlp = block
                    .mlp
                    .forward(&block.post_attention_layernorm.forward(&h)?)?;
                (h + mlp)?
            }
        };
        Ok(h)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionBias,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        // (b, t, h·hd) → (b, h, t, hd)
        let q = attn
            .q_proj
            .forward(x)?
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?;
        let k = attn
            .k_proj
            .forward(x)?
            .reshape((b, t, kv, hd))?
            .transpose(1, 2)?;
        let v = attn
            .v_proj
            .forward(x)?
            .reshape((b, t, kv, hd))?
            .transpose(1, 2)?;
        let q = apply_rope(&q.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.contiguous()?, cos, sin)?;
        let v = v.contiguous()?;
        let attn_cap = cfg.gemma.as_ref().and_then(|g| g.attn_logit_softcapping);
        if needs_no_grad(&[&q, &k, &v])
            && q.dtype() == DType::F32
            && q.device().is_cpu()
            && !matches!(cache, LayerKv::Tensors(..))
        {
            let mut buffer = match std::mem::take(cache) {
                LayerKv::Buffer(buffer) => buffer,
                _ => KvBuffer::new(b, kv, hd),
            };
            buffer.append(
                &k.flatten_all()?.to_vec1::<f32>()?,
                &v.flatten_all()?.to_vec1::<f32>()?,
                t,
            );
            let scoring = Scoring {
                scale: cfg.query_scale as f32,
                soft_cap: attn_cap.map(|c| c as f32),
            };
            let out = attend(
                &q.flatten_all()?.to_vec1::<f32>()?,
                h,
                t,
                buffer.keys(),
                &mask.values,
                scoring,
            );
            *cache = LayerKv::Buffer(buffer);
            let out = Tensor::from_vec(out, (b, t, h * hd), x.device())?;
            return Ok(attn.o_proj.forward(&out)?);
        }
        let (k, v) = match std::mem::take(cache) {
            LayerKv::Tensors(k_past, v_past) => (
                Tensor::cat(&[&k_past, &k], 2)?,
                Tensor::cat(&[&v_past, &v], 2)?,
            ),
            LayerKv::Buffer(buffer) => {
                let (k_past, v_past) = buffer.to_tensors(x.device())?;
                (
                    Tensor::cat(&[&k_past, &k], 2)?,
                    Tensor::cat(&[&v_past, &v], 2)?,
                )
            }
            LayerKv::Empty => (k, v),
        };
        *cache = LayerKv::Tensors(k.clone(), v.clone());
        // (b, h, s, hd): query head i reads KV head i / groups.
        let k = repeat_kv(&k, cfg.num_kv_groups())?;
        let v = repeat_kv(&v, cfg.num_kv_groups())?;
        if attn_cap.is_none() && q.track_op() && super::fused::supported(&q) {
            // Training: scale, mask and softmax as one op with its own backward.
            let probs =
                super::fused::masked_softmax(&q.matmul(&k.t()?)?, &mask.tensor, cfg.query_scale)?;
            let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
            return Ok(attn.o_proj.forward(&out)?);
        }
        let mut scores = (q.matmul(&k.t()?)? * cfg.query_scale)?; // (b, h, t, s)
        if let Some(cap) = cfg.gemma.as_ref().and_then(|g| g.attn_logit_softcapping) {
            scores = soft_cap(&scores, cap)?;
        }
        let compute = compute_dtype(self.dtype);
        let scores = scores
            .to_dtype(compute)?
            .broadcast_add(&mask.tensor.to_dtype(compute)?)?;
        let probs = if needs_no_grad(&[&scores]) {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        };
        let probs = probs.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?; // (b, h, t, hd)
        let out = out.transpose(1, 2)?.reshape((b, t, h * hd))?;
        Ok(attn.o_proj.forward(&out)?)
    }

    /// An empty cache gets a slot per layer and sequence; a used one must hold `b` sequences.
    fn prepare_cache(&self, cache: &mut KvCache, b: usize) -> Result<(), ModelError> {
        if cache.layers.is_empty() {
            cache.layers = vec![LayerKv::Empty; self.config.num_layers];
            cache.key_mask = vec![Vec::new(); b];
            cache.next_position = vec![0; b];
        } else if cache.key_mask.len() != b {
            return Err(ModelError::Input(format!(
                "batch of {b} sequences does not match the cache's {}",
                cache.key_mask.len()
            )));
        }
        Ok(())
    }

    /// Gives the new tokens their positions (as `generate()`: real tokens count on from the
    /// cache, pads get 1), appends their mask to the cache and returns the `(b, 1, t, head_dim)`
    /// rotary tables.
    fn place_new_tokens(
        &self,
        new_mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let (b, t) = (new_mask.len(), new_mask.first().map_or(0, Vec::len));
        let mut positions = Vec::with_capacity(b * t);
        for (row, mask) in new_mask.iter().enumerate() {
            for &m in mask {
                if m != 0 {
                    positions.push(cache.next_position[row]);
                    cache.next_position[row] += 1;
                } else {
                    positions.push(1);
                }
            }
            cache.key_mask[row].extend_from_slice(mask);
        }
        let max_pos = positions.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= self.rope.max_positions() {
            return Err(ModelError::ContextTooLong {
                tokens: max_pos + 1,
                max: self.rope.max_positions(),
            });
        }
        let positions = Tensor::from_vec(positions, (b, t), &self.device)?;
        Ok(self.rope.tables(&positions)?)
    }

    /// The rotary tables `(b, 1, t, head_dim)` and the additive mask `(b, t, t)` (row-major
    /// values) of a batch read from an empty cache, exactly as [`Self::forward`] builds them:
    /// what a hand-written pass over the same batch needs.
    pub fn batch_frame(
        &self,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Tensor, Vec<f32>), ModelError> {
        let (b, t) = attention_mask.dims2()?;
        let new_mask = read_mask(Some(attention_mask), b, t)?;
        let mut cache = KvCache::new();
        self.prepare_cache(&mut cache, b)?;
        let (cos, sin) = self.place_new_tokens(&new_mask, &mut cache)?;
        let mask = self.attention_bias(&cache.key_mask, 0, t, None)?;
        Ok((cos, sin, mask.values))
    }

    /// `(b, 1, t, s)` additive mask: 0 where query `i` (at cache index `past + i`) may read key `j`.
    fn attention_bias(
        &self,
        key_mask: &[Vec<u8>],
        past: usize,
        t: usize,
        window: Option<usize>,
    ) -> Result<AttentionBias, ModelError> {
        let b = key_mask.len();
        let s = past + t;
        let mut bias = vec![MASKED; b * t * s];
        for (row, keys) in key_mask.iter().enumerate() {
            for i in 0..t {
                let q = past + i;
                let first = window.map_or(0, |w| (q + 1).saturating_sub(w));
                for (j, &real) in keys.iter().enumerate().take(q + 1).skip(first) {
                    if real != 0 {
                        bias[(row * t + i) * s + j] = 0.0;
                    }
                }
            }
        }
        let tensor = Tensor::from_slice(&bias, (b, 1, t, s), &self.device)?;
        Ok(AttentionBias {
            values: bias,
            tensor,
        })
    }

    /// Chooses the weights decode steps read: `F32` (the default), `Bf16`, a bf16 copy of every
    /// projection that halves the memory streamed per generated token, or `Gguf`, the file's
    /// own quantised blocks for every weight that was dequantised from them and is unchanged
    /// since (bit-identical to f32 through the same kernel, 5–8.5 bits per weight). Training and
    /// any pass that needs gradients always use the f32 weights.
    pub fn set_decode_weights(&mut self, precision: DecodeWeights) -> Result<(), ModelError> {
        let choose = |w: &Tensor,
                      blocks: Option<&Arc<BlockRows>>|
         -> candle_core::Result<Option<DecodeWeight>> {
            Ok(match precision {
                DecodeWeights::F32 => None,
                DecodeWeights::Bf16 => Some(DecodeWeight::Dense(w.to_dtype(DType::BF16)?)),
                DecodeWeights::Gguf => blocks.cloned().map(DecodeWeight::Blocks),
            })
        };
        for (_, linear) in self.linear_layers_mut() {
            linear.decode_weight = choose(&linear.weight, linear.source_blocks())?;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        self.head_decode_weight = choose(head, self.head_blocks.as_ref())?;
        Ok(())
    }

    /// Every linear layer under its Hugging Face module name, for LoRA injection and export.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (l, block) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut block.self_attn, &mut block.mlp);
            let linears = [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ];
            out.extend(
                linears
                    .into_iter()
                    .zip(LINEAR_NAMES)
                    .map(|(lin, name)| (format!("model.layers.{l}.{name}"), lin)),
            );
        }
        out
    }

    /// Read-only view of [`Self::linear_layers_mut`], in the same order.
    pub fn linear_layers(&self) -> Vec<(String, &Linear)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, block)| {
                let (a, m) = (&block.self_attn, &block.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .into_iter()
                .zip(LINEAR_NAMES)
                .map(move |(lin, name)| (format!("model.layers.{l}.{name}"), lin))
            })
            .collect()
    }
}
