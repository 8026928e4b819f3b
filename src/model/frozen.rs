//! Differentiable ops for training against a frozen base model.
//!
//! candle's matmul backward computes the gradient of both operands, including a frozen weight
//! nobody reads (for the tied vocabulary head that is a `(vocab, d)` product per step). The op
//! here multiplies by a weight that is a constant of the graph: its backward returns only the
//! input's gradient `dy · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// `x (m, k) ↦ x Wᵀ (m, n)` with `W: (n, k)` held as a constant (no gradient reaches it).
struct FrozenMatmulT {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = self.weight.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight ({n}, {k2})");
        }
        let (storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU");
        };
        if w.dtype() != x.dtype() {
            candle_core::bail!(
                "frozen matmul: input {:?} and weight {:?} differ",
                x.dtype(),
                w.dtype()
            );
        }
        // Wᵀ as a strided view of W: (k, n) with strides (1, k).
        let wt_layout = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, n, k), x_layout, &wt_layout)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        grad_y.matmul(&self.weight).map(Some)
    }
}

/// `x Wᵀ` for `x: (m, k)` and a frozen `w: (n, k)`: the gradient flows to `x` only. Without a
/// gradient to track it is the plain product.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() || !x.device().is_cpu() {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?
        .apply_op1(FrozenMatmulT { weight: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: (usize, usize), seed: u64) -> Vec<f64> {
        // A small deterministic generator is enough for test data.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..shape.0 * shape.1)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_and_input_gradient_match_the_plain_product_in_f64() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (5, 7, 3);
        let x = Var::from_vec(randn((m, k), 1), (m, k), &dev)?;
        let w = Tensor::from_vec(randn((n, k), 2), (n, k), &dev)?;
        let probe = Tensor::from_vec(randn((m, n), 3), (m, n), &dev)?;
        let y = frozen_matmul_t(x.as_tensor(), &w)?;
        let want = x.as_tensor().matmul(&w.t()?)?;
        let diff = (&y - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        // d/dx Σ (x Wᵀ ⊙ P) = P W; checked by central differences on every entry of x.
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("x gets a gradient");
        let g = g.to_vec2::<f64>()?;
        let base = x.as_tensor().to_vec2::<f64>()?;
        let f = |xs: &Vec<Vec<f64>>| -> candle_core::Result<f64> {
            let flat: Vec<f64> = xs.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (m, k), &dev)?;
            t.matmul(&w.t()?)?
                .mul(&probe)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let h = 1e-6;
        for i in 0..m {
            for j in 0..k {
                let mut plus = base.clone();
                plus[i][j] += h;
                let mut minus = base.clone();
                minus[i][j] -= h;
                let fd = (f(&plus)? - f(&minus)?) / (2.0 * h);
                assert!(
                    (fd - g[i][j]).abs() < 1e-8,
                    "({i},{j}): fd {fd} vs {}",
                    g[i][j]
                );
            }
        }
        assert_eq!(y.dtype(), DType::F64);
        Ok(())
    }

    #[test]
    fn strided_input_is_handled() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(randn((4, 6), 4), (6, 4), &dev)?;
        let xt = x.as_tensor().t()?; // (4, 6), not contiguous
        let w = Tensor::from_vec(randn((2, 6), 5), (2, 6), &dev)?;
        let y = frozen_matmul_t(&xt, &w)?;
        let want = xt.matmul(&w.t()?)?;
        let diff = (&y - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        Ok(())
    }
}

#[cfg(test)]
mod timing {
    use candle_core::{Device, Tensor};
    use std::time::Instant;

    fn time(what: &str, flops: f64, f: &dyn Fn() -> candle_core::Result<Tensor>) {
        f().unwrap();
        let n = 5;
        let start = Instant::now();
        for _ in 0..n {
            f().unwrap();
        }
        let dt = start.elapsed().as_secs_f64() / n as f64;
        eprintln!(
            "{what:40} {:8.3} ms {:7.1} GFLOP/s",
            dt * 1e3,
            flops / dt / 1e9
        );
    }

    #[test]
    #[ignore = "timing only"]
    fn matmul_shapes_of_a_training_step() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::randn(0f32, 1., (1024, 1024), &dev)?;
        time("square 1024", 2.0 * 1024f64.powi(3), &|| c.matmul(&c));
        let m = 512;
        for (k, n) in [
            (576, 576),
            (576, 192),
            (576, 1536),
            (1536, 576),
            (576, 49152),
        ] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let dy = Tensor::randn(0f32, 1., (m, n), &dev)?;
            let fl = 2.0 * (m * k * n) as f64;
            time(&format!("fwd x Wt {m}x{k}x{n}"), fl, &|| x.matmul(&w.t()?));
            time(&format!("bwd dy W {m}x{n}x{k}"), fl, &|| dy.matmul(&w));
            time(&format!("wgrad dyT x {n}x{m}x{k}"), fl, &|| {
                dy.t()?.matmul(&x)
            });
        }
        let a = Tensor::randn(0f32, 1., (16, 576), &dev)?;
        let x = Tensor::randn(0f32, 1., (m, 576), &dev)?;
        time("lora x At 512x576x16", 2.0 * (m * 576 * 16) as f64, &|| {
            x.matmul(&a.t()?)
        });
        let q = Tensor::randn(0f32, 1., (4, 9, 128, 64), &dev)?;
        let k = Tensor::randn(0f32, 1., (4, 9, 128, 64), &dev)?;
        time(
            "attn q kT 36x128x64x128",
            2.0 * (36 * 128 * 64 * 128) as f64,
            &|| q.matmul(&k.t()?),
        );
        Ok(())
    }
}
