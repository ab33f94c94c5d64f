//! Options shared by the commands that run a model: KV cache type, and for flash images the
//! strategy, budget, window and I/O settings.

use crate::api::RunOptions;
use crate::backend::kv_cache::KvType;
use crate::budget::parse_bytes;
use crate::engine::flash::Strategy;
use crate::quant::Activations;

#[derive(clap::Args, Clone, Debug)]
pub struct FlashArgs {
    /// Where FFN bundles come from (flash images only): flash, resident, mmap or naive. Every
    /// bundle read is checked against the image's checksums, except under mmap.
    #[arg(long, default_value = "flash")]
    pub strategy: Strategy,
    /// Compute every FFN neuron instead of the predicted ones.
    #[arg(long, conflicts_with = "oracle")]
    pub dense: bool,
    /// Use the true active set instead of the predictor (quality experiments; slow).
    #[arg(long)]
    pub oracle: bool,
    /// Under --memory-budget, use the predictor even where the planner expects computing every
    /// neuron to read less (it then gives the predictors' memory to window slots).
    #[arg(long, conflicts_with_all = ["dense", "oracle"])]
    pub predictor: bool,
    /// Memory budget for the whole process, e.g. 48MiB or 1.5GiB. A GGUF file or HF directory
    /// is converted into a flash image first, once: into $LLMFLASH_CACHE (default
    /// ~/.cache/llmflash), where later runs find it.
    #[arg(long, value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    /// GPU memory budget with --backend gpu on a flash image, e.g. 64MiB: planned like
    /// --memory-budget (resident weights, predictors, KV cache, scratch, one layer's active
    /// neurons; the rest becomes window slots). Without it every neuron gets a slot.
    #[arg(long, value_parser = parse_bytes)]
    pub vram_budget: Option<u64>,
    /// Element type of the KV cache. CPU: f16 by default, as in llama.cpp, with its exact
    /// attention arithmetic; f32 is closer to a float reference. GPU: f32 by default; f16 halves
    /// the cache's VRAM (attention still computes in f32).
    #[arg(long, value_enum)]
    pub kv_type: Option<KvType>,
    /// CPU arithmetic of activations against quantised weights: q8 (quantised to Q8 blocks,
    /// llama.cpp's arithmetic) or f32 (dotted with the dequantised weights, the GPU backend's
    /// arithmetic, for comparing the two; slower).
    #[arg(long, value_enum, default_value_t = Activations::Q8)]
    pub activations: Activations,
    /// Tokens a neuron stays in the window after its last use (the paper's k).
    #[arg(long, default_value_t = 5, value_parser = super::values::window)]
    pub window: usize,
    /// Concurrent reads.
    #[arg(long, default_value_t = 8, value_parser = super::values::io_threads)]
    pub io_threads: usize,
    /// A disk curve saved by `bench --probe-disk`: the number of concurrent reads is then the
    /// one the curve says reads fastest at --max-read (replacing --io-threads).
    #[arg(long)]
    pub disk_curve: Option<std::path::PathBuf>,
    /// Largest coalesced read, in bytes.
    #[arg(long, default_value = "1MiB", value_parser = super::values::max_read)]
    pub max_read: u64,
    /// Merge two reads when the gap between them is at most this many bytes.
    #[arg(long, default_value = "16KiB", value_parser = super::values::max_gap)]
    pub max_gap: u64,
    /// Read through the page cache instead of bypassing it (the budget is then not honest).
    #[arg(long)]
    pub no_direct: bool,
    /// Read a neuron's gate, up and down separately (ablation: no row-column bundling).
    #[arg(long)]
    pub unbundled: bool,
    /// Do not read the next layer's bundles while this one computes (ablation; lookahead
    /// applies when every neuron is computed under a memory budget).
    #[arg(long)]
    pub no_lookahead: bool,
    /// Skip the checksum of each bundle read from flash (to measure what the check costs:
    /// by default every bundle read by the flash and naive strategies, on the CPU and the GPU,
    /// is checked before use, and a damaged one stops the decode). The mmap strategy never
    /// checks: it reads through page faults.
    #[arg(long)]
    pub no_checksums: bool,
    /// Instead of a predictor, draw random active sets of this density (I/O benchmarks on
    /// synthetic images; meaningless for text).
    #[arg(long, value_parser = super::values::density)]
    pub synthetic_activity: Option<f64>,
    /// With --synthetic-activity: the fraction of each token's active set that is new.
    #[arg(long, default_value_t = 0.2, value_parser = super::values::share)]
    pub synthetic_churn: f64,
}

impl FlashArgs {
    /// The library's options these flags ask for.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            strategy: self.strategy,
            dense: self.dense,
            oracle: self.oracle,
            predictor: self.predictor,
            memory_budget: self.memory_budget,
            vram_budget: self.vram_budget,
            kv_type: self.kv_type,
            activations: self.activations,
            window: self.window,
            io_threads: self.io_threads,
            disk_curve: self.disk_curve.clone(),
            max_read: self.max_read,
            max_gap: self.max_gap,
            direct: !self.no_direct,
            unbundled: self.unbundled,
            lookahead: !self.no_lookahead,
            checksums: !self.no_checksums,
            synthetic_activity: self.synthetic_activity,
            synthetic_churn: self.synthetic_churn,
            cache_dir: None,
            progress: true,
        }
    }
}
