//! Speculative decoding: draft a few tokens cheaply, verify them with one pass of the full
//! model, keep the longest prefix it agrees with.
//!
//! Under a memory budget every decoded token pays a full pass of flash reads, so the disk sets
//! the speed. A verify pass over `k + 1` positions reads each bundle once for all of them
//! ([`crate::engine::Session::verify`]), so every accepted draft token is a token that cost no reads of its
//! own. The drafts come from what is already in memory:
//!
//! - [`SelfDraft`] (`--draft self`): the target model with each FFN restricted to the neurons
//!   its window pins (no I/O), and a resident head over the most frequent tokens when the
//!   full head is streamed; on the CPU session or the GPU flash decoder ([`SelfTarget`]).
//! - [`NgramDraft`] (`--draft ngram`): prompt lookup, the tokens that followed the latest
//!   earlier occurrence of the context's last n-gram. No memory; strong on code and edits.
//! - [`ModelDraft`] (`--draft PATH`): a separate small model with the same vocabulary.
//!
//! Acceptance ([`accept`]) keeps greedy output identical to plain decoding and sampled output
//! distributed as the plain sampler's (Leviathan et al. 2023; Chen et al. 2023).

mod accept;
mod decode;
mod length;
mod model;
mod ngram;
mod selfdraft;
mod target;

pub use accept::{accept, Accepted};
pub use decode::{generate, generate_while};
pub use length::DraftLength;
pub use model::{same_vocabulary, ModelDraft};
pub use ngram::{lookup as prompt_lookup, NgramDraft};
pub use selfdraft::{SelfDraft, SelfTarget};
pub use target::Target;

pub use crate::engine::stats::DraftStats;

use crate::engine::sampler::{top_probability, Dist, Sampler};
use crate::engine::EngineError;

/// Where drafts come from (`--draft`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DraftSource {
    /// No speculation: one token per pass.
    None,
    /// The target restricted to what is in memory.
    SelfModel,
    /// Prompt lookup.
    Ngram,
    /// A separate model sharing the vocabulary.
    Model(std::path::PathBuf),
}

impl std::str::FromStr for DraftSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => DraftSource::None,
            "self" => DraftSource::SelfModel,
            "ngram" => DraftSource::Ngram,
            "" => {
                return Err(
                    "an empty draft source; choose none, self, ngram or a model path".into(),
                )
            }
            path => DraftSource::Model(path.into()),
        })
    }
}

impl DraftSource {
    pub fn name(&self) -> String {
        match self {
            DraftSource::None => "none".into(),
            DraftSource::SelfModel => "self".into(),
            DraftSource::Ngram => "ngram".into(),
            DraftSource::Model(p) => p.display().to_string(),
        }
    }
}

/// How long drafts may grow.
#[derive(Clone, Copy, Debug)]
pub struct DraftOptions {
    /// Tokens drafted per verify pass at most.
    pub max: usize,
    /// Tokens drafted per pass at least, whatever the measured costs say (where the source
    /// has that many to propose): `max` gives a fixed length.
    pub min: usize,
    /// A model draft stops early when its most likely token's probability falls below this.
    pub p_min: f64,
}

impl Default for DraftOptions {
    fn default() -> Self {
        DraftOptions {
            max: DEFAULT_DRAFT_MAX,
            min: 0,
            p_min: DEFAULT_P_MIN,
        }
    }
}

/// Tokens drafted per pass by default (see docs/benchmarks.md for the measurements).
pub const DEFAULT_DRAFT_MAX: usize = 6;

/// A model draft's confidence below which it stops drafting, by default.
pub const DEFAULT_P_MIN: f64 = 0.3;

/// Drafted tokens, and for sampled drafts the distribution each was drawn from.
#[derive(Clone, Debug, Default)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    /// `dists[i]` is the draft's distribution for `tokens[i]`; empty when every token was
    /// proposed with certainty (greedy drafts, n-gram lookups): point masses.
    pub dists: Vec<Dist>,
}

impl Proposal {
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.dists.clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A source of draft tokens for decoding with a target of type `T` (the CPU [`crate::engine::Session`] or
/// the GPU decoder; a draft that runs the target itself, as [`SelfDraft`] does, exists for
/// the one it can run).
pub trait Draft<T: Target + ?Sized> {
    /// Proposes up to `max` tokens to follow `history` into `out` (empty: no draft, decode
    /// one token plainly). The target's cache holds every position of `history` but the last
    /// token, which the verify pass runs first; it must hold exactly that again on return.
    fn propose(
        &mut self,
        target: &mut T,
        history: &[u32],
        max: usize,
        sampler: &mut Sampler,
        out: &mut Proposal,
    ) -> Result<(), DraftError>;

    /// Called before the prompt runs, and after it with the target holding the prompt (a
    /// draft may watch the prompt and choose what to hold).
    fn before_prompt(&mut self, _target: &mut T) {}
    fn after_prompt(&mut self, _target: &mut T, _prompt: &[u32]) -> Result<(), DraftError> {
        Ok(())
    }

    /// Bytes this draft holds in memory beyond the target's.
    fn memory_bytes(&self) -> usize {
        0
    }
}

/// No draft: every pass is a plain step.
pub struct NoDraft;

impl<T: Target + ?Sized> Draft<T> for NoDraft {
    fn propose(
        &mut self,
        _target: &mut T,
        _history: &[u32],
        _max: usize,
        _sampler: &mut Sampler,
        _out: &mut Proposal,
    ) -> Result<(), DraftError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Gpu(#[from] crate::backend::gpu::GpuError),
    #[error("{0}")]
    Setup(String),
}

/// The next token of a model draft from its logits: the sampler's choice from the draft's
/// own distribution (recorded for acceptance) or the most likely token, `None` when the
/// draft's confidence is under `p_min`.
pub(crate) fn draft_token(
    logits: &[f32],
    sampler: &mut Sampler,
    p_min: f64,
    out: &mut Proposal,
) -> Option<u32> {
    if sampler.is_greedy() {
        if top_probability(logits) < p_min {
            return None;
        }
        let t = crate::engine::sampler::argmax(logits);
        out.tokens.push(t);
        return Some(t);
    }
    let q = sampler.distribution(logits);
    if q.probs.first().copied().unwrap_or(0.0) < p_min {
        return None;
    }
    let t = q.draw(sampler.uniform());
    out.tokens.push(t);
    out.dists.push(q);
    Some(t)
}
