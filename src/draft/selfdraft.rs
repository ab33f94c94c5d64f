//! Self-speculation from memory: the target model with each layer's FFN restricted to the
//! neurons its window pins, and the target's own attention over the verified cache
//! ([`Session::draft_step`]). Drafting reads nothing from flash (when the output head is
//! streamed, a resident head over the most frequent tokens stands in for it), so a verify
//! pass's reads are the only reads, shared by every token it accepts.

use crate::engine::sampler::Sampler;
use crate::engine::Session;

use super::{draft_token, Draft, DraftError, Proposal};

pub struct SelfDraft {
    p_min: f64,
    /// Neurons per layer chosen from the prompt's activity, or `None` to draft from the
    /// window's pinned (globally hottest) neurons.
    prompt_neurons: Option<usize>,
    memory_bytes: usize,
}

impl SelfDraft {
    /// A self draft for `target` over its pinned neurons; errs when it pins none.
    pub fn new(target: &Session, p_min: f64) -> Result<SelfDraft, DraftError> {
        if !target.can_self_draft() {
            return Err(DraftError::Setup(
                "a self draft computes each FFN from the neurons a memory budget pins in \
                 memory, and this session pins none (a flash image under a memory budget \
                 has them); draft with n-grams or a draft model instead"
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

impl<'w> Draft<Session<'w>> for SelfDraft {
    fn before_prompt(&mut self, target: &mut Session) {
        if self.prompt_neurons.is_some() {
            target.record_activity(true);
        }
    }

    fn after_prompt(&mut self, target: &mut Session, _prompt: &[u32]) -> Result<(), DraftError> {
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
        target: &mut Session,
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
