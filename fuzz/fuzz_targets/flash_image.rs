//! Flash image header and metadata: `FlashImage::validate_bytes`, the checks
//! `FlashImage::open` makes. The first input byte picks the mode:
//! - even: the rest is the whole image, header included (magic, version, checksums);
//! - odd: the rest is the metadata JSON, stored after `(byte >> 1) & 3` pages of zeros behind
//!   a header with correct checksums, so the fuzzer reaches the metadata checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llmflash::image::{crc32, FlashImage, ALIGN, FORMAT_VERSION, MAGIC};

fn image(meta: &[u8], pad_pages: u64) -> Vec<u8> {
    let meta_offset = ALIGN * (1 + pad_pages);
    let mut h = vec![0u8; meta_offset as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&meta_offset.to_le_bytes());
    h[24..32].copy_from_slice(&(meta.len() as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc32(meta).to_le_bytes());
    let hc = crc32(&h[..36]);
    h[36..40].copy_from_slice(&hc.to_le_bytes());
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
