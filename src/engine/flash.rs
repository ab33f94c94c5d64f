//! Flash offloading: the FFN of each layer computed from bundles that live on the SSD.
//!
//! Per token and layer: the predictor guesses the active neurons from the FFN input; the
//! layer's window says which of them are already in memory; the missing bundles are read
//! with direct, coalesced, concurrent reads straight into free window slots; the sparse FFN
//! runs over the active bundles. The baselines the paper compares against share this code
//! and differ only in where bundles come from (see [`Strategy`]).
//!
//! When every neuron is computed and each window is a pinned prefix of its layer on disk (the
//! planner's choice for dense runs under a budget, on an image stored hottest first), every
//! token reads the same tail of every layer. Those reads are known in advance, so the next
//! layer's tail is read in the background while this layer computes (*lookahead*), and the
//! time per token approaches the larger of I/O and compute instead of their sum.

use crate::storage::{ReadError, StorageError};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::cpu::forward::FfnCompute;
use crate::backend::cpu::ops::add_into;
use crate::backend::cpu::sparse_ffn::{activations, BundleParts, Neuron, SparseFfn};
use crate::engine::stats::FlashStats;
use crate::image::FlashImage;
use crate::model::weights::ModelWeights;
use crate::storage::{
    buffer_bytes, AlignedBuf, CoalesceOptions, Fetched, FlashFile, Prefetcher, ReadPool, ReadStats,
};
use crate::window::{Window, WindowConfig};

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

/// What calibration provides to the flash path: per layer, a predicted active set and the
/// threshold that defines the true one.
pub trait Sparsity {
    /// The neurons predicted active for FFN input `h` of `layer`, appended to `active`.
    fn predict(&self, layer: usize, h: &[f32], active: &mut Vec<u32>);
    /// A neuron is truly active when `|a_i|` reaches this.
    fn threshold(&self, layer: usize) -> f32;
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

struct LayerState {
    window: Window,
    /// Model neuron -> position on disk (the image may permute neurons).
    disk_slot: Vec<u32>,
    /// Resident strategy: the whole section in RAM.
    resident: Option<Vec<u8>>,
}

/// The FFN of a flash image (see the module docs).
pub struct FlashFfn<'a> {
    image: &'a FlashImage,
    weights: &'a ModelWeights,
    calibration: Option<&'a dyn Sparsity>,
    opts: FlashOptions,
    parts: BundleParts,
    stride: usize,
    layers: Vec<LayerState>,
    pool: Option<Arc<ReadPool>>,
    lookahead: Option<Lookahead>,
    sparse: SparseFfn,
    active: Vec<u32>,
    ranges: Vec<(u64, usize)>,
    /// Active neurons the window could not hold this token (sorted), and their bundles.
    overflow_ids: Vec<u32>,
    overflow: Vec<u8>,
    /// The naive baseline's layer buffer, and where the layer starts in it.
    naive: AlignedBuf,
    naive_skip: usize,
    oracle_acts: Vec<f32>,
    /// Per layer, the pinned neurons and their window slots, sorted by neuron: what a
    /// speculative draft computes from memory ([`FfnCompute::ffn_draft`]).
    draft: Vec<Vec<(u32, u32)>>,
    /// A verify batch's active set per position, before their union is loaded.
    row_sets: Vec<Vec<u32>>,
    /// Per layer, each neuron's activity while recording (the sum over tokens of its share
    /// of the token's squared activations), or `None` when not recording.
    activity: Option<Vec<Vec<f32>>>,
    /// Per layer, copies of the draft neurons the window does not pin, in the order of the
    /// draft set's entries marked [`COPIED`].
    draft_copies: Vec<Vec<u8>>,
    stats: FlashStats,
}

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("{0}")]
    Setup(String),
}

