//! `llmflash serve` as a client sees it: the binary started on a free port, spoken to over
//! plain HTTP/1.1 (a small std client below, so no HTTP dependency), and checked against
//! `llmflash generate`. Covers the OpenAI shapes (whole and streamed), every kind of bad
//! input, the API key, a client leaving mid-stream, concurrent requests, the queue bound and
//! draining on SIGTERM. `tools/test-openai` checks the same server with the real `openai`
//! Python client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn smollm2() -> Option<PathBuf> {
    common::model(SMOLLM2, "tools/fetch-model")
}

/// A running `llmflash serve`, killed when dropped (also when a test panics).
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its stderr after the ready line, collected by a thread (so the pipe never fills),
    /// for failure messages.
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmflash"))
            .arg("serve")
            .arg("-m")
            .arg(model)
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting llmflash serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut before = String::new();
        // Blocks until the ready line or the end of stderr (the server exited).
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix(&format!("serving {ID} on http://")) {
                        let addr = rest.split('/').next().unwrap();
                        break addr.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
                    }
                    before.push_str(&line);
                    before.push('\n');
                }
                _ => {
                    let _ = child.kill();
                    panic!("llmflash serve {args:?} exited before serving:\n{before}");
                }
            }
        };
        let log = Arc::new(Mutex::new(before));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.post_raw(path, &[], body.to_string().as_bytes())
    }

    fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.addr, "POST", path, headers, body)
    }

    /// The value of the `/metrics` line `name`.
    fn metric(&self, name: &str) -> f64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Polls `/metrics` until `name` is `value` (the decode loop updates the gauges after
    /// each pass, so there is no event to wait on); panics after `within`.
    fn await_metric(&self, name: &str, value: f64, within: Duration) {
        let t = Instant::now();
        loop {
            let v = self.metric(name);
            if v == value {
                return;
            }
            assert!(
                t.elapsed() < within,
                "{name} is {v}, not {value}, after {within:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `within` for the process to exit; its status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t.elapsed() < within,
                "the server still runs {within:?} after SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.status, self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    fn events(&self) -> Vec<String> {
        assert_eq!(self.status, 200, "{}", self.text());
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "{:?}",
            self.headers
        );
        sse_data(&self.text())
    }
}

fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d).to_string())
        .collect()
}

/// Writes an HTTP/1.1 request with `Connection: close` to `addr`, returning the connection.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    // A hung server fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading all of a large body and close: a failed
    // write is then not the test's business, the response is.
    let _ = s.write_all(body);
    s
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = send(addr, method, path, headers, body);
    let mut raw = Vec::new();
    // The server closes after the response (Connection: close); a reset after a 413 still
    // leaves what was read.
    if let Err(e) = s.read_to_end(&mut raw) {
        assert!(!raw.is_empty(), "{method} {path}: {e}");
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).expect("ASCII headers");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status: status.parse().unwrap(),
        headers,
        body,
    }
}

/// The body of a chunked transfer encoding (it must end with its last, empty chunk).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = std::str::from_utf8(&b[..eol]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n", "chunk end");
        b = &b[size + 2..];
    }
}

/// Asserts `r` is an OpenAI error with `status`, and returns its `error` object.
fn api_error(r: &Response, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {v}"
    );
    e.clone()
}

fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

fn completion_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// What a request answered: its text, finish reason and usage (prompt, completion).
#[derive(Debug, PartialEq)]
struct Answer {
    text: String,
    finish: String,
    usage: (u64, u64),
}

fn usage_of(v: &Value) -> (u64, u64) {
    let (p, c) = (
        v["prompt_tokens"].as_u64().expect("prompt_tokens"),
        v["completion_tokens"].as_u64().expect("completion_tokens"),
    );
    assert_eq!(v["total_tokens"].as_u64(), Some(p + c), "{v}");
    (p, c)
}

/// A whole response's answer; `chat` says which endpoint's shape.
fn whole(r: &Response, chat: bool) -> Answer {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    assert_eq!(v["object"], object, "{v}");
    assert_eq!(v["model"], ID, "{v}");
    let choice = &v["choices"][0];
    let text = match chat {
        true => {
            assert_eq!(choice["message"]["role"], "assistant", "{v}");
            &choice["message"]["content"]
        }
        false => &choice["text"],
    };
    Answer {
        text: text.as_str().expect("text").to_string(),
        finish: choice["finish_reason"].as_str().expect("finish").into(),
        usage: usage_of(&v["usage"]),
    }
}

