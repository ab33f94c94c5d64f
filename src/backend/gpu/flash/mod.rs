//! The flash path on the GPU: a flash image's FFN bundles stay on the SSD and are streamed into
//! per-layer GPU window buffers as the predictor asks for them.
//!
//! Per token and layer:
//! 1. the GPU runs attention, the FFN norm and the layer's low-rank predictor, compacts the
//!    active ids into a list and copies it to a readback buffer: one small readback per layer
//!    (with dense selection every neuron is active and nothing is read back);
//! 2. the CPU-side [`Window`] (bookkeeping only: its slab is empty) decides which active
//!    neurons are hits, which get a free slot (evicting by the window and LRU rules: eviction
//!    moves no bytes) and which overflow;
//! 3. the storage layer ([`ReadPool`], direct coalesced reads) delivers the missing bundles into
//!    the next buffer of a ring of mapped staging buffers (`MAP_WRITE | COPY_SRC`, created once
//!    and re-mapped after each use), together with the lists and slot maps of this layer's
//!    sparse passes;
//! 4. one command buffer copies staging -> the window's free slots, runs the sparse FFN over
//!    the window (list and slot map copied from staging), then over the overflow neurons in
//!    chunks of the overflow reserve (each chunk copied into the reserve buffer and added to the
//!    FFN output), the residual add, and the next layer's attention and predictor.
//!
//! The window pass sums its neurons in id order, like the CPU flash path; overflow chunks are
//! summed separately and added, so the logits depend on the window size only through float
//! rounding (the active sets do not depend on it at all).
//!
//! A verify pass ([`GpuFlashDecoder::verify`], speculative decoding) runs several positions as
//! columns of one pass, as the dense decoder does: attention, norms and matvecs take the column
//! from the workgroup's z, the predictor runs per column and its lists come back together, and
//! the window is planned once for the union of the columns' active sets, so each missing bundle
//! is read and uploaded once for all of them. The sparse passes run over the union's lists with
//! a mask per neuron saying which columns compute it: each column sums its own neurons in list
//! order, as its single step would (to the bit, where the window holds the same neurons, e.g.
//! dense selection over a pinned prefix).
//!
//! A draft step ([`GpuFlashDecoder::draft_step`], the self draft) runs one position through
//! the full attention and KV cache with each layer's window pass over only its pinned
//! neurons, from lists built at setup: no predictor, no readback but the output's, no reads,
//! and the windows and flash counters untouched, so one command buffer holds every layer.

mod options;
mod pins;
mod staging;

pub use options::{GpuFlashOptions, MAX_VERIFY_WIDTH};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::cpu::sparse_ffn::BundleParts;
use crate::backend::gpu::buffers::{storage_bytes, storage_zeroed, Readback};
use crate::backend::gpu::forward::{prefill_passes, Core, Output};
use crate::backend::gpu::kernels::add::add;
use crate::backend::gpu::kernels::predictor::GpuPredictor;
use crate::backend::gpu::kernels::sparse_ffn::{sparse_ffn, SparseFfnArgs};
use crate::backend::gpu::kernels::{Dispatch, Width};
use crate::backend::gpu::{GpuContext, GpuError};
use crate::backend::stats::FlashStats;
use crate::image::{FlashImage, Placement};
use crate::model::weights::ModelWeights;
use crate::sparsity::predictor::Predictor;
use crate::storage::{FlashFile, ReadError, ReadPool};
use crate::window::{Plan, Window, WindowConfig};

use pins::pin;
use staging::Staging;

struct FlashLayer {
    window: Window,
    /// Where each model neuron's bundle lies on disk.
    placement: Placement,
    predictor: Option<Vec<Dispatch>>,
    /// The sparse FFN over the window slots into `out`, and over the overflow reserve into
    /// `out2`.
    window_ffn: Vec<Dispatch>,
    overflow_ffn: Vec<Dispatch>,
    /// The window's bundles on the GPU (`max(capacity, 1)` slots).
    slots: wgpu::Buffer,
    /// Where this layer's pass over its pinned neurons starts in `draft_lists` (in words),
    /// and its neuron count.
    draft: (usize, usize),
}