impl<'a> FlashFfn<'a> {
    pub fn new(
        image: &'a FlashImage,
        weights: &'a ModelWeights,
        calibration: Option<&'a dyn Sparsity>,
        opts: FlashOptions,
    ) -> Result<FlashFfn<'a>, FlashError> {
        if opts.selection != Selection::All && calibration.is_none() {
            return Err(FlashError::Setup(
                "this image has no calibration (thresholds and predictors): calibrate it \
                 first (`llmflash calibrate IMAGE`), or use dense selection"
                    .into(),
            ));
        }
        let parts =
            BundleParts::of_image(image, weights.config.ffn_kind()).map_err(FlashError::Setup)?;
        let stride = image.bundle().stride;
        let layers = (0..weights.config.n_layers)
            .map(|l| layer_state(image, l, stride, &opts))
            .collect::<Result<_, _>>()?;
        let needs_reads = matches!(opts.strategy, Strategy::Flash | Strategy::Naive);
        let pool = if needs_reads {
            let file = FlashFile::open(image.file(), opts.direct).map_err(|e| {
                FlashError::Setup(format!("opening {}: {e}", image.file().display()))
            })?;
            Some(Arc::new(ReadPool::new(
                Arc::new(file),
                opts.io_threads.max(1),
            )))
        } else {
            None
        };
        let pinned = match opts.strategy {
            Strategy::Flash => opts.pinned.clone(),
            _ => None,
        };
        let mut ffn = FlashFfn {
            image,
            weights,
            calibration,
            opts,
            parts,
            stride,
            layers,
            pool,
            lookahead: None,
            sparse: SparseFfn::new(),
            active: Vec::new(),
            ranges: Vec::new(),
            overflow_ids: Vec::new(),
            overflow: Vec::new(),
            naive: AlignedBuf::new(0),
            naive_skip: 0,
            oracle_acts: Vec::new(),
            draft: Vec::new(),
            row_sets: Vec::new(),
            activity: None,
            draft_copies: Vec::new(),
            stats: FlashStats::default(),
        };
        for (layer, ids) in pinned.iter().flatten().enumerate() {
            ffn.pin(layer, ids)?;
        }
        if let (Some(first), Some(pool)) = (ffn.static_tails(), ffn.pool.clone()) {
            let tails = first
                .iter()
                .enumerate()
                .map(|(layer, &s)| {
                    let n = image.ffn_section(layer).n_neurons;
                    (image.bundle_offset(layer, s), (n - s) * stride)
                })
                .collect();
            let layer_bytes = (0..ffn.layers.len())
                .map(|l| image.ffn_section(l).n_neurons * stride)
                .max()
                .unwrap_or(0);
            ffn.lookahead = Some(Lookahead::new(
                pool,
                ffn.opts.coalesce,
                tails,
                first,
                lookahead_depth(layer_bytes),
            )?);
        }
        Ok(ffn)
    }

    /// Per layer, the disk slot where the neurons outside the window start, when every token
    /// reads exactly those: every neuron computed, and each window a pinned prefix of its
    /// layer on disk (what the planner pins for dense runs).
    fn static_tails(&self) -> Option<Vec<usize>> {
        let pins = self.opts.pinned.as_ref()?;
        if !self.opts.lookahead
            || self.opts.strategy != Strategy::Flash
            || self.opts.selection != Selection::All
        {
            return None;
        }
        let prefix = |(layer, state): (usize, &LayerState)| {
            let s = state.window.capacity();
            let ids = pins.get(layer)?;
            let pinned_prefix = ids.len() == s
                && ids
                    .iter()
                    .all(|&i| (state.disk_slot[i as usize] as usize) < s);
            pinned_prefix.then_some(s)
        };
        self.layers.iter().enumerate().map(prefix).collect()
    }

    /// Pins `ids` in `layer`'s window and reads their bundles into the slots they got.
    fn pin(&mut self, layer: usize, ids: &[u32]) -> Result<(), FlashError> {
        let setup = |e: String| FlashError::Setup(format!("pinning layer {layer}: {e}"));
        let mut loads = self.layers[layer]
            .window
            .pin(ids)
            .map_err(|e| setup(e.to_string()))?;
        loads.sort_unstable_by_key(|&(n, _)| self.offset(layer, n));
        let ranges: Vec<(u64, usize)> = loads
            .iter()
            .map(|&(n, _)| (self.offset(layer, n), self.stride))
            .collect();
        let pool = self
            .pool
            .as_ref()
            .expect("the flash strategy opens the file");
        let window = &mut self.layers[layer].window;
        let stats = pool
            .read_ranges(&ranges, &self.opts.coalesce, &mut |r, bytes| {
                window.bundle_mut(loads[r].1).copy_from_slice(bytes)
            })
            .map_err(|e| setup(e.to_string()))?;
        self.stats.bytes_read += stats.bytes_read;
        for &(n, slot) in &loads {
            self.check(layer, n, self.layers[layer].window.bundle(slot))
                .map_err(|e| setup(e.to_string()))?;
        }
        if self.draft.len() <= layer {
            self.draft.resize_with(layer + 1, Vec::new);
        }
        let draft = &mut self.draft[layer];
        draft.extend(loads);
        draft.sort_unstable();
        Ok(())
    }

    /// Bytes this FFN holds in memory (window slabs, resident copies, scratch).
    pub fn memory_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.window.bytes() + l.resident.as_ref().map_or(0, Vec::len))
            .sum();
        let lookahead = self.lookahead.as_ref().map_or(0, Lookahead::bytes);
        layers + self.overflow.capacity() + self.naive.len() + lookahead
    }

    /// With oracle selection: every neuron's hidden activation from the last `ffn` call, in
    /// model order (what calibration records).
    pub fn last_activations(&self) -> &[f32] {
        &self.oracle_acts
    }

    /// Chooses this token's neurons for `layer` into `self.active` (sorted).
    fn select(&mut self, layer: usize, h: &[f32]) {
        let n = self.layers[layer].disk_slot.len();
        self.active.clear();
        match self.opts.selection {
            Selection::All => self.active.extend(0..n as u32),
            Selection::Predictor => {
                let cal = self.calibration.expect("checked in new");
                cal.predict(layer, h, &mut self.active);
            }
            Selection::Oracle => {
                let cal = self.calibration.expect("checked in new");
                let t = cal.threshold(layer);
                let all: Vec<Neuron> = (0..n as u32)
                    .map(|i| (i, self.mmap_bundle(layer, i)))
                    .collect();
                let bias = self.weights.layers[layer].ffn_bias.up.as_deref();
                activations(&self.parts, h, &all, bias, &mut self.oracle_acts);
                let acts = &self.oracle_acts;
                self.active
                    .extend((0..n as u32).filter(|&i| acts[i as usize].abs() >= t));
            }
        }
        self.active.sort_unstable();
    }

    fn mmap_bundle(&self, layer: usize, neuron: u32) -> &'a [u8] {
        let slot = self.layers[layer].disk_slot[neuron as usize] as usize;
        self.image.bundle_bytes(layer, slot)
    }

    /// File offset of a neuron's bundle.
    /// Checks the bundle of model neuron `neuron` of `layer`, just read, against the image's
    /// checksum (unless checks are off).
    fn check(&self, layer: usize, neuron: u32, bytes: &[u8]) -> Result<(), StorageError> {
        if !self.opts.verify {
            return Ok(());
        }
        let slot = self.layers[layer].disk_slot[neuron as usize] as usize;
        self.image.check_bundle(layer, slot, bytes)
    }

    fn offset(&self, layer: usize, neuron: u32) -> u64 {
        let slot = self.layers[layer].disk_slot[neuron as usize] as usize;
        self.image.bundle_offset(layer, slot)
    }
}

