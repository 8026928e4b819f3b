//! `sails export`: a merged model written as a Hugging Face directory reads back to the PEFT /
//! transformers reference logits (tiny Llama with its LoRA merged, tiny Qwen2 with its biases),
//! the default model's export generates what the GGUF does, and what cannot be written is refused.

use crate::common::{assert_close, golden_dir, real_positions};
use candle_core::{DType, Device, Tensor};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::export::{hf_tensors, write_hf_dir};
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

#[test]
fn a_merged_export_reads_back_to_the_peft_reference() {
    let lora = golden_dir().join("tiny-llama-lora");
    let mut model = load_dir(&golden_dir().join("tiny-llama"));
    Adapter::load(&lora, &Device::Cpu)
        .unwrap()
        .apply(&mut model, &lora)
        .unwrap();
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
    // bf16 halves the file and stays within bf16's rounding of the weights.
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
    let generate = |model: &str| {
        sails(&[
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
        ])
    };
    let from_gguf = generate("default");
    assert_eq!(generate(out.to_str().unwrap()), from_gguf);
    assert!(from_gguf.contains("primary colors"), "{from_gguf}");
}
