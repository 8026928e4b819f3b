//! Fused training ops with their own backward: one pass over memory where the composition of
//! candle's element-wise ops takes a dozen (each with its own allocation and thread hand-off in
//! the forward, and as many again in the backward). Rows are spread over rayon's pool, the one
//! the matrix products use.
//!
//! Each op computes in the input's precision (f32 or f64; other dtypes take the unfused path at
//! the call site) and is checked against central differences in f64 in the tests below.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, WithDType, D,
};
use rayon::prelude::*;

/// The float types the kernels run in.
pub(crate) trait Real:
    WithDType
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
{
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn nil() -> Self;
    fn unit() -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn nil() -> Self {
                0.0
            }
            fn unit() -> Self {
                1.0
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
real!(f32);
real!(f64);

/// The contiguous elements of a CPU storage under `layout`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: input is not contiguous");
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Runs `f` on the contiguous CPU elements of `t`.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused op: tensor is not on the CPU");
    };
    f(slice::<T>(cpu, layout)?)
}

/// Whether the fused ops apply: CPU, f32 or f64.
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over rows.

/// `logits: (n, v)` ↦ `(n,)` NLL `logsumexp(row) − row[token]`; backward `g·(softmax − onehot)`.
struct RowCrossEntropy {
    tokens: Vec<u32>,
}

pub(crate) fn ce_forward<T: Real>(x: &[T], v: usize, tokens: &[u32]) -> Vec<T> {
    x.par_chunks(v)
        .zip(tokens.par_iter())
        .map(|(row, &tok)| {
            let max = row.iter().copied().fold(row[0], Real::max);
            // Long rows: accumulate in f64 so the f32 sum does not drift.
            let sum = row
                .iter()
                .fold(0f64, |acc, &z| acc + (z - max).exp().to_f64());
            T::from_f64(sum.ln()) + max - row[tok as usize]
        })
        .collect()
}

pub(crate) fn ce_backward<T: Real>(x: &[T], v: usize, tokens: &[u32], g: &[T]) -> Vec<T> {
    let mut out = vec![T::nil(); x.len()];
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(tokens.par_iter().zip(g.par_iter()))
        .for_each(|((o, row), (&tok, &gi))| {
            let max = row.iter().copied().fold(row[0], Real::max);
            let mut sum = 0f64;
            for (oj, &z) in o.iter_mut().zip(row) {
                let e = (z - max).exp();
                *oj = e;
                sum += e.to_f64();
            }
            let scale = gi / T::from_f64(sum);
            for oj in o.iter_mut() {
                *oj *= scale;
            }
            o[tok as usize] -= gi;
        });
    out
}

impl CustomOp1 for RowCrossEntropy {
    fn name(&self) -> &'static str {
        "row-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        if n != self.tokens.len() || self.tokens.iter().any(|&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: {n} rows of {v} logits, tokens do not fit");
        }
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(ce_forward(slice(s, l)?, v, &self.tokens)),
            DType::F64 => CpuStorage::F64(ce_forward(slice(s, l)?, v, &self.tokens)),
            d => candle_core::bail!("cross-entropy: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = x.dims2()?;
        let g = g.to_dtype(x.dtype())?;
        let out = match x.dtype() {
            DType::F32 => {
                let g = g.to_vec1::<f32>()?;
                let d = with_slice(x, |xs| Ok(ce_backward(xs, v, &self.tokens, &g)))?;
                Tensor::from_vec(d, (n, v), x.device())?
            }
            _ => {
                let g = g.to_vec1::<f64>()?;
                let d = with_slice(x, |xs| Ok(ce_backward(xs, v, &self.tokens, &g)))?;
                Tensor::from_vec(d, (n, v), x.device())?
            }
        };
        Ok(Some(out))
    }
}