impl FfnCompute for FlashFfn<'_> {
    fn flash_stats(&self) -> Option<FlashStats> {
        let mut s = self.stats.clone();
        s.memory_bytes = self.memory_bytes() as u64;
        s.selection = self.opts.selection.name().into();
        s.lookahead = self.lookahead.is_some();
        Some(s)
    }

    fn ffn(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        let t0 = Instant::now();
        self.select(layer, h);
        self.stats.tokens += (layer == 0) as u64;
        self.stats.neurons_needed += self.active.len() as u64;
        self.stats.compute += t0.elapsed();
        match self.opts.strategy {
            Strategy::Naive => self.read_whole_layer(layer)?,
            Strategy::Flash if self.lookahead.is_some() => self.load_tail(layer)?,
            Strategy::Flash => self.load_through_window(layer)?,
            Strategy::Resident | Strategy::Mmap => {}
        }
        self.compute_rows(layer, h.len(), h, out);
        Ok(())
    }

    /// Dense runs with lookahead need the same bundles for every token, so a prompt can go
    /// through a batch at a time: each layer's tail is read once per batch, not once per token.
    fn batched(&self) -> bool {
        self.lookahead.is_some()
    }

    /// Every strategy verifies a few positions at once: with lookahead as a prompt batch,
    /// otherwise through the union of the positions' active sets (each missing bundle read
    /// once), each position then computing over its own set.
    fn verify_batched(&self) -> bool {
        true
    }

    fn has_draft(&self) -> bool {
        self.draft.iter().any(|d| !d.is_empty())
    }

    fn ffn_draft(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        let window = &self.layers[layer].window;
        let copies = self.draft_copies.get(layer).map_or(&[][..], Vec::as_slice);
        let stride = self.stride;
        let mut copied = 0;
        let mut bundle = |(id, slot): (u32, u32)| {
            if slot != COPIED {
                return (id, window.bundle(slot));
            }
            copied += 1;
            (id, &copies[(copied - 1) * stride..copied * stride])
        };
        let neurons: Vec<Neuron> = self
            .draft
            .get(layer)
            .map(|d| d.iter().map(|&e| bundle(e)).collect())
            .unwrap_or_default();
        let bias = self.weights.layers[layer].ffn_bias.up.as_deref();
        self.sparse.compute(&self.parts, h, &neurons, bias, out);
        if let Some(b) = &self.weights.layers[layer].ffn_bias.down {
            add_into(out, b);
        }
        Ok(())
    }

    fn record_activity(&mut self, on: bool) {
        self.activity = on.then(|| {
            (self.layers.iter())
                .map(|l| vec![0.0; l.disk_slot.len()])
                .collect()
        });
    }

    fn load_draft_neurons(&mut self, per_layer: usize) -> Result<usize, String> {
        let activity = self
            .activity
            .take()
            .ok_or("no activity was recorded: call record_activity(true) before the prompt")?;
        if self.opts.strategy != Strategy::Flash {
            return Err("drafting from chosen neurons needs the flash strategy".into());
        }
        let mut bytes = 0;
        for (layer, scores) in activity.iter().enumerate() {
            bytes += self.load_layer_draft(layer, scores, per_layer)?;
        }
        Ok(bytes)
    }

    fn ffn_batch(
        &mut self,
        layer: usize,
        hidden: usize,
        hs: &[f32],
        out: &mut [f32],
    ) -> Result<(), ReadError> {
        if self.lookahead.is_none() {
            return self.ffn_union(layer, hidden, hs, out);
        }
        let rows = (hs.len() / hidden) as u64;
        let Some(first) = hs.get(..hidden) else {
            return Ok(());
        };
        let t0 = Instant::now();
        self.select(layer, first);
        self.stats.tokens += (layer == 0) as u64 * rows;
        self.stats.neurons_needed += self.active.len() as u64 * rows;
        self.stats.compute += t0.elapsed();
        self.load_tail(layer)?;
        // Tokens after the first find the tail in memory.
        self.stats.window_hits += self.active.len() as u64 * (rows - 1);
        self.compute_rows(layer, hidden, hs, out);
        Ok(())
    }
}

