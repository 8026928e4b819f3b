//! The OpenAI chat-completions wire format: what a request may hold, what a reply and a stream
//! chunk look like, and the error body every failure gets.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::chat::Message;
use crate::model::generate::{FinishReason, Sampling};

/// A `POST /v1/chat/completions` body. Fields this server does not act on but that clients send
/// by default (`user`, `presence_penalty` at 0, …) are accepted and ignored; fields that would
/// change the reply and that it cannot honour are refused (see [`ChatRequest::check`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
}

/// A message's content: a string, or a list of parts of which only text parts are understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A request that cannot be served as asked: a 400 with the parameter named.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub param: Option<&'static str>,
    pub message: String,
}

impl BadRequest {
    fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            message: message.into(),
        }
    }
}

/// What a checked request asks the engine for.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub messages: Vec<Message>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop_strings: Vec<String>,
}

impl ChatRequest {
    /// The request as the engine's terms, or why it cannot be served. `max_tokens_limit` caps
    /// a reply's budget and is the budget when the request names none.
    pub fn check(&self, max_tokens_limit: usize) -> Result<Asked, BadRequest> {
        if self.n.unwrap_or(1) != 1 {
            return Err(BadRequest::new("n", "only n = 1 is supported"));
        }
        if self.logprobs == Some(true) {
            return Err(BadRequest::new("logprobs", "logprobs are not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(BadRequest::new("tools", "tools are not supported"));
        }
        if let Some(format) = &self.response_format {
            if format.get("type").and_then(Value::as_str).unwrap_or("text") != "text" {
                return Err(BadRequest::new(
                    "response_format",
                    "only the text response format is supported",
                ));
            }
        }
        for (param, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(BadRequest::new(param, format!("{param} is not supported")));
            }
        }
        if self.messages.is_empty() {
            return Err(BadRequest::new("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(BadRequest::new(
                                    "messages",
                                    format!("messages[{i}]: content parts of type {kind:?} are not supported (text only)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(Message::new(m.role.clone(), content));
        }
        let max_new_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(BadRequest::new(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ))
            }
            Some(n) if n > max_tokens_limit => {
                return Err(BadRequest::new(
                    "max_tokens",
                    format!("max_tokens {n} is above this server's limit of {max_tokens_limit}"),
                ))
            }
            Some(n) => n,
            None => max_tokens_limit,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(BadRequest::new(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(BadRequest::new(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let sampling = if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                temperature,
                top_p,
                seed: self.seed.unwrap_or(0),
            }
        };
        let stop_strings = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(BadRequest::new("stop", "at most 4 stop strings"))
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(Asked {
            messages,
            max_new_tokens,
            sampling,
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
        })
    }
}

/// OpenAI's name for why a reply ended.
pub fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::MaxNewTokens => "length",
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole reply (`stream: false`).
pub fn completion(
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: FinishReason,
    usage: Usage,
) -> Value {
    serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(finish),
        }],
        "usage": usage,
    })
}

/// One chunk of a streamed reply: the role first, then content deltas, then the finish reason
/// with an empty delta, and with `include_usage` a last chunk with no choices and the usage.
pub fn chunk(
    id: &str,
    model: &str,
    created: u64,
    delta: Value,
    finish: Option<FinishReason>,
) -> Value {
    serde_json::json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish.map(finish_reason),
        }],
    })
}

pub fn usage_chunk(id: &str, model: &str, created: u64, usage: Usage) -> Value {
    serde_json::json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    })
}

/// The error body OpenAI's clients read: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(kind: &str, message: &str, param: Option<&str>) -> Value {
    serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": null}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: Value) -> ChatRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn requests_map_to_the_engine_or_name_the_parameter_at_fault() {
        let base = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}],
            "temperature": 0,
            "max_tokens": 7,
            "stop": "\n",
            "user": "ignored",
        });
        let asked = request(base.clone()).check(64).unwrap();
        assert_eq!(asked.messages, vec![Message::user("Hi!")]);
        assert_eq!(asked.max_new_tokens, 7);
        assert_eq!(asked.sampling, Sampling::Greedy);
        assert_eq!(asked.stop_strings, vec!["\n".to_owned()]);

        let with = |key: &str, value: Value| {
            let mut r = base.clone();
            r[key] = value;
            request(r).check(64)
        };
        assert_eq!(
            with("max_tokens", 65.into()).unwrap_err().param,
            Some("max_tokens")
        );
        assert_eq!(
            with("max_tokens", 0.into()).unwrap_err().param,
            Some("max_tokens")
        );
        assert_eq!(with("n", 2.into()).unwrap_err().param, Some("n"));
        assert_eq!(
            with("temperature", 3.0.into()).unwrap_err().param,
            Some("temperature")
        );
        assert_eq!(with("top_p", 0.0.into()).unwrap_err().param, Some("top_p"));
        assert_eq!(
            with("logprobs", true.into()).unwrap_err().param,
            Some("logprobs")
        );
        assert_eq!(
            with("messages", serde_json::json!([])).unwrap_err().param,
            Some("messages")
        );
        let image = serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]);
        assert!(with("messages", image)
            .unwrap_err()
            .message
            .contains("image_url"));
        // No budget named: the server's limit; a temperature: seeded top-p.
        let mut r = base.clone();
        r.as_object_mut().unwrap().remove("max_tokens");
        r["temperature"] = 0.7.into();
        r["seed"] = 5.into();
        let asked = request(r).check(64).unwrap();
        assert_eq!(asked.max_new_tokens, 64);
        assert_eq!(
            asked.sampling,
            Sampling::TopP {
                temperature: 0.7,
                top_p: 1.0,
                seed: 5
            }
        );
    }
}
