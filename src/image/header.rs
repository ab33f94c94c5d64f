//! The image's 4096-byte header: one codec, so the writer and every reader agree on where
//! each field lives.
//!
//! ```text
//! 0..8    magic "LLMFLASH"
//! 8..12   format version (u32 LE)
//! 12..16  reserved (0)
//! 16..24  metadata offset (u64 LE)
//! 24..32  metadata length (u64 LE)
//! 32..36  CRC-32 of the metadata
//! 36..40  CRC-32 of bytes 0..36
//! 40..    zero up to ALIGN
//! ```

use std::ops::Range;
use std::path::Path;

use super::{crc32, ImageError, ALIGN, FORMAT_VERSION, MAGIC};

const VERSION: Range<usize> = 8..12;
const META_OFFSET: Range<usize> = 16..24;
const META_LEN: Range<usize> = 24..32;
const META_CRC: Range<usize> = 32..36;
const HEADER_CRC: Range<usize> = 36..40;

/// What the header says: where the metadata is and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub meta_offset: u64,
    pub meta_len: u64,
    pub meta_crc: u32,
}

impl Header {
    /// The header of this build's format for metadata `meta` stored at `meta_offset`.
    pub fn for_meta(meta_offset: u64, meta: &[u8]) -> Header {
        Header {
            meta_offset,
            meta_len: meta.len() as u64,
            meta_crc: crc32(meta),
        }
    }

    /// The header's [`ALIGN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; ALIGN as usize];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[VERSION].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[META_OFFSET].copy_from_slice(&self.meta_offset.to_le_bytes());
        h[META_LEN].copy_from_slice(&self.meta_len.to_le_bytes());
        h[META_CRC].copy_from_slice(&self.meta_crc.to_le_bytes());
        let own = crc32(&h[..HEADER_CRC.start]);
        h[HEADER_CRC].copy_from_slice(&own.to_le_bytes());
        h
    }

    /// Reads and checks the header at the start of `file` (the whole image, `path` naming it
    /// in errors): magic, size, version and the header's own checksum. The metadata's
    /// range and checksum are the caller's to check against the file.
    pub fn decode(path: &Path, file: &[u8]) -> Result<Header, ImageError> {
        if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                found: file[..file.len().min(MAGIC.len())].to_vec(),
            });
        }
        if (file.len() as u64) < ALIGN {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                what: "the header".into(),
                end: ALIGN,
                len: file.len() as u64,
            });
        }
        let version = u32_le(file, VERSION);
        let versions = (version, FORMAT_VERSION);
        if version > FORMAT_VERSION {
            return Err(ImageError::NewerVersion {
                path: path.to_path_buf(),
                found: versions.0,
                supported: versions.1,
            });
        }
        if version < FORMAT_VERSION {
            return Err(ImageError::OldVersion {
                path: path.to_path_buf(),
                found: versions.0,
                supported: versions.1,
            });
        }
        let stored = u32_le(file, HEADER_CRC);
        let computed = crc32(&file[..HEADER_CRC.start]);
        if stored != computed {
            return Err(ImageError::Checksum {
                path: path.to_path_buf(),
                what: "the header".into(),
                stored,
                computed,
            });
        }
        Ok(Header {
            meta_offset: u64_le(file, META_OFFSET),
            meta_len: u64_le(file, META_LEN),
            meta_crc: u32_le(file, META_CRC),
        })
    }
}

// The ranges are constants inside ALIGN, and `decode` checks the length first.
fn u32_le(b: &[u8], r: Range<usize>) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[r]);
    u32::from_le_bytes(a)
}

fn u64_le(b: &[u8], r: Range<usize>) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[r]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_decodes_to_what_was_encoded() {
        let h = Header::for_meta(8192, b"{\"format\":2}");
        let bytes = h.encode();
        assert_eq!(bytes.len() as u64, ALIGN);
        assert_eq!(Header::decode(Path::new("x"), &bytes).unwrap(), h);
    }

    #[test]
    fn each_damage_is_named() {
        let good = Header::for_meta(8192, b"{}").encode();
        let p = Path::new("x.flash");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(p, &bad),
            Err(ImageError::NotAnImage { .. })
        ));
        assert!(matches!(
            Header::decode(p, &good[..100]),
            Err(ImageError::Truncated { .. })
        ));
        let mut old = good.clone();
        old[VERSION].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            Header::decode(p, &old),
            Err(ImageError::OldVersion { found: 1, .. })
        ));
        let mut new = good.clone();
        new[VERSION].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(p, &new),
            Err(ImageError::NewerVersion { .. })
        ));
        let mut flipped = good.clone();
        flipped[META_OFFSET.start] ^= 1;
        assert!(matches!(
            Header::decode(p, &flipped),
            Err(ImageError::Checksum { .. })
        ));
    }
}
