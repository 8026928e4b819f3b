//! sae — sparse autoencoders on the residual stream: formats, encode/decode, training, evaluation.
//!
//! One [`Sae`] type serves every architecture: the decoder is written once
//! (`x̂ = f·W_dec + b_dec`), the encoder differs only in its activation
//! ([`Architecture`]). Dimensions come from the tensors and are checked against the config.
//!
//! * [`format`] — Gemma Scope `params.npz`, SAELens `cfg.json` + `sae_weights.safetensors`.
//! * [`train`] — TopK training on activations (Adam, aux-k loss, checkpoint/resume).
//! * [`metrics`] — L0, explained variance, cosine, dead/dense fractions, CE loss recovered.

pub mod corpus;
pub mod eval;
mod fast;
pub mod format;
pub mod metrics;
mod sparse;
pub mod store;
pub mod train;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::Resid;

#[derive(Debug, Error)]
pub enum SaeError {
    // --- files ---
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot read tensors: {source}")]
    TensorFile {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: missing tensor `{name}` (found: {found:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        found: Vec<String>,
    },
    #[error("{path}: unexpected tensor `{name}` (expected exactly {expected:?})")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        expected: Vec<String>,
    },
    // --- config ---
    #[error("{path}: unknown SAE architecture `{got}` (supported: {supported:?})")]
    UnknownArchitecture {
        path: PathBuf,
        got: String,
        supported: &'static [&'static str],
    },
    #[error("{path}: config key `{key}`: {message}")]
    BadConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("normalize_activations `{got}` is not supported (supported: {supported:?})")]
    UnsupportedNormalization {
        got: String,
        supported: &'static [&'static str],
    },
    #[error("hook `{got}` is not a residual-stream hook (expected blocks.L.hook_resid_pre or blocks.L.hook_resid_post)")]
    UnsupportedHook { got: String },
    // --- shapes ---
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("config says {what} = {config} but the tensors say {tensors}")]
    WidthMismatch {
        what: &'static str,
        config: usize,
        tensors: usize,
    },
    #[error("{arch}: k = {k} must be in 1..=d_sae ({d_sae})")]
    BadK {
        arch: &'static str,
        k: usize,
        d_sae: usize,
    },
    #[error("{arch} SAE {what} a `threshold` tensor")]
    Threshold {
        arch: &'static str,
        what: &'static str,
    },
    #[error("input to encode has shape {got:?}, expected (n, {d_in})")]
    InputShape { got: Vec<usize>, d_in: usize },
    // --- against a model ---
    #[error("SAE d_in {sae} differs from the model's d_model {model}")]
    DModelMismatch { sae: usize, model: usize },
    #[error("SAE hook {hook} is out of range for a model with {n_layers} layers")]
    HookOutOfRange { hook: Resid, n_layers: usize },
    // --- training ---
    #[error("training config: {0}")]
    TrainConfig(String),
    #[error("activation source: {0}")]
    Source(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("a training parameter `{name}` received no gradient")]
    NoGradient { name: String },
    // --- metrics ---
    #[error("{metric}: {message}")]
    Metric {
        metric: &'static str,
        message: String,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SaeError>;

/// The encoder's activation. Serialised with SAELens' spelling in an `architecture` key, which
/// is exactly how `cfg.json` dispatches (the compiler is the registry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", deny_unknown_fields)]
pub enum Architecture {
    /// `f = relu(pre)` (SAELens "standard").
    #[serde(rename = "standard")]
    Relu,
    /// `f = relu(pre) · [pre > threshold]` (Gemma Scope; SAELens "jumprelu").
    #[serde(rename = "jumprelu")]
    JumpRelu,
    /// Keep the `k` largest pre-activations of each input, then ReLU (SAELens "topk").
    #[serde(rename = "topk")]
    TopK {
        k: usize,
        /// Multiply `pre` by each latent's decoder-row norm before top-k, divide `f` by it
        /// before decoding. SAELens files written before this key existed did not rescale,
        /// so absent means false, as in SAELens.
        #[serde(default)]
        rescale_acts_by_decoder_norm: bool,
    },
    /// Keep the `n·k` largest ReLU'd pre-activations over a whole batch of `n` inputs.
    /// Batch-dependent by design (Bussmann et al., 2024); SAELens converts these to JumpReLU for
    /// inference, this type keeps the batch rule.
    #[serde(rename = "batchtopk")]
    BatchTopK { k: usize },
}

impl Architecture {
    /// The `architecture` strings this crate reads.
    pub const SUPPORTED: &'static [&'static str] = &["standard", "jumprelu", "topk", "batchtopk"];

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Relu => "standard",
            Architecture::JumpRelu => "jumprelu",
            Architecture::TopK { .. } => "topk",
            Architecture::BatchTopK { .. } => "batchtopk",
        }
    }
}

