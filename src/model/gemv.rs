//! A memory-bound kernel for the decode step: `y = x Wᵀ` with few rows in `x` (one per sequence
//! of a batch). The general matrix product packs the whole weight for every call, which triples
//! the memory traffic when `x` has a handful of rows; here each weight row is read once and
//! dotted with every row of `x` while it is in cache. Inference only: it records no gradient,
//! and callers use it only when nothing needs one.

use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;

use super::blocks::{BlockFormat, BlockRows, BLOCK};
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
    #[cfg(target_arch = "x86_64")]
    if m >= TILED_MIN_ROWS && has_avx2() {
        let out_t = if w.dtype() == DType::BF16 {
            let ws = &cpu.as_slice::<bf16>()?[start..start + n * k];
            product_t_tiled(n, m, k, &xs, |o, out| {
                for (d, s) in out.iter_mut().zip(&ws[o * k..(o + 1) * k]) {
                    *d = s.to_f32();
                }
            })
        } else {
            let ws = &cpu.as_slice::<f32>()?[start..start + n * k];
            product_t_tiled(n, m, k, &xs, |o, out| {
                out.copy_from_slice(&ws[o * k..(o + 1) * k])
            })
        };
        drop(storage);
        return transposed(&out_t, m, n, x.device()).map(Some);
    }
    let out_t = if w.dtype() == DType::BF16 {
        let ws = &cpu.as_slice::<bf16>()?[start..start + n * k];
        product_t(n, m, |o, y| dot_rows(&ws[o * k..(o + 1) * k], &xs, k, y))
    } else {
        let ws = &cpu.as_slice::<f32>()?[start..start + n * k];
        product_t(n, m, |o, y| dot_rows(&ws[o * k..(o + 1) * k], &xs, k, y))
    };
    drop(storage);
    transposed(&out_t, m, n, x.device()).map(Some)
}

/// `y = x Wᵀ` with `W` in quantised blocks, for `x: (m, k)` f32 on the CPU with `1 ≤ m ≤
/// MAX_ROWS`; `None` otherwise. Bit-identical to [`skinny_matmul_t`] on the dequantised weight.
pub fn blocks_matmul_t(x: &Tensor, w: &BlockRows) -> candle_core::Result<Option<Tensor>> {
    let Ok((m, k)) = x.dims2() else {
        return Ok(None);
    };
    if k != w.cols || !(1..=MAX_ROWS).contains(&m) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    if !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    #[cfg(target_arch = "x86_64")]
    if m >= TILED_MIN_ROWS && has_avx2() {
        let out_t = product_t_tiled(w.rows, m, k, &xs, |o, out| {
            // SAFETY: F16C/AVX2 were just detected; the row holds `k / 32` whole blocks and
            // `out` has room for their `k` values.
            unsafe { avx2::dequantize_row(w.row(o), w.format, out) }
        });
        return transposed(&out_t, m, w.rows, x.device()).map(Some);
    }
    let out_t = product_t(w.rows, m, |o, y| {
        dot_rows_blocks(w.row(o), w.format, &xs, k, y)
    });
    transposed(&out_t, m, w.rows, x.device()).map(Some)
}

/// `(n, m)` → an `(m, n)` tensor: a plain loop over a few thousand floats, cheaper than a
/// strided copy op.
fn transposed(out_t: &[f32], m: usize, n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut out = vec![0f32; m * n];
    for (o, column) in out_t.chunks_exact(m).enumerate() {
        for (i, &y) in column.iter().enumerate() {
            out[i * n + o] = y;
        }
    }
    Tensor::from_vec(out, (m, n), device)
}

/// An `(n, m)` output split into tasks of [`ROWS_PER_TASK`] weight rows on rayon's pool:
/// `task(first, out)` fills the rows from `first` on.
fn by_tasks(n: usize, m: usize, task: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(i, out)| task(i * ROWS_PER_TASK, out));
    out_t
}

/// `(n, m)`: the product computed transposed, so each task owns a contiguous block of outputs;
/// `dot(o, y)` writes weight row `o` dotted with every row of `x` into `y`.
fn product_t(n: usize, m: usize, dot: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    by_tasks(n, m, |first, out| {
        for (j, y) in out.chunks_mut(m).enumerate() {
            dot(first + j, y);
        }
    })
}

/// From this many rows on, weights are widened to f32 once per row and met by every row of `x`
/// in register tiles ([`product_t_tiled`]); below, each row group streams the weights itself.
const TILED_MIN_ROWS: usize = 8;