/// A streamed response's answer: chunks concatenated, the one finish reason, the usage
/// chunk; checks it ends with `data: [DONE]`.
fn streamed(r: &Response, chat: bool) -> Answer {
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let (mut text, mut finish, mut usage) = (String::new(), None, None);
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{e}: {err}"));
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert_eq!(v["object"], object, "{v}");
        if !v["usage"].is_null() {
            assert!(usage.is_none(), "two usage chunks: {events:?}");
            usage = Some(usage_of(&v["usage"]));
            continue;
        }
        assert!(finish.is_none(), "a chunk after the finish: {events:?}");
        let choice = &v["choices"][0];
        let piece = match chat {
            true => &choice["delta"]["content"],
            false => &choice["text"],
        };
        text.push_str(piece.as_str().unwrap_or(""));
        finish = choice["finish_reason"].as_str().map(String::from);
    }
    Answer {
        text,
        finish: finish.expect("a finish_reason"),
        usage: usage.expect("a usage chunk"),
    }
}

/// `llmflash generate ... --greedy --json`'s text for `prompt` (`--chat` when `chat`).
fn cli_text(model: &Path, prompt: &str, n: usize, chat: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmflash"));
    cmd.arg("generate").arg("-m").arg(model);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd
        .args(["-p", prompt, "-n", &n.to_string(), "--greedy", "--json"])
        .output()
        .expect("running llmflash generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("generate --json");
    v["text"].as_str().expect("text").to_string()
}

/// Asks a trivial request and checks it is answered: the server still serves.
fn still_serves(s: &Server, after: &str) {
    let r = s.post("/v1/completions", &completion_body("The sky is", 2, false));
    assert_eq!(r.status, 200, "after {after}: {}", r.text());
}

/// Chat and completion, whole and streamed, against each other and against the CLI; the
/// read-only endpoints; every bad input; a client leaving mid-stream; 8 concurrent streams.
/// One server for all (each start loads the model; the cores are few).
#[test]
fn one_server_answers_like_generate_and_refuses_bad_input() {
    let Some(model) = smollm2() else { return };
    let s = Server::start(&model, &["--parallel", "4", "--ctx", "2048"]);

    let h = s.get("/health");
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(h.json()["status"], "ok");
    let m = s.get("/v1/models");
    assert_eq!(m.status, 200, "{}", m.text());
    let m = m.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], ID, "{m}");
    assert_eq!(m["data"].as_array().unwrap().len(), 1, "{m}");

    // Chat: temperature 0 gives generate --chat --greedy's text, streamed or not.
    let (prompt, n) = ("Write a haiku about the sea.", 12);
    let want = cli_text(&model, prompt, n, true);
    let a = whole(
        &s.post("/v1/chat/completions", &chat_body(prompt, n, false)),
        true,
    );
    assert_eq!(a.text, want);
    assert!(a.usage.0 > 0, "{a:?}");
    // Unless it ends by itself first, it stops at max_tokens.
    match a.usage.1 {
        c if c == n as u64 => assert_eq!(a.finish, "length", "{a:?}"),
        _ => assert_eq!(a.finish, "stop", "{a:?}"),
    }
    let b = streamed(
        &s.post("/v1/chat/completions", &chat_body(prompt, n, true)),
        true,
    );
    assert_eq!(b, a);

    // Completion: generate's text for the bare prompt.
    let (prompt, n) = ("The capital of France is", 10);
    let want = cli_text(&model, prompt, n, false);
    let a = whole(
        &s.post("/v1/completions", &completion_body(prompt, n, false)),
        false,
    );
    assert_eq!(a.text, want);
    assert_eq!(
        (a.finish.as_str(), a.usage.1),
        ("length", n as u64),
        "{a:?}"
    );
    let b = streamed(
        &s.post("/v1/completions", &completion_body(prompt, n, true)),
        false,
    );
    assert_eq!(b, a);

    // A stop string ends the text before it, with finish_reason stop.
    let mut body = completion_body(prompt, n, false);
    let stop = want.trim_start().chars().take(3).collect::<String>();
    body["stop"] = json!(stop);
    let c = whole(&s.post("/v1/completions", &body), false);
    assert_eq!(c.finish, "stop", "{c:?}");
    assert!(
        want.starts_with(&c.text) && c.text.len() < want.len(),
        "{c:?} vs {want:?}"
    );

    bad_inputs(&s);
    disconnect_mid_stream(&s);
    concurrent_streams(&s);

    // Counters: every request above is counted.
    for name in [
        "llmflash_requests_total",
        "llmflash_requests_rejected_total",
        "llmflash_prompt_tokens_total",
        "llmflash_tokens_generated_total",
        "llmflash_decode_passes_total",
    ] {
        assert!(s.metric(name) > 0.0, "{name}");
    }
    // Accepted: 5 above, 1 after the bad inputs, 2 around the disconnect, 16 streams.
    // Rejected: the bad inputs but the unknown routes (those never reach an endpoint).
    assert_eq!(s.metric("llmflash_requests_total"), 24.0);
    assert_eq!(s.metric("llmflash_requests_rejected_total"), 13.0);
    assert_eq!(s.metric("llmflash_queue_depth"), 0.0);
    let text = s.get("/metrics").text();
    assert!(
        text.contains("# TYPE llmflash_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE llmflash_active_sequences gauge"),
        "{text}"
    );
}

