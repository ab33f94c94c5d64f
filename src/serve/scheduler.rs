//! The decode loop of the server: continuous batching over one [`BatchDecoder`].
//!
//! ```text
//! loop:
//!   admit: take the waiting requests while slots are free, tokenise them, prefill their
//!          slots together (one batched prefill: each pass's reads serve every new prompt)
//!   step:  one pass over the weights for every active sequence's next token
//!   emit:  each sequence's new text to its client; finished or abandoned ones free their slot
//! ```
//! Each pass reads every bundle once for all active sequences (with a predictor: the union
//! of their active sets), so under a memory budget throughput grows with the batch until
//! compute binds. A sequence decodes exactly as it would alone (the batch forward gives the
//! same logits to the bit), so a greedy request's text does not depend on its neighbours.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::drafts::{BatchDrafts, Offer};
use super::metrics::Metrics;
use super::openai::{ApiError, RequestPrompt};
use crate::api::{Engine, FinishReason, GenerateOptions, Prompt, TextStream};
use crate::draft::{accept, Accepted, Proposal};
use crate::engine::batch::{BatchDecoder, SeqId};
use crate::engine::finite;
use crate::engine::sampler::Sampler;

/// A request waiting for a slot.
pub struct Job {
    /// What to continue.
    pub prompt: RequestPrompt,
    /// `max_tokens` `None`-free: the HTTP side filled in the default.
    pub opts: GenerateOptions,
    /// Where its events go; a send that fails means the client went away.
    pub events: UnboundedSender<Event>,
    /// Its place among the requests the server holds (running or waiting).
    pub permit: Permit,
}

