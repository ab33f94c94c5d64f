//! The decode loop, the one both backends run, plain or speculative: draft, verify in one
//! pass, accept, roll back.
//!
//! ```text
//! prefill(prompt) -> next
//! loop:
//!   emit next
//!   draft:  d1..dk after history + next             (from memory: no flash reads)
//!   verify: logits of [next, d1..dk] in one pass     (each bundle read once for all)
//!   accept: d1..da kept, and the token after them     (greedy or speculative sampling)
//!   cut the cache back to history + next + d1..da; emit d1..da; next = the token after
//! ```
//! With no draft (an n-gram that does not recur, a draft below its confidence) the pass is a
//! plain step, so speculation costs nothing where it cannot help. A greedy plain step on the
//! GPU picks its token there ([`Target::step_greedy`]: 4 bytes read back, not the logits).

use std::time::{Duration, Instant};

use crate::engine::gpu::gpu_run_stats;
use crate::engine::sampler::Sampler;
use crate::engine::stats::DraftStats;
use crate::engine::{add_flash_costs, finite, summarize, Generation};

use super::length::DraftLength;
use super::{accept, Draft, DraftError, DraftOptions, NoDraft, Proposal, Target};

/// Decodes up to `max_new` tokens after `prompt` on `session` (the CPU's
/// [`Session`](crate::engine::Session) or a GPU decoder), with drafts from `draft` (`None`: plain decoding, one step per token), calling `on_token` for
/// each token as it is accepted and stopping before a token for which `is_end` holds. Greedy
/// output is the same token for token as without a draft. Drafts never exceed what one verify
/// pass of `session` holds.
#[allow(clippy::too_many_arguments)]
pub fn generate<T: Target + ?Sized>(
    session: &mut T,
    draft: Option<(&mut dyn Draft<T>, &str)>,
    opts: &DraftOptions,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, DraftError> {
    let each = |t| {
        on_token(t);
        true
    };
    generate_while(session, draft, opts, prompt, max_new, sampler, is_end, each)
}

/// [`generate`], where `on_token` also says whether to go on: the generation ends after a
/// token for which it returns false (a stop string was completed, the reader went away).
#[allow(clippy::too_many_arguments)]
pub fn generate_while<T: Target + ?Sized>(
    session: &mut T,
    draft: Option<(&mut dyn Draft<T>, &str)>,
    opts: &DraftOptions,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, DraftError> {
    let plain = draft.is_none();
    let mut none = NoDraft;
    let (draft, source): (&mut dyn Draft<T>, &str) = draft.unwrap_or((&mut none, "none"));
    let t0 = Instant::now();
    draft.before_prompt(session);
    let mut next = sampler.sample(finite(session.prefill(prompt)?, prompt.len())?);
    // The GPU's counters from here cover decoding only, as the flash stats below do.
    let gpu_before = session.gpu().map(|g| g.counters());
    draft.after_prompt(session, prompt)?;
    let prompt_ms = ms(t0.elapsed());
    let before = session.flash_stats();
    let t1 = Instant::now();
    let vocab = session.vocab();
    let mut history = prompt.to_vec();
    // No more tokens than the context holds, whatever `max_new` asks.
    let mut tokens = Vec::with_capacity(max_new.min(session.capacity()));
    let mut proposal = Proposal::default();
    let mut ds = DraftStats {
        source: source.to_string(),
        memory_bytes: (draft.memory_bytes() + session.draft_head_bytes()) as u64,
        ..DraftStats::default()
    };
    let (mut drafting, mut verifying) = (Duration::ZERO, Duration::ZERO);
    let mut length = DraftLength::new(opts.min, opts.max);
    'decode: while tokens.len() < max_new && !is_end(next) {
        tokens.push(next);
        let go_on = on_token(next);
        history.push(next);
        // Positions left in the context: a verify pass runs `next` and the drafts.
        let room = session.capacity().saturating_sub(session.position());
        if !go_on || tokens.len() == max_new || room == 0 {
            break;
        }
        // Drafts past the last token asked for, or past the context, would be wasted.
        let width = session.verify_width().saturating_sub(1);
        let k = length.next((max_new - tokens.len()).min(room - 1).min(width));
        let td = Instant::now();
        proposal.clear();
        if k > 0 {
            draft.propose(session, &history, k, sampler, &mut proposal)?;
            proposal.tokens.truncate(k);
            proposal.dists.truncate(k);
        }
        drafting += td.elapsed();
        length.drafted(proposal.len(), ms(td.elapsed()));
        let tv = Instant::now();
        ds.passes += 1;
        if proposal.is_empty() {
            next = if sampler.is_greedy() {
                session.step_greedy(next)?
            } else {
                let at = session.position() + 1;
                sampler.sample(finite(session.step(next)?, at)?)
            };
            verifying += tv.elapsed();
            length.stepped(ms(tv.elapsed()));
            continue;
        }
        let verified = session.position();
        let mut batch = Vec::with_capacity(proposal.len() + 1);
        batch.push(next);
        batch.extend_from_slice(&proposal.tokens);
        let rows = finite(session.verify(&batch)?, verified + 1)?;
        let a = accept(rows, vocab, &proposal, sampler);
        session.truncate(verified + 1 + a.kept);
        verifying += tv.elapsed();
        length.verified(proposal.len(), a.kept, ms(tv.elapsed()));
        ds.verify_passes += 1;
        ds.drafted += proposal.len() as u64;
        ds.accepted += a.kept as u64;
        for &t in &proposal.tokens[..a.kept] {
            if is_end(t) {
                break 'decode;
            }
            tokens.push(t);
            let go_on = on_token(t);
            history.push(t);
            if !go_on || tokens.len() == max_new {
                break 'decode;
            }
        }
        next = a.next;
    }
    let decode_ms = ms(t1.elapsed());
    let mut stats = summarize(prompt.len(), tokens.len(), prompt_ms, decode_ms);
    if let (Some(a), Some(b)) = (before, session.flash_stats()) {
        add_flash_costs(&mut stats, &a, &b);
    }
    if let (Some(gpu), Some(before)) = (session.gpu(), gpu_before) {
        let after = gpu.counters();
        stats.strategy = if after.flash.is_some() {
            "gpu-flash"
        } else {
            "gpu"
        }
        .into();
        stats.gpu = Some(gpu_run_stats(gpu, &before, &after, tokens.len()));
    }
    let per_token = tokens.len().saturating_sub(1).max(1) as f64;
    ds.acceptance_rate = ratio(ds.accepted as f64, ds.drafted as f64);
    ds.tokens_per_pass = ratio(tokens.len().saturating_sub(1) as f64, ds.passes as f64);
    ds.draft_ms_per_token = ms(drafting) / per_token;
    ds.verify_ms_per_token = ms(verifying) / per_token;
    // Plain decoding reports no draft statistics, as the plain loop does.
    stats.draft = (!plain).then_some(ds);
    Ok(Generation { tokens, stats })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
