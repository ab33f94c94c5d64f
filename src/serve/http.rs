//! The HTTP side: routes, the API key check, body limits, and turning a request's events
//! into a JSON response or a stream of server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::metrics::Metrics;
use super::openai::{parse_chat, parse_completion, usage, ApiError, Endpoint, Reply};
use super::scheduler::{Event, Job, Permit};
use crate::api::GenerateOptions;

/// What every handler shares.
pub struct AppState {
    /// The queue of requests to the decode loop.
    pub jobs: SyncSender<Job>,
    /// Requests held (decoding or waiting), of at most `admit` ([`Permit`]).
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    /// `parallel + queue`.
    pub admit: usize,
    /// The counters `/metrics` prints.
    pub metrics: Arc<Metrics>,
    /// The one model served, as `/v1/models` names it.
    pub model_id: String,
    /// When the server started (Unix seconds), as `/v1/models` says.
    pub created: u64,
    /// When set, the bearer token every request must carry.
    pub api_key: Option<String>,
    /// Positions of context each sequence has.
    pub context: usize,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
}

/// The server's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// With an API key set, every request must carry `Authorization: Bearer KEY`.
async fn authorize(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(req).await;
    };
    let given = bearer(req.headers());
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    Metrics::add(&s.metrics.rejected, 1);
    let e = ApiError::invalid("a valid API key is required: send Authorization: Bearer KEY")
        .with_status(401, "authentication_error")
        .with_code("invalid_api_key");
    e.into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

/// Equality whose time does not depend on where the strings first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::invalid("no such endpoint: this server has /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics")
        .with_status(404, "invalid_request_error")
}

/// Without this axum answers a wrong method with an empty 405, which OpenAI clients cannot
/// read as an error.
async fn method_not_allowed() -> ApiError {
    ApiError::invalid(
        "this endpoint does not take that method: completions take POST, the others GET",
    )
    .with_status(405, "invalid_request_error")
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_id, "object": "model", "created": s.created, "owned_by": "llmflash"}],
    }))
}

async fn chat(State(s): State<Arc<AppState>>, body: Body) -> Response {
    respond(s, body, Endpoint::Chat).await
}

async fn completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    respond(s, body, Endpoint::Completion).await
}

async fn respond(s: Arc<AppState>, body: Body, endpoint: Endpoint) -> Response {
    match accept(&s, body, endpoint).await {
        Ok(response) => response,
        Err(e) => {
            Metrics::add(&s.metrics.rejected, 1);
            e.into_response()
        }
    }
}

/// Reads and checks the request, queues it, and answers once the decode loop has taken it
/// (so that an error in its prompt still gets its own status).
async fn accept(s: &Arc<AppState>, body: Body, endpoint: Endpoint) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, s.body_limit)
        .await
        .map_err(|_| {
            ApiError::invalid(format!("the request body is over {} bytes", s.body_limit))
                .with_status(413, "invalid_request_error")
        })?;
    let req = match endpoint {
        Endpoint::Chat => parse_chat(&bytes)?,
        Endpoint::Completion => parse_completion(&bytes)?,
    };
    if let Some(m) = req.model.as_deref().filter(|m| *m != s.model_id) {
        return Err(ApiError::field(
            "model",
            format!(
                "the model `{m}` is not served here: this server runs `{}`",
                s.model_id
            ),
        )
        .with_status(404, "invalid_request_error")
        .with_code("model_not_found"));
    }
    let max_tokens = req.max_tokens.unwrap_or(s.context);
    if max_tokens > s.context {
        return Err(ApiError::field(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens} and a sequence's context holds {}",
                s.context
            ),
        ));
    }
    let busy = || {
        ApiError::unavailable(
            "the server is busy: every sequence slot and queue place is taken; retry later",
        )
    };
    let permit = Permit::take(&s.held, s.admit).ok_or_else(busy)?;
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        prompt: req.prompt.clone(),
        opts: GenerateOptions {
            max_tokens,
            sampling: req.sampling.clone(),
            stop: req.stop.clone(),
            ignore_eos: false,
        },
        events: tx,
        permit,
    };
    Metrics::add(&s.metrics.queued, 1);
    if let Err(e) = s.jobs.try_send(job) {
        Metrics::sub(&s.metrics.queued, 1);
        return Err(match e {
            TrySendError::Full(_) => busy(),
            TrySendError::Disconnected(_) => ApiError::unavailable("the server is shutting down"),
        });
    }
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        _ => {
            return Err(ApiError::server(
                "the decode loop ended before the request started",
            ))
        }
    };
    Metrics::add(&s.metrics.requests, 1);
    let reply = Reply {
        endpoint,
        id: request_id(endpoint),
        created: unix_now(),
        model: s.model_id.clone(),
    };
    Ok(match req.stream {
        true => stream(reply, rx, prompt_tokens, req.include_usage),
        false => whole(reply, rx, prompt_tokens).await?,
    })
}

/// Collects the text and answers with one JSON object.
async fn whole(
    reply: Reply,
    mut rx: UnboundedReceiver<Event>,
    prompt: usize,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish,
                completion_tokens,
            } => {
                let body = reply.whole(&text, finish, usage(prompt, completion_tokens));
                return Ok(Json(body).into_response());
            }
            Event::Failed(e) => return Err(e),
            Event::Started { .. } => {}
        }
    }
    Err(ApiError::server("the decode loop ended before the reply"))
}

/// Server-sent events: a chunk per piece of text, the finish reason, optionally the usage,
/// then `data: [DONE]`. A client that goes away drops the stream, and with it the
/// receiver: the decode loop sees its next send fail and frees the slot.
fn stream(
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    prompt: usize,
    include_usage: bool,
) -> Response {
    let mut pending = VecDeque::new();
    if reply.endpoint == Endpoint::Chat {
        pending.push_back(data(&reply.chunk(Some(""), true, None)));
    }
    let state = Streaming {
        reply,
        rx,
        pending,
        ended: false,
        prompt,
        include_usage,
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            st.next().await;
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

struct Streaming {
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    pending: VecDeque<SseEvent>,
    ended: bool,
    prompt: usize,
    include_usage: bool,
}

impl Streaming {
    /// Turns the next event into SSE events.
    async fn next(&mut self) {
        match self.rx.recv().await {
            Some(Event::Text(t)) => {
                self.pending
                    .push_back(data(&self.reply.chunk(Some(&t), false, None)))
            }
            Some(Event::Done {
                finish,
                completion_tokens,
            }) => {
                self.pending
                    .push_back(data(&self.reply.chunk(None, false, Some(finish))));
                if self.include_usage {
                    let u = usage(self.prompt, completion_tokens);
                    self.pending.push_back(data(&self.reply.usage_chunk(u)));
                }
                self.end();
            }
            Some(Event::Failed(e)) => {
                self.pending.push_back(data(&e.body()));
                self.end();
            }
            Some(Event::Started { .. }) => {}
            None => self.end(),
        }
    }

    fn end(&mut self) {
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.ended = true;
    }
}

fn data(v: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request id unique within this server's life.
fn request_id(endpoint: Endpoint) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{n:06x}", unix_now())
}
