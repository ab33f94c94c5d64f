//! OpenAI's request and response shapes, and its error body: what clients of
//! `/v1/chat/completions`, `/v1/completions` and `/v1/models` send and expect.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::FinishReason;
use crate::engine::sampler::Sampling;
use crate::model::chat::ChatMessage;

/// An error as OpenAI's API reports it: an HTTP status and `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is malformed or asks for what cannot be done.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 about one field.
    pub fn field(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::invalid(message)
        }
    }

    /// The same error with a machine-readable `code`.
    pub fn with_code(self, code: &'static str) -> ApiError {
        ApiError {
            code: Some(code),
            ..self
        }
    }

    /// The same error with another HTTP status and `type`.
    pub fn with_status(self, status: u16, kind: &'static str) -> ApiError {
        ApiError {
            status,
            kind,
            ..self
        }
    }

    /// 500: the engine failed (a read error, a damaged weight).
    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).with_status(500, "server_error")
    }

    /// 503: no room now (the queue is full) or the server is stopping.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).with_status(503, "server_error")
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: a string, or a list of parts of which the text ones count.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Clone, Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `prompt` of a completion: one string (or a list holding one), or token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// The fields both endpoints share.
#[derive(Clone, Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Clone, Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Clone, Debug, Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Clone, Debug, Deserialize)]
struct CompletionBody {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
}

/// What is asked to be continued.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestPrompt {
    /// A conversation, for the chat template.
    Chat(Vec<ChatMessage>),
    /// Plain text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// A request, checked and in the engine's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// What to continue.
    pub prompt: RequestPrompt,
    /// The model asked for, if named.
    pub model: Option<String>,
    /// Stream the reply as server-sent events.
    pub stream: bool,
    /// End a stream with a usage chunk.
    pub include_usage: bool,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// How tokens are chosen (temperature 0: greedy).
    pub sampling: Sampling,
    /// The text ends before the first of these.
    pub stop: Vec<String>,
}

/// Tokens a request may ask for at most, whatever its context: beyond this a number is a
/// mistake, not a wish.
pub const MAX_TOKENS_LIMIT: i64 = 1 << 20;

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<Request, ApiError> {
    let b: ChatBody = parse(body)?;
    if b.messages.is_empty() {
        return Err(ApiError::field(
            "messages",
            "messages is empty: give at least one",
        ));
    }
    let messages = b
        .messages
        .into_iter()
        .map(|m| ChatMessage::new(m.role, content_text(m.content)))
        .collect();
    request(RequestPrompt::Chat(messages), b.common)
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<Request, ApiError> {
    let b: CompletionBody = parse(body)?;
    let prompt = match b.prompt {
        PromptField::Text(t) => RequestPrompt::Text(t),
        PromptField::Texts(mut t) if t.len() == 1 => RequestPrompt::Text(t.remove(0)),
        PromptField::Texts(t) => {
            return Err(ApiError::field(
                "prompt",
                format!("{} prompts in one request: give one", t.len()),
            ))
        }
        PromptField::Tokens(ids) if ids.is_empty() => {
            return Err(ApiError::field("prompt", "the prompt is empty"))
        }
        PromptField::Tokens(ids) => RequestPrompt::Tokens(ids),
    };
    request(prompt, b.common)
}

/// The body as JSON of type `T`, or a 400 saying what is wrong and where (invalid UTF-8 and
/// malformed JSON included: serde_json checks both).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}")))
}

fn content_text(content: Option<Content>) -> String {
    match content {
        None => String::new(),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .filter(|p| p.kind == "text")
            .filter_map(|p| p.text)
            .collect::<Vec<_>>()
            .join(""),
    }
}

