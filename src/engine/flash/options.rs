//! What a [`FlashFfn`](super::FlashFfn) is asked to do: where bundles come from
//! ([`Strategy`]), which neurons a token computes ([`Selection`]), and the rest of
//! [`FlashOptions`]. What calibration provides is [`crate::sparsity::Sparsity`].

use serde::Serialize;

use crate::storage::CoalesceOptions;

/// Where FFN bundles come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every bundle loaded into RAM once: the all-in-DRAM upper bound.
    Resident,
    /// Each layer's whole FFN read from the SSD for every token: the paper's naive baseline.
    Naive,
    /// The image memory-mapped and paged by the OS, as llama.cpp does.
    Mmap,
    /// Predicted neurons only, through the sliding window, with direct reads: this engine.
    Flash,
}

impl Selection {
    /// The name statistics report: `dense`, `predictor` or `oracle`.
    pub fn name(self) -> &'static str {
        match self {
            Selection::All => "dense",
            Selection::Predictor => "predictor",
            Selection::Oracle => "oracle",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resident" => Ok(Strategy::Resident),
            "naive" => Ok(Strategy::Naive),
            "mmap" => Ok(Strategy::Mmap),
            "flash" => Ok(Strategy::Flash),
            _ => Err(format!(
                "unknown strategy `{s}`; choose from resident, naive, mmap, flash"
            )),
        }
    }
}

/// Which neurons a token computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Every neuron (dense).
    All,
    /// The calibrated low-rank predictor's guess.
    Predictor,
    /// The true active set (|a_i| above the calibrated threshold), found by computing every
    /// neuron from the memory-mapped image: for quality measurements and tests, not speed.
    Oracle,
}

#[derive(Clone, Debug)]
pub struct FlashOptions {
    pub strategy: Strategy,
    pub selection: Selection,
    /// Window slots per layer (from the budget planner); `None` = every neuron.
    pub window_slots: Option<Vec<usize>>,
    /// Tokens a neuron stays after its last use (the paper's k).
    pub window_tokens: usize,
    /// Concurrent reads.
    pub io_threads: usize,
    pub coalesce: CoalesceOptions,
    /// Bypass the page cache (O_DIRECT / F_NOCACHE).
    pub direct: bool,
    /// Read gate, up and down of a neuron as separate reads (the paper's ablation without
    /// row-column bundling).
    pub unbundled: bool,
    /// Per layer, neurons given a window slot that is never evicted (hot neurons, read once at
    /// setup).
    pub pinned: Option<Vec<Vec<u32>>>,
    /// Read the next layer's bundles while this one computes, where they are known in advance
    /// (every neuron computed, each window a pinned prefix of its layer on disk).
    pub lookahead: bool,
    /// Check every bundle read from flash against the image's checksum before using it (off
    /// only to measure what the check costs). The mmap strategy reads through page faults and
    /// checks nothing.
    pub verify: bool,
}

impl Default for FlashOptions {
    fn default() -> Self {
        FlashOptions {
            strategy: Strategy::Flash,
            selection: Selection::Predictor,
            window_slots: None,
            window_tokens: 5,
            io_threads: 8,
            coalesce: CoalesceOptions::default(),
            direct: true,
            unbundled: false,
            pinned: None,
            lookahead: true,
            verify: true,
        }
    }
}
