//! Counters the server keeps and `/metrics` prints in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the server has done so far; shared by the HTTP side and the decode loop.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests accepted.
    pub requests: AtomicU64,
    /// Requests refused: bad input, a wrong key, a full queue.
    pub rejected: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests waiting for a sequence slot.
    pub queued: AtomicU64,
    /// Sequences being decoded.
    pub active: AtomicU64,
    /// Passes over the weights that decoded tokens (one per step of the batch).
    pub passes: AtomicU64,
    /// Tokens those passes decoded.
    pub pass_tokens: AtomicU64,
    /// Bytes read from the flash image (bundles and streamed tables).
    pub flash_bytes: AtomicU64,
    /// Tokens drafted (prompt lookup) and verified in those passes.
    pub drafted: AtomicU64,
    /// Drafted tokens the model agreed with (each a token that cost no pass of its own).
    pub draft_accepted: AtomicU64,
}

impl Metrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Takes `n` from `counter`, stopping at zero.
    pub fn sub(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Relaxed);
        let passes = get(&self.passes);
        let per_pass = match passes {
            0 => 0.0,
            p => get(&self.pass_tokens) as f64 / p as f64,
        };
        let rows: [(&str, &str, &str, f64); 11] = [
            (
                "llmflash_requests_total",
                "counter",
                "Requests accepted.",
                get(&self.requests) as f64,
            ),
            (
                "llmflash_requests_rejected_total",
                "counter",
                "Requests refused (bad input, full queue).",
                get(&self.rejected) as f64,
            ),
            (
                "llmflash_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                get(&self.prompt_tokens) as f64,
            ),
            (
                "llmflash_tokens_generated_total",
                "counter",
                "Tokens generated.",
                get(&self.generated_tokens) as f64,
            ),
            (
                "llmflash_queue_depth",
                "gauge",
                "Requests waiting for a sequence slot.",
                get(&self.queued) as f64,
            ),
            (
                "llmflash_active_sequences",
                "gauge",
                "Sequences being decoded.",
                get(&self.active) as f64,
            ),
            (
                "llmflash_decode_passes_total",
                "counter",
                "Batched passes over the weights.",
                passes as f64,
            ),
            (
                "llmflash_tokens_per_pass",
                "gauge",
                "Tokens decoded per pass, on average.",
                per_pass,
            ),
            (
                "llmflash_flash_read_bytes_total",
                "counter",
                "Bytes read from the flash image.",
                get(&self.flash_bytes) as f64,
            ),
            (
                "llmflash_draft_tokens_total",
                "counter",
                "Tokens drafted by prompt lookup and verified.",
                get(&self.drafted) as f64,
            ),
            (
                "llmflash_draft_accepted_total",
                "counter",
                "Drafted tokens accepted.",
                get(&self.draft_accepted) as f64,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}
