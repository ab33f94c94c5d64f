//! Byte-level BPE tokenizer (GPT-2 family: SmolLM, Llama 3, Qwen2, GPT-2), reproducing
//! llama.cpp's `llm_tokenizer_bpe` token for token.
//!
//! Pipeline of [`Tokenizer::encode`], mirroring llama.cpp (`src/llama-vocab.cpp`,
//! `src/unicode.cpp`):
//! 1. **special tokens**: the text is partitioned on the texts of control / user-defined /
//!    unknown tokens, longest first (user-defined ones always; control and unknown ones only
//!    when `parse_special` is true), like `tokenizer_st_partition`;
//! 2. **pre-tokenisation** of each raw fragment into words, by hand-written matchers
//!    equivalent to the pre-tokenizer regexes (see [`PreTokenizer`]);
//! 3. **byte-level mapping**: each byte of a word becomes one symbol (the GPT-2
//!    `bytes_to_unicode` character of that byte);
//! 4. **BPE**: adjacent symbol pairs merge by merge rank, lowest rank first, leftmost first on
//!    ties (llama.cpp's priority queue), until no pair has a rank. With `ignore_merges`
//!    (llama3) a word that is itself in the vocabulary is taken whole. A final symbol that is
//!    not in the vocabulary falls back to the single-byte tokens of its text, as llama.cpp does;
//!    a byte with no token of its own is dropped, as there (SmolLM2's vocabulary has none for
//!    0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1, 0xf2), so `decode(encode(s))` is `s` less those
//!    bytes (the `tokenizer` fuzz target checks this, see docs/fuzzing.md).
//!
//! ## Unicode categories (the one approximation)
//! llama.cpp classifies code points with its own tables (generated from Python's
//! `unicodedata`): letter = general category L*, number = N*, whitespace = the White_Space
//! property. Here: number = [`char::is_numeric`] (exactly N*), whitespace =
//! [`char::is_whitespace`] (exactly White_Space), letter = [`char::is_alphabetic`] minus
//! numbers (which removes Nl) minus a table of the 234 ranges of Other_Alphabetic code points
//! that are marks (Mn/Mc) or symbols (So, e.g. circled letters) — so letter is exactly L* for
//! every code point assigned in Unicode 14. Differences remain only for code points that the
//! Unicode versions of Rust's std and of llama.cpp's tables disagree on, and for unassigned
//! code points, which llama.cpp's own matchers treat as "no category" (a one-character word)
//! and which are treated here as "other" (punctuation-like).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// ggml token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Errors building a tokenizer from model file data.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer model `{0}` is not supported: only byte-level BPE (`gpt2`, as in SmolLM, Llama 3, Qwen2, GPT-2) is implemented; sentencepiece (`llama`) models are not yet")]
    UnsupportedModel(String),
    #[error("unknown pre-tokenizer `{0}`: supported are smollm (and starcoder, refact, command-r, codeshell, exaone, minerva-7b), gpt2 (gpt-2, mpt, olmo, jais, phi-2, roberta-bpe, default), llama3 (llama-bpe, llama-v3, falcon3, dbrx, smaug-bpe, pixtral), qwen2 (stablelm2, deepseek-r1-qwen, hunyuan)")]
    UnknownPreTokenizer(String),
    #[error("the tokenizer vocabulary is empty: expected the token list (tokenizer.ggml.tokens or model.vocab)")]
    EmptyVocab,
    #[error("token type list has {types} entries but the vocabulary has {tokens} tokens: the file is inconsistent")]
    TokenTypesLength { types: usize, tokens: usize },
    #[error("{which} token id {id} is outside the vocabulary of {vocab} tokens")]
    SpecialIdOutOfRange {
        which: &'static str,
        id: u32,
        vocab: usize,
    },
    #[error("merge #{index} `{merge}` is not of the form `left right`")]
    BadMerge { index: usize, merge: String },
    #[error("tokenizer.json is not valid JSON: {0}")]
    Json(String),
    #[error("tokenizer.json: {0}")]
    HfFormat(String),
}

