//! serve — the model (and its adapter) behind an OpenAI-compatible HTTP API:
//! `POST /v1/chat/completions` (streamed as server-sent events or whole), `GET /v1/models`,
//! `GET /health`.
//!
//! Requests are parsed and checked on the async side (axum on tokio) and handed to one engine
//! thread that owns the decode loop: it admits waiting requests into the running batch between
//! decode steps and hands each step's text back to the request it belongs to
//! ([`Batcher`](crate::model::batcher::Batcher)). A client that goes away is dropped from the
//! batch at the next step. Limits: the request body's size, a reply's token budget, the model's
//! context, how many requests are held at once (the rest get 429) and how many decode together.

pub mod api;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use thiserror::Error;
use tokio::sync::{mpsc as async_mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::model::batcher::{Batcher, SequenceId, SequenceParams};
use crate::model::generate::FinishReason;
use crate::model::load::ChatModel;
use api::{ChatRequest, Usage};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine thread failed: {0}")]
    Engine(String),
}

/// The server's limits and name.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeOptions {
    /// The name `/v1/models` lists and requests must use.
    pub model_name: String,
    /// Sequences decoded together; more requests wait for a place.
    pub max_batch: usize,
    /// Requests held at once, decoding or waiting; beyond it a request gets 429.
    pub max_requests: usize,
    /// Largest reply budget a request may ask for, and the budget of one that names none.
    pub max_tokens: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer <key>` (401 otherwise).
    pub api_key: Option<String>,
}

/// What the engine sends back to a request.
#[derive(Debug)]
enum Reply {
    Text(String),
    Done { finish: FinishReason, usage: Usage },
    Failed(String),
}

/// A checked request on its way to the engine.
struct Job {
    id: SequenceId,
    prompt: Vec<u32>,
    params: SequenceParams,
    replies: async_mpsc::UnboundedSender<Reply>,
}

struct Shared {
    model: Arc<ChatModel>,
    options: ServeOptions,
    jobs: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// Serves until `shutdown` completes, then stops taking connections, lets the requests in
/// flight finish and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: ChatModel,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let model = Arc::new(model);
    let (jobs, inbox) = mpsc::channel::<Job>();
    let engine = {
        let model = Arc::clone(&model);
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name("sails-engine".into())
            .spawn(move || run_engine(&model, inbox, max_batch))?
    };
    let shared = Arc::new(Shared {
        model,
        permits: Arc::new(Semaphore::new(options.max_requests.max(1))),
        options,
        jobs,
        next_id: AtomicU64::new(0),
    });
    let app = router(Arc::clone(&shared));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // Every handler is done: dropping the last sender ends the engine's loop.
    drop(shared);
    engine
        .join()
        .map_err(|_| ServeError::Engine("the engine thread panicked".into()))
}

fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.options.max_body_bytes;
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "no such route",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// `None` when the request may go on; the 401 when a key is required and not the one given.
fn unauthorised(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let key = shared.options.api_key.as_deref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(key)).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "this server needs an API key: send Authorization: Bearer <key>",
            None,
        )
    })
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(denied) = unauthorised(&shared, &headers) {
        return denied;
    }
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": shared.options.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "sails",
        }],
    }))
    .into_response()
}

fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    (status, Json(api::error_body(kind, message, param))).into_response()
}

fn bad_request(message: &str, param: Option<&str>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        param,
    )
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = unauthorised(&shared, &headers) {
        return denied;
    }
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad_request(
                &format!("the body is not a chat completion request: {e}"),
                None,
            )
        }
    };
    if request.model != shared.options.model_name {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!(
                "model {:?} is not served here; this server serves {:?}",
                request.model, shared.options.model_name
            ),
            Some("model"),
        );
    }
    let asked = match request.check(shared.options.max_tokens) {
        Ok(a) => a,
        Err(bad) => return bad_request(&bad.message, bad.param),
    };
    let Ok(permit) = Arc::clone(&shared.permits).try_acquire_owned() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!(
                "the server holds its limit of {} requests; retry later",
                shared.options.max_requests
            ),
            None,
        );
    };
    let model = Arc::clone(&shared.model);
    let messages = asked.messages.clone();
    let prompt = match tokio::task::spawn_blocking(move || model.encode_chat(&messages)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return bad_request(&format!("the chat template failed: {e}"), Some("messages"))
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &e.to_string(),
                None,
            )
        }
    };
    let max = shared.model.decoder.config.max_position_embeddings;
    if prompt.len() + asked.max_new_tokens > max {
        return bad_request(
            &format!(
                "the conversation is {} tokens and max_tokens {}: more than the model's context of {max}",
                prompt.len(),
                asked.max_new_tokens
            ),
            Some("messages"),
        );
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (replies, inbox) = async_mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        id,
        prompt,
        params: SequenceParams {
            max_new_tokens: asked.max_new_tokens,
            sampling: asked.sampling.clone(),
            stop_strings: asked.stop_strings.clone(),
        },
        replies,
    };
    if shared.jobs.send(job).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
            None,
        );
    }
    tracing::info!(
        id,
        prompt_tokens,
        max_tokens = asked.max_new_tokens,
        stream = request.stream,
        "request"
    );
    let reply = ReplyMeta {
        id: format!("chatcmpl-{id}"),
        model: shared.options.model_name.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        stream_reply(reply, inbox, permit, include_usage)
    } else {
        whole_reply(reply, inbox, permit).await
    }
}

struct ReplyMeta {
    id: String,
    model: String,
    created: u64,
}

impl ReplyMeta {
    fn chunk(&self, delta: serde_json::Value, finish: Option<FinishReason>) -> Event {
        sse(api::chunk(
            &self.id,
            &self.model,
            self.created,
            delta,
            finish,
        ))
    }
}

fn sse(value: serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

async fn whole_reply(
    meta: ReplyMeta,
    mut inbox: async_mpsc::UnboundedReceiver<Reply>,
    _permit: OwnedSemaphorePermit,
) -> Response {
    let mut text = String::new();
    while let Some(reply) = inbox.recv().await {
        match reply {
            Reply::Text(t) => text.push_str(&t),
            Reply::Done { finish, usage } => {
                return Json(api::completion(
                    &meta.id,
                    &meta.model,
                    meta.created,
                    &text,
                    finish,
                    usage,
                ))
                .into_response()
            }
            Reply::Failed(message) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    &message,
                    None,
                )
            }
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the engine stopped",
        None,
    )
}

fn stream_reply(
    meta: ReplyMeta,
    mut inbox: async_mpsc::UnboundedReceiver<Reply>,
    permit: OwnedSemaphorePermit,
    include_usage: bool,
) -> Response {
    let (events, body) = async_mpsc::unbounded_channel::<Event>();
    // The role first, then one event per piece of text; the task ends when the engine is done
    // with the request or the client has gone (its events can no longer be sent), and the
    // request's place is given back with the permit.
    let _ = events.send(meta.chunk(json!({"role": "assistant", "content": ""}), None));
    tokio::spawn(async move {
        let _permit = permit;
        while let Some(reply) = inbox.recv().await {
            let sent = match reply {
                Reply::Text(t) => events.send(meta.chunk(json!({"content": t}), None)),
                Reply::Done { finish, usage } => {
                    let mut sent = events.send(meta.chunk(json!({}), Some(finish)));
                    if include_usage {
                        let usage = api::usage_chunk(&meta.id, &meta.model, meta.created, usage);
                        sent = sent.and_then(|()| events.send(sse(usage)));
                    }
                    sent.and_then(|()| events.send(Event::default().data("[DONE]")))
                }
                Reply::Failed(message) => {
                    events.send(sse(api::error_body("server_error", &message, None)))
                }
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let body = UnboundedReceiverStream::new(body).map(Ok::<_, Infallible>);
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The decode loop: between steps, waiting jobs join the batch (up to `max_batch`); each step's
/// text goes to its request; a request whose client is gone leaves the batch. Ends when every
/// sender is gone and nothing is left to decode.
fn run_engine(model: &ChatModel, inbox: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batcher = Batcher::new(&model.decoder, &model.tokenizer);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: HashMap<SequenceId, async_mpsc::UnboundedSender<Reply>> = HashMap::new();
    loop {
        if batcher.is_empty() && waiting.is_empty() {
            match inbox.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        waiting.extend(inbox.try_iter());
        waiting.retain(|job| !job.replies.is_closed());
        let room = max_batch.saturating_sub(batcher.len()).min(waiting.len());
        if room > 0 {
            let admitted: Vec<Job> = waiting.drain(..room).collect();
            let new = admitted
                .iter()
                .map(|j| (j.id, j.prompt.clone(), j.params.clone()))
                .collect();
            match rayon::scope(|_| batcher.admit(new)) {
                Ok(()) => running.extend(admitted.into_iter().map(|j| (j.id, j.replies))),
                Err(e) => {
                    tracing::error!(error = %e, "prefill failed");
                    for job in admitted {
                        let _ = job
                            .replies
                            .send(Reply::Failed(format!("prefill failed: {e}")));
                    }
                }
            }
        }
        if batcher.is_empty() {
            continue;
        }
        match rayon::scope(|_| batcher.step()) {
            Ok(outputs) => {
                let mut gone = Vec::new();
                for out in outputs {
                    let Some(replies) = running.get(&out.id) else {
                        continue;
                    };
                    let mut alive = !replies.is_closed()
                        && (out.delta.is_empty() || replies.send(Reply::Text(out.delta)).is_ok());
                    if let Some(g) = out.finished {
                        let usage = Usage::new(g.prompt_tokens, g.ids.len());
                        alive &= replies
                            .send(Reply::Done {
                                finish: g.finish,
                                usage,
                            })
                            .is_ok();
                        running.remove(&out.id);
                    } else if !alive {
                        gone.push(out.id);
                    }
                }
                for id in gone {
                    tracing::info!(id, "client gone: dropped from the batch");
                    running.remove(&id);
                    if let Err(e) = batcher.cancel(id) {
                        tracing::error!(error = %e, "dropping a request failed");
                    }
                }
            }
            Err(e) => {
                // A failed step leaves the batch's cache in no known state: every request in it
                // fails, and the engine starts again with an empty batch.
                tracing::error!(error = %e, "decode step failed");
                for (_, replies) in running.drain() {
                    let _ = replies.send(Reply::Failed(format!("decode step failed: {e}")));
                }
                batcher = Batcher::new(&model.decoder, &model.tokenizer);
            }
        }
    }
}
