//! Several independent sequences decoded together: the engine half of a server with
//! continuous batching.
//!
//! Decoding is bound by reading weights, and on the flash path by reading FFN bundles from
//! the SSD. A [`BatchDecoder`] holds one FFN (and one window) for `slots` sequences, each with
//! its own KV cache; [`BatchDecoder::step`] runs one token of each sequence that has one as
//! the columns of one pass ([`forward_columns`]), so every layer's weights and bundles are read
//! once for all of them. Sequences join ([`BatchDecoder::add`], [`BatchDecoder::prefill`]) and
//! leave ([`BatchDecoder::remove`]) between steps. Each sequence's logits are, to the bit, those
//! of decoding it alone in a [`Session`](super::Session).

use std::fmt;

use crate::backend::cpu::forward::{forward, CpuState, FfnCompute};
use crate::backend::cpu::prefill::{forward_columns, BatchState, Logits};
use crate::backend::kv_cache::KvCache;
use crate::backend::stats::FlashStats;
use crate::backend::streamed::OutputRows;
use crate::engine::{check_room, check_vocab, flash_costs, EngineError, PREFILL_BATCH};
use crate::model::weights::ModelWeights;
use crate::storage::ReadError;

/// Columns per pass of [`BatchDecoder::step`]: a bigger step runs as several passes, so that
/// the activations stay as small as a prefill batch's and a predictor's window serves the
/// union of a bounded number of active sets.
const STEP_BATCH: usize = PREFILL_BATCH;

/// A sequence of a [`BatchDecoder`]: its slot, and which occupant of that slot it is, so that
/// an id kept after [`BatchDecoder::remove`] never reaches the slot's next sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId {
    slot: u32,
    generation: u32,
}

impl SeqId {
    /// The slot (`0..slots`) the sequence occupies: an index for per-sequence tables.
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (slot {})", self.generation, self.slot)
    }
}

/// Sequences decoded together through one FFN (see the module docs).
pub struct BatchDecoder<'w> {
    weights: &'w ModelWeights,
    ffn: Box<dyn FfnCompute + 'w>,
    rows: Option<OutputRows>,
    state: CpuState,
    batch: BatchState,
    /// One per slot, all of the same capacity and element type.
    caches: Vec<KvCache>,
    /// Per slot: the generation of its current or last sequence, and whether it is in use.
    slots: Vec<(u32, bool)>,
    /// The step's columns: `(slot, token)`.
    cols: Vec<(usize, u32)>,
    /// The step's logits, one vocabulary per input.
    logits: Vec<f32>,
}

impl<'w> BatchDecoder<'w> {
    /// `slots` sequences (at least one), the first reusing `kv` and the others empty caches
    /// like it. Built by [`Session::into_batch`](super::Session::into_batch).
    pub(crate) fn new(
        weights: &'w ModelWeights,
        kv: KvCache,
        ffn: Box<dyn FfnCompute + 'w>,
        rows: Option<OutputRows>,
        slots: usize,
    ) -> BatchDecoder<'w> {
        let mut caches: Vec<KvCache> = (1..slots.max(1)).map(|_| kv.empty_like()).collect();
        caches.insert(0, kv);
        BatchDecoder {
            weights,
            ffn,
            rows,
            state: CpuState::new(&weights.config, weights.activations),
            batch: BatchState::default(),
            slots: vec![(0, false); caches.len()],
            caches,
            cols: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// A new, empty sequence in a free slot, or `None` when every slot is in use.
    pub fn add(&mut self) -> Option<SeqId> {
        let slot = self.slots.iter().position(|&(_, used)| !used)?;
        let (generation, used) = &mut self.slots[slot];
        *generation = generation.wrapping_add(1);
        *used = true;
        self.caches[slot].clear();
        Some(SeqId {
            slot: slot as u32,
            generation: *generation,
        })
    }

    /// Ends sequence `id` and frees its slot for [`BatchDecoder::add`].
    pub fn remove(&mut self, id: SeqId) -> Result<(), EngineError> {
        let slot = self.slot(id)?;
        self.slots[slot].1 = false;
        Ok(())
    }

    /// The sequences in the batch, in slot order.
    pub fn active(&self) -> impl Iterator<Item = SeqId> + '_ {
        let live = |(slot, &(generation, used)): (usize, &(u32, bool))| {
            used.then_some(SeqId {
                slot: slot as u32,
                generation,
            })
        };
        self.slots.iter().enumerate().filter_map(live)
    }

