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

mod lookahead;
mod options;
mod source;

pub use lookahead::{lookahead_depth, lookahead_extra_bytes, DEEP_LOOKAHEAD_LAYER};
pub use options::{FlashOptions, Selection, Strategy};

use std::time::Instant;

use crate::backend::cpu::forward::FfnCompute;
use crate::backend::cpu::ops::add_into;
use crate::backend::cpu::sparse_ffn::{activations, BundleParts, Neuron, SparseFfn};
use crate::backend::stats::FlashStats;
use crate::image::{FlashImage, Placement};
use crate::model::weights::ModelWeights;
use crate::quant::dequantize;
use crate::sparsity::Sparsity;
use crate::storage::{ReadError, StorageError};
use crate::window::Window;

use lookahead::Lookahead;
use source::{layer_state, Source};

struct LayerState {
    window: Window,
    /// Where each model neuron's bundle lies (the image may permute neurons).
    placement: Placement,
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
    /// Where the bundles come from: the one place the strategy is acted on.
    source: Source,
    sparse: SparseFfn,
    active: Vec<u32>,
    oracle_acts: Vec<f32>,
    /// Per layer, the pinned neurons and their window slots, sorted by neuron: what a
    /// speculative draft computes from memory ([`FfnCompute::ffn_draft`]).
    draft: Vec<Vec<(u32, u32)>>,
    /// A verify batch's active set per position, before their union is loaded.
    row_sets: Vec<Vec<u32>>,
    /// Per layer, each neuron's activity while recording (the sum over tokens of its share
    /// of the token's squared activations), or `None` when not recording.
    activity: Option<Vec<Vec<f32>>>,
    /// Per layer and neuron, the norm of its down-projection row (`NaN` until seen while
    /// recording activity).
    down_norms: Vec<Vec<f32>>,
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
        let n_layers = weights.config.n_layers;
        let source = Source::open(image, n_layers, stride, &opts)?;
        // Only the flash source has windows, and so pins.
        let windowed = source.flash_pool().is_some();
        let layers = (0..n_layers)
            .map(|l| layer_state(image, l, stride, &opts, windowed))
            .collect::<Result<_, _>>()?;
        let pinned = opts.pinned.clone().filter(|_| windowed);
        let mut ffn = FlashFfn {
            image,
            weights,
            calibration,
            opts,
            parts,
            stride,
            layers,
            source,
            sparse: SparseFfn::new(weights.activations),
            active: Vec::new(),
            oracle_acts: Vec::new(),
            draft: Vec::new(),
            row_sets: Vec::new(),
            activity: None,
            down_norms: Vec::new(),
            draft_copies: Vec::new(),
            stats: FlashStats::default(),
        };
        for (layer, ids) in pinned.iter().flatten().enumerate() {
            ffn.pin(layer, ids)?;
        }
        if let (Some(first), Some(pool)) = (ffn.static_tails(), ffn.source.flash_pool().cloned()) {
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
            let la = Lookahead::new(
                pool,
                ffn.opts.coalesce,
                tails,
                first,
                lookahead_depth(layer_bytes),
            )?;
            if let Source::Flash { lookahead, .. } = &mut ffn.source {
                *lookahead = Some(Box::new(la));
            }
        }
        Ok(ffn)
    }

    /// Per layer, the disk slot where the neurons outside the window start, when every token
    /// reads exactly those: every neuron computed, and each window a pinned prefix of its
    /// layer on disk (what the planner pins for dense runs).
    fn static_tails(&self) -> Option<Vec<usize>> {
        let pins = self.opts.pinned.as_ref()?;
        if !self.opts.lookahead
            || self.source.flash_pool().is_none()
            || self.opts.selection != Selection::All
        {
            return None;
        }
        let prefix = |(layer, state): (usize, &LayerState)| {
            let s = state.window.capacity();
            let ids = pins.get(layer)?;
            let pinned_prefix =
                ids.len() == s && ids.iter().all(|&i| state.placement.disk_slot(i) < s);
            pinned_prefix.then_some(s)
        };
        self.layers.iter().enumerate().map(prefix).collect()
    }

    /// Pins `ids` in `layer`'s window and reads their bundles into the slots they got.
    fn pin(&mut self, layer: usize, ids: &[u32]) -> Result<(), FlashError> {
        let setup = |e: String| FlashError::Setup(format!("pinning layer {layer}: {e}"));
        let state = &mut self.layers[layer];
        let loads = state.window.pin(ids).map_err(|e| setup(e.to_string()))?;
        let neurons: Vec<u32> = loads.iter().map(|&(n, _)| n).collect();
        let reads = state.placement.reads(&neurons, &[(0, self.stride)]);
        let Some(pool) = self.source.flash_pool() else {
            return Err(setup("only the flash strategy has windows to pin".into()));
        };
        let window = &mut state.window;
        let stats = pool
            .read_ranges(&reads.ranges, &self.opts.coalesce, &mut |r, bytes| {
                window
                    .bundle_mut(loads[reads.target(r).0].1)
                    .copy_from_slice(bytes)
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
        let layers: usize = self.layers.iter().map(|l| l.window.bytes()).sum();
        layers + self.source.bytes()
    }

    /// With oracle selection: every neuron's hidden activation from the last `ffn` call, in
    /// model order (what calibration records).
    pub fn last_activations(&self) -> &[f32] {
        &self.oracle_acts
    }

    /// Chooses this token's neurons for `layer` into `self.active` (sorted).
    fn select(&mut self, layer: usize, h: &[f32]) {
        let n = self.layers[layer].placement.n_neurons();
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
                let mode = self.weights.activations;
                activations(&self.parts, mode, h, &all, bias, &mut self.oracle_acts);
                let acts = &self.oracle_acts;
                self.active
                    .extend((0..n as u32).filter(|&i| acts[i as usize].abs() >= t));
            }
        }
        self.active.sort_unstable();
    }

    fn mmap_bundle(&self, layer: usize, neuron: u32) -> &'a [u8] {
        let slot = self.layers[layer].placement.disk_slot(neuron);
        self.image.bundle_bytes(layer, slot)
    }

    /// Checks the bundle of model neuron `neuron` of `layer`, just read, against the image's
    /// checksum (unless checks are off).
    fn check(&self, layer: usize, neuron: u32, bytes: &[u8]) -> Result<(), StorageError> {
        if !self.opts.verify {
            return Ok(());
        }
        let slot = self.layers[layer].placement.disk_slot(neuron);
        self.image.check_bundle(layer, slot, bytes)
    }
}

