//! GGUF (v2 and v3) reader, and a small writer for building synthetic files in tests.
//!
//! A GGUF file is: a header (magic, version, counts), typed key/value metadata, a table of
//! tensor infos, then an aligned data section holding every tensor's bytes. We parse the
//! header, metadata and tensor table eagerly (they are small) and validate every tensor's
//! byte range up front, so that [`GgufFile::tensor`] can hand out zero-copy views of the
//! memory map without further checks that could fail later, mid-generation.
//!
//! Everything read from the file is untrusted: every read is bounds-checked by the reader,
//! and no allocation is sized from a file-supplied count until that count has been checked
//! against the bytes that remain (each element needs at least a known number of bytes).
//!
//! Text: metadata *keys* and tensor names must be valid UTF-8 (an error otherwise, since a
//! mangled key would silently not be found). String *values* are decoded lossily (invalid
//! sequences become U+FFFD, with one warning per file), so that a single odd token in a
//! 150k-entry vocabulary does not make an otherwise good model unloadable.

mod reader;
#[cfg(test)]
mod tests;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::MetaValue;
pub use writer::{write_gguf, GgufWriter};

use std::path::PathBuf;

use super::tensor::TensorError;

/// The four bytes every GGUF file starts with ("GGUF").
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays we accept. Real files nest at most once; the limit keeps a
/// malicious file from overflowing the stack through recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Errors from reading (or looking things up in) a GGUF file. Each message says what was
/// expected, what was found and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // The OS error is in the message, so it is not also a `source` (printed twice).
    #[error("cannot read GGUF file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "not a GGUF file: expected magic bytes \"GGUF\" (47 47 55 46), found {found:02x?}; \
         pass a .gguf model file"
    )]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version}: this reader handles versions 2 and 3{hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error(
        "GGUF file truncated while reading {what} at byte {offset}: needed {need} bytes, \
         {have} remain; the file is incomplete or corrupt, re-download or re-convert it"
    )]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error(
        "implausible {what} at byte {offset}: {count} items need at least {min_bytes} bytes \
         but only {have} remain; the file is corrupt"
    )]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        min_bytes: u128,
        have: u64,
    },
    #[error("invalid UTF-8 in {what} at byte {offset}; the file is corrupt")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error(
        "metadata `{key}`: unknown value type id {type_id} (expected 0..=12); the file is \
         corrupt or from a newer GGUF revision"
    )]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata `{key}`: arrays nested deeper than {max} levels; the file is corrupt")]
    NestingTooDeep { key: String, max: usize },
    #[error("metadata key `{key}` appears more than once; the file is corrupt")]
    DuplicateKey { key: String },
    #[error("`general.alignment`: {detail}")]
    BadAlignment { detail: String },
    #[error(
        "tensor `{tensor}`: ggml type {type_id} is not supported (supported: F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS); \
         re-quantise the model to one of these"
    )]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("tensor `{tensor}`: bad dimensions: {detail}")]
    BadDims { tensor: String, detail: String },
    #[error(
        "tensor `{tensor}`: data offset {offset} is not a multiple of the alignment \
         {alignment}; the file is corrupt"
    )]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor `{tensor}`: data spans bytes {start}..{end} of the file but the file has \
         {file_len} bytes; the file is truncated, re-download it"
    )]
    DataOutOfBounds {
        tensor: String,
        start: u128,
        end: u128,
        file_len: u64,
    },
    #[error("tensors `{first}` and `{second}` overlap in the data section; the file is corrupt")]
    OverlappingTensors { first: String, second: String },
    #[error("tensor name `{name}` appears more than once; the file is corrupt")]
    DuplicateTensor { name: String },
    #[error("metadata key `{key}` is missing; expected {expected}")]
    MissingKey { key: String, expected: &'static str },
    #[error("metadata `{key}`: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("no tensor named `{name}` in the GGUF file")]
    TensorNotFound { name: String },
    #[error(
        "tensor `{name}`: shape {dims:?} cannot be used as a matrix (only 1-D and 2-D \
         tensors, or higher ones whose extra dimensions are 1)"
    )]
    NotAMatrix { name: String, dims: Vec<u64> },
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

impl GgufError {
    /// Prefixes the location of a low-level read error with where in the file we were, so a
    /// truncation inside a key's value names the key. Done only on the error path, so the
    /// hot path (vocabulary arrays) builds no strings.
    fn context(self, ctx: &str) -> GgufError {
        match self {
            GgufError::Truncated {
                what,
                offset,
                need,
                have,
            } => GgufError::Truncated {
                what: format!("{ctx}: {what}"),
                offset,
                need,
                have,
            },
            GgufError::CountTooLarge {
                what,
                offset,
                count,
                min_bytes,
                have,
            } => GgufError::CountTooLarge {
                what: format!("{ctx}: {what}"),
                offset,
                count,
                min_bytes,
                have,
            },
            GgufError::InvalidUtf8 { what, offset } => GgufError::InvalidUtf8 {
                what: format!("{ctx}: {what}"),
                offset,
            },
            other => other,
        }
    }
}
