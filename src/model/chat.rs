//! Chat templates: the model's own Jinja template rendered with minijinja.
//!
//! The environment mirrors Hugging Face's `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, `{% break %}` / `{% continue %}`, dicts in insertion order, Python
//! string/dict/list methods (`.strip()`, `.startswith()`,
//! `.items()`, ...) through minijinja-contrib's pycompat, a `raise_exception(msg)` function, the
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token` variables, and a `tojson`
//! filter that writes JSON as Python's `json.dumps` does (no HTML escaping). Not provided:
//! `tools`/`documents` variables and HF's `strftime_now` (templates that test
//! `strftime_now is defined` take their fallback).

use std::collections::BTreeMap;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ChatError {
    #[error("chat template does not parse: {message}")]
    Syntax { message: String },
    #[error("chat template failed while rendering: {message}")]
    Render { message: String },
}

pub type Result<T> = std::result::Result<T, ChatError>;

/// Instructions one rendering may execute (minijinja's fuel): a template that loops without end
/// fails with "engine ran out of fuel" instead of hanging.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Nesting depth (macro calls, includes, blocks) one rendering may reach before it fails.
pub const TEMPLATE_RECURSION_LIMIT: usize = 100;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (GGUF `tokenizer.chat_template` or `tokenizer_config.json`'s
    /// `chat_template`). A syntax error is reported here, with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template comes with the model file: one that loops or recurses without end must
        // fail, not hang. Real chat templates need a few thousand instructions per message.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_test("divisibleby", is_divisible_by);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::Syntax {
                message: describe(&e),
            })?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: None,
            eos_token: None,
        })
    }

    /// Sets the `bos_token` variable.
    pub fn with_bos_token(mut self, token: impl Into<String>) -> Self {
        self.bos_token = Some(token.into());
        self
    }

    /// Sets the `eos_token` variable.
    pub fn with_eos_token(mut self, token: impl Into<String>) -> Self {
        self.eos_token = Some(token.into());
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, the template's opening of
    /// the assistant's turn is appended.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render {
                message: describe(&e),
            })?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        template.render(ctx).map_err(|e| ChatError::Render {
            message: describe(&e),
        })
    }
}

/// The error with its chain of causes and the template line, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `x is divisibleby(n)`: minijinja's own test computes `x % n` unchecked, a panic for `n = 0`.
fn is_divisible_by(v: &Value, other: &Value) -> bool {
    if let (Ok(a), Ok(b)) = (i128::try_from(v.clone()), i128::try_from(other.clone())) {
        return a.checked_rem(b) == Some(0);
    }
    if let (Ok(a), Ok(b)) = (f64::try_from(v.clone()), f64::try_from(other.clone())) {
        return b != 0.0 && a % b == 0.0;
    }
    false
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// The largest `tojson(indent=…)` a template may ask for.
const MAX_TOJSON_INDENT: usize = 64;

/// The deepest nesting `tojson` writes (the recursion stays well inside the stack).
const MAX_TOJSON_DEPTH: usize = 256;

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as HF's template
/// environment defines `tojson` (maps keep their order).
fn tojson(
    value: &Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_TOJSON_INDENT) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent is at most {MAX_TOJSON_INDENT}"),
        ));
    }
    let mut out = String::new();
    write_python_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    if depth > MAX_TOJSON_DEPTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: a value nested more than {MAX_TOJSON_DEPTH} deep"),
        ));
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Python: ", " and ": " without indent; "," + newline and ": " with one.
    let item_sep = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => out.push_str(&v.to_string()),
        K::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        K::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_owned(),
                    None => k.to_string(),
                };
                out.push_str(&quote(&key));
                out.push_str(": ");
                write_python_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a value of kind {other:?}"),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            r#"{{ {"b": "<x>", "a": [1, 2.5, none, true]} | tojson }}|{{ {"b": "é", "a": [1]} | tojson(indent=2) }}"#,
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"b\": \"<x>\", \"a\": [1, 2.5, null, true]}|{\n  \"b\": \"é\",\n  \"a\": [\n    1\n  ]\n}"
        );
    }
}
