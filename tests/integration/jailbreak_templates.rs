//! PyRIT's jailbreak templates read from the fetched wheel and filled in exactly as PyRIT fills
//! them (PyYAML + Jinja2), every template, against tests/fixtures/golden/pyrit-jailbreak-templates.json
//! (made by tests/golden/make_jailbreak_golden.py).

use sails::data::jailbreaks::load_jailbreak_templates;
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Golden {
    requests: Vec<String>,
    templates: Vec<GoldenTemplate>,
}

#[derive(Deserialize)]
struct GoldenTemplate {
    file: String,
    name: String,
    value_sha256: String,
    filled_sha256: Vec<String>,
    #[serde(default)]
    filled: Vec<String>,
}

fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[test]
fn every_template_reads_and_fills_as_pyrit_does() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/golden/pyrit-jailbreak-templates.json"
    );
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ours = load_jailbreak_templates().expect("the templates asset");
    let files: Vec<String> = ours.iter().map(|t| format!("{}.yaml", t.id)).collect();
    let want: Vec<&str> = golden.templates.iter().map(|t| t.file.as_str()).collect();
    assert_eq!(files, want);
    assert_eq!(ours.len(), 90);
    let mut kept_full = 0;
    for (t, g) in ours.iter().zip(&golden.templates) {
        assert_eq!(t.name, g.name, "{}", g.file);
        assert_eq!(sha(&t.text), g.value_sha256, "{}: the YAML value", g.file);
        for (i, request) in golden.requests.iter().enumerate() {
            let filled = t.fill(request);
            if let Some(full) = g.filled.get(i) {
                assert_eq!(&filled, full, "{}", g.file);
                kept_full += 1;
            }
            assert_eq!(sha(&filled), g.filled_sha256[i], "{}: {filled:?}", g.file);
        }
    }
    assert_eq!(
        kept_full, 6,
        "the golden file keeps three templates' full texts"
    );
}
