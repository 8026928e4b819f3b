//! The GGUF reader: dequantisation of every ggml type against scalar decoders written here from
//! the ggml block layouts, the real SmolLM2 file against gguf-py's numbers
//! (`golden/smollm2-135m/gguf_dequant.*`), the q/k un-permutation, metadata parameters, and the
//! errors for truncated, foreign and unsupported files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::{assert_close, golden_dir};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sails::model::config::Architecture;
use sails::model::gguf::{GgufError, GgufFile, GgufModelParams};

/// The real default model: `$SAILS_SMOLLM2_GGUF` if set, else the verified cached asset.
fn smollm2_path() -> PathBuf {
    match std::env::var_os("SAILS_SMOLLM2_GGUF") {
        Some(p) => p.into(),
        None => sails::assets::ensure("smollm2-135m-instruct-q4_1").expect("SmolLM2 GGUF asset"),
    }
}

fn golden_json() -> serde_json::Value {
    let path = golden_dir().join("smollm2-135m/gguf_dequant.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("golden json")).expect("json")
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn usizes(v: &serde_json::Value) -> Vec<usize> {
    f64s(v).into_iter().map(|x| x as usize).collect()
}

fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q8_0 => "Q8_0",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar decoders of the ggml block layouts (ggml-common.h), independent of candle's.

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0, 18 bytes per 32: d (f16), 16 bytes of nibbles; low nibbles are x[0..16], high x[16..32];
/// x = (q − 8)·d.
fn dequant_q4_0(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(18) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let mut y = [0f32; 32];
        for j in 0..16 {
            y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Q4_1, 20 bytes per 32: d, m (f16), 16 bytes of nibbles; x = q·d + m.
fn dequant_q4_1(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(20) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qs = &b[4..20];
        let mut y = [0f32; 32];
        for j in 0..16 {
            y[j] = (qs[j] & 0x0f) as f32 * d + m;
            y[j + 16] = (qs[j] >> 4) as f32 * d + m;
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Q5_0, 22 bytes per 32: d (f16), qh (u32: bit j is the 5th bit of x[j]), 16 bytes of nibbles;
/// x = (q − 16)·d.
fn dequant_q5_0(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(22) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut y = [0f32; 32];
        for j in 0..16 {
            let lo = (qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4);
            let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            y[j] = (lo as i32 - 16) as f32 * d;
            y[j + 16] = (hi as i32 - 16) as f32 * d;
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Q5_1, 24 bytes per 32: d, m (f16), qh (u32), 16 bytes of nibbles; x = q·d + m.
fn dequant_q5_1(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(24) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let mut y = [0f32; 32];
        for j in 0..16 {
            let lo = (qs[j] & 0x0f) as u32 | (((qh >> j) & 1) << 4);
            let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            y[j] = lo as f32 * d + m;
            y[j + 16] = hi as f32 * d + m;
        }
        out.extend_from_slice(&y);
    }
    out
}

/// Q8_0, 34 bytes per 32: d (f16), 32 × i8; x = q·d.
fn dequant_q8_0(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(34) {
        let d = f16_at(b, 0);
        out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
    }
    out
}

/// Q4_K, 144 bytes per 256: d, dmin (f16), 12 bytes packing 8 six-bit (scale, min) pairs,
/// 128 bytes of nibbles. Each 64 values use pair 2k for the low nibbles of 32 bytes and pair
/// 2k+1 for their high nibbles; x = d·sc·q − dmin·m.
fn dequant_q4_k(raw: &[u8]) -> Vec<f32> {
    fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
        if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        }
    }
    let mut out = Vec::new();
    for b in raw.chunks_exact(144) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs = &b[16..144];
        for k in 0..4 {
            let (sc1, m1) = scale_min(2 * k, scales);
            let (sc2, m2) = scale_min(2 * k + 1, scales);
            let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[32 * k..32 * k + 32];
            out.extend(q.iter().map(|&v| d1 * (v & 0x0f) as f32 - mm1));
            out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - mm2));
        }
    }
    out
}

/// Q6_K, 210 bytes per 256: ql (128 bytes of low nibbles), qh (64 bytes of 2-bit high parts),
/// 16 i8 scales, d (f16); x = d·scale·(q − 32), each scale covering 16 values.
fn dequant_q6_k(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in raw.chunks_exact(210) {
        let d = f16_at(b, 208);
        let mut y = [0f32; 256];
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let y = &mut y[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
        out.extend_from_slice(&y);
    }
    out
}

fn dequant_f16(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn dequant_bf16(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn dequant_f32(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn write_gguf(path: &Path, metadata: &[(&str, Value)], tensors: &[(&str, &QTensor)]) {
    let mut file = std::fs::File::create(path).expect("create");
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut file, &md, tensors).expect("write gguf");
}

/// Every type, random data (a Gaussian-ish mix with a few outliers), written to a GGUF file and
/// read back through `GgufFile`. Types with a decoder above must match it to f32 rounding; the
/// others (Q2_K, Q3_K, Q5_K) must reconstruct the data within their quantisation error, and all
/// must hand back the stored bytes unchanged through `qtensor`.
#[test]
fn every_ggml_type_dequantises_like_the_reference_decoder() {
    type Decoder = fn(&[u8]) -> Vec<f32>;
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (6usize, 512usize);
    let data: Vec<f32> = (0..rows * cols)
        .map(|k| {
            let x: f32 = rng.random_range(-1.0..1.0) + rng.random_range(-1.0..1.0);
            if k % 97 == 0 {
                4.0 * x
            } else {
                x
            }
        })
        .collect();
    let src = Tensor::from_vec(data.clone(), (rows, cols), &dev).expect("tensor");
    let rms = (data.iter().map(|x| x * x).sum::<f32>() / data.len() as f32).sqrt();
    // (type, decoder, bound on the RMS reconstruction error relative to the data's RMS). The
    // bounds are 2–3× what these quantisers reach; a wrongly ordered decode gives ≳ 1.
    let cases: [(GgmlDType, Option<Decoder>, f32); 13] = [
        (GgmlDType::F32, Some(dequant_f32), 0.0),
        (GgmlDType::F16, Some(dequant_f16), 1e-3),
        (GgmlDType::BF16, Some(dequant_bf16), 1e-2),
        (GgmlDType::Q4_0, Some(dequant_q4_0), 0.2),
        (GgmlDType::Q4_1, Some(dequant_q4_1), 0.2),
        (GgmlDType::Q5_0, Some(dequant_q5_0), 0.1),
        (GgmlDType::Q5_1, Some(dequant_q5_1), 0.1),
        (GgmlDType::Q8_0, Some(dequant_q8_0), 0.02),
        (GgmlDType::Q2K, None, 0.6),
        (GgmlDType::Q3K, None, 0.35),
        (GgmlDType::Q4K, Some(dequant_q4_k), 0.2),
        (GgmlDType::Q5K, None, 0.1),
        (GgmlDType::Q6K, Some(dequant_q6_k), 0.05),
    ];
    let names: Vec<String> = cases.iter().map(|(t, ..)| format!("t.{t:?}")).collect();
    let quantised: Vec<QTensor> = cases
        .iter()
        .map(|(t, ..)| QTensor::quantize(&src, *t).expect("quantize"))
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("types.gguf");
    let tensors: Vec<(&str, &QTensor)> = names
        .iter()
        .map(String::as_str)
        .zip(quantised.iter())
        .collect();
    write_gguf(
        &path,
        &[("general.architecture", Value::String("llama".into()))],
        &tensors,
    );
    let file = GgufFile::open(&path).expect("open");
    let mut report = Vec::new();
    for ((ty, decoder, bound), (name, q)) in cases.iter().zip(names.iter().zip(&quantised)) {
        let raw = q.data().expect("raw bytes");
        let (got_ty, shape) = file.tensor_info(name).expect("info");
        assert_eq!((got_ty, shape), (*ty, vec![rows, cols]), "{name}");
        let from_file = file.qtensor(name, &dev).expect("qtensor");
        assert_eq!(
            from_file.data().expect("bytes").as_ref(),
            raw.as_ref(),
            "{name}: stored bytes"
        );
        let got = file
            .tensor_f32(name, &dev)
            .expect("tensor_f32")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        if let Some(decode) = decoder {
            let want = decode(raw.as_ref());
            assert_close(
                &format!("{name} vs scalar decoder"),
                &got,
                &want,
                1e-7,
                1e-6,
            );
        }
        let err = (got
            .iter()
            .zip(&data)
            .map(|(g, x)| (g - x) * (g - x))
            .sum::<f32>()
            / data.len() as f32)
            .sqrt()
            / rms;
        report.push(format!("{ty:?} {err:.4}"));
        assert!(err <= *bound, "{name}: relative RMS error {err} > {bound}");
    }
    eprintln!("relative RMS reconstruction error: {}", report.join(", "));
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 file against gguf-py.

#[test]
fn smollm2_dequantisation_matches_gguf_py() {
    let dev = Device::Cpu;
    let file = GgufFile::open(&smollm2_path()).expect("open SmolLM2");
    let golden = golden_json();
    let rows = candle_core::safetensors::load(
        golden_dir().join("smollm2-135m/gguf_dequant.safetensors"),
        &dev,
    )
    .expect("golden rows");
    let mut checked = 0;
    for (name, want) in golden.as_object().expect("object") {
        if name.starts_with('_') {
            continue;
        }
        let (ty, shape) = file.tensor_info(name).expect("tensor info");
        assert_eq!(ggml_name(ty), want["ggml_type"], "{name}: type");
        let ne = usizes(&want["gguf_ne (fastest-varying first)"]);
        let np_shape = usizes(&want["dequantised_numpy_shape [rows, cols]"]);
        assert_eq!(shape, np_shape, "{name}: shape");
        assert_eq!(shape.iter().rev().copied().collect::<Vec<_>>(), ne);
        let t = file.tensor_f32(name, &dev).expect("tensor_f32");
        assert_eq!(t.dims(), np_shape.as_slice());
        let v = t
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
        let sumsq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let (want_sum, want_sq) = (
            want["sum_f64"].as_f64().expect("sum"),
            want["sum_of_squares_f64"].as_f64().expect("sumsq"),
        );
        // Same f32 values summed in another order: only f64 rounding differs.
        assert!(
            (sum - want_sum).abs() <= 1e-6 * want_sum.abs(),
            "{name}: sum {sum} vs {want_sum}"
        );
        assert!(
            (sumsq - want_sq).abs() <= 1e-6 * want_sq,
            "{name}: sum of squares {sumsq} vs {want_sq}"
        );
        let first8: Vec<f32> = f64s(&want["row0_first8"])
            .into_iter()
            .map(|x| x as f32)
            .collect();
        assert_eq!(&v[..8], first8.as_slice(), "{name}: first 8 values");
        let key = format!("{}.rows0to1", name.trim_end_matches(".weight"));
        let golden_rows = rows[&key]
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        assert_eq!(
            &v[..golden_rows.len()],
            golden_rows.as_slice(),
            "{name}: rows 0-1"
        );
        checked += 1;
    }
    assert_eq!(checked, 7);
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("matrix")
}

#[test]
fn smollm2_hf_tensors_undo_the_qk_permutation() {
    let dev = Device::Cpu;
    let file = GgufFile::open(&smollm2_path()).expect("open SmolLM2");
    let start = Instant::now();
    let hf = file.load_hf_tensors(&dev).expect("load_hf_tensors");
    let elapsed = start.elapsed();
    eprintln!(
        "load_hf_tensors: {} tensors in {:.2} s",
        hf.len(),
        elapsed.as_secs_f64()
    );
    // 30 layers × 9 tensors + embedding + final norm; no lm_head (tied).
    assert_eq!(hf.len(), 30 * 9 + 2);
    assert!(!hf.contains_key("lm_head.weight"));
    assert_eq!(hf["model.embed_tokens.weight"].dims(), &[49152, 576]);

    // Against gguf-py: golden rows 0 and 1 are GGUF rows (h=0, i=0, s=0) and (h=0, i=0, s=1),
    // i.e. HF rows 0 and 32.
    let golden = candle_core::safetensors::load(
        golden_dir().join("smollm2-135m/gguf_dequant.safetensors"),
        &dev,
    )
    .expect("golden rows");
    for (gguf, hf_name) in [
        ("blk.0.attn_q", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k", "model.layers.0.self_attn.k_proj.weight"),
    ] {
        let want = rows_of(&golden[&format!("{gguf}.rows0to1")]);
        let got = rows_of(&hf[hf_name]);
        assert_eq!(got[0], want[0], "{hf_name} row 0");
        assert_eq!(got[32], want[1], "{hf_name} row 32");
        assert_ne!(got[1], want[1], "{hf_name} row 1 must not be GGUF row 1");
    }

    // The explicit formula, every row: HF row h·64 + s·32 + i = GGUF row h·64 + 2i + s.
    for (layer, module, hf_module, heads) in [
        (0, "attn_q", "q_proj", 9),
        (0, "attn_k", "k_proj", 3),
        (29, "attn_q", "q_proj", 9),
        (29, "attn_k", "k_proj", 3),
    ] {
        let gguf = rows_of(
            &file
                .tensor_f32(&format!("blk.{layer}.{module}.weight"), &dev)
                .expect("gguf tensor"),
        );
        let got = rows_of(&hf[&format!("model.layers.{layer}.self_attn.{hf_module}.weight")]);
        assert_eq!(got.len(), heads * 64);
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..32 {
                    assert_eq!(
                        got[h * 64 + s * 32 + i],
                        gguf[h * 64 + 2 * i + s],
                        "layer {layer} {module} h {h} s {s} i {i}"
                    );
                }
            }
        }
    }
    // Everything else is as stored.
    let v = file
        .tensor_f32("blk.3.attn_v.weight", &dev)
        .expect("attn_v");
    assert_eq!(
        rows_of(&v),
        rows_of(&hf["model.layers.3.self_attn.v_proj.weight"])
    );
}

#[test]
fn smollm2_params_come_from_metadata() {
    let file = GgufFile::open(&smollm2_path()).expect("open SmolLM2");
    let p = file.model_params().expect("params");
    assert_eq!(p.architecture, Architecture::Llama);
    assert_eq!(
        (p.num_layers, p.hidden_size, p.num_heads, p.num_kv_heads),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (p.intermediate_size, p.vocab_size, p.head_dim),
        (1536, 49152, 64)
    );
    assert_eq!(p.tokenizer_tokens, Some(49152));
    assert_eq!(p.rope_theta, 100000.0);
    // Stored as f32 9.999999747e-06, kept exactly.
    assert_eq!(p.rms_norm_eps, f64::from(1e-5f32));
    assert_eq!(p.context_length, 8192);
    assert!(p.tie_word_embeddings && !p.attention_bias && p.qk_permuted);
    assert_eq!(
        (p.bos_token_id, p.eos_token_id, p.pad_token_id),
        (Some(1), Some(2), Some(2))
    );
    let template = p.chat_template.as_deref().expect("chat template");
    assert!(template.contains("<|im_start|>") && template.contains("named SmolLM"));
    // The file has no llama.attention.key_length: head_dim is derived, and says so.
    assert_eq!(p.defaults_applied.len(), 1, "{:?}", p.defaults_applied);
    assert!(p.defaults_applied[0].starts_with("llama.attention.key_length = 64"));

    let cfg = file.decoder_config().expect("decoder config");
    assert_eq!((cfg.head_dim, cfg.eos_token_ids.clone()), (64, vec![2]));

    // Raw accessors and their errors.
    assert_eq!(file.get_u32("llama.block_count").expect("u32"), 30);
    assert_eq!(file.get_f32("llama.rope.freq_base").expect("f32"), 100000.0);
    assert_eq!(file.get_str("tokenizer.ggml.pre").expect("str"), "smollm");
    let tokens = file.get_str_array("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(
        &tokens[..3],
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert!(!file.get_bool("tokenizer.ggml.add_bos_token").expect("bool"));
    assert!(matches!(
        file.get_u32("llama.nope"),
        Err(GgufError::MissingKey { key, .. }) if key == "llama.nope"
    ));
    let err = file.get_u32("general.architecture").unwrap_err();
    assert!(matches!(&err, GgufError::WrongType { key, .. } if key == "general.architecture"));
    assert!(
        err.to_string().contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{err}"
    );
    assert!(matches!(
        file.get_str_array("tokenizer.ggml.token_type"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        file.tensor_f32("blk.30.attn_q.weight", &Device::Cpu),
        Err(GgufError::MissingTensor { name, .. }) if name == "blk.30.attn_q.weight"
    ));

    // The params are a manifest record: JSON round trip, unknown fields rejected.
    let json = serde_json::to_string(&p).expect("json");
    let back: GgufModelParams = serde_json::from_str(&json).expect("back");
    assert_eq!(back, p);
    assert!(json.contains("\"architecture\":\"llama\""));
}

// ---------------------------------------------------------------------------------------------
// Broken and foreign files.

fn open_err(path: &Path) -> GgufError {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_copies_of_smollm2_are_reported_as_truncated() {
    let bytes = std::fs::read(smollm2_path()).expect("read");
    let len = bytes.len();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("cut.gguf");
    // Header: magic/version/counts, the token list, the merges, the tensor infos (they end at
    // byte 1,785,664, where the data starts).
    for cut in [0, 3, 10, 5_000, 1_000_000, 1_785_000] {
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let err = open_err(&path);
        assert!(
            matches!(err, GgufError::TruncatedHeader { len, .. } if len == cut as u64),
            "cut {cut}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("cut.gguf") && msg.contains("truncated"),
            "{msg}"
        );
    }
    // Data: the header is complete but some tensor's bytes run past the end.
    for cut in [1_785_664, 1_785_664 + 100, len / 2, len - 1] {
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let err = open_err(&path);
        match &err {
            GgufError::Truncated {
                name, needed, len, ..
            } => {
                assert_eq!(*len, cut as u64);
                assert!(*needed > *len, "cut {cut}: {err}");
                assert!(name.ends_with(".weight"), "{name}");
            }
            other => panic!("cut {cut}: {other:?}"),
        }
        assert!(err.to_string().contains("cut.gguf"));
    }
}

#[test]
fn bad_magic_and_unsupported_version_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("x.gguf");
    let mut head = b"GGUF\x03\x00\x00\x00".to_vec();
    head.extend_from_slice(&[0u8; 16]);
    let mut bad = head.clone();
    bad[..4].copy_from_slice(b"NOPE");
    std::fs::write(&path, &bad).expect("write");
    let err = open_err(&path);
    assert!(
        matches!(&err, GgufError::BadMagic { got, .. } if got == "NOPE"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("x.gguf") && msg.contains("not a readable GGUF"),
        "{msg}"
    );
    // A safetensors file is not mistaken for a truncated GGUF.
    std::fs::write(&path, [8u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']).expect("write");
    assert!(matches!(open_err(&path), GgufError::BadMagic { .. }));

    let mut v7 = head.clone();
    v7[4] = 7;
    std::fs::write(&path, &v7).expect("write");
    let err = open_err(&path);
    assert!(
        matches!(err, GgufError::UnsupportedVersion { version: 7, .. }),
        "{err:?}"
    );

    // An empty, valid v3 file (no tensors, no metadata) opens.
    std::fs::write(&path, &head).expect("write");
    let file = GgufFile::open(&path).expect("empty gguf");
    assert!(file.tensor_names().is_empty());
    assert!(matches!(
        file.architecture(),
        Err(GgufError::MissingKey { key, .. }) if key == "general.architecture"
    ));
}

type TinyModel = (Vec<(String, Value)>, Vec<(String, QTensor)>);

/// A tiny llama-style model, F32 tensors whose rows hold their own index (row r = r + 1000·tensor).
fn tiny_model(arch: &str, extra: &[(&str, Value)], skip: &[&str]) -> TinyModel {
    let (hidden, heads, kv, hd, ffn, vocab) = (8usize, 2usize, 1usize, 4usize, 16usize, 32usize);
    let key = |k: &str| format!("{arch}.{k}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(1)),
        (key("context_length"), Value::U32(128)),
        (key("embedding_length"), Value::U32(hidden as u32)),
        (key("feed_forward_length"), Value::U32(ffn as u32)),
        (key("attention.head_count"), Value::U32(heads as u32)),
        (key("attention.head_count_kv"), Value::U32(kv as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
    ];
    md.retain(|(k, _)| !skip.contains(&k.as_str()));
    for (k, v) in extra {
        md.retain(|(k2, _)| k2 != k);
        md.push((k.to_string(), v.clone()));
    }
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![vocab, hidden]),
        ("output_norm.weight", vec![hidden]),
        ("blk.0.attn_norm.weight", vec![hidden]),
        ("blk.0.ffn_norm.weight", vec![hidden]),
        ("blk.0.attn_q.weight", vec![heads * hd, hidden]),
        ("blk.0.attn_k.weight", vec![kv * hd, hidden]),
        ("blk.0.attn_v.weight", vec![kv * hd, hidden]),
        ("blk.0.attn_output.weight", vec![hidden, heads * hd]),
        ("blk.0.ffn_gate.weight", vec![ffn, hidden]),
        ("blk.0.ffn_up.weight", vec![ffn, hidden]),
        ("blk.0.ffn_down.weight", vec![hidden, ffn]),
    ];
    let tensors = shapes
        .into_iter()
        .enumerate()
        .map(|(n, (name, shape))| {
            let cols: usize = shape[1..].iter().product();
            let count: usize = shape.iter().product();
            let data: Vec<f32> = (0..count)
                .map(|k| (k / cols) as f32 + 1000.0 * n as f32)
                .collect();
            let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor");
            (
                name.to_string(),
                QTensor::quantize(&t, GgmlDType::F32).expect("f32"),
            )
        })
        .collect();
    (md, tensors)
}

fn write_tiny(path: &Path, arch: &str, extra: &[(&str, Value)], skip: &[&str]) {
    let (md, tensors) = tiny_model(arch, extra, skip);
    let md: Vec<(&str, Value)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_gguf(path, &md, &tensors);
}

fn first_column(t: &Tensor) -> Vec<f32> {
    rows_of(t).iter().map(|r| r[0] % 1000.0).collect()
}

#[test]
fn qk_permutation_is_undone_for_llama_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("tiny.gguf");
    let dev = Device::Cpu;

    write_tiny(&path, "llama", &[], &[]);
    let file = GgufFile::open(&path).expect("open");
    let p = file.model_params().expect("params");
    assert!(p.qk_permuted && p.tie_word_embeddings);
    assert_eq!((p.head_dim, p.rope_theta, p.vocab_size), (4, 10_000.0, 32));
    assert_eq!(
        p.defaults_applied,
        vec![
            "llama.attention.key_length = 4 (embedding_length / head_count)".to_string(),
            "llama.rope.freq_base = 10000".to_string()
        ]
    );
    let hf = file.load_hf_tensors(&dev).expect("hf");
    assert_eq!(hf.len(), 11);
    // hd = 4: HF rows (h, s, i) come from GGUF rows h·4 + 2i + s → 0, 2, 1, 3 per head.
    let q = first_column(&hf["model.layers.0.self_attn.q_proj.weight"]);
    assert_eq!(q, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    let k = first_column(&hf["model.layers.0.self_attn.k_proj.weight"]);
    assert_eq!(k, vec![0., 2., 1., 3.]);
    let v = first_column(&hf["model.layers.0.self_attn.v_proj.weight"]);
    assert_eq!(v, vec![0., 1., 2., 3.]);

    write_tiny(&path, "qwen2", &[], &[]);
    let file = GgufFile::open(&path).expect("open");
    let p = file.model_params().expect("params");
    assert!(!p.qk_permuted);
    assert_eq!(p.architecture, Architecture::Qwen2);
    let hf = file.load_hf_tensors(&dev).expect("hf");
    let q = first_column(&hf["model.layers.0.self_attn.q_proj.weight"]);
    assert_eq!(q, (0..8).map(|x| x as f32).collect::<Vec<_>>());
}

#[test]
fn foreign_architectures_and_bad_metadata_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("odd.gguf");

    write_tiny(&path, "mamba_xyz", &[], &[]);
    let file = GgufFile::open(&path).expect("a valid file of another architecture opens");
    let err = file.model_params().unwrap_err();
    assert!(
        matches!(&err, GgufError::UnsupportedArchitecture { arch, .. } if arch == "mamba_xyz"),
        "{err:?}"
    );
    assert!(err.to_string().contains("odd.gguf"));
    assert!(file.load_hf_tensors(&Device::Cpu).is_err());
    assert_eq!(file.architecture_name().expect("name"), "mamba_xyz");

    write_tiny(&path, "llama", &[], &["llama.feed_forward_length"]);
    let err = GgufFile::open(&path)
        .expect("open")
        .model_params()
        .unwrap_err();
    assert!(
        matches!(&err, GgufError::MissingKey { key, .. } if key == "llama.feed_forward_length"),
        "{err:?}"
    );

    write_tiny(
        &path,
        "llama",
        &[("llama.block_count", Value::String("30".into()))],
        &[],
    );
    let err = GgufFile::open(&path)
        .expect("open")
        .model_params()
        .unwrap_err();
    assert!(
        matches!(&err, GgufError::WrongType { key, got, .. } if key == "llama.block_count" && got == "a string"),
        "{err:?}"
    );

    write_tiny(
        &path,
        "llama",
        &[("llama.rope.scaling.type", Value::String("yarn".into()))],
        &[],
    );
    let err = GgufFile::open(&path)
        .expect("open")
        .model_params()
        .unwrap_err();
    assert!(
        matches!(&err, GgufError::Unsupported { what, .. } if what.contains("yarn")),
        "{err:?}"
    );
}

#[test]
fn unsupported_tensor_type_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("iq.gguf");
    write_tiny(&path, "llama", &[], &[]);
    let mut bytes = std::fs::read(&path).expect("read");
    // Tensor info: name (u64 length + bytes), n_dims u32, dims u64 × n, ggml type u32.
    let name = b"output_norm.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let n_dims = u32::from_le_bytes(
        bytes[at + name.len()..at + name.len() + 4]
            .try_into()
            .expect("4"),
    ) as usize;
    let type_at = at + name.len() + 4 + 8 * n_dims;
    assert_eq!(&bytes[type_at..type_at + 4], &[0, 0, 0, 0], "F32 type id");
    bytes[type_at] = 16; // IQ2_XXS
    std::fs::write(&path, &bytes).expect("write");
    let err = open_err(&path);
    assert!(
        matches!(
            &err,
            GgufError::UnsupportedTensorType {
                type_id: 16,
                type_name: "IQ2_XXS",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("iq.gguf"));
}
