//! Attention for passes that need no gradient (generation, scoring, activation capture), on the
//! CPU in f32: scores, mask, softmax and the weighted sum of values in one pass per query row.
//!
//! The differentiable path builds the same result from about ten candle ops per layer (two
//! batched products of tiny matrices, a KV-head repeat that copies the cache, dtype casts, the
//! mask add, softmax, a transpose); during a decode step those ops cost more than the
//! projections themselves. Here query head `i` reads KV head `i / groups` by index, and the
//! cache is a buffer that grows in place instead of being re-concatenated at every step.

use rayon::prelude::*;

/// Keys and values of `len` positions, laid out `(batch, kv_heads, cap, head_dim)` with
/// `cap ≥ len` so later positions can be written in place.
#[derive(Debug, Clone, Default)]
pub struct KvBuffer {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvBuffer {
    pub fn new(batch: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            batch,
            kv_heads,
            head_dim,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `t` positions of keys and values, each `(batch, kv_heads, t, head_dim)`.
    pub fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let (b, kv, hd) = (self.batch, self.kv_heads, self.head_dim);
        debug_assert_eq!(k.len(), b * kv * t * hd);
        debug_assert_eq!(v.len(), k.len());
        if self.len + t > self.cap {
            // Room for a typical generation budget after the prompt, so growth is rare.
            self.reserve((self.len + t).max(2 * self.cap).max(self.len + t + 64));
        }
        for row in 0..b * kv {
            let dst = (row * self.cap + self.len) * hd;
            let src = row * t * hd;
            self.k[dst..dst + t * hd].copy_from_slice(&k[src..src + t * hd]);
            self.v[dst..dst + t * hd].copy_from_slice(&v[src..src + t * hd]);
        }
        self.len += t;
    }

    /// Forgets every position from `len` on (the keys stay in place and are overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// This buffer's one sequence copied to `batch` sequences, with room for a generation budget.
    pub fn repeat_batch(&self, batch: usize) -> Self {
        let (kv, hd) = (self.kv_heads, self.head_dim);
        let cap = self.len + 64;
        let mut k = vec![0f32; batch * kv * cap * hd];
        let mut v = vec![0f32; batch * kv * cap * hd];
        for row in 0..batch * kv {
            // Row `row` of the copy is head `row % kv` of the original's one sequence.
            let (src, dst) = ((row % kv) * self.cap * hd, row * cap * hd);
            let n = self.len * hd;
            k[dst..dst + n].copy_from_slice(&self.k[src..src + n]);
            v[dst..dst + n].copy_from_slice(&self.v[src..src + n]);
        }
        Self {
            batch,
            kv_heads: kv,
            head_dim: hd,
            cap,
            len: self.len,
            k,
            v,
        }
    }

    /// Several buffers' sequences as one batch, in order, each right-aligned to the longest: a
    /// shorter sequence gets zero keys and values at its start, which its mask must cover.
    pub fn stack(parts: &[&KvBuffer]) -> Self {
        let Some(first) = parts.first() else {
            return Self::default();
        };
        let (kv, hd) = (first.kv_heads, first.head_dim);
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let batch: usize = parts.iter().map(|p| p.batch).sum();
        let cap = len + 64;
        let mut k = vec![0f32; batch * kv * cap * hd];
        let mut v = vec![0f32; batch * kv * cap * hd];
        let mut row = 0;
        for part in parts {
            debug_assert_eq!((part.kv_heads, part.head_dim), (kv, hd));
            let shift = len - part.len;
            for src_row in 0..part.batch * kv {
                let (src, dst) = (src_row * part.cap * hd, (row * cap + shift) * hd);
                let n = part.len * hd;
                k[dst..dst + n].copy_from_slice(&part.k[src..src + n]);
                v[dst..dst + n].copy_from_slice(&part.v[src..src + n]);
                row += 1;
            }
        }
        Self {
            batch,
            kv_heads: kv,
            head_dim: hd,
            cap,
            len,
            k,
            v,
        }
    }

    /// The sequences `keep` (indices, in the order given) without their first `skip` positions.
    pub fn select(&self, keep: &[usize], skip: usize) -> Self {
        let (kv, hd) = (self.kv_heads, self.head_dim);
        let len = self.len.saturating_sub(skip);
        let cap = len + 64;
        let mut k = vec![0f32; keep.len() * kv * cap * hd];
        let mut v = vec![0f32; keep.len() * kv * cap * hd];
        for (new_seq, &seq) in keep.iter().enumerate() {
            for head in 0..kv {
                let src = ((seq * kv + head) * self.cap + skip) * hd;
                let dst = (new_seq * kv + head) * cap * hd;
                k[dst..dst + len * hd].copy_from_slice(&self.k[src..src + len * hd]);
                v[dst..dst + len * hd].copy_from_slice(&self.v[src..src + len * hd]);
            }
        }
        Self {
            batch: keep.len(),
            kv_heads: kv,
            head_dim: hd,
            cap,
            len,
            k,
            v,
        }
    }

