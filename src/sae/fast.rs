//! The TopK training loss and its exact gradients, computed on the host without autodiff.
//!
//! Only the encoder product `(x − b_dec)·W_enc` is dense (one matmul, through candle's
//! multithreaded gemm). Everything after it touches only the selected latents: per token the `k`
//! top latents (and the `k_aux` top dead latents when the auxiliary loss is on), so decoding, the
//! latent gradients and both weight gradients cost O(n·k·d_in) instead of O(n·d_sae·d_in), and no
//! dense (n, d_sae) gradient is ever materialised.
//!
//! The maths (per batch of n tokens, inputs already scaled; sums over tokens):
//!
//! ```text
//! xc  = x − b_dec                          pre = xc·W_enc + b_enc                 (n, d_sae)
//! S   = top-k(pre) per row                 f_j = relu(pre_j) for j ∈ S
//! x̂   = b_dec + Σ_{j∈S} f_j W_dec[j]       r = x̂ − x,  TV = Σ‖x − x̄‖²            main = Σ‖r‖²/TV
//! g   = 2r/TV                              (∂main/∂x̂)
//! e   = −r (no gradient)                   A = top-k_aux(pre) among dead latents, a_j = relu(pre_j)
//! ê   = Σ_{j∈A} a_j W_dec[j]               aux = Σ‖ê − e‖²/TV_e,  g_a = coef·2(ê − e)/TV_e
//! ∂pre_j = g·W_dec[j] [j∈S, pre_j>0] + g_a·W_dec[j] [j∈A, pre_j>0]
//! ∂W_dec[j] = Σ f_j g + Σ a_j g_a          ∂W_enc[:, j] = Σ ∂pre_j · xc
//! ∂b_enc = Σ ∂pre                          ∂b_dec = Σ g − W_enc·∂b_enc
//! ```
//!
//! This is the same function the autodiff path in `train.rs` differentiates (TV and TV_e are
//! constants there too); a test compares the two gradients. Every reduction runs in a fixed order
//! (per-row partials summed sequentially, per-latent lists in ascending token order), so results
//! are deterministic for a given thread count of the one dense matmul.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{Result, SaeError};

/// Parameters in the normalised space, row-major host slices.
pub(crate) struct HostParams<'a> {
    /// (d_in, d_sae)
    pub w_enc: &'a [f32],
    /// (d_sae)
    pub b_enc: &'a [f32],
    /// (d_sae, d_in)
    pub w_dec: &'a [f32],
    /// (d_in)
    pub b_dec: &'a [f32],
}

/// Gradients in the parameters' layouts, the two loss values and per-latent firing counts.
pub(crate) struct HostGrads {
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    pub main: f64,
    pub aux: Option<f64>,
    /// Tokens of the batch on which each latent fired (f > 0).
    pub fires: Vec<u32>,
}

pub(crate) struct LossSpec<'a> {
    pub d_in: usize,
    pub d_sae: usize,
    pub k: usize,
    pub aux_k: usize,
    pub aux_coef: f64,
    /// Dead latents (auxiliary loss on when `Some`).
    pub dead: Option<&'a [bool]>,
}

/// One selected latent of one token.
#[derive(Clone, Copy)]
struct Active {
    j: u32,
    /// relu(pre_j)
    act: f32,
    /// ∂loss/∂pre_j (filled in the second pass)
    dpre: f32,
}