/// What a model file says about its tokenizer (filled by the GGUF loader from
/// `tokenizer.ggml.*` keys, or from HF `tokenizer.json` + `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerSpec {
    /// `"gpt2"` (byte-level BPE). `"llama"` (sentencepiece) is refused for now.
    pub model: String,
    /// `tokenizer.ggml.pre`: "smollm", "llama3"/"llama-bpe", "qwen2", "gpt2", "default", ...
    pub pre: String,
    /// Byte-level encoded token strings (GPT-2 `bytes_to_unicode` mapping); control and
    /// user-defined tokens hold their raw text.
    pub tokens: Vec<String>,
    /// ggml token types (see [`token_type`]); empty = all normal.
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in priority order.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The pre-tokenizers (word splitters) that are implemented, each the equivalent of
/// llama.cpp's regex list for that `tokenizer.ggml.pre` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `\p{N}` (each digit alone), then the GPT-2 expression on the rest (SmolLM, StarCoder).
    Smollm,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// As [`PreTokenizer::Llama3`] with `\p{N}` (single digits) instead of `\p{N}{1,3}`.
    Qwen2,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` name to a pre-tokenizer (llama.cpp's aliases).
    pub fn from_name(name: &str) -> Result<PreTokenizer, TokenizerError> {
        Ok(match name {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreTokenizer::Smollm,
            "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "phi-2" | "roberta-bpe" | "jina-es"
            | "jina-de" | "gigachat" | "jina-v2-code" | "trillion" | "granite-docling" => {
                PreTokenizer::Gpt2
            }
            // llama.cpp's "default" list also splits \p{P} runs and 3-digit groups; that is
            // not reproduced, the GPT-2 expression is used.
            "default" | "" => {
                log::warn!(
                    "tokenizer pre-type `{name}`: using the GPT-2 pre-tokenizer (llama.cpp's \
                     `default` list is approximated)"
                );
                PreTokenizer::Gpt2
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "dbrx"
            | "smaug-bpe" | "pixtral" | "midm-2.0" | "lfm2" | "chatglm-bpe" => PreTokenizer::Llama3,
            "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "hunyuan" | "kormo" | "grok-2" => {
                PreTokenizer::Qwen2
            }
            other => return Err(TokenizerError::UnknownPreTokenizer(other.to_string())),
        })
    }

    /// Splits `text` into words (byte ranges, in order, covering the whole text).
    pub fn split(self, text: &str) -> Vec<std::ops::Range<usize>> {
        let mut cps: Vec<char> = Vec::with_capacity(text.len());
        let mut offs: Vec<usize> = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            cps.push(c);
            offs.push(i);
        }
        offs.push(text.len());
        let cats: Vec<Cat> = cps.iter().map(|&c| Cat::of(c)).collect();
        let mut ends: Vec<usize> = Vec::new();
        let n = cps.len();
        match self {
            PreTokenizer::Gpt2 => split_gpt2(&cps, &cats, 0, n, &mut ends),
            PreTokenizer::Smollm => {
                let mut start = 0;
                for i in 0..n {
                    if cats[i] == Cat::Number {
                        if start < i {
                            split_gpt2(&cps, &cats, start, i, &mut ends);
                        }
                        ends.push(i + 1);
                        start = i + 1;
                    }
                }
                if start < n {
                    split_gpt2(&cps, &cats, start, n, &mut ends);
                }
            }
            PreTokenizer::Llama3 => split_llama3(&cps, &cats, 0, n, 3, &mut ends),
            PreTokenizer::Qwen2 => split_llama3(&cps, &cats, 0, n, 1, &mut ends),
        }
        let mut out = Vec::with_capacity(ends.len());
        let mut prev = 0;
        for e in ends {
            if e > prev {
                out.push(offs[prev]..offs[e]);
                prev = e;
            }
        }
        out
    }
}

/// Coarse unicode category of a code point, as llama.cpp's matchers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cat {
    Letter,
    Number,
    Space,
    Other,
    /// Outside the fragment being split (llama.cpp's sentinel).
    Out,
}

impl Cat {
    fn of(c: char) -> Cat {
        if c.is_ascii() {
            return if c.is_ascii_alphabetic() {
                Cat::Letter
            } else if c.is_ascii_digit() {
                Cat::Number
            } else if matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r') {
                Cat::Space
            } else {
                Cat::Other
            };
        }
        if c.is_whitespace() {
            Cat::Space
        } else if c.is_numeric() {
            Cat::Number
        } else if c.is_alphabetic() && !is_alphabetic_non_letter(c) {
            Cat::Letter
        } else {
            Cat::Other
        }
    }
    fn is_ws(self) -> bool {
        self == Cat::Space
    }
}

fn is_alphabetic_non_letter(c: char) -> bool {
    let cp = c as u32;
    ALPHABETIC_NON_LETTER
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Code points that are `Alphabetic` but not of general category L (Other_Alphabetic marks
/// Mn/Mc, and So such as circled letters), from Unicode 14 `unicodedata`.
#[rustfmt::skip]
static ALPHABETIC_NON_LETTER: &[(u32, u32)] = &[
    (0x345, 0x345), (0x363, 0x36F), (0x5B0, 0x5BD), (0x5BF, 0x5BF), (0x5C1, 0x5C2), (0x5C4, 0x5C5),
    (0x5C7, 0x5C7), (0x610, 0x61A), (0x64B, 0x657), (0x659, 0x65F), (0x670, 0x670), (0x6D6, 0x6DC),
    (0x6E1, 0x6E4), (0x6E7, 0x6E8), (0x6ED, 0x6ED), (0x711, 0x711), (0x730, 0x73F), (0x7A6, 0x7B0),
    (0x816, 0x817), (0x81B, 0x823), (0x825, 0x827), (0x829, 0x82C), (0x8D4, 0x8DF), (0x8E3, 0x8E9),
    (0x8F0, 0x903), (0x93A, 0x93B), (0x93E, 0x94C), (0x94E, 0x94F), (0x955, 0x957), (0x962, 0x963),
    (0x981, 0x983), (0x9BE, 0x9C4), (0x9C7, 0x9C8), (0x9CB, 0x9CC), (0x9D7, 0x9D7), (0x9E2, 0x9E3),
    (0xA01, 0xA03), (0xA3E, 0xA42), (0xA47, 0xA48), (0xA4B, 0xA4C), (0xA51, 0xA51), (0xA70, 0xA71),
    (0xA75, 0xA75), (0xA81, 0xA83), (0xABE, 0xAC5), (0xAC7, 0xAC9), (0xACB, 0xACC), (0xAE2, 0xAE3),
    (0xAFA, 0xAFC), (0xB01, 0xB03), (0xB3E, 0xB44), (0xB47, 0xB48), (0xB4B, 0xB4C), (0xB56, 0xB57),
    (0xB62, 0xB63), (0xB82, 0xB82), (0xBBE, 0xBC2), (0xBC6, 0xBC8), (0xBCA, 0xBCC), (0xBD7, 0xBD7),
    (0xC00, 0xC04), (0xC3E, 0xC44), (0xC46, 0xC48), (0xC4A, 0xC4C), (0xC55, 0xC56), (0xC62, 0xC63),
    (0xC81, 0xC83), (0xCBE, 0xCC4), (0xCC6, 0xCC8), (0xCCA, 0xCCC), (0xCD5, 0xCD6), (0xCE2, 0xCE3),
    (0xD00, 0xD03), (0xD3E, 0xD44), (0xD46, 0xD48), (0xD4A, 0xD4C), (0xD57, 0xD57), (0xD62, 0xD63),
    (0xD81, 0xD83), (0xDCF, 0xDD4), (0xDD6, 0xDD6), (0xDD8, 0xDDF), (0xDF2, 0xDF3), (0xE31, 0xE31),
    (0xE34, 0xE3A), (0xE4D, 0xE4D), (0xEB1, 0xEB1), (0xEB4, 0xEB9), (0xEBB, 0xEBC), (0xECD, 0xECD),
    (0xF71, 0xF83), (0xF8D, 0xF97), (0xF99, 0xFBC), (0x102B, 0x1036), (0x1038, 0x1038),
    (0x103B, 0x103E), (0x1056, 0x1059), (0x105E, 0x1060), (0x1062, 0x1064), (0x1067, 0x106D),
    (0x1071, 0x1074), (0x1082, 0x108D), (0x108F, 0x108F), (0x109A, 0x109D), (0x1712, 0x1713),
    (0x1732, 0x1733), (0x1752, 0x1753), (0x1772, 0x1773), (0x17B6, 0x17C8), (0x1885, 0x1886),
    (0x18A9, 0x18A9), (0x1920, 0x192B), (0x1930, 0x1938), (0x1A17, 0x1A1B), (0x1A55, 0x1A5E),
    (0x1A61, 0x1A74), (0x1ABF, 0x1AC0), (0x1ACC, 0x1ACE), (0x1B00, 0x1B04), (0x1B35, 0x1B43),
    (0x1B80, 0x1B82), (0x1BA1, 0x1BA9), (0x1BAC, 0x1BAD), (0x1BE7, 0x1BF1), (0x1C24, 0x1C36),
    (0x1DD3, 0x1DF4), (0x24B6, 0x24E9), (0x2DE0, 0x2DFF), (0xA674, 0xA67B), (0xA69E, 0xA69F),
    (0xA802, 0xA802), (0xA80B, 0xA80B), (0xA823, 0xA827), (0xA880, 0xA881), (0xA8B4, 0xA8C3),
    (0xA8C5, 0xA8C5), (0xA8FF, 0xA8FF), (0xA926, 0xA92A), (0xA947, 0xA952), (0xA980, 0xA983),
    (0xA9B4, 0xA9BF), (0xA9E5, 0xA9E5), (0xAA29, 0xAA36), (0xAA43, 0xAA43), (0xAA4C, 0xAA4D),
    (0xAA7B, 0xAA7D), (0xAAB0, 0xAAB0), (0xAAB2, 0xAAB4), (0xAAB7, 0xAAB8), (0xAABE, 0xAABE),
    (0xAAEB, 0xAAEF), (0xAAF5, 0xAAF5), (0xABE3, 0xABEA), (0xFB1E, 0xFB1E), (0x10376, 0x1037A),
    (0x10A01, 0x10A03), (0x10A05, 0x10A06), (0x10A0C, 0x10A0F), (0x10D24, 0x10D27),
    (0x10EAB, 0x10EAC), (0x11000, 0x11002), (0x11038, 0x11045), (0x11073, 0x11074),
    (0x11080, 0x11082), (0x110B0, 0x110B8), (0x110C2, 0x110C2), (0x11100, 0x11102),
    (0x11127, 0x11132), (0x11145, 0x11146), (0x11180, 0x11182), (0x111B3, 0x111BF),
    (0x111CE, 0x111CF), (0x1122C, 0x11234), (0x11237, 0x11237), (0x1123E, 0x1123E),
    (0x112DF, 0x112E8), (0x11300, 0x11303), (0x1133E, 0x11344), (0x11347, 0x11348),
    (0x1134B, 0x1134C), (0x11357, 0x11357), (0x11362, 0x11363), (0x11435, 0x11441),
    (0x11443, 0x11445), (0x114B0, 0x114C1), (0x115AF, 0x115B5), (0x115B8, 0x115BE),
    (0x115DC, 0x115DD), (0x11630, 0x1163E), (0x11640, 0x11640), (0x116AB, 0x116B5),
    (0x1171D, 0x1172A), (0x1182C, 0x11838), (0x11930, 0x11935), (0x11937, 0x11938),
    (0x1193B, 0x1193C), (0x11940, 0x11940), (0x11942, 0x11942), (0x119D1, 0x119D7),
    (0x119DA, 0x119DF), (0x119E4, 0x119E4), (0x11A01, 0x11A0A), (0x11A35, 0x11A39),
    (0x11A3B, 0x11A3E), (0x11A51, 0x11A5B), (0x11A8A, 0x11A97), (0x11C2F, 0x11C36),
    (0x11C38, 0x11C3E), (0x11C92, 0x11CA7), (0x11CA9, 0x11CB6), (0x11D31, 0x11D36),
    (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D), (0x11D3F, 0x11D41), (0x11D43, 0x11D43),
    (0x11D47, 0x11D47), (0x11D8A, 0x11D8E), (0x11D90, 0x11D91), (0x11D93, 0x11D96),
    (0x11EF3, 0x11EF6), (0x16F4F, 0x16F4F), (0x16F51, 0x16F87), (0x16F8F, 0x16F92),
    (0x16FF0, 0x16FF1), (0x1BC9E, 0x1BC9E), (0x1E000, 0x1E006), (0x1E008, 0x1E018),
    (0x1E01B, 0x1E021), (0x1E023, 0x1E024), (0x1E026, 0x1E02A), (0x1E947, 0x1E947),
    (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189),
];

/// llama.cpp's `unicode_regex_split_custom_gpt2` on the char range `[ini, end)`; pushes word
/// end positions (char indices) into `ends`.
fn split_gpt2(cps: &[char], cats: &[Cat], ini: usize, end: usize, ends: &mut Vec<usize>) {
    let cpt = |p: usize| {
        if p >= ini && p < end {
            Some(cps[p])
        } else {
            None
        }
    };
    let cat = |p: usize| {
        if p >= ini && p < end {
            cats[p]
        } else {
            Cat::Out
        }
    };
    let mut pos = ini;
    while pos < end {
        let c = cps[pos];
        let ct = cats[pos];
        // 's|'t|'re|'ve|'m|'ll|'d
        if c == '\'' && pos + 1 < end {
            let n1 = cps[pos + 1];
            if matches!(n1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                ends.push(pos);
                continue;
            }
            if pos + 2 < end {
                let n2 = cps[pos + 2];
                if matches!((n1, n2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    ends.push(pos);
                    continue;
                }
            }
        }
        let mut c2 = if c == ' ' { cat(pos + 1) } else { ct };
        // ' ?\p{L}+' and ' ?\p{N}+'
        if c2 == Cat::Letter || c2 == Cat::Number {
            let want = c2;
            pos += (c == ' ') as usize;
            while c2 == want {
                pos += 1;
                c2 = cat(pos);
            }
            ends.push(pos);
            continue;
        }
        // ' ?[^\s\p{L}\p{N}]+'
        if c2 == Cat::Other {
            pos += (c == ' ') as usize;
            while c2 == Cat::Other {
                pos += 1;
                c2 = cat(pos);
            }
            ends.push(pos);
            continue;
        }
        let mut nws = 0;
        while cat(pos + nws).is_ws() {
            nws += 1;
        }
        // '\s+(?!\S)'
        if nws > 1 && cpt(pos + nws).is_some() {
            pos += nws - 1;
            ends.push(pos);
            continue;
        }
        // '\s+'
        if nws > 0 {
            pos += nws;
            ends.push(pos);
            continue;
        }
        pos += 1;
        ends.push(pos);
    }
}

/// llama.cpp's `unicode_regex_split_custom_llama3` on `[ini, end)`, with digit runs cut every
/// `max_digits` (3 for llama3, 1 for qwen2).
fn split_llama3(
    cps: &[char],
    cats: &[Cat],
    ini: usize,
    end: usize,
    max_digits: usize,
    ends: &mut Vec<usize>,
) {
    let cpt = |p: usize| {
        if p >= ini && p < end {
            Some(cps[p])
        } else {
            None
        }
    };
    let cat = |p: usize| {
        if p >= ini && p < end {
            cats[p]
        } else {
            Cat::Out
        }
    };
    let mut pos = ini;
    while pos < end {
        let c = cps[pos];
        let ct = cats[pos];
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' && pos + 1 < end {
            let n1 = cps[pos + 1].to_ascii_lowercase();
            if matches!(n1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                ends.push(pos);
                continue;
            }
            if pos + 2 < end {
                let n2 = cps[pos + 2].to_ascii_lowercase();
                if matches!((n1, n2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    ends.push(pos);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || ct == Cat::Number)
            && (ct == Cat::Letter || cat(pos + 1) == Cat::Letter)
        {
            pos += 1;
            while cat(pos) == Cat::Letter {
                pos += 1;
            }
            ends.push(pos);
            continue;
        }
        // \p{N}{1,max}
        if ct == Cat::Number {
            let mut run_start = pos;
            while cat(pos) == Cat::Number {
                pos += 1;
                if pos - run_start >= max_digits {
                    ends.push(pos);
                    run_start = pos;
                }
            }
            ends.push(pos);
            continue;
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        let mut c2 = if c == ' ' { cat(pos + 1) } else { ct };
        if c2 == Cat::Other {
            pos += (c == ' ') as usize;
            while c2 == Cat::Other {
                pos += 1;
                c2 = cat(pos);
            }
            while matches!(cpt(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            ends.push(pos);
            continue;
        }
        let mut nws = 0;
        let mut last_nl_end = 0;
        while cat(pos + nws).is_ws() {
            if matches!(cps[pos + nws], '\r' | '\n') {
                last_nl_end = pos + nws + 1;
            }
            nws += 1;
        }
        // \s*[\r\n]+
        if last_nl_end > 0 {
            pos = last_nl_end;
            ends.push(pos);
            continue;
        }
        // \s+(?!\S)
        if nws > 1 && cpt(pos + nws).is_some() {
            pos += nws - 1;
            ends.push(pos);
            continue;
        }
        // \s+
        if nws > 0 {
            pos += nws;
            ends.push(pos);
            continue;
        }
        pos += 1;
        ends.push(pos);
    }
}

/// GPT-2's `bytes_to_unicode`: the printable character that stands for each byte.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // cp < 0x144, always a valid scalar value.
        table[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// The inverse of [`bytes_to_unicode`]: the byte a character stands for, if any.
fn unicode_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        // the n-th non-printable byte, in increasing byte order: 0x00..=0x20 (33 bytes),
        // 0x7F..=0xA0 (34 bytes), 0xAD
        0x100..=0x120 => Some((cp - 0x100) as u8),
        0x121..=0x142 => Some((cp - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

/// Texts llama.cpp treats as end of generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts llama.cpp takes as the end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<|end▁of▁sentence|>",
];

/// A byte-level BPE tokenizer. Cheap to share (`&Tokenizer` is `Sync`); encoding allocates
/// only per call.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pre: PreTokenizer,
    tokens: Vec<String>,
    types: Vec<i32>,
    token_to_id: HashMap<String, u32>,
    /// Symbol id (vocabulary id, or a synthetic id >= vocab size for a merge result that is
    /// not in the vocabulary) of each byte.
    byte_sym: [u32; 256],
    /// Texts of synthetic symbols, id = vocab size + index.
    extra: Vec<String>,
    /// (left, right) -> (rank, merged symbol)
    merges: HashMap<(u32, u32), (u32, u32)>,
    ignore_merges: bool,
    /// (text, id, is_control_or_unknown), longest text first.
    specials: Vec<(String, u32, bool)>,
    /// Decoded bytes of every token: `bytes[offs[i]..offs[i+1]]`.
    bytes: Vec<u8>,
    offs: Vec<usize>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
}

impl Tokenizer {
    /// Builds a tokenizer from what a model file says; checks everything it is given.
    pub fn new(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        Self::build(spec, None)
    }

    fn build(
        spec: TokenizerSpec,
        ignore_merges: Option<bool>,
    ) -> Result<Tokenizer, TokenizerError> {
        match spec.model.as_str() {
            "gpt2" => {}
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        }
        let pre = PreTokenizer::from_name(&spec.pre)?;
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize / 2 {
            return Err(TokenizerError::HfFormat(format!(
                "vocabulary of {n} tokens is too large"
            )));
        }
        let types = if spec.token_types.is_empty() {
            vec![token_type::NORMAL; n]
        } else if spec.token_types.len() != n {
            return Err(TokenizerError::TokenTypesLength {
                types: spec.token_types.len(),
                tokens: n,
            });
        } else {
            spec.token_types
        };
        for (which, id) in [
            ("BOS", spec.bos),
            ("EOS", spec.eos),
            ("EOT", spec.eot),
            ("padding", spec.pad),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialIdOutOfRange {
                        which,
                        id,
                        vocab: n,
                    });
                }
            }
        }
        let tokens = spec.tokens;
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // llama.cpp: a later duplicate wins.
            token_to_id.insert(t.clone(), i as u32);
        }

        // Symbols and merges.
        let mut extra: Vec<String> = Vec::new();
        let mut extra_ids: HashMap<String, u32> = HashMap::new();
        let mut sym = |s: &str, extra: &mut Vec<String>| -> u32 {
            if let Some(&id) = token_to_id.get(s) {
                return id;
            }
            if let Some(&id) = extra_ids.get(s) {
                return id;
            }
            let id = (n + extra.len()) as u32;
            extra.push(s.to_string());
            extra_ids.insert(s.to_string(), id);
            id
        };
        let b2u = bytes_to_unicode();
        let mut byte_sym = [0u32; 256];
        let mut buf = [0u8; 4];
        for b in 0..256 {
            byte_sym[b] = sym(b2u[b].encode_utf8(&mut buf), &mut extra);
        }
        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            // llama.cpp: split at the first space after the first byte.
            let split = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1);
            let Some(p) = split else {
                return Err(TokenizerError::BadMerge {
                    index: rank,
                    merge: m.clone(),
                });
            };
            let (l, r) = (&m[..p], &m[p + 1..]);
            let li = sym(l, &mut extra);
            let ri = sym(r, &mut extra);
            let mi = sym(&format!("{l}{r}"), &mut extra);
            merges.entry((li, ri)).or_insert((rank as u32, mi));
        }

        // Special tokens, longest first.
        let mut specials: Vec<(String, u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|&(i, &t)| {
                matches!(
                    t,
                    token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                ) && !tokens[i].is_empty()
            })
            .map(|(i, &t)| (tokens[i].clone(), i as u32, t != token_type::USER_DEFINED))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        // Decoded bytes.
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offs = Vec::with_capacity(n + 1);
        offs.push(0);
        for (t, &ty) in tokens.iter().zip(types.iter()) {
            if matches!(
                ty,
                token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
            ) {
                bytes.extend_from_slice(t.as_bytes());
            } else {
                for c in t.chars() {
                    match unicode_to_byte(c) {
                        Some(b) => bytes.push(b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                    }
                }
            }
            offs.push(bytes.len());
        }

        let find = |texts: &[&str]| texts.iter().find_map(|t| token_to_id.get(*t).copied());
        let eot = spec.eot.or_else(|| find(EOT_TEXTS));
        let mut eog: Vec<u32> = [spec.eos, eot].into_iter().flatten().collect();
        eog.extend(
            EOG_TEXTS
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied()),
        );
        eog.sort_unstable();
        eog.dedup();

        let mut add_bos = spec.add_bos;
        if add_bos && spec.bos.is_none() {
            log::warn!("tokenizer says to add a BOS token but names none; not adding one");
            add_bos = false;
        }
        let mut add_eos = spec.add_eos;
        if add_eos && spec.eos.is_none() {
            log::warn!("tokenizer says to add an EOS token but names none; not adding one");
            add_eos = false;
        }
        Ok(Tokenizer {
            pre,
            tokens,
            types,
            token_to_id,
            byte_sym,
            extra,
            merges,
            ignore_merges: ignore_merges.unwrap_or(pre == PreTokenizer::Llama3),
            specials,
            bytes,
            offs,
            bos: spec.bos,
            eos: spec.eos,
            eot,
            pad: spec.pad,
            add_bos,
            add_eos,
            eog,
        })
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json` of a byte-level BPE model
    /// (and optionally `tokenizer_config.json`, for BOS/EOS/padding and `add_bos_token`).
    pub fn from_hf_json(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Tokenizer, TokenizerError> {
        use serde_json::Value;
        let fmt = |s: String| TokenizerError::HfFormat(s);
        let root: Value = serde_json::from_str(tokenizer_json)
            .map_err(|e| TokenizerError::Json(e.to_string()))?;
        let config: Option<Value> = match tokenizer_config_json {
            Some(s) => Some(
                serde_json::from_str(s)
                    .map_err(|e| TokenizerError::Json(format!("tokenizer_config.json: {e}")))?,
            ),
            None => None,
        };
        let model = root
            .get("model")
            .ok_or_else(|| fmt("no `model` section; expected a tokenizers-library file".into()))?;
        let mtype = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if mtype != "BPE" {
            return Err(TokenizerError::UnsupportedModel(format!(
                "{mtype} (tokenizer.json)"
            )));
        }
        if model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
            || !contains_type(&root, "ByteLevel")
        {
            return Err(TokenizerError::UnsupportedModel(
                "BPE without a ByteLevel pre-tokenizer/decoder (sentencepiece-style, tokenizer.json)".into(),
            ));
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| fmt("`model.vocab` is missing or not an object".into()))?;
        let mut pairs: Vec<(String, u32)> = Vec::with_capacity(vocab.len());
        for (k, v) in vocab {
            let id = v.as_u64().filter(|&id| id < (1 << 24)).ok_or_else(|| {
                fmt(format!(
                    "vocab entry `{k}` has id {v}, expected an integer below 2^24"
                ))
            })?;
            pairs.push((k.clone(), id as u32));
        }
        let mut added: Vec<(String, u32, bool)> = Vec::new();
        if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let content = t.get("content").and_then(Value::as_str);
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .filter(|&id| id < (1 << 24));
                let (Some(content), Some(id)) = (content, id) else {
                    return Err(fmt(format!(
                        "added token {t} lacks `content` or a valid `id`"
                    )));
                };
                let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                added.push((content.to_string(), id as u32, special));
            }
        }
        let size = pairs
            .iter()
            .map(|p| p.1)
            .chain(added.iter().map(|a| a.1))
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut tokens = vec![String::new(); size];
        let mut types = vec![token_type::UNUSED; size];
        for (k, id) in pairs {
            tokens[id as usize] = k;
            types[id as usize] = token_type::NORMAL;
        }
        for (content, id, special) in &added {
            tokens[*id as usize] = content.clone();
            types[*id as usize] = if *special {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
        }
        let mut merges = Vec::new();
        if let Some(list) = model.get("merges").and_then(Value::as_array) {
            for (i, m) in list.iter().enumerate() {
                match m {
                    Value::String(s) => merges.push(s.clone()),
                    Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                        (Some(l), Some(r)) => merges.push(format!("{l} {r}")),
                        _ => return Err(fmt(format!("merge #{i} {m} is not a pair of strings"))),
                    },
                    _ => return Err(fmt(format!("merge #{i} {m} is neither \"a b\" nor [a, b]"))),
                }
            }
        }
        let pre = detect_hf_pre(root.get("pre_tokenizer").unwrap_or(&Value::Null));
        let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool);

        let id_of = |v: Option<&Value>| -> Option<u32> {
            let v = v?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            tokens.iter().position(|t| t == text).map(|p| p as u32)
        };
        let cfg = config.as_ref();
        let mut bos = id_of(cfg.and_then(|c| c.get("bos_token")));
        let eos = id_of(cfg.and_then(|c| c.get("eos_token")));
        let pad = id_of(cfg.and_then(|c| c.get("pad_token")));
        // Without add_bos_token, a TemplateProcessing post-processor that starts with a
        // special token adds it.
        let post_first = root
            .get("post_processor")
            .and_then(|p| find_template_single(p))
            .and_then(|single| single.first().cloned())
            .and_then(|first| {
                first
                    .get("SpecialToken")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                    .map(String::from)
            });
        let add_bos = match cfg
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
        {
            Some(b) => b,
            None => match post_first {
                Some(text) => {
                    if bos.is_none() {
                        bos = tokens.iter().position(|t| *t == text).map(|p| p as u32);
                    }
                    bos.is_some()
                }
                None => false,
            },
        };
        let add_eos = cfg
            .and_then(|c| c.get("add_eos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: pre.to_string(),
            tokens,
            token_types: types,
            merges,
            bos,
            eos,
            eot: None,
            pad,
            add_bos,
            add_eos,
        };
        Self::build(spec, ignore_merges.map(|b| b || pre == "llama3"))
    }

    /// Tokenises `text`. `add_special`: add BOS/EOS as the model says. `parse_special`:
    /// recognise control-token texts such as `<|im_start|>` (user-defined tokens are always
    /// recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        for frag in self.partition(text, parse_special) {
            match frag {
                Frag::Token(id) => out.push(id),
                Frag::Text(s) => self.encode_raw(s, &mut out),
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

    /// Decodes to text (lossy UTF-8); control, unknown and unused tokens are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if self.renders(id) {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether [`Tokenizer::decode`] renders this token (not control / unknown / unused).
    pub fn renders(&self, id: u32) -> bool {
        matches!(
            self.types.get(id as usize),
            Some(&(token_type::NORMAL | token_type::USER_DEFINED | token_type::BYTE))
        )
    }

    /// The raw bytes of one token (byte-level decoded; control and user-defined tokens give
    /// their text). Empty for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offs.len() {
            return &[];
        }
        &self.bytes[self.offs[i]..self.offs[i + 1]]
    }

    /// The token's string as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The token id of a vocabulary string, if any.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The ggml type of a token ([`token_type`]); `None` outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.types.get(id as usize).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// End of generation: EOS, EOT, and the tokens llama.cpp treats as such
    /// (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<|end_of_text|>`, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
}

