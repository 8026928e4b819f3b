//! How the adapter moved the selected features: pooled mean activation on each prompt set,
//! before and after.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{sae_for, ExplainError, Result};
use crate::features::{collect, Pooled, Selection};
use crate::model::load::ChatModel;
use crate::model::lora::Adapter;
use crate::model::Resid;
use crate::sae::Sae;

/// One selected feature's pooled mean activation before and after the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureShift {
    pub hook: Resid,
    pub index: usize,
    pub rank: usize,
    pub harmful_before: f64,
    pub harmful_after: f64,
    pub harmless_before: f64,
    pub harmless_after: f64,
    /// `harmful_before − harmless_before` (the selection's `diff` when the same prompts are used).
    pub diff_before: f64,
    /// `harmful_after − harmless_after`.
    pub diff_after: f64,
}

fn means(p: &Pooled, hook: Resid, set: &'static str, width: usize) -> Result<Vec<f64>> {
    let s = p
        .features
        .get(&hook)
        .ok_or(ExplainError::MissingPooled { hook, set })?;
    if s.width != width {
        return Err(ExplainError::Width {
            what: format!("{hook}: pooled {set} features"),
            expected: width,
            got: s.width,
        });
    }
    Ok(s.means())
}

/// The arithmetic: per selected feature, the means of the four pooled sets (as
/// `features::collect` returns them, pooled the same way).
pub fn activation_shift(
    base_harmful: &Pooled,
    base_harmless: &Pooled,
    aligned_harmful: &Pooled,
    aligned_harmless: &Pooled,
    selection: &Selection,
) -> Result<Vec<FeatureShift>> {
    let mut out = Vec::new();
    for layer in &selection.layers {
        let (hook, w) = (layer.hook, layer.d_sae);
        let hb = means(base_harmful, hook, "harmful (before)", w)?;
        let sb = means(base_harmless, hook, "harmless (before)", w)?;
        let ha = means(aligned_harmful, hook, "harmful (after)", w)?;
        let sa = means(aligned_harmless, hook, "harmless (after)", w)?;
        for f in &layer.features {
            if f.index >= w {
                return Err(ExplainError::FeatureIndex {
                    hook,
                    index: f.index,
                    width: w,
                });
            }
            let i = f.index;
            out.push(FeatureShift {
                hook,
                index: i,
                rank: f.rank,
                harmful_before: hb[i],
                harmful_after: ha[i],
                harmless_before: sb[i],
                harmless_after: sa[i],
                diff_before: hb[i] - sb[i],
                diff_after: ha[i] - sa[i],
            });
        }
    }
    Ok(out)
}

/// Collects the selected layers' features on both prompt sets with the base model, then with the
/// adapter in `adapter_dir` applied, and compares. Pooling is the selection's.
///
/// The adapter goes into a copy of the decoder (weights are shared, not copied); the model is
/// left as it came in, also when this fails.
#[allow(clippy::too_many_arguments)] // two prompt sets and a progress callback
pub fn activation_shift_with_adapter(
    model: &mut ChatModel,
    adapter_dir: &Path,
    saes: &[Sae],
    selection: &Selection,
    harmful: &[String],
    harmless: &[String],
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Vec<FeatureShift>> {
    let used: Vec<Sae> = selection
        .layers
        .iter()
        .map(|l| sae_for(saes, l).cloned())
        .collect::<Result<_>>()?;
    let pooling = selection.config.pooling;
    let adapter = Adapter::load(adapter_dir, model.decoder.device())?;
    let mut done = 0;
    let mut run = |model: &ChatModel| -> Result<(Pooled, Pooled)> {
        let h = collect(model, &used, harmful, pooling, batch_size, &mut |n| {
            on_batch(done + n)
        })?;
        done += harmful.len();
        let b = collect(model, &used, harmless, pooling, batch_size, &mut |n| {
            on_batch(done + n)
        })?;
        done += harmless.len();
        Ok((h, b))
    };
    let (base_h, base_b) = run(&*model)?;
    let base = model.decoder.clone();
    let aligned = adapter
        .apply(&mut model.decoder, adapter_dir)
        .map_err(ExplainError::from)
        .and_then(|()| run(&*model));
    model.decoder = base;
    let (al_h, al_b) = aligned?;
    activation_shift(&base_h, &base_b, &al_h, &al_b, selection)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::selection;
    use super::*;
    use crate::features::PooledSet;

    fn pooled(hook: Resid, width: usize, rows: &[&[f32]]) -> Pooled {
        let mut s = PooledSet::new(width);
        for r in rows {
            s.push(r, &vec![true; width]);
        }
        let mut p = Pooled::default();
        p.features.insert(hook, s);
        p
    }

    #[test]
    fn shift_is_the_difference_of_hand_computed_means() {
        let hook = Resid::In(3);
        // feature 2: harmful before mean(1, 3) = 2, after mean(0, 1) = 0.5;
        //            harmless before mean(0, 0) = 0, after mean(2, 4) = 3
        let hb = pooled(hook, 3, &[&[9.0, 0.0, 1.0], &[9.0, 0.0, 3.0]]);
        let sb = pooled(hook, 3, &[&[0.0, 5.0, 0.0], &[0.0, 7.0, 0.0]]);
        let ha = pooled(hook, 3, &[&[0.0, 0.0, 0.0], &[0.0, 0.0, 1.0]]);
        let sa = pooled(hook, 3, &[&[0.0, 1.0, 2.0], &[0.0, 1.0, 4.0]]);
        let sel = selection(hook, 3, &[2, 1]);
        let s = activation_shift(&hb, &sb, &ha, &sa, &sel).unwrap();
        assert_eq!(s.len(), 2);
        let f = &s[0];
        assert_eq!((f.index, f.rank), (2, 0));
        assert_eq!(
            (
                f.harmful_before,
                f.harmful_after,
                f.harmless_before,
                f.harmless_after
            ),
            (2.0, 0.5, 0.0, 3.0)
        );
        assert_eq!((f.diff_before, f.diff_after), (2.0, -2.5));
        // feature 1: harmful 0 → 0, harmless 6 → 1
        let f = &s[1];
        assert_eq!((f.diff_before, f.diff_after), (-6.0, -1.0));
    }

    #[test]
    fn missing_layers_and_widths_are_named() {
        let hook = Resid::In(3);
        let ok = pooled(hook, 3, &[&[0.0; 3], &[0.0; 3]]);
        let other = pooled(Resid::In(4), 3, &[&[0.0; 3]]);
        let narrow = pooled(hook, 2, &[&[0.0; 2]]);
        let sel = selection(hook, 3, &[0]);
        assert!(matches!(
            activation_shift(&ok, &ok, &other, &ok, &sel),
            Err(ExplainError::MissingPooled {
                set: "harmful (after)",
                ..
            })
        ));
        assert!(matches!(
            activation_shift(&ok, &narrow, &ok, &ok, &sel),
            Err(ExplainError::Width {
                expected: 3,
                got: 2,
                ..
            })
        ));
    }
}