    fn reserve(&mut self, cap: usize) {
        let (rows, hd) = (self.batch * self.kv_heads, self.head_dim);
        let relayout = |old: &[f32]| {
            let mut new = vec![0f32; rows * cap * hd];
            for row in 0..rows {
                let (src, dst) = (row * self.cap * hd, row * cap * hd);
                new[dst..dst + self.len * hd].copy_from_slice(&old[src..src + self.len * hd]);
            }
            new
        };
        self.k = relayout(&self.k);
        self.v = relayout(&self.v);
        self.cap = cap;
    }

    /// The cached keys and values as `(batch, kv_heads, len, head_dim)` tensors, for a pass that
    /// continues on the differentiable path.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        let shape = (self.batch, self.kv_heads, self.cap, self.head_dim);
        let view = |x: &[f32]| {
            candle_core::Tensor::from_slice(x, shape, device)?
                .narrow(2, 0, self.len)?
                .contiguous()
        };
        Ok((view(&self.k)?, view(&self.v)?))
    }

    /// The keys and values so far, for [`attend`].
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            k: &self.k,
            v: &self.v,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            stride: self.cap,
            len: self.len,
        }
    }
}

/// A view of `(batch, kv_heads, stride, head_dim)` keys and values, of which the first `len`
/// positions are used.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_heads: usize,
    pub head_dim: usize,
    pub stride: usize,
    pub len: usize,
}

/// How scores are formed before the mask: `score = q·k · scale`, then `tanh(score / cap) · cap`
/// when Gemma-2's soft cap is set.
#[derive(Debug, Clone, Copy)]
pub struct Scoring {
    pub scale: f32,
    pub soft_cap: Option<f32>,
}

/// Bias values at or below this exclude a key outright (the decoder masks with -1e30).
const EXCLUDED: f32 = -1.0e29;

/// `softmax(q kᵀ · scale + bias) v` for `q: (batch, heads, t, head_dim)` and an additive
/// `bias: (batch, t, len)`; returns `(batch, t, heads · head_dim)`, the layout the output
/// projection reads. Keys whose bias is at most -1e29 get weight 0 without being scored (in f32
/// their softmax weight is exactly 0 anyway); a row whose keys are all excluded gets uniform
/// weights, as the finite-mask softmax of the differentiable path gives it.
pub fn attend(
    q: &[f32],
    heads: usize,
    t: usize,
    keys: Keys<'_>,
    bias: &[f32],
    scoring: Scoring,
) -> Vec<f32> {
    let hd = keys.head_dim;
    let mut out = vec![0f32; q.len()];
    // One task per (sequence, query position): all heads of that row.
    out.par_chunks_mut(heads * hd).enumerate().for_each_init(
        || vec![0f32; keys.len],
        |weights, (row, out_row)| {
            let (bi, ti) = (row / t, row % t);
            for h in 0..heads {
                let head = Head {
                    query: &q[((bi * heads + h) * t + ti) * hd..][..hd],
                    // Query head h reads KV head h / groups.
                    kv_row: bi * keys.kv_heads + h / (heads / keys.kv_heads),
                    bias: &bias[row * keys.len..(row + 1) * keys.len],
                    keys,
                    scoring,
                };
                let out_head = &mut out_row[h * hd..(h + 1) * hd];
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were just detected; the function indexes only
                    // within the slices it is given.
                    unsafe { attend_head_avx2(&head, weights, out_head) };
                    continue;
                }
                attend_head(&head, weights, out_head);
            }
        },
    );
    out
}

/// One head of one query row: what [`attend_head`] reads.
struct Head<'a> {
    query: &'a [f32],
    /// The `(sequence, KV head)` row of the cache this head reads.
    kv_row: usize,
    /// The row's additive mask over the cached positions.
    bias: &'a [f32],
    keys: Keys<'a>,
    scoring: Scoring,
}

/// [`attend_head`] compiled for AVX2, so its loops vectorise eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(head: &Head<'_>, weights: &mut [f32], out: &mut [f32]) {
    attend_head(head, weights, out)
}