/// One of the `parallel + queue` places for requests being decoded or waiting: the HTTP side
/// takes one before queueing a request (none left: 503) and it comes back when dropped, as
/// the request's sequence ends. (A channel bounded by the queue alone cannot say this: it
/// does not know how many slots are free, so with `--queue 0` it refused every request but
/// the first even while slots were free.)
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// A place, when fewer than `limit` of `held` are taken.
    pub fn take(held: &Arc<AtomicUsize>, limit: usize) -> Option<Permit> {
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Permit(held.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request's client hears, in order: `Started`, any number of `Text`, then `Done`;
/// or `Failed` alone.
#[derive(Debug)]
pub enum Event {
    /// The prompt was prefilled.
    Started {
        /// Its tokens.
        prompt_tokens: usize,
    },
    /// More of the reply's text.
    Text(String),
    /// The reply ended.
    Done {
        /// Why.
        finish: FinishReason,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The request failed; nothing follows.
    Failed(ApiError),
}

/// A sequence being decoded.
struct Active {
    seq: SeqId,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    text: TextStream,
    opts: GenerateOptions,
    /// The token chosen last, not yet run through the model.
    next: u32,
    /// The prompt and every token chosen since (`next` last): what drafts are looked up in.
    history: Vec<u32>,
    generated: usize,
    /// Given back just before `Done` is sent, so that a client answered can be let in again
    /// at once (its slot is freed before the scheduler next admits).
    permit: Option<Permit>,
}

/// Decodes `jobs` on `batch` until every sender of the queue is gone and the last
/// sequence finished (how the server drains on shutdown).
pub fn run(
    engine: &Engine,
    mut batch: BatchDecoder<'_>,
    jobs: Receiver<Job>,
    metrics: &Arc<Metrics>,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut drafts = engine.drafts().map(BatchDrafts::new);
    let mut open = true;
    let mut read_before = flash_bytes(&batch);
    loop {
        let mut arrived = Vec::new();
        while open && active.len() + arrived.len() < batch.slots() {
            let job = match active.is_empty() && arrived.is_empty() {
                true => jobs.recv().map_err(|_| TryRecvError::Disconnected),
                false => jobs.try_recv(),
            };
            match job {
                Ok(job) => arrived.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        Metrics::sub(&metrics.queued, arrived.len() as u64);
        active.extend(start(engine, &mut batch, arrived, metrics));
        if active.is_empty() {
            if !open {
                return;
            }
            continue;
        }
        step(engine, &mut batch, &mut active, drafts.as_mut(), metrics);
        let read = flash_bytes(&batch);
        Metrics::add(&metrics.flash_bytes, read.saturating_sub(read_before));
        read_before = read;
        metrics
            .active
            .store(active.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

fn flash_bytes(batch: &BatchDecoder<'_>) -> u64 {
    batch.flash_stats().map_or(0, |s| s.bytes_read)
}

/// Tokenises the jobs that arrived together, prefills their slots in one batched prefill
/// (each pass's reads shared by every new prompt) and emits each one's first token; returns
/// those still running. A job that fails or finishes at once is told and left out.
fn start(
    engine: &Engine,
    batch: &mut BatchDecoder<'_>,
    jobs: Vec<Job>,
    metrics: &Metrics,
) -> Vec<Active> {
    let admitted: Vec<(Job, Vec<u32>, SeqId)> = (jobs.into_iter())
        .filter_map(|job| admit(engine, batch, job))
        .collect();
    if admitted.is_empty() {
        return Vec::new();
    }
    let prompts: Vec<(SeqId, &[u32])> = (admitted.iter())
        .map(|(_, ids, seq)| (*seq, ids.as_slice()))
        .collect();
    let vocab = engine.model().weights.config.vocab_size;
    let mut samplers: Vec<Sampler> = (admitted.iter())
        .map(|(job, ..)| Sampler::new(job.opts.sampling.clone()))
        .collect();
    // Each prompt's first token, sampled while the logits are borrowed from the batch.
    let first: Result<Vec<_>, _> = batch.prefill_many(&prompts).map(|rows| {
        (rows.chunks_exact(vocab).zip(&mut samplers).zip(&prompts))
            .map(|((row, sampler), (_, ids))| finite(row, ids.len()).map(|l| sampler.sample(l)))
            .collect()
    });
    let first = match first {
        Ok(first) => first,
        Err(e) => {
            for (job, _, seq) in admitted {
                let _ = batch.remove(seq);
                let _ = (job.events).send(Event::Failed(ApiError::server(format!(
                    "decoding the prompt failed: {e}"
                ))));
            }
            return Vec::new();
        }
    };
    let runs = admitted.into_iter().zip(samplers).zip(first);
    runs.filter_map(|(((job, ids, seq), sampler), next)| {
        let next = match next {
            Ok(t) => t,
            Err(e) => {
                let _ = batch.remove(seq);
                let _ = (job.events).send(Event::Failed(ApiError::server(e.to_string())));
                return None;
            }
        };
        Metrics::add(&metrics.prompt_tokens, ids.len() as u64);
        let started = job.events.send(Event::Started {
            prompt_tokens: ids.len(),
        });
        let mut history = ids;
        history.push(next);
        let mut a = Active {
            seq,
            events: job.events,
            sampler,
            text: TextStream::new(&job.opts.stop),
            opts: job.opts,
            next,
            history,
            generated: 0,
            permit: Some(job.permit),
        };
        if started.is_err() || a.emit(engine, batch, metrics, 0) {
            let _ = batch.remove(seq);
            return None;
        }
        Some(a)
    })
    .collect()
}

/// Tokenises `job`, checks its prompt against the context and vocabulary, and gives it a
/// slot; `None` (its client told) when it is refused.
fn admit(
    engine: &Engine,
    batch: &mut BatchDecoder<'_>,
    job: Job,
) -> Option<(Job, Vec<u32>, SeqId)> {
    let fail = |e: ApiError| {
        let _ = job.events.send(Event::Failed(e));
        None
    };
    let ids = match encode(engine, &job.prompt) {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let ctx = batch.capacity();
    if ids.is_empty() {
        return fail(ApiError::field("prompt", "the prompt is empty"));
    }
    if ids.len() >= ctx {
        let e = ApiError::invalid(format!(
            "the prompt has {} tokens and a sequence's context holds {ctx}: shorten it",
            ids.len()
        ));
        return fail(e.with_code("context_length_exceeded"));
    }
    let vocab = engine.model().weights.config.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return fail(ApiError::field(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    match batch.add() {
        Some(seq) => Some((job, ids, seq)),
        None => fail(ApiError::server("no free sequence slot (a scheduler bug)")),
    }
}

fn encode(engine: &Engine, prompt: &RequestPrompt) -> Result<Vec<u32>, ApiError> {
    let p = match prompt {
        RequestPrompt::Chat(m) => Prompt::Chat(m),
        RequestPrompt::Text(t) => Prompt::Text(t),
        RequestPrompt::Tokens(ids) => Prompt::Tokens(ids),
    };
    engine
        .encode(&p)
        .map_err(|e| ApiError::invalid(format!("{e:#}")))
}

/// One pass for every active sequence (its next token, and its drafts when drafting), then
/// each one's new tokens emitted; finished ones leave the batch. A failed pass fails every
/// sequence in it.
fn step(
    engine: &Engine,
    batch: &mut BatchDecoder<'_>,
    active: &mut Vec<Active>,
    drafts: Option<&mut BatchDrafts>,
    metrics: &Metrics,
) {
    let proposals = match &drafts {
        Some(d) => d.propose(batch, &active.iter().map(Active::offer).collect::<Vec<_>>()),
        None => vec![Proposal::default(); active.len()],
    };
    let mut inputs: Vec<(SeqId, u32)> = Vec::new();
    for (a, p) in active.iter().zip(&proposals) {
        inputs.push((a.seq, a.next));
        inputs.extend(p.tokens.iter().map(|&t| (a.seq, t)));
    }
    let vocab = engine.model().weights.config.vocab_size;
    let started = Instant::now();
    // Each sequence's kept drafts and next token, chosen while the pass's logits are
    // borrowed from the batch (no copy of them), then emitted once the batch is free again.
    let chosen: Result<Vec<_>, _> = batch.step(&inputs).map(|rows| {
        let mut at = 0;
        (active.iter_mut().zip(&proposals))
            .map(|(a, p)| {
                let n = p.len() + 1;
                let rows = &rows[at * vocab..(at + n) * vocab];
                at += n;
                finite(rows, 0).map(|rows| accept(rows, vocab, p, &mut a.sampler))
            })
            .collect()
    });
    let chosen = match chosen {
        Ok(chosen) => chosen,
        Err(e) => {
            for a in active.drain(..) {
                let _ = batch.remove(a.seq);
                let _ = a.events.send(Event::Failed(ApiError::server(format!(
                    "decoding failed: {e}"
                ))));
            }
            return;
        }
    };
    let drafted: usize = proposals.iter().map(Proposal::len).sum();
    let kept: usize = chosen.iter().flatten().map(|c| c.kept).sum();
    if let Some(d) = drafts {
        d.record(drafted, kept, started.elapsed());
    }
    Metrics::add(&metrics.passes, 1);
    Metrics::add(&metrics.pass_tokens, (active.len() + kept) as u64);
    Metrics::add(&metrics.drafted, drafted as u64);
    Metrics::add(&metrics.draft_accepted, kept as u64);
    let mut chosen = chosen.into_iter().zip(proposals);
    active.retain_mut(|a| {
        let done = match chosen.next() {
            Some((Ok(c), p)) => a.take(engine, batch, metrics, &p.tokens, c),
            Some((Err(_), _)) | None => {
                let at = batch.position(a.seq).unwrap_or(0);
                let e = crate::engine::EngineError::NonFinite { position: at };
                let _ = a
                    .events
                    .send(Event::Failed(ApiError::server(e.to_string())));
                true
            }
        };
        if done {
            let _ = batch.remove(a.seq);
        }
        !done
    });
}

impl Active {
    /// What this sequence offers a pass to draft from.
    fn offer(&self) -> Offer<'_> {
        Offer {
            seq: self.seq,
            history: &self.history,
            wants: self.opts.max_tokens.saturating_sub(self.generated + 1),
        }
    }

    /// Takes a pass's outcome: the cache cut back to the kept drafts, then each kept draft
    /// and the token after them emitted in turn; returns whether the sequence is done.
    fn take(
        &mut self,
        engine: &Engine,
        batch: &mut BatchDecoder<'_>,
        metrics: &Metrics,
        drafts: &[u32],
        chosen: Accepted,
    ) -> bool {
        let rejected = drafts.len() - chosen.kept;
        if rejected > 0 {
            let at = batch.position(self.seq).unwrap_or(0);
            if batch
                .truncate(self.seq, at.saturating_sub(rejected))
                .is_err()
            {
                return true;
            }
        }
        let tokens = drafts[..chosen.kept].iter().chain([&chosen.next]);
        for (i, &t) in tokens.enumerate() {
            self.next = t;
            self.history.push(t);
            // Kept drafts after this one are already in the cache.
            if self.emit(engine, batch, metrics, chosen.kept - i.min(chosen.kept)) {
                return true;
            }
        }
        false
    }

    /// Emits `self.next` (unless it ends the generation); returns whether the sequence is
    /// done: an end token, a stop string, `max_tokens`, a full context, or its client gone.
    /// `ahead`: positions already in the cache beyond `self.next` (kept drafts still to be
    /// emitted), not counted against the context.
    fn emit(
        &mut self,
        engine: &Engine,
        batch: &BatchDecoder<'_>,
        metrics: &Metrics,
        ahead: usize,
    ) -> bool {
        let tok = engine.model().tokenizer.as_ref();
        let end = !self.opts.ignore_eos && tok.is_some_and(|k| k.is_end_of_generation(self.next));
        if end {
            return self.finish(FinishReason::Stop);
        }
        self.generated += 1;
        Metrics::add(&metrics.generated_tokens, 1);
        let piece = match tok {
            Some(tok) => self.text.push(tok, self.next),
            None => format!("{} ", self.next),
        };
        if !piece.is_empty() && self.events.send(Event::Text(piece)).is_err() {
            return true;
        }
        if self.text.stopped() {
            return self.finish(FinishReason::Stop);
        }
        let full = batch
            .position(self.seq)
            .map_or(true, |p| p - ahead.min(p) >= batch.capacity());
        if self.generated >= self.opts.max_tokens || full {
            return self.finish(FinishReason::Length);
        }
        false
    }

    /// Sends what the text held back and the end; always done.
    fn finish(&mut self, finish: FinishReason) -> bool {
        let tail = self.text.finish();
        if !tail.is_empty() {
            let _ = self.events.send(Event::Text(tail));
        }
        self.permit = None;
        let _ = self.events.send(Event::Done {
            finish,
            completion_tokens: self.generated,
        });
        true
    }
}