/// SAELens' `normalize_activations`, restricted to the values whose inference-time meaning is
/// the identity on the input (anything else is rejected when loading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalization {
    /// No normalisation.
    #[serde(rename = "none")]
    None,
    /// Training scaled inputs by one constant so that E‖x‖² = d_in and folded that constant into
    /// the saved weights: at inference the SAE takes raw activations (SAELens applies no
    /// run-time function for this value either). This crate's trainer writes this value.
    #[serde(rename = "expected_average_only_in")]
    ExpectedAverageOnlyIn,
}

impl Normalization {
    pub const SUPPORTED: &'static [&'static str] = &["none", "expected_average_only_in"];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Normalization::None),
            "expected_average_only_in" => Ok(Normalization::ExpectedAverageOnlyIn),
            other => Err(SaeError::UnsupportedNormalization {
                got: other.to_string(),
                supported: Self::SUPPORTED,
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Normalization::None => "none",
            Normalization::ExpectedAverageOnlyIn => "expected_average_only_in",
        }
    }
}

/// Resolved SAE configuration (no Options that secretly mean a default).
#[derive(Debug, Clone, PartialEq)]
pub struct SaeConfig {
    pub architecture: Architecture,
    pub d_in: usize,
    pub d_sae: usize,
    /// The residual-stream position the SAE reads.
    pub hook: Resid,
    /// Subtract `b_dec` from the input before encoding (SAELens' own SAEs: true; Gemma Scope: false).
    pub apply_b_dec_to_input: bool,
    pub normalize_activations: Normalization,
    /// Informational `metadata` entries from a SAELens cfg.json other than the hook
    /// (model_name, prepend_bos, …): kept verbatim and written back on save; never read.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Parse a TransformerLens residual hook name: `blocks.L.hook_resid_post` → `Resid::Out(L)`,
/// `blocks.L.hook_resid_pre` → `Resid::In(L)`.
pub fn parse_hook(name: &str) -> Result<Resid> {
    let bad = || SaeError::UnsupportedHook {
        got: name.to_string(),
    };
    let rest = name.strip_prefix("blocks.").ok_or_else(bad)?;
    let (layer, point) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    match point {
        "hook_resid_post" => Ok(Resid::Out(layer)),
        "hook_resid_pre" => Ok(Resid::In(layer)),
        _ => Err(bad()),
    }
}

/// The TransformerLens hook name of a residual position (inverse of [`parse_hook`]).
pub fn hook_name(hook: Resid) -> String {
    match hook {
        Resid::Out(l) => format!("blocks.{l}.hook_resid_post"),
        Resid::In(l) => format!("blocks.{l}.hook_resid_pre"),
    }
}

/// A sparse autoencoder on one residual position. Weights are f32.
#[derive(Debug, Clone)]
pub struct Sae {
    pub cfg: SaeConfig,
    /// (d_in, d_sae)
    pub w_enc: Tensor,
    /// (d_sae)
    pub b_enc: Tensor,
    /// (d_sae, d_in)
    pub w_dec: Tensor,
    /// (d_in)
    pub b_dec: Tensor,
    /// (d_sae), JumpReLU only.
    pub threshold: Option<Tensor>,
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(SaeError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

impl Sae {
    /// Build an SAE, converting weights to f32 and checking every shape: `d_in`/`d_sae` are read
    /// from `W_enc` and must equal the config's (the error names both).
    pub fn new(
        cfg: SaeConfig,
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
        threshold: Option<Tensor>,
    ) -> Result<Self> {
        let (d_in, d_sae) = match w_enc.dims() {
            [a, b] => (*a, *b),
            got => {
                return Err(SaeError::ShapeMismatch {
                    name: "W_enc".into(),
                    expected: vec![cfg.d_in, cfg.d_sae],
                    got: got.to_vec(),
                })
            }
        };
        if d_in != cfg.d_in {
            return Err(SaeError::WidthMismatch {
                what: "d_in",
                config: cfg.d_in,
                tensors: d_in,
            });
        }
        if d_sae != cfg.d_sae {
            return Err(SaeError::WidthMismatch {
                what: "d_sae",
                config: cfg.d_sae,
                tensors: d_sae,
            });
        }
        check_shape("b_enc", &b_enc, &[d_sae])?;
        check_shape("W_dec", &w_dec, &[d_sae, d_in])?;
        check_shape("b_dec", &b_dec, &[d_in])?;
        match (&cfg.architecture, &threshold) {
            (Architecture::JumpRelu, None) => {
                return Err(SaeError::Threshold {
                    arch: "jumprelu",
                    what: "needs",
                })
            }
            (Architecture::JumpRelu, Some(t)) => check_shape("threshold", t, &[d_sae])?,
            (arch, Some(_)) => {
                return Err(SaeError::Threshold {
                    arch: arch.name(),
                    what: "takes no",
                })
            }
            _ => {}
        }
        match cfg.architecture {
            Architecture::TopK { k, .. } | Architecture::BatchTopK { k } if k == 0 || k > d_sae => {
                return Err(SaeError::BadK {
                    arch: cfg.architecture.name(),
                    k,
                    d_sae,
                })
            }
            _ => {}
        }
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        Ok(Sae {
            cfg,
            w_enc: f32(w_enc)?,
            b_enc: f32(b_enc)?,
            w_dec: f32(w_dec)?,
            b_dec: f32(b_dec)?,
            threshold: threshold.map(f32).transpose()?,
        })
    }

    pub fn d_in(&self) -> usize {
        self.cfg.d_in
    }

    pub fn d_sae(&self) -> usize {
        self.cfg.d_sae
    }

    /// The residual position this SAE reads.
    pub fn hook(&self) -> Resid {
        self.cfg.hook
    }

    pub fn device(&self) -> &Device {
        self.w_enc.device()
    }

    /// Move every weight to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Sae {
            cfg: self.cfg.clone(),
            w_enc: self.w_enc.to_device(device)?,
            b_enc: self.b_enc.to_device(device)?,
            w_dec: self.w_dec.to_device(device)?,
            b_dec: self.b_dec.to_device(device)?,
            threshold: self
                .threshold
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
        })
    }

