//! Self-speculation from memory: the target model with each layer's FFN restricted to the
//! neurons its window pins, and the target's own attention over the verified cache
//! ([`Session::draft_step`]). Drafting reads nothing from flash (when the output head is
//! streamed, a resident head over the most frequent tokens stands in for it), so a verify
//! pass's reads are the only reads, shared by every token it accepts.
//!
//! The same draft runs on the CPU [`Session`] and on the GPU flash decoder
//! ([`crate::backend::gpu::GpuFlashDecoder::draft_step`], over the neurons pinned in its GPU
//! windows): both are a [`SelfTarget`].

use crate::engine::sampler::Sampler;
use crate::engine::Session;

use super::{draft_token, Draft, DraftError, Proposal, Target};

/// A target that can run itself restricted to what it holds in memory: what [`SelfDraft`]
/// needs of it.
pub trait SelfTarget: Target {
    /// Whether it holds neurons to draft from.
    fn can_self_draft(&self) -> bool;
    /// Runs `token` at the next position with each FFN restricted to the held neurons (no
    /// flash reads) and returns its logits; the position stays in the cache until truncated.
    fn draft_step(&mut self, token: u32) -> Result<&[f32], DraftError>;
    /// Starts or stops recording neuron activity for a draft chosen from the prompt.
    fn record_activity(&mut self, _on: bool) {}
    /// Holds each layer's `per_layer` neurons most active while recording; returns the bytes
    /// held beyond the window.
    fn load_draft_neurons(&mut self, _per_layer: usize) -> Result<usize, String> {
        Err(
            "this target drafts from its pinned neurons only, not from neurons chosen over \
             the prompt"
                .into(),
        )
    }
}

impl SelfTarget for Session<'_> {
    fn can_self_draft(&self) -> bool {
        Session::can_self_draft(self)
    }
    fn draft_step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(Session::draft_step(self, token)?)
    }
    fn record_activity(&mut self, on: bool) {
        Session::record_activity(self, on)
    }
    fn load_draft_neurons(&mut self, per_layer: usize) -> Result<usize, String> {
        Session::load_draft_neurons(self, per_layer)
    }
}

impl SelfTarget for crate::backend::gpu::GpuFlashDecoder<'_> {
    fn can_self_draft(&self) -> bool {
        crate::backend::gpu::GpuFlashDecoder::can_self_draft(self)
    }
    fn draft_step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(crate::backend::gpu::GpuFlashDecoder::draft_step(
            self, token,
        )?)
    }
}

pub struct SelfDraft {
    p_min: f64,
    /// Neurons per layer chosen from the prompt's activity, or `None` to draft from the
    /// window's pinned (globally hottest) neurons.
    prompt_neurons: Option<usize>,
    memory_bytes: usize,
}

impl SelfDraft {
    /// A self draft for `target` over its pinned neurons; errs when it pins none.
    pub fn new<T: SelfTarget + ?Sized>(target: &T, p_min: f64) -> Result<SelfDraft, DraftError> {
        if !target.can_self_draft() {
            return Err(DraftError::Setup(
                "a self draft computes each FFN from the neurons the target pins in memory, \
                 and this one pins none (a flash image under a memory budget, or on the GPU \
                 under a VRAM budget, has them); draft with n-grams or a draft model instead"
                    .into(),
            ));
        }
        Ok(SelfDraft {
            p_min,
            prompt_neurons: None,
            memory_bytes: 0,
        })
    }

    /// A self draft over each layer's `per_layer` neurons most active over the prompt, read
    /// into memory once after it (those the window pins are not copied).
    pub fn from_prompt(p_min: f64, per_layer: usize) -> SelfDraft {
        SelfDraft {
            p_min,
            prompt_neurons: Some(per_layer),
            memory_bytes: 0,
        }
    }
}

impl<T: SelfTarget + ?Sized> Draft<T> for SelfDraft {
    fn before_prompt(&mut self, target: &mut T) {
        if self.prompt_neurons.is_some() {
            target.record_activity(true);
        }
    }

    fn after_prompt(&mut self, target: &mut T, _prompt: &[u32]) -> Result<(), DraftError> {
        let Some(n) = self.prompt_neurons else {
            return Ok(());
        };
        self.memory_bytes = target.load_draft_neurons(n).map_err(DraftError::Setup)?;
        target.record_activity(false);
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    fn propose(
        &mut self,
        target: &mut T,
        history: &[u32],
        max: usize,
        sampler: &mut Sampler,
        out: &mut Proposal,
    ) -> Result<(), DraftError> {
        let Some(&last) = history.last() else {
            return Ok(());
        };
        let verified = target.position();
        let mut t = last;
        for _ in 0..max {
            let logits = target.draft_step(t)?;
            match draft_token(logits, sampler, self.p_min, out) {
                Some(next) => t = next,
                None => break,
            }
        }
        // The draft's keys and values were the restricted model's: the verify pass writes
        // the full model's over them.
        target.truncate(verified);
        Ok(())
    }
}
