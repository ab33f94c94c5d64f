//! Flash image header and metadata: `FlashImage::validate_bytes`, the checks
//! `FlashImage::open` makes. The first input byte picks the mode:
//! - even: the rest is the whole image, header included (magic, version, checksums);
//! - odd: the rest is the metadata JSON, stored after `(byte >> 1) & 3` pages of zeros behind
//!   a header with correct checksums, so the fuzzer reaches the metadata checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llmflash::image::{FlashImage, Header, ALIGN};

fn image(meta: &[u8], pad_pages: u64) -> Vec<u8> {
    let meta_offset = ALIGN * (1 + pad_pages);
    let mut h = Header::for_meta(meta_offset, meta).encode();
    h.resize(meta_offset as usize, 0);
    h.extend_from_slice(meta);
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz.flash");
    let meta = if mode & 1 == 0 {
        FlashImage::validate_bytes(path, rest)
    } else {
        FlashImage::validate_bytes(path, &image(rest, u64::from(mode >> 1) & 3))
    };
    if let Ok(meta) = meta {
        let _ = (meta.resident_bytes(), meta.ffn_bytes());
        if let Some(src) = &meta.tokenizer {
            let _ = src.build();
        }
    }
});
