//! SAE file formats: one loader per format, dimensions read from the tensors and checked
//! against the config, unknown keys rejected.
//!
//! * Gemma Scope `params.npz` (JumpReLU; `W_enc`, `W_dec`, `b_enc`, `b_dec`, `threshold`). The
//!   file says nothing about its hook, so the caller names it.
//! * SAELens directory: `cfg.json` + `sae_weights.safetensors` — read and written, so SAEs
//!   trained here load in SAELens (`SAE.load_from_disk`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{hook_name, parse_hook, Architecture, Normalization, Result, Sae, SaeConfig, SaeError};
use crate::model::Resid;

pub const SAELENS_CFG: &str = "cfg.json";
pub const SAELENS_WEIGHTS: &str = "sae_weights.safetensors";

/// Keys of cfg.json that belong to the architecture (read through [`Architecture`]'s serde).
const ARCH_KEYS: &[&str] = &["architecture", "k", "rescale_acts_by_decoder_norm"];

/// The architecture-independent part of a SAELens cfg.json; any other key is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommon {
    d_in: usize,
    d_sae: usize,
    /// Storage dtype of the weights; they are converted to f32 on load whatever it says.
    dtype: String,
    /// Where SAELens put the SAE; the runtime device is the caller's choice.
    #[allow(dead_code)]
    device: String,
    apply_b_dec_to_input: bool,
    normalize_activations: String,
    reshape_activations: String,
    metadata: Map<String, Value>,
}

fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(SaeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors = if ext == "npz" {
        read_npz(path).map(|v| v.into_iter().collect::<HashMap<_, _>>())
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
    }
    .map_err(|e| SaeError::TensorFile {
        path: path.to_path_buf(),
        source: e,
    })?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// The most header bytes a `.npy` array may have (numpy writes under a hundred).
const MAX_NPY_HEADER: usize = 1 << 16;

/// Reads a `.npz` file (a zip of `.npy` arrays, as `numpy.savez` writes it), each array's data
/// read as far as it goes and checked against its header: what is allocated follows the bytes in
/// the file, never the shape a header claims (candle's `read_npz` allocates the claimed shape
/// first, so a 200-byte file could ask for 40 GB).
fn read_npz(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| candle_core::Error::Msg(format!("not a .npz (zip) archive: {e}")))?;
    let mut out = Vec::with_capacity(zip.len().min(64));
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| candle_core::Error::Msg(format!("entry {i}: {e}")))?;
        let name = entry.name().to_string();
        let tensor = read_npy(&mut entry)
            .map_err(|message| candle_core::Error::Msg(format!("{name}: {message}")))?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        out.push((key, tensor));
    }
    Ok(out)
}

