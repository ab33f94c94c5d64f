//! SentencePiece-style tokenizer (`tokenizer.ggml.model = "llama"`: Gemma, Llama 2, Mistral
//! v0.1), reproducing llama.cpp's `llm_tokenizer_spm` token for token.
//!
//! Each raw fragment (after the special-token partition shared with BPE) has its spaces
//! replaced by `▁` (U+2581), optionally after a leading space (`add_space_prefix`, when the
//! fragment follows a special token or starts the text). It is split into UTF-8 characters;
//! adjacent symbols whose concatenation is a vocabulary token merge, highest token score first
//! (leftmost on ties), until no adjacent pair forms a token. A final symbol that is not a token
//! becomes the byte-fallback tokens `<0xXX>` of its bytes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Tokenizer;

/// What SentencePiece encoding needs beyond the shared vocabulary.
#[derive(Debug, Clone)]
pub(super) struct Spm {
    /// Per token: its score (a log-probability; higher merges first).
    pub scores: Vec<f32>,
    /// The `<0xXX>` token of each byte (or the byte's own one-character token, llama.cpp's
    /// fallback); `None` when the vocabulary has neither.
    pub byte_tokens: [Option<u32>; 256],
    /// Whether a fragment that starts the text or follows a special token gets a leading
    /// space (llama.cpp's default for SPM; Gemma's GGUF says false).
    pub add_space_prefix: bool,
}

/// `<0xXX>` for byte-fallback tokens.
pub(super) fn byte_token_text(b: u8) -> String {
    format!("<0x{b:02X}>")
}

/// The byte a `<0xXX>` token stands for.
pub(super) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// One symbol: `n` bytes of the escaped text from `start`; `n == 0` once merged into its left
/// neighbour. `prev`/`next` link the live symbols (`usize::MAX` = none).
struct Sym {
    start: usize,
    n: usize,
    prev: usize,
    next: usize,
}

/// A candidate merge of `left` and its right neighbour `right`, of `size` bytes.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

// llama.cpp's `llm_bigram_spm::comparator` (a max-heap): higher score first, then the smaller
// `left`.
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}

const NONE: usize = usize::MAX;

impl Tokenizer {
    /// Encodes one raw fragment the SentencePiece way; `prefix_space` is llama.cpp's
    /// `add_space_prefix && is_prev_special`.
    pub(super) fn encode_spm(&self, spm: &Spm, raw: &str, prefix_space: bool, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(raw.len() + 4);
        if prefix_space {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', "\u{2581}");
        let mut syms: Vec<Sym> = text
            .char_indices()
            .map(|(i, c)| Sym {
                start: i,
                n: c.len_utf8(),
                prev: NONE,
                next: NONE,
            })
            .collect();
        let len = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.prev = i.wrapping_sub(1);
            s.next = if i + 1 < len { i + 1 } else { NONE };
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
            if l == NONE || r == NONE {
                return;
            }
            let size = syms[l].n + syms[r].n;
            let piece = &text[syms[l].start..syms[l].start + size];
            if let Some(&id) = self.token_to_id.get(piece) {
                heap.push(Bigram {
                    score: spm.scores.get(id as usize).copied().unwrap_or(0.0),
                    left: l,
                    right: r,
                    size,
                });
            }
        };
        for i in 1..len {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Stale: one side merged since this entry was pushed.
            if syms[l].n == 0 || syms[r].n == 0 || syms[l].n + syms[r].n != b.size {
                continue;
            }
            syms[l].n += syms[r].n;
            syms[r].n = 0;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn != NONE {
                syms[rn].prev = l;
            }
            let lp = syms[l].prev;
            try_add(&mut heap, &syms, lp, l);
            try_add(&mut heap, &syms, l, rn);
        }
        // Every merged symbol is a token (a pair merges only when it is one), so llama.cpp's
        // `resegment` reduces to: the symbol's token, or the byte tokens of a lone character
        // the vocabulary lacks.
        let mut i = if len == 0 { NONE } else { 0 };
        while i != NONE {
            let s = &syms[i];
            let piece = &text[s.start..s.start + s.n];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| spm.byte_tokens[b as usize])),
            }
            i = s.next;
        }
    }
}