/// A flash image decoded on the GPU (see the module docs).
pub struct GpuFlashDecoder<'a> {
    core: Core,
    image: &'a FlashImage,
    stride: usize,
    n: usize,
    layers: Vec<FlashLayer>,
    pool: ReadPool,
    opts: GpuFlashOptions,
    overflow_slots: usize,
    overflow: wgpu::Buffer,
    /// The list and slot map of the sparse pass being run (copied from staging).
    list: wgpu::Buffer,
    map: wgpu::Buffer,
    /// The predictor's output list, read back per layer.
    pred_list: wgpu::Buffer,
    list_rb: Readback,
    add_out2: Dispatch,
    staging: Vec<Staging>,
    staging_size: u64,
    next_staging: usize,
    /// The pass's active neurons: the union of its columns' sets, in id order.
    active: Vec<u32>,
    /// Per neuron, bit c set when column c of the pass computes it.
    masks: Vec<u32>,
    /// Neurons the columns of the pass need, summed over the columns.
    needed: usize,
    /// The predictor's lists as read back, one per column.
    lists: Vec<u32>,
    plan: Plan,
    stats: FlashStats,
    uploaded: u64,
    gpu_bytes: u64,
    /// Per layer, the window pass of a draft step (count, ids, slots, column masks) over the
    /// pinned neurons, built once at setup since pins never move; `None` when nothing is
    /// pinned.
    draft_lists: Option<wgpu::Buffer>,
    /// Draft steps run (a self draft's tokens; not in the flash counters).
    draft_tokens: u64,
}

/// 32-bit words of the lists and slot maps of one layer: the window pass (count, ids, slots,
/// column masks) and each overflow chunk's.
fn list_words(held: usize, overflow: usize, chunk: usize) -> usize {
    let chunks = overflow.div_ceil(chunk);
    1 + 3 * held + chunks + 3 * overflow
}

/// Appends one sparse pass's words: its count, ids, slots and column masks.
fn push_pass(words: &mut Vec<u32>, ids: &[u32], slots: impl Iterator<Item = u32>, masks: &[u32]) {
    words.push(ids.len() as u32);
    words.extend_from_slice(ids);
    words.extend(slots);
    words.extend(ids.iter().map(|&i| masks[i as usize]));
}

/// The mask of a pass in which each of `n` columns computes a neuron.
fn all_columns(n: usize) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

