//! [`GpuFlashOptions`]: how the GPU flash path holds and fetches bundles.

use crate::backend::kv_cache::KvType;
use crate::storage::CoalesceOptions;

/// How the GPU flash path holds and fetches bundles.
#[derive(Clone, Debug)]
pub struct GpuFlashOptions {
    /// Window slots per layer (from the VRAM planner); `None`: every neuron.
    pub window_slots: Option<Vec<usize>>,
    /// Tokens a neuron stays after its last use (the paper's k).
    pub window_tokens: usize,
    /// Slots of the overflow reserve (active neurons the window cannot hold go through it, in
    /// chunks of this size). At least 1.
    pub overflow_slots: usize,
    pub io_threads: usize,
    pub coalesce: CoalesceOptions,
    /// Bypass the page cache.
    pub direct: bool,
    /// Staging buffers in the ring (at least 2).
    pub staging_buffers: usize,
    /// Per layer, neurons given a window slot that is never evicted, uploaded at setup (the
    /// planner's choice, as on the CPU: hot neurons, or for dense runs each section's first
    /// bundles on disk, so that what is read per token is one contiguous tail).
    pub pinned: Option<Vec<Vec<u32>>>,
    /// The KV cache's value type (f32 by default; f16 halves it).
    pub kv_type: KvType,
    /// Check every bundle read from flash against the image's checksum before it is uploaded.
    pub verify: bool,
    /// Positions a verify pass may hold (1: single steps only), at most
    /// [`MAX_VERIFY_WIDTH`]; the activations get room for that many columns.
    pub verify_width: usize,
}

/// The widest verify pass of the flash decoder: the sparse passes' column masks are one u32.
pub const MAX_VERIFY_WIDTH: usize = 32;

impl Default for GpuFlashOptions {
    fn default() -> Self {
        GpuFlashOptions {
            window_slots: None,
            window_tokens: 5,
            overflow_slots: 64,
            io_threads: 8,
            coalesce: CoalesceOptions::default(),
            direct: true,
            staging_buffers: 2,
            pinned: None,
            kv_type: KvType::F32,
            verify: true,
            verify_width: 1,
        }
    }
}
