//! The CPU session (decode steps, prefill, verify passes, roll back), the batch decoder, the
//! sampler and per-token statistics. The decode loop over a session, plain or speculative, is
//! `draft::generate`, the same for both backends.

pub mod batch;
pub mod flash;
pub mod gpu;
pub mod model;
pub mod perplexity;
pub mod sampler;
pub mod stats;

use crate::backend::cpu::forward::{
    forward, output_prefix, CpuState, DenseFfn, DraftFfn, FfnCompute,
};
use crate::backend::cpu::prefill::{forward_batch, BatchState, Logits};
use crate::backend::kv_cache::{KvCache, KvType};
use crate::backend::stats::FlashStats;
use crate::backend::streamed::{OutputRows, RowSource};
use crate::model::weights::ModelWeights;
use stats::GenerationStats;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the context is full ({capacity} positions): allocate a longer context or shorten the prompt")]
    ContextFull { capacity: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    /// A read of weights from flash failed (the file changed or the disk failed): the step
    /// stops and commits nothing.
    #[error(transparent)]
    Read(#[from] crate::storage::ReadError),
    /// A [`batch::SeqId`] that names no sequence of the batch: never added, or removed.
    #[error("sequence {0} is not in this batch (it was never added, or has been removed)")]
    UnknownSequence(batch::SeqId),
    #[error("the logits after position {position} are not finite numbers (NaN or infinite): the weights read are damaged or the model overflowed; verify the file's checksums or convert it again")]
    NonFinite { position: usize },
}

/// `logits` if every value is finite; a NaN or infinite logit (damaged weights, an overflow)
/// is an error, never a token.
pub fn finite(logits: &[f32], position: usize) -> Result<&[f32], EngineError> {
    match logits.iter().all(|v| v.is_finite()) {
        true => Ok(logits),
        false => Err(EngineError::NonFinite { position }),
    }
}

/// One sequence being decoded: its KV cache, scratch buffers, and the FFN provider.
pub struct Session<'w> {
    weights: &'w ModelWeights,
    kv: KvCache,
    state: CpuState,
    ffn: Box<dyn FfnCompute + 'w>,
    /// Embedding and output head held apart from the weights (resident copies or streamed).
    rows: Option<OutputRows>,
    /// Activations of a prefill batch.
    batch: BatchState,
    /// A self-drafting step's output head over the most frequent tokens, when the full head
    /// is streamed (see [`Session::with_draft_head`]).
    draft_head: Option<RowSource>,
    /// Logits of a verify pass run token by token.
    verify_logits: Vec<f32>,
}

/// Prompt tokens per prefill batch: enough to read each weight once for many tokens, few
/// enough that a batch's activations stay small (64 x the FFN width in f32).
pub(crate) const PREFILL_BATCH: usize = 64;

/// Tokens per batch when [`Session::score`] runs under a memory budget (output rows from the
/// image): every token of a scored batch keeps its vocabulary-sized logits until the batch
/// ends, so the batch is kept small; the planner counts this many rows of logits.
pub const BUDGET_SCORE_BATCH: usize = 8;

impl<'w> Session<'w> {
    /// A session whose context holds at most `ctx` positions (clamped to what the model was
    /// trained for).
    pub fn new(weights: &'w ModelWeights, ctx: usize) -> Session<'w> {
        Session::with_ffn(weights, ctx, Box::new(DenseFfn::new(weights)))
    }

    /// A session whose FFN blocks are computed by `ffn` (flash offloading, calibration).
    pub fn with_ffn(
        weights: &'w ModelWeights,
        ctx: usize,
        ffn: Box<dyn FfnCompute + 'w>,
    ) -> Session<'w> {
        let c = &weights.config;
        let ctx = ctx.min(c.max_positions).max(1);
        Session {
            weights,
            kv: KvCache::new(c, ctx, KvType::default()),
            state: CpuState::new(c, weights.activations),
            ffn,
            rows: None,
            batch: BatchState::default(),
            draft_head: None,
            verify_logits: Vec::new(),
        }
    }

