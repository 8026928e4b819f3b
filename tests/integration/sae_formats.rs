//! Bad inputs give clear errors, never panics: truncated files, unknown architectures, widths
//! that disagree with the config or with a model.

use std::path::Path;

use crate::common::golden_dir;
use candle_core::Device;
use sails::model::Resid;
use sails::sae::{Sae, SaeError};

fn copy_dir(from: &Path, to: &Path) {
    for name in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn truncated_npz_is_an_error_naming_the_file() {
    let src = golden_dir().join("sae-jumprelu-gemmascope/params.npz");
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 10, 100] {
        let path = dir.path().join("params.npz");
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = Sae::load_gemma_scope(&path, Resid::Out(0), &Device::Cpu).unwrap_err();
        assert!(matches!(err, SaeError::TensorFile { .. }), "{err}");
        assert!(err.to_string().contains("params.npz"), "{err}");
    }
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    let src = golden_dir().join("sae-topk-saelens");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&src, dir.path());
    let bytes = std::fs::read(src.join("sae_weights.safetensors")).unwrap();
    for keep in [bytes.len() - 4, 20] {
        std::fs::write(dir.path().join("sae_weights.safetensors"), &bytes[..keep]).unwrap();
        let err = Sae::load_saelens(dir.path(), &Device::Cpu).unwrap_err();
        assert!(matches!(err, SaeError::TensorFile { .. }), "{err}");
        assert!(err.to_string().contains("sae_weights.safetensors"), "{err}");
    }
}

fn with_cfg(edit: impl Fn(&mut serde_json::Value)) -> Result<Sae, SaeError> {
    let src = golden_dir().join("sae-topk-saelens");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&src, dir.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cfg.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
    Sae::load_saelens(dir.path(), &Device::Cpu)
}

#[test]
fn unknown_architecture_is_named() {
    let err = with_cfg(|c| c["architecture"] = "gated".into()).unwrap_err();
    assert!(
        matches!(err, SaeError::UnknownArchitecture { ref got, .. } if got == "gated"),
        "{err}"
    );
    assert!(
        err.to_string().contains("gated") && err.to_string().contains("cfg.json"),
        "{err}"
    );
}

#[test]
fn unknown_cfg_key_is_rejected() {
    let err = with_cfg(|c| c["l1_coefficient"] = 5.into()).unwrap_err();
    assert!(err.to_string().contains("l1_coefficient"), "{err}");
}

#[test]
fn width_mismatch_between_cfg_and_tensors_names_both() {
    let err = with_cfg(|c| c["d_sae"] = 512.into()).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::WidthMismatch {
                what: "d_sae",
                config: 512,
                tensors: 256
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("512") && msg.contains("256"), "{msg}");
    let err = with_cfg(|c| c["d_in"] = 65.into()).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::WidthMismatch {
                what: "d_in",
                config: 65,
                tensors: 64
            }
        ),
        "{err}"
    );
}

#[test]
fn unsupported_normalisation_and_hooks_are_rejected() {
    let err = with_cfg(|c| c["normalize_activations"] = "layer_norm".into()).unwrap_err();
    assert!(
        matches!(err, SaeError::UnsupportedNormalization { .. }),
        "{err}"
    );
    let err = with_cfg(|c| c["metadata"]["hook_name"] = "blocks.0.attn.hook_z".into()).unwrap_err();
    assert!(matches!(err, SaeError::UnsupportedHook { .. }), "{err}");
    // SAELens' own value whose inference-time meaning is the identity is accepted
    let sae = with_cfg(|c| c["normalize_activations"] = "expected_average_only_in".into()).unwrap();
    assert_eq!(sae.hook(), Resid::Out(0));
}

#[test]
fn check_against_model_reports_d_model_and_layer_range() {
    let sae = Sae::load_saelens(&golden_dir().join("sae-topk-saelens"), &Device::Cpu).unwrap();
    sae.check_against_model(64, 1).unwrap();
    let err = sae.check_against_model(576, 30).unwrap_err();
    assert!(
        matches!(
            err,
            SaeError::DModelMismatch {
                sae: 64,
                model: 576
            }
        ),
        "{err}"
    );
    let sae = Sae::load_gemma_scope(
        &golden_dir().join("sae-jumprelu-gemmascope/params.npz"),
        Resid::In(12),
        &Device::Cpu,
    )
    .unwrap();
    let err = sae.check_against_model(64, 12).unwrap_err();
    assert!(
        matches!(err, SaeError::HookOutOfRange { n_layers: 12, .. }),
        "{err}"
    );
    sae.check_against_model(64, 13).unwrap();
}

#[test]
fn npz_with_missing_or_extra_arrays_is_rejected() {
    // rewrite the golden npz without `threshold` / with an extra array, via a SAELens save of the
    // tensors (the npz reader only cares about names): build the zips with the zip crate
    use std::io::Write;
    let src = golden_dir().join("sae-jumprelu-gemmascope/params.npz");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let mut entries = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        entries.push((f.name().to_string(), buf));
    }
    let write = |path: &Path, entries: &[(String, Vec<u8>)]| {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        for (name, buf) in entries {
            // stored, as np.savez writes (candle's npz reader has no deflate)
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            z.start_file(name.as_str(), opts).unwrap();
            z.write_all(buf).unwrap();
        }
        z.finish().unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("params.npz");
    let without: Vec<_> = entries
        .iter()
        .filter(|(n, _)| n != "threshold.npy")
        .cloned()
        .collect();
    write(&path, &without);
    let err = Sae::load_gemma_scope(&path, Resid::Out(0), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, SaeError::MissingTensor { ref name, .. } if name == "threshold"),
        "{err}"
    );
    let mut extra = entries.clone();
    let b_dec = entries
        .iter()
        .find(|(n, _)| n == "b_dec.npy")
        .unwrap()
        .1
        .clone();
    extra.push(("b_dec_scale.npy".into(), b_dec));
    write(&path, &extra);
    let err = Sae::load_gemma_scope(&path, Resid::Out(0), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, SaeError::UnexpectedTensor { ref name, .. } if name == "b_dec_scale"),
        "{err}"
    );
}