/// Per-row NLL of `tokens` under `logits: (n, v)` (f32/f64 on the CPU), differentiable.
pub fn row_cross_entropy(logits: &Tensor, tokens: &[u32]) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1(RowCrossEntropy {
        tokens: tokens.to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm with a frozen weight.

struct RmsNormFrozen {
    weight: Tensor,
    eps: f64,
}

pub(crate) fn rms_forward<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::nil(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let ss = row.iter().fold(T::nil(), |acc, &z| acc + z * z);
            let r = T::unit() / (ss / T::from_f64(d as f64) + T::from_f64(eps)).sqrt();
            for ((oj, &z), &wj) in o.iter_mut().zip(row).zip(w) {
                *oj = z * r * wj;
            }
        });
    out
}

/// `dx = r·u − r³·x·(u·x)/d` with `u = g ⊙ w`.
pub(crate) fn rms_backward<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::nil(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(g.par_chunks(d)))
        .for_each(|(o, (row, gr))| {
            let ss = row.iter().fold(T::nil(), |acc, &z| acc + z * z);
            let dn = T::from_f64(d as f64);
            let r = T::unit() / (ss / dn + T::from_f64(eps)).sqrt();
            let mut ux = T::nil();
            for ((&z, &gj), &wj) in row.iter().zip(gr).zip(w) {
                ux += gj * wj * z;
            }
            let c = r * r * r * ux / dn;
            for (((oj, &z), &gj), &wj) in o.iter_mut().zip(row).zip(gr).zip(w) {
                *oj = r * gj * wj - c * z;
            }
        });
    out
}

impl CustomOp1 for RmsNormFrozen {
    fn name(&self) -> &'static str {
        "rms-norm-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.weight.dim(0)?;
        if l.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms norm: input {:?}, weight ({d})", l.shape());
        }
        let out = match s.dtype() {
            DType::F32 => with_slice(&self.weight, |w| {
                Ok(CpuStorage::F32(rms_forward(slice(s, l)?, w, self.eps)))
            })?,
            DType::F64 => with_slice(&self.weight, |w| {
                Ok(CpuStorage::F64(rms_forward(slice(s, l)?, w, self.eps)))
            })?,
            d => candle_core::bail!("rms norm: unsupported dtype {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = match x.dtype() {
            DType::F32 => {
                let d = with_slice::<f32, _>(x, |xs| {
                    with_slice(&self.weight, |w| {
                        with_slice(g, |gs| Ok(rms_backward(xs, w, gs, self.eps)))
                    })
                })?;
                Tensor::from_vec(d, x.shape(), x.device())?
            }
            _ => {
                let d = with_slice::<f64, _>(x, |xs| {
                    with_slice(&self.weight, |w| {
                        with_slice(g, |gs| Ok(rms_backward(xs, w, gs, self.eps)))
                    })
                })?;
                Tensor::from_vec(d, x.shape(), x.device())?
            }
        };
        Ok(Some(out))
    }
}

/// `x / √(mean(x²) + eps) · w` over the last dimension, gradient to `x` only (`w` frozen, same
/// dtype as `x`).
pub fn rms_norm_frozen_weight(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNormFrozen {
        weight: w.clone(),
        eps,
    })
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) · up.

struct SiluMul;

fn sigmoid<T: Real>(z: T) -> T {
    T::unit() / (T::unit() + (-z).exp())
}

pub(crate) fn silu_mul_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::nil(); g.len()];
    out.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(o, (gc, uc))| {
            for ((oj, &a), &b) in o.iter_mut().zip(gc).zip(uc) {
                *oj = a * sigmoid(a) * b;
            }
        });
    out
}