impl FlashFfn<'_> {
    /// A verify batch without lookahead: each position's active set, their union brought into
    /// memory with one round of reads, then each position computed over its own set, exactly
    /// as [`FfnCompute::ffn`] would compute it alone.
    fn ffn_union(
        &mut self,
        layer: usize,
        hidden: usize,
        hs: &[f32],
        out: &mut [f32],
    ) -> Result<(), ReadError> {
        let rows = hs.len() / hidden;
        let t0 = Instant::now();
        let mut sets = std::mem::take(&mut self.row_sets);
        sets.resize_with(rows, Vec::new);
        for (set, h) in sets.iter_mut().zip(hs.chunks_exact(hidden)) {
            self.select(layer, h);
            std::mem::swap(set, &mut self.active);
            self.stats.neurons_needed += set.len() as u64;
        }
        self.active.clear();
        sets.iter()
            .for_each(|set| self.active.extend_from_slice(set));
        self.active.sort_unstable();
        self.active.dedup();
        self.stats.tokens += (layer == 0) as u64 * rows as u64;
        self.stats.compute += t0.elapsed();
        let loaded = match self.opts.strategy {
            Strategy::Naive => self.read_whole_layer(layer),
            Strategy::Flash => self.load_through_window(layer),
            Strategy::Resident | Strategy::Mmap => Ok(()),
        };
        if let Err(e) = loaded {
            self.row_sets = sets;
            return Err(e);
        }
        for (r, set) in sets.iter().enumerate() {
            self.active.clear();
            self.active.extend_from_slice(set);
            let span = r * hidden..(r + 1) * hidden;
            self.compute_rows(layer, hidden, &hs[span.clone()], &mut out[span]);
        }
        self.row_sets = sets;
        Ok(())
    }

    /// Adds the activations just computed for `self.active` to the recorded activity: each
    /// token's squared activations as shares of their sum, so every token weighs the same.
    fn record(&mut self, layer: usize) {
        let Some(activity) = self.activity.as_mut() else {
            return;
        };
        let (acts, tokens) = self.sparse.last_activations();
        let scores = &mut activity[layer];
        for t in 0..tokens {
            let at = |k: usize| acts[k * tokens + t];
            let total: f32 = (0..self.active.len()).map(|k| at(k) * at(k)).sum();
            if total > 0.0 {
                for (k, &id) in self.active.iter().enumerate() {
                    scores[id as usize] += at(k) * at(k) / total;
                }
            }
        }
    }

    /// Makes `layer`'s draft set its `count` most active neurons, copying into memory (one
    /// round of coalesced reads) those the window does not pin. Returns the bytes copied.
    fn load_layer_draft(
        &mut self,
        layer: usize,
        scores: &[f32],
        count: usize,
    ) -> Result<usize, String> {
        let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
        ids.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
        ids.truncate(count.min(ids.len()));
        ids.sort_unstable();
        let window = &self.layers[layer].window;
        let entries: Vec<(u32, u32)> = ids
            .iter()
            .map(
                |&id| match window.slot(id).filter(|_| window.is_pinned(id)) {
                    Some(slot) => (id, slot),
                    None => (id, COPIED),
                },
            )
            .collect();
        let copied: Vec<u32> = (entries.iter())
            .filter(|e| e.1 == COPIED)
            .map(|e| e.0)
            .collect();
        let stride = self.stride;
        let mut buf = vec![0u8; copied.len() * stride];
        // Reads in file order; each lands at its neuron's place in the copies.
        let mut order: Vec<usize> = (0..copied.len()).collect();
        order.sort_unstable_by_key(|&k| self.offset(layer, copied[k]));
        let ranges: Vec<(u64, usize)> = (order.iter())
            .map(|&k| (self.offset(layer, copied[k]), stride))
            .collect();
        let pool = self
            .pool
            .as_ref()
            .ok_or("the flash strategy opens the file")?;
        let stats = pool
            .read_ranges(&ranges, &self.opts.coalesce, &mut |r, bytes| {
                let k = order[r];
                buf[k * stride..(k + 1) * stride].copy_from_slice(bytes)
            })
            .map_err(|e| format!("reading layer {layer}'s draft neurons: {e}"))?;
        self.stats.bytes_read += stats.bytes_read;
        for (k, &n) in copied.iter().enumerate() {
            self.check(layer, n, &buf[k * stride..(k + 1) * stride])
                .map_err(|e| format!("reading layer {layer}'s draft neurons: {e}"))?;
        }
        if self.draft.len() <= layer {
            self.draft.resize_with(layer + 1, Vec::new);
        }
        if self.draft_copies.len() <= layer {
            self.draft_copies.resize_with(layer + 1, Vec::new);
        }
        self.draft[layer] = entries;
        self.draft_copies[layer] = buf;
        Ok(copied.len() * stride)
    }

    /// `out` rows = the FFN of `hs` rows over the active neurons, once their bundles are at
    /// hand; each row exactly as a single token would compute it (a batch shares each
    /// bundle's gate and up rows across tokens).
    fn compute_rows(&mut self, layer: usize, hidden: usize, hs: &[f32], out: &mut [f32]) {
        let t1 = Instant::now();
        let mut sparse = std::mem::take(&mut self.sparse);
        let neurons = self.gather(layer);
        let bias = self.weights.layers[layer].ffn_bias.up.as_deref();
        if hs.len() == hidden {
            sparse.compute(&self.parts, hs, &neurons, bias, out);
        } else {
            sparse.compute_batch(&self.parts, hidden, hs, &neurons, bias, out);
        }
        if let Some(b) = &self.weights.layers[layer].ffn_bias.down {
            out.chunks_exact_mut(hidden).for_each(|o| add_into(o, b));
        }
        drop(neurons);
        self.sparse = sparse;
        self.record(layer);
        self.stats.compute += t1.elapsed();
    }
}