/// Σ_rows ‖x − x̄‖² in f64, over (n, d) row-major `x`.
fn total_variance(x: &[f32], n: usize, d: usize) -> f64 {
    let mut mean = vec![0f64; d];
    for row in x.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let parts: Vec<f64> = x
        .par_chunks(d * 256)
        .map(|rows| {
            rows.chunks(d)
                .map(|row| {
                    row.iter()
                        .zip(&mean)
                        .map(|(&v, &m)| (v as f64 - m).powi(2))
                        .sum::<f64>()
                })
                .sum()
        })
        .collect();
    parts.iter().sum()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // eight accumulators let the compiler vectorise without reassociating one sum
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// The `k` largest of `vals` among `candidates`, as indices in ascending order; NaN counts as
/// −∞ and ties go to the lower index (the order `larger_first` defines). One pass with a
/// k-slot buffer: after the first few hundred values almost every value fails the single
/// comparison with the buffer's worst entry, so this costs about one compare per candidate.
fn select_top(vals: &[f32], candidates: &[u32], k: usize, buf: &mut Vec<(f32, u32)>) -> Vec<u32> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    // a is worse than b: smaller value, or equal value and larger index
    let worse = |a: (f32, u32), b: (f32, u32)| a.0 < b.0 || (a.0 == b.0 && a.1 > b.1);
    buf.clear();
    if k == 0 {
        return Vec::new();
    }
    let mut worst = 0usize;
    for &j in candidates {
        let e = (key(vals[j as usize]), j);
        if buf.len() < k {
            buf.push(e);
            if buf.len() == k {
                worst = (0..k).fold(0, |w, i| if worse(buf[i], buf[w]) { i } else { w });
            }
        } else if worse(buf[worst], e) {
            buf[worst] = e;
            worst = (0..k).fold(0, |w, i| if worse(buf[i], buf[w]) { i } else { w });
        }
    }
    let mut out: Vec<u32> = buf.iter().map(|e| e.1).collect();
    out.sort_unstable();
    out
}

