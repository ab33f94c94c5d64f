//! Lookahead: when every token reads the same tail of every layer, the next layers' tails
//! are read in the background while this one computes.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::storage::{
    buffer_bytes, AlignedBuf, CoalesceOptions, Fetched, Prefetcher, ReadPool, ReadStats,
    StorageError,
};

use super::FlashError;

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
pub(super) struct Lookahead {
    prefetch: Prefetcher,
    /// Per layer: file offset and length of the bundles outside the window.
    tails: Vec<(u64, usize)>,
    /// Per layer: the disk slot of the tail's first bundle.
    pub(super) first_slot: Vec<usize>,
    /// The tail of the layer being computed.
    current: Option<Fetched>,
    /// Buffers not in use.
    spare: Vec<AlignedBuf>,
    /// Layers whose tails are being read, oldest first.
    pending: VecDeque<usize>,
    depth: usize,
}

impl Lookahead {
    pub(super) fn new(
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
    pub(super) fn tail(&self) -> &[u8] {
        self.current.as_ref().map_or(&[], Fetched::bytes)
    }

    /// Makes `layer`'s tail the current one, once read, and queues the following layers'
    /// reads into the buffers free by then (the previous layer's among them).
    pub(super) fn collect(
        &mut self,
        layer: usize,
        n_layers: usize,
    ) -> Result<ReadStats, StorageError> {
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
    pub(super) fn bytes(&self) -> usize {
        let largest = self.tails.iter().map(|t| t.1).max().unwrap_or(0);
        (self.depth + 1) * buffer_bytes(largest)
    }
}