impl FlashFfn<'_> {
    /// The active neurons' bundles, wherever this strategy keeps them.
    fn gather(&self, layer: usize) -> Vec<Neuron<'_>> {
        let state = &self.layers[layer];
        let stride = self.stride;
        fn bundle_in(buf: &[u8], slot: u32, stride: usize) -> &[u8] {
            &buf[slot as usize * stride..(slot as usize + 1) * stride]
        }
        let slice = |buf, i: u32| bundle_in(buf, state.disk_slot[i as usize], stride);
        match self.opts.strategy {
            Strategy::Resident => {
                let section = state
                    .resident
                    .as_deref()
                    .expect("resident strategy loads every layer");
                self.active
                    .iter()
                    .map(|&i| (i, slice(section, i)))
                    .collect()
            }
            Strategy::Mmap => self
                .active
                .iter()
                .map(|&i| (i, self.mmap_bundle(layer, i)))
                .collect(),
            Strategy::Naive => {
                let buf = &self.naive[self.naive_skip..];
                self.active.iter().map(|&i| (i, slice(buf, i))).collect()
            }
            Strategy::Flash => self
                .active
                .iter()
                .map(|&i| match state.window.slot(i) {
                    Some(s) => (i, state.window.bundle(s)),
                    None if self.lookahead.is_some() => {
                        let la = self.lookahead.as_ref().expect("checked");
                        let at = state.disk_slot[i as usize] as usize - la.first_slot[layer];
                        (i, &la.tail()[at * stride..(at + 1) * stride])
                    }
                    None => {
                        let k = self
                            .overflow_ids
                            .binary_search(&i)
                            .expect("an active neuron is resident or overflowed");
                        (i, &self.overflow[k * self.stride..(k + 1) * self.stride])
                    }
                })
                .collect(),
        }
    }

    /// The naive baseline: the whole layer, every token, with direct reads.
    fn read_whole_layer(&mut self, layer: usize) -> Result<(), ReadError> {
        let t = Instant::now();
        let section = self.image.ffn_section(layer);
        let (offset, len) = (section.offset, section.len as usize);
        let pool = self.pool.as_ref().expect("naive strategy opens the file");
        // Straight into the layer buffer, as the flash path's tails are read: the baseline
        // pays for no copy that flash does not.
        let (stats, skip) = pool
            .read_span(offset, len, &self.opts.coalesce, &mut self.naive)
            .map_err(|e| ReadError::new(format!("layer {layer}'s FFN"), e))?;
        self.naive_skip = skip;
        if self.opts.verify {
            let bytes = &self.naive[skip..skip + len];
            self.image
                .check_bundles(layer, 0, bytes)
                .map_err(|e| ReadError::new(format!("layer {layer}'s FFN"), e))?;
        }
        self.stats.bytes_read += stats.bytes_read;
        self.stats.read_ops += stats.ops as u64;
        self.stats.neurons_loaded += self.active.len() as u64;
        self.stats.io += t.elapsed();
        Ok(())
    }

    /// The flash path when every token reads the same tails: collect this layer's tail (read
    /// in the background since an earlier layer), then queue the next ones.
    fn load_tail(&mut self, layer: usize) -> Result<(), ReadError> {
        let t = Instant::now();
        let n_layers = self.layers.len();
        let la = self.lookahead.as_mut().expect("called in lookahead mode");
        let stats = la
            .collect(layer, n_layers)
            .map_err(|e| ReadError::new(format!("layer {layer}'s FFN bundles"), e))?;
        let pinned = la.first_slot[layer];
        if self.opts.verify {
            self.image
                .check_bundles(layer, pinned, la.tail())
                .map_err(|e| ReadError::new(format!("layer {layer}'s FFN bundles"), e))?;
        }
        self.stats.window_hits += pinned as u64;
        self.stats.neurons_loaded += (self.active.len() - pinned) as u64;
        self.stats.bytes_read += stats.bytes_read;
        self.stats.read_ops += stats.ops as u64;
        self.stats.io += t.elapsed();
        Ok(())
    }

    /// The flash path: window bookkeeping, then reads of the missing bundles straight into
    /// their slots (or into the overflow buffer when the window cannot hold them).
    fn load_through_window(&mut self, layer: usize) -> Result<(), ReadError> {
        let t = Instant::now();
        let plan = self.layers[layer]
            .window
            .plan(&self.active)
            .expect("active ids come from this layer's predictor");
        self.stats.window_hits += plan.hits as u64;
        self.stats.neurons_loaded += (plan.loads.len() + plan.overflow.len()) as u64;
        self.overflow_ids.clear();
        self.overflow_ids.extend_from_slice(&plan.overflow);
        self.overflow_ids.sort_unstable();
        self.overflow
            .resize(self.overflow_ids.len() * self.stride, 0);
        // Destinations in file order: window slots for loads, overflow rows otherwise.
        let mut targets: Vec<(u64, u32, Option<u32>)> = plan
            .loads
            .iter()
            .map(|&(n, s)| (self.offset(layer, n), n, Some(s)))
            .chain(
                self.overflow_ids
                    .iter()
                    .map(|&n| (self.offset(layer, n), n, None)),
            )
            .collect();
        targets.sort_unstable_by_key(|t| t.0);
        let pieces = self.pieces();
        self.ranges.clear();
        for &(base, _, _) in &targets {
            for &(off, len) in &pieces {
                self.ranges.push((base + off as u64, len));
            }
        }
        self.stats.memory += t.elapsed();

        let t_io = Instant::now();
        let pool = self.pool.as_ref().expect("flash strategy opens the file");
        let stride = self.stride;
        let window = &mut self.layers[layer].window;
        let (overflow, overflow_ids) = (&mut self.overflow, &self.overflow_ids);
        let mut copy = Duration::ZERO;
        let stats = pool
            .read_ranges(&self.ranges, &self.opts.coalesce, &mut |r, bytes| {
                let tc = Instant::now();
                let (_, neuron, slot) = targets[r / pieces.len()];
                let (off, _) = pieces[r % pieces.len()];
                let dst = match slot {
                    Some(s) => window.bundle_mut(s),
                    None => {
                        let k = overflow_ids.binary_search(&neuron).expect("listed above");
                        &mut overflow[k * stride..(k + 1) * stride]
                    }
                };
                dst[off..off + bytes.len()].copy_from_slice(bytes);
                copy += tc.elapsed();
            })
            .map_err(|e| ReadError::new(format!("layer {layer}'s FFN bundles"), e))?;
        self.stats.bytes_read += stats.bytes_read;
        self.stats.read_ops += stats.ops as u64;
        self.stats.io += t_io.elapsed().saturating_sub(copy);
        self.stats.memory += copy;
        if self.opts.verify {
            let (image, state) = (self.image, &self.layers[layer]);
            let (overflow, overflow_ids) = (&self.overflow, &self.overflow_ids);
            // On the worker threads, as the reads were.
            targets
                .par_iter()
                .try_for_each(|&(_, neuron, slot)| {
                    let bytes = match slot {
                        Some(s) => state.window.bundle(s),
                        None => {
                            let k = overflow_ids.partition_point(|&x| x < neuron);
                            &overflow[k * stride..(k + 1) * stride]
                        }
                    };
                    let disk_slot = state.disk_slot[neuron as usize] as usize;
                    image.check_bundle(layer, disk_slot, bytes)
                })
                .map_err(|e| ReadError::new(format!("layer {layer}'s FFN bundles"), e))?;
        }
        Ok(())
    }

    /// The byte ranges of one bundle that are read separately: the whole bundle, or each
    /// part on its own when bundling is switched off.
    fn pieces(&self) -> Vec<(usize, usize)> {
        if !self.opts.unbundled {
            return vec![(0, self.stride)];
        }
        let mut p: Vec<(usize, usize)> =
            [self.parts.gate, Some(self.parts.up), Some(self.parts.down)]
                .into_iter()
                .flatten()
                .map(|p| (p.offset, p.len))
                .collect();
        p.sort_unstable();
        p
    }
}