impl<'a> GpuFlashDecoder<'a> {
    /// Builds the decoder for `image` (whose resident weights are `w`) with contexts of up to
    /// `max_ctx` positions; `predictors` (one per layer) select the active neurons, `None`
    /// computes every neuron.
    pub fn new(
        ctx: &GpuContext,
        image: &'a FlashImage,
        w: &ModelWeights,
        predictors: Option<&[Predictor]>,
        max_ctx: usize,
        opts: GpuFlashOptions,
    ) -> Result<GpuFlashDecoder<'a>, GpuError> {
        let c = &w.config;
        if opts.verify_width > MAX_VERIFY_WIDTH {
            return Err(GpuError::Shape(format!(
                "a flash verify pass holds at most {MAX_VERIFY_WIDTH} positions, {} were asked for; draft fewer tokens per pass",
                opts.verify_width
            )));
        }
        let core = Core::new(ctx, w, max_ctx, opts.kv_type, false, opts.verify_width)?;
        let columns = core.columns;
        let parts = BundleParts::of_image(image, c.ffn_kind()).map_err(GpuError::Shape)?;
        let stride = image.bundle().stride;
        if !stride.is_multiple_of(4) {
            return Err(GpuError::Shape(format!(
                "the image's bundle stride is {stride} bytes; GPU copies need a multiple of 4 (convert the model again with f16 bundles)"
            )));
        }
        let n = c.intermediate_size;
        if let Some(p) = predictors {
            if p.len() != c.n_layers || p.iter().any(|p| p.n != n || p.d != c.hidden_size) {
                return Err(GpuError::Shape(format!(
                    "the calibration's predictors do not match the model ({} layers of {n} neurons); run `llmflash calibrate` again",
                    c.n_layers
                )));
            }
        }
        let overflow_slots = opts.overflow_slots.clamp(1, n.max(1));
        let overflow = storage_zeroed(ctx, "overflow bundles", (overflow_slots * stride) as u64)?;
        let list = storage_zeroed(ctx, "active list", ((n + 1) * 4) as u64)?;
        // Slots, then column masks.
        let map = storage_zeroed(ctx, "slot map", (2 * n * 4).max(8) as u64)?;
        let pred_list = storage_zeroed(ctx, "predicted lists", ((n + 1) * 4 * columns) as u64)?;
        let out2 = storage_zeroed(ctx, "ffn out2", (c.hidden_size * 4 * columns) as u64)?;
        let add_out2 = add(ctx, c.hidden_size, &out2, &core.s.out)?;
        let mut gpu_bytes = overflow.size() + list.size() + map.size() + pred_list.size();
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let section = image.ffn_section(l);
            if section.n_neurons != n {
                return Err(GpuError::Shape(format!(
                    "layer {l} of the image has {} neurons, the model {n}",
                    section.n_neurons
                )));
            }
            let placement = Placement::of(image, l);
            let capacity = opts
                .window_slots
                .as_ref()
                .map_or(n, |s| s.get(l).copied().unwrap_or(n))
                .min(n);
            let window = Window::new(WindowConfig {
                n_neurons: n,
                capacity,
                stride: 0,
                k: opts.window_tokens,
            })
            .map_err(|e| GpuError::Shape(format!("layer {l} window: {e}")))?;
            let slots = storage_zeroed(
                ctx,
                &format!("layer {l} window"),
                (capacity.max(1) * stride) as u64,
            )?;
            gpu_bytes += slots.size();
            let up_bias = w.layers[l]
                .ffn_bias
                .up
                .as_ref()
                .map(|b| storage_bytes(ctx, "ffn up bias", bytemuck::cast_slice(b)))
                .transpose()?;
            let sparse = |slots: &wgpu::Buffer, n_slots: usize, max_active: usize, out| {
                sparse_ffn(
                    ctx,
                    &SparseFfnArgs {
                        parts,
                        stride,
                        d: c.hidden_size,
                        slots,
                        n_slots,
                        h: &core.s.h,
                        active: &list,
                        max_active,
                        map: Some(&map),
                        masked: true,
                        width: Width::Step(&core.step),
                        columns,
                        up_bias: up_bias.as_ref(),
                        act: &core.s.a,
                        out,
                    },
                )
            };
            let window_ffn = sparse(&slots, capacity.max(1), n, &core.s.out)?;
            let overflow_ffn = sparse(&overflow, overflow_slots, overflow_slots, &out2)?;
            let predictor = match predictors {
                Some(p) => {
                    let gp = GpuPredictor::upload(ctx, &p[l], &format!("layer {l} predictor"))?
                        .with_columns(ctx, columns)?;
                    gpu_bytes += gp.bytes();
                    Some(gp.dispatches(ctx, &core.s.h, &pred_list, Width::Step(&core.step))?)
                }
                None => None,
            };
            layers.push(FlashLayer {
                window,
                placement,
                predictor,
                window_ffn,
                overflow_ffn,
                slots,
                draft: (0, 0),
            });
        }
        let file = FlashFile::open(image.file(), opts.direct)
            .map_err(|e| GpuError::Shape(format!("opening {}: {e}", image.file().display())))?;
        let pool = ReadPool::new(Arc::new(file), opts.io_threads.max(1));
        let mut stats = FlashStats::default();
        for (l, ids) in opts.pinned.iter().flatten().enumerate() {
            let layer = layers
                .get_mut(l)
                .ok_or_else(|| GpuError::Shape(format!("pins for layer {l} of {}", c.n_layers)))?;
            stats.bytes_read += pin(ctx, image, &pool, &opts, layer, l, ids)?;
        }
        // A draft step's window pass of each layer: its pinned neurons in id order (as the
        // window pass of a token sums them), the slots the pins got, and column 0's mask.
        let mut draft_words: Vec<u32> = Vec::new();
        for layer in &mut layers {
            let ids = layer.window.pinned_neurons();
            layer.draft = (draft_words.len(), ids.len());
            draft_words.push(ids.len() as u32);
            draft_words.extend_from_slice(&ids);
            let window = &layer.window;
            draft_words.extend(ids.iter().map(|&i| window.slot(i).unwrap_or(0)));
            draft_words.extend(std::iter::repeat_n(1u32, ids.len()));
        }
        let draft_lists = if layers.iter().any(|l| l.draft.1 > 0) {
            let buf = storage_bytes(ctx, "self-draft lists", bytemuck::cast_slice(&draft_words))?;
            gpu_bytes += buf.size();
            Some(buf)
        } else {
            None
        };
        // Room for a whole layer: every neuron is either loaded or overflows at most once.
        let staging_size =
            (n * stride + 4 * list_words(n, n, overflow_slots).max(list_words(0, n, 1))) as u64;
        let staging = (0..opts.staging_buffers.max(2))
            .map(|i| Staging {
                buf: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("staging {i}")),
                    size: staging_size.div_ceil(4) * 4,
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                }),
                ready: Arc::new(AtomicBool::new(true)),
            })
            .collect();
        Ok(GpuFlashDecoder {
            list_rb: Readback::new(ctx, ((n + 1) * 4 * columns) as u64),
            core,
            image,
            stride,
            n,
            layers,
            pool,
            opts,
            overflow_slots,
            overflow,
            list,
            map,
            pred_list,
            add_out2,
            staging,
            staging_size,
            next_staging: 0,
            active: Vec::new(),
            masks: vec![0; n],
            needed: 0,
            lists: Vec::new(),
            plan: Plan::default(),
            stats,
            uploaded: 0,
            gpu_bytes,
            draft_lists,
            draft_tokens: 0,
        })
    }

    pub fn position(&self) -> usize {
        self.core.pos
    }

    pub fn capacity(&self) -> usize {
        self.core.capacity()
    }

    pub fn ctx(&self) -> &GpuContext {
        &self.core.ctx
    }

    /// Time blocked on the GPU since creation (readbacks of lists, logits and tokens, and
    /// waits for a staging buffer).
    pub fn gpu_wait(&self) -> Duration {
        self.core.wait
    }

    /// GPU execution time (timestamp queries) of the tokens read back so far; `None` where
    /// the device has no timestamp queries.
    pub fn gpu_time(&self) -> Option<Duration> {
        self.core.gpu_time()
    }

    /// Bytes copied to the GPU since creation (bundles, lists, slot maps).
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// Bytes on the GPU from the start: resident weights, KV cache, window and overflow
    /// buffers, predictors.
    pub fn resident_bytes(&self) -> u64 {
        self.core.resident_bytes + self.gpu_bytes
    }

    /// Bytes of the mapped staging ring (host-visible memory).
    pub fn staging_bytes(&self) -> u64 {
        self.staging_size * self.staging.len() as u64
    }

    /// The flash counters (reads, window hits, I/O and memory-management time).
    pub fn flash_stats(&self) -> FlashStats {
        let mut s = self.stats.clone();
        s.memory_bytes = self.staging_bytes() + self.pool.staging_bytes() as u64;
        let predicted = self.layers.iter().any(|l| l.predictor.is_some());
        s.selection = if predicted { "predictor" } else { "dense" }.into();
        s
    }

    /// Tokens in the vocabulary: the length of a row of logits.
    pub fn vocab_size(&self) -> usize {
        self.core.config.vocab_size
    }

    /// The logits read back last (rows of the vocabulary, one per position of that pass).
    pub fn logits(&self) -> &[f32] {
        self.core.last_logits()
    }

    /// Runs `token`; returns its logits.
    pub fn step(&mut self, token: u32) -> Result<&[f32], GpuError> {
        self.run(&[token], Output::Logits)?;
        self.core.read_logits(1)
    }

    /// Runs `token`; returns the most likely next token, chosen on the GPU.
    pub fn step_greedy(&mut self, token: u32) -> Result<u32, GpuError> {
        self.run(&[token], Output::Greedy)?;
        Ok(self.core.read_tokens(1)?[0])
    }

    /// Runs a prompt token (no logits).
    pub fn feed(&mut self, token: u32) -> Result<(), GpuError> {
        self.run(&[token], Output::None)
    }

    /// Feeds `tokens` and returns the logits after the last one. A decoder built for verify
    /// passes runs the prompt that many tokens per pass (each pass reads the union of its
    /// tokens' bundles once).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], GpuError> {
        let columns = self.core.columns;
        prefill_passes(tokens, columns, |chunk, out| self.run(chunk, out))?;
        self.core.read_logits(1)
    }

    /// Tokens a verify pass may hold (`GpuFlashOptions::verify_width`).
    pub fn verify_width(&self) -> usize {
        self.core.columns
    }

    /// Runs `tokens` at the next positions in one pass (see the module docs: each bundle of
    /// the union of their active sets read and uploaded once) and returns every position's
    /// next-token logits, `tokens.len()` rows of the vocabulary one after another.
    pub fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], GpuError> {
        self.run(tokens, Output::Logits)?;
        self.core.read_logits(tokens.len())
    }

    /// [`GpuFlashDecoder::verify`] reading back only each position's most likely next token.
    pub fn verify_greedy(&mut self, tokens: &[u32]) -> Result<&[u32], GpuError> {
        self.run(tokens, Output::Greedy)?;
        self.core.read_tokens(tokens.len())
    }

    /// Whether some layer's window pins neurons: what [`GpuFlashDecoder::draft_step`]
    /// computes the FFN from.
    pub fn can_self_draft(&self) -> bool {
        self.draft_lists.is_some()
    }

    /// Neurons a draft step computes per layer: each window's pinned neurons.
    pub fn draft_neurons(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.draft.1).collect()
    }

    /// Draft steps run since creation.
    pub fn draft_tokens(&self) -> u64 {
        self.draft_tokens
    }

    /// Runs `token` at the next position with the full attention (its keys and values go
    /// into the cache like a step's) and each layer's FFN computed over only the neurons its
    /// window pins: a self-speculative draft. It reads nothing from flash, uploads nothing,
    /// leaves the windows as they were and counts in no flash counter; the caller cuts its
    /// positions off ([`GpuFlashDecoder::truncate`]) before verifying, and the verify pass
    /// writes the full model's keys and values over them.
    pub fn draft_step(&mut self, token: u32) -> Result<&[f32], GpuError> {
        self.run_draft(token, Output::Logits)?;
        self.core.read_logits(1)
    }

    /// [`GpuFlashDecoder::draft_step`] reading back only the most likely next token.
    pub fn draft_step_greedy(&mut self, token: u32) -> Result<u32, GpuError> {
        self.run_draft(token, Output::Greedy)?;
        Ok(self.core.read_tokens(1)?[0])
    }

    /// One draft position through every layer in one command buffer: with no predictor and
    /// no reads there is nothing to wait for between layers.
    fn run_draft(&mut self, token: u32, out: Output) -> Result<(), GpuError> {
        let Some(lists) = &self.draft_lists else {
            return Err(GpuError::Shape(
                "a draft step computes each FFN from the neurons pinned in the GPU windows, \
                 and no layer of this decoder pins any; pin neurons when building it (a VRAM \
                 budget pins the hottest) or draft another way"
                    .into(),
            ));
        };
        let mut enc = self.core.begin(std::slice::from_ref(&token))?;
        for (l, layer) in self.layers.iter().enumerate() {
            {
                let mut pass = self.core.pass(&mut enc, "draft attention");
                if l == 0 {
                    self.core.encode_head(&mut pass, 1);
                }
                self.core.layers[l]
                    .attn
                    .iter()
                    .for_each(|d| d.encode_columns(&mut pass, 1));
            }
            // The layer's pass over its pinned neurons: count and ids into the list, slots
            // and masks into the map, as `load_and_compute` copies a token's from staging.
            let (at, m) = layer.draft;
            enc.copy_buffer_to_buffer(lists, (at * 4) as u64, &self.list, 0, (1 + m) as u64 * 4);
            if m > 0 {
                enc.copy_buffer_to_buffer(
                    lists,
                    ((at + 1 + m) * 4) as u64,
                    &self.map,
                    0,
                    2 * m as u64 * 4,
                );
            }
            let mut pass = self.core.pass(&mut enc, "draft ffn and residual");
            layer
                .window_ffn
                .iter()
                .chain(&self.core.layers[l].post)
                .for_each(|d| d.encode_columns(&mut pass, 1));
        }
        self.core.finish(&mut enc, out, 1);
        self.core.ctx.queue.submit([enc.finish()]);
        self.draft_tokens += 1;
        Ok(())
    }

    /// Cuts the sequence back to its first `len` positions (after a verify pass, to the
    /// accepted prefix). O(1): later positions' cache rows are overwritten as they come again;
    /// the windows keep what the pass loaded, as after any token.
    pub fn truncate(&mut self, len: usize) {
        self.core.pos = self.core.pos.min(len);
    }

    /// Encodes layer `l`'s attention and predictor for the `cols` columns of the pass, and the
    /// copy of their lists for readback.
    fn encode_attn(&self, enc: &mut wgpu::CommandEncoder, l: usize, embed: bool, cols: usize) {
        {
            let mut pass = self.core.pass(enc, "attention and predictor");
            if embed {
                self.core.encode_head(&mut pass, cols);
            }
            self.core.layers[l]
                .attn
                .iter()
                .chain(self.layers[l].predictor.iter().flatten())
                .for_each(|d| d.encode_columns(&mut pass, cols));
        }
        if self.layers[l].predictor.is_some() {
            let bytes = ((self.n + 1) * 4 * cols) as u64;
            self.list_rb.record(enc, &self.pred_list, 0, bytes);
        }
    }

    /// Reads layer `l`'s active lists of `cols` columns (or takes every neuron): their union
    /// into `self.active`, which columns need each neuron into `self.masks`.
    fn read_active(&mut self, l: usize, cols: usize) -> Result<(), GpuError> {
        self.active.clear();
        if self.layers[l].predictor.is_none() {
            self.active.extend(0..self.n as u32);
            self.masks.fill(all_columns(cols));
            self.needed = self.n * cols;
            return Ok(());
        }
        let t = Instant::now();
        let row = self.n + 1;
        self.lists.resize(row * cols, 0);
        self.list_rb.read(&self.core.ctx, &mut self.lists)?;
        self.core.wait += t.elapsed();
        self.masks.fill(0);
        self.needed = 0;
        for (c, list) in self.lists.chunks_exact(row).enumerate() {
            // The kernel writes at most n ids; a count beyond that would be a GPU fault.
            let count = (list[0] as usize).min(self.n);
            self.needed += count;
            for &i in &list[1..=count] {
                if let Some(m) = self.masks.get_mut(i as usize) {
                    *m |= 1 << c;
                }
            }
        }
        let masks = &self.masks;
        self.active
            .extend((0..self.n as u32).filter(|&i| masks[i as usize] != 0));
        Ok(())
    }

    /// One pass of `tokens` (one per column) through every layer (see the module docs).
    fn run(&mut self, tokens: &[u32], out: Output) -> Result<(), GpuError> {
        let cols = tokens.len();
        let mut enc = self.core.begin(tokens)?;
        self.encode_attn(&mut enc, 0, true, cols);
        self.core.ctx.queue.submit([enc.finish()]);
        self.read_active(0, cols)?;
        self.stats.tokens += cols as u64;
        let n_layers = self.layers.len();
        for l in 0..n_layers {
            let mut enc =
                self.core
                    .ctx
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("flash layer"),
                    });
            let si = self.acquire_staging()?;
            self.load_and_compute(l, si, &mut enc, cols)?;
            {
                let mut pass = self.core.pass(&mut enc, "residual");
                self.core.layers[l]
                    .post
                    .iter()
                    .for_each(|d| d.encode_columns(&mut pass, cols));
            }
            if l + 1 < n_layers {
                self.encode_attn(&mut enc, l + 1, false, cols);
            } else {
                self.core.finish(&mut enc, out, cols);
            }
            self.core.ctx.queue.submit([enc.finish()]);
            let st = &self.staging[si];
            st.ready.store(false, Ordering::Release);
            let ready = st.ready.clone();
            st.buf.slice(..).map_async(wgpu::MapMode::Write, move |r| {
                ready.store(r.is_ok(), Ordering::Release);
            });
            if l + 1 < n_layers {
                self.read_active(l + 1, cols)?;
            }
        }
        Ok(())
    }

    /// Plans layer `l`'s window for `self.active`, reads the missing bundles into staging
    /// buffer `si`, and encodes the copies and sparse passes of `cols` columns into `enc`
    /// (leaving the FFN output in `out`).
    fn load_and_compute(
        &mut self,
        l: usize,
        si: usize,
        enc: &mut wgpu::CommandEncoder,
        cols: usize,
    ) -> Result<(), GpuError> {
        let t = Instant::now();
        let stride = self.stride;
        let chunk = self.overflow_slots;
        let layer = &mut self.layers[l];
        layer
            .window
            .plan_into(&self.active, &mut self.plan)
            .map_err(|e| GpuError::Shape(format!("layer {l}: {e}")))?;
        let plan = &self.plan;
        // Positions after the first that need a neuron find it uploaded, as in the CPU's
        // verify batches: needed = hits + loaded.
        let shared = self.needed.saturating_sub(self.active.len());
        self.stats.neurons_needed += self.needed as u64;
        self.stats.window_hits += (plan.hits + shared) as u64;
        self.stats.neurons_loaded += (plan.loads.len() + plan.overflow.len()) as u64;

        // Staging layout: [window pass | per overflow chunk: its pass | bundles], each pass
        // [count | ids | slots | column masks].
        let held: Vec<u32> = self
            .active
            .iter()
            .copied()
            .filter(|&i| layer.window.slot(i).is_some())
            .collect();
        let mut words: Vec<u32> =
            Vec::with_capacity(list_words(held.len(), plan.overflow.len(), chunk));
        let window = &layer.window;
        let held_slots = held.iter().map(|&i| window.slot(i).unwrap_or(0));
        push_pass(&mut words, &held, held_slots, &self.masks);
        let mut chunk_at = Vec::new();
        for c in plan.overflow.chunks(chunk) {
            chunk_at.push(words.len());
            push_pass(&mut words, c, 0..c.len() as u32, &self.masks);
        }
        let bundles_at = (words.len() * 4) as u64;
        let n_bundles = plan.loads.len() + plan.overflow.len();
        let need = bundles_at + (n_bundles * stride) as u64;
        if need > self.staging_size {
            return Err(GpuError::Shape(format!(
                "layer {l} needs {need} staging bytes, the ring's buffers hold {}",
                self.staging_size
            )));
        }
        // Bundle k of staging: loads first, then overflow, each in plan order.
        let neurons: Vec<u32> = (plan.loads.iter().map(|&(i, _)| i))
            .chain(plan.overflow.iter().copied())
            .collect();
        let reads = layer.placement.reads(&neurons, &[(0, stride)]);
        let placement = &layer.placement;

        let staging = &self.staging[si].buf;
        let mut copy = Duration::ZERO;
        let io_start;
        let read = {
            let mut view = staging
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| GpuError::Readback(format!("staging buffer: {e}")))?;
            view.slice(..bundles_at as usize)
                .copy_from_slice(bytemuck::cast_slice(&words));
            self.stats.memory += t.elapsed();
            io_start = Instant::now();
            let base = bundles_at as usize;
            let (image, verify) = (&self.image, self.opts.verify);
            let mut bad = None;
            let read = self
                .pool
                .read_ranges(&reads.ranges, &self.opts.coalesce, &mut |r, bytes| {
                    let tc = Instant::now();
                    let k = reads.target(r).0;
                    if verify && bad.is_none() {
                        let slot = placement.disk_slot(neurons[k]);
                        bad = image.check_bundle(l, slot, bytes).err();
                    }
                    let at = base + k * stride;
                    view.slice(at..at + bytes.len()).copy_from_slice(bytes);
                    copy += tc.elapsed();
                })
                .map_err(|e| ReadError::new(format!("layer {l}'s FFN bundles"), e))?;
            (read, bad)
        };
        staging.unmap();
        let (read, bad) = read;
        if let Some(e) = bad {
            return Err(ReadError::new(format!("layer {l}'s FFN bundles"), e).into());
        }
        self.stats.bytes_read += read.bytes_read;
        self.stats.read_ops += read.ops as u64;
        self.stats.io += io_start.elapsed().saturating_sub(copy);
        let t2 = Instant::now();

        // Staging -> window slots, runs of consecutive slots in one copy.
        let s = stride as u64;
        let mut k = 0;
        while k < plan.loads.len() {
            let mut end = k + 1;
            while end < plan.loads.len() && plan.loads[end].1 == plan.loads[end - 1].1 + 1 {
                end += 1;
            }
            enc.copy_buffer_to_buffer(
                staging,
                bundles_at + k as u64 * s,
                &layer.slots,
                plan.loads[k].1 as u64 * s,
                (end - k) as u64 * s,
            );
            k = end;
        }
        // A pass's count and ids into the list, its slots and masks into the map.
        let copy_list = |enc: &mut wgpu::CommandEncoder, at: usize, m: usize| {
            enc.copy_buffer_to_buffer(staging, (at * 4) as u64, &self.list, 0, (1 + m) as u64 * 4);
            if m > 0 {
                enc.copy_buffer_to_buffer(
                    staging,
                    ((at + 1 + m) * 4) as u64,
                    &self.map,
                    0,
                    2 * m as u64 * 4,
                );
            }
        };
        copy_list(enc, 0, held.len());
        {
            let mut pass = self.core.pass(enc, "sparse ffn (window)");
            layer
                .window_ffn
                .iter()
                .for_each(|d| d.encode_columns(&mut pass, cols));
        }
        let first_overflow = plan.loads.len();
        for (j, c) in plan.overflow.chunks(chunk).enumerate() {
            enc.copy_buffer_to_buffer(
                staging,
                bundles_at + (first_overflow + j * chunk) as u64 * s,
                &self.overflow,
                0,
                c.len() as u64 * s,
            );
            copy_list(enc, chunk_at[j], c.len());
            let mut pass = self.core.pass(enc, "sparse ffn (overflow)");
            layer
                .overflow_ffn
                .iter()
                .for_each(|d| d.encode_columns(&mut pass, cols));
            self.add_out2.encode_columns(&mut pass, cols);
        }
        self.uploaded += need;
        self.stats.memory += copy + t2.elapsed();
        Ok(())
    }
}
