//! `sails serve`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sails::serve::{serve, ServeError, ServeOptions};

use super::model_args::ModelArgs;

/// Serve the model (and adapter) over an OpenAI-compatible HTTP API.
///
/// Endpoints: `POST /v1/chat/completions` (`"stream": true` for server-sent events),
/// `GET /v1/models`, `GET /health`. Concurrent requests are decoded together: a new request joins
/// the running batch between decode steps (up to --max-batch), the rest wait; beyond
/// --max-requests a request gets 429. Greedy replies (`"temperature": 0`) are the ones `sails
/// generate` gives. Prints `listening on http://ADDR` once it accepts connections; Ctrl-C or
/// SIGTERM stops taking connections and lets the requests in flight finish.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send and `/v1/models` lists.
    #[arg(long, default_value = "sails")]
    pub name: String,
    /// Requests decoded together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests held at once (decoding or waiting); more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_requests: usize,
    /// Largest reply a request may ask for (max_tokens), and the budget when it names none.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on /v1 requests (401 without it); /health stays open.
    /// Without it anyone who can reach the port can use the model: keep the default --host
    /// 127.0.0.1 or set a key.
    #[arg(long, env = "SAILS_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load()?;
    let options = ServeOptions {
        model_name: args.name.clone(),
        max_batch: args.max_batch,
        max_requests: args.max_requests,
        max_tokens: args.max_tokens,
        max_body_bytes: args.max_body_bytes,
        api_key: args.api_key.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr().map_err(ServeError::Io)?;
        tracing::info!(%local, model = %args.name, "serving");
        println!("listening on http://{local}");
        std::io::stdout().flush().context("writing to stdout")?;
        serve(listener, model, options, shutdown_signal()).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
