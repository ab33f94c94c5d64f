//! Per-run statistics reported by `generate --json` and `bench`.

use serde::Serialize;

use crate::backend::stats::FlashStats;

/// What one generation cost. Times are wall-clock milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GenerationStats {
    /// How weights were held: `resident` (memory-mapped, all in RAM) for now.
    pub strategy: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_ms: f64,
    pub decode_ms: f64,
    /// Decode speed: generated tokens per second, prompt excluded.
    pub tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    /// Bytes the storage layer read from the SSD per generated token.
    pub bytes_read_per_token: f64,
    pub io_ms_per_token: f64,
    pub mem_ms_per_token: f64,
    pub compute_ms_per_token: f64,
    /// Peak resident set size of the process (Linux: VmHWM), if known.
    pub peak_rss_bytes: Option<u64>,
    /// The flash path's cumulative counters (whole session), when the FFN reads from flash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash: Option<FlashStats>,
    /// The GPU backend's costs, when generation ran on a GPU (`--backend gpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::engine::gpu::GpuRunStats>,
    /// What speculative decoding did, when it ran (`--draft`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<DraftStats>,
}

/// What speculative decoding did over one generation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DraftStats {
    /// The draft source (`self`, `ngram`, a model path).
    pub source: String,
    /// Tokens drafted, and how many of them the target accepted.
    pub drafted: u64,
    pub accepted: u64,
    pub acceptance_rate: f64,
    /// Passes of the full model after the prompt: verify passes and plain steps (no draft).
    pub passes: u64,
    pub verify_passes: u64,
    /// Generated tokens per pass of the full model.
    pub tokens_per_pass: f64,
    /// Time spent drafting and verifying, per generated token.
    pub draft_ms_per_token: f64,
    pub verify_ms_per_token: f64,
    /// Memory the draft holds beyond the target (a drafting head, a draft model).
    pub memory_bytes: u64,
}

/// The process's peak resident set size, from `/proc/self/status` (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
