//! Where models come from: sharded safetensors directories, the local Hugging Face cache layout,
//! and the errors when something is missing. The CLI's chat loop on the real model.

use std::collections::HashMap;
use std::path::Path;

use crate::common::golden_dir;
use candle_core::{DType, Device, Tensor};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::load::{hub_snapshot, ChatModel, ModelSource};
use sails::model::weights::WeightMap;

fn logits_of(dir: &Path) -> Vec<f32> {
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(dir, &Device::Cpu).unwrap();
    let model = Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 300, 2, 99]], &Device::Cpu).unwrap();
    let out = model.forward(Forward::logits(&ids, None), None).unwrap();
    out.logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let src = golden_dir().join("tiny-llama");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    for (i, name) in names.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert((*name).clone(), all[*name].clone());
        weight_map.insert(
            (*name).clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            tmp.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(logits_of(tmp.path()), logits_of(&src));
}

#[test]
fn hub_ids_resolve_through_the_local_cache_layout_only() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden_dir().join("tiny-llama").join(f), snapshot.join(f)).unwrap();
    }
    assert_eq!(
        hub_snapshot("tiny-org/tiny-llama", cache.path()).unwrap(),
        snapshot
    );
    assert_eq!(
        logits_of(&snapshot),
        logits_of(&golden_dir().join("tiny-llama"))
    );

    // Not in the cache: a clear error saying nothing can be downloaded.
    let err = hub_snapshot("tiny-org/absent", cache.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny-org/absent") && err.contains("not in the local Hugging Face cache"),
        "{err}"
    );

    // The snapshot has no tokenizer: loading it as a chat model names the missing file.
    let err = ChatModel::load(
        &ModelSource::HfDir(snapshot.clone()),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn model_argument_that_is_nothing_known_is_refused() {
    let err = ModelSource::resolve("./no/such/model/here")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/model/here"), "{err}");
}

#[test]
fn chat_keeps_the_conversation_and_reports_speed() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(["chat", "--max-new-tokens", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Greedy SmolLM2 answers the first question with Paris (golden `benign_question`), and the
    // second turn only makes sense with the first one kept: it names Rome.
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(stdout.contains("Rome"), "{stdout}");
    assert_eq!(stderr.matches("tokens/s]").count(), 2, "{stderr}");
}
