//! Where adapters go and how their factors start: walks the model's linear layers, matches the
//! targets, draws or builds `A` and `B`, and puts them into the LoRA slots.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{LoraConfig, LoraError, LoraInit, Provenance, Result, Trainable, PEFT_PREFIX};
use super::{READ_SIDE, WRITE_SIDE};
use crate::model::decoder::Decoder;
use crate::model::layers::LoraSlot;
use crate::model::lora::Adapter;

/// Which side of the residual stream a module touches, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Read,
    Write,
}

fn side_of(module: &str) -> Option<Side> {
    let last = module.rsplit('.').next().unwrap_or(module);
    if READ_SIDE.contains(&last) {
        Some(Side::Read)
    } else if WRITE_SIDE.contains(&last) {
        Some(Side::Write)
    } else {
        None
    }
}

/// `model.layers.12.self_attn.q_proj` → 12.
fn layer_of(module: &str) -> Option<usize> {
    let rest = module.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// The basis layer closest to `layer` (the lower one on a tie).
fn nearest(bases: &BTreeMap<usize, Tensor>, layer: usize) -> Option<usize> {
    bases
        .keys()
        .copied()
        .min_by_key(|&k| (k.abs_diff(layer), k))
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// Normal draws with standard deviation `std`, as f32.
fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    crate::linalg::standard_normals(rng, n)
        .into_iter()
        .map(|v| (v * std) as f32)
        .collect()
}

fn var_from(values: Vec<f32>, shape: (usize, usize), device: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
}

/// Adds LoRA slots (or, for [`LoraInit::Full`], trainable weights) to every targeted module.
///
/// Modules are visited in the model's order (layer, then q, k, v, o, gate, up, down), which is
/// also the order random factors are drawn from `StdRng::seed_from_u64(seed)`. Fails, naming the
/// target, when a target matches no module, and when a module already has an adapter.
pub fn inject(model: &mut Decoder, cfg: &LoraConfig, seed: u64) -> Result<Trainable> {
    if cfg.rank == 0 {
        return Err(LoraError::ZeroRank);
    }
    if model.dtype() != DType::F32 {
        return Err(LoraError::NotF32 {
            dtype: model.dtype(),
        });
    }
    let d_model = model.config.hidden_size;
    let num_layers = model.config.num_layers;
    let device = model.device().clone();
    let adapter_cfg = cfg.adapter_config(None);
    let (r, scale) = (cfg.rank, adapter_cfg.scale());

    let names: Vec<String> = model.linear_layers().into_iter().map(|(n, _)| n).collect();
    for target in &cfg.targets {
        let probe = crate::model::lora::AdapterConfig {
            target_modules: vec![target.clone()],
            ..adapter_cfg.clone()
        };
        if !names.iter().any(|n| probe.targets(n)) {
            return Err(LoraError::NoMatchingModule {
                target: target.clone(),
                example: names.first().cloned().unwrap_or_default(),
            });
        }
    }
    if let LoraInit::Subspace { bases, .. } = &cfg.init {
        if bases.is_empty() {
            return Err(LoraError::NoBasis);
        }
        for (&layer, u) in bases {
            if layer >= num_layers {
                return Err(LoraError::BasisLayer { layer, num_layers });
            }
            if u.dims() != [d_model, r] {
                return Err(LoraError::BasisShape {
                    layer,
                    got: u.dims().to_vec(),
                    d_model,
                    rank: r,
                });
            }
        }
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = BTreeMap::new();
    let mut frozen = BTreeMap::new();
    let mut basis_for_block = BTreeMap::new();
    let mut adapted = 0;
    for (name, linear) in model.linear_layers_mut() {
        if !adapter_cfg.targets(&name) {
            continue;
        }
        if linear.lora.is_some() {
            return Err(LoraError::AlreadyAdapted { module: name });
        }
        adapted += 1;
        let (inp, out) = (linear.in_features(), linear.out_features());
        if let LoraInit::Full = cfg.init {
            let var = Var::from_tensor(&linear.weight.to_dtype(DType::F32)?.copy()?)?;
            linear.set_weight(var.as_tensor().clone())?;
            vars.insert(format!("{name}.weight"), var);
            continue;
        }
        let key_a = format!("{PEFT_PREFIX}{name}.lora_A.weight");
        let key_b = format!("{PEFT_PREFIX}{name}.lora_B.weight");
        let (a, b): (Tensor, Tensor) = match &cfg.init {
            LoraInit::Kaiming | LoraInit::Gaussian => {
                let values = match cfg.init {
                    // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
                    LoraInit::Kaiming => uniform(&mut rng, r * inp, 1.0 / (inp as f64).sqrt()),
                    _ => normal(&mut rng, r * inp, 1.0 / r as f64),
                };
                let a = var_from(values, (r, inp), &device)?;
                let b = var_from(vec![0.0; out * r], (out, r), &device)?;
                vars.insert(key_a.clone(), a.clone());
                vars.insert(key_b.clone(), b.clone());
                (a.as_tensor().clone(), b.as_tensor().clone())
            }
            LoraInit::Subspace {
                bases,
                freeze_basis,
            } => {
                let layer = layer_of(&name).ok_or_else(|| LoraError::UnknownSide {
                    module: name.clone(),
                })?;
                let source = nearest(bases, layer).ok_or(LoraError::NoBasis)?;
                basis_for_block.insert(layer, source);
                let u = bases[&source].to_dtype(DType::F32)?.to_device(&device)?; // (d_model, r)
                let side = side_of(&name).ok_or_else(|| LoraError::UnknownSide {
                    module: name.clone(),
                })?;
                let (basis, zero, basis_is_a) = match side {
                    Side::Read => {
                        if inp != d_model {
                            return Err(LoraError::SideDim {
                                module: name,
                                side: "input",
                                got: inp,
                                d_model,
                            });
                        }
                        (
                            u.t()?.contiguous()?,
                            Tensor::zeros((out, r), DType::F32, &device)?,
                            true,
                        )
                    }
                    Side::Write => {
                        if out != d_model {
                            return Err(LoraError::SideDim {
                                module: name,
                                side: "output",
                                got: out,
                                d_model,
                            });
                        }
                        (
                            u.contiguous()?,
                            Tensor::zeros((r, inp), DType::F32, &device)?,
                            false,
                        )
                    }
                };
                let zero = Var::from_tensor(&zero)?;
                let (zero_key, basis_key) = if basis_is_a {
                    (key_b.clone(), key_a.clone())
                } else {
                    (key_a.clone(), key_b.clone())
                };
                vars.insert(zero_key, zero.clone());
                let basis = if *freeze_basis {
                    frozen.insert(basis_key, basis.clone());
                    basis
                } else {
                    let v = Var::from_tensor(&basis)?;
                    vars.insert(basis_key, v.clone());
                    v.as_tensor().clone()
                };
                let zero = zero.as_tensor().clone();
                if basis_is_a {
                    (basis, zero)
                } else {
                    (zero, basis)
                }
            }
            LoraInit::Full => unreachable!("handled above"),
        };
        linear.lora = Some(LoraSlot { a, b, scale });
    }
    let trainable_params = vars.values().map(|v: &Var| v.elem_count()).sum();
    let freeze_basis = match &cfg.init {
        LoraInit::Subspace { freeze_basis, .. } => Some(*freeze_basis),
        _ => None,
    };
    let provenance = Provenance {
        format_version: 1,
        init: cfg.init.name(),
        rank: cfg.rank,
        alpha: cfg.alpha,
        rslora: cfg.rslora,
        targets: cfg.targets.clone(),
        seed,
        freeze_basis,
        basis_for_block,
        read_side_basis: freeze_basis.map(|_| "as_is"),
        adapted_modules: adapted,
        trainable_params,
    };
    Ok(Trainable {
        vars,
        frozen,
        adapter: match cfg.init {
            LoraInit::Full => None,
            _ => Some(adapter_cfg),
        },
        provenance,
    })
}

/// Puts an existing adapter's factors into the model as training `Var`s (to continue training an
/// adapter, or to start from given values). Every module the adapter names must exist in the
/// model with matching shapes.
pub fn inject_adapter(model: &mut Decoder, adapter: &Adapter) -> Result<Trainable> {
    if model.dtype() != DType::F32 {
        return Err(LoraError::NotF32 {
            dtype: model.dtype(),
        });
    }
    let scale = adapter.config.scale();
    let mut vars = BTreeMap::new();
    let mut used = 0;
    for (name, linear) in model.linear_layers_mut() {
        let Some((a, b)) = adapter.weights.get(&name) else {
            continue;
        };
        if linear.lora.is_some() {
            return Err(LoraError::AlreadyAdapted { module: name });
        }
        let (r, inp, out) = (
            adapter.config.r,
            linear.in_features(),
            linear.out_features(),
        );
        if a.dims() != [r, inp] || b.dims() != [out, r] {
            return Err(LoraError::AdapterShape {
                module: name,
                a: a.dims().to_vec(),
                b: b.dims().to_vec(),
                expected_a: vec![r, inp],
                expected_b: vec![out, r],
            });
        }
        let a = Var::from_tensor(&a.to_dtype(DType::F32)?.copy()?)?;
        let b = Var::from_tensor(&b.to_dtype(DType::F32)?.copy()?)?;
        linear.lora = Some(LoraSlot {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
        });
        vars.insert(format!("{PEFT_PREFIX}{name}.lora_A.weight"), a);
        vars.insert(format!("{PEFT_PREFIX}{name}.lora_B.weight"), b);
        used += 1;
    }
    if used != adapter.weights.len() {
        let names: Vec<String> = model.linear_layers().into_iter().map(|(n, _)| n).collect();
        let missing = adapter
            .weights
            .keys()
            .find(|k| !names.contains(k))
            .cloned()
            .unwrap_or_default();
        return Err(LoraError::NoMatchingModule {
            target: missing,
            example: names.first().cloned().unwrap_or_default(),
        });
    }
    let trainable_params = vars.values().map(|v: &Var| v.elem_count()).sum();
    Ok(Trainable {
        vars,
        frozen: BTreeMap::new(),
        provenance: Provenance {
            format_version: 1,
            init: "adapter",
            rank: adapter.config.r,
            alpha: adapter.config.lora_alpha,
            rslora: adapter.config.use_rslora,
            targets: adapter.config.target_modules.clone(),
            seed: 0,
            freeze_basis: None,
            basis_for_block: BTreeMap::new(),
            read_side_basis: None,
            adapted_modules: used,
            trainable_params,
        },
        adapter: Some(adapter.config.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_basis_prefers_closest_then_lower() {
        let t = Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap();
        let bases: BTreeMap<usize, Tensor> = [(3, t.clone()), (9, t)].into_iter().collect();
        // |0-3| = 3 < |0-9|; 6 is 3 from both → the lower; 7 is 2 from 9.
        assert_eq!(nearest(&bases, 0), Some(3));
        assert_eq!(nearest(&bases, 6), Some(3));
        assert_eq!(nearest(&bases, 7), Some(9));
        assert_eq!(nearest(&bases, 29), Some(9));
    }

    #[test]
    fn sides_and_layers_from_names() {
        assert_eq!(side_of("model.layers.2.self_attn.q_proj"), Some(Side::Read));
        assert_eq!(side_of("model.layers.2.mlp.down_proj"), Some(Side::Write));
        assert_eq!(side_of("model.layers.2.mlp.other"), None);
        assert_eq!(layer_of("model.layers.17.mlp.up_proj"), Some(17));
    }

    #[test]
    fn normal_draws_have_the_asked_spread() {
        let mut rng = StdRng::seed_from_u64(1);
        let v = normal(&mut rng, 20_000, 0.25);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        // Standard error of the std estimate ≈ 0.25/√40000 ≈ 1.3e-3.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.006, "std {}", var.sqrt());
    }
}
