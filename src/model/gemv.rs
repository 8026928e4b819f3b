//! A memory-bound kernel for the decode step: `y = x Wᵀ` with few rows in `x` (one per sequence
//! of a batch). The general matrix product packs the whole weight for every call, which triples
//! the memory traffic when `x` has a handful of rows; here each weight row is read once and
//! dotted with every row of `x` while it is in cache. Inference only: it records no gradient,
//! and callers use it only when nothing needs one.

use candle_core::{DType, Device, Storage, Tensor};
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
    if k != k2
        || !(MIN_ROWS..=MAX_ROWS).contains(&m)
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
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
    let ws = &cpu.as_slice::<f32>()?[start..start + n * k];

    // Computed transposed, (n, m): each task owns a contiguous block of output rows.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            for (j, y) in out.chunks_mut(m).enumerate() {
                let row = &ws[(first + j) * k..(first + j + 1) * k];
                dot_rows(row, &xs, k, y);
            }
        });
    drop(storage);
    Tensor::from_vec(out_t, (n, m), x.device())?
        .t()?
        .contiguous()
        .map(Some)
}

/// `y[i] = row · x_i` for every row `x_i` of `xs` (`m × k`).
fn dot_rows(row: &[f32], xs: &[f32], k: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // At most 8 rows at a time keep all accumulators in registers.
        for (group, out) in y.chunks_mut(8).enumerate() {
            let xs = &xs[group * 8 * k..];
            // SAFETY: the features the kernels are compiled for were just detected, and every
            // index they read is below `k` within `row` and below `out.len() · k` within `xs`.
            unsafe {
                match out.len() {
                    1 => avx2::dot_rows::<1>(row, xs, k, out),
                    2 => avx2::dot_rows::<2>(row, xs, k, out),
                    3 => avx2::dot_rows::<3>(row, xs, k, out),
                    4 => avx2::dot_rows::<4>(row, xs, k, out),
                    5 => avx2::dot_rows::<5>(row, xs, k, out),
                    6 => avx2::dot_rows::<6>(row, xs, k, out),
                    7 => avx2::dot_rows::<7>(row, xs, k, out),
                    _ => avx2::dot_rows::<8>(row, xs, k, out),
                }
            }
        }
        return;
    }
    for (i, out) in y.iter_mut().enumerate() {
        *out = row
            .iter()
            .zip(&xs[i * k..(i + 1) * k])
            .map(|(a, b)| a * b)
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// One weight row against `M` rows of `xs`: each 8-float chunk of the weight is loaded once
    /// and multiplied into `M` accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const M: usize>(row: &[f32], xs: &[f32], k: usize, y: &mut [f32]) {
        let whole = k / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); M];
        let w_ptr = row.as_ptr();
        let x_ptr = xs.as_ptr();
        let mut j = 0;
        while j < whole {
            let w = _mm256_loadu_ps(w_ptr.add(j));
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
                sum += row[t] * xs[i * k + t];
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
