//! Prompt lookup: the context's last `n` tokens, found earlier in the context, propose the
//! tokens that followed them there (llama.cpp's lookup; Saxena's prompt lookup decoding).
//! It costs no memory and no model work, and it is right often where text repeats: code
//! that names the same identifiers, edits of a given text, lists.

use crate::engine::sampler::Sampler;

use super::{Draft, DraftError, Proposal, Target};

/// Longest and shortest n-grams looked up, longest first: a longer match predicts better,
/// and a single repeated token is too weak a signal to pay for a verify pass.
const NGRAM_MAX: usize = 4;
const NGRAM_MIN: usize = 2;

/// How far back the lookup scans: enough for a long prompt, bounded so that a draft stays
/// far cheaper than a model step on a long context.
const LOOKBACK: usize = 8192;

#[derive(Default)]
pub struct NgramDraft;

impl NgramDraft {
    pub fn new() -> NgramDraft {
        NgramDraft
    }
}

impl<T: Target + ?Sized> Draft<T> for NgramDraft {
    fn propose(
        &mut self,
        _target: &mut T,
        history: &[u32],
        max: usize,
        _sampler: &mut Sampler,
        out: &mut Proposal,
    ) -> Result<(), DraftError> {
        out.tokens.extend(lookup(history, max));
        Ok(())
    }
}

/// Up to `max` tokens that followed the latest earlier occurrence of `history`'s longest
/// suffix of `NGRAM_MIN..=NGRAM_MAX` tokens; empty when none recurs.
pub fn lookup(history: &[u32], max: usize) -> &[u32] {
    let len = history.len();
    let start = len.saturating_sub(LOOKBACK);
    for n in (NGRAM_MIN..=NGRAM_MAX.min(len.saturating_sub(1))).rev() {
        let key = &history[len - n..];
        // Latest occurrence first, ending before the suffix itself.
        let found = (start..len - n).rev().find(|&i| &history[i..i + n] == key);
        if let Some(i) = found {
            let from = i + n;
            return &history[from..(from + max).min(len)];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn proposes_what_followed_the_latest_match() {
        // "a b c d ... a b" -> "c d"; the later "a b x" wins over the earlier "a b c".
        let h = [1, 2, 3, 4, 9, 1, 2, 7, 8, 1, 2];
        assert_eq!(lookup(&h, 2), &[7, 8]);
        assert_eq!(lookup(&h, 10), &[7, 8, 1, 2]);
    }

    #[test]
    fn prefers_the_longest_ngram() {
        // The 3-gram [5, 1, 2] occurred once (followed by 6); the 2-gram [1, 2] more recently
        // (followed by 3).
        let h = [5, 1, 2, 6, 0, 1, 2, 3, 5, 1, 2];
        assert_eq!(lookup(&h, 1), &[6]);
    }

    #[test]
    fn nothing_without_a_repeat() {
        assert!(lookup(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(lookup(&[], 4).is_empty());
        assert!(lookup(&[7], 4).is_empty());
        // A lone repeated token is not enough.
        assert!(lookup(&[7, 1, 8, 1], 4).is_empty());
    }
}