    /// Keeps keys and values as `dtype` (f16 by default, as llama.cpp does). Call before the
    /// first step: it empties the cache.
    pub fn with_kv_type(mut self, dtype: KvType) -> Session<'w> {
        let c = &self.weights.config;
        self.kv = KvCache::new(c, self.kv.capacity(), dtype);
        self
    }

    /// The KV cache's memory resident from the start ([`KvCache::make_resident`]): what a
    /// session under a memory budget wants.
    pub fn with_resident_kv(mut self) -> Session<'w> {
        self.kv.make_resident();
        self
    }

    /// Takes the embedding and output head from `rows` instead of the weights.
    pub fn with_rows(mut self, rows: OutputRows) -> Session<'w> {
        self.rows = Some(rows);
        self
    }

    /// Drafting steps ([`Session::draft_step`]) take their logits from `head`, a resident
    /// prefix of the output head's rows, instead of the streamed head.
    pub fn with_draft_head(mut self, head: RowSource) -> Session<'w> {
        self.draft_head = Some(head);
        self
    }

    /// Whether the output head is read from the image on every pass.
    pub fn head_streamed(&self) -> bool {
        self.rows
            .as_ref()
            .is_some_and(|r| r.head_ref().is_streamed())
    }

    /// Bytes held by the drafting head, if any.
    pub fn draft_head_bytes(&self) -> usize {
        self.draft_head.as_ref().map_or(0, RowSource::memory_bytes)
    }

    /// The model this session decodes.
    pub fn weights(&self) -> &'w ModelWeights {
        self.weights
    }

    /// The flash path's costs so far, with the streamed embedding and head counted as I/O.
    pub fn flash_stats(&self) -> Option<FlashStats> {
        flash_costs(self.ffn.as_ref(), self.rows.as_ref())
    }

    /// A batch of `slots` sequences decoded together ([`batch::BatchDecoder`]), taking this
    /// session's FFN, embedding and head rows, and its KV cache's capacity, element type and
    /// residency for every slot. A memory plan for one session counted one cache: `slots`
    /// of them hold `slots` times its bytes.
    pub fn into_batch(self, slots: usize) -> batch::BatchDecoder<'w> {
        batch::BatchDecoder::new(self.weights, self.kv, self.ffn, self.rows, slots)
    }

    /// The FFN provider, e.g. to read its statistics.
    pub fn ffn(&self) -> &(dyn FfnCompute + 'w) {
        self.ffn.as_ref()
    }

    /// Positions consumed so far.
    pub fn position(&self) -> usize {
        self.kv.len()
    }

    pub fn reset(&mut self) {
        self.kv.clear();
    }

    /// Forgets every position from `len` on, in O(1): what a rejected draft leaves behind.
    pub fn truncate(&mut self, len: usize) {
        self.kv.truncate(len);
    }

    /// Positions the context can hold.
    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Runs `tokens` at the next positions and returns the logits after each, row-major
    /// (`tokens.len() x vocab`): a speculative verify pass. The FFN sees them as one batch
    /// where it can ([`FfnCompute::verify_batched`]), so each bundle is read once for all of
    /// them; every row equals what [`Session::step`] would have returned, to the bit.
    pub fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        self.check(tokens)?;
        if self.ffn.verify_batched() && tokens.len() <= PREFILL_BATCH {
            self.run_batch(tokens, Logits::All)?;
            return Ok(self.batch.logits());
        }
        self.verify_logits.clear();
        for &t in tokens {
            forward(
                self.weights,
                &mut self.kv,
                &mut self.state,
                t,
                true,
                self.ffn.as_mut(),
                self.rows.as_mut(),
            )?;
            self.verify_logits.extend_from_slice(&self.state.logits);
        }
        Ok(&self.verify_logits)
    }

    /// Starts or stops recording each FFN neuron's activity (see
    /// [`FfnCompute::record_activity`]).
    pub fn record_activity(&mut self, on: bool) {
        self.ffn.record_activity(on);
    }

    /// Drafts from each layer's `per_layer` neurons most active while recording (read into
    /// memory once); returns the bytes held beyond the window.
    pub fn load_draft_neurons(&mut self, per_layer: usize) -> Result<usize, String> {
        self.ffn.load_draft_neurons(per_layer)
    }

    /// Whether the FFN holds neurons in memory to draft from ([`Session::draft_step`]).
    pub fn can_self_draft(&self) -> bool {
        self.ffn.has_draft()
    }

    /// Runs `token` through the model with each FFN restricted to the neurons held in memory
    /// (no flash reads), and the drafting head when there is one: a self-speculative draft.
    /// Its keys and values go into the cache like any step's; the caller cuts them off
    /// ([`Session::truncate`]) before verifying.
    pub fn draft_step(&mut self, token: u32) -> Result<&[f32], EngineError> {
        self.check(std::slice::from_ref(&token))?;
        let mut ffn = DraftFfn(self.ffn.as_mut());
        let head = self.draft_head.as_mut();
        forward(
            self.weights,
            &mut self.kv,
            &mut self.state,
            token,
            head.is_none(),
            &mut ffn,
            self.rows.as_mut(),
        )?;
        if let Some(head) = head {
            output_prefix(self.weights, &mut self.state, head)?;
        }
        Ok(&self.state.logits)
    }

    /// Runs one token; returns the next-token logits when `want_logits`.
    pub fn step(&mut self, token: u32, want_logits: bool) -> Result<&[f32], EngineError> {
        self.check(std::slice::from_ref(&token))?;
        forward(
            self.weights,
            &mut self.kv,
            &mut self.state,
            token,
            want_logits,
            self.ffn.as_mut(),
            self.rows.as_mut(),
        )?;
        Ok(&self.state.logits)
    }

    /// Feeds `tokens` in order and returns the logits after the last one. When the FFN allows
    /// ([`FfnCompute::batched`]: dense weights, or the flash path computing every neuron with
    /// lookahead) the tokens go through in batches (each weight read once per batch, the same
    /// logits to the bit); otherwise one at a time.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let (last, rest) = tokens.split_last().ok_or(EngineError::EmptyPrompt)?;
        if !self.ffn.batched() {
            for &t in rest {
                self.step(t, false)?;
            }
            return self.step(*last, true);
        }
        self.check(tokens)?;
        for batch in tokens.chunks(PREFILL_BATCH) {
            self.run_batch(batch, Logits::Last)?;
        }
        Ok(&self.state.logits)
    }

    /// Feeds `tokens` in order and calls `each(i, logits)` with the next-token logits after
    /// token `i`: what perplexity needs. Batched like [`Session::prefill`] when the FFN allows
    /// (the vocabulary projection too), token by token otherwise; the same logits either way.
    pub fn score(
        &mut self,
        tokens: &[u32],
        mut each: impl FnMut(usize, &[f32]),
    ) -> Result<(), EngineError> {
        if !self.ffn.batched() {
            for (i, &t) in tokens.iter().enumerate() {
                each(i, self.step(t, true)?);
            }
            return Ok(());
        }
        self.check(tokens)?;
        let vocab = self.weights.config.vocab_size;
        let size = match self.rows {
            Some(_) => BUDGET_SCORE_BATCH,
            None => PREFILL_BATCH,
        };
        for (k, batch) in tokens.chunks(size).enumerate() {
            self.run_batch(batch, Logits::All)?;
            for (j, logits) in self.batch.logits().chunks_exact(vocab).enumerate() {
                each(k * size + j, logits);
            }
        }
        Ok(())
    }

    /// One batch of at most `PREFILL_BATCH` tokens through the model (already `check`ed).
    fn run_batch(&mut self, batch: &[u32], logits: Logits<'_>) -> Result<(), EngineError> {
        Ok(forward_batch(
            self.weights,
            &mut self.kv,
            &mut self.state,
            &mut self.batch,
            batch,
            logits,
            self.ffn.as_mut(),
            self.rows.as_mut(),
        )?)
    }

    /// Refuses tokens outside the vocabulary and a prompt that would overflow the context,
    /// before any of it is run.
    fn check(&self, tokens: &[u32]) -> Result<(), EngineError> {
        check_vocab(self.weights, tokens)?;
        check_room(&self.kv, tokens.len())
    }
}