    /// Decoder-row norms ‖W_dec[i]‖, (d_sae).
    pub fn decoder_norms(&self) -> Result<Tensor> {
        Ok(self.w_dec.sqr()?.sum(D::Minus1)?.sqrt()?)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, d] if *d == self.cfg.d_in => Ok(()),
            got => Err(SaeError::InputShape {
                got: got.to_vec(),
                d_in: self.cfg.d_in,
            }),
        }
    }

    /// Pre-activations, (n, d_in) → (n, d_sae): `(x − b_dec·apply_b_dec_to_input)·W_enc + b_enc`,
    /// times the decoder norms for TopK with `rescale_acts_by_decoder_norm`.
    pub fn pre_activations(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let x = x.to_dtype(DType::F32)?;
        let sae_in = if self.cfg.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x
        };
        let pre = sae_in.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)?; // (n, d_sae)
        match self.cfg.architecture {
            Architecture::TopK {
                rescale_acts_by_decoder_norm: true,
                ..
            } => Ok(pre.broadcast_mul(&self.decoder_norms()?)?),
            _ => Ok(pre),
        }
    }

    /// Feature activations `f`, (n, d_in) → (n, d_sae).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let pre = self.pre_activations(x)?;
        activate(&self.cfg.architecture, &pre, self.threshold.as_ref())
    }

    /// Reconstruction `x̂ = f·W_dec + b_dec`, (n, d_sae) → (n, d_in). The one decoder for every
    /// architecture (TopK with decoder-norm rescaling divides `f` by the norms first).
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let f = match self.cfg.architecture {
            Architecture::TopK {
                rescale_acts_by_decoder_norm: true,
                ..
            } => f.broadcast_div(&self.decoder_norms()?)?,
            _ => f.clone(),
        };
        Ok(f.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?)
    }

    /// `decode(encode(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.decode(&self.encode(x)?)
    }

    /// Check this SAE fits a model with hidden size `d_model` and `n_layers` blocks.
    pub fn check_against_model(&self, d_model: usize, n_layers: usize) -> Result<()> {
        if self.cfg.d_in != d_model {
            return Err(SaeError::DModelMismatch {
                sae: self.cfg.d_in,
                model: d_model,
            });
        }
        let layer = match self.cfg.hook {
            Resid::In(l) | Resid::Out(l) => l,
        };
        if layer >= n_layers {
            return Err(SaeError::HookOutOfRange {
                hook: self.cfg.hook,
                n_layers,
            });
        }
        Ok(())
    }
}

