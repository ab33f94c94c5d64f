//! How a model is run: where FFN bundles come from, the memory budget, the window and the
//! reads. The command line's flags fill one of these; an embedding application builds it.

use std::path::PathBuf;

use crate::backend::kv_cache::KvType;
use crate::engine::flash::{FlashOptions, Selection, Strategy};
use crate::quant::Activations;
use crate::storage::CoalesceOptions;

/// Options for running a model; [`RunOptions::default`] is what the command line does with
/// no flags given.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where FFN bundles come from (flash images only).
    pub strategy: Strategy,
    /// Compute every FFN neuron instead of the predicted ones.
    pub dense: bool,
    /// Use the true active set instead of the predictor (quality experiments; slow).
    pub oracle: bool,
    /// Under a memory budget, keep the predictor even where the planner expects computing
    /// every neuron to read less.
    pub predictor: bool,
    /// Memory budget for the whole process, in bytes (flash images; a GGUF or HF model is
    /// converted into an image first, see [`crate::api::cache`]).
    pub memory_budget: Option<u64>,
    /// GPU memory budget, in bytes, for a flash image on the GPU.
    pub vram_budget: Option<u64>,
    /// Element type of the KV cache (`None`: the backend's default, f16 on the CPU, f32 on
    /// the GPU).
    pub kv_type: Option<KvType>,
    /// How the CPU's activations meet quantised weights: Q8 blocks as llama.cpp (the
    /// default), or f32 with the dequantised weights, the GPU backend's arithmetic.
    pub activations: Activations,
    /// Tokens a neuron stays in the window after its last use (the paper's k).
    pub window: usize,
    /// Concurrent reads.
    pub io_threads: usize,
    /// A disk curve saved by the disk probe: the number of concurrent reads is then the one
    /// it says reads fastest at `max_read` (replacing `io_threads`).
    pub disk_curve: Option<PathBuf>,
    /// Largest coalesced read, in bytes.
    pub max_read: u64,
    /// Merge two reads when the gap between them is at most this many bytes.
    pub max_gap: u64,
    /// Read around the page cache (`O_DIRECT`), so that a memory budget is honest.
    pub direct: bool,
    /// Read a neuron's gate, up and down separately (ablation: no row-column bundling).
    pub unbundled: bool,
    /// Read the next layer's bundles while this one computes (when every neuron is computed
    /// under a memory budget).
    pub lookahead: bool,
    /// Check each bundle read against the image's checksums.
    pub checksums: bool,
    /// Instead of a predictor, random active sets of this density (I/O benchmarks on
    /// synthetic images).
    pub synthetic_activity: Option<f64>,
    /// With `synthetic_activity`: the fraction of each token's active set that is new.
    pub synthetic_churn: f64,
    /// Where model files run under a budget are converted into flash images (`None`: the
    /// default of [`crate::api::cache::cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Show a progress bar while converting.
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            strategy: Strategy::Flash,
            dense: false,
            oracle: false,
            predictor: false,
            memory_budget: None,
            vram_budget: None,
            kv_type: None,
            activations: Activations::default(),
            window: 5,
            io_threads: 8,
            disk_curve: None,
            max_read: 1 << 20,
            max_gap: 16 << 10,
            direct: true,
            unbundled: false,
            lookahead: true,
            checksums: true,
            synthetic_activity: None,
            synthetic_churn: 0.2,
            cache_dir: None,
            progress: false,
        }
    }
}

impl RunOptions {
    /// Which neurons each token computes: every one when asked or when nothing predicts them
    /// (`calibrated` false), the true active set for oracle runs, else the predictor's.
    pub fn selection(&self, calibrated: bool) -> Selection {
        if self.dense || !calibrated {
            Selection::All
        } else if self.oracle {
            Selection::Oracle
        } else {
            Selection::Predictor
        }
    }

    /// The flash path's options for `selection`, before a memory plan fills in the window's
    /// slots and pins.
    pub fn flash_options(&self, selection: Selection) -> FlashOptions {
        FlashOptions {
            strategy: self.strategy,
            selection,
            window_slots: None,
            window_tokens: self.window,
            io_threads: self.io_threads,
            coalesce: CoalesceOptions {
                max_read: self.max_read as usize,
                max_gap: self.max_gap as usize,
                ..CoalesceOptions::default()
            },
            direct: self.direct,
            unbundled: self.unbundled,
            pinned: None,
            lookahead: self.lookahead,
            verify: self.checksums,
        }
    }
}
