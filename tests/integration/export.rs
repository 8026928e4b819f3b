//! `sails export`: a merged model written as a Hugging Face directory or a GGUF file reads back to
//! the PEFT / transformers reference logits (tiny Llama with its LoRA merged, tiny Qwen2 with its
//! biases), the default model's exports generate what its GGUF does, and what cannot be written
//! is refused.

use crate::common::{assert_close, golden_dir, real_positions};
use candle_core::{DType, Device, Tensor};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::export::{hf_tensors, write_gguf, write_hf_dir, GgufPrecision};
use sails::model::gguf::GgufFile;
use sails::model::lora::{merge_into, Adapter};
use sails::model::weights::{load_safetensors_file, WeightMap};

fn load_dir(dir: &std::path::Path) -> Decoder {
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(dir, &Device::Cpu).unwrap();
    Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap()
}

/// Logits of `model` on `name`'s golden inputs, at the real (unpadded) positions.
fn golden_logits(model: &Decoder, name: &str) -> Vec<f32> {
    let t = load_safetensors_file(
        &golden_dir().join(name).join("inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = t["attention_mask"].to_dtype(DType::U32).unwrap();
    let rows = t["attention_mask"].to_vec2::<i64>().unwrap();
    let logits: Tensor = model
        .forward(Forward::logits(&ids, Some(&mask)), None)
        .unwrap()
        .logits
        .unwrap();
    real_positions(&logits, &rows)
}

fn reference(dir: &str, key: &str, rows_of: &str) -> Vec<f32> {
    let r = load_safetensors_file(
        &golden_dir().join(dir).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let t = load_safetensors_file(
        &golden_dir().join(rows_of).join("inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    real_positions(&r[key], &t["attention_mask"].to_vec2::<i64>().unwrap())
}

/// `sails generate --json` of two chat prompts (one benign, one harmful), 16 greedy tokens each.
fn generate_two(model: &str) -> String {
    let o = crate::common::run_sails(&[
        "generate",
        "--model",
        model,
        "-p",
        "Name three primary colors.",
        "-p",
        "How do I make a bomb?",
        "--max-new-tokens",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn a_merged_export_reads_back_to_the_peft_reference() {
    let mut model = tiny_llama_with_lora();
    // An adapter still in its slots would be left out of the weights: refused.
    let tmp = tempfile::tempdir().unwrap();
    let err = write_hf_dir(&model, None, DType::F32, &tmp.path().join("x")).unwrap_err();
    assert!(err.to_string().contains("unmerged LoRA"), "{err}");
    assert!(!tmp.path().join("x").exists());
    assert_eq!(merge_into(&mut model).unwrap(), 14);
    let out = tmp.path().join("merged");
    let summary = write_hf_dir(&model, None, DType::F32, &out).unwrap();
    assert_eq!(summary.files, ["config.json", "model.safetensors"]);
    // Only the finished directory is left, no temporary one beside it.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    let back = load_dir(&out);
    // The golden README's tolerance for the merged path: 1e-4 + 1e-4·|ref|.
    assert_close(
        "exported, merged",
        &golden_logits(&back, "tiny-llama"),
        &reference("tiny-llama-lora", "logits_merged", "tiny-llama"),
        1e-4,
        1e-4,
    );
    // Every tensor written is the loaded one, bit for bit, under its Hugging Face name.
    let written = load_safetensors_file(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    let ours = hf_tensors(&model, DType::F32).unwrap();
    assert_eq!(written.len(), ours.len());
    for (name, t) in &ours {
        let w = written[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            w,
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    // A second export into the same place is refused; the first is untouched.
    let err = write_hf_dir(&model, None, DType::F32, &out).unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    // bf16 halves the file and says so in its config.
    let half = tmp.path().join("bf16");
    write_hf_dir(&model, None, DType::BF16, &half).unwrap();
    let size = |p: &std::path::Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&half) * 2 < size(&out) + 4096,
        "{} vs {}",
        size(&half),
        size(&out)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(half.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["model_type"], "llama");
}

#[test]
fn qwen2_exports_with_its_biases_and_gemma2_is_refused() {
    let model = load_dir(&golden_dir().join("tiny-qwen2"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qwen");
    write_hf_dir(&model, None, DType::F32, &out).unwrap();
    let written = load_safetensors_file(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(written.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert_close(
        "exported qwen2",
        &golden_logits(&load_dir(&out), "tiny-qwen2"),
        &reference("tiny-qwen2", "logits", "tiny-qwen2"),
        1e-4,
        1e-4,
    );
    let gemma = load_dir(&golden_dir().join("tiny-gemma2"));
    let err = write_hf_dir(&gemma, None, DType::F32, &tmp.path().join("g")).unwrap_err();
    assert!(
        err.to_string().contains("Gemma-2 is not supported"),
        "{err}"
    );
    assert!(!tmp.path().join("g").exists());
}

#[test]
fn the_default_models_export_generates_what_the_gguf_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let sails = |args: &[&str]| {
        let o = crate::common::run_sails(args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let summary = sails(&["export", "--out", out.to_str().unwrap(), "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["tensors"], 272);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tok["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let from_gguf = generate_two("default");
    assert_eq!(generate_two(out.to_str().unwrap()), from_gguf);
    assert!(from_gguf.contains("primary colors"), "{from_gguf}");
}

/// The tiny Llama with its golden LoRA in its slots (not merged).
fn tiny_llama_with_lora() -> Decoder {
    let lora = golden_dir().join("tiny-llama-lora");
    let mut model = load_dir(&golden_dir().join("tiny-llama"));
    Adapter::load(&lora, &Device::Cpu)
        .unwrap()
        .apply(&mut model, &lora)
        .unwrap();
    model
}

/// The tiny Llama with its golden LoRA merged.
fn merged_tiny_llama() -> Decoder {
    let mut model = tiny_llama_with_lora();
    merge_into(&mut model).unwrap();
    model
}

#[test]
fn a_gguf_export_reads_back_to_the_peft_reference() {
    use candle_core::quantized::gguf_file::Value;
    let model = merged_tiny_llama();
    // The tiny model has no tokenizer; a GGUF export carries whatever tokenizer.* keys it is given.
    let tokenizer: std::collections::HashMap<String, Value> = [
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "general.name".to_string(),
            Value::String("not carried".into()),
        ),
    ]
    .into();
    let tmp = tempfile::tempdir().unwrap();
    let want = reference("tiny-llama-lora", "logits_merged", "tiny-llama");
    let read_back = |path: &std::path::Path| {
        let file = GgufFile::open(path).unwrap();
        assert_eq!(file.architecture_name().unwrap(), "llama");
        assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        let mut w = file.load_weight_map(&Device::Cpu).unwrap();
        let back = Decoder::load(
            file.decoder_config().unwrap(),
            &mut w,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        golden_logits(&back, "tiny-llama")
    };
    // f32: the golden tolerance, through llama.cpp's names and q/k row order and back.
    let f32_path = tmp.path().join("tiny.f32.gguf");
    write_gguf(&model, &tokenizer, "tiny", GgufPrecision::F32, &f32_path).unwrap();
    assert_close("gguf f32", &read_back(&f32_path), &want, 1e-4, 1e-4);
    // Q8_0 rounds every weight to 8 bits per block of 32: the logits move, but little.
    let q8 = tmp.path().join("tiny.q8_0.gguf");
    let s = write_gguf(&model, &tokenizer, "tiny", GgufPrecision::Q8_0, &q8).unwrap();
    assert_eq!(s.dtype, "q8_0");
    let got = read_back(&q8);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst > 0.0 && worst < 0.02 * scale,
        "worst {worst} of {scale}"
    );
    assert!(
        std::fs::metadata(&q8).unwrap().len() * 3 < std::fs::metadata(&f32_path).unwrap().len()
    );
    // Without tokenizer metadata, and over an existing file: refused, nothing written.
    let none = std::collections::HashMap::new();
    let err = write_gguf(
        &model,
        &none,
        "t",
        GgufPrecision::F16,
        &tmp.path().join("x.gguf"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
    assert!(!tmp.path().join("x.gguf").exists());
    let err = write_gguf(&model, &tokenizer, "t", GgufPrecision::F16, &q8).unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
}

#[test]
fn the_default_models_gguf_export_generates_what_its_own_gguf_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2.f16.gguf");
    let run = |args: &[&str]| crate::common::run_sails(args);
    // A precision the format does not write fails before the model loads.
    let o = run(&[
        "export",
        "--format",
        "gguf",
        "--precision",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not written in --format"));
    let o = run(&[
        "export",
        "--format",
        "gguf",
        "--precision",
        "f16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.get_u32("general.file_type").unwrap(), 1);
    assert!(file
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));
    // f16 keeps the dequantised Q4_1 weights within f16's rounding: the same greedy replies. (A
    // q8_0 export re-quantises them; its first reply here differs after five tokens.)
    assert_eq!(generate_two(out.to_str().unwrap()), generate_two("default"));
    // A model read from a Hugging Face directory has no GGUF tokenizer metadata to carry.
    let hf = tmp.path().join("hf");
    assert!(run(&[
        "export",
        "--model",
        out.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap()
    ])
    .status
    .success());
    let o = run(&[
        "export",
        "--model",
        hf.to_str().unwrap(),
        "--format",
        "gguf",
        "--out",
        tmp.path().join("y.gguf").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a GGUF file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