/// The activation of `arch` applied to pre-activations `pre` (n, d_sae). Differentiable in
/// `pre`: the selection masks are computed without gradient and multiplied in, so the selected
/// entries keep their gradient.
pub(crate) fn activate(
    arch: &Architecture,
    pre: &Tensor,
    threshold: Option<&Tensor>,
) -> Result<Tensor> {
    match arch {
        Architecture::Relu => Ok(pre.relu()?),
        Architecture::JumpRelu => {
            let threshold = threshold.ok_or(SaeError::Threshold {
                arch: "jumprelu",
                what: "needs",
            })?;
            let mask = pre.broadcast_gt(threshold)?.to_dtype(pre.dtype())?;
            Ok((pre.relu()? * mask)?)
        }
        Architecture::TopK { k, .. } => {
            let mask = topk_mask(pre, *k, None)?;
            Ok((pre.relu()? * mask)?)
        }
        Architecture::BatchTopK { k } => {
            let mask = batch_topk_mask(pre, *k)?;
            Ok((pre.relu()? * mask)?)
        }
    }
}

/// Order for selecting the largest values: larger first, NaN last, ties by lower index, so the
/// selection is deterministic.
fn larger_first(vals: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    let (va, vb) = (vals[a as usize], vals[b as usize]);
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    key(vb).total_cmp(&key(va)).then(a.cmp(&b))
}

/// 0/1 mask (n, d) marking, per row, the `k` largest entries of `pre` (no gradient). With
/// `allowed`, only latents where `allowed[j]` are candidates and `k` is capped at their count.
/// Computed on the host; returned on `pre`'s device in `pre`'s dtype.
pub(crate) fn topk_mask(pre: &Tensor, k: usize, allowed: Option<&[bool]>) -> Result<Tensor> {
    let (n, d) = pre.dims2()?;
    let vals: Vec<f32> = pre
        .detach()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let candidates: Vec<u32> = match allowed {
        Some(a) => (0..d as u32).filter(|&j| a[j as usize]).collect(),
        None => (0..d as u32).collect(),
    };
    let k = k.min(candidates.len());
    let mut mask = vec![0f32; n * d];
    if k > 0 {
        mask.par_chunks_mut(d)
            .zip(vals.par_chunks(d))
            .for_each_init(
                || candidates.clone(),
                |idx, (m, row)| {
                    idx.copy_from_slice(&candidates);
                    if k < idx.len() {
                        idx.select_nth_unstable_by(k - 1, |&a, &b| larger_first(row, a, b));
                    }
                    for &j in &idx[..k] {
                        m[j as usize] = 1.0;
                    }
                },
            );
    }
    Ok(Tensor::from_vec(mask, (n, d), pre.device())?.to_dtype(pre.dtype())?)
}

