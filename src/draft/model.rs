//! A separate small model as the draft (e.g. Qwen2.5-Coder-0.5B for the 1.5B): resident, with
//! its own cache, kept in step with the verified history.

use crate::engine::sampler::Sampler;
use crate::engine::Session;
use crate::model::tokenizer::Tokenizer;

use super::{draft_token, Draft, DraftError, Proposal, Target};

pub struct ModelDraft<'m> {
    session: Session<'m>,
    /// The token at each position of the draft's cache.
    fed: Vec<u32>,
    p_min: f64,
    memory_bytes: usize,
}

impl<'m> ModelDraft<'m> {
    /// A draft decoding with `session`, whose model holds `memory_bytes`.
    pub fn new(session: Session<'m>, p_min: f64, memory_bytes: usize) -> ModelDraft<'m> {
        ModelDraft {
            session,
            fed: Vec::new(),
            p_min,
            memory_bytes,
        }
    }
}

impl<T: Target + ?Sized> Draft<T> for ModelDraft<'_> {
    /// The draft runs the prompt with the target, so that its cost counts as the prompt's.
    fn after_prompt(&mut self, _target: &mut T, prompt: &[u32]) -> Result<(), DraftError> {
        self.session.truncate(0);
        self.fed.clear();
        if !prompt.is_empty() {
            self.session.prefill(prompt)?;
            self.fed.extend_from_slice(prompt);
        }
        Ok(())
    }

    fn propose(
        &mut self,
        _target: &mut T,
        history: &[u32],
        max: usize,
        sampler: &mut Sampler,
        out: &mut Proposal,
    ) -> Result<(), DraftError> {
        let Some((&last, verified)) = history.split_last() else {
            return Ok(());
        };
        // Keep what the draft ran that is still history; run the rest of the history.
        let common = self
            .fed
            .iter()
            .zip(verified)
            .take_while(|(a, b)| a == b)
            .count();
        self.session.truncate(common);
        self.fed.truncate(common);
        // Leave room in the draft's cache for the tokens it drafts.
        let room = self.session.capacity().saturating_sub(history.len());
        let max = max.min(room);
        if max == 0 {
            return Ok(());
        }
        if common < verified.len() {
            self.session.prefill(&verified[common..])?;
            self.fed.extend_from_slice(&verified[common..]);
        }
        let mut t = last;
        for _ in 0..max {
            let logits = self.session.step(t, true)?;
            self.fed.push(t);
            match draft_token(logits, sampler, self.p_min, out) {
                Some(next) => t = next,
                None => break,
            }
        }
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }
}

/// Checks that a draft's tokenizer numbers every token as the target's does: speculation
/// compares token ids, so any difference would make the draft useless or, worse, silently
/// propose other text. Errs naming the first difference.
pub fn same_vocabulary(target: &Tokenizer, draft: &Tokenizer) -> Result<(), String> {
    let (n, m) = (target.vocab_size(), draft.vocab_size());
    if n != m {
        return Err(format!(
            "the draft model's vocabulary has {m} tokens and the target's {n}: a draft must \
             share the target's tokenizer (e.g. a smaller model of the same family)"
        ));
    }
    for id in 0..n as u32 {
        let (a, b) = (target.token_text(id), draft.token_text(id));
        if a != b {
            return Err(format!(
                "token {id} is {a:?} for the target and {b:?} for the draft model: a draft \
                 must share the target's tokenizer (e.g. a smaller model of the same family)"
            ));
        }
    }
    Ok(())
}
