//! Where a trained adapter put its update: per module, the share of `‖ΔW‖²_F` inside the subspace
//! and along each selected feature's decoder direction.
//!
//! `ΔW = scale · B · A` (`(out, in)`). Which side of `ΔW` faces the residual stream depends on the
//! module:
//! - a *read* module (q, k, v, gate, up) computes `ΔW · x` from the (normalised) residual `x`, so
//!   the residual-side factor is the input side: the update's energy in the subspace is
//!   `‖ΔW · P‖²_F / ‖ΔW‖²_F` with `P = U Uᵀ`, and along a unit direction `d` it is
//!   `‖ΔW · d‖² / ‖ΔW‖²_F` (how strongly the update reads `d`);
//! - a *write* module (o, down) adds `ΔW · x` to the residual, so the residual-side factor is the
//!   output side: `‖P · ΔW‖²_F / ‖ΔW‖²_F` and `‖dᵀ · ΔW‖² / ‖ΔW‖²_F` (how strongly it writes `d`).
//!
//! Block `l`'s modules are measured against the basis of the nearest basis layer (the lower one
//! on a tie), the same rule the LoRA init uses; the features against the nearest selected SAE
//! layer, by block input (`In(l)` → l, `Out(l)` → l + 1).
//!
//! Nothing of size `(out, in)` is formed: with `G = BᵀB` and `H = A Aᵀ` (both `r × r`),
//! `‖ΔW‖²_F = s² tr(G H)`, `‖ΔW X‖²_F = s² tr((AX)ᵀ G (AX))` and `‖Xᵀ ΔW‖²_F = s² tr((XᵀB) H (XᵀB)ᵀ)`.
//! For orthonormal feature directions the per-feature shares of one module sum to at most 1
//! (they are the energies in orthogonal one-dimensional subspaces); for overlapping directions
//! they need not.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::{ExplainError, FeatureDirections, Result};
use crate::lora::{READ_SIDE, WRITE_SIDE};
use crate::model::lora::Adapter;
use crate::model::Resid;
use crate::subspace::Subspace;

/// Which side of the residual stream a module's update faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// q, k, v, gate, up: the update reads the residual (input side).
    Read,
    /// o, down: the update writes into the residual (output side).
    Write,
}

/// One selected feature's share of a module's (or a layer's) update energy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureShare {
    pub index: usize,
    /// Rank of the feature in its layer's selection (0 = largest Δ).
    pub rank: usize,
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleAttribution {
    /// HF module name (`model.layers.3.self_attn.q_proj`).
    pub module: String,
    pub layer: usize,
    pub side: Side,
    /// `‖ΔW‖_F` with `ΔW = scale · B · A`.
    pub update_norm: f64,
    /// The block input whose basis measured this module (nearest basis layer); none without a
    /// subspace.
    pub basis_layer: Option<usize>,
    /// Share of `‖ΔW‖²_F` inside that basis' span, on the residual side; none without a subspace.
    pub share_in_subspace: Option<f64>,
    /// The SAE position whose features measured this module (nearest by block input).
    pub feature_hook: Option<Resid>,
    /// Share of `‖ΔW‖²_F` along each selected feature's unit decoder direction, in the
    /// selection's order; empty without features.
    pub per_feature: Vec<FeatureShare>,
}

/// A block's modules together: shares are energy-weighted (in-subspace energy over total).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerAttribution {
    pub layer: usize,
    pub modules: usize,
    /// `Σ ‖ΔW‖²_F` over the block's adapted modules.
    pub update_energy: f64,
    pub share_in_subspace: Option<f64>,
    /// The same, over the read-side modules only (none when the block has none).
    pub read_share_in_subspace: Option<f64>,
    /// The same, over the write-side modules only.
    pub write_share_in_subspace: Option<f64>,
    /// Energy-weighted per-feature shares over all the block's modules, descending, top 10.
    pub top_features: Vec<FeatureShare>,
}