/// Loss and gradients of one batch `x` (n, d_in), already scaled.
pub(crate) fn loss_and_grads(
    p: &HostParams<'_>,
    x: &[f32],
    spec: &LossSpec<'_>,
) -> Result<HostGrads> {
    let (d_in, d_sae) = (spec.d_in, spec.d_sae);
    let n = x.len() / d_in.max(1);
    if n == 0 || n * d_in != x.len() {
        return Err(SaeError::Source(format!(
            "batch of {} values is not a positive multiple of d_in {d_in}",
            x.len()
        )));
    }
    // xc = x − b_dec
    let mut xc = x.to_vec();
    xc.par_chunks_mut(d_in).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(p.b_dec) {
            *v -= b;
        }
    });
    // pre (without b_enc) = xc·W_enc, the one dense product
    let pre_t = Tensor::from_slice(&xc, (n, d_in), &Device::Cpu)?
        .matmul(&Tensor::from_slice(p.w_enc, (d_in, d_sae), &Device::Cpu)?)?
        .contiguous()?;
    let (storage, layout) = pre_t.storage_and_layout();
    let pre: &[f32] = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => {
            return Err(SaeError::Source(
                "encoder product is not a contiguous f32 host tensor".into(),
            ))
        }
    };

    let all: Vec<u32> = (0..d_sae as u32).collect();
    let dead_idx: Vec<u32> = match spec.dead {
        Some(dead) => (0..d_sae as u32).filter(|&j| dead[j as usize]).collect(),
        None => Vec::new(),
    };
    let aux_on = spec.dead.is_some() && !dead_idx.is_empty();

    // Pass 1, per token: selections, x̂ − x (= r) and ê.
    struct Row {
        main: Vec<Active>,
        aux: Vec<Active>,
    }
    let mut r = vec![0f32; n * d_in];
    let mut e_hat = vec![0f32; if aux_on { n * d_in } else { 0 }];
    let mut rows: Vec<Row> = Vec::with_capacity(n);
    {
        let e_hat_rows: Vec<&mut [f32]> = if aux_on {
            e_hat.chunks_mut(d_in).collect()
        } else {
            (0..n).map(|_| <&mut [f32]>::default()).collect()
        };
        r.par_chunks_mut(d_in)
            .zip(e_hat_rows)
            .zip(pre.par_chunks(d_sae))
            .zip(x.par_chunks(d_in))
            .map_init(
                || {
                    (
                        vec![0f32; d_sae],
                        Vec::with_capacity(spec.k.max(spec.aux_k)),
                    )
                },
                |(buf, scratch), (((r_row, eh_row), pre_row), x_row)| {
                    for ((b, &v), &be) in buf.iter_mut().zip(pre_row).zip(p.b_enc) {
                        *b = v + be;
                    }
                    let main: Vec<Active> = select_top(buf, &all, spec.k, scratch)
                        .into_iter()
                        .filter(|&j| buf[j as usize] > 0.0)
                        .map(|j| Active {
                            j,
                            act: buf[j as usize],
                            dpre: 0.0,
                        })
                        .collect();
                    r_row.copy_from_slice(p.b_dec);
                    for a in &main {
                        let w = &p.w_dec[a.j as usize * d_in..(a.j as usize + 1) * d_in];
                        axpy(r_row, a.act, w);
                    }
                    for (rv, &xv) in r_row.iter_mut().zip(x_row) {
                        *rv -= xv;
                    }
                    let aux: Vec<Active> = if aux_on {
                        let sel: Vec<Active> = select_top(buf, &dead_idx, spec.aux_k, scratch)
                            .into_iter()
                            .filter(|&j| buf[j as usize] > 0.0)
                            .map(|j| Active {
                                j,
                                act: buf[j as usize],
                                dpre: 0.0,
                            })
                            .collect();
                        for a in &sel {
                            let w = &p.w_dec[a.j as usize * d_in..(a.j as usize + 1) * d_in];
                            axpy(eh_row, a.act, w);
                        }
                        sel
                    } else {
                        Vec::new()
                    };
                    Row { main, aux }
                },
            )
            .collect_into_vec(&mut rows);
    }
    drop(storage);
    drop(pre_t);

    // Batch constants (no gradient): TV of x, and of e = −r for the auxiliary loss.
    let tv = total_variance(x, n, d_in);
    if !(tv > 0.0 && tv.is_finite()) {
        return Err(SaeError::Source(format!(
            "a batch of {n} tokens has total variance {tv}; cannot normalise the loss"
        )));
    }
    let sq_sum = |v: &[f32]| -> f64 {
        let parts: Vec<f64> = v
            .par_chunks(d_in * 256)
            .map(|c| c.iter().map(|&a| (a as f64).powi(2)).sum::<f64>())
            .collect();
        parts.iter().sum()
    };
    let main = sq_sum(&r) / tv;
    // ê − e = ê + r, kept in e_hat
    let (aux, tv_e) = if aux_on {
        let tv_e = total_variance(&r, n, d_in); // TV(−r) = TV(r)
        e_hat
            .par_chunks_mut(d_in)
            .zip(r.par_chunks(d_in))
            .for_each(|(eh, rr)| {
                for (a, &b) in eh.iter_mut().zip(rr) {
                    *a += b;
                }
            });
        if tv_e > 0.0 && tv_e.is_finite() {
            (Some(sq_sum(&e_hat) / tv_e), tv_e)
        } else {
            (Some(0.0), 0.0)
        }
    } else {
        (None, 0.0)
    };

    // g = 2r/TV in place of r; g_a = coef·2(ê − e)/TV_e in place of e_hat
    let gs = (2.0 / tv) as f32;
    r.par_iter_mut().for_each(|v| *v *= gs);
    let gas = if tv_e > 0.0 {
        (spec.aux_coef * 2.0 / tv_e) as f32
    } else {
        0.0
    };
    e_hat.par_iter_mut().for_each(|v| *v *= gas);
    let g = r;
    let g_aux = e_hat;

    // Pass 2, per token: ∂pre at the selected latents.
    rows.par_iter_mut().enumerate().for_each(|(t, row)| {
        let gt = &g[t * d_in..(t + 1) * d_in];
        for a in &mut row.main {
            a.dpre = dot(gt, &p.w_dec[a.j as usize * d_in..(a.j as usize + 1) * d_in]);
        }
        if aux_on {
            let ga = &g_aux[t * d_in..(t + 1) * d_in];
            for a in &mut row.aux {
                a.dpre = dot(ga, &p.w_dec[a.j as usize * d_in..(a.j as usize + 1) * d_in]);
            }
        }
    });

    // Group by latent (counting sort; tokens ascending within a latent).
    // entry: (token, act, dpre, is_aux)
    let mut counts = vec![0usize; d_sae + 1];
    for row in &rows {
        for a in row.main.iter().chain(&row.aux) {
            counts[a.j as usize + 1] += 1;
        }
    }
    for j in 0..d_sae {
        counts[j + 1] += counts[j];
    }
    let offsets = counts;
    let mut fill = offsets.clone();
    let total = offsets[d_sae];
    let mut entries = vec![(0u32, 0f32, 0f32, false); total];
    for (t, row) in rows.iter().enumerate() {
        for (a, is_aux) in row
            .main
            .iter()
            .map(|a| (a, false))
            .chain(row.aux.iter().map(|a| (a, true)))
        {
            let slot = &mut fill[a.j as usize];
            entries[*slot] = (t as u32, a.act, a.dpre, is_aux);
            *slot += 1;
        }
    }
    let mut fires = vec![0u32; d_sae];
    for row in &rows {
        for a in &row.main {
            fires[a.j as usize] += 1;
        }
    }

    // Per latent: ∂W_dec[j], ∂W_enc[:, j] (as row j of a transposed buffer) and ∂b_enc[j].
    let mut gw_dec = vec![0f32; d_sae * d_in];
    let mut gw_enc_t = vec![0f32; d_sae * d_in];
    let mut gb_enc = vec![0f32; d_sae];
    gw_dec
        .par_chunks_mut(d_in)
        .zip(gw_enc_t.par_chunks_mut(d_in))
        .zip(gb_enc.par_iter_mut())
        .enumerate()
        .for_each(|(j, ((gd, ge), gb))| {
            let mut sb = 0f32;
            for &(t, act, dpre, is_aux) in &entries[offsets[j]..offsets[j + 1]] {
                let t = t as usize;
                let src = if is_aux { &g_aux } else { &g };
                axpy(gd, act, &src[t * d_in..(t + 1) * d_in]);
                axpy(ge, dpre, &xc[t * d_in..(t + 1) * d_in]);
                sb += dpre;
            }
            *gb = sb;
        });
    // ∂W_enc in (d_in, d_sae) layout
    let mut gw_enc = vec![0f32; d_in * d_sae];
    gw_enc
        .par_chunks_mut(d_sae)
        .enumerate()
        .for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = gw_enc_t[j * d_in + i];
            }
        });
    // ∂b_dec = Σ_t g_t − W_enc·∂b_enc
    let mut gb_dec = vec![0f32; d_in];
    for gt in g.chunks(d_in) {
        for (s, &v) in gb_dec.iter_mut().zip(gt) {
            *s += v;
        }
    }
    gb_dec
        .par_iter_mut()
        .zip(p.w_enc.par_chunks(d_sae))
        .for_each(|(s, w_row)| *s -= dot(w_row, &gb_enc));

    Ok(HostGrads {
        w_enc: gw_enc,
        b_enc: gb_enc,
        w_dec: gw_dec,
        b_dec: gb_dec,
        main,
        aux,
        fires,
    })
}