/// One `.npy` array (format versions 1–3, little-endian or single-byte types, C or Fortran order).
fn read_npy<R: std::io::Read>(r: &mut R) -> std::result::Result<Tensor, String> {
    use candle_core::DType;
    let io = |e: std::io::Error| e.to_string();
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|e| format!("no .npy header ({e})"))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let header_len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(io)?;
            usize::from(u16::from_le_bytes(b))
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(io)?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if header_len > MAX_NPY_HEADER {
        return Err(format!(
            "a {header_len}-byte .npy header (at most {MAX_NPY_HEADER})"
        ));
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header).map_err(io)?;
    let header = String::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = [format!("'{key}'"), format!("\"{key}\"")]
            .iter()
            .find_map(|k| header.find(k.as_str()).map(|i| i + k.len()))
            .ok_or_else(|| format!("the .npy header has no {key:?}: {header:?}"))?;
        let rest = header[at..].trim_start();
        let rest = rest
            .strip_prefix(':')
            .ok_or_else(|| format!("bad .npy header: {header:?}"))?;
        Ok(rest.trim_start())
    };
    let descr = {
        let v = field("descr")?;
        let quote = v.chars().next().filter(|c| *c == '\'' || *c == '"');
        let quote = quote.ok_or_else(|| format!("bad descr in .npy header: {header:?}"))?;
        let v = &v[1..];
        &v[..v.find(quote).ok_or("unterminated descr")?]
    };
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'|' | b'=') => (None, &descr[1..]),
        Some(b'>') => (Some('>'), &descr[1..]),
        _ => (None, descr),
    };
    let dtype = match code {
        "e" | "f2" => DType::F16,
        "f" | "f4" => DType::F32,
        "d" | "f8" => DType::F64,
        "h" | "i2" => DType::I16,
        "i" | "i4" => DType::I32,
        "q" | "i8" => DType::I64,
        "B" | "u1" => DType::U8,
        "I" | "u4" => DType::U32,
        _ => return Err(format!("array type {descr:?} is not supported")),
    };
    if order == Some('>') && dtype.size_in_bytes() > 1 {
        return Err(format!("big-endian array type {descr:?} is not supported"));
    }
    let fortran = {
        let v = field("fortran_order")?;
        if v.starts_with("True") {
            true
        } else if v.starts_with("False") {
            false
        } else {
            return Err(format!("bad fortran_order in .npy header: {header:?}"));
        }
    };
    let shape: Vec<usize> = {
        let v = field("shape")?;
        let inner = v
            .strip_prefix('(')
            .and_then(|v| v.split_once(')'))
            .map(|(inner, _)| inner)
            .ok_or_else(|| format!("bad shape in .npy header: {header:?}"))?;
        inner
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                d.parse::<usize>()
                    .map_err(|_| format!("bad dimension {d:?}"))
            })
            .collect::<std::result::Result<_, _>>()?
    };
    let bytes = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    // Grow with the data actually there; stop at what the header claims.
    let mut data = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while data.len() < bytes {
        let want = chunk.len().min(bytes - data.len());
        match r.read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if data.len() != bytes {
        return Err(format!(
            "the header says {shape:?} {descr} ({bytes} bytes) but the array holds {} bytes",
            data.len()
        ));
    }
    let err = |e: candle_core::Error| e.to_string();
    if fortran && shape.len() > 1 {
        let reversed: Vec<usize> = shape.iter().rev().copied().collect();
        let dims: Vec<usize> = (0..shape.len()).rev().collect();
        Tensor::from_raw_buffer(&data, dtype, &reversed, &Device::Cpu)
            .and_then(|t| t.permute(dims))
            .and_then(|t| t.contiguous())
            .map_err(err)
    } else {
        Tensor::from_raw_buffer(&data, dtype, &shape, &Device::Cpu).map_err(err)
    }
}

/// Take exactly the `expected` keys (and the `optional` ones if present); anything else is an error.
fn take_exact(
    path: &Path,
    mut tensors: HashMap<String, Tensor>,
    expected: &[&str],
) -> Result<HashMap<String, Tensor>> {
    let mut found: Vec<String> = tensors.keys().cloned().collect();
    found.sort();
    let mut out = HashMap::new();
    for &name in expected {
        let t = tensors
            .remove(name)
            .ok_or_else(|| SaeError::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                found: found.clone(),
            })?;
        out.insert(name.to_string(), t);
    }
    if let Some(name) = tensors.keys().min() {
        return Err(SaeError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            expected: expected.iter().map(|s| s.to_string()).collect(),
        });
    }
    Ok(out)
}

fn dims2(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        [a, b] => Ok((*a, *b)),
        got => Err(SaeError::ShapeMismatch {
            name: name.into(),
            expected: vec![0, 0],
            got: got.to_vec(),
        }),
    }
}

/// Load a Gemma Scope `params.npz` JumpReLU SAE reading residual position `hook`.
/// Gemma Scope does not subtract `b_dec` from the input.
pub fn load_gemma_scope(path: &Path, hook: Resid, device: &Device) -> Result<Sae> {
    let tensors = read_tensors(path, device)?;
    let mut t = take_exact(
        path,
        tensors,
        &["W_enc", "W_dec", "b_enc", "b_dec", "threshold"],
    )?;
    let mut take = |n: &str| t.remove(n).expect("take_exact returned every expected key");
    let (w_enc, w_dec, b_enc, b_dec, threshold) = (
        take("W_enc"),
        take("W_dec"),
        take("b_enc"),
        take("b_dec"),
        take("threshold"),
    );
    let (d_in, d_sae) = dims2("W_enc", &w_enc)?;
    let cfg = SaeConfig {
        architecture: Architecture::JumpRelu,
        d_in,
        d_sae,
        hook,
        apply_b_dec_to_input: false,
        normalize_activations: Normalization::None,
        metadata: Map::new(),
    };
    Sae::new(cfg, w_enc, b_enc, w_dec, b_dec, Some(threshold))
}