/// A bad request: what it is, its path and body, the status and `param` it must get.
type BadCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    Option<&'static str>,
);

/// Each bad request gets a 4xx with OpenAI's error body, and the server goes on serving.
fn bad_inputs(s: &Server) {
    let chat = "/v1/chat/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<BadCase> = vec![
        (
            "malformed JSON",
            chat,
            b"{\"messages\": [".to_vec(),
            400,
            None,
        ),
        ("not JSON at all", chat, b"hello".to_vec(), 400, None),
        (
            "invalid UTF-8",
            chat,
            b"{\"messages\":\"\xff\xfe\"}".to_vec(),
            400,
            None,
        ),
        (
            "messages a string",
            chat,
            br#"{"messages":"hi"}"#.to_vec(),
            400,
            None,
        ),
        (
            "max_tokens a string",
            chat,
            json!({"messages": msgs, "max_tokens": "5"})
                .to_string()
                .into(),
            400,
            None,
        ),
        ("no messages", chat, br#"{"model":"x"}"#.to_vec(), 400, None),
        (
            "empty messages",
            chat,
            br#"{"messages":[]}"#.to_vec(),
            400,
            Some("messages"),
        ),
        (
            "negative max_tokens",
            chat,
            json!({"messages": msgs, "max_tokens": -1})
                .to_string()
                .into(),
            400,
            Some("max_tokens"),
        ),
        (
            "absurd max_tokens",
            chat,
            json!({"messages": msgs, "max_tokens": 1_000_000_000u64})
                .to_string()
                .into(),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens past the context",
            chat,
            json!({"messages": msgs, "max_tokens": 100_000})
                .to_string()
                .into(),
            400,
            Some("max_tokens"),
        ),
        (
            "temperature out of range",
            chat,
            json!({"messages": msgs, "temperature": 9})
                .to_string()
                .into(),
            400,
            Some("temperature"),
        ),
        (
            "no prompt",
            "/v1/completions",
            br#"{"max_tokens":3}"#.to_vec(),
            400,
            None,
        ),
        (
            "unknown route",
            "/v1/embeddings",
            br#"{"input":"x"}"#.to_vec(),
            404,
            None,
        ),
    ];
    for (what, path, body, status, param) in cases {
        let e = api_error(&s.post_raw(path, &[], &body), status, what);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{what}: {e}");
        }
    }
    let e = api_error(
        &s.post(chat, &json!({"model": "gpt-4", "messages": msgs})),
        404,
        "unknown model",
    );
    assert_eq!(e["code"], "model_not_found", "{e}");
    api_error(&s.get("/nowhere"), 404, "unknown GET route");
    api_error(&s.get(chat), 405, "GET of a POST route");
    still_serves(s, "the bad requests");
}

