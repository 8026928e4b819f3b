//! `sails export`: the model with its adapter merged, as a Hugging Face directory or a GGUF file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};
use sails::model::export::{write_gguf, write_hf_dir, GgufPrecision};
use sails::model::load::ModelSource;

use super::model_args::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face directory (read by transformers and sails, tested).
    Hf,
    /// One GGUF file in llama.cpp's layout (read by transformers and sails, tested).
    Gguf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportPrecision {
    F32,
    /// Hugging Face directories only.
    Bf16,
    F16,
    /// GGUF only: llama.cpp's 8-bit blocks (32 weights, one f16 scale).
    #[value(name = "q8_0")]
    Q8_0,
}

/// Write the model, with its adapter merged, as a Hugging Face directory or a GGUF file.
///
/// --format hf (default) writes a directory with config.json, model.safetensors (Hugging Face
/// tensor names; a GGUF's quantised weights dequantised), tokenizer.json, tokenizer_config.json
/// (with the chat template) and generation_config.json: `transformers` loads it with
/// AutoModelForCausalLM and AutoTokenizer. --format gguf writes one file with llama.cpp's tensor
/// names and q/k row order, the matrices in f32, f16 or q8_0 and the tokenizer metadata of the
/// GGUF the model was loaded from (so it needs a GGUF model, as the default one is). `sails
/// --model` reads both back. With --adapter the update is merged into the weights
/// (W + scale·alpha/r·B·A). Llama and Qwen2 models. The output must not exist; it appears only
/// once it is completely written.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Multiply the adapter's update by S before merging (default 1: as trained).
    #[arg(long, value_name = "S", value_parser = super::eval::parse_adapter_scale, requires = "adapter")]
    pub adapter_scale: Option<f64>,
    /// The new directory (hf) or file (gguf) to write.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// Precision of the written matrices (f32 keeps the loaded weights exactly).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: ExportPrecision,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    // Checked before the model loads.
    let gguf_precision = match (args.format, args.precision) {
        (ExportFormat::Gguf, ExportPrecision::F32) => Some(GgufPrecision::F32),
        (ExportFormat::Gguf, ExportPrecision::F16) => Some(GgufPrecision::F16),
        (ExportFormat::Gguf, ExportPrecision::Q8_0) => Some(GgufPrecision::Q8_0),
        (ExportFormat::Hf, ExportPrecision::Q8_0) | (ExportFormat::Gguf, ExportPrecision::Bf16) => {
            bail!(
                "--precision {:?} is not written in --format {:?} (hf: f32, bf16, f16; gguf: f32, \
                 f16, q8_0)",
                args.precision,
                args.format
            )
        }
        (ExportFormat::Hf, _) => None,
    };
    if args.out.exists() {
        bail!("{} exists; export writes a new one", args.out.display());
    }
    let mut model = args
        .model
        .load_with_adapter_scale(args.adapter_scale.unwrap_or(1.0))?;
    let merged = sails::model::lora::merge_into(&mut model.decoder)?;
    let summary = match gguf_precision {
        Some(precision) => {
            let ModelSource::Gguf(source) = &model.source else {
                bail!(
                    "a GGUF export carries the tokenizer metadata of the GGUF the model was loaded \
                     from; {} is not a GGUF file (export it with --format hf instead)",
                    model.source.path().display()
                );
            };
            let file = sails::model::gguf::GgufFile::open(source)?;
            let name = args.out.file_stem().map_or_else(
                || "sails-export".into(),
                |s| s.to_string_lossy().into_owned(),
            );
            write_gguf(&model.decoder, file.metadata(), &name, precision, &args.out)
        }
        None => {
            let dtype = match args.precision {
                ExportPrecision::Bf16 => DType::BF16,
                ExportPrecision::F16 => DType::F16,
                _ => DType::F32,
            };
            write_hf_dir(&model.decoder, Some(&model.tokenizer), dtype, &args.out)
        }
    }
    .with_context(|| format!("exporting to {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{}: {} tensors, {} parameters ({}), {} adapted matrices merged; files: {}",
            summary.path.display(),
            summary.tensors,
            summary.parameters,
            summary.dtype,
            merged,
            summary.files.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
