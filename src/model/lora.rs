//! LoRA adapters in PEFT's on-disk contract: `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_A.weight` (`(r, in)`) and `.lora_B.weight`
//! (`(out, r)`). Loading, saving and merging into the base weights.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::decoder::Decoder;
use super::layers::LoraSlot;
use super::weights::{load_safetensors_file, save_safetensors_atomic};
use super::ModelError;

/// The PEFT `adapter_config.json` fields that define the math. Other PEFT keys are accepted only
/// at their neutral values (see [`AdapterConfig::from_json`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// Module suffixes (`q_proj`) or full names the adapter targets.
    pub target_modules: Vec<String>,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parses PEFT's JSON, refusing settings that would change the math silently.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Adapter {
            path: path.to_path_buf(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let get_str = |k: &str| v.get(k).and_then(|x| x.as_str());
        if let Some(kind) = get_str("peft_type") {
            if kind != "LORA" {
                return Err(bad(format!("peft_type {kind:?} is not LORA")));
            }
        }
        let truthy = |k: &str| v.get(k).is_some_and(|x| x.as_bool() == Some(true));
        let non_empty = |k: &str| {
            v.get(k).is_some_and(|x| match x {
                serde_json::Value::Null => false,
                serde_json::Value::Object(m) => !m.is_empty(),
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Bool(b) => *b,
                _ => true,
            })
        };
        for key in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if truthy(key) {
                return Err(bad(format!("{key} = true is not supported")));
            }
        }
        for key in [
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "modules_to_save",
            "layer_replication",
            "trainable_token_indices",
            "target_parameters",
        ] {
            if non_empty(key) {
                return Err(bad(format!(
                    "{key} is set; only uniform adapters are supported"
                )));
            }
        }
        if let Some(bias) = get_str("bias") {
            if bias != "none" {
                return Err(bad(format!(
                    "bias {bias:?} is not supported (only \"none\")"
                )));
            }
        }
        let r = v
            .get("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("no integer \"r\"".into()))? as usize;
        if r == 0 {
            return Err(bad("r must be positive".into()));
        }
        let lora_alpha = v
            .get("lora_alpha")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| bad("no \"lora_alpha\"".into()))?;
        let target_modules = match v.get("target_modules") {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("target_modules holds a non-string".into()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(serde_json::Value::String(s)) => {
                return Err(bad(format!(
                    "target_modules as a regex ({s:?}) is not supported; list the modules"
                )))
            }
            _ => return Err(bad("no \"target_modules\" list".into())),
        };
        Ok(Self {
            r,
            lora_alpha,
            target_modules,
            lora_dropout: v
                .get("lora_dropout")
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0),
            use_rslora: truthy("use_rslora"),
            base_model_name_or_path: get_str("base_model_name_or_path").map(str::to_string),
        })
    }

    /// The JSON PEFT's `LoraConfig` loads unchanged.
    pub fn to_peft_json(&self) -> serde_json::Value {
        let mut targets = self.target_modules.clone();
        targets.sort();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets,
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "base_model_name_or_path": self.base_model_name_or_path,
        })
    }

    /// Whether a full module name (`model.layers.0.self_attn.q_proj`) is targeted: PEFT matches a
    /// listed name against the whole name or its last dotted components.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// An adapter in memory: config plus `(A, B)` per full module name.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub weights: HashMap<String, (Tensor, Tensor)>,
}

const KEY_PREFIX: &str = "base_model.model.";