/// The gradients of `silu(g) ⊙ u` with respect to `g` and `u`, given the output's `dy`.
pub(crate) fn silu_mul_bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::nil(); g.len()];
    let mut du = vec![T::nil(); g.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dgc, duc), ((gc, uc), dyc))| {
            for i in 0..gc.len() {
                let (a, b, d) = (gc[i], uc[i], dyc[i]);
                let s = sigmoid(a);
                let silu = a * s;
                duc[i] = d * silu;
                dgc[i] = d * b * (s + silu * (T::unit() - s));
            }
        });
    (dg, du)
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu-mul: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => {
                CpuStorage::F32(silu_mul_fwd(slice(s1, l1)?, slice(s2, l2)?))
            }
            (DType::F64, DType::F64) => {
                CpuStorage::F64(silu_mul_fwd(slice(s1, l1)?, slice(s2, l2)?))
            }
            d => candle_core::bail!("silu-mul: unsupported dtypes {d:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let shape = gate.shape();
        let (dg, du) = match gate.dtype() {
            DType::F32 => {
                let (a, b) = with_slice::<f32, _>(gate, |g| {
                    with_slice(up, |u| with_slice(dy, |d| Ok(silu_mul_bwd(g, u, d))))
                })?;
                (
                    Tensor::from_vec(a, shape, gate.device())?,
                    Tensor::from_vec(b, shape, gate.device())?,
                )
            }
            _ => {
                let (a, b) = with_slice::<f64, _>(gate, |g| {
                    with_slice(up, |u| with_slice(dy, |d| Ok(silu_mul_bwd(g, u, d))))
                })?;
                (
                    Tensor::from_vec(a, shape, gate.device())?,
                    Tensor::from_vec(b, shape, gate.device())?,
                )
            }
        };
        Ok((Some(dg), Some(du)))
    }
}

/// `silu(gate) ⊙ up` (same shape and dtype), differentiable in both.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (rotate-half layout).

/// `x: (b, h, t, d)` with tables `(b, 1, t, d)`: `x·cos + rotate_half(x)·sin`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `sign = 1`: the forward; `sign = −1`: its transpose (the backward), which rotates by `−θ`.
pub(crate) fn rope_apply<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    sign: T,
) -> Vec<T> {
    let (_, h, t, d) = dims;
    let half = d / 2;
    let mut out = vec![T::nil(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let bi = row / (h * t);
            let ti = row % t;
            let base = (bi * t + ti) * d;
            let (c, s) = (&cos[base..base + d], &sin[base..base + d]);
            for j in 0..half {
                let (x1, x2) = (xr[j], xr[j + half]);
                // forward: y1 = x1 c1 − x2 s1, y2 = x2 c2 + x1 s2
                o[j] = x1 * c[j] - sign * x2 * s[j];
                o[j + half] = x2 * c[j + half] + sign * x1 * s[j + half];
            }
        });
    out
}

fn rope_run(r: &Rope, x: &Tensor, sign: f64) -> candle_core::Result<Tensor> {
    let dims = x.dims4()?;
    match x.dtype() {
        DType::F32 => {
            let v = with_slice::<f32, _>(x, |xs| {
                with_slice(&r.cos, |c| {
                    with_slice(&r.sin, |s| Ok(rope_apply(xs, c, s, dims, sign as f32)))
                })
            })?;
            Tensor::from_vec(v, dims, x.device())
        }
        _ => {
            let v = with_slice::<f64, _>(x, |xs| {
                with_slice(&r.cos, |c| {
                    with_slice(&r.sin, |s| Ok(rope_apply(xs, c, s, dims, sign)))
                })
            })?;
            Tensor::from_vec(v, dims, x.device())
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-rotate-half"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (b, _, t, d) = dims;
        if self.cos.dims() != [b, 1, t, d] || d % 2 != 0 {
            candle_core::bail!("rope: input {dims:?}, tables {:?}", self.cos.dims());
        }
        let out = match s.dtype() {
            DType::F32 => with_slice(&self.cos, |c| {
                with_slice(&self.sin, |sn| {
                    Ok(CpuStorage::F32(rope_apply(slice(s, l)?, c, sn, dims, 1.0)))
                })
            })?,
            DType::F64 => with_slice(&self.cos, |c| {
                with_slice(&self.sin, |sn| {
                    Ok(CpuStorage::F64(rope_apply(slice(s, l)?, c, sn, dims, 1.0)))
                })
            })?,
            d => candle_core::bail!("rope: unsupported dtype {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        rope_run(self, &g.contiguous()?, -1.0).map(Some)
    }
}

/// Rotary embedding of `x: (b, h, t, d)` with `cos`, `sin: (b, 1, t, d)` in HF's rotate-half
/// layout (tables with `cos[j] = cos[j + d/2]`), differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
    })
}