/// Parse a SAELens cfg.json text. `path` only names the file in errors.
pub fn parse_saelens_cfg(path: &Path, text: &str) -> Result<SaeConfig> {
    let bad = |key: &str, message: String| SaeError::BadConfig {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| SaeError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    let Value::Object(mut map) = value else {
        return Err(bad("", "cfg.json is not a JSON object".into()));
    };
    let arch_name = match map.get("architecture") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(bad(
                "architecture",
                format!("expected a string, got {other}"),
            ))
        }
        None => return Err(bad("architecture", "missing".into())),
    };
    if !Architecture::SUPPORTED.contains(&arch_name.as_str()) {
        return Err(SaeError::UnknownArchitecture {
            path: path.to_path_buf(),
            got: arch_name,
            supported: Architecture::SUPPORTED,
        });
    }
    let mut arch_map = Map::new();
    for key in ARCH_KEYS {
        if let Some(v) = map.remove(*key) {
            arch_map.insert(key.to_string(), v);
        }
    }
    let architecture: Architecture = serde_json::from_value(Value::Object(arch_map.clone()))
        .map_err(|e| bad("architecture", format!("{arch_name}: {e}")))?;
    // serde ignores extra keys beside a unit variant's tag: check none was left unread
    if let Ok(Value::Object(read)) = serde_json::to_value(&architecture) {
        if let Some(key) = arch_map.keys().find(|k| !read.contains_key(*k)) {
            return Err(bad(
                key,
                format!("not a key of the `{arch_name}` architecture"),
            ));
        }
    }
    let common: RawCommon =
        serde_json::from_value(Value::Object(map)).map_err(|e| SaeError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
    if !matches!(
        common.dtype.as_str(),
        "float32" | "float16" | "bfloat16" | "float64"
    ) {
        return Err(bad("dtype", format!("unknown dtype `{}`", common.dtype)));
    }
    if common.reshape_activations != "none" {
        return Err(bad(
            "reshape_activations",
            format!(
                "`{}` is not supported (only \"none\")",
                common.reshape_activations
            ),
        ));
    }
    let normalize_activations = Normalization::parse(&common.normalize_activations)?;
    let mut metadata = common.metadata;
    let hook = match metadata.remove("hook_name") {
        Some(Value::String(s)) => parse_hook(&s)?,
        _ => return Err(bad("metadata.hook_name", "missing or not a string".into())),
    };
    match metadata.remove("hook_head_index") {
        None | Some(Value::Null) => {}
        Some(v) => {
            return Err(bad(
                "metadata.hook_head_index",
                format!("{v}: per-head SAEs are not residual-stream SAEs"),
            ))
        }
    }
    Ok(SaeConfig {
        architecture,
        d_in: common.d_in,
        d_sae: common.d_sae,
        hook,
        apply_b_dec_to_input: common.apply_b_dec_to_input,
        normalize_activations,
        metadata,
    })
}

/// Load a SAELens SAE directory (`cfg.json` + `sae_weights.safetensors`).
pub fn load_saelens(dir: &Path, device: &Device) -> Result<Sae> {
    let cfg_path = dir.join(SAELENS_CFG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| SaeError::Io {
        path: cfg_path.clone(),
        source: e,
    })?;
    let cfg = parse_saelens_cfg(&cfg_path, &text)?;
    let wpath = dir.join(SAELENS_WEIGHTS);
    let tensors = read_tensors(&wpath, device)?;
    let expected: &[&str] = match cfg.architecture {
        Architecture::JumpRelu => &["W_enc", "W_dec", "b_enc", "b_dec", "threshold"],
        _ => &["W_enc", "W_dec", "b_enc", "b_dec"],
    };
    let mut t = take_exact(&wpath, tensors, expected)?;
    let mut take = |n: &str| t.remove(n).expect("take_exact returned every expected key");
    let (w_enc, w_dec, b_enc, b_dec) = (take("W_enc"), take("W_dec"), take("b_enc"), take("b_dec"));
    let threshold = matches!(cfg.architecture, Architecture::JumpRelu).then(|| take("threshold"));
    Sae::new(cfg, w_enc, b_enc, w_dec, b_dec, threshold)
}

/// The cfg.json SAELens reads for `cfg`.
pub fn saelens_cfg_json(cfg: &SaeConfig) -> Value {
    let mut map = Map::new();
    map.insert("d_in".into(), cfg.d_in.into());
    map.insert("d_sae".into(), cfg.d_sae.into());
    map.insert("dtype".into(), "float32".into());
    map.insert("device".into(), "cpu".into());
    map.insert(
        "apply_b_dec_to_input".into(),
        cfg.apply_b_dec_to_input.into(),
    );
    map.insert(
        "normalize_activations".into(),
        cfg.normalize_activations.as_str().into(),
    );
    map.insert("reshape_activations".into(), "none".into());
    let mut metadata = cfg.metadata.clone();
    metadata.insert("hook_name".into(), hook_name(cfg.hook).into());
    metadata.insert("hook_head_index".into(), Value::Null);
    map.insert("metadata".into(), Value::Object(metadata));
    if let Ok(Value::Object(arch)) = serde_json::to_value(&cfg.architecture) {
        map.extend(arch);
    }
    Value::Object(map)
}