/// `attribution` in `explain.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribution {
    pub rank: usize,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f64,
    /// Share of all modules' update energy inside the subspace (none without one).
    pub share_in_subspace: Option<f64>,
    /// Model order: layer, then q, k, v, o, gate, up, down.
    pub modules: Vec<ModuleAttribution>,
    pub layers: Vec<LayerAttribution>,
}

/// `model.layers.12.mlp.down_proj` → (12, Write, position in q…down order).
fn parse_module(module: &str) -> Result<(usize, Side, usize)> {
    let bad = |why: &str| ExplainError::Module {
        module: module.to_string(),
        why: why.to_string(),
    };
    let layer = module
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| bad("not inside a decoder block (model.layers.<l>.…)"))?;
    let last = module.rsplit('.').next().unwrap_or(module);
    const ORDER: [&str; 7] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let position = ORDER.iter().position(|p| *p == last).unwrap_or(ORDER.len());
    if READ_SIDE.contains(&last) {
        Ok((layer, Side::Read, position))
    } else if WRITE_SIDE.contains(&last) {
        Ok((layer, Side::Write, position))
    } else {
        Err(bad(
            "neither a read-side (q, k, v, gate, up) nor a write-side (o, down) projection",
        ))
    }
}

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

/// The low-rank pieces of `ΔW = s·B·A`.
struct Update {
    a: DMatrix<f64>, // (r, in)
    b: DMatrix<f64>, // (out, r)
    scale: f64,
    g: DMatrix<f64>, // BᵀB (r, r)
    h: DMatrix<f64>, // A Aᵀ (r, r)
}

impl Update {
    fn new(a: DMatrix<f64>, b: DMatrix<f64>, scale: f64) -> Self {
        let g = b.transpose() * &b;
        let h = &a * a.transpose();
        Update { a, b, scale, g, h }
    }

    /// `‖ΔW‖²_F = s² tr(G H)`.
    fn energy(&self) -> f64 {
        self.scale * self.scale * (&self.g * &self.h).trace()
    }

    /// Energy of `ΔW` along each column `x_j` of `x` on the residual side: read `‖ΔW x_j‖²`,
    /// write `‖x_jᵀ ΔW‖²`.
    fn energy_along(&self, side: Side, x: &DMatrix<f64>) -> Vec<f64> {
        let s2 = self.scale * self.scale;
        match side {
            Side::Read => {
                let y = &self.a * x; // (r, m)
                (0..y.ncols())
                    .map(|j| {
                        let c = y.column(j);
                        s2 * (c.transpose() * &self.g * c)[(0, 0)]
                    })
                    .collect()
            }
            Side::Write => {
                let z = self.b.transpose() * x; // (r, m)
                (0..z.ncols())
                    .map(|j| {
                        let c = z.column(j);
                        s2 * (c.transpose() * &self.h * c)[(0, 0)]
                    })
                    .collect()
            }
        }
    }
}

fn nearest<T>(map: &BTreeMap<usize, T>, layer: usize) -> Option<usize> {
    map.keys().copied().min_by_key(|&k| (k.abs_diff(layer), k))
}

fn share(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        part / total
    } else {
        0.0
    }
}

