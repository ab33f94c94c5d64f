//! Where a layer's bundles come from: [`Source`], one variant per [`Strategy`], each holding
//! what its strategy needs (the resident copies, the naive layer buffer, the flash path's
//! read pool, lookahead and overflow). `FlashFfn` asks it to `load` a layer's active bundles
//! and to `gather` them; nothing else matches on the strategy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::backend::cpu::sparse_ffn::{BundleParts, Neuron};
use crate::image::{FlashImage, Placement};
use crate::storage::{AlignedBuf, FlashFile, ReadError, ReadPool};
use crate::window::{Window, WindowConfig};

use super::lookahead::Lookahead;
use super::{FlashError, FlashFfn, FlashOptions, LayerState, Strategy};

/// Where the bundles of every layer come from.
pub(super) enum Source {
    /// Every bundle in RAM, loaded once: each layer's section in disk order.
    Resident(Vec<Vec<u8>>),
    /// The image memory-mapped, paged in by the OS.
    Mmap,
    /// Each layer's whole section read for every token into one buffer; the layer starts at
    /// `skip` (the aligned read may begin before it).
    Naive {
        pool: Arc<ReadPool>,
        buf: AlignedBuf,
        skip: usize,
    },
    /// The window and its reads: missing bundles read into free slots, or into `overflow`
    /// (for the sorted `overflow_ids`) when the window cannot hold them; with `lookahead`,
    /// the same tail of every layer read in the background instead.
    Flash {
        pool: Arc<ReadPool>,
        lookahead: Option<Box<Lookahead>>,
        overflow_ids: Vec<u32>,
        overflow: Vec<u8>,
    },
}

impl Source {
    /// The source `opts.strategy` names: the file opened for the strategies that read it,
    /// every section loaded (and checked) for the resident one.
    pub(super) fn open(
        image: &FlashImage,
        n_layers: usize,
        stride: usize,
        opts: &FlashOptions,
    ) -> Result<Source, FlashError> {
        let pool = || -> Result<Arc<ReadPool>, FlashError> {
            let file = FlashFile::open(image.file(), opts.direct).map_err(|e| {
                FlashError::Setup(format!("opening {}: {e}", image.file().display()))
            })?;
            Ok(Arc::new(ReadPool::new(
                Arc::new(file),
                opts.io_threads.max(1),
            )))
        };
        Ok(match opts.strategy {
            Strategy::Resident => Source::Resident(
                (0..n_layers)
                    .map(|l| resident_section(image, l, stride, opts.verify))
                    .collect::<Result<_, _>>()?,
            ),
            Strategy::Mmap => Source::Mmap,
            Strategy::Naive => Source::Naive {
                pool: pool()?,
                buf: AlignedBuf::new(0),
                skip: 0,
            },
            Strategy::Flash => Source::Flash {
                pool: pool()?,
                lookahead: None,
                overflow_ids: Vec::new(),
                overflow: Vec::new(),
            },
        })
    }

    /// The flash path's read pool; `None` for the strategies that own no window.
    pub(super) fn flash_pool(&self) -> Option<&Arc<ReadPool>> {
        match self {
            Source::Flash { pool, .. } => Some(pool),
            _ => None,
        }
    }

    pub(super) fn lookahead(&self) -> Option<&Lookahead> {
        match self {
            Source::Flash { lookahead, .. } => lookahead.as_deref(),
            _ => None,
        }
    }

    /// Bytes held besides the windows: resident sections, the naive buffer, overflow and
    /// the lookahead's tails.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Source::Resident(sections) => sections.iter().map(Vec::len).sum(),
            Source::Mmap => 0,
            Source::Naive { buf, .. } => buf.len(),
            Source::Flash {
                lookahead,
                overflow,
                ..
            } => overflow.capacity() + lookahead.as_deref().map_or(0, Lookahead::bytes),
        }
    }
}

/// Layer `layer`'s whole section, each bundle checked against the image's checksum when
/// `verify`.
fn resident_section(
    image: &FlashImage,
    layer: usize,
    stride: usize,
    verify: bool,
) -> Result<Vec<u8>, FlashError> {
    let n = image.ffn_section(layer).n_neurons;
    let mut all = Vec::with_capacity(n * stride);
    for s in 0..n {
        let bundle = image.bundle_bytes(layer, s);
        if verify {
            image
                .check_bundle(layer, s, bundle)
                .map_err(|e| FlashError::Setup(format!("loading layer {layer}'s FFN: {e}")))?;
        }
        all.extend_from_slice(bundle);
    }
    Ok(all)
}

