//! Encoding: special-token partition, pre-tokenisation, and the BPE merges of each word.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::byte_level::bytes_to_unicode_cached;
use super::Tokenizer;

impl Tokenizer {
    /// Tokenises `text`. `add_special`: add BOS/EOS as the model says. `parse_special`:
    /// recognise control-token texts such as `<|im_start|>` (user-defined tokens are always
    /// recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        // llama.cpp's SPM path: a fragment gets a leading space (when the model asks for one)
        // at the start of the text and after a special token.
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match (frag, &self.spm) {
                (Frag::Token(id), _) => {
                    out.push(id);
                    prev_special = true;
                }
                (Frag::Text(s), Some(spm)) => {
                    self.encode_spm(spm, s, spm.add_space_prefix && prev_special, &mut out);
                    prev_special = false;
                }
                (Frag::Text(s), None) => self.encode_raw(s, &mut out),
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Splits `text` on special-token texts (llama.cpp's `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Frag<'a>> {
        let mut frags = vec![Frag::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for (st, id, control) in &self.specials {
            if *control && !parse_special {
                continue;
            }
            if !frags
                .iter()
                .any(|f| matches!(f, Frag::Text(s) if s.contains(st.as_str())))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Frag::Text(s) => {
                        let mut last = 0;
                        for (p, _) in s.match_indices(st.as_str()) {
                            if p > last {
                                next.push(Frag::Text(&s[last..p]));
                            }
                            next.push(Frag::Token(*id));
                            last = p + st.len();
                        }
                        if last < s.len() {
                            next.push(Frag::Text(&s[last..]));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    fn encode_raw(&self, text: &str, out: &mut Vec<u32>) {
        let n = self.tokens.len() as u32;
        let b2u = bytes_to_unicode_cached();
        let mut syms: Vec<Sym> = Vec::new();
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::new();
        let mut word_text = String::new();
        for range in self.pre.split(text) {
            let word = &text.as_bytes()[range];
            if self.ignore_merges {
                word_text.clear();
                word_text.extend(word.iter().map(|&b| b2u[b as usize]));
                if let Some(&id) = self.token_to_id.get(word_text.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            syms.clear();
            heap.clear();
            for (i, &b) in word.iter().enumerate() {
                syms.push(Sym {
                    id: self.byte_sym[b as usize],
                    prev: i.wrapping_sub(1),
                    next: i + 1,
                    alive: true,
                });
            }
            let len = syms.len();
            let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize, r: usize| {
                if l >= len || r >= len {
                    return;
                }
                if let Some(&(rank, _)) = self.merges.get(&(syms[l].id, syms[r].id)) {
                    heap.push(Reverse((rank, l, r)));
                }
            };
            for i in 1..len {
                push(&mut heap, &syms, i - 1, i);
            }
            while let Some(Reverse((rank, l, r))) = heap.pop() {
                if !syms[l].alive || !syms[r].alive || syms[l].next != r {
                    continue;
                }
                // An entry goes stale when a neighbour merged since it was pushed: the pair
                // now holds other symbols, whose own entry (with their rank) is in the heap.
                let Some(&(current, merged)) = self.merges.get(&(syms[l].id, syms[r].id)) else {
                    continue;
                };
                if current != rank {
                    continue;
                }
                syms[l].id = merged;
                syms[r].alive = false;
                let rn = syms[r].next;
                syms[l].next = rn;
                if rn < len {
                    syms[rn].prev = l;
                }
                let lp = syms[l].prev;
                push(&mut heap, &syms, lp, l);
                push(&mut heap, &syms, l, rn);
            }
            let mut i = 0;
            while i < len {
                let s = &syms[i];
                if s.id < n {
                    out.push(s.id);
                } else {
                    // Not in the vocabulary: llama.cpp's fallback to single-byte tokens of
                    // the symbol's (byte-level encoded) text.
                    let text = &self.extra[(s.id - n) as usize];
                    for b in text.bytes() {
                        let mut buf = [0u8; 4];
                        let one = (b as char).encode_utf8(&mut buf);
                        if b < 0x80 {
                            if let Some(&id) = self.token_to_id.get(&*one) {
                                out.push(id);
                            }
                        }
                    }
                }
                i = s.next;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sym {
    id: u32,
    /// usize::MAX when none
    prev: usize,
    /// len when none
    next: usize,
    alive: bool,
}

enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}
