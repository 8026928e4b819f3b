//! The building blocks of the decoder, written with differentiable candle ops only (candle's
//! fused `rms_norm`, `rope` and `softmax_last_dim` record no backward; see DESIGN.md §3).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use super::blocks::BlockRows;

/// A LoRA pair on a linear layer: `Δy = scale · (x Aᵀ) Bᵀ`, `A: (r, in)`, `B: (out, r)`.
/// `A` and `B` may be the tensors of training `Var`s, so gradients reach them.
#[derive(Debug, Clone)]
pub struct LoraSlot {
    pub a: Tensor,
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r` with rsLoRA), fixed when the slot is made.
    pub scale: f64,
}

impl LoraSlot {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `ΔW = scale · B A`, shape `(out, in)`.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// What a decode step (few rows, no gradient) streams instead of the f32 weight.
#[derive(Debug, Clone)]
pub enum DecodeWeight {
    /// A lower-precision copy (bf16): close to the weight, not equal.
    Dense(Tensor),
    /// The quantised blocks the weight was dequantised from: the same numbers, fewer bytes.
    Blocks(Arc<BlockRows>),
}

/// `y = x Wᵀ + b (+ LoRA)`. `weight: (out, in)` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraSlot>,
    /// Used by decode steps that need no gradient (see `Decoder::set_decode_weights`); `None`
    /// decodes from `weight` itself.
    pub decode_weight: Option<DecodeWeight>,
    /// The file's quantised blocks that `weight` is exactly the dequantisation of, while it is.
    source_blocks: Option<Arc<BlockRows>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            decode_weight: None,
            source_blocks: None,
        }
    }

    /// A layer whose weight was dequantised from `blocks`.
    pub fn with_source_blocks(mut self, blocks: Option<BlockRows>) -> Self {
        self.source_blocks = blocks.map(Arc::new);
        self
    }

    pub fn source_blocks(&self) -> Option<&Arc<BlockRows>> {
        self.source_blocks.as_ref()
    }

    /// Replaces the weight. A lower-precision decode copy is remade from the new weight; the
    /// file's blocks no longer describe it, so they are dropped.
    pub fn set_weight(&mut self, weight: Tensor) -> candle_core::Result<()> {
        self.decode_weight = match self.decode_weight.take() {
            Some(DecodeWeight::Dense(copy)) => {
                Some(DecodeWeight::Dense(weight.to_dtype(copy.dtype())?))
            }
            _ => None,
        };
        self.source_blocks = None;
        self.weight = weight;
        Ok(())
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// `(.., in) @ (out, in)ᵀ` without copying the transposed weight. A decode step (few rows,
/// nothing to differentiate) takes the memory-bound kernel in `gemv`, from `decode_weight` when
/// there is one.
fn matmul_t(
    x: &Tensor,
    w: &Tensor,
    decode_weight: Option<&DecodeWeight>,
) -> candle_core::Result<Tensor> {
    let (lead, k) = match x.dims() {
        [b, t, k] => (vec![*b, *t], *k),
        [m, k] => (vec![*m], *k),
        _ => return x.matmul(&w.t()?),
    };
    let mut shape = lead.clone();
    shape.push(w.dim(0)?);
    let x2 = x.reshape((lead.iter().product::<usize>(), k))?;
    if needs_no_grad(&[x, w]) {
        let decoded = match decode_weight {
            Some(DecodeWeight::Blocks(blocks)) => super::gemv::blocks_matmul_t(&x2, blocks)?,
            Some(DecodeWeight::Dense(copy)) => super::gemv::skinny_matmul_t(&x2, copy)?,
            None => None,
        };
        let y = match decoded {
            Some(y) => Some(y),
            None => super::gemv::skinny_matmul_t(&x2, w)?,
        };
        if let Some(y) = y {
            return y.reshape(shape);
        }
    }
    if w.track_op() {
        x2.matmul(&w.t()?)?.reshape(shape)
    } else {
        // A frozen weight: only the input's gradient is ever wanted.
        super::frozen::frozen_matmul_t(&x2, w)?.reshape(shape)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = matmul_t(x, &self.weight, self.decode_weight.as_ref())?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(lora) = &self.lora {
            let low = matmul_t(x, &lora.a, None)?;
            y = (y + (matmul_t(&low, &lora.b, None)? * lora.scale)?)?;
        }
        Ok(y)
    }
}

/// RMSNorm `x / √(mean(x²) + eps) · w`, or Gemma's `· (1 + w)` (the offset is folded into the
/// stored weight at load, so both are the same op here). Computed in at least f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if needs_no_grad(&[x, &self.weight]) && x.dtype() == DType::F32 {
            // Nothing upstream is trainable, so candle's fused (gradient-free) kernel is exact
            // enough and several times faster.
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        if super::fused::supported(x) && !self.weight.track_op() && self.weight.dtype() == x.dtype()
        {
            // One pass forward and backward; the weight is frozen.
            return super::fused::rms_norm_frozen_weight(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x.broadcast_mul(&inv_rms)?
            .broadcast_mul(&self.weight.to_dtype(x.dtype())?)?
            .to_dtype(dtype)
    }
}

/// True when no tensor here takes part in a gradient computation, so candle's fused kernels,
/// which record no backward, give the same result as the differentiable ops.
pub fn needs_no_grad(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| !t.track_op())
}

/// Norms and softmax run in f32 for half-precision activations (as transformers does) and in the
/// activations' own precision otherwise, so f64 checks stay f64.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Rotary position embedding in Hugging Face's rotate-half layout.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `(max_pos, head_dim)`: `[θ_pos, θ_pos]` concatenated, as HF builds it.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        theta: f64,
        head_dim: usize,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        // Computed in f64 and rounded once, so long positions keep their precision.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * head_dim);
        let mut sin = Vec::with_capacity(max_pos * head_dim);
        for pos in 0..max_pos {
            for _ in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, head_dim), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The `(b, 1, t, head_dim)` cos and sin tables for `positions: (b, t)` (u32).
    pub fn tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, ()))?;
        Ok((cos, sin))
    }
}

/// `x·cos + rotate_half(x)·sin` on `x: (b, h, t, d)`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if super::fused::supported(x) {
        return super::fused::rope(x, cos, sin);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `(b, kv, t, d)` → `(b, kv·groups, t, d)`: query head `h` reads KV head `h / groups`.
pub fn repeat_kv(x: &Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, groups, t, d))?
        .reshape((b, kv * groups, t, d))
}

/// `tanh(x / cap) · cap`.
pub fn soft_cap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    (x / cap)?.tanh()? * cap
}