fn bytes_to_unicode_cached() -> &'static [char; 256] {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(bytes_to_unicode)
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

fn contains_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("type").and_then(|t| t.as_str()) == Some(ty)
                || m.values().any(|x| contains_type(x, ty))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| contains_type(x, ty)),
        _ => false,
    }
}

fn collect_pre(v: &serde_json::Value, patterns: &mut Vec<String>, digits: &mut bool) {
    match v {
        serde_json::Value::Object(m) => {
            match m.get("type").and_then(|t| t.as_str()) {
                Some("Split") => {
                    if let Some(p) = m.get("pattern") {
                        if let Some(s) = p
                            .get("Regex")
                            .or_else(|| p.get("String"))
                            .and_then(|s| s.as_str())
                        {
                            patterns.push(s.to_string());
                        }
                    }
                }
                Some("Digits")
                    if m.get("individual_digits").and_then(|b| b.as_bool()) == Some(true) =>
                {
                    *digits = true;
                }
                _ => {}
            }
            for x in m.values() {
                collect_pre(x, patterns, digits);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_pre(x, patterns, digits)),
        _ => {}
    }
}

/// Maps an HF pre-tokenizer section to one of ours (by its Split regex, else Digits + ByteLevel).
fn detect_hf_pre(pre: &serde_json::Value) -> &'static str {
    let mut patterns = Vec::new();
    let mut digits = false;
    collect_pre(pre, &mut patterns, &mut digits);
    for p in &patterns {
        if p.contains(r"\p{N}{1,3}") && p.contains(r"[^\r\n\p{L}\p{N}]?\p{L}+") {
            return "llama3";
        }
        if p.contains(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|") {
            return "qwen2";
        }
        if p.contains(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+") {
            return if digits { "smollm" } else { "gpt2" };
        }
    }
    if let Some(p) = patterns.first() {
        log::warn!("tokenizer.json: unrecognised pre-tokenizer pattern `{p}`; using the GPT-2 one");
    }
    if digits {
        "smollm"
    } else {
        "gpt2"
    }
}