/// Refuses a token outside `w`'s vocabulary.
pub(crate) fn check_vocab(w: &ModelWeights, tokens: &[u32]) -> Result<(), EngineError> {
    let vocab = w.config.vocab_size;
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&id) => Err(EngineError::BadToken { id, vocab }),
        None => Ok(()),
    }
}

/// Refuses `n` more positions than `kv` has room for.
pub(crate) fn check_room(kv: &KvCache, n: usize) -> Result<(), EngineError> {
    match kv.len() + n > kv.capacity() {
        true => Err(EngineError::ContextFull {
            capacity: kv.capacity(),
        }),
        false => Ok(()),
    }
}

/// The flash path's costs so far (`ffn`'s), with the streamed embedding and head of `rows`
/// counted as I/O and memory: what a session or a batch reports.
fn flash_costs(ffn: &dyn FfnCompute, rows: Option<&OutputRows>) -> Option<FlashStats> {
    let mut s = ffn.flash_stats()?;
    if let Some(r) = rows {
        s.bytes_read += r.bytes_read();
        s.io += r.io();
        s.memory_bytes += r.memory_bytes() as u64;
    }
    Some(s)
}

/// The tokens a generation produced and what it cost.
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stats: GenerationStats,
}

/// Splits decode time into the FFN's I/O and memory management (measured by the flash
/// path between `before` and `after`) and compute (the rest).
pub(crate) fn add_flash_costs(
    stats: &mut GenerationStats,
    before: &FlashStats,
    after: &FlashStats,
) {
    let passes = stats.generated_tokens.saturating_sub(1).max(1) as f64;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / passes;
    stats.strategy = "flash".into();
    stats.bytes_read_per_token = (after.bytes_read - before.bytes_read) as f64 / passes;
    stats.io_ms_per_token = ms(after.io - before.io);
    stats.mem_ms_per_token = ms(after.memory - before.memory);
    stats.compute_ms_per_token =
        (stats.compute_ms_per_token - stats.io_ms_per_token - stats.mem_ms_per_token).max(0.0);
    stats.flash = Some(after.clone());
}

/// Rates from counts and times. The first generated token comes from the prompt's logits, so
/// decode time covers `generated - 1` forward passes.
pub(crate) fn summarize(
    prompt: usize,
    generated: usize,
    prompt_ms: f64,
    decode_ms: f64,
) -> GenerationStats {
    let passes = generated.saturating_sub(1).max(1) as f64;
    let rate = |n: f64, ms: f64| if ms > 0.0 { n * 1e3 / ms } else { 0.0 };
    GenerationStats {
        strategy: "resident".into(),
        prompt_tokens: prompt,
        generated_tokens: generated,
        prompt_ms,
        decode_ms,
        tokens_per_s: if generated > 1 {
            rate(passes, decode_ms)
        } else {
            0.0
        },
        prompt_tokens_per_s: rate(prompt as f64, prompt_ms),
        bytes_read_per_token: 0.0,
        io_ms_per_token: 0.0,
        mem_ms_per_token: 0.0,
        compute_ms_per_token: decode_ms / passes,
        peak_rss_bytes: stats::peak_rss_bytes(),
        flash: None,
        gpu: None,
        draft: None,
    }
}
