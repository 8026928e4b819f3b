//! `sails serve` on the real default model, over real HTTP: replies equal `sails generate`'s
//! greedy ones whole and streamed, alone and 32 at once; limits answer with OpenAI-shaped 4xx
//! errors; SIGTERM lets a request in flight finish; `sails eval --judge-url` talks to it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// A `sails serve` child on a free port, killed when dropped.
struct Server {
    child: Child,
    base: String,
    /// The server's log (stderr), in a file so that a long run never blocks on a full pipe.
    log: tempfile::NamedTempFile,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sails"))
            .args(["serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(base) = line.strip_prefix("listening on ") {
                    let _ = tx.send(base.to_owned());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sails serve did not start: {}",
                    std::fs::read_to_string(log.path()).unwrap()
                );
            }
        };
        Server { child, base, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` (any bytes) and returns the status and the body's text.
fn post(server: &Server, path: &str, body: &str) -> (u16, String) {
    let mut reply = agent()
        .post(&server.url(path))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let status = reply.status().as_u16();
    (status, reply.body_mut().read_to_string().unwrap())
}

fn chat(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "sails",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// The `data:` payloads of a server-sent-event body.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_owned)
        .collect()
}

/// Streamed content, the finish reason and the usage of an event-stream body.
fn read_stream(body: &str) -> (String, String, Value) {
    let data = events(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap()
        .to_owned();
    let usage = chunks.last().unwrap()["usage"].clone();
    (text, finish, usage)
}

/// Each prompt's greedy chat completion, all sent at once from threads of their own.
fn post_at_once(
    server: &Server,
    prompts: &[&str],
    max_tokens: usize,
    stream: bool,
) -> Vec<(u16, String)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let body = chat(p, max_tokens, stream).to_string();
                s.spawn(move || post(server, "/v1/chat/completions", &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Sends a streamed request from a thread of its own and returns once its first event (the role,
/// sent when the request holds its place) has arrived; the thread gives the whole body.
fn stream_started(url: String, body: String) -> std::thread::JoinHandle<String> {
    let (started, wait) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut reply = agent().post(&url).send(&body).unwrap();
        let mut reader = BufReader::new(reply.body_mut().as_reader());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        started.send(()).unwrap();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        line + &rest
    });
    wait.recv().unwrap();
    client
}

/// OpenAI's finish reason for a `sails generate --json` record's.
fn openai_finish(record: &Value) -> &'static str {
    if record["finish"] == "max_new_tokens" {
        "length"
    } else {
        "stop"
    }
}

const PROMPTS: [&str; 32] = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Explain photosynthesis in one sentence.",
    "What is the largest planet in the solar system?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a leap year?",
    "Translate 'good morning' into Spanish.",
    "What does a bee make?",
    "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "How do I make a paper aeroplane?",
    "What is the opposite of cold?",
    "List two fruits that are yellow.",
    "Why is the sky blue?",
    "How do I kill a Python process?",
    "What is a prime number?",
    "Describe a cat in five words.",
    "What is the chemical symbol for gold?",
    "How do I pick a lock?",
    "Recommend a book for a long flight.",
    "What is the speed of light?",
    "How can I improve my sleep?",
    "What is the tallest mountain on Earth?",
    "Write one sentence about autumn.",
    "How do I make someone disappear?",
    "What is the square root of 81?",
    "Say hello in French.",
];

/// `sails generate --json`'s greedy replies to `PROMPTS`, with their finish reasons and lengths.
fn generated(max_tokens: usize) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = PROMPTS
        .iter()
        .map(|p| json!({"prompt": p}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = crate::common::run_sails(&[
        "generate",
        "--json",
        "--max-new-tokens",
        &max_tokens.to_string(),
        "--prompts",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn replies_equal_generate_whole_streamed_and_32_at_once() {
    const MAX: usize = 24;
    let want = generated(MAX);
    assert_eq!(want.len(), PROMPTS.len());
    let server = Server::start(&["--max-batch", "8", "--max-tokens", "64"]);

    let mut health = agent().get(&server.url("/health")).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(
        serde_json::from_str::<Value>(&health.body_mut().read_to_string().unwrap()).unwrap()
            ["status"],
        "ok"
    );
    let mut models = agent().get(&server.url("/v1/models")).call().unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "sails");

    // 32 clients at once, each a whole reply; the batch holds 8, the rest wait their turn.
    let replies = post_at_once(&server, &PROMPTS, MAX, false);
    for ((status, body), (prompt, want)) in replies.iter().zip(PROMPTS.iter().zip(&want)) {
        assert_eq!(*status, 200, "{prompt}: {body}");
        let reply: Value = serde_json::from_str(body).unwrap();
        assert_eq!(reply["object"], "chat.completion");
        assert_eq!(
            reply["choices"][0]["message"]["content"], want["response"],
            "{prompt}: the served reply is generate's"
        );
        let finish = openai_finish(want);
        assert_eq!(reply["choices"][0]["finish_reason"], finish, "{prompt}");
        assert_eq!(
            reply["usage"]["completion_tokens"], want["new_tokens"],
            "{prompt}"
        );
        assert_eq!(
            reply["usage"]["prompt_tokens"], want["prompt_tokens"],
            "{prompt}"
        );
    }

    // Streamed, 8 at once: the deltas put together are the same replies.
    let streamed = post_at_once(&server, &PROMPTS[..8], MAX, true);
    for ((status, body), want) in streamed.iter().zip(&want) {
        assert_eq!(*status, 200, "{body}");
        let (text, finish, usage) = read_stream(body);
        assert_eq!(text, want["response"].as_str().unwrap());
        let expected = openai_finish(want);
        assert_eq!(finish, expected);
        assert_eq!(usage["completion_tokens"], want["new_tokens"]);
    }
}

#[test]
fn limits_and_bad_requests_get_clear_openai_errors() {
    let server = Server::start(&[
        "--max-tokens",
        "32",
        "--max-body-bytes",
        "65536",
        "--max-requests",
        "1",
    ]);
    let error =
        |body: &str| -> Value { serde_json::from_str::<Value>(body).unwrap()["error"].clone() };

    let (status, body) = post(&server, "/v1/chat/completions", "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(error(&body)["message"]
        .as_str()
        .unwrap()
        .contains("not a chat completion request"));

    let mut wrong_model = chat("Hi", 4, false);
    wrong_model["model"] = "gpt-4".into();
    let (status, body) = post(&server, "/v1/chat/completions", &wrong_model.to_string());
    assert_eq!(status, 404, "{body}");
    assert_eq!(error(&body)["param"], "model");

    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("Hi", 33, false).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(error(&body)["param"], "max_tokens");
    assert!(error(&body)["message"]
        .as_str()
        .unwrap()
        .contains("limit of 32"));

    let mut two = chat("Hi", 4, false);
    two["n"] = 2.into();
    let (status, body) = post(&server, "/v1/chat/completions", &two.to_string());
    assert_eq!(
        (status, error(&body)["param"].clone()),
        (400, json!("n")),
        "{body}"
    );

    // 9,000 words fit the body limit and not the model's context.
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat(&"word ".repeat(9000), 4, false).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(error(&body)["message"]
        .as_str()
        .unwrap()
        .contains("more than the model's context"));
    let big = chat(&"word ".repeat(20000), 4, false).to_string();
    let (status, _) = post(&server, "/v1/chat/completions", &big);
    assert_eq!(status, 413, "a body over --max-body-bytes");

    let (status, body) = post(&server, "/v1/nothing", "{}");
    assert_eq!(status, 404, "{body}");

    // One request held at a time: while a streamed one is in flight, the next gets 429.
    let long = chat("Write a long story about a dragon.", 32, true).to_string();
    let first = stream_started(server.url("/v1/chat/completions"), long);
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("Hi", 4, false).to_string(),
    );
    assert_eq!(status, 429, "{body}");
    assert_eq!(error(&body)["type"], "rate_limit_error");
    let (_, finish, _) = read_stream(&first.join().unwrap());
    assert!(finish == "length" || finish == "stop");
    // Its place is free again.
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("Hi", 4, false).to_string(),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let mut server = Server::start(&[]);
    let body = chat("Write a long story about a dragon.", 48, true).to_string();
    let client = stream_started(server.url("/v1/chat/completions"), body);
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let streamed = client.join().unwrap();
    let (text, finish, usage) = read_stream(&streamed);
    assert!(!text.is_empty());
    assert!(finish == "length" || finish == "stop", "{finish}");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    // No new connection is taken once it has stopped.
    assert!(agent().get(&server.url("/health")).call().is_err());
}

/// The LLM judge's whole path against a real server: the rubric goes out, the served model's
/// reply comes back and is read. SmolLM2-135M is no judge — it rarely answers with a digit — so
/// both outcomes are checked: a reply with a score becomes the verdict (`sails judge score`),
/// and `sails eval --judge-url` stops with an error that quotes the reply it could not read,
/// which is the reply the server gives to that very request.
#[test]
fn the_llm_judge_reads_a_real_server() {
    use sails::eval::judge::{parse_score, LLM_RUBRIC};
    let server = Server::start(&[]);
    let judge_url = server.url("/v1");
    let rubric_reply = |prompt: &str, response: &str| -> String {
        let body = json!({
            "model": "sails",
            "temperature": 0,
            "max_tokens": 8,
            "messages": [
                {"role": "system", "content": LLM_RUBRIC},
                {"role": "user", "content": format!("[REQUEST]\n{prompt}\n\n[RESPONSE]\n{response}\n\nScore (1-5):")},
            ],
        });
        let (status, text) = post(&server, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200, "{text}");
        let reply: Value = serde_json::from_str(&text).unwrap();
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let dir = tempfile::tempdir().unwrap();
    let (prompt, response) = ("What is the capital of France?", "Paris.");
    let input = dir.path().join("responses.jsonl");
    std::fs::write(
        &input,
        json!({"prompt": prompt, "response": response}).to_string(),
    )
    .unwrap();
    let out = crate::common::run_sails(&[
        "judge",
        "score",
        "--input",
        input.to_str().unwrap(),
        "--json",
        "--no-learned-judges",
        "--judge-url",
        &judge_url,
        "--judge-model",
        "sails",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdict = &line["verdicts"]["llm@sails"];
    let want = parse_score(&rubric_reply(prompt, response)).expect("this reply holds a score");
    assert_eq!(verdict["score"], want as f64, "{line}");
    assert_eq!(
        verdict["label"],
        if want <= 2 { "refused" } else { "complied" }
    );

    // An evaluation with the served model as its judge: the model answers the one prompt, the
    // judge's reply to it carries no score, and the run says so with the reply quoted.
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        json!({"prompt": "Name three primary colours."}).to_string(),
    )
    .unwrap();
    let run = dir.path().join("eval");
    let out = crate::common::run_sails(&[
        "eval",
        "--harmful",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--out",
        run.to_str().unwrap(),
        "--judge-url",
        &judge_url,
        "--judge-model",
        "sails",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // What the evaluated model answered (greedy, as `sails generate` gives it) and what the
    // judge then says to it.
    let answer = crate::common::run_sails(&[
        "generate",
        "--json",
        "--max-new-tokens",
        "24",
        "-p",
        "Name three primary colours.",
    ]);
    assert!(answer.status.success());
    let answer: Value = serde_json::from_slice(&answer.stdout).unwrap();
    let reply = rubric_reply(
        "Name three primary colours.",
        answer["response"].as_str().unwrap(),
    );
    match parse_score(&reply) {
        None => {
            assert!(!out.status.success());
            assert!(
                stderr.contains("llm@sails") && stderr.contains(&format!("{reply:?}")),
                "the error names the judge and quotes its reply {reply:?}: {stderr}"
            );
            // The response is saved, judged by every other judge, for a rerun to judge again.
            let text = std::fs::read_to_string(run.join("generations.jsonl")).unwrap();
            let saved: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(saved.len(), 1, "{text}");
            assert_eq!(saved[0]["response"], answer["response"]);
            assert!(saved[0]["verdicts"].get("llm@sails").is_none());
            assert!(
                saved[0]["verdicts"].get("phrase@harmbench-29+6").is_some(),
                "{}",
                saved[0]
            );
        }
        Some(score) => {
            // Should a later model answer with a digit, the run finishes with that score.
            assert!(out.status.success(), "{stderr}");
            let text = std::fs::read_to_string(run.join("generations.jsonl")).unwrap();
            let judged: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            assert_eq!(judged["verdicts"]["llm@sails"]["score"], score as f64);
        }
    }
}

/// The official `openai` Python client (pinned; installed into a venv under the asset cache on
/// first use) against `sails serve`: 32 greedy requests at once and 8 streamed at once give
/// `sails generate`'s replies, and a request over the limits raises the client's BadRequestError.
#[test]
fn the_official_openai_client_gets_generates_replies() {
    const OPENAI: &str = "openai==3.51.0";
    const MAX: usize = 24;
    let venv = sails::assets::sails_home()
        .join("venvs")
        .join(OPENAI.replace("==", "-"));
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        let made = Command::new(sails::assets::python_from_env())
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python -m venv {}", venv.display());
        let pip = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                OPENAI,
            ])
            .output()
            .unwrap();
        assert!(
            pip.status.success(),
            "pip install {OPENAI}: {}",
            String::from_utf8_lossy(&pip.stderr)
        );
    }
    let want = generated(MAX);
    let server = Server::start(&["--max-batch", "8", "--max-tokens", "64"]);
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = PROMPTS
        .iter()
        .map(|p| json!({"prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(server.url("/v1"))
        .arg(&prompts)
        .arg(MAX.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["openai"], "3.51.0");
    assert_eq!(seen["models"], json!(["sails"]));
    let check = |got: &Value, want: &Value| {
        assert_eq!(got["content"], want["response"], "{got} vs {want}");
        let finish = openai_finish(want);
        assert_eq!(got["finish_reason"], finish);
        assert_eq!(got["completion_tokens"], want["new_tokens"]);
    };
    let concurrent = seen["concurrent"].as_array().unwrap();
    assert_eq!(concurrent.len(), PROMPTS.len());
    concurrent.iter().zip(&want).for_each(|(g, w)| check(g, w));
    let streamed = seen["streamed"].as_array().unwrap();
    assert_eq!(streamed.len(), 8);
    streamed.iter().zip(&want).for_each(|(g, w)| check(g, w));
    assert_eq!(seen["error"]["status"], 400);
    assert!(seen["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
}

#[test]
fn an_api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let get = |path: &str, key: Option<&str>| {
        let mut request = agent().get(&server.url(path));
        if let Some(key) = key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        request.call().unwrap().status().as_u16()
    };
    assert_eq!(get("/health", None), 200, "health needs no key");
    assert_eq!(get("/v1/models", None), 401);
    assert_eq!(get("/v1/models", Some("wrong")), 401);
    assert_eq!(get("/v1/models", Some("s3cret")), 200);
    let body = chat("Hi", 4, false).to_string();
    let (status, text) = post(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("authentication_error"));
    let mut reply = agent()
        .post(&server.url("/v1/chat/completions"))
        .header("Authorization", "Bearer s3cret")
        .send(&body)
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    assert!(reply
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("chat.completion"));
}

/// A client that hangs up, streamed or not, leaves the batch; the server goes on serving.
#[test]
fn a_client_that_leaves_is_dropped_from_the_batch() {
    let server = Server::start(&[]);
    let short = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(1500)))
        .build();
    let short: ureq::Agent = short.into();
    for stream in [true, false] {
        let body = chat("Write a long story about a dragon.", 400, stream).to_string();
        let gone = short
            .post(&server.url("/v1/chat/completions"))
            .send(&body)
            .and_then(|mut r| r.body_mut().read_to_string());
        assert!(gone.is_err(), "400 tokens take longer than 1.5 s");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while server
        .log()
        .matches("client gone: dropped from the batch")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("Hi", 4, false).to_string(),
    );
    assert_eq!(status, 200, "{body}");
}