/// The slot of a draft neuron held in `draft_copies` rather than in the window.
const COPIED: u32 = u32::MAX;

/// Layers of at most this many bytes have their tails read two layers ahead instead of one:
/// a tail this small reads in about a millisecond, and the hand-off between the compute
/// thread and the reader would otherwise idle the disk for a noticeable part of that.
/// Larger tails keep one read in flight, since a third buffer would cost the window a layer.
pub const DEEP_LOOKAHEAD_LAYER: usize = 4 << 20;

/// Tails read ahead of the layer being computed, for layers of `layer_bytes`.
pub fn lookahead_depth(layer_bytes: usize) -> usize {
    if layer_bytes <= DEEP_LOOKAHEAD_LAYER {
        2
    } else {
        1
    }
}

/// Bytes the lookahead holds beyond the planner's reserve of two layers (the read staging
/// and overflow area that a window without lookahead uses): one buffer per tail in flight
/// plus the one being computed, each rounded out to whole aligned blocks.
pub fn lookahead_extra_bytes(layer_bytes: usize) -> usize {
    let buffers = (lookahead_depth(layer_bytes) + 1) * buffer_bytes(layer_bytes);
    buffers.saturating_sub(2 * layer_bytes)
}

/// Tails for [`FlashFfn::load_tail`]: the one being computed and `depth` being read, each in
/// its own aligned buffer that the reads land in directly.
struct Lookahead {
    prefetch: Prefetcher,
    /// Per layer: file offset and length of the bundles outside the window.
    tails: Vec<(u64, usize)>,
    /// Per layer: the disk slot of the tail's first bundle.
    first_slot: Vec<usize>,
    /// The tail of the layer being computed.
    current: Option<Fetched>,
    /// Buffers not in use.
    spare: Vec<AlignedBuf>,
    /// Layers whose tails are being read, oldest first.
    pending: VecDeque<usize>,
    depth: usize,
}