/// `out += Σ_j softmax_j · v_j` for one head of one query row; `weights` is scratch.
#[inline(always)]
fn attend_head(head: &Head<'_>, weights: &mut [f32], out: &mut [f32]) {
    let Head {
        query,
        kv_row,
        bias,
        keys,
        scoring,
    } = *head;
    let hd = keys.head_dim;
    let at = |j: usize| (kv_row * keys.stride + j) * hd;
    let mut max = f32::NEG_INFINITY;
    for (j, (w, &b)) in weights.iter_mut().zip(bias).enumerate() {
        if b <= EXCLUDED {
            *w = f32::NEG_INFINITY;
            continue;
        }
        let mut score = dot(query, &keys.k[at(j)..][..hd]) * scoring.scale;
        if let Some(cap) = scoring.soft_cap {
            score = (score / cap).tanh() * cap;
        }
        *w = score + b;
        max = max.max(*w);
    }
    if max == f32::NEG_INFINITY {
        // Every key excluded: uniform weights, as a softmax over equal masked scores gives.
        weights.fill(0.0);
        max = 0.0;
    }
    let mut sum = 0f32;
    for w in weights.iter_mut() {
        *w = (*w - max).exp();
        sum += *w;
    }
    let inv = 1.0 / sum;
    for (j, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        let p = w * inv;
        for (o, &x) in out.iter_mut().zip(&keys.v[at(j)..][..hd]) {
            *o += p * x;
        }
    }
}

/// Eight partial sums, so the compiler can keep them in one vector register.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Attention in f64 straight from the definition, with KV heads repeated explicitly.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: &[f32],
        (b, h, kv, t, s, hd): (usize, usize, usize, usize, usize, usize),
        scale: f64,
        cap: Option<f64>,
    ) -> Vec<f64> {
        let groups = h / kv;
        let mut out = vec![0f64; b * t * h * hd];
        for bi in 0..b {
            for hi in 0..h {
                let kvh = hi / groups;
                for ti in 0..t {
                    let qr = &q[((bi * h + hi) * t + ti) * hd..][..hd];
                    let mut scores: Vec<f64> = (0..s)
                        .map(|j| {
                            let kr = &k[((bi * kv + kvh) * s + j) * hd..][..hd];
                            let mut z: f64 =
                                qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
                            z *= scale;
                            if let Some(c) = cap {
                                z = (z / c).tanh() * c;
                            }
                            z + bias[(bi * t + ti) * s + j] as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores
                        .iter_mut()
                        .map(|z| {
                            *z = (*z - max).exp();
                            *z
                        })
                        .sum();
                    for (j, p) in scores.iter().enumerate() {
                        let vr = &v[((bi * kv + kvh) * s + j) * hd..][..hd];
                        for d in 0..hd {
                            out[((bi * t + ti) * h + hi) * hd + d] += p / sum * vr[d] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn matches_a_float64_reference_with_grouped_heads_masks_and_a_soft_cap() {
        let mut rng = StdRng::seed_from_u64(11);
        let (b, h, kv, t, s, hd) = (2, 6, 2, 3, 7, 12);
        let q = random(&mut rng, b * h * t * hd);
        let k = random(&mut rng, b * kv * s * hd);
        let v = random(&mut rng, b * kv * s * hd);
        // Causal with the first two keys of sequence 1 masked as pads.
        let mut bias = vec![0f32; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..s {
                    if j > s - t + ti || (bi == 1 && j < 2) {
                        bias[(bi * t + ti) * s + j] = -1e30;
                    }
                }
            }
        }
        for cap in [None, Some(2.5f32)] {
            let keys = Keys {
                k: &k,
                v: &v,
                kv_heads: kv,
                head_dim: hd,
                stride: s,
                len: s,
            };
            let got = attend(
                &q,
                h,
                t,
                keys,
                &bias,
                Scoring {
                    scale: 0.3,
                    soft_cap: cap,
                },
            );
            let want = reference(
                &q,
                &k,
                &v,
                &bias,
                (b, h, kv, t, s, hd),
                0.3,
                cap.map(f64::from),
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "{i}: {g} vs {w} (cap {cap:?})"
                );
            }
        }
    }

    #[test]
    fn a_buffer_grown_step_by_step_holds_what_one_append_would() {
        let mut rng = StdRng::seed_from_u64(12);
        let (b, kv, hd) = (3, 2, 5);
        let steps = [4usize, 1, 1, 70, 1];
        let total: usize = steps.iter().sum();
        let k = random(&mut rng, b * kv * total * hd);
        let v = random(&mut rng, b * kv * total * hd);
        let slice = |x: &[f32], from: usize, t: usize| -> Vec<f32> {
            (0..b * kv)
                .flat_map(|row| {
                    x[(row * total + from) * hd..(row * total + from + t) * hd].to_vec()
                })
                .collect()
        };
        let mut buffer = KvBuffer::new(b, kv, hd);
        let mut from = 0;
        for t in steps {
            buffer.append(&slice(&k, from, t), &slice(&v, from, t), t);
            from += t;
        }
        assert_eq!(buffer.len(), total);
        let keys = buffer.keys();
        for row in 0..b * kv {
            for j in 0..total {
                let got = &keys.k[(row * keys.stride + j) * hd..][..hd];
                assert_eq!(got, &k[(row * total + j) * hd..][..hd]);
                let got = &keys.v[(row * keys.stride + j) * hd..][..hd];
                assert_eq!(got, &v[(row * total + j) * hd..][..hd]);
            }
        }
    }
}