/// One Adam update in place: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr·m̂/(√v̂ + ε)` with bias corrections for step `t` (1-based).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_update(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    lr: f64,
    (b1, b2, eps): (f64, f64, f64),
    t: i32,
) {
    let c1 = (1.0 - b1.powi(t)) as f32;
    let c2 = (1.0 - b2.powi(t)) as f32;
    let (b1, b2, eps, lr) = (b1 as f32, b2 as f32, eps as f32, lr as f32);
    p.par_chunks_mut(4096)
        .zip(m.par_chunks_mut(4096))
        .zip(v.par_chunks_mut(4096))
        .zip(g.par_chunks(4096))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let m_hat = m[i] / c1;
                let v_hat = v[i] / c2;
                p[i] -= lr * (m_hat / (v_hat.sqrt() + eps));
            }
        });
}

/// Remove from each row of `g` (rows × d) its component along the matching row of `w`
/// (unit rows): the decoder-norm constraint's tangent projection.
pub(crate) fn project_out_parallel(g: &mut [f32], w: &[f32], d: usize) {
    g.par_chunks_mut(d)
        .zip(w.par_chunks(d))
        .for_each(|(gr, wr)| {
            let along = dot(gr, wr);
            axpy(gr, -along, wr);
        });
}

/// Scale each row of `w` (rows × d) to unit norm.
pub(crate) fn normalise_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|row| {
        let norm = dot(row, row).sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_top_agrees_with_the_sorting_definition() {
        // values with ties and a NaN; the reference sorts by `larger_first` and takes k
        let vals: Vec<f32> = (0..200)
            .map(|i| match i {
                17 => f32::NAN,
                _ => ((i * 37) % 23) as f32 - 11.0,
            })
            .collect();
        let all: Vec<u32> = (0..200).collect();
        let odd: Vec<u32> = (0..200).filter(|j| j % 2 == 1).collect();
        let mut buf = Vec::new();
        for cands in [&all, &odd] {
            for k in [1, 5, 23, 100, 150] {
                let mut want = cands.clone();
                want.sort_by(|&a, &b| super::super::larger_first(&vals, a, b));
                want.truncate(k);
                want.sort_unstable();
                assert_eq!(select_top(&vals, cands, k, &mut buf), want, "k {k}");
            }
        }
    }
}
