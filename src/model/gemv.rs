//! A memory-bound kernel for the decode step: `y = x Wᵀ` with few rows in `x` (one per sequence
//! of a batch). The general matrix product packs the whole weight for every call, which triples
//! the memory traffic when `x` has a handful of rows; here each weight row is read once and
//! dotted with every row of `x` while it is in cache. Inference only: it records no gradient,
//! and callers use it only when nothing needs one.

use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Rows of `x` for which this kernel beats the general product on this class of CPU (with a
/// single row the general product already takes its own matrix-vector path).
pub const MIN_ROWS: usize = 2;
pub const MAX_ROWS: usize = 16;

/// Output rows handed to one rayon task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

/// `x: (m, k)`, `w: (n, k)` contiguous f32 on the CPU → `(m, n)`, or `None` when the inputs are
/// not of that kind and the caller should use the general product.
pub fn skinny_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return Ok(None);
    };
    // bf16 weights halve the bytes streamed per step, which pays off even for one row.
    let min_rows = if w.dtype() == DType::BF16 {
        1
    } else {
        MIN_ROWS
    };
    if k != k2
        || !(min_rows..=MAX_ROWS).contains(&m)
        || x.dtype() != DType::F32
        || !matches!(w.dtype(), DType::F32 | DType::BF16)
    {
        return Ok(None);
    }
    if !matches!(x.device(), Device::Cpu) || !w.is_contiguous() {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let start = layout.start_offset();
    let out_t = if w.dtype() == DType::BF16 {
        product_t(&cpu.as_slice::<bf16>()?[start..start + n * k], &xs, m, k, n)
    } else {
        product_t(&cpu.as_slice::<f32>()?[start..start + n * k], &xs, m, k, n)
    };
    drop(storage);
    // Back to `(m, n)`: a plain loop over a few thousand floats, cheaper than a strided copy op.
    let mut out = vec![0f32; m * n];
    for (o, column) in out_t.chunks_exact(m).enumerate() {
        for (i, &y) in column.iter().enumerate() {
            out[i * n + o] = y;
        }
    }
    Tensor::from_vec(out, (m, n), x.device()).map(Some)
}

/// `(n, m)`: the product computed transposed, so each task owns a contiguous block of outputs.
fn product_t<E: Weight>(ws: &[E], xs: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            for (j, y) in out.chunks_mut(m).enumerate() {
                let row = &ws[(first + j) * k..(first + j + 1) * k];
                dot_rows(row, xs, k, y);
            }
        });
    out_t
}

/// A weight element the kernel can widen to f32.
trait Weight: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight consecutive weights as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(ptr)
    }
}

impl Weight for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    /// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm_loadu_si128(ptr as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
    }
}

/// `y[i] = row · x_i` for every row `x_i` of `xs` (`m × k`).
fn dot_rows<E: Weight>(row: &[E], xs: &[f32], k: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // At most 8 rows at a time keep all accumulators in registers.
        for (group, out) in y.chunks_mut(8).enumerate() {
            let xs = &xs[group * 8 * k..];
            // SAFETY: the features the kernels are compiled for were just detected, and every
            // index they read is below `k` within `row` and below `out.len() · k` within `xs`.
            unsafe {
                match out.len() {
                    1 => avx2::dot_rows::<E, 1>(row, xs, k, out),
                    2 => avx2::dot_rows::<E, 2>(row, xs, k, out),
                    3 => avx2::dot_rows::<E, 3>(row, xs, k, out),
                    4 => avx2::dot_rows::<E, 4>(row, xs, k, out),
                    5 => avx2::dot_rows::<E, 5>(row, xs, k, out),
                    6 => avx2::dot_rows::<E, 6>(row, xs, k, out),
                    7 => avx2::dot_rows::<E, 7>(row, xs, k, out),
                    _ => avx2::dot_rows::<E, 8>(row, xs, k, out),
                }
            }
        }
        return;
    }
    for (i, out) in y.iter_mut().enumerate() {
        *out = row
            .iter()
            .zip(&xs[i * k..(i + 1) * k])
            .map(|(a, b)| a.to_f32() * b)
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Weight;
    use std::arch::x86_64::*;

    /// One weight row against `M` rows of `xs`: each 8-float chunk of the weight is loaded once
    /// and multiplied into `M` accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<E: Weight, const M: usize>(
        row: &[E],
        xs: &[f32],
        k: usize,
        y: &mut [f32],
    ) {
        let whole = k / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); M];
        let w_ptr = row.as_ptr();
        let x_ptr = xs.as_ptr();
        let mut j = 0;
        while j < whole {
            let w = E::load8(w_ptr.add(j));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(x_ptr.add(i * k + j)), *a);
            }
            j += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            let hi = _mm256_extractf128_ps(*a, 1);
            let quad = _mm_add_ps(_mm256_castps256_ps128(*a), hi);
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
            let mut sum = _mm_cvtss_f32(one);
            for t in whole..k {
                sum += row[t].to_f32() * xs[i * k + t];
            }
            y[i] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn matches_a_float64_product() {
        let mut rng = StdRng::seed_from_u64(3);
        // k not a multiple of the lane count; n not a multiple of the task size.
        // 11 rows: one full group of 8 and a remainder.
        let (m, k, n) = (11, 37, 131);
        let x: Vec<f32> = (0..m * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let got = skinny_matmul_t(&xt, &wt)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for i in 0..m {
            for o in 0..n {
                let want: f64 = (0..k)
                    .map(|j| x[i * k + j] as f64 * w[o * k + j] as f64)
                    .sum();
                assert!(
                    (got[i][o] as f64 - want).abs() < 1e-5,
                    "({i}, {o}): {} vs {want}",
                    got[i][o]
                );
            }
        }
    }

    #[test]
    fn bf16_weights_match_a_float64_product_of_the_rounded_weights() {
        let mut rng = StdRng::seed_from_u64(4);
        let (m, k, n) = (1, 45, 70);
        let x: Vec<f32> = (0..m * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let rounded: Vec<f32> = wt
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = skinny_matmul_t(&xt, &wt)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for o in 0..n {
            let want: f64 = (0..k)
                .map(|j| x[j] as f64 * rounded[o * k + j] as f64)
                .sum();
            assert!(
                (got[0][o] as f64 - want).abs() < 1e-5,
                "{o}: {} vs {want}",
                got[0][o]
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let w = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        let tall = Tensor::ones((MAX_ROWS + 1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(skinny_matmul_t(&tall, &w).unwrap().is_none());
        let single = Tensor::ones((1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(skinny_matmul_t(&single, &w).unwrap().is_none());
        let f64x = Tensor::ones((2, 8), DType::F64, &Device::Cpu).unwrap();
        assert!(skinny_matmul_t(&f64x, &w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .is_none());
    }
}