/// 0/1 mask (n, d) marking the `n·k` largest entries of `relu(pre)` over the whole batch.
pub(crate) fn batch_topk_mask(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (n, d) = pre.dims2()?;
    let vals: Vec<f32> = pre
        .detach()
        .relu()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let total = (n * k).min(n * d);
    let mut idx: Vec<u32> = (0..(n * d) as u32).collect();
    if total > 0 && total < idx.len() {
        idx.select_nth_unstable_by(total - 1, |&a, &b| larger_first(&vals, a, b));
    }
    let mut mask = vec![0f32; n * d];
    for &j in &idx[..total] {
        mask[j as usize] = 1.0;
    }
    Ok(Tensor::from_vec(mask, (n, d), pre.device())?.to_dtype(pre.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_map_to_resid_positions() {
        assert_eq!(
            parse_hook("blocks.7.hook_resid_post").unwrap(),
            Resid::Out(7)
        );
        assert_eq!(parse_hook("blocks.0.hook_resid_pre").unwrap(), Resid::In(0));
        assert_eq!(hook_name(Resid::Out(3)), "blocks.3.hook_resid_post");
        assert!(matches!(
            parse_hook("blocks.3.hook_mlp_out"),
            Err(SaeError::UnsupportedHook { .. })
        ));
        assert!(parse_hook("blocks.x.hook_resid_post").is_err());
    }

    #[test]
    fn topk_mask_keeps_k_largest_per_row_and_respects_allowed() {
        let pre = Tensor::new(
            &[[0.5f32, 3.0, -1.0, 2.0], [4.0, 1.0, 1.5, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let m: Vec<Vec<f32>> = topk_mask(&pre, 2, None).unwrap().to_vec2().unwrap();
        assert_eq!(m, vec![vec![0., 1., 0., 1.], vec![1., 0., 1., 0.]]);
        // only latents 0 and 2 allowed; k = 3 is capped at 2 candidates
        let m: Vec<Vec<f32>> = topk_mask(&pre, 3, Some(&[true, false, true, false]))
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(m, vec![vec![1., 0., 1., 0.], vec![1., 0., 1., 0.]]);
    }

    fn tiny(arch: Architecture, w_dec: &[[f32; 2]; 2]) -> Sae {
        let dev = &Device::Cpu;
        let cfg = SaeConfig {
            architecture: arch,
            d_in: 2,
            d_sae: 2,
            hook: Resid::In(0),
            apply_b_dec_to_input: false,
            normalize_activations: Normalization::None,
            metadata: Default::default(),
        };
        let eye = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], dev).unwrap();
        let zeros = Tensor::zeros(2, DType::F32, dev).unwrap();
        let w_dec = Tensor::new(w_dec, dev).unwrap();
        Sae::new(cfg, eye, zeros.clone(), w_dec, zeros, None).unwrap()
    }

    #[test]
    fn topk_decoder_norm_rescaling_changes_selection_and_decode() {
        // W_enc = I, W_dec rows (2,0) and (0,1): norms 2 and 1. x = (1, 1.5) → pre = (1, 1.5).
        let x = Tensor::new(&[[1f32, 1.5]], &Device::Cpu).unwrap();
        let w_dec = [[2f32, 0.0], [0.0, 1.0]];
        // plain top-1 keeps latent 1 (1.5): x̂ = 1.5·(0,1) = (0, 1.5)
        let plain = tiny(
            Architecture::TopK {
                k: 1,
                rescale_acts_by_decoder_norm: false,
            },
            &w_dec,
        );
        assert_eq!(
            plain.encode(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.5]]
        );
        assert_eq!(
            plain.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.5]]
        );
        // rescaled pre = (1·2, 1.5·1) = (2, 1.5): keeps latent 0 with f = 2;
        // decode divides by the norm: (2/2)·(2,0) = (2, 0)
        let rescaled = tiny(
            Architecture::TopK {
                k: 1,
                rescale_acts_by_decoder_norm: true,
            },
            &w_dec,
        );
        assert_eq!(
            rescaled.encode(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2.0, 0.0]]
        );
        assert_eq!(
            rescaled.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2.0, 0.0]]
        );
        // ReLU: f = relu(pre); x = (1, −1.5) → f = (1, 0) → x̂ = (2, 0)
        let relu = tiny(Architecture::Relu, &w_dec);
        let x = Tensor::new(&[[1f32, -1.5]], &Device::Cpu).unwrap();
        assert_eq!(
            relu.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2.0, 0.0]]
        );
    }

    #[test]
    fn new_rejects_a_threshold_on_topk_and_bad_k() {
        let dev = &Device::Cpu;
        let cfg = |arch| SaeConfig {
            architecture: arch,
            d_in: 2,
            d_sae: 3,
            hook: Resid::In(0),
            apply_b_dec_to_input: true,
            normalize_activations: Normalization::None,
            metadata: Default::default(),
        };
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, dev).unwrap();
        let make = |arch, th: Option<Tensor>| {
            Sae::new(cfg(arch), z(&[2, 3]), z(&[3]), z(&[3, 2]), z(&[2]), th)
        };
        let topk = Architecture::TopK {
            k: 2,
            rescale_acts_by_decoder_norm: false,
        };
        assert!(matches!(
            make(topk, Some(z(&[3]))),
            Err(SaeError::Threshold { .. })
        ));
        assert!(matches!(
            make(Architecture::JumpRelu, None),
            Err(SaeError::Threshold { .. })
        ));
        assert!(matches!(
            make(Architecture::BatchTopK { k: 4 }, None),
            Err(SaeError::BadK { k: 4, .. })
        ));
        let err = Sae::new(
            cfg(Architecture::Relu),
            z(&[2, 3]),
            z(&[3]),
            z(&[3, 3]),
            z(&[2]),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, SaeError::ShapeMismatch { ref name, .. } if name == "W_dec"),
            "{err}"
        );
    }

    #[test]
    fn batch_topk_selects_over_the_batch() {
        // n = 2, k = 1 → the 2 largest of the whole batch: 4.0 and 3.0 (both in different rows here)
        let pre = Tensor::new(&[[0.5f32, 3.0, -1.0], [4.0, 2.5, 0.0]], &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = batch_topk_mask(&pre, 1).unwrap().to_vec2().unwrap();
        assert_eq!(m, vec![vec![0., 1., 0.], vec![1., 0., 0.]]);
        let pre = Tensor::new(&[[5.0f32, 3.0, -1.0], [0.1, 0.2, 0.0]], &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = batch_topk_mask(&pre, 1).unwrap().to_vec2().unwrap();
        assert_eq!(m, vec![vec![1., 1., 0.], vec![0., 0., 0.]]);
    }
}