impl FlashFfn<'_> {
    /// Brings `layer`'s active bundles (`self.active`) into memory, as the source does.
    pub(super) fn load(&mut self, layer: usize) -> Result<(), ReadError> {
        match &self.source {
            Source::Naive { .. } => self.read_whole_layer(layer),
            Source::Flash {
                lookahead: Some(_), ..
            } => self.load_tail(layer),
            Source::Flash { .. } => self.load_through_window(layer),
            Source::Resident(_) | Source::Mmap => Ok(()),
        }
    }

    /// The active neurons' bundles, wherever the source keeps them (after [`Self::load`]).
    pub(super) fn gather(&self, layer: usize) -> Vec<Neuron<'_>> {
        let state = &self.layers[layer];
        let stride = self.stride;
        fn bundle_in(buf: &[u8], slot: usize, stride: usize) -> &[u8] {
            &buf[slot * stride..(slot + 1) * stride]
        }
        let disk = |i: u32| state.placement.disk_slot(i);
        let active = self.active.iter();
        match &self.source {
            Source::Resident(sections) => active
                .map(|&i| (i, bundle_in(&sections[layer], disk(i), stride)))
                .collect(),
            Source::Mmap => active.map(|&i| (i, self.mmap_bundle(layer, i))).collect(),
            Source::Naive { buf, skip, .. } => active
                .map(|&i| (i, bundle_in(&buf[*skip..], disk(i), stride)))
                .collect(),
            Source::Flash {
                lookahead,
                overflow_ids,
                overflow,
                ..
            } => active
                .map(|&i| match (state.window.slot(i), lookahead) {
                    (Some(s), _) => (i, state.window.bundle(s)),
                    (None, Some(la)) => {
                        let at = disk(i) - la.first_slot[layer];
                        (i, bundle_in(la.tail(), at, stride))
                    }
                    (None, None) => {
                        let k = overflow_ids
                            .binary_search(&i)
                            .expect("an active neuron is in the window or overflowed");
                        (i, bundle_in(overflow, k, stride))
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
        let Source::Naive { pool, buf, skip } = &mut self.source else {
            return Ok(());
        };
        // Straight into the layer buffer, as the flash path's tails are read: the baseline
        // pays for no copy that flash does not.
        let (stats, at) = pool
            .read_span(offset, len, &self.opts.coalesce, buf)
            .map_err(|e| ReadError::new(format!("layer {layer}'s FFN"), e))?;
        *skip = at;
        if self.opts.verify {
            self.image
                .check_bundles(layer, 0, &buf[at..at + len])
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
        let Source::Flash {
            lookahead: Some(la),
            ..
        } = &mut self.source
        else {
            return Ok(());
        };
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
        let Source::Flash {
            pool,
            overflow_ids,
            overflow,
            ..
        } = &mut self.source
        else {
            return Ok(());
        };
        overflow_ids.clear();
        overflow_ids.extend_from_slice(&plan.overflow);
        overflow_ids.sort_unstable();
        let stride = self.stride;
        overflow.resize(overflow_ids.len() * stride, 0);
        // Loads land in their window slots, the rest in overflow rows.
        let neurons: Vec<u32> = (plan.loads.iter().map(|&(n, _)| n))
            .chain(overflow_ids.iter().copied())
            .collect();
        let slot_of = |k: usize| plan.loads.get(k).map(|&(_, s)| s);
        let pieces = pieces(&self.parts, stride, self.opts.unbundled);
        let reads = self.layers[layer].placement.reads(&neurons, &pieces);
        self.stats.memory += t.elapsed();

        let t_io = Instant::now();
        let window = &mut self.layers[layer].window;
        let n_loads = plan.loads.len();
        let mut copy = Duration::ZERO;
        let stats = pool
            .read_ranges(&reads.ranges, &self.opts.coalesce, &mut |r, bytes| {
                let tc = Instant::now();
                let (k, piece) = reads.target(r);
                let dst = match slot_of(k) {
                    Some(s) => window.bundle_mut(s),
                    None => {
                        let row = k - n_loads;
                        &mut overflow[row * stride..(row + 1) * stride]
                    }
                };
                let (off, _) = pieces[piece];
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
            let overflow = &*overflow;
            // On the worker threads, as the reads were.
            (0..neurons.len())
                .into_par_iter()
                .try_for_each(|k| {
                    let bytes = match slot_of(k) {
                        Some(s) => state.window.bundle(s),
                        None => {
                            let row = k - n_loads;
                            &overflow[row * stride..(row + 1) * stride]
                        }
                    };
                    image.check_bundle(layer, state.placement.disk_slot(neurons[k]), bytes)
                })
                .map_err(|e| ReadError::new(format!("layer {layer}'s FFN bundles"), e))?;
        }
        Ok(())
    }
}

/// The byte ranges of one bundle that are read separately: the whole bundle, or each part on
/// its own when bundling is switched off (`unbundled`).
fn pieces(parts: &BundleParts, stride: usize, unbundled: bool) -> Vec<(usize, usize)> {
    if !unbundled {
        return vec![(0, stride)];
    }
    let mut p: Vec<(usize, usize)> = [parts.gate, Some(parts.up), Some(parts.down)]
        .into_iter()
        .flatten()
        .map(|p| (p.offset, p.len))
        .collect();
    p.sort_unstable();
    p
}

/// Layer `layer`'s model-to-disk map and window: a window of the planned slots when `windowed`
/// (the flash source), of none otherwise.
pub(super) fn layer_state(
    image: &FlashImage,
    layer: usize,
    stride: usize,
    opts: &FlashOptions,
    windowed: bool,
) -> Result<LayerState, FlashError> {
    let placement = Placement::of(image, layer);
    let n = placement.n_neurons();
    let capacity = match (windowed, &opts.window_slots) {
        (true, Some(slots)) => slots[layer],
        (true, None) => n,
        (false, _) => 0,
    };
    let window = Window::new(WindowConfig {
        n_neurons: n,
        capacity,
        stride,
        k: opts.window_tokens,
    })
    .map_err(|e| FlashError::Setup(format!("layer {layer} window: {e}")))?;
    Ok(LayerState { window, placement })
}