impl Lookahead {
    fn new(
        pool: Arc<ReadPool>,
        coalesce: CoalesceOptions,
        tails: Vec<(u64, usize)>,
        first_slot: Vec<usize>,
        depth: usize,
    ) -> Result<Lookahead, FlashError> {
        let prefetch = Prefetcher::new(pool, coalesce).map_err(|e| {
            FlashError::Setup(format!("cannot start the lookahead reader thread: {e}"))
        })?;
        Ok(Lookahead {
            prefetch,
            tails,
            first_slot,
            current: None,
            spare: Vec::new(),
            pending: VecDeque::new(),
            depth: depth.max(1),
        })
    }

    /// The tail of the layer being computed.
    fn tail(&self) -> &[u8] {
        self.current.as_ref().map_or(&[], Fetched::bytes)
    }

    /// Makes `layer`'s tail the current one, once read, and queues the following layers'
    /// reads into the buffers free by then (the previous layer's among them).
    fn collect(&mut self, layer: usize, n_layers: usize) -> Result<ReadStats, StorageError> {
        if self.pending.front() != Some(&layer) {
            // The first token, or layers run out of order: read this layer's tail now.
            self.drain();
            self.start(layer);
        }
        let fetched = self.prefetch.wait();
        self.pending.pop_front();
        if let Some(done) = self.current.take() {
            self.spare.push(done.buf);
        }
        let mut fetched = fetched;
        let result = std::mem::replace(&mut fetched.result, Ok(ReadStats::default()));
        self.current = Some(fetched);
        let mut next = self.pending.back().copied().unwrap_or(layer);
        while self.pending.len() < self.depth.min(n_layers) {
            next = (next + 1) % n_layers;
            self.start(next);
        }
        result
    }

