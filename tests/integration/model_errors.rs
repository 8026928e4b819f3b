//! Bad model inputs give errors that name the file and the problem, never a panic.

use std::path::Path;

use crate::common::golden_dir;
use candle_core::{DType, Device, Tensor};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::weights::WeightMap;

fn copy_tiny(to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden_dir().join("tiny-llama").join(f), to.join(f)).unwrap();
    }
}

fn load(dir: &Path) -> Result<Decoder, sails::model::ModelError> {
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json"))?;
    let mut w = WeightMap::from_safetensors_dir(dir, &Device::Cpu)?;
    Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32)
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("corrupt or truncated"),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"llama\"", "\"mamba\""),
    )
    .unwrap();
    let err = load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("mamba") && err.contains("supported"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    // A config whose hidden size disagrees with the weights.
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("gate_proj.weight") && err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let path = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let norm = tensors.remove("model.norm.weight").unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("missing"),
        "{err}"
    );
    tensors.insert("model.norm.weight".into(), norm);
    tensors.insert(
        "model.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("model.extra.weight"), "{err}");
}

#[test]
fn missing_weights_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        golden_dir().join("tiny-llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let model = load(tmp.path()).unwrap();
    // max_position_embeddings is 128.
    let ids = Tensor::zeros((1, 130), DType::U32, &Device::Cpu).unwrap();
    let err = model
        .forward(Forward::logits(&ids, None), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("130") && err.contains("128"), "{err}");
}
