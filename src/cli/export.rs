//! `sails export`: the model with its adapter merged, as a Hugging Face directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::model_args::{DTypeArg, ModelArgs};

/// Write the model, with its adapter merged, as a Hugging Face directory.
///
/// The directory holds config.json, model.safetensors (Hugging Face tensor names; a GGUF's
/// quantised weights dequantised), tokenizer.json, tokenizer_config.json (with the chat template)
/// and generation_config.json: `transformers` loads it with AutoModelForCausalLM and
/// AutoTokenizer, and so does `sails --model DIR`. With --adapter the update is merged into the
/// weights (W + scale·alpha/r·B·A). Llama and Qwen2 models. The directory must not exist; it
/// appears only once every file is written.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Multiply the adapter's update by S before merging (default 1: as trained).
    #[arg(long, value_name = "S", value_parser = super::eval::parse_adapter_scale, requires = "adapter")]
    pub adapter_scale: Option<f64>,
    /// The new directory to write.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Precision of the written weights (f32 keeps the loaded weights exactly).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: DTypeArg,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut model = args
        .model
        .load_with_adapter_scale(args.adapter_scale.unwrap_or(1.0))?;
    let merged = sails::model::lora::merge_into(&mut model.decoder)?;
    let summary = sails::model::export::write_hf_dir(
        &model.decoder,
        Some(&model.tokenizer),
        args.precision.into(),
        &args.out,
    )
    .with_context(|| format!("exporting to {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{}: {} tensors, {} parameters ({}), {} adapted matrices merged; files: {}",
            summary.dir.display(),
            summary.tensors,
            summary.parameters,
            summary.dtype,
            merged,
            summary.files.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