    fn start(&mut self, layer: usize) {
        let (offset, len) = self.tails[layer];
        let buf = self.spare.pop().unwrap_or_else(|| AlignedBuf::new(0));
        self.prefetch.start(layer, offset, len, buf);
        self.pending.push_back(layer);
    }

    /// Collects (and discards) every read in flight.
    fn drain(&mut self) {
        while self.prefetch.in_flight() > 0 {
            self.spare.push(self.prefetch.wait().buf);
        }
        self.pending.clear();
    }

    /// The buffers at their largest (some of them may be on the reader thread now).
    fn bytes(&self) -> usize {
        let largest = self.tails.iter().map(|t| t.1).max().unwrap_or(0);
        (self.depth + 1) * buffer_bytes(largest)
    }
}

fn layer_state(
    image: &FlashImage,
    layer: usize,
    stride: usize,
    opts: &FlashOptions,
) -> Result<LayerState, FlashError> {
    let section = image.ffn_section(layer);
    let n = section.n_neurons;
    let mut disk_slot = vec![0u32; n];
    match &section.permutation {
        Some(perm) => {
            for (slot, &neuron) in perm.iter().enumerate() {
                disk_slot[neuron as usize] = slot as u32;
            }
        }
        None => disk_slot
            .iter_mut()
            .enumerate()
            .for_each(|(i, s)| *s = i as u32),
    }
    let capacity = match (&opts.strategy, &opts.window_slots) {
        (Strategy::Flash, Some(slots)) => slots[layer],
        (Strategy::Flash, None) => n,
        _ => 0,
    };
    let window = Window::new(WindowConfig {
        n_neurons: n,
        capacity,
        stride,
        k: opts.window_tokens,
    })
    .map_err(|e| FlashError::Setup(format!("layer {layer} window: {e}")))?;
    let resident = match opts.strategy {
        Strategy::Resident => {
            let mut all = Vec::with_capacity(n * stride);
            for s in 0..n {
                let bundle = image.bundle_bytes(layer, s);
                if opts.verify {
                    image.check_bundle(layer, s, bundle).map_err(|e| {
                        FlashError::Setup(format!("loading layer {layer}'s FFN: {e}"))
                    })?;
                }
                all.extend_from_slice(bundle);
            }
            Some(all)
        }
        _ => None,
    };
    Ok(LayerState {
        window,
        disk_slot,
        resident,
    })
}