    /// How many sequences the batch holds at most.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Positions sequence `id` has consumed: where its next token goes.
    pub fn position(&self, id: SeqId) -> Result<usize, EngineError> {
        Ok(self.caches[self.slot(id)?].len())
    }

    /// Positions each sequence's context holds.
    pub fn capacity(&self) -> usize {
        self.caches[0].capacity()
    }

    /// Forgets sequence `id`'s positions from `len` on, in O(1): what a rejected speculative
    /// draft leaves behind (keeping more than it has is a no-op).
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), EngineError> {
        let slot = self.slot(id)?;
        self.caches[slot].truncate(len);
        Ok(())
    }

    /// The model the batch decodes.
    pub fn weights(&self) -> &'w ModelWeights {
        self.weights
    }

    /// Columns one pass of [`BatchDecoder::step`] takes; more run as further passes, each
    /// reading the weights again.
    pub fn pass_width(&self) -> usize {
        STEP_BATCH
    }

    /// The shared FFN provider, e.g. to read its statistics.
    pub fn ffn(&self) -> &(dyn FfnCompute + 'w) {
        self.ffn.as_ref()
    }

    /// The flash path's costs so far, for every sequence together, with the streamed
    /// embedding and head counted as I/O (as [`Session::flash_stats`](super::Session)).
    pub fn flash_stats(&self) -> Option<FlashStats> {
        flash_costs(self.ffn.as_ref(), self.rows.as_ref())
    }

    /// Feeds sequence `id`'s `tokens` (its prompt) and returns the logits after the last one.
    /// Batched a chunk at a time when the FFN allows ([`FfnCompute::batched`]), token by token
    /// otherwise, as [`Session::prefill`](super::Session::prefill); the other sequences wait.
    /// Nothing is run when a token or the context is refused, and a failed read leaves the
    /// sequence where it was.
    pub fn prefill(&mut self, id: SeqId, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let slot = self.slot(id)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        check_vocab(self.weights, tokens)?;
        check_room(&self.caches[slot], tokens.len())?;
        let start = self.caches[slot].len();
        if let Err(e) = self.prefill_slot(slot, tokens) {
            self.caches[slot].truncate(start);
            return Err(e.into());
        }
        Ok(&self.state.logits)
    }

    /// Feeds several prompts together and returns the logits after each one's last token,
    /// row-major (`prompts.len() x vocab`, in the order given). When the FFN allows
    /// ([`FfnCompute::batched`]) the prompts' tokens run as the columns of shared passes of up
    /// to 64, so requests arriving together pay one round of weight and flash
    /// reads per pass instead of one per prompt, and the vocabulary is projected only after
    /// each prompt's last token; otherwise one prompt after another. A sequence named twice
    /// gets its prompts back to back. Every prompt is checked before anything runs, and a
    /// failed read leaves every sequence where it was. The logits are, to the bit, those of
    /// [`BatchDecoder::prefill`] on each prompt alone.
    pub fn prefill_many(&mut self, prompts: &[(SeqId, &[u32])]) -> Result<&[f32], EngineError> {
        let mut counts = vec![0usize; self.slots.len()];
        for &(id, tokens) in prompts {
            let slot = self.slot(id)?;
            if tokens.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            check_vocab(self.weights, tokens)?;
            counts[slot] += tokens.len();
            check_room(&self.caches[slot], counts[slot])?;
        }
        let before: Vec<usize> = self.caches.iter().map(KvCache::len).collect();
        if let Err(e) = self.prefill_prompts(prompts) {
            for (kv, &len) in self.caches.iter_mut().zip(&before) {
                kv.truncate(len);
            }
            return Err(e.into());
        }
        Ok(&self.logits)
    }

    /// Runs one token of each input's sequence and returns the logits after each, row-major
    /// (`inputs.len() x vocab`, in the order of `inputs`). When the FFN verifies in batches
    /// ([`FfnCompute::verify_batched`]) the inputs go through as the columns of one pass (of
    /// up to 64), so each weight and each flash bundle is read once for all of them; otherwise
    /// one at a time. A sequence named twice gets consecutive positions (a verify pass within
    /// the batch). Every input is checked before anything runs (an unknown sequence, a token
    /// outside the vocabulary, a full context), and a failed read leaves every sequence where
    /// it was.
    pub fn step(&mut self, inputs: &[(SeqId, u32)]) -> Result<&[f32], EngineError> {
        self.columns(inputs)?;
        let before: Vec<usize> = self.caches.iter().map(KvCache::len).collect();
        if let Err(e) = self.run_step() {
            for (kv, &len) in self.caches.iter_mut().zip(&before) {
                kv.truncate(len);
            }
            return Err(e.into());
        }
        Ok(&self.logits)
    }

    /// The slot of live sequence `id`.
    fn slot(&self, id: SeqId) -> Result<usize, EngineError> {
        match self.slots.get(id.slot()) {
            Some(&(generation, true)) if generation == id.generation => Ok(id.slot()),
            _ => Err(EngineError::UnknownSequence(id)),
        }
    }

    /// Resolves `inputs` into `self.cols`, refusing any that cannot run.
    fn columns(&mut self, inputs: &[(SeqId, u32)]) -> Result<(), EngineError> {
        self.cols.clear();
        let mut counts = vec![0usize; self.slots.len()];
        for &(id, token) in inputs {
            let slot = self.slot(id)?;
            check_vocab(self.weights, &[token])?;
            counts[slot] += 1;
            check_room(&self.caches[slot], counts[slot])?;
            self.cols.push((slot, token));
        }
        Ok(())
    }

    /// `self.cols` through the model into `self.logits`.
    fn run_step(&mut self) -> Result<(), ReadError> {
        self.logits.clear();
        if self.ffn.verify_batched() {
            for start in (0..self.cols.len()).step_by(STEP_BATCH) {
                let end = (start + STEP_BATCH).min(self.cols.len());
                self.run_columns(start..end, Logits::All)?;
                self.logits.extend_from_slice(self.batch.logits());
            }
            return Ok(());
        }
        for &(slot, token) in &self.cols {
            let kv = &mut self.caches[slot];
            let (ffn, rows) = (self.ffn.as_mut(), self.rows.as_mut());
            forward(self.weights, kv, &mut self.state, token, true, ffn, rows)?;
            self.logits.extend_from_slice(&self.state.logits);
        }
        Ok(())
    }

    /// One sequence's prompt through the model (already checked).
    fn prefill_slot(&mut self, slot: usize, tokens: &[u32]) -> Result<(), ReadError> {
        if !self.ffn.batched() {
            for (i, &t) in tokens.iter().enumerate() {
                let (kv, last) = (&mut self.caches[slot], i + 1 == tokens.len());
                let (ffn, rows) = (self.ffn.as_mut(), self.rows.as_mut());
                forward(self.weights, kv, &mut self.state, t, last, ffn, rows)?;
            }
            return Ok(());
        }
        for chunk in tokens.chunks(PREFILL_BATCH) {
            self.cols.clear();
            self.cols.extend(chunk.iter().map(|&t| (slot, t)));
            self.run_columns(0..chunk.len(), Logits::Last)?;
        }
        Ok(())
    }

    /// The prompts (already checked) through the model; each one's last logits into
    /// `self.logits`.
    fn prefill_prompts(&mut self, prompts: &[(SeqId, &[u32])]) -> Result<(), ReadError> {
        self.logits.clear();
        if !self.ffn.batched() {
            for &(id, tokens) in prompts {
                self.prefill_slot(id.slot(), tokens)?;
                self.logits.extend_from_slice(&self.state.logits);
            }
            return Ok(());
        }
        self.cols.clear();
        let mut ends = Vec::with_capacity(prompts.len());
        for &(id, tokens) in prompts {
            self.cols.extend(tokens.iter().map(|&t| (id.slot(), t)));
            ends.push(self.cols.len() - 1);
        }
        for start in (0..self.cols.len()).step_by(PREFILL_BATCH) {
            let end = (start + PREFILL_BATCH).min(self.cols.len());
            let picked: Vec<usize> = (ends.iter())
                .filter(|&&e| (start..end).contains(&e))
                .map(|&e| e - start)
                .collect();
            self.run_columns(start..end, Logits::Of(&picked))?;
            if !picked.is_empty() {
                self.logits.extend_from_slice(self.batch.logits());
            }
        }
        Ok(())
    }

    /// Columns `range` of `self.cols` as one pass over every cache.
    fn run_columns(
        &mut self,
        range: std::ops::Range<usize>,
        logits: Logits<'_>,
    ) -> Result<(), ReadError> {
        forward_columns(
            self.weights,
            &mut self.caches,
            &self.cols[range],
            &mut self.state,
            &mut self.batch,
            logits,
            self.ffn.as_mut(),
            self.rows.as_mut(),
        )
    }
}
