//! `serve`: an OpenAI-compatible HTTP server over an [`Engine`], decoding up to `parallel`
//! requests together so that each pass of flash reads serves all of them.
//!
//! Threads: the HTTP side (axum on a tokio runtime) parses and checks requests and queues
//! them; the calling thread runs the decode loop ([`scheduler::run`]) over one
//! [`crate::engine::batch::BatchDecoder`]. They talk through a bounded queue (full: 503) and
//! a channel of events per request. On Ctrl-C or SIGTERM the HTTP side stops accepting,
//! running requests finish, and [`serve`] returns.

pub mod drafts;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod scheduler;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context;

use crate::api::Engine;
use metrics::Metrics;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on (loopback by default).
    pub addr: SocketAddr,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Positions of context for all sequences together; each gets `context / parallel`.
    pub context: usize,
    /// Requests that may wait for a slot; beyond them a request gets 503.
    pub queue: usize,
    /// When set, every request must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            parallel: 4,
            context: 4096,
            queue: 64,
            api_key: None,
            body_limit: 1 << 20,
        }
    }
}

/// Serves `engine` (opened with [`crate::api::EngineBuilder::sequences`] set to
/// `opts.parallel`, so that its memory plan counts every sequence's KV cache) until Ctrl-C
/// or SIGTERM; `on_ready` is called with the address once it listens.
pub fn serve(
    engine: Engine,
    opts: &ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let parallel = opts.parallel.max(1);
    let context = (opts.context / parallel).min(engine.context());
    if context < 2 {
        anyhow::bail!(
            "a context of {} positions over {parallel} sequences leaves {context} each: give a \
             longer context or fewer parallel sequences",
            opts.context
        );
    }
    let batch = engine
        .runner()
        .session(context)
        .context("planning the sequences' memory")?
        .into_batch(parallel);
    let listener =
        TcpListener::bind(opts.addr).with_context(|| format!("listening on {}", opts.addr))?;
    listener
        .set_nonblocking(true)
        .context("configuring the listener")?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    let metrics = Arc::new(Metrics::default());
    // Permits bound the requests held to `parallel + queue`; the channel has room for all of
    // them, so a request let in never finds it full.
    let admit = parallel + opts.queue;
    let (jobs, queue) = std::sync::mpsc::sync_channel(admit);
    let state = Arc::new(http::AppState {
        jobs,
        held: Arc::default(),
        admit,
        metrics: metrics.clone(),
        model_id: model_id(&engine),
        created: http::unix_now(),
        api_key: opts.api_key.clone(),
        context,
        body_limit: opts.body_limit,
    });
    let http = std::thread::Builder::new()
        .name("llmflash-http".into())
        .spawn(move || run_http(listener, state))
        .context("starting the HTTP thread")?;
    on_ready(addr);
    scheduler::run(&engine, batch, queue, &metrics);
    match http.join() {
        Ok(result) => result,
        Err(_) => anyhow::bail!("the HTTP thread panicked"),
    }
}

/// The id `/v1/models` gives the model: its file name without the extension.
pub fn model_id(engine: &Engine) -> String {
    let path = &engine.model().path;
    path.file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned())
}

/// Runs the HTTP side until a shutdown signal, then waits for open requests to finish.
fn run_http(listener: TcpListener, state: Arc<http::AppState>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).context("adopting the listener")?;
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving HTTP")
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    log::info!("shutting down: finishing the running requests");
}