fn find_template_single(p: &serde_json::Value) -> Option<&Vec<serde_json::Value>> {
    match p.get("type").and_then(|t| t.as_str()) {
        Some("TemplateProcessing") => p.get("single").and_then(|s| s.as_array()),
        Some("Sequence") => p
            .get("processors")
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().find_map(find_template_single)),
        _ => None,
    }
}

/// Joins token bytes into valid UTF-8 text as tokens stream in, holding back an incomplete
/// trailing sequence. Skips the tokens [`Tokenizer::decode`] skips, so the concatenation of
/// all `push` results and `finish` equals `decode` of the whole sequence.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if !tok.renders(id) {
            return String::new();
        }
        self.pending.extend_from_slice(tok.token_bytes(id));
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // valid_up_to bytes are valid UTF-8 by contract.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    start += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += bad;
                        }
                        None => break, // incomplete sequence at the end: hold it back
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Flushes what is held back (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 byte symbols (id = byte) plus a few merges and specials.
    fn tiny(pre: &str) -> Tokenizer {
        let b2u = bytes_to_unicode();
        let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
        let merges = [
            "Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l",
            "Ġworl d",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut token_types = vec![token_type::NORMAL; tokens.len()];
        for (t, ty) in [
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<|endoftext|>", 3),
            ("<tool>", 4),
        ] {
            tokens.push(t.to_string());
            token_types.push(ty);
        }
        let n = tokens.len() as u32;
        Tokenizer::new(TokenizerSpec {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens,
            token_types,
            merges: merges.iter().map(|s| s.to_string()).collect(),
            bos: Some(n - 4),
            eos: Some(n - 3),
            add_bos: true,
            ..Default::default()
        })
        .unwrap()
    }

    fn split(pre: PreTokenizer, s: &str) -> Vec<&str> {
        pre.split(s).into_iter().map(|r| &s[r]).collect()
    }

    #[test]
    fn bytes_to_unicode_is_a_bijection_onto_printables() {
        let t = bytes_to_unicode();
        let mut seen = std::collections::HashSet::new();
        for (b, &c) in t.iter().enumerate() {
            assert!(seen.insert(c), "duplicate {c:?}");
            assert!(
                !c.is_whitespace() && !c.is_control(),
                "byte {b} maps to {c:?}"
            );
            assert_eq!(unicode_to_byte(c), Some(b as u8));
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        assert_eq!(unicode_to_byte('€'), None);
    }

    #[test]
    fn unicode_categories() {
        assert_eq!(Cat::of('é'), Cat::Letter);
        assert_eq!(Cat::of('中'), Cat::Letter);
        assert_eq!(Cat::of('٣'), Cat::Number);
        assert_eq!(Cat::of('Ⅻ'), Cat::Number); // Nl: numeric, not a letter
        assert_eq!(Cat::of('\u{0345}'), Cat::Other); // Mn, yet Alphabetic
        assert_eq!(Cat::of('\u{093E}'), Cat::Other); // Devanagari vowel sign AA (Mc)
        assert_eq!(Cat::of('Ⓐ'), Cat::Other); // So, yet Alphabetic
        assert_eq!(Cat::of('\u{00A0}'), Cat::Space);
        assert_eq!(Cat::of('\u{3000}'), Cat::Space);
        assert_eq!(Cat::of('\u{200B}'), Cat::Other);
        assert_eq!(Cat::of('😀'), Cat::Other);
    }

    #[test]
    fn pre_tokenizer_gpt2() {
        let p = PreTokenizer::Gpt2;
        assert_eq!(
            split(p, " don't  stop\n\n 123456 "),
            [" don", "'t", " ", " stop", "\n\n", " 123456", " "]
        );
        assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n", "\n", "b"]);
        assert_eq!(split(p, "  leading"), [" ", " leading"]);
        assert_eq!(split(p, "DON'T"), ["DON", "'", "T"]);
    }

    #[test]
    fn pre_tokenizer_smollm() {
        let p = PreTokenizer::Smollm;
        assert_eq!(
            split(p, " don't  stop\n\n 123456 "),
            [" don", "'t", " ", " stop", "\n\n ", "1", "2", "3", "4", "5", "6", " "]
        );
        assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n", "\n", "b"]);
        assert_eq!(split(p, "  leading"), [" ", " leading"]);
        assert_eq!(split(p, "x2y"), ["x", "2", "y"]);
    }

    #[test]
    fn pre_tokenizer_llama3() {
        let p = PreTokenizer::Llama3;
        assert_eq!(
            split(p, " don't  stop\n\n 123456 "),
            [" don", "'t", " ", " stop", "\n\n", " ", "123", "456", " "]
        );
        assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n\n", "b"]);
        assert_eq!(split(p, "  leading"), [" ", " leading"]);
        assert_eq!(split(p, "DON'T 12345"), ["DON", "'T", " ", "123", "45"]);
        assert_eq!(split(p, "(x);\n\ty"), ["(x", ");\n", "\ty"]);
    }

    #[test]
    fn pre_tokenizer_qwen2() {
        let p = PreTokenizer::Qwen2;
        assert_eq!(
            split(p, " don't  stop\n\n 123456 "),
            [" don", "'t", " ", " stop", "\n\n", " ", "1", "2", "3", "4", "5", "6", " "]
        );
        assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n\n", "b"]);
        assert_eq!(split(p, "  leading"), [" ", " leading"]);
    }

    #[test]
    fn pre_tokenizer_covers_text() {
        for p in [
            PreTokenizer::Gpt2,
            PreTokenizer::Smollm,
            PreTokenizer::Llama3,
            PreTokenizer::Qwen2,
        ] {
            let s = "héllo 世界 🎉\t\tx  \r\n 12,345.6e-7 ''' \u{00A0}z\u{0301}";
            assert_eq!(split(p, s).concat(), s);
        }
    }

    #[test]
    fn bpe_merges_by_rank() {
        let t = tiny("gpt2");
        let id = |s: &str| t.token_id(s).unwrap();
        assert_eq!(
            t.encode("hello the world", false, false),
            [id("hello"), id("Ġthe"), id("Ġworld")]
        );
        // "Ġt" (rank 0) is made before "he" (rank 1) could, so " th" stays "Ġt"+"h".
        assert_eq!(t.encode(" th", false, false), [id("Ġt"), b'h' as u32]);
        assert_eq!(t.encode("hellx", false, false), [id("hell"), b'x' as u32]);
        assert_eq!(t.encode("", true, false), [t.bos().unwrap()]);
    }

    #[test]
    fn merge_result_outside_vocab_falls_back_to_bytes() {
        let b2u = bytes_to_unicode();
        let tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
        let t = Tokenizer::new(TokenizerSpec {
            model: "gpt2".into(),
            pre: "gpt2".into(),
            tokens,
            merges: vec!["a b".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(t.encode("ab", false, false), [b'a' as u32, b'b' as u32]);
    }

    #[test]
    fn round_trip() {
        for pre in ["gpt2", "smollm", "llama3", "qwen2"] {
            let t = tiny(pre);
            for s in [
                "Hello, world!",
                "Ça va? Élève naïve — façade",
                "日本語のテキストと中文",
                "emoji 🎉👩‍👩‍👧 done",
                "line1\nline2\r\n\n\ttab\t\tend",
                "multiple     spaces   here ",
                " don't  stop\n\n 123456 ",
                "\u{0}\u{7f}\u{ad}\u{200b}",
            ] {
                let ids = t.encode(s, false, false);
                assert_eq!(t.decode(&ids), s, "pre {pre}");
                let bos = t.encode(s, true, false);
                assert_eq!(bos[0], t.bos().unwrap());
                assert_eq!(t.decode(&bos), s);
            }
        }
    }

    #[test]
    fn special_tokens() {
        let t = tiny("smollm");
        let (start, end) = (
            t.token_id("<|im_start|>").unwrap(),
            t.token_id("<|im_end|>").unwrap(),
        );
        let ids = t.encode("<|im_start|>hello<|im_end|>", false, true);
        assert_eq!(ids, [start, t.token_id("hello").unwrap(), end]);
        // Not parsed: the text is tokenised as ordinary text.
        let raw = t.encode("<|im_start|>hello", false, false);
        assert!(!raw.contains(&start));
        assert_eq!(t.decode(&raw), "<|im_start|>hello");
        // Control tokens are skipped by decode, user-defined ones always matched and rendered.
        assert_eq!(t.decode(&ids), "hello");
        let tool = t.token_id("<tool>").unwrap();
        assert_eq!(
            t.encode("a<tool>b", false, false),
            [b'a' as u32, tool, b'b' as u32]
        );
        assert_eq!(t.decode(&[tool]), "<tool>");
        assert!(t.is_end_of_generation(end));
        assert!(t.is_end_of_generation(t.token_id("<|endoftext|>").unwrap()));
        assert!(!t.is_end_of_generation(start));
        assert_eq!(t.eot(), Some(end));
    }

    #[test]
    fn stream_decoder_joins_split_characters() {
        let t = tiny("gpt2");
        let euro = "€".as_bytes(); // 3 bytes, one token each
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&t, b'a' as u32), "a");
        assert_eq!(d.push(&t, euro[0] as u32), "");
        assert_eq!(d.push(&t, euro[1] as u32), "");
        assert_eq!(d.push(&t, euro[2] as u32), "€");
        assert_eq!(d.push(&t, t.token_id("<|im_end|>").unwrap()), "");
        assert_eq!(d.push(&t, 0xF0), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        // invalid byte in the middle is replaced, not held
        assert_eq!(d.push(&t, 0xFF), "\u{FFFD}");
        let s = "x😀y";
        let ids = t.encode(s, false, false);
        let mut d = StreamDecoder::new();
        let mut out: String = ids.iter().map(|&i| d.push(&t, i)).collect();
        out.push_str(&d.finish());
        assert_eq!(out, s);
    }

    #[test]
    fn errors_are_reported() {
        let base = || TokenizerSpec {
            model: "gpt2".into(),
            pre: "gpt2".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let e = Tokenizer::new(TokenizerSpec {
            model: "llama".into(),
            ..base()
        })
        .unwrap_err();
        assert!(e.to_string().contains("sentencepiece"), "{e}");
        assert!(matches!(
            Tokenizer::new(TokenizerSpec {
                pre: "nope".into(),
                ..base()
            }),
            Err(TokenizerError::UnknownPreTokenizer(_))
        ));
        assert!(matches!(
            Tokenizer::new(TokenizerSpec {
                token_types: vec![1, 1],
                ..base()
            }),
            Err(TokenizerError::TokenTypesLength { .. })
        ));
        assert!(matches!(
            Tokenizer::new(TokenizerSpec {
                bos: Some(5),
                ..base()
            }),
            Err(TokenizerError::SpecialIdOutOfRange { .. })
        ));
        assert!(matches!(
            Tokenizer::new(TokenizerSpec {
                merges: vec!["ab".into()],
                ..base()
            }),
            Err(TokenizerError::BadMerge { .. })
        ));
        assert!(matches!(
            Tokenizer::new(TokenizerSpec {
                tokens: vec![],
                ..base()
            }),
            Err(TokenizerError::EmptyVocab)
        ));
        let t = Tokenizer::new(base()).unwrap();
        assert_eq!(t.token_bytes(99), b"");
        assert_eq!(t.decode(&[99, 0]), "a");
        assert!(Tokenizer::from_hf_json("{", None).is_err());
        assert!(Tokenizer::from_hf_json("{\"model\":{\"type\":\"Unigram\"}}", None).is_err());
    }

    #[test]
    fn from_hf_json_smollm_style() {
        let json = r#"{
          "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "special": true},
            {"id": 1, "content": "<|im_start|>", "special": true},
            {"id": 2, "content": "<|im_end|>", "special": true}
          ],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
          ]},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
             "h": 3, "i": 4, "Ġ": 5, "1": 6, "2": 7, "hi": 8, "Ġhi": 9},
             "merges": ["h i", ["Ġ", "hi"]]}
        }"#;
        let cfg = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false}"#;
        let t = Tokenizer::from_hf_json(json, Some(cfg)).unwrap();
        assert_eq!(t.pre_tokenizer(), PreTokenizer::Smollm);
        assert_eq!(t.bos(), Some(1));
        assert_eq!(t.eos(), Some(2));
        assert!(!t.add_bos());
        assert_eq!(t.encode("<|im_start|>hi hi12", true, true), [1, 8, 9, 6, 7]);
        assert!(t.is_end_of_generation(0) && t.is_end_of_generation(2));
    }

    #[test]
    fn from_hf_json_detects_llama3_and_qwen2() {
        let mk = |pattern: &str| {
            format!(
                r#"{{"pre_tokenizer": {{"type": "Sequence", "pretokenizers": [
                    {{"type": "Split", "pattern": {{"Regex": {}}}, "behavior": "Isolated"}},
                    {{"type": "ByteLevel", "use_regex": false}}]}},
                   "post_processor": {{"type": "TemplateProcessing", "single": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}]}},
                   "added_tokens": [{{"id": 2, "content": "<s>", "special": true}}],
                   "model": {{"type": "BPE", "vocab": {{"a": 0, "1": 1}}, "merges": []}}}}"#,
                serde_json::to_string(pattern).unwrap()
            )
        };
        let l3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let q2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let t = Tokenizer::from_hf_json(&mk(l3), None).unwrap();
        assert_eq!(t.pre_tokenizer(), PreTokenizer::Llama3);
        assert!(t.add_bos());
        assert_eq!(t.encode("a1", true, false), [2, 0, 1]);
        let t = Tokenizer::from_hf_json(&mk(q2), None).unwrap();
        assert_eq!(t.pre_tokenizer(), PreTokenizer::Qwen2);
    }
}