impl Sae {
    /// Load a Gemma Scope `params.npz`; see [`load_gemma_scope`].
    pub fn load_gemma_scope(path: &Path, hook: Resid, device: &Device) -> Result<Sae> {
        load_gemma_scope(path, hook, device)
    }

    /// Load a SAELens directory; see [`load_saelens`].
    pub fn load_saelens(dir: &Path, device: &Device) -> Result<Sae> {
        load_saelens(dir, device)
    }

    /// Write this SAE in SAELens' layout into `dir` (created if absent). Each file is written
    /// to a temporary file beside it and renamed into place.
    pub fn save_saelens(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SaeError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert("W_enc".into(), self.w_enc.clone());
        tensors.insert("W_dec".into(), self.w_dec.clone());
        tensors.insert("b_enc".into(), self.b_enc.clone());
        tensors.insert("b_dec".into(), self.b_dec.clone());
        if let Some(t) = &self.threshold {
            tensors.insert("threshold".into(), t.clone());
        }
        write_safetensors_atomic(&tensors, &dir.join(SAELENS_WEIGHTS))?;
        let cfg_path = dir.join(SAELENS_CFG);
        let json = serde_json::to_vec_pretty(&saelens_cfg_json(&self.cfg)).map_err(|e| {
            SaeError::Json {
                path: cfg_path.clone(),
                source: e,
            }
        })?;
        write_bytes_atomic(&json, &cfg_path)
    }
}

/// Write `bytes` to `path` atomically ([`crate::model::write_atomic`]).
pub(crate) fn write_bytes_atomic(bytes: &[u8], path: &Path) -> Result<()> {
    crate::model::write_atomic(path, bytes).map_err(|e| write_error(path, e))
}

/// Write `tensors` as safetensors to `path` atomically.
pub(crate) fn write_safetensors_atomic(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    crate::model::weights::save_safetensors_atomic(&cpu, path).map_err(|e| write_error(path, e))
}

fn write_error(path: &Path, e: crate::model::ModelError) -> SaeError {
    match e {
        crate::model::ModelError::Io { path, source } => SaeError::Io { path, source },
        crate::model::ModelError::Tensor(source) => SaeError::TensorFile {
            path: path.to_path_buf(),
            source,
        },
        other => SaeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPK_CFG: &str = r#"{"d_in": 64, "d_sae": 256, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": true, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "m", "hook_name": "blocks.3.hook_resid_pre", "hook_head_index": null,
        "prepend_bos": true}, "k": 4, "rescale_acts_by_decoder_norm": false, "architecture": "topk"}"#;

    #[test]
    fn saelens_cfg_round_trips_through_json() {
        let p = Path::new("cfg.json");
        let cfg = parse_saelens_cfg(p, TOPK_CFG).unwrap();
        assert_eq!(cfg.hook, Resid::In(3));
        assert_eq!(
            cfg.architecture,
            Architecture::TopK {
                k: 4,
                rescale_acts_by_decoder_norm: false
            }
        );
        let again = parse_saelens_cfg(p, &saelens_cfg_json(&cfg).to_string()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn saelens_cfg_rejects_unknown_and_misplaced_keys() {
        let p = Path::new("cfg.json");
        let extra = TOPK_CFG.replace("\"k\": 4", "\"k\": 4, \"l1_coefficient\": 5");
        assert!(matches!(
            parse_saelens_cfg(p, &extra),
            Err(SaeError::Json { .. })
        ));
        // `k` on a JumpReLU config is not silently ignored
        let jr = TOPK_CFG
            .replace("\"rescale_acts_by_decoder_norm\": false, ", "")
            .replace("\"topk\"", "\"jumprelu\"");
        let err = parse_saelens_cfg(p, &jr).unwrap_err();
        assert!(
            matches!(err, SaeError::BadConfig { ref key, .. } if key == "k"),
            "{err}"
        );
        let norm = TOPK_CFG.replace(
            "\"normalize_activations\": \"none\"",
            "\"normalize_activations\": \"layer_norm\"",
        );
        assert!(matches!(
            parse_saelens_cfg(p, &norm),
            Err(SaeError::UnsupportedNormalization { .. })
        ));
        let head = TOPK_CFG.replace("\"hook_head_index\": null", "\"hook_head_index\": 2");
        assert!(parse_saelens_cfg(p, &head).is_err());
    }
}
