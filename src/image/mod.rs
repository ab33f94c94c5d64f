//! The flash image: one file holding a converted model, with the FFN weights laid out as
//! "row-column bundles" (LLM in a flash, §3.2) so that a neuron's gate row, up row and down
//! column are read with one contiguous request, and everything else (embeddings, attention,
//! norms, biases) stored verbatim for the resident part of the model.
//!
//! Layout (format version 1, little-endian):
//! - a 4096-byte header: magic `LLMFLASH`, u32 version, u32 reserved, u64 meta offset, u64
//!   meta length, u32 CRC-32 of the meta JSON, u32 CRC-32 of the header's first 36 bytes;
//! - the resident tensors, each 4 KiB aligned, bytes verbatim in their source dtype (norms and
//!   biases as f32);
//! - per layer, a 4 KiB-aligned FFN section of `n_neurons` bundles of `stride` bytes;
//! - optional blobs appended by [`append_extra`] (calibration data, predictors);
//! - the metadata JSON ([`ImageMeta`]) at the end, pointed to by the header.
//!
//! [`convert`] writes an image from a loaded model, [`FlashImage::open`] validates and maps
//! one, [`write_synthetic`] writes a random model of a given shape for I/O benchmarks, and
//! [`reorder_neurons`] changes the order of the bundles on disk (hot neurons first).

mod crc;
mod header;
mod layout;
mod placement;
mod progress;
mod reader;
mod reorder;
mod synthetic;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use crc::{crc32, Crc32};
pub use header::Header;
pub use layout::{
    BlobEntry, BundleDtype, BundleLayout, BundlePart, FfnSection, ImageMeta, PartRole, SourceInfo,
    TensorEntry,
};
pub use placement::{Placement, Reads};
pub use reader::FlashImage;
pub use reorder::reorder_neurons;
pub use synthetic::{write_synthetic, SyntheticShape};
pub use writer::{append_extra, convert, ConvertOptions};

impl ImageError {
    /// A maker of [`ImageError::Io`] for `action` on `path`, for `map_err`.
    pub(crate) fn io(
        path: &std::path::Path,
        action: &'static str,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.to_path_buf();
        move |source| ImageError::Io {
            path,
            action,
            error: source,
        }
    }
}

/// The checksum of one FFN bundle as the image records it ([`FfnSection::bundle_crc32c`]):
/// CRC-32C, which current CPUs compute in hardware (SSE4.2, ARMv8) at many GB/s, so checking
/// every bundle read costs little next to reading it.
pub fn bundle_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The tensors a session may stream from the image row by row, which get per-row checksums.
pub const STREAMED_TABLES: [&str; 2] = ["token_embd.weight", "output.weight"];

/// Per-row checksums of `bytes` (`rows` rows) when `name` is a table that may be streamed.
pub fn row_checksums(name: &str, rows: usize, bytes: &[u8]) -> Vec<u32> {
    if !STREAMED_TABLES.contains(&name) || rows == 0 {
        return Vec::new();
    }
    bytes
        .chunks_exact(bytes.len() / rows)
        .map(bundle_checksum)
        .collect()
}

/// File magic at offset 0.
pub const MAGIC: &[u8; 8] = b"LLMFLASH";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the header, and the alignment of every tensor, section and blob.
pub const ALIGN: u64 = 4096;

/// Errors reading or writing a flash image. Messages say what was expected, what was found
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    // The OS error is in the message, so it is not also a `source` (printed twice).
    #[error("{}: {action}: {error}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] crate::storage::OutputError),
    #[error("{} is not a flash image: it starts with {found:02x?}, expected the magic \"LLMFLASH\"; if it was one, it is damaged or partly written: convert the model again (`llmflash convert MODEL -o OUT.flash`)", path.display())]
    NotAnImage { path: PathBuf, found: Vec<u8> },
    /// Reading tensors from the image failed (the storage error names the offset).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{}: image format version {found} is newer than this llmflash ({supported}): rebuild llmflash or reconvert the model", path.display())]
    NewerVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: image format version {found} is not supported (this llmflash reads version {supported}): reconvert the model", path.display())]
    OldVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: checksum mismatch in {what} (stored {stored:08x}, computed {computed:08x}): the file is corrupt; reconvert", path.display())]
    Checksum {
        path: PathBuf,
        what: String,
        stored: u32,
        computed: u32,
    },
    #[error("{}: truncated: {what} ends at byte {end} but the file has {len} bytes; the file is incomplete (interrupted copy or convert?): reconvert", path.display())]
    Truncated {
        path: PathBuf,
        what: String,
        end: u64,
        len: u64,
    },
    #[error("{}: invalid image metadata: {detail}; the file is corrupt or was written by an incompatible tool: reconvert", path.display())]
    Meta { path: PathBuf, detail: String },
    #[error("cannot convert {}: {detail}", path.display())]
    Convert { path: PathBuf, detail: String },
    #[error("{}: image has no extra `{key}`{}: run the step that writes it (e.g. `llmflash calibrate`)", path.display(), name.as_ref().map(|n| format!(" blob `{n}`")).unwrap_or_default())]
    MissingExtra {
        path: PathBuf,
        key: String,
        name: Option<String>,
    },
}

/// Rounds `x` up to a multiple of [`ALIGN`].
pub(crate) fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

/// Whether `path` is a flash image (by its magic bytes or a `.flash` name), so commands can take either a model
/// file or an image with the same `-m`.
pub fn is_flash_image(path: &std::path::Path) -> bool {
    use std::io::Read;
    // Only a regular file is opened: opening a FIFO would block until a writer appears.
    if crate::storage::input::regular_file(path).is_err() {
        return false;
    }
    // A `.flash` file counts whatever it holds, so that a damaged or partial image is
    // reported as a damaged image, not as "not a GGUF file".
    if path.extension().is_some_and(|e| e == "flash") {
        return true;
    }
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|_| &magic == MAGIC)
}
