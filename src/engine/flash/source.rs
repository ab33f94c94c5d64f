//! Where a layer's bundles come from under each [`Strategy`]: the resident copy, the
//! memory map, a whole-layer read (naive), the lookahead's tail, or the window and its reads.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::backend::cpu::sparse_ffn::Neuron;
use crate::image::FlashImage;
use crate::storage::ReadError;
use crate::window::{Window, WindowConfig};

use super::{FlashError, FlashFfn, FlashOptions, LayerState, Strategy};

impl FlashFfn<'_> {
    /// The active neurons' bundles, wherever this strategy keeps them.
    pub(super) fn gather(&self, layer: usize) -> Vec<Neuron<'_>> {
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
    pub(super) fn read_whole_layer(&mut self, layer: usize) -> Result<(), ReadError> {
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
    pub(super) fn load_tail(&mut self, layer: usize) -> Result<(), ReadError> {
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
    pub(super) fn load_through_window(&mut self, layer: usize) -> Result<(), ReadError> {
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

pub(super) fn layer_state(
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
