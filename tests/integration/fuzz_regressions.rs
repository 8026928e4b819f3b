//! Inputs the fuzzers (`fuzz/`) found crashing a loader, each reduced to the property that did it
//! and written out here, so that `cargo test` keeps every fix without libFuzzer.

use std::path::Path;

use candle_core::Device;
use sails::model::gguf::{GgufError, GgufFile};

/// A GGUF v3 file: `metadata` as (key, value type, value bytes), `tensors` as (name, `ne`, ggml
/// type, offset), then `data_len` zero bytes of tensor data after the 32-byte aligned header.
fn gguf_bytes(
    metadata: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data_len: usize,
) -> Vec<u8> {
    let string = |s: &str| {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    };
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, ty, value) in metadata {
        out.extend(string(key));
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(value);
    }
    for (name, ne, ty, offset) in tensors {
        out.extend(string(name));
        out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in *ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.resize(out.len() + data_len, 0);
    out
}

const GGUF_U32: u32 = 4;
const GGUF_I8: u32 = 1;
const GGML_F32: u32 = 0;

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

/// `general.alignment = 0` made candle's header reader divide by zero.
#[test]
fn gguf_alignment_zero_or_not_a_power_of_two_is_a_header_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bad in [0u32, 3, 48] {
        let md = [("general.alignment", GGUF_U32, bad.to_le_bytes().to_vec())];
        let path = write_tmp(dir.path(), "a.gguf", &gguf_bytes(&md, &[], 0));
        let err = GgufFile::open(&path).expect_err("bad alignment");
        assert!(matches!(err, GgufError::BadHeader { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains("general.alignment"), "{err}");
    }
    // A negative signed value is ignored by the reader (default alignment), as before.
    let md = [("general.alignment", GGUF_I8, vec![0xff])];
    let path = write_tmp(dir.path(), "a.gguf", &gguf_bytes(&md, &[], 0));
    GgufFile::open(&path).expect("negative alignment falls back to the default");
    // A later duplicate key replaces the earlier one, as in the reader.
    let md = [
        ("general.alignment", GGUF_U32, 0u32.to_le_bytes().to_vec()),
        ("general.alignment", GGUF_U32, 64u32.to_le_bytes().to_vec()),
    ];
    let path = write_tmp(dir.path(), "a.gguf", &gguf_bytes(&md, &[], 0));
    GgufFile::open(&path).expect("the last alignment counts");
}

/// A tensor with a zero dimension made candle view an empty, unaligned buffer as f32 blocks
/// (undefined behaviour; a panic with debug assertions).
#[test]
fn gguf_tensor_without_elements_is_an_error_when_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = [("output_norm.weight", &[0u64, 4][..], GGML_F32, 0u64)];
    let path = write_tmp(dir.path(), "z.gguf", &gguf_bytes(&[], &t, 0));
    let file = GgufFile::open(&path).expect("opens");
    let err = file
        .tensor_f32("output_norm.weight", &Device::Cpu)
        .expect_err("no elements");
    assert!(err.to_string().contains("no elements"), "{err}");
    assert!(file.qtensor("output_norm.weight", &Device::Cpu).is_err());
}

/// A header claiming a 10^12-element tensor is refused from the file's size; nothing is
/// allocated for it.
#[test]
fn gguf_huge_tensor_claim_is_truncation_not_allocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = [(
        "token_embd.weight",
        &[1_000_000u64, 1_000_000][..],
        GGML_F32,
        0u64,
    )];
    let path = write_tmp(dir.path(), "h.gguf", &gguf_bytes(&[], &t, 64));
    let err = GgufFile::open(&path).expect_err("too big for the file");
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    // Overflowing the byte count is an error too.
    let t = [("token_embd.weight", &[u64::MAX / 2, 4][..], GGML_F32, 0u64)];
    let path = write_tmp(dir.path(), "h.gguf", &gguf_bytes(&[], &t, 64));
    assert!(GgufFile::open(&path).is_err());
}

/// A JSON syntax error or bytes that are not UTF-8 inside `"decoder"` made the tokenizers
/// library panic ("Helper") instead of returning an error.
#[test]
fn tokenizer_json_with_a_syntax_error_in_the_decoder_is_a_load_error() {
    use sails::model::tokenizer::{Tokenizer, TokenizerError};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    for fixture in [
        "tokenizer-decoder-syntax-error.json",
        "tokenizer-decoder-not-utf8.json",
    ] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fuzz")
            .join(fixture);
        std::fs::copy(&fixture, &path).expect("copy");
        let err = Tokenizer::from_file(&path).expect_err("not JSON");
        assert!(matches!(err, TokenizerError::Load { .. }), "{err:?}");
        assert!(
            err.to_string().contains("not valid JSON"),
            "{fixture:?}: {err}"
        );
    }
}

/// A `.npy` array in a zip, `header` its header dict, `data` its bytes.
fn npz_with(name: &str, header: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    npy.extend_from_slice(data);
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    zip.start_file(name, zip::write::SimpleFileOptions::default())
        .expect("zip entry");
    zip.write_all(&npy).expect("zip write");
    zip.finish().expect("zip finish");
    buf.into_inner()
}

/// A 200-byte params.npz whose header claims a (100000, 100000) f32 array made the reader
/// allocate 40 GB before reading; the claim is now checked against the data.
#[test]
fn npz_header_claiming_more_than_its_data_is_an_error_not_an_allocation() {
    use sails::model::Resid;
    use sails::sae::format::load_gemma_scope;
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3, x), }",
        "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f4', 'shape': (2,), }",
    ];
    for header in cases {
        let path = write_tmp(
            dir.path(),
            "params.npz",
            &npz_with("W_enc.npy", header, &[0; 64]),
        );
        let err = load_gemma_scope(&path, Resid::Out(0), &Device::Cpu).expect_err(header);
        assert!(err.to_string().contains("W_enc.npy"), "{header}: {err}");
    }
    // A well-formed array still reads (and the SAE then misses its other tensors).
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }";
    let path = write_tmp(
        dir.path(),
        "params.npz",
        &npz_with("W_enc.npy", header, &[0; 64]),
    );
    let err = load_gemma_scope(&path, Resid::Out(0), &Device::Cpu).expect_err("incomplete");
    assert!(err.to_string().contains("missing tensor `W_dec`"), "{err}");
}

/// A template comes with the model file: `tojson(indent=…)` with a huge indent must not try to
/// build a string of that many spaces.
#[test]
fn chat_template_tojson_indent_is_bounded() {
    use sails::model::chat::{ChatTemplate, Message};
    let t = ChatTemplate::new("{{ messages | tojson(indent=1000000000000) }}").expect("parses");
    assert!(t.render(&[Message::user("hi")], false).is_err());
}

/// `is divisibleby 0` made minijinja's builtin test divide by zero (a panic).
#[test]
fn chat_template_divisibleby_zero_is_false_not_a_panic() {
    use sails::model::chat::{ChatTemplate, Message};
    let t = ChatTemplate::new(
        "{{ 4 is divisibleby 0 }}|{{ 4 is divisibleby(2) }}|{{ 4.5 is divisibleby 1.5 }}|\
         {{ 4 is divisibleby 0.0 }}|{{ 5 is divisibleby 2 }}",
    )
    .expect("parses");
    let out = t.render(&[Message::user("hi")], false).expect("renders");
    assert_eq!(out, "False|True|True|False|False");
}
