//! The GPU decoders seen from the engine: [`GpuModel`], the single-step interface of the
//! dense [`GpuDecoder`] (GGUF and HF models) and of [`GpuFlashDecoder`] (flash images), for a
//! host application's own loop; their counters; and the GPU part of a generation's stats.
//! `draft::generate` is the decode loop for both backends.

use std::time::Duration;

use serde::Serialize;

use crate::backend::gpu::{GpuContext, GpuDecoder, GpuError, GpuFlashDecoder};
use crate::backend::stats::FlashStats;

/// What a GPU decoder has cost since it was built.
#[derive(Clone, Debug, Default)]
pub struct GpuCounters {
    /// Time the CPU spent blocked on the GPU (readbacks of tokens, logits, active lists).
    pub wait: Duration,
    /// Bytes copied to the GPU after it was built (FFN bundles on the flash path).
    pub uploaded: u64,
    /// GPU execution time from timestamp queries; `None` where the device has none.
    pub gpu_time: Option<Duration>,
    /// The flash path's counters (reads, window), when the FFN comes from flash.
    pub flash: Option<FlashStats>,
}

/// A decoder on the GPU, stepped one token at a time.
pub trait GpuModel {
    /// Runs a prompt token whose successor is known (no logits).
    fn feed(&mut self, token: u32) -> Result<(), GpuError>;
    /// Runs `token` and returns the next-token logits.
    fn step(&mut self, token: u32) -> Result<&[f32], GpuError>;
    /// Runs `token` and returns the most likely next token (ties: the lowest id).
    fn step_greedy(&mut self, token: u32) -> Result<u32, GpuError>;
    /// Positions consumed so far.
    fn position(&self) -> usize;
    /// Context capacity in positions.
    fn capacity(&self) -> usize;
    /// Bytes uploaded when the decoder was built (resident weights, tables, window buffers).
    fn resident_bytes(&self) -> u64;
    fn counters(&self) -> GpuCounters;
    fn context(&self) -> &GpuContext;
}

impl GpuModel for GpuDecoder {
    fn feed(&mut self, token: u32) -> Result<(), GpuError> {
        GpuDecoder::feed(self, token)
    }
    fn step(&mut self, token: u32) -> Result<&[f32], GpuError> {
        GpuDecoder::step(self, token)
    }
    fn step_greedy(&mut self, token: u32) -> Result<u32, GpuError> {
        GpuDecoder::step_greedy(self, token)
    }
    fn position(&self) -> usize {
        GpuDecoder::position(self)
    }
    fn capacity(&self) -> usize {
        GpuDecoder::capacity(self)
    }
    fn resident_bytes(&self) -> u64 {
        GpuDecoder::resident_bytes(self)
    }
    fn counters(&self) -> GpuCounters {
        GpuCounters {
            wait: self.gpu_wait(),
            gpu_time: self.gpu_time(),
            ..GpuCounters::default()
        }
    }
    fn context(&self) -> &GpuContext {
        self.ctx()
    }
}

impl GpuModel for GpuFlashDecoder<'_> {
    fn feed(&mut self, token: u32) -> Result<(), GpuError> {
        GpuFlashDecoder::feed(self, token)
    }
    fn step(&mut self, token: u32) -> Result<&[f32], GpuError> {
        GpuFlashDecoder::step(self, token)
    }
    fn step_greedy(&mut self, token: u32) -> Result<u32, GpuError> {
        GpuFlashDecoder::step_greedy(self, token)
    }
    fn position(&self) -> usize {
        GpuFlashDecoder::position(self)
    }
    fn capacity(&self) -> usize {
        GpuFlashDecoder::capacity(self)
    }
    fn resident_bytes(&self) -> u64 {
        GpuFlashDecoder::resident_bytes(self)
    }
    fn counters(&self) -> GpuCounters {
        GpuCounters {
            wait: self.gpu_wait(),
            uploaded: self.uploaded(),
            gpu_time: self.gpu_time(),
            flash: Some(self.flash_stats()),
        }
    }
    fn context(&self) -> &GpuContext {
        self.ctx()
    }
}

/// The GPU part of `generate --json`'s stats.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GpuRunStats {
    pub adapter: String,
    pub device_type: String,
    pub backend: String,
    /// How the shaders read f16 values: "native" (SHADER_F16) or "packed".
    pub f16: String,
    /// The adapter is a CPU (lavapipe/llvmpipe, SwiftShader, WARP): every time here is a CPU
    /// emulating a GPU, not a GPU's.
    pub emulated: bool,
    /// Time blocked on the GPU during decoding, per generated token (readbacks; on the flash
    /// path also the per-layer active-list readbacks).
    pub gpu_wait_ms_per_token: f64,
    /// Same, whole decode.
    pub gpu_wait_ms: f64,
    /// Bytes copied to the GPU per generated token (FFN bundles from flash; 0 when dense).
    pub bytes_uploaded_per_token: f64,
    /// Bytes on the GPU from the start: weights, tables, KV cache, window buffers.
    pub resident_bytes: u64,
    /// GPU execution time per generated token, summed over every compute pass from timestamp
    /// queries; `None` ("n/a") where the device has no TIMESTAMP_QUERY.
    pub gpu_time_ms_per_token: Option<f64>,
}

impl GpuRunStats {
    pub fn for_context(ctx: &GpuContext) -> GpuRunStats {
        GpuRunStats {
            adapter: ctx.info.name.clone(),
            device_type: format!("{:?}", ctx.info.device_type),
            backend: format!("{:?}", ctx.info.backend),
            f16: ctx.half.name().to_string(),
            emulated: ctx.info.device_type == wgpu::DeviceType::Cpu,
            ..GpuRunStats::default()
        }
    }
}

/// The GPU part of a decode's stats: `before` and `after` are the decoder's counters at the
/// start and end of decoding (after the prompt), which produced `generated` tokens.
pub fn gpu_run_stats(
    model: &dyn GpuModel,
    before: &GpuCounters,
    after: &GpuCounters,
    generated: usize,
) -> GpuRunStats {
    let passes = generated.saturating_sub(1).max(1) as f64;
    let wait_ms = (after.wait - before.wait).as_secs_f64() * 1e3;
    GpuRunStats {
        gpu_wait_ms_per_token: wait_ms / passes,
        gpu_wait_ms: wait_ms,
        bytes_uploaded_per_token: (after.uploaded - before.uploaded) as f64 / passes,
        resident_bytes: model.resident_bytes(),
        gpu_time_ms_per_token: match (before.gpu_time, after.gpu_time) {
            (Some(a), Some(b)) => Some((b - a).as_secs_f64() * 1e3 / passes),
            _ => None,
        },
        ..GpuRunStats::for_context(model.context())
    }
}