impl Adapter {
    /// Reads a PEFT adapter directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config = AdapterConfig::from_json(&text, &cfg_path)?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            return Err(ModelError::MissingFile {
                path: st_path,
                what: "adapter weights",
            });
        }
        let tensors = load_safetensors_file(&st_path, device)?;
        let bad = |message: String| ModelError::Adapter {
            path: st_path.clone(),
            message,
        };
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, tensor) in tensors {
            let rest = key
                .strip_prefix(KEY_PREFIX)
                .ok_or_else(|| bad(format!("unexpected key {key:?}")))?;
            let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(bad(format!(
                    "unexpected key {key:?} (only lora_A/lora_B weights are supported)"
                )));
            };
            let entry = halves.entry(module.to_string()).or_default();
            let tensor = tensor.to_dtype(DType::F32)?;
            if slot == 0 {
                entry.0 = Some(tensor)
            } else {
                entry.1 = Some(tensor)
            }
        }
        let mut weights = HashMap::new();
        for (module, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    weights.insert(module, (a, b));
                }
                _ => return Err(bad(format!("{module}: lora_A or lora_B is missing"))),
            }
        }
        Ok(Self { config, weights })
    }

    /// Writes the PEFT layout atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors = HashMap::new();
        for (module, (a, b)) in &self.weights {
            tensors.insert(
                format!("{KEY_PREFIX}{module}.lora_A.weight"),
                a.contiguous()?,
            );
            tensors.insert(
                format!("{KEY_PREFIX}{module}.lora_B.weight"),
                b.contiguous()?,
            );
        }
        save_safetensors_atomic(&tensors, &dir.join("adapter_model.safetensors"))?;
        let json = serde_json::to_string_pretty(&self.config.to_peft_json())
            .map_err(|e| ModelError::Input(e.to_string()))?;
        crate::model::write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
    }

    /// Reads the slots currently on a model back out as an adapter.
    pub fn from_model(model: &Decoder, config: AdapterConfig) -> Self {
        let weights = model
            .linear_layers()
            .into_iter()
            .filter_map(|(name, lin)| {
                lin.lora
                    .as_ref()
                    .map(|s| (name, (s.a.clone(), s.b.clone())))
            })
            .collect();
        Self { config, weights }
    }

    /// Puts the adapter into the model's LoRA slots, as trained (see [`Adapter::apply_scaled`]).
    pub fn apply(&self, model: &mut Decoder, source: &Path) -> Result<(), ModelError> {
        self.apply_scaled(model, source, 1.0)
    }

    /// Puts the adapter into the model's LoRA slots with its update multiplied by
    /// `adapter_scale`: `ΔW = adapter_scale · (alpha / r) · B A`. 1 is the adapter as trained,
    /// 0 the base model (the slot adds exactly zero); values in between and above trace how the
    /// behaviour moves along the learned direction without retraining. Every adapter module must
    /// exist in the model with matching shapes, and every module the config targets must have
    /// weights.
    pub fn apply_scaled(
        &self,
        model: &mut Decoder,
        source: &Path,
        adapter_scale: f64,
    ) -> Result<(), ModelError> {
        let bad = |message: String| ModelError::Adapter {
            path: source.to_path_buf(),
            message,
        };
        check_adapter_scale(adapter_scale)?;
        let scale = self.config.scale() * adapter_scale;
        let dtype = model.dtype();
        let mut used = BTreeSet::new();
        for (name, linear) in model.linear_layers_mut() {
            let Some((a, b)) = self.weights.get(&name) else {
                if self.config.targets(&name) {
                    return Err(bad(format!("{name} is targeted but has no weights")));
                }
                continue;
            };
            let (r, inp, out) = (self.config.r, linear.in_features(), linear.out_features());
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                return Err(bad(format!(
                    "{name}: lora_A {:?} / lora_B {:?} do not fit the model's ({out}, {inp}) layer at rank {r}",
                    a.dims(),
                    b.dims()
                )));
            }
            linear.lora = Some(LoraSlot {
                a: a.to_dtype(dtype)?,
                b: b.to_dtype(dtype)?,
                scale,
            });
            used.insert(name);
        }
        let unknown: Vec<&String> = self.weights.keys().filter(|k| !used.contains(*k)).collect();
        if !unknown.is_empty() {
            return Err(bad(format!(
                "modules not in this model: {unknown:?} (an adapter for another model?)"
            )));
        }
        Ok(())
    }
}

/// An adapter scale must be finite and non-negative: a negative one would reverse the learned
/// update, which no evaluation here means to do.
pub fn check_adapter_scale(adapter_scale: f64) -> Result<(), ModelError> {
    if adapter_scale.is_finite() && adapter_scale >= 0.0 {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "adapter scale {adapter_scale} must be finite and >= 0 (1 = as trained, 0 = base model)"
        )))
    }
}

/// Folds every LoRA slot into its base weight (`W ← W + scale·B A`) and empties the slot.
pub fn merge_into(model: &mut Decoder) -> Result<usize, ModelError> {
    let mut merged = 0;
    for (_, linear) in model.linear_layers_mut() {
        if let Some(slot) = linear.lora.take() {
            let delta = slot.delta_weight()?.to_dtype(linear.weight.dtype())?;
            // Through `set_weight`: a decode copy of the old weight would silently drop the update.
            let merged_weight = (&linear.weight + delta)?;
            linear.set_weight(merged_weight)?;
            merged += 1;
        }
    }
    Ok(merged)
}

/// Removes every LoRA slot.
pub fn clear(model: &mut Decoder) {
    for (_, linear) in model.linear_layers_mut() {
        linear.lora = None;
    }
}