/// Attributes every module of `adapter`. `features` are the selected features' unit decoder
/// directions ([`super::feature_directions`]); pass none (and no subspace) for baselines that have
/// neither, and only `update_norm` is reported.
pub fn attribution(
    adapter: &Adapter,
    subspace: Option<&Subspace>,
    features: &[FeatureDirections],
) -> Result<Attribution> {
    let scale = adapter.config.scale();
    let r = adapter.config.r;
    let by_block: BTreeMap<usize, &FeatureDirections> = features
        .iter()
        .map(|f| (f.hook.block_input_index(), f))
        .collect();
    let mut names: Vec<(usize, usize, Side, &String)> = adapter
        .weights
        .keys()
        .map(|n| parse_module(n).map(|(l, side, pos)| (l, pos, side, n)))
        .collect::<Result<_>>()?;
    names.sort_by(|x, y| (x.0, x.1, x.3).cmp(&(y.0, y.1, y.3)));
    let mut modules = Vec::with_capacity(names.len());
    let mut energies = Vec::with_capacity(names.len());
    for (layer, _, side, name) in names {
        let (a, b) = &adapter.weights[name];
        let (a, b) = (to_matrix(a)?, to_matrix(b)?);
        if a.nrows() != r || b.ncols() != r {
            return Err(ExplainError::Module {
                module: name.clone(),
                why: format!(
                    "lora_A {:?} / lora_B {:?} do not have rank {r}",
                    a.shape(),
                    b.shape()
                ),
            });
        }
        let residual_dim = match side {
            Side::Read => a.ncols(),
            Side::Write => b.nrows(),
        };
        let upd = Update::new(a, b, scale);
        let energy = upd.energy();
        let (basis_layer, share_in_subspace) = match subspace {
            Some(s) => {
                let l = nearest(&s.bases, layer)
                    .ok_or_else(|| ExplainError::Config("the subspace holds no basis".into()))?;
                let u = &s.bases[&l];
                check_dim(name, side, u.nrows(), residual_dim)?;
                let inside: f64 = upd.energy_along(side, u).iter().sum();
                (Some(l), Some(share(inside, energy)))
            }
            None => (None, None),
        };
        let (feature_hook, per_feature) = match nearest(&by_block, layer) {
            Some(block) => {
                let f = by_block[&block];
                check_dim(name, side, f.directions.nrows(), residual_dim)?;
                let shares = upd
                    .energy_along(side, &f.directions)
                    .into_iter()
                    .zip(&f.indices)
                    .enumerate()
                    .map(|(rank, (e, &index))| FeatureShare {
                        index,
                        rank,
                        share: share(e, energy),
                    })
                    .collect();
                (Some(f.hook), shares)
            }
            None => (None, Vec::new()),
        };
        energies.push(energy);
        modules.push(ModuleAttribution {
            module: name.clone(),
            layer,
            side,
            update_norm: energy.sqrt(),
            basis_layer,
            share_in_subspace,
            feature_hook,
            per_feature,
        });
    }
    let layers = summarise(&modules, &energies);
    let total: f64 = energies.iter().sum();
    let share_in_subspace = subspace.map(|_| {
        let inside: f64 = modules
            .iter()
            .zip(&energies)
            .map(|(m, e)| m.share_in_subspace.unwrap_or(0.0) * e)
            .sum();
        share(inside, total)
    });
    Ok(Attribution {
        rank: r,
        scale,
        share_in_subspace,
        modules,
        layers,
    })
}

fn check_dim(module: &str, side: Side, basis: usize, residual: usize) -> Result<()> {
    if basis != residual {
        return Err(ExplainError::Width {
            what: format!(
                "{module}: the {} side of the update vs the basis/feature directions",
                match side {
                    Side::Read => "input",
                    Side::Write => "output",
                }
            ),
            expected: residual,
            got: basis,
        });
    }
    Ok(())
}

