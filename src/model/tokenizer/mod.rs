//! Byte-level BPE tokenizer (GPT-2 family: SmolLM, Llama 3, Qwen2, GPT-2), reproducing
//! llama.cpp's `llm_tokenizer_bpe` token for token, and the SentencePiece tokenizer
//! (`llama` in GGUF: Gemma) reproducing its `llm_tokenizer_spm` (see `spm.rs`; steps 1 and 2
//! below are shared, then each fragment is merged by token score instead of BPE).
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

mod bpe;
mod build;
mod byte_level;
mod hf_json;
mod pre;
mod spm;
mod stream;
#[cfg(test)]
mod tests;

pub use byte_level::bytes_to_unicode;
pub use pre::PreTokenizer;
pub use stream::StreamDecoder;

use std::collections::HashMap;

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
    #[error("tokenizer model `{0}` is not supported: implemented are byte-level BPE (`gpt2`, as in SmolLM, Llama 3, Qwen2, GPT-2) and SentencePiece (`llama`, as in Gemma)")]
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
    #[error("score list has {scores} entries but the vocabulary has {tokens} tokens: a SentencePiece (`llama`) tokenizer needs one score per token (tokenizer.ggml.scores)")]
    ScoresLength { scores: usize, tokens: usize },
    #[error("tokenizer.json is not valid JSON: {0}")]
    Json(String),
    #[error("tokenizer.json: {0}")]
    HfFormat(String),
}

/// What a model file says about its tokenizer (filled by the GGUF loader from
/// `tokenizer.ggml.*` keys, or from HF `tokenizer.json` + `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerSpec {
    /// `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
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
    /// SentencePiece only: one score per token (`tokenizer.ggml.scores`).
    #[serde(default)]
    pub scores: Vec<f32>,
    /// SentencePiece only: `tokenizer.ggml.add_space_prefix`; `None` = llama.cpp's default
    /// (true).
    #[serde(default)]
    pub add_space_prefix: Option<bool>,
}

/// A byte-level BPE or SentencePiece tokenizer. Cheap to share (`&Tokenizer` is `Sync`); encoding allocates
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
    /// Set for a SentencePiece vocabulary: encoding merges by score instead of BPE ranks.
    spm: Option<spm::Spm>,
}

impl Tokenizer {
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