impl FfnCompute for FlashFfn<'_> {
    fn flash_stats(&self) -> Option<FlashStats> {
        let mut s = self.stats.clone();
        s.memory_bytes = self.memory_bytes() as u64;
        s.selection = self.opts.selection.name().into();
        s.lookahead = self.source.lookahead().is_some();
        Some(s)
    }

    fn ffn(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        let t0 = Instant::now();
        self.select(layer, h);
        self.stats.tokens += (layer == 0) as u64;
        self.stats.neurons_needed += self.active.len() as u64;
        self.stats.compute += t0.elapsed();
        self.load(layer)?;
        self.compute_rows(layer, h.len(), h, out);
        Ok(())
    }

    /// Dense runs with lookahead need the same bundles for every token, so a prompt can go
    /// through a batch at a time: each layer's tail is read once per batch, not once per token.
    fn batched(&self) -> bool {
        self.source.lookahead().is_some()
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
                .map(|l| vec![0.0; l.placement.n_neurons()])
                .collect()
        });
    }

    fn load_draft_neurons(&mut self, per_layer: usize) -> Result<usize, String> {
        let activity = self
            .activity
            .take()
            .ok_or("no activity was recorded: call record_activity(true) before the prompt")?;
        if self.source.flash_pool().is_none() {
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
        if self.source.lookahead().is_none() {
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
        // With lookahead the source loads this layer's tail.
        self.load(layer)?;
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
        if let Err(e) = self.load(layer) {
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

    /// Adds the contributions just computed for `self.active` to the recorded activity: each
    /// neuron's activation times the norm of its down-projection row (what it adds to the
    /// FFN's output), squared, as shares of the token's sum, so every token weighs the same.
    /// (Ranking by activation alone, as GRIFFIN does, agreed with the full model less often:
    /// docs/benchmarks.md, "Choosing the self draft's neurons".)
    fn record(&mut self, layer: usize) {
        if self.activity.is_none() {
            return;
        }
        self.learn_down_norms(layer);
        let norms = &self.down_norms[layer];
        let (acts, tokens) = self.sparse.last_activations();
        let Some(activity) = self.activity.as_mut() else {
            return;
        };
        let scores = &mut activity[layer];
        for t in 0..tokens {
            let at = |k: usize| acts[k * tokens + t] * norms[self.active[k] as usize];
            let total: f32 = (0..self.active.len()).map(|k| at(k) * at(k)).sum();
            if total > 0.0 {
                for (k, &id) in self.active.iter().enumerate() {
                    scores[id as usize] += at(k) * at(k) / total;
                }
            }
        }
    }

    /// The down-projection row norm of each active neuron of `layer`, computed the first time
    /// the neuron is seen (its bundle is at hand then) and kept: a recording sees every
    /// neuron of a dense prefill in its first batch.
    fn learn_down_norms(&mut self, layer: usize) {
        if self.down_norms.len() <= layer {
            self.down_norms.resize_with(layer + 1, Vec::new);
        }
        if self.down_norms[layer].is_empty() {
            self.down_norms[layer] = vec![f32::NAN; self.layers[layer].placement.n_neurons()];
        }
        let known = &self.down_norms[layer];
        if self.active.iter().all(|&i| !known[i as usize].is_nan()) {
            return;
        }
        let down = self.parts.down;
        let mut row = vec![0f32; self.weights.config.hidden_size];
        let learned: Vec<(u32, f32)> = (self.gather(layer).into_iter())
            .filter(|&(id, _)| known[id as usize].is_nan())
            .map(|(id, bundle)| {
                // A bundle's dtype and length are checked at open; 1 is neutral if not.
                let norm = match dequantize(down.dtype, down.of(bundle), &mut row) {
                    Ok(()) => row.iter().map(|x| x * x).sum::<f32>().sqrt(),
                    Err(_) => 1.0,
                };
                (id, norm)
            })
            .collect();
        for (id, norm) in learned {
            self.down_norms[layer][id as usize] = norm;
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
        let reads = self.layers[layer].placement.reads(&copied, &[(0, stride)]);
        let pool = (self.source.flash_pool())
            .ok_or("drafting from chosen neurons needs the flash strategy")?;
        let stats = pool
            .read_ranges(&reads.ranges, &self.opts.coalesce, &mut |r, bytes| {
                let k = reads.target(r).0;
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

/// The slot of a draft neuron held in `draft_copies` rather than in the window.
const COPIED: u32 = u32::MAX;