/// Per-block totals; shares weighted by each module's energy.
fn summarise(modules: &[ModuleAttribution], energies: &[f64]) -> Vec<LayerAttribution> {
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, m) in modules.iter().enumerate() {
        by_layer.entry(m.layer).or_default().push(i);
    }
    let weighted = |idx: &[usize], keep: &dyn Fn(Side) -> bool| -> Option<f64> {
        let chosen: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| keep(modules[i].side))
            .collect();
        if chosen.is_empty()
            || chosen
                .iter()
                .any(|&i| modules[i].share_in_subspace.is_none())
        {
            return None;
        }
        let total: f64 = chosen.iter().map(|&i| energies[i]).sum();
        let inside: f64 = chosen
            .iter()
            .map(|&i| energies[i] * modules[i].share_in_subspace.unwrap_or(0.0))
            .sum();
        Some(share(inside, total))
    };
    by_layer
        .into_iter()
        .map(|(layer, idx)| {
            let update_energy: f64 = idx.iter().map(|&i| energies[i]).sum();
            let mut features: BTreeMap<(usize, usize), f64> = BTreeMap::new();
            for &i in &idx {
                for f in &modules[i].per_feature {
                    *features.entry((f.rank, f.index)).or_default() += f.share * energies[i];
                }
            }
            let mut top_features: Vec<FeatureShare> = features
                .into_iter()
                .map(|((rank, index), e)| FeatureShare {
                    index,
                    rank,
                    share: share(e, update_energy),
                })
                .collect();
            top_features.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.rank.cmp(&b.rank)));
            top_features.truncate(10);
            LayerAttribution {
                layer,
                modules: idx.len(),
                update_energy,
                share_in_subspace: weighted(&idx, &|_| true),
                read_share_in_subspace: weighted(&idx, &|s| s == Side::Read),
                write_share_in_subspace: weighted(&idx, &|s| s == Side::Write),
                top_features,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::model::lora::AdapterConfig;
    use crate::subspace::{SubspaceConfig, SubspaceSummary};

    fn tensor(m: &DMatrix<f64>) -> Tensor {
        let v: Vec<f32> = m.transpose().iter().map(|&x| x as f32).collect(); // row-major
        Tensor::from_vec(v, (m.nrows(), m.ncols()), &Device::Cpu).unwrap()
    }

    fn random(rng: &mut StdRng, rows: usize, cols: usize) -> DMatrix<f64> {
        let v = crate::linalg::standard_normals(rng, rows * cols);
        DMatrix::from_row_slice(rows, cols, &v)
    }

    fn adapter(r: usize, alpha: f64, modules: Vec<(&str, DMatrix<f64>, DMatrix<f64>)>) -> Adapter {
        let config = AdapterConfig {
            r,
            lora_alpha: alpha,
            target_modules: vec!["q_proj".into(), "o_proj".into()],
            lora_dropout: 0.0,
            use_rslora: false,
            base_model_name_or_path: None,
        };
        let weights: HashMap<String, (Tensor, Tensor)> = modules
            .into_iter()
            .map(|(n, a, b)| (n.to_string(), (tensor(&a), tensor(&b))))
            .collect();
        Adapter { config, weights }
    }

    /// `U` = the first `k` coordinate axes of R^d; its complement is the rest.
    fn axes(d: usize, from: usize, k: usize) -> DMatrix<f64> {
        DMatrix::from_fn(d, k, |i, j| if i == from + j { 1.0 } else { 0.0 })
    }

    fn subspace(bases: BTreeMap<usize, DMatrix<f64>>, d_model: usize) -> Subspace {
        Subspace {
            summary: SubspaceSummary {
                format_version: 1,
                config: SubspaceConfig::default(),
                d_model,
                features_sha256: None,
                norm_weight_folded: false,
                layers: Vec::new(),
            },
            bases,
        }
    }

    #[test]
    fn an_update_built_inside_the_subspace_has_share_one_and_orthogonal_has_zero() {
        let (d, r, out_q, in_o) = (12, 3, 5, 7);
        let mut rng = StdRng::seed_from_u64(1);
        // a random rotation, so the subspace is not axis-aligned
        let q = random(&mut rng, d, d).qr().q();
        let u = q.columns(0, 4).into_owned(); // (d, 4)
        let v = q.columns(4, 4).into_owned(); // ⟂ U
        let c = random(&mut rng, r, 4);
        // read: A = C Uᵀ (rows in span U) → ΔW P = ΔW; write: B = U Cᵀ
        let inside = adapter(
            r,
            6.0,
            vec![
                (
                    "model.layers.0.self_attn.q_proj",
                    &c * u.transpose(),
                    random(&mut rng, out_q, r),
                ),
                (
                    "model.layers.0.self_attn.o_proj",
                    random(&mut rng, r, in_o),
                    &u * c.transpose(),
                ),
            ],
        );
        let outside = adapter(
            r,
            6.0,
            vec![
                (
                    "model.layers.0.self_attn.q_proj",
                    &c * v.transpose(),
                    random(&mut rng, out_q, r),
                ),
                (
                    "model.layers.0.self_attn.o_proj",
                    random(&mut rng, r, in_o),
                    &v * c.transpose(),
                ),
            ],
        );
        let s = subspace(BTreeMap::from([(0, u.clone())]), d);
        let att = attribution(&inside, Some(&s), &[]).unwrap();
        for m in &att.modules {
            assert!((m.share_in_subspace.unwrap() - 1.0).abs() < 1e-9, "{m:?}");
        }
        assert!((att.layers[0].share_in_subspace.unwrap() - 1.0).abs() < 1e-9);
        assert!((att.share_in_subspace.unwrap() - 1.0).abs() < 1e-9);
        let att = attribution(&outside, Some(&s), &[]).unwrap();
        for m in &att.modules {
            assert!(m.share_in_subspace.unwrap().abs() < 1e-9, "{m:?}");
        }
        // the side matters: a read module whose *output* side lies in U is not "inside"
        let mixed = adapter(
            r,
            6.0,
            vec![(
                "model.layers.0.self_attn.q_proj",
                &c * v.transpose(),
                &u * c.transpose(),
            )],
        );
        let att = attribution(&mixed, Some(&subspace(BTreeMap::from([(0, u)]), d)), &[]);
        assert!(att.unwrap().modules[0].share_in_subspace.unwrap().abs() < 1e-9);
    }

    #[test]
    fn update_norm_is_the_frobenius_norm_of_scaled_b_a() {
        let mut rng = StdRng::seed_from_u64(2);
        let (a, b) = (random(&mut rng, 2, 6), random(&mut rng, 4, 2));
        // alpha 8, r 2 → scale 4
        let want = (&b * &a * 4.0).norm();
        let att = attribution(
            &adapter(2, 8.0, vec![("model.layers.3.mlp.up_proj", a, b)]),
            None,
            &[],
        )
        .unwrap();
        let m = &att.modules[0];
        assert!(
            (m.update_norm - want).abs() < 1e-5 * want,
            "{} vs {want}",
            m.update_norm
        );
        assert_eq!((m.layer, m.side, att.scale), (3, Side::Read, 4.0));
        assert!(m.share_in_subspace.is_none() && m.per_feature.is_empty());
        assert_eq!(att.share_in_subspace, None);
    }

    #[test]
    fn per_feature_shares_match_a_planted_update() {
        // read side, d_model 4, r 2, scale 2 (alpha 4):
        // A = [[3,0,0,0],[0,4,0,0]], B = [[1,0],[0,1],[0,0]] → ΔW = 2·[[3,0,0,0],[0,4,0,0],[0]*4]
        // ‖ΔW‖² = 4·25 = 100; ΔW e0 = (6,0,0) → 36/100; ΔW e1 → 64/100; ΔW e2 = 0;
        // d = (e0+e1)/√2 → ΔW d = (6,8,0)/√2, ‖·‖² = 50 → 0.5.
        let a = DMatrix::from_row_slice(2, 4, &[3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0]);
        let b = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let dirs = DMatrix::from_column_slice(
            4,
            4,
            &[
                1.0, 0.0, 0.0, 0.0, //
                0.0, 1.0, 0.0, 0.0, //
                0.0, 0.0, 1.0, 0.0, //
                h, h, 0.0, 0.0,
            ],
        );
        let features = FeatureDirections {
            hook: Resid::In(1),
            indices: vec![10, 11, 12, 13],
            directions: dirs,
        };
        let read = adapter(
            2,
            4.0,
            vec![("model.layers.0.self_attn.k_proj", a.clone(), b.clone())],
        );
        let att = attribution(&read, None, std::slice::from_ref(&features)).unwrap();
        let m = &att.modules[0];
        assert_eq!(m.feature_hook, Some(Resid::In(1)));
        assert!((m.update_norm - 10.0).abs() < 1e-9);
        let got: Vec<f64> = m.per_feature.iter().map(|f| f.share).collect();
        for (g, w) in got.iter().zip([0.36, 0.64, 0.0, 0.5]) {
            assert!((g - w).abs() < 1e-9, "{got:?}");
        }
        assert_eq!(m.per_feature[3].index, 13);
        // orthonormal directions (the first three) sum to ≤ 1 (here exactly 1: ΔW's row space
        // is span(e0, e1))
        assert!((got[..3].iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // write side: ΔW' = (s·B·A)ᵀ-shaped update with B' = Aᵀ (4, 2), A' = Bᵀ (2, 3) writes
        // the same directions with the same shares
        let write = adapter(
            2,
            4.0,
            vec![("model.layers.0.mlp.down_proj", b.transpose(), a.transpose())],
        );
        let att = attribution(&write, None, &[features]).unwrap();
        let got: Vec<f64> = att.modules[0].per_feature.iter().map(|f| f.share).collect();
        for (g, w) in got.iter().zip([0.36, 0.64, 0.0, 0.5]) {
            assert!((g - w).abs() < 1e-9, "{got:?}");
        }
        let top = &att.layers[0].top_features;
        assert_eq!((top[0].index, top[1].index), (11, 13));
    }

    #[test]
    fn random_updates_share_at_most_one_over_orthonormal_features() {
        let mut rng = StdRng::seed_from_u64(3);
        let d = 10;
        let q = random(&mut rng, d, d).qr().q();
        let features = FeatureDirections {
            hook: Resid::Out(4),
            indices: (0..6).collect(),
            directions: q.columns(0, 6).into_owned(),
        };
        let ad = adapter(
            3,
            3.0,
            vec![
                (
                    "model.layers.5.self_attn.v_proj",
                    random(&mut rng, 3, d),
                    random(&mut rng, 4, 3),
                ),
                (
                    "model.layers.5.mlp.down_proj",
                    random(&mut rng, 3, 8),
                    random(&mut rng, d, 3),
                ),
            ],
        );
        let att = attribution(&ad, None, &[features]).unwrap();
        for m in &att.modules {
            let sum: f64 = m.per_feature.iter().map(|f| f.share).sum();
            // six of ten orthonormal directions: strictly inside (0, 1) for a generic update
            assert!(sum > 0.05 && sum < 1.0, "{}: {sum}", m.module);
            assert_eq!(m.feature_hook, Some(Resid::Out(4)));
        }
    }

    #[test]
    fn modules_follow_the_nearest_basis_and_bad_names_are_errors() {
        let d = 4;
        let bases = BTreeMap::from([(2, axes(d, 0, 1)), (6, axes(d, 1, 1))]);
        // layer 4 ties between 2 and 6 → 2; layer 5 → 6
        let a = DMatrix::from_row_slice(1, d, &[1.0, 0.0, 0.0, 0.0]);
        let b = DMatrix::from_row_slice(2, 1, &[1.0, 1.0]);
        let ad = adapter(
            1,
            1.0,
            vec![
                ("model.layers.4.self_attn.q_proj", a.clone(), b.clone()),
                ("model.layers.5.self_attn.q_proj", a.clone(), b.clone()),
            ],
        );
        let att = attribution(&ad, Some(&subspace(bases, d)), &[]).unwrap();
        let got: Vec<(usize, Option<usize>, Option<f64>)> = att
            .modules
            .iter()
            .map(|m| (m.layer, m.basis_layer, m.share_in_subspace))
            .collect();
        assert_eq!(got, vec![(4, Some(2), Some(1.0)), (5, Some(6), Some(0.0))]);
        let bad = adapter(1, 1.0, vec![("lm_head", a.clone(), b.clone())]);
        assert!(matches!(
            attribution(&bad, None, &[]),
            Err(ExplainError::Module { .. })
        ));
        let wrong_dim = subspace(BTreeMap::from([(0, axes(5, 0, 1))]), 5);
        assert!(matches!(
            attribution(&ad, Some(&wrong_dim), &[]),
            Err(ExplainError::Width {
                expected: 4,
                got: 5,
                ..
            })
        ));
    }
}
