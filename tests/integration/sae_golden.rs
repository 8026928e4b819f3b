//! SAE encode/decode parity with the golden references (computed in float64 by numpy and
//! cross-checked against SAELens; see the READMEs in golden/sae-*). Tolerance from those READMEs:
//! the exact set of active features, and |got − ref| ≤ 1e-5 + 1e-5·|ref| on pre-activations,
//! feature activations and reconstructions.

use crate::common::{assert_close, golden_dir};
use candle_core::{Device, Tensor};
use sails::model::Resid;
use sails::sae::{Architecture, Sae};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-5;

fn reference(dir: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        golden_dir().join(dir).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn check(sae: &Sae, reference: &std::collections::HashMap<String, Tensor>) {
    let x = &reference["x"];
    let pre = sae.pre_activations(x).unwrap();
    let f = sae.encode(x).unwrap();
    let x_hat = sae.decode(&f).unwrap();
    let (got_f, want_f) = (flat(&f), flat(&reference["feature_acts"]));
    let active = |v: &[f32]| v.iter().map(|&a| a != 0.0).collect::<Vec<_>>();
    assert_eq!(
        active(&got_f),
        active(&want_f),
        "active feature sets differ"
    );
    assert_close(
        "pre_activations",
        &flat(&pre),
        &flat(&reference["pre_activations"]),
        ATOL,
        RTOL,
    );
    assert_close("feature_acts", &got_f, &want_f, ATOL, RTOL);
    assert_close(
        "reconstruction",
        &flat(&x_hat),
        &flat(&reference["reconstruction"]),
        ATOL,
        RTOL,
    );
    assert_close(
        "forward",
        &flat(&sae.forward(x).unwrap()),
        &flat(&reference["reconstruction"]),
        ATOL,
        RTOL,
    );
}

#[test]
fn gemma_scope_jumprelu_matches_reference() {
    let dir = golden_dir().join("sae-jumprelu-gemmascope");
    let sae = Sae::load_gemma_scope(&dir.join("params.npz"), Resid::Out(0), &Device::Cpu).unwrap();
    assert_eq!((sae.d_in(), sae.d_sae()), (64, 256));
    assert_eq!(sae.cfg.architecture, Architecture::JumpRelu);
    assert!(
        !sae.cfg.apply_b_dec_to_input,
        "Gemma Scope does not subtract b_dec"
    );
    check(&sae, &reference("sae-jumprelu-gemmascope"));
}

#[test]
fn saelens_topk_matches_reference() {
    let dir = golden_dir().join("sae-topk-saelens");
    let sae = Sae::load_saelens(&dir, &Device::Cpu).unwrap();
    assert_eq!((sae.d_in(), sae.d_sae()), (64, 256));
    assert_eq!(sae.hook(), Resid::Out(0)); // blocks.0.hook_resid_post
    assert_eq!(
        sae.cfg.architecture,
        Architecture::TopK {
            k: 4,
            rescale_acts_by_decoder_norm: false
        }
    );
    let reference = reference("sae-topk-saelens");
    // input 9 has only 2 positive pre-activations: ReLU after top-k leaves 2 features, not 4
    let f = sae.encode(&reference["x"]).unwrap();
    let nonzero: Vec<usize> = f
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().filter(|&&v| v != 0.0).count())
        .collect();
    assert_eq!(nonzero, vec![4, 4, 4, 4, 4, 4, 4, 4, 4, 2]);
    check(&sae, &reference);
}

#[test]
fn saelens_save_then_load_is_identity_and_keeps_the_reference() {
    let dir = golden_dir().join("sae-topk-saelens");
    let sae = Sae::load_saelens(&dir, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    sae.save_saelens(out.path()).unwrap();
    let again = Sae::load_saelens(out.path(), &Device::Cpu).unwrap();
    assert_eq!(again.cfg, sae.cfg);
    for (a, b) in [
        (&sae.w_enc, &again.w_enc),
        (&sae.w_dec, &again.w_dec),
        (&sae.b_enc, &again.b_enc),
        (&sae.b_dec, &again.b_dec),
    ] {
        assert_eq!(flat(a), flat(b));
    }
    // the written cfg.json carries SAELens' keys, with the architecture's own
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("cfg.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(cfg["k"], 4);
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.0.hook_resid_post");
    assert_eq!(cfg["metadata"]["model_name"], "sails-golden-tiny");
    check(&again, &reference("sae-topk-saelens"));

    // a JumpReLU SAE round-trips with its threshold
    let jr = Sae::load_gemma_scope(
        &golden_dir().join("sae-jumprelu-gemmascope/params.npz"),
        Resid::In(5),
        &Device::Cpu,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    jr.save_saelens(out.path()).unwrap();
    let again = Sae::load_saelens(out.path(), &Device::Cpu).unwrap();
    assert_eq!(again.hook(), Resid::In(5));
    check(&again, &reference("sae-jumprelu-gemmascope"));
}