/// The `(n, m)` product of [`product_t`] for many rows of `xs` (`m × k`): each task widens its
/// weight rows three at a time into f32 (`widen(o, out)` writes row `o`), then multiplies them
/// with groups of four rows of `x` in registers (twelve accumulators, the most that fit beside
/// the operands), so a weight is decoded once per step instead of once per group of rows, and
/// every load feeds three or four products. Results equal the one-accumulator row kernel's bit
/// for bit.
#[cfg(target_arch = "x86_64")]
fn product_t_tiled(
    n: usize,
    m: usize,
    k: usize,
    xs: &[f32],
    widen: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    by_tasks(n, m, |first, out| {
        let rows = out.len() / m;
        let mut panel = vec![0f32; 3 * k];
        let mut o = 0;
        while o < rows {
            let tile_rows = (rows - o).min(3);
            for r in 0..tile_rows {
                widen(first + o + r, &mut panel[r * k..(r + 1) * k]);
            }
            let mut i = 0;
            while i < m {
                let group = (m - i).min(4);
                let xs_g = &xs[i * k..(i + group) * k];
                macro_rules! run {
                    ($w:literal, $x:literal) => {{
                        let mut y = [[0f32; $x]; $w];
                        // SAFETY: AVX2/FMA were detected by the caller; the kernel reads
                        // `$w·k` floats of the panel and `$x·k` of `xs_g`, both that long.
                        unsafe { avx2::tile::<$w, $x>(&panel, xs_g, k, &mut y) };
                        for (r, yr) in y.iter().enumerate() {
                            out[(o + r) * m + i..(o + r) * m + i + $x].copy_from_slice(yr);
                        }
                    }};
                }
                match (tile_rows, group) {
                    (3, 4) => run!(3, 4),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, 1) => run!(3, 1),
                    (2, 4) => run!(2, 4),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, _) => run!(2, 1),
                    (_, 4) => run!(1, 4),
                    (_, 3) => run!(1, 3),
                    (_, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
                i += group;
            }
            o += tile_rows;
        }
    })
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

/// Whether the AVX2 kernels can run here.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs `kernel::<M, A>` on groups of at most 8 rows of `xs`: `M` rows per call and `A`
/// accumulators per row. A single chain of fused multiply-adds is bound by their latency, so
/// few rows get several independent accumulators; eight rows already give eight chains, and
/// more would not fit in the sixteen vector registers.
macro_rules! by_row_groups {
    ($y:expr, $xs:expr, $k:expr, |$m:ident, $a:ident, $xs_g:ident, $out:ident| $call:expr) => {
        for (group, $out) in $y.chunks_mut(8).enumerate() {
            let $xs_g = &$xs[group * 8 * $k..];
            match $out.len() {
                1 => {
                    const $m: usize = 1;
                    const $a: usize = 4;
                    $call
                }
                2 => {
                    const $m: usize = 2;
                    const $a: usize = 4;
                    $call
                }
                3 => {
                    const $m: usize = 3;
                    const $a: usize = 2;
                    $call
                }
                4 => {
                    const $m: usize = 4;
                    const $a: usize = 2;
                    $call
                }
                5 => {
                    const $m: usize = 5;
                    const $a: usize = 1;
                    $call
                }
                6 => {
                    const $m: usize = 6;
                    const $a: usize = 1;
                    $call
                }
                7 => {
                    const $m: usize = 7;
                    const $a: usize = 1;
                    $call
                }
                _ => {
                    const $m: usize = 8;
                    const $a: usize = 1;
                    $call
                }
            }
        }
    };
}

/// `y[i] = row · x_i` for every row `x_i` of `xs` (`m × k`).
fn dot_rows<E: Weight>(row: &[E], xs: &[f32], k: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the features the kernels are compiled for were just detected, and every
        // index they read is below `k` within `row` and below `out.len() · k` within `xs`.
        by_row_groups!(y, xs, k, |M, A, xs_g, out| unsafe {
            avx2::dot_rows::<E, M, A>(row, xs_g, k, out)
        });
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

/// `y[i] = row · x_i` for a row of quantised blocks.
fn dot_rows_blocks(row: &[u8], format: BlockFormat, xs: &[f32], k: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as in `dot_rows`; the row holds `k / 32` whole blocks of `format`.
        by_row_groups!(y, xs, k, |M, A, xs_g, out| unsafe {
            avx2::dot_rows_blocks::<M, A>(row, format, xs_g, k, out)
        });
        return;
    }
    dot_rows(&super::blocks::dequantize(format, row), xs, k, y);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockFormat, Weight, BLOCK};
    use std::arch::x86_64::*;

    /// A row's `A` accumulators summed in a fixed order, then its eight lanes (both kernels
    /// use it, so their sums agree bit for bit).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce<const A: usize>(acc: &[__m256; A]) -> f32 {
        let a = match A {
            1 => acc[0],
            2 => _mm256_add_ps(acc[0], acc[1]),
            _ => _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
        };
        let hi = _mm256_extractf128_ps(a, 1);
        let quad = _mm_add_ps(_mm256_castps256_ps128(a), hi);
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(one)
    }

    /// One weight row against `M` rows of `xs`: each 8-float chunk of the weight is loaded once
    /// and multiplied into `M` accumulators; chunk `c` goes to accumulator `c mod A`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<E: Weight, const M: usize, const A: usize>(
        row: &[E],
        xs: &[f32],
        k: usize,
        y: &mut [f32],
    ) {
        let whole = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); A]; M];
        let w_ptr = row.as_ptr();
        let x_ptr = xs.as_ptr();
        let mut j = 0;
        while j + 8 * A <= whole {
            for a in 0..A {
                let w = E::load8(w_ptr.add(j + 8 * a));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(x_ptr.add(i * k + j + 8 * a));
                    acc_i[a] = _mm256_fmadd_ps(w, x, acc_i[a]);
                }
            }
            j += 8 * A;
        }
        let mut a = 0;
        while j < whole {
            let w = E::load8(w_ptr.add(j));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                acc_i[a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x_ptr.add(i * k + j)), acc_i[a]);
            }
            j += 8;
            a += 1;
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let mut sum = reduce(acc_i);
            for t in whole..k {
                sum += row[t].to_f32() * xs[i * k + t];
            }
            y[i] = sum;
        }
    }

    /// One row of quantised blocks against `M` rows of `xs`. Each block is widened to four
    /// vectors of f32 weights with candle's roundings (`q·d`, then `+ m`) and accumulated as
    /// [`dot_rows`] does, so the result equals the f32 kernel's on the dequantised row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_blocks<const M: usize, const A: usize>(
        row: &[u8],
        format: BlockFormat,
        xs: &[f32],
        k: usize,
        y: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); A]; M];
        let x_ptr = xs.as_ptr();
        for (b, block) in row.chunks_exact(format.bytes_per_block()).enumerate() {
            let w = widen_block(block, format);
            let j = b * BLOCK;
            for (c, wc) in w.iter().enumerate() {
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(x_ptr.add(i * k + j + 8 * c));
                    acc_i[c % A] = _mm256_fmadd_ps(*wc, x, acc_i[c % A]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            y[i] = reduce(acc_i);
        }
    }

    /// One block as four vectors of f32 weights, with candle's roundings (`q·d`, then `+ m`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen_block(block: &[u8], format: BlockFormat) -> [__m256; 4] {
        let low = _mm_set1_epi8(0x0F);
        let p = block.as_ptr();
        // d (and m for Q4_1): the block's leading f16 values, widened by the F16C unit.
        let head = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let d = _mm256_broadcastss_ps(head);
        let w: [__m256; 4] = match format {
            BlockFormat::Q4_1 => {
                let m = _mm256_broadcastss_ps(_mm_movehdup_ps(head));
                let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let widen = |v: __m128i| {
                    let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    _mm256_add_ps(_mm256_mul_ps(q, d), m)
                };
                [
                    widen(lo),
                    widen(_mm_srli_si128(lo, 8)),
                    widen(hi),
                    widen(_mm_srli_si128(hi, 8)),
                ]
            }
            BlockFormat::Q8_0 => {
                let widen = |at: usize| {
                    let v = _mm_loadl_epi64(p.add(2 + at) as *const __m128i);
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                [widen(0), widen(8), widen(16), widen(24)]
            }
        };
        w
    }

    /// A row of blocks dequantised into `out` (`k` floats), equal to candle's dequantisation.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_row(row: &[u8], format: BlockFormat, out: &mut [f32]) {
        for (b, block) in row.chunks_exact(format.bytes_per_block()).enumerate() {
            let w = widen_block(block, format);
            for (c, wc) in w.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(b * BLOCK + 8 * c), *wc);
            }
        }
    }

    /// `W` weight rows (`ws`, row-major, `k` each) against `X` rows of `xs`: `y[r][i] = w_r · x_i`.
    /// Each weight load feeds `X` products and each `x` load `W`; every pair accumulates its
    /// chunks in order into one accumulator, then the tail, as [`dot_rows`] with one accumulator
    /// does, so the sums agree bit for bit.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const W: usize, const X: usize>(
        ws: &[f32],
        xs: &[f32],
        k: usize,
        y: &mut [[f32; X]; W],
    ) {
        let whole = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let (w_ptr, x_ptr) = (ws.as_ptr(), xs.as_ptr());
        let mut j = 0;
        while j < whole {
            let mut w = [_mm256_setzero_ps(); W];
            for (r, wr) in w.iter_mut().enumerate() {
                *wr = _mm256_loadu_ps(w_ptr.add(r * k + j));
            }
            for i in 0..X {
                let x = _mm256_loadu_ps(x_ptr.add(i * k + j));
                for (acc_r, w_r) in acc.iter_mut().zip(&w) {
                    acc_r[i] = _mm256_fmadd_ps(*w_r, x, acc_r[i]);
                }
            }
            j += 8;
        }
        for (r, (acc_r, y_r)) in acc.iter().zip(y.iter_mut()).enumerate() {
            for (i, (a, out)) in acc_r.iter().zip(y_r.iter_mut()).enumerate() {
                let mut sum = reduce(&[*a]);
                for t in whole..k {
                    sum += ws[r * k + t] * xs[i * k + t];
                }
                *out = sum;
            }
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
    fn quantised_blocks_give_the_f32_kernels_result_bit_for_bit() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let mut rng = StdRng::seed_from_u64(5);
        // 136 output rows: two rayon tasks and a partial one; k = 96: three blocks per row.
        let (k, n) = (96, 136);
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random::<f32>() * 0.2 - 0.1)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        for (dtype, format) in [
            (GgmlDType::Q4_1, BlockFormat::Q4_1),
            (GgmlDType::Q8_0, BlockFormat::Q8_0),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dequantised = q.dequantize(&Device::Cpu).unwrap();
            let blocks = BlockRows::new(format, n, k, q.data().unwrap().to_vec()).unwrap();
            let wd: Vec<f32> = dequantised.flatten_all().unwrap().to_vec1().unwrap();
            for m in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..m * k)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let got = blocks_matmul_t(&xt, &blocks)
                    .unwrap()
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                // The f32 kernel on the dequantised weight (it declines one row, so that one
                // goes through the row function directly).
                let want = if m >= MIN_ROWS {
                    skinny_matmul_t(&xt, &dequantised)
                        .unwrap()
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap()
                } else {
                    let mut y = vec![0f32; m];
                    let mut want = vec![vec![0f32; n]; m];
                    for o in 0..n {
                        dot_rows(&wd[o * k..(o + 1) * k], &x, k, &mut y);
                        for i in 0..m {
                            want[i][o] = y[i];
                        }
                    }
                    want
                };
                assert_eq!(got, want, "{format:?}, {m} rows");
                for i in 0..m {
                    for o in 0..n {
                        let exact: f64 = (0..k)
                            .map(|j| x[i * k + j] as f64 * wd[o * k + j] as f64)
                            .sum();
                        assert!(
                            (got[i][o] as f64 - exact).abs() < 1e-5,
                            "{format:?} ({i}, {o})"
                        );
                    }
                }
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

#[cfg(test)]
mod timing {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::time::Instant;

    /// Interleaved timing of the decode kernels on an MLP-sized weight:
    /// `cargo test --release --lib model::gemv::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decode_kernels() {
        let (n, k) = (1536 * 8, 576);
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let bf = w.to_dtype(DType::BF16).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let blocks = BlockRows::new(BlockFormat::Q4_1, n, k, q.data().unwrap().to_vec()).unwrap();
        for m in [1, 2, 4, 8, 16] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let (mut t_bf, mut t_q, mut t_f) = (0f64, 0f64, 0f64);
            for _ in 0..20 {
                let s = Instant::now();
                skinny_matmul_t(&x, &bf).unwrap();
                t_bf += s.elapsed().as_secs_f64();
                let s = Instant::now();
                blocks_matmul_t(&x, &blocks).unwrap();
                t_q += s.elapsed().as_secs_f64();
                let s = Instant::now();
                x.matmul(&w.t().unwrap()).unwrap();
                t_f += s.elapsed().as_secs_f64();
            }
            println!(
                "m={m:2}: bf16 {:.0} µs, q4_1 {:.0} µs, candle f32 {:.0} µs",
                t_bf / 20.0 * 1e6,
                t_q / 20.0 * 1e6,
                t_f / 20.0 * 1e6
            );
        }
    }
}
