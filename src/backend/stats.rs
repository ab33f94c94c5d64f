//! What the flash path's FFN reports, from either backend (`FfnCompute::flash_stats` on the
//! CPU, `GpuFlashDecoder::flash_stats` on the GPU): kept here, below both, so that the
//! backends need nothing from the engine above them.

use std::time::Duration;

use serde::Serialize;

/// Cumulative costs of the FFN blocks, split as in the paper's Table 2.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlashStats {
    pub tokens: u64,
    pub neurons_needed: u64,
    pub neurons_loaded: u64,
    pub window_hits: u64,
    pub bytes_read: u64,
    pub read_ops: u64,
    /// Waiting for reads.
    pub io: Duration,
    /// Window bookkeeping and copying bundles into slots.
    pub memory: Duration,
    /// Predictor and sparse FFN arithmetic.
    pub compute: Duration,
    /// Bytes the FFN holds in memory: window slabs, resident copies, read scratch.
    pub memory_bytes: u64,
    /// Which neurons ran: `dense`, `predictor` or `oracle`.
    pub selection: String,
    /// Whether the next layer's bundles were read while this one computed.
    pub lookahead: bool,
}