/// A client that drops its connection mid-stream frees its sequence: the active gauge
/// returns to 0 and the next request is answered at once.
fn disconnect_mid_stream(s: &Server) {
    let body = completion_body("Once upon a time", 400, true).to_string();
    let mut c = send(s.addr, "POST", "/v1/completions", &[], body.as_bytes());
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    // Until the first token's event: the request is decoding.
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = c.read(&mut buf).expect("reading the stream");
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    s.await_metric("llmflash_active_sequences", 1.0, Duration::from_secs(30));
    drop(c);
    // 400 tokens take ~20 s here; the slot must come back long before.
    s.await_metric("llmflash_active_sequences", 0.0, Duration::from_secs(10));
    let t = Instant::now();
    still_serves(s, "a client left mid-stream");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// 8 greedy streams at once on 4 sequences (so 4 wait in the queue) each give the text they
/// give alone.
fn concurrent_streams(s: &Server) {
    let prompts = [
        "Name a colour.",
        "The first planet from the sun is",
        "Count from one to five:",
        "What is a cat?",
        "def fibonacci(n):",
        "Write one word about rain.",
        "Water boils at",
        "My favourite fruit is",
    ];
    let n = 8;
    // Even ones as chats, odd ones as completions: both endpoints share the batch.
    let ask = |i: usize, addr: SocketAddr| -> Answer {
        let (path, body, chat) = match i % 2 {
            0 => ("/v1/chat/completions", chat_body(prompts[i], n, true), true),
            _ => (
                "/v1/completions",
                completion_body(prompts[i], n, true),
                false,
            ),
        };
        let r = request(addr, "POST", path, &[], body.to_string().as_bytes());
        streamed(&r, chat)
    };
    let alone: Vec<Answer> = (0..prompts.len()).map(|i| ask(i, s.addr)).collect();
    let addr = s.addr;
    let together: Vec<Answer> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..prompts.len())
            .map(|i| sc.spawn(move || ask(i, addr)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "prompt {i} {:?}", prompts[i]);
    }
}

