//! Training-path kernels that exploit TopK sparsity on the CPU.
//!
//! Candle's matmul backward computes both operand gradients, and a dense decode of a k-sparse
//! code costs d_sae/k times what it needs. Two custom ops with their own backward:
//!
//! * [`sparse_decode`] — `f·W` reading only the non-zero entries of `f`. Its gradient for `f` is
//!   given only at those entries: exact whenever `f`'s zeros are structural (f = relu(pre)·mask,
//!   where the upstream gradient at a zero entry is zero anyway), which is how training uses it.
//! * [`matmul_weight_grad`] — `x·W` with a gradient for `W` only (the input is data).
//!
//! On other devices both fall back to candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

struct SparseDecode;

impl CustomOp2 for SparseDecode {
    fn name(&self) -> &'static str {
        "sae-sparse-decode"
    }

    /// f (n, s) · w (s, d) → (n, d), skipping zeros of f; rows in ascending latent order.
    fn cpu_fwd(
        &self,
        fs: &CpuStorage,
        fl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, s) = fl.shape().dims2()?;
        let (s2, d) = wl.shape().dims2()?;
        if s != s2 {
            candle_core::bail!("sparse decode: f is (n, {s}) but W is ({s2}, {d})");
        }
        let f = f32_slice(fs, fl, "f")?;
        let w = f32_slice(ws, wl, "W")?;
        let mut out = vec![0f32; n * d];
        out.par_chunks_mut(d.max(1))
            .zip(f.par_chunks(s.max(1)))
            .for_each(|(o, frow)| {
                for (j, &a) in frow.iter().enumerate() {
                    if a != 0.0 {
                        for (oi, &wi) in o.iter_mut().zip(&w[j * d..(j + 1) * d]) {
                            *oi += a * wi;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        f: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, s) = f.dims2()?;
        let (_, d) = w.dims2()?;
        let fv: Vec<f32> = f.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // non-zero entries per row, ascending
        let nz: Vec<Vec<u32>> = fv
            .par_chunks(s.max(1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(_, &a)| a != 0.0)
                    .map(|(j, _)| j as u32)
                    .collect()
            })
            .collect();
        // ∂L/∂f[i,j] = grad[i]·W[j] at the non-zero entries
        let mut gf = vec![0f32; n * s];
        gf.par_chunks_mut(s.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                let g = &gv[i * d..(i + 1) * d];
                for &j in &nz[i] {
                    let j = j as usize;
                    row[j] = g
                        .iter()
                        .zip(&wv[j * d..(j + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                }
            });
        // ∂L/∂W[j] = Σ_i f[i,j]·grad[i], summed in ascending i (deterministic): each task owns
        // a block of latents and scans the non-zero lists
        const BLOCK: usize = 64;
        let mut gw = vec![0f32; s * d];
        gw.par_chunks_mut(BLOCK * d.max(1))
            .enumerate()
            .for_each(|(b, block)| {
                let (lo, hi) = ((b * BLOCK) as u32, ((b + 1) * BLOCK).min(s) as u32);
                for (i, list) in nz.iter().enumerate() {
                    let g = &gv[i * d..(i + 1) * d];
                    for &j in list.iter().filter(|&&j| j >= lo && j < hi) {
                        let a = fv[i * s + j as usize];
                        let dst = &mut block[(j - lo) as usize * d..(j - lo + 1) as usize * d];
                        for (o, &gi) in dst.iter_mut().zip(g) {
                            *o += a * gi;
                        }
                    }
                }
            });
        let gf = Tensor::from_vec(gf, (n, s), f.device())?;
        let gw = Tensor::from_vec(gw, (s, d), w.device())?;
        Ok((Some(gf), Some(gw)))
    }
}

/// `f·W` for a sparse code `f` (n, s) and `W` (s, d); see the module docs for its gradient.
pub(crate) fn sparse_decode(f: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if f.device().is_cpu() && f.dtype() == DType::F32 && w.dtype() == DType::F32 {
        f.contiguous()?.apply_op2(&w.contiguous()?, SparseDecode)
    } else {
        f.matmul(w)
    }
}

struct MatmulWeightGrad;

impl CustomOp2 for MatmulWeightGrad {
    fn name(&self) -> &'static str {
        "sae-matmul-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let device = candle_core::Device::Cpu;
        let x = Tensor::from_slice(f32_slice(xs, xl, "x")?, xl.shape(), &device)?;
        let w = Tensor::from_slice(f32_slice(ws, wl, "W")?, wl.shape(), &device)?;
        let out = x.matmul(&w)?;
        let shape = out.shape().clone();
        let v: Vec<f32> = out.flatten_all()?.to_vec1()?;
        Ok((CpuStorage::F32(v), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(x.t()?.matmul(grad)?)))
    }
}

/// `x·W` (n, a)·(a, b) with a gradient for `W` only.
pub(crate) fn matmul_weight_grad(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, MatmulWeightGrad)
    } else {
        x.matmul(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn sparse_ops_match_dense_matmul_and_its_gradients() {
        let dev = &Device::Cpu;
        let pre = Var::new(
            &[[0.5f32, -1.0, 2.0, 0.0, 1.5], [-0.3, 0.7, 0.0, 3.0, -2.0]],
            dev,
        )
        .unwrap();
        let mask = Tensor::new(
            &[[1f32, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0, 1.0]],
            dev,
        )
        .unwrap();
        let w = Var::from_tensor(
            &Tensor::arange(0f32, 15.0, dev)
                .unwrap()
                .reshape((5, 3))
                .unwrap()
                .affine(0.1, -0.5)
                .unwrap(),
        )
        .unwrap();
        let x = Tensor::new(&[[1f32, 2.0], [0.5, -1.0]], dev).unwrap();
        let w_enc = Var::new(
            &[[0.2f32, -0.1, 0.3, 0.0, 1.0], [0.5, 0.4, -0.2, 0.1, 0.0]],
            dev,
        )
        .unwrap();
        let target = Tensor::new(&[[1f32, 0.0, -1.0], [2.0, 1.0, 0.0]], dev).unwrap();

        let run = |sparse: bool| {
            let f = (pre.as_tensor().relu().unwrap() * &mask).unwrap();
            let y = if sparse {
                sparse_decode(&f, &w).unwrap()
            } else {
                f.matmul(&w).unwrap()
            };
            let e = if sparse {
                matmul_weight_grad(&x, &w_enc).unwrap()
            } else {
                x.matmul(&w_enc).unwrap()
            };
            let loss = ((y - &target).unwrap().sqr().unwrap().sum_all().unwrap()
                + e.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let g = loss.backward().unwrap();
            (
                loss,
                g.get(&pre).unwrap().clone(),
                g.get(&w).unwrap().clone(),
                g.get(&w_enc).unwrap().clone(),
            )
        };
        let (l0, p0, w0, e0) = run(false);
        let (l1, p1, w1, e1) = run(true);
        close(&l1, &l0);
        close(&p1, &p0);
        close(&w1, &w0);
        close(&e1, &e0);
    }
}