// ---------------------------------------------------------------------------------------------
// Scaled, masked softmax of attention scores.

/// `scores: (b, h, t, s)`, additive `mask: (b, 1, t, s)`: `softmax(scores · scale + mask)`.
struct MaskedSoftmax {
    mask: Tensor,
    scale: f64,
}

pub(crate) fn masked_softmax_fwd<T: Real>(
    x: &[T],
    mask: &[T],
    dims: (usize, usize, usize, usize),
    scale: T,
) -> Vec<T> {
    let (_, h, t, s) = dims;
    let mut out = vec![T::nil(); x.len()];
    out.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let (bi, ti) = (row / (h * t), row % t);
            let m = &mask[(bi * t + ti) * s..(bi * t + ti + 1) * s];
            let mut max = xr[0] * scale + m[0];
            for ((oj, &z), &mj) in o.iter_mut().zip(xr).zip(m) {
                *oj = z * scale + mj;
                max = Real::max(max, *oj);
            }
            let mut sum = T::nil();
            for oj in o.iter_mut() {
                *oj = (*oj - max).exp();
                sum += *oj;
            }
            let inv = T::unit() / sum;
            for oj in o.iter_mut() {
                *oj *= inv;
            }
        });
    out
}

/// `dx = scale · p ⊙ (g − Σ g ⊙ p)` per row.
pub(crate) fn masked_softmax_bwd<T: Real>(p: &[T], g: &[T], s: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::nil(); p.len()];
    out.par_chunks_mut(s)
        .zip(p.par_chunks(s).zip(g.par_chunks(s)))
        .for_each(|(o, (pr, gr))| {
            let dot = pr
                .iter()
                .zip(gr)
                .fold(T::nil(), |acc, (&a, &b)| acc + a * b);
            for ((oj, &pj), &gj) in o.iter_mut().zip(pr).zip(gr) {
                *oj = scale * pj * (gj - dot);
            }
        });
    out
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (b, _, t, s) = dims;
        if self.mask.dims() != [b, 1, t, s] {
            candle_core::bail!(
                "masked softmax: scores {dims:?}, mask {:?}",
                self.mask.dims()
            );
        }
        let out = match st.dtype() {
            DType::F32 => with_slice(&self.mask, |m| {
                Ok(CpuStorage::F32(masked_softmax_fwd(
                    slice(st, l)?,
                    m,
                    dims,
                    self.scale as f32,
                )))
            })?,
            DType::F64 => with_slice(&self.mask, |m| {
                Ok(CpuStorage::F64(masked_softmax_fwd(
                    slice(st, l)?,
                    m,
                    dims,
                    self.scale,
                )))
            })?,
            d => candle_core::bail!("masked softmax: unsupported dtype {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = x.dim(D::Minus1)?;
        let out = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_slice::<f32, _>(p, |ps| {
                    with_slice(g, |gs| Ok(masked_softmax_bwd(ps, gs, s, self.scale as f32)))
                })?,
                x.shape(),
                x.device(),
            )?,
            _ => Tensor::from_vec(
                with_slice::<f64, _>(p, |ps| {
                    with_slice(g, |gs| Ok(masked_softmax_bwd(ps, gs, s, self.scale)))
                })?,
                x.shape(),
                x.device(),
            )?,
        };
        Ok(Some(out))
    }
}