/// A small context, a small body limit and an API key: prompts past the context and bodies
/// past the limit are refused, and only the right key gets in.
#[test]
fn limits_and_the_api_key() {
    let Some(model) = smollm2() else { return };
    let s = Server::start(
        &model,
        &[
            "--ctx",
            "256",
            "--parallel",
            "2",
            "--max-body",
            "4KiB",
            "--api-key",
            "sesame",
        ],
    );
    let key = [("Authorization", "Bearer sesame")];
    let post = |path: &str, body: &[u8]| s.post_raw(path, &key, body);

    let body = completion_body("Hello", 2, false).to_string();
    let e = api_error(
        &s.post_raw("/v1/completions", &[], body.as_bytes()),
        401,
        "no key",
    );
    assert_eq!(e["code"], "invalid_api_key", "{e}");
    let wrong = [("Authorization", "Bearer sesame2")];
    api_error(
        &s.post_raw("/v1/completions", &wrong, body.as_bytes()),
        401,
        "wrong key",
    );
    api_error(
        &request(s.addr, "GET", "/v1/models", &wrong, b""),
        401,
        "wrong key",
    );
    let r = post("/v1/completions", body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(s.addr, "GET", "/v1/models", &key, b"");
    assert_eq!(r.status, 200, "{}", r.text());

    // Each sequence holds 128 positions: ~250 tokens of prompt do not fit, whole or streamed.
    let long = "one two three four five six seven eight nine ten ".repeat(25);
    for stream in [false, true] {
        let b = completion_body(&long, 4, stream).to_string();
        let e = api_error(
            &post("/v1/completions", b.as_bytes()),
            400,
            "prompt past the context",
        );
        assert_eq!(e["code"], "context_length_exceeded", "{e}");
        let b = chat_body(&long, 4, stream).to_string();
        let e = api_error(
            &post("/v1/chat/completions", b.as_bytes()),
            400,
            "chat past the context",
        );
        assert_eq!(e["code"], "context_length_exceeded", "{e}");
    }
    let b = completion_body("Hello", 129, false).to_string();
    let e = api_error(
        &post("/v1/completions", b.as_bytes()),
        400,
        "max_tokens past the context",
    );
    assert_eq!(e["param"], "max_tokens", "{e}");

    // A body over --max-body is refused whole, before it is parsed.
    let big = json!({"prompt": "x".repeat(8 << 10), "max_tokens": 1}).to_string();
    api_error(
        &post("/v1/completions", big.as_bytes()),
        413,
        "oversized body",
    );
    let r = post("/v1/completions", body.as_bytes());
    assert_eq!(r.status, 200, "after the refusals: {}", r.text());
}

/// `--parallel 2 --queue 0`: with one request running a second still gets the free slot;
/// with both slots taken a third gets 503 at once; the slots come back when their clients
/// leave.
#[test]
fn the_queue_bound_refuses_past_the_free_slots() {
    let Some(model) = smollm2() else { return };
    let s = Server::start(
        &model,
        &["--parallel", "2", "--queue", "0", "--ctx", "1024"],
    );
    let long = |prompt: &str| {
        let body = completion_body(prompt, 400, true).to_string();
        let mut c = send(s.addr, "POST", "/v1/completions", &[], body.as_bytes());
        let mut b = [0u8; 64];
        // The response has begun (so its sequence is decoding) once a byte comes back.
        assert!(c.read(&mut b).unwrap() > 0);
        c
    };
    let first = long("Once upon a time");
    s.await_metric("llmflash_active_sequences", 1.0, Duration::from_secs(30));
    // A free slot: no queue place is needed.
    still_serves(&s, "one request running on two slots");
    let second = long("In a galaxy far away");
    s.await_metric("llmflash_active_sequences", 2.0, Duration::from_secs(30));
    let r = s.post("/v1/completions", &completion_body("Hello", 2, false));
    let e = api_error(&r, 503, "both slots taken, no queue");
    assert_eq!(e["type"], "server_error", "{e}");
    drop((first, second));
    s.await_metric("llmflash_active_sequences", 0.0, Duration::from_secs(10));
    still_serves(&s, "both clients left");
}

/// SIGTERM while a request streams: the request still completes, then the server exits 0.
#[test]
fn sigterm_drains_the_running_request() {
    let Some(model) = smollm2() else { return };
    let mut s = Server::start(&model, &["--parallel", "2", "--ctx", "512"]);
    let body = completion_body("The capital of France is", 24, true).to_string();
    let mut c = send(s.addr, "POST", "/v1/completions", &[], body.as_bytes());
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = c.read(&mut buf).expect("reading the stream");
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    c.read_to_end(&mut got)
        .expect("reading the rest of the stream");
    let a = streamed(&parse_response(&got), false);
    assert_eq!(a.finish, "length", "{a:?}");
    assert_eq!(a.usage.1, 24, "{a:?}");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", s.log());
    // It stopped listening.
    assert!(TcpStream::connect(s.addr).is_err());
}

/// Prompt-lookup drafts riding in the batch's passes (`--draft ngram`, forced to 3 tokens a
/// pass where the lookup finds them) keep every greedy answer as the same server without
/// drafts gives it: text, finish reason and usage, with 4 requests at once, one of them
/// running into its sequence's context. The drafts were used (`/metrics`).
#[test]
fn drafts_in_the_batch_keep_greedy_answers() {
    let Some(model) = smollm2() else { return };
    let prompts = [
        "one two three four one two three four one two three four one two",
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
        "The cat sat on the mat. The cat sat on the mat. The cat",
        "A B C D E F G A B C D E F G A B C",
    ];
    // 4 sequences of 64 positions: the third prompt's 40 tokens run out of context.
    let wants = [24, 24, 40, 24];
    let ask = |addr: SocketAddr| -> Vec<Answer> {
        std::thread::scope(|sc| {
            let hs: Vec<_> = (prompts.iter().zip(wants))
                .map(|(p, n)| {
                    sc.spawn(move || {
                        let body = completion_body(p, n, true).to_string();
                        streamed(
                            &request(addr, "POST", "/v1/completions", &[], body.as_bytes()),
                            false,
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let base = ["--parallel", "4", "--ctx", "256"];
    let plain = ask(Server::start(&model, &[&base[..], &["--draft", "none"]].concat()).addr);
    let s = Server::start(
        &model,
        &[
            &base[..],
            &["--draft", "ngram", "--draft-min", "3", "--draft-max", "3"],
        ]
        .concat(),
    );
    let drafted = ask(s.addr);
    for (i, (d, p)) in drafted.iter().zip(&plain).enumerate() {
        assert_eq!(d, p, "prompt {i} {:?}\n{}", prompts[i], s.log());
    }
    assert!(
        plain.iter().any(|a| a.finish == "length" && a.usage.1 < 40),
        "one request meets its context: {plain:?}"
    );
    let (tried, kept) = (
        s.metric("llmflash_draft_tokens_total"),
        s.metric("llmflash_draft_accepted_total"),
    );
    assert!(tried > 0.0 && kept > 0.0, "{kept} of {tried} drafts kept");
    assert!(s.metric("llmflash_tokens_per_pass") > 1.0);
}
