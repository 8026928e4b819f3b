//! Activation store: residual-stream activations of a model over a corpus, cached on disk as
//! safetensors shards with a manifest, and read back in shuffled order for SAE training.
//!
//! A store directory holds `manifest.json` and `shard-NNNNNN.safetensors` files, each with one
//! (n, d_model) tensor per layer named by its hook (`blocks.L.hook_resid_pre` for `Resid::In(L)`),
//! rows in corpus order. Shards are written atomically and the manifest after them, so the
//! manifest is the commit point: an interrupted collection resumes from the first sequence whose
//! activations are not in a listed shard. Memory stays bounded by one shard plus one batch,
//! whatever the token budget. The manifest records the model hash, the corpus hash, the layers
//! and the collection config; resuming with any of them changed is an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::train::ActivationSource;
use super::{hook_name, Result, SaeError};
use crate::model::decoder::{Decoder, Forward, Logits};
use crate::model::Resid;

pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;

/// One tokenised sequence and which of its positions are stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Same length as `ids`; false for positions left out (BOS, special tokens by default).
    pub keep: Vec<bool>,
}

/// Which positions are left out of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclude {
    /// The BOS token (its residual is huge and content-free: an attention sink).
    pub bos: bool,
    /// Every other special token (chat-template markers such as `<|im_start|>`).
    pub special: bool,
}

impl Default for Exclude {
    fn default() -> Self {
        Exclude {
            bos: true,
            special: true,
        }
    }
}

impl Sequence {
    /// Keep mask from token classes: `bos` is the BOS id, `is_special` says which ids are special.
    pub fn new(
        ids: Vec<u32>,
        bos: Option<u32>,
        is_special: impl Fn(u32) -> bool,
        exclude: Exclude,
    ) -> Self {
        let keep = ids
            .iter()
            .map(|&id| {
                let is_bos = Some(id) == bos;
                !((exclude.bos && is_bos) || (exclude.special && !is_bos && is_special(id)))
            })
            .collect();
        Sequence { ids, keep }
    }
}

/// Stored value precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreDType {
    F32,
    /// Half the disk; relative error ≈ 4e-3 per value, far below SAE reconstruction error.
    Bf16,
}

impl StoreDType {
    fn dtype(self) -> DType {
        match self {
            StoreDType::F32 => DType::F32,
            StoreDType::Bf16 => DType::BF16,
        }
    }
}

/// Collection settings. All land in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Residual positions to capture (the forward stops after the deepest).
    pub layers: Vec<Resid>,
    /// Stored tokens per shard (a shard closes at the first batch boundary past this).
    pub shard_tokens: usize,
    /// Padded tokens per forward batch (sequences × longest length).
    pub batch_tokens: usize,
    /// Sequences are cut to this many tokens.
    pub max_seq_len: usize,
    /// Stop after this many stored tokens (the last shard is cut to it).
    pub token_budget: u64,
    pub dtype: StoreDType,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            layers: vec![Resid::In(6), Resid::In(12), Resid::In(18), Resid::In(24)],
            shard_tokens: 16_384,
            // 4096-token batches ran at ~0.6x the per-token speed of 1024 on a 2-core CPU: their
            // buffers are freshly mapped on every op (5x the page faults)
            batch_tokens: 1024,
            max_seq_len: 512,
            token_budget: 1_000_000,
            dtype: StoreDType::Bf16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreManifest {
    pub format_version: u32,
    /// Identifies the weights (e.g. sha256 of the model file).
    pub model_hash: String,
    /// [`corpus_hash`] of the sequences (ids and keep masks).
    pub corpus_hash: String,
    pub config: StoreConfig,
    /// Hook names of `config.layers`, the tensor names in every shard.
    pub hooks: Vec<String>,
    pub d_model: usize,
    /// Sequences whose kept activations are all in the listed shards.
    pub sequences_done: usize,
    pub sequences_total: usize,
    pub tokens: u64,
    pub shards: Vec<ShardEntry>,
    /// True once the corpus or the budget is exhausted.
    pub complete: bool,
    /// Forward time spent so far, over all (resumed) calls.
    pub collect_seconds: f64,
    /// tokens / collect_seconds (stored tokens; the forward also runs excluded positions).
    pub tokens_per_s: f64,
}