/// `softmax(scores · scale + mask)` over the last dimension, `scores: (b, h, t, s)`, additive
/// `mask: (b, 1, t, s)`; differentiable in `scores`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.to_dtype(scores.dtype())?.contiguous()?,
        scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// Central differences of `Σ f(x) ⊙ probe` against the op's backward, all in f64.
    fn check_grad(
        shape: &[usize],
        f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
        seed: u64,
    ) -> candle_core::Result<()> {
        let x = Var::from_tensor(&tensor(shape, seed))?;
        let y = f(x.as_tensor())?;
        let probe = tensor(y.dims(), seed + 100);
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("the input gets a gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..base.len() {
            let eval = |delta: f64| -> candle_core::Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
                f(&t)?.mul(&probe)?.sum_all()?.to_scalar::<f64>()
            };
            let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "element {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_finite_differences() -> candle_core::Result<()> {
        let tokens = [3u32, 0, 6];
        let x = (tensor(&[3, 7], 1) * 4.0)?;
        let got = row_cross_entropy(&x, &tokens)?;
        let ls = candle_nn::ops::log_softmax(&x, D::Minus1)?;
        let idx = Tensor::new(&tokens, &Device::Cpu)?.unsqueeze(1)?;
        let want = ls.gather(&idx, 1)?.squeeze(1)?.neg()?;
        assert!(max_diff(&got, &want) < 1e-12);
        check_grad(&[3, 7], &|x| row_cross_entropy(&(x * 4.0)?, &tokens), 2)?;
        // f32 agrees with f64.
        let got32 = row_cross_entropy(&x.to_dtype(DType::F32)?, &tokens)?.to_dtype(DType::F64)?;
        assert!(max_diff(&got32, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_definition_and_finite_differences() -> candle_core::Result<()> {
        let w = (tensor(&[6], 3) + 1.5)?;
        let x = tensor(&[2, 3, 6], 4);
        let got = rms_norm_frozen_weight(&x, &w, 1e-5)?;
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        let want = x.broadcast_mul(&inv)?.broadcast_mul(&w)?;
        assert!(max_diff(&got, &want) < 1e-12);
        check_grad(&[2, 3, 6], &|x| rms_norm_frozen_weight(x, &w, 1e-5), 5)
    }

    #[test]
    fn silu_mul_matches_the_definition_and_finite_differences() -> candle_core::Result<()> {
        let g = (tensor(&[3, 5], 6) * 3.0)?;
        let u = tensor(&[3, 5], 7);
        let want = (candle_nn::ops::silu(&g)? * &u)?;
        assert!(max_diff(&silu_mul(&g, &u)?, &want) < 1e-12);
        check_grad(&[3, 5], &|x| silu_mul(&(x * 3.0)?, &u), 8)?;
        check_grad(&[3, 5], &|x| silu_mul(&g, x), 9)
    }

    #[test]
    fn rope_matches_rotate_half_and_finite_differences() -> candle_core::Result<()> {
        let (b, h, t, d) = (2, 3, 4, 6);
        let ang = (tensor(&[b, 1, t, d / 2], 10) * 3.0)?;
        let ang = Tensor::cat(&[&ang, &ang], D::Minus1)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let x = tensor(&[b, h, t, d], 11);
        let want = super::super::layers::apply_rope(&x, &cos, &sin)?;
        assert!(max_diff(&rope(&x, &cos, &sin)?, &want) < 1e-12);
        check_grad(&[b, h, t, d], &|x| rope(x, &cos, &sin), 12)
    }

    #[test]
    fn masked_softmax_matches_candle_and_finite_differences() -> candle_core::Result<()> {
        let (b, h, t, s) = (2, 2, 3, 4);
        let mut m = vec![0f64; b * t * s];
        m[1] = -1e30; // row (0, 0) does not see key 1
        m[b * t * s - 1] = -1e30;
        let mask = Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu)?;
        let x = (tensor(&[b, h, t, s], 13) * 2.0)?;
        let want = candle_nn::ops::softmax(&(&x * 0.7)?.broadcast_add(&mask)?, D::Minus1)?;
        assert!(max_diff(&masked_softmax(&x, &mask, 0.7)?, &want) < 1e-12);
        check_grad(&[b, h, t, s], &|x| masked_softmax(x, &mask, 0.7), 14)
    }
}