fn request(prompt: RequestPrompt, c: Common) -> Result<Request, ApiError> {
    if let Some(n) = c.n.filter(|&n| n != 1) {
        return Err(ApiError::field(
            "n",
            format!("n is {n}: this server gives one choice"),
        ));
    }
    let max = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = match max {
        None => None,
        Some(m) if (1..=MAX_TOKENS_LIMIT).contains(&m) => Some(m as usize),
        Some(m) => {
            return Err(ApiError::field(
                "max_tokens",
                format!("max_tokens is {m}: give 1 to {MAX_TOKENS_LIMIT}"),
            ))
        }
    };
    Ok(Request {
        prompt,
        model: c.model,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        max_tokens,
        sampling: sampling(c.temperature, c.top_p, c.seed)?,
        stop: match c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) if v.len() <= 4 => v,
            Some(Stop::Many(v)) => {
                return Err(ApiError::field(
                    "stop",
                    format!("{} stop strings: give 4 at most", v.len()),
                ))
            }
        },
    })
}

/// OpenAI's sampling: temperature 1 and top_p 1 by default; temperature 0 is greedy.
fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
) -> Result<Sampling, ApiError> {
    let t = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&t) {
        return Err(ApiError::field(
            "temperature",
            format!("temperature is {t}: give 0 to 2"),
        ));
    }
    let p = top_p.unwrap_or(1.0);
    if !(p > 0.0 && p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("top_p is {p}: give more than 0, at most 1"),
        ));
    }
    if t == 0.0 {
        return Ok(Sampling::Greedy);
    }
    Ok(Sampling::Random {
        temperature: t,
        top_k: 0,
        top_p: p,
        seed: seed.unwrap_or_else(fresh_seed),
    })
}

/// A seed for a request that gave none: different each time.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (std::process::id() as u64) << 32
}

/// OpenAI's name for why a generation ended.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// The response naming a request `id`, made at `created` (Unix seconds) by `model`.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The endpoint answered.
    pub endpoint: Endpoint,
    /// The response's id.
    pub id: String,
    /// When it was made, in Unix seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
}

impl Reply {
    /// A whole (non-streamed) response.
    pub fn whole(&self, text: &str, finish: FinishReason, usage: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(finish),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(finish),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// One streamed chunk: `text` (for a chat, the first chunk also opens the assistant's
    /// role), or the end with its `finish` reason.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The final usage chunk of a stream (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_parses_into_the_engines_terms() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"}]}],
                "max_tokens":5,"temperature":0,"stop":"x","stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            RequestPrompt::Chat(vec![
                ChatMessage::new("user", "hi"),
                ChatMessage::new("user", "a")
            ])
        );
        assert_eq!((r.max_tokens, r.stream), (Some(5), true));
        assert_eq!(r.sampling, Sampling::Greedy);
        assert_eq!(r.stop, vec!["x".to_string()]);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let bad = |body: &[u8], says: &str| {
            let e = parse_chat(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(says), "{body:?}: {}", e.message);
        };
        bad(b"{not json", "not valid");
        bad(b"\xff\xfe", "not valid");
        bad(br#"{"messages":"hi"}"#, "not valid");
        bad(br#"{"model":"m"}"#, "messages");
        bad(br#"{"messages":[]}"#, "empty");
        bad(
            br#"{"messages":[{"role":"user","content":"a"}],"max_tokens":-1}"#,
            "max_tokens",
        );
        bad(
            br#"{"messages":[{"role":"user","content":"a"}],"max_tokens":"5"}"#,
            "not valid",
        );
        bad(
            br#"{"messages":[{"role":"user","content":"a"}],"max_tokens":1e12}"#,
            "not valid",
        );
        bad(
            br#"{"messages":[{"role":"user","content":"a"}],"temperature":9}"#,
            "temperature",
        );
        bad(
            br#"{"messages":[{"role":"user","content":"a"}],"n":3}"#,
            "one choice",
        );
        let e = parse_completion(br#"{"prompt":["a","b"]}"#).unwrap_err();
        assert!(e.message.contains("2 prompts"));
    }
}
