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
}

impl SelfDraft {
    /// A self draft for `target`; errs when the target holds no neurons to draft from.
    pub fn new(target: &Session, p_min: f64) -> Result<SelfDraft, DraftError> {
        if !target.can_self_draft() {
            return Err(DraftError::Setup(
                "a self draft computes each FFN from the neurons a memory budget pins in \
                 memory, and this session pins none (a flash image under a memory budget \
                 has them); draft with n-grams or a draft model instead"
                    .into(),
            ));
        }
        Ok(SelfDraft { p_min })
    }
}

impl Draft for SelfDraft {
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