impl StoreManifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|e| SaeError::Io {
            path: path.clone(),
            source: e,
        })?;
        serde_json::from_slice(&text).map_err(|e| SaeError::Json { path, source: e })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| SaeError::Json {
            path: path.clone(),
            source: e,
        })?;
        super::format::write_bytes_atomic(&json, &path)
    }
}

/// sha256 over the sequences' ids and keep masks (lengths included, so boundaries count).
pub fn corpus_hash(seqs: &[Sequence]) -> String {
    let mut h = Sha256::new();
    h.update((seqs.len() as u64).to_le_bytes());
    for s in seqs {
        h.update((s.ids.len() as u64).to_le_bytes());
        for &id in &s.ids {
            h.update(id.to_le_bytes());
        }
        h.update(s.keep.iter().map(|&k| k as u8).collect::<Vec<u8>>());
    }
    hex::encode(h.finalize())
}

/// sha256 of a file, streamed (for the model hash).
pub fn file_hash(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |e| SaeError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn check_sequences(seqs: &[Sequence]) -> Result<()> {
    for (i, s) in seqs.iter().enumerate() {
        if s.ids.len() != s.keep.len() {
            return Err(SaeError::Source(format!(
                "sequence {i}: {} ids but {} keep flags",
                s.ids.len(),
                s.keep.len()
            )));
        }
    }
    Ok(())
}

/// Collect activations of `corpus` into `dir`, resuming a partial store there. Returns the
/// final manifest. `stop_after_shards` (for tests and time-boxed runs) stops after writing that
/// many new shards, leaving a resumable store.
pub fn collect(
    decoder: &Decoder,
    corpus: &[Sequence],
    model_hash: &str,
    cfg: &StoreConfig,
    dir: &Path,
    stop_after_shards: Option<usize>,
) -> Result<StoreManifest> {
    check_sequences(corpus)?;
    if cfg.layers.is_empty() || cfg.shard_tokens == 0 || cfg.batch_tokens == 0 {
        return Err(SaeError::Source(
            "store config needs layers and positive shard_tokens and batch_tokens".into(),
        ));
    }
    let n_layers = decoder.config.num_layers;
    for &l in &cfg.layers {
        let idx = match l {
            Resid::In(i) | Resid::Out(i) => i,
        };
        if idx >= n_layers {
            return Err(SaeError::HookOutOfRange { hook: l, n_layers });
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| SaeError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let hash = corpus_hash(corpus);
    let d_model = decoder.config.hidden_size;
    let hooks: Vec<String> = cfg.layers.iter().map(|&l| hook_name(l)).collect();
    let mut man = if dir.join(MANIFEST_FILE).exists() {
        let m = StoreManifest::load(dir)?;
        let differ = |what: &str, a: &str, b: &str| SaeError::Checkpoint {
            path: dir.join(MANIFEST_FILE),
            message: format!("store was collected with {what} {a}, now {b}"),
        };
        if m.format_version != FORMAT_VERSION {
            return Err(differ(
                "format_version",
                &m.format_version.to_string(),
                &FORMAT_VERSION.to_string(),
            ));
        }
        if m.model_hash != model_hash {
            return Err(differ("model", &m.model_hash, model_hash));
        }
        if m.corpus_hash != hash {
            return Err(differ("corpus", &m.corpus_hash, &hash));
        }
        // the budget may change between calls (a store grows); everything else must match
        let same_but_budget = StoreConfig {
            token_budget: cfg.token_budget,
            ..m.config.clone()
        };
        if &same_but_budget != cfg || m.tokens > cfg.token_budget {
            return Err(differ(
                "config",
                &format!("{:?}", m.config),
                &format!("{cfg:?} (move the store away to collect it again)"),
            ));
        }
        let mut m = m;
        if m.config.token_budget != cfg.token_budget {
            // a larger budget reopens a store that stopped at its old budget
            m.complete = m.complete && m.sequences_done == corpus.len();
            m.config.token_budget = cfg.token_budget;
        }
        m
    } else {
        StoreManifest {
            format_version: FORMAT_VERSION,
            model_hash: model_hash.to_string(),
            corpus_hash: hash,
            config: cfg.clone(),
            hooks: hooks.clone(),
            d_model,
            sequences_done: 0,
            sequences_total: corpus.len(),
            tokens: 0,
            shards: Vec::new(),
            complete: false,
            collect_seconds: 0.0,
            tokens_per_s: 0.0,
        }
    };
    if man.complete {
        return Ok(man);
    }

    let started = Instant::now();
    let base_seconds = man.collect_seconds;
    let mut next = man.sequences_done;
    let mut new_shards = 0usize;
    while next < corpus.len() && cfg.token_budget > man.tokens {
        let plan = plan_shard(corpus, cfg, next, man.tokens);
        if plan.kept == 0 {
            // only empty sequences were left
            next = plan.end;
            break;
        }
        let take = plan
            .kept
            .min(cfg.token_budget.saturating_sub(man.tokens) as usize);
        let rows = shard_rows(decoder, &corpus[next..plan.end], cfg, plan.kept)?;
        next = plan.end;
        let file = format!("shard-{:06}.safetensors", man.shards.len());
        let mut tensors = HashMap::new();
        for (mut layer_rows, h) in rows.into_iter().zip(&hooks) {
            // cut to the budget
            layer_rows.truncate(take * d_model);
            let t = Tensor::from_vec(layer_rows, (take, d_model), &Device::Cpu)?
                .to_dtype(cfg.dtype.dtype())?;
            tensors.insert(h.clone(), t);
        }
        super::format::write_safetensors_atomic(&tensors, &dir.join(&file))?;
        man.shards.push(ShardEntry { file, tokens: take });
        man.tokens += take as u64;
        man.sequences_done = next;
        man.complete = plan.last;
        man.collect_seconds = base_seconds + started.elapsed().as_secs_f64();
        man.tokens_per_s = man.tokens as f64 / man.collect_seconds.max(1e-9);
        man.save(dir)?;
        new_shards += 1;
        tracing::info!(
            shards = man.shards.len(),
            tokens = man.tokens,
            tokens_per_s = format!("{:.0}", man.tokens_per_s),
            "activation shard written"
        );
        if stop_after_shards.is_some_and(|s| new_shards >= s) && !plan.last {
            return Ok(man);
        }
    }
    if !man.complete {
        man.complete = true;
        man.sequences_done = next;
        man.collect_seconds = base_seconds + started.elapsed().as_secs_f64();
        man.save(dir)?;
    }
    Ok(man)
}

/// The sequences of the next shard, `start..end`, and their kept tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ShardPlan {
    end: usize,
    kept: usize,
    /// The corpus or the budget ends with this shard.
    last: bool,
}

/// Tokens a sequence contributes to a forward pass (cut to `max_seq_len`).
fn forward_len(s: &Sequence, cfg: &StoreConfig) -> usize {
    s.ids.len().min(cfg.max_seq_len)
}

fn kept_tokens(s: &Sequence, cfg: &StoreConfig) -> usize {
    s.keep[..forward_len(s, cfg)].iter().filter(|&&k| k).count()
}

/// How many of `lens` (in order) go into one padded batch: as many as fit `batch_tokens` as
/// count × longest, at least one.
fn batch_count(lens: impl Iterator<Item = usize>, batch_tokens: usize) -> usize {
    let mut longest = 0usize;
    let mut count = 0usize;
    for len in lens {
        let l = longest.max(len);
        if count > 0 && l * (count + 1) > batch_tokens {
            break;
        }
        longest = l;
        count += 1;
    }
    count
}

/// Where the shard starting at sequence `start` ends, given `stored` tokens already stored.
/// The boundaries are those of batching the corpus in its own order: a shard closes at the
/// first such batch boundary past `shard_tokens`, at the end of the corpus or at the budget.
/// Stores collected when batches followed corpus order have the same boundaries, so they
/// resume correctly.
fn plan_shard(corpus: &[Sequence], cfg: &StoreConfig, start: usize, stored: u64) -> ShardPlan {
    let mut end = start;
    let mut kept = 0usize;
    loop {
        let lens = corpus[end..].iter().map(|s| forward_len(s, cfg));
        let count = batch_count(lens, cfg.batch_tokens);
        kept += corpus[end..end + count]
            .iter()
            .map(|s| kept_tokens(s, cfg))
            .sum::<usize>();
        end += count;
        let last = end == corpus.len() || stored + kept as u64 >= cfg.token_budget;
        if kept >= cfg.shard_tokens || last {
            return ShardPlan { end, kept, last };
        }
    }
}

/// Kept activations of `seqs` (one shard's sequences, `kept` tokens in all), per layer as
/// row-major f32 rows in corpus order. The forward batches take the sequences sorted by length,
/// so that a batch pads little (in corpus order, padding more than doubled the tokens run on the
/// default corpus); a sequence's activations do not depend on its batch beyond float rounding.
fn shard_rows(
    decoder: &Decoder,
    seqs: &[Sequence],
    cfg: &StoreConfig,
    kept: usize,
) -> Result<Vec<Vec<f32>>> {
    let d_model = decoder.config.hidden_size;
    let device = decoder.device().clone();
    // first stored row of each sequence
    let mut offsets = Vec::with_capacity(seqs.len());
    let mut total = 0usize;
    for s in seqs {
        offsets.push(total);
        total += kept_tokens(s, cfg);
    }
    debug_assert_eq!(total, kept);
    let mut rows: Vec<Vec<f32>> = vec![vec![0f32; kept * d_model]; cfg.layers.len()];
    // stable sort: ties keep corpus order, so the batches are deterministic
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| forward_len(&seqs[i], cfg));
    let mut from = 0usize;
    while from < order.len() {
        let lens = order[from..].iter().map(|&i| forward_len(&seqs[i], cfg));
        let count = batch_count(lens, cfg.batch_tokens);
        let batch = &order[from..from + count];
        from += count;
        let longest = batch
            .iter()
            .map(|&i| forward_len(&seqs[i], cfg))
            .max()
            .unwrap_or(0);
        if longest == 0 {
            continue;
        }
        let b = batch.len();
        let mut ids = vec![0u32; b * longest];
        let mut mask = vec![0u32; b * longest];
        for (r, &i) in batch.iter().enumerate() {
            let len = forward_len(&seqs[i], cfg);
            let pad = longest - len;
            ids[r * longest + pad..(r + 1) * longest].copy_from_slice(&seqs[i].ids[..len]);
            mask[r * longest + pad..(r + 1) * longest].fill(1);
        }
        let ids = Tensor::from_vec(ids, (b, longest), &device)?;
        let mask_t = Tensor::from_vec(mask, (b, longest), &device)?;
        let out = decoder
            .forward(
                Forward {
                    input_ids: &ids,
                    attention_mask: Some(&mask_t),
                    logits: Logits::None,
                    capture: &cfg.layers,
                    edit: None,
                },
                None,
            )
            .map_err(|e| SaeError::Source(format!("model forward: {e}")))?;
        for (li, l) in cfg.layers.iter().enumerate() {
            let t = out
                .captured
                .get(l)
                .ok_or_else(|| SaeError::Source(format!("the forward did not capture {l}")))?;
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (r, &i) in batch.iter().enumerate() {
                let s = &seqs[i];
                let len = forward_len(s, cfg);
                let pad = longest - len;
                let kept_positions = (0..len).filter(|&p| s.keep[p]);
                for (at, p) in (offsets[i]..).zip(kept_positions) {
                    let src = (r * longest + pad + p) * d_model;
                    rows[li][at * d_model..(at + 1) * d_model]
                        .copy_from_slice(&values[src..src + d_model]);
                }
            }
        }
    }
    Ok(rows)
}

/// Read all rows of one layer from one shard as f32 (n, d).
pub fn read_shard(dir: &Path, shard: &ShardEntry, hook: Resid) -> Result<Tensor> {
    let path = dir.join(&shard.file);
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| SaeError::TensorFile {
            path: path.clone(),
            source: e,
        })?;
    let name = hook_name(hook);
    let t = tensors.get(&name).ok_or_else(|| SaeError::MissingTensor {
        path: path.clone(),
        name: name.clone(),
        found: tensors.keys().cloned().collect(),
    })?;
    if t.dims()[0] != shard.tokens {
        return Err(SaeError::ShapeMismatch {
            name,
            expected: vec![shard.tokens],
            got: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Shuffled reads of one layer over a store: each epoch visits the shards in a seeded order,
/// `window` shards at a time; the rows of a window are shuffled together. Memory: `window` shards.
pub struct ShardedActivations {
    dir: PathBuf,
    hook: Resid,
    d_in: usize,
    shards: Vec<ShardEntry>,
    window: usize,
    seed: u64,
    epoch: u64,
    group: usize,
    position: usize,
    /// current window's rows, shuffled (n, d) f32 on the host
    rows: Vec<f32>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ShardedState {
    seed: u64,
    shards: usize,
    window: usize,
    epoch: u64,
    group: usize,
    position: usize,
}

impl ShardedActivations {
    /// Open `dir` for `hook`; `holdout_shards` last shards are left out (kept for evaluation).
    pub fn open(
        dir: &Path,
        hook: Resid,
        seed: u64,
        window: usize,
        holdout_shards: usize,
    ) -> Result<Self> {
        let man = StoreManifest::load(dir)?;
        let name = hook_name(hook);
        if !man.hooks.contains(&name) {
            return Err(SaeError::Source(format!(
                "{}: no activations for {hook} (store has {:?})",
                dir.display(),
                man.hooks
            )));
        }
        let keep = man.shards.len().saturating_sub(holdout_shards);
        let shards: Vec<ShardEntry> = man.shards[..keep]
            .iter()
            .filter(|s| s.tokens > 0)
            .cloned()
            .collect();
        if shards.is_empty() {
            return Err(SaeError::Source(format!(
                "{}: no shards to train on ({} in the store, {holdout_shards} held out)",
                dir.display(),
                man.shards.len()
            )));
        }
        let mut s = ShardedActivations {
            dir: dir.to_path_buf(),
            hook,
            d_in: man.d_model,
            shards,
            window: window.max(1),
            seed,
            epoch: 0,
            group: 0,
            position: 0,
            rows: Vec::new(),
        };
        s.load_group()?;
        Ok(s)
    }

    /// Tokens available for training.
    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tokens as u64).sum()
    }

    fn rng(&self, salt: u64) -> StdRng {
        StdRng::seed_from_u64(
            self.seed
                ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }

    fn groups(&self) -> usize {
        self.shards.len().div_ceil(self.window)
    }

    fn load_group(&mut self) -> Result<()> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.shuffle(&mut self.rng(0));
        let members =
            &order[self.group * self.window..((self.group + 1) * self.window).min(order.len())];
        let mut data: Vec<f32> = Vec::new();
        for &i in members {
            let t = read_shard(&self.dir, &self.shards[i], self.hook)?;
            data.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        let d = self.d_in;
        let n = data.len() / d;
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(&mut self.rng(1 + self.group as u64));
        let mut rows = vec![0f32; n * d];
        for (dst, &src) in rows.chunks_mut(d).zip(&perm) {
            dst.copy_from_slice(&data[src as usize * d..(src as usize + 1) * d]);
        }
        self.rows = rows;
        Ok(())
    }
}

impl ActivationSource for ShardedActivations {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn hook(&self) -> Resid {
        self.hook
    }

    fn next_batch(&mut self, n: usize) -> Result<Tensor> {
        let d = self.d_in;
        let mut out = Vec::with_capacity(n * d);
        while out.len() < n * d {
            let have = self.rows.len() / d;
            if self.position == have {
                self.group += 1;
                if self.group == self.groups() {
                    self.group = 0;
                    self.epoch += 1;
                }
                self.position = 0;
                self.load_group()?;
                continue;
            }
            let take = (n - out.len() / d).min(have - self.position);
            out.extend_from_slice(&self.rows[self.position * d..(self.position + take) * d]);
            self.position += take;
        }
        Ok(Tensor::from_vec(out, (n, d), &Device::Cpu)?)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(ShardedState {
            seed: self.seed,
            shards: self.shards.len(),
            window: self.window,
            epoch: self.epoch,
            group: self.group,
            position: self.position,
        })
        .expect("ShardedState serialises: plain integers")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: ShardedState = serde_json::from_value(state.clone())
            .map_err(|e| SaeError::Source(format!("bad sharded source state: {e}")))?;
        if s.seed != self.seed
            || s.shards != self.shards.len()
            || s.window != self.window
            || s.group >= self.groups()
        {
            return Err(SaeError::Source(format!(
                "state {s:?} does not fit this source (seed {}, {} shards, window {})",
                self.seed,
                self.shards.len(),
                self.window
            )));
        }
        self.epoch = s.epoch;
        self.group = s.group;
        self.load_group()?;
        if s.position > self.rows.len() / self.d_in {
            return Err(SaeError::Source(format!(
                "state position {} past the window's {} rows",
                s.position,
                self.rows.len() / self.d_in
            )));
        }
        self.position = s.position;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn seq(len: usize, rng: &mut StdRng) -> Sequence {
        Sequence {
            ids: vec![7; len],
            keep: (0..len).map(|_| rng.random_bool(0.9)).collect(),
        }
    }

    /// Shard boundaries as collection drew them when it ran batches in corpus order: per batch,
    /// add its kept tokens and close a shard at the first boundary past `shard_tokens`.
    fn corpus_order_shards(
        corpus: &[Sequence],
        cfg: &StoreConfig,
        mut next: usize,
        mut stored: u64,
    ) -> Vec<(usize, usize, bool)> {
        let mut shards = Vec::new();
        let mut buf = 0usize;
        while next < corpus.len() && cfg.token_budget > stored + buf as u64 {
            let mut end = next;
            let mut longest = 0usize;
            while end < corpus.len() {
                let l = longest.max(forward_len(&corpus[end], cfg));
                if end > next && l * (end - next + 1) > cfg.batch_tokens {
                    break;
                }
                longest = l;
                end += 1;
            }
            buf += corpus[next..end]
                .iter()
                .map(|s| kept_tokens(s, cfg))
                .sum::<usize>();
            next = end;
            let last = next == corpus.len() || stored + buf as u64 >= cfg.token_budget;
            if buf >= cfg.shard_tokens || (last && buf > 0) {
                shards.push((next, buf, last));
                stored += buf.min((cfg.token_budget - stored) as usize) as u64;
                buf = 0;
            }
        }
        shards
    }

    #[test]
    fn shards_end_where_corpus_order_batching_ended_them() {
        let mut rng = StdRng::seed_from_u64(3);
        for case in 0..200 {
            let n = rng.random_range(1..60);
            let corpus: Vec<Sequence> = (0..n)
                .map(|_| {
                    let len = if rng.random_bool(0.05) {
                        0
                    } else {
                        rng.random_range(1..90)
                    };
                    seq(len, &mut rng)
                })
                .collect();
            let cfg = StoreConfig {
                shard_tokens: rng.random_range(1..200),
                batch_tokens: rng.random_range(1..300),
                max_seq_len: rng.random_range(1..80),
                token_budget: rng.random_range(1..2000),
                ..StoreConfig::default()
            };
            let want = corpus_order_shards(&corpus, &cfg, 0, 0);
            let mut got = Vec::new();
            let (mut next, mut stored) = (0usize, 0u64);
            while next < corpus.len() && cfg.token_budget > stored {
                let plan = plan_shard(&corpus, &cfg, next, stored);
                next = plan.end;
                if plan.kept == 0 {
                    break;
                }
                got.push((plan.end, plan.kept, plan.last));
                stored += plan.kept.min((cfg.token_budget - stored) as usize) as u64;
            }
            assert_eq!(got, want, "case {case}: {cfg:?}");
        }
    }
}
