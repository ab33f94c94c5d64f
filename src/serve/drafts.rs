//! Speculative decoding inside the server's batch: each sequence proposes the tokens that
//! followed the latest earlier occurrence of its last n-gram (prompt lookup), and its drafts
//! ride in the same pass as every other sequence's next token, as extra columns of its own
//! sequence ([`BatchDecoder::step`] runs a sequence named several times at consecutive
//! positions). Under a memory budget a pass is mostly flash reads, shared by all its columns,
//! so an accepted draft is a token that cost neither a pass nor reads of its own.
//!
//! One [`DraftLength`] measures the batch: what a plain pass costs, what each extra column
//! costs, how often drafts are kept; each sequence drafts the length that pays against its
//! share of the pass, none where drafting does not pay (a resident model on few cores), and
//! never so many that the pass spills into a second one.

use std::time::Duration;

use crate::draft::{prompt_lookup, DraftLength, DraftOptions, Proposal};
use crate::engine::batch::{BatchDecoder, SeqId};

/// What one sequence offers a pass: where it stands and how much it may still draft.
pub struct Offer<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Its tokens so far (prompt and generated, the next input last).
    pub history: &'a [u32],
    /// Tokens it may still generate after the next input.
    pub wants: usize,
}

/// The batch's draft length and what it has measured.
pub struct BatchDrafts {
    length: DraftLength,
    /// Drafted and kept, over the server's life.
    pub drafted: u64,
    /// Kept of those.
    pub accepted: u64,
}

impl BatchDrafts {
    /// Drafts of at most `options.max` tokens per sequence and pass (at least `options.min`
    /// where the lookup finds that many).
    pub fn new(options: &DraftOptions) -> BatchDrafts {
        BatchDrafts {
            length: DraftLength::new(options.min, options.max),
            drafted: 0,
            accepted: 0,
        }
    }

    /// Each offer's drafted tokens (often none), in order: the measured best length, cut to
    /// the pass's width, the sequence's room in its context and what it still wants.
    /// Drafts are certain (point masses), so the proposals carry no distributions.
    pub fn propose(&self, batch: &BatchDecoder<'_>, offers: &[Offer<'_>]) -> Vec<Proposal> {
        let n = offers.len();
        let spare = batch.pass_width().saturating_sub(n) / n.max(1);
        let k = self.length.next_in_batch(spare, n);
        offers
            .iter()
            .map(|o| {
                let at = batch.position(o.seq).unwrap_or(usize::MAX);
                // The next input takes one position; the drafts follow it.
                let room = batch.capacity().saturating_sub(at.saturating_add(1));
                let k = k.min(room).min(o.wants);
                let tokens = match k {
                    0 => Vec::new(),
                    k => prompt_lookup(o.history, k).to_vec(),
                };
                Proposal {
                    tokens,
                    dists: Vec::new(),
                }
            })
            .collect()
    }

    /// A pass with `drafted` draft columns in all took `took` and kept `kept` of them.
    pub fn record(&mut self, drafted: usize, kept: usize, took: Duration) {
        let ms = took.as_secs_f64() * 1e3;
        self.length.verified(drafted, kept, ms);
        self.drafted += drafted as u64;
        self.accepted += kept as u64;
    }
}
