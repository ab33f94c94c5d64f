//! Tokenizer: bytes in, tokens out, round trip, on the real SmolLM2 tokenizer (byte-level
//! BPE, built once from the GGUF's `tokenizer.ggml.*` metadata).
//!
//! For any UTF-8 text `s` (invalid input is made valid lossily):
//! - `decode(encode(s)) == s` without special-token parsing, except for the bytes that have
//!   no token of their own in the vocabulary, which are dropped as llama.cpp drops them
//!   (SmolLM2 lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, and the lead bytes 0xf1 and 0xf2 of
//!   the unassigned planes 4 to 11, besides bytes UTF-8 never uses); the expected text is
//!   then the input's bytes less those, decoded lossily;
//! - the streaming decoder yields the same text;
//! - with special-token parsing and BOS/EOS every id is in the vocabulary.
//!
//! The model is `LLMFLASH_FUZZ_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf` in the
//! repository (`tools/fetch-model`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmflash::model::gguf::GgufFile;
use llmflash::model::loader::tokenizer_spec;
use llmflash::model::tokenizer::{bytes_to_unicode, StreamDecoder, Tokenizer};

/// The tokenizer, and which bytes have a single-byte token (the others cannot be encoded).
fn tokenizer() -> &'static (Tokenizer, [bool; 256]) {
    static TOK: OnceLock<(Tokenizer, [bool; 256])> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var_os("LLMFLASH_FUZZ_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        let f = GgufFile::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run tools/fetch-model)", path.display()));
        let tok = Tokenizer::new(tokenizer_spec(&f).expect("tokenizer spec")).expect("tokenizer");
        let b2u = bytes_to_unicode();
        let has: [bool; 256] = std::array::from_fn(|b| tok.token_id(&b2u[b].to_string()).is_some());
        (tok, has)
    })
}

fuzz_target!(|data: &[u8]| {
    let (tok, has) = tokenizer();
    let s = String::from_utf8_lossy(data);
    let kept: Vec<u8> = s.bytes().filter(|&b| has[b as usize]).collect();
    let want = String::from_utf8_lossy(&kept);

    let ids = tok.encode(&s, false, false);
    assert_eq!(tok.decode(&ids), want, "round trip of {s:?} via {ids:?}");
    let mut stream = StreamDecoder::new();
    let mut streamed: String = ids.iter().map(|&id| stream.push(tok, id)).collect();
    streamed.push_str(&stream.finish());
    assert_eq!(streamed, want, "streamed decode of {ids:?}");

    let ids = tok.encode(&s, true, true);
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    let _ = tok.decode(&ids);
});
