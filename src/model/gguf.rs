//! GGUF (v2 and v3) reader, and a small writer for building synthetic files in tests.
//!
//! A GGUF file is: a header (magic, version, counts), typed key/value metadata, a table of
//! tensor infos, then an aligned data section holding every tensor's bytes. We parse the
//! header, metadata and tensor table eagerly (they are small) and validate every tensor's
//! byte range up front, so that [`GgufFile::tensor`] can hand out zero-copy views of the
//! memory map without further checks that could fail later, mid-generation.
//!
//! Everything read from the file is untrusted: every read is bounds-checked by [`Reader`],
//! and no allocation is sized from a file-supplied count until that count has been checked
//! against the bytes that remain (each element needs at least a known number of bytes).
//!
//! Text: metadata *keys* and tensor names must be valid UTF-8 (an error otherwise, since a
//! mangled key would silently not be found). String *values* are decoded lossily (invalid
//! sequences become U+FFFD, with one warning per file), so that a single odd token in a
//! 150k-entry vocabulary does not make an otherwise good model unloadable.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::tensor::{DType, Storage, Tensor, TensorError};

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

/// Smallest possible encoded size of one metadata key/value pair: an empty key (8-byte
/// length), a type (4) and a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoded tensor info: empty name (8), n_dims (4), one dim (8), type (4),
/// offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

// Metadata value type ids, as in the GGUF specification.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

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

/// A typed metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all have the same type. An empty array remembers no element type.
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to the nearest `f32` (converters sometimes write an
    /// epsilon or a RoPE base as an integer).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self
                .as_i64()
                .map(|v| v as f32)
                .or_else(|| self.as_u64().map(|v| v as f32)),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// A short description (type and value, long strings and arrays abbreviated) for error
    /// messages.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::String(s) => {
                let short: String = s.chars().take(40).collect();
                let more = if short.len() < s.len() { "..." } else { "" };
                format!("string {short:?}{more}")
            }
            MetaValue::Array(a) => match a.first() {
                Some(first) => format!("array of {} {}", a.len(), first.type_name()),
                None => "empty array".to_string(),
            },
            MetaValue::U8(v) => format!("u8 {v}"),
            MetaValue::I8(v) => format!("i8 {v}"),
            MetaValue::U16(v) => format!("u16 {v}"),
            MetaValue::I16(v) => format!("i16 {v}"),
            MetaValue::U32(v) => format!("u32 {v}"),
            MetaValue::I32(v) => format!("i32 {v}"),
            MetaValue::F32(v) => format!("f32 {v}"),
            MetaValue::Bool(v) => format!("bool {v}"),
            MetaValue::U64(v) => format!("u64 {v}"),
            MetaValue::I64(v) => format!("i64 {v}"),
            MetaValue::F64(v) => format!("f64 {v}"),
        }
    }

    /// The GGUF type id this value is written with.
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => T_U8,
            MetaValue::I8(_) => T_I8,
            MetaValue::U16(_) => T_U16,
            MetaValue::I16(_) => T_I16,
            MetaValue::U32(_) => T_U32,
            MetaValue::I32(_) => T_I32,
            MetaValue::F32(_) => T_F32,
            MetaValue::Bool(_) => T_BOOL,
            MetaValue::String(_) => T_STRING,
            MetaValue::Array(_) => T_ARRAY,
            MetaValue::U64(_) => T_U64,
            MetaValue::I64(_) => T_I64,
            MetaValue::F64(_) => T_F64,
        }
    }
}

/// Smallest encoded size of one value of type `type_id`, or `None` for an unknown type.
/// Used to reject array counts that could not possibly fit in the remaining bytes before
/// reserving memory for them.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 4 + 8,
        _ => return None,
    })
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous axis (a matrix's columns).
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies.
    pub n_bytes: u64,
}

/// Where the file's bytes live.
#[derive(Clone)]
enum Backing {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor bytes stay in the file (memory-mapped) until asked for.
#[derive(Clone)]
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// Metadata in file order (keys are unique).
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor table in file order (names are unique, byte ranges validated).
    pub tensors: Vec<TensorInfo>,
    backing: Backing,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            error: source,
        };
        // A FIFO would block `open`: only a regular file is opened.
        crate::storage::input::regular_file(path).map_err(io_err)?;
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only; as with every mmap-based loader, we assume the file
        // is not truncated or rewritten by another process while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let map = Arc::new(map);
        let parsed = parse(&map)?;
        Ok(parsed.into_file(Backing::Mapped(map)))
    }

    /// Parses a GGUF file held in memory (tests, or bytes from elsewhere).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let parsed = parse(&bytes)?;
        Ok(parsed.into_file(Backing::Owned(Arc::new(bytes))))
    }

    /// The value of metadata `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str, expected: &'static str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
            expected,
        })
    }

    fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: found.describe(),
        }
    }

    /// A non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        const EXPECTED: &str = "a non-negative integer";
        let v = self.require(key, EXPECTED)?;
        v.as_u64().ok_or_else(|| Self::wrong_type(key, EXPECTED, v))
    }

    /// A float, or an integer converted to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        const EXPECTED: &str = "a number";
        let v = self.require(key, EXPECTED)?;
        v.as_f32().ok_or_else(|| Self::wrong_type(key, EXPECTED, v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        const EXPECTED: &str = "a string";
        let v = self.require(key, EXPECTED)?;
        v.as_str().ok_or_else(|| Self::wrong_type(key, EXPECTED, v))
    }

    /// An array whose elements are all strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        const EXPECTED: &str = "an array of strings";
        let v = self.require(key, EXPECTED)?;
        let arr = v
            .as_array()
            .ok_or_else(|| Self::wrong_type(key, EXPECTED, v))?;
        arr.iter()
            .map(|e| e.as_str().ok_or_else(|| Self::wrong_type(key, EXPECTED, v)))
            .collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of tensor `info` (ranges were validated when the file was parsed).
    fn tensor_bytes_range(&self, info: &TensorInfo) -> Option<(usize, usize)> {
        let start = usize::try_from(self.data_offset.checked_add(info.offset)?).ok()?;
        let len = usize::try_from(info.n_bytes).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.backing.bytes().len()).then_some((start, len))
    }

    /// Tensor `name` as a matrix: 1-D becomes `1 x dims[0]`, 2-D `dims[1] x dims[0]`, and
    /// higher ranks are accepted when every dimension past the second is 1. Zero-copy for
    /// files opened with [`GgufFile::open`]; a copy of the tensor's bytes for
    /// [`GgufFile::from_bytes`] (the tensor type cannot borrow a `Vec`).
    pub fn tensor(&self, name: &str) -> Result<Tensor, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound {
                name: name.to_string(),
            })?;
        let (rows, cols) = matrix_shape(&info.dims).ok_or_else(|| GgufError::NotAMatrix {
            name: info.name.clone(),
            dims: info.dims.clone(),
        })?;
        let (offset, len) =
            self.tensor_bytes_range(info)
                .ok_or_else(|| GgufError::DataOutOfBounds {
                    tensor: info.name.clone(),
                    start: u128::from(self.data_offset) + u128::from(info.offset),
                    end: u128::from(self.data_offset)
                        + u128::from(info.offset)
                        + u128::from(info.n_bytes),
                    file_len: self.backing.bytes().len() as u64,
                })?;
        let storage = match &self.backing {
            Backing::Mapped(map) => Storage::Mapped {
                map: Arc::clone(map),
                offset,
                len,
            },
            Backing::Owned(v) => Storage::Owned(Arc::new(v[offset..offset + len].to_vec())),
        };
        Ok(Tensor::new(
            info.name.clone(),
            info.dtype,
            rows,
            cols,
            storage,
        )?)
    }
}

/// `(rows, cols)` for ggml dims, or `None` if the tensor is not (reducible to) 2-D or a
/// dimension does not fit in `usize`.
fn matrix_shape(dims: &[u64]) -> Option<(usize, usize)> {
    let cols = usize::try_from(*dims.first()?).ok()?;
    let rows = match dims.get(1) {
        Some(&r) => usize::try_from(r).ok()?,
        None => 1,
    };
    dims.iter().skip(2).all(|&d| d == 1).then_some((rows, cols))
}

/// The result of parsing, before it is tied to its backing bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
}

impl Parsed {
    fn into_file(self, backing: Backing) -> GgufFile {
        GgufFile {
            version: self.version,
            alignment: self.alignment,
            data_offset: self.data_offset,
            metadata: self.metadata,
            tensors: self.tensors,
            backing,
        }
    }
}

/// A cursor over the file's bytes whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Count of string values that were not valid UTF-8 (decoded lossily).
    lossy_strings: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            lossy_strings: 0,
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        match self.buf.get(self.pos..).and_then(|rest| rest.get(..n)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                need: n as u64,
                have: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what remains,
    /// and returns `count` as a `usize` safe to reserve.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize, GgufError> {
        let min_bytes = u128::from(count) * u128::from(min_size);
        if min_bytes > u128::from(self.remaining()) {
            return Err(GgufError::CountTooLarge {
                what: what.to_string(),
                offset: self.pos as u64,
                count,
                min_bytes,
                have: self.remaining(),
            });
        }
        // Fits in the buffer, so it fits in usize.
        Ok(count as usize)
    }

    /// The raw bytes of a length-prefixed string.
    fn string_bytes(&mut self, what: &str) -> Result<&'a [u8], GgufError> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                what: format!("{what} (length {len})"),
                offset: start as u64 + 8,
                need: len,
                have: self.remaining(),
            });
        }
        self.take(len as usize, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String, GgufError> {
        let offset = self.pos as u64;
        let bytes = self.string_bytes(what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                what: what.to_string(),
                offset,
            }),
        }
    }

    /// A string value, decoded lossily (see the module docs).
    fn lossy_string(&mut self, what: &str) -> Result<String, GgufError> {
        let bytes = self.string_bytes(what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => {
                self.lossy_strings += 1;
                Ok(String::from_utf8_lossy(bytes).into_owned())
            }
        }
    }

    /// One metadata value of type `type_id`; `depth` counts enclosing arrays.
    fn value(&mut self, type_id: u32, depth: usize, key: &str) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            T_U8 => MetaValue::U8(self.u8("u8 value")?),
            T_I8 => MetaValue::I8(self.u8("i8 value")? as i8),
            T_U16 => MetaValue::U16(self.u16("u16 value")?),
            T_I16 => MetaValue::I16(self.u16("i16 value")? as i16),
            T_U32 => MetaValue::U32(self.u32("u32 value")?),
            T_I32 => MetaValue::I32(self.u32("i32 value")? as i32),
            T_F32 => MetaValue::F32(f32::from_bits(self.u32("f32 value")?)),
            // ggml writes bools as one byte; any nonzero byte reads as true.
            T_BOOL => MetaValue::Bool(self.u8("bool value")? != 0),
            T_STRING => MetaValue::String(self.lossy_string("string value")?),
            T_ARRAY => self.array_value(depth, key)?,
            T_U64 => MetaValue::U64(self.u64("u64 value")?),
            T_I64 => MetaValue::I64(self.u64("i64 value")? as i64),
            T_F64 => MetaValue::F64(f64::from_bits(self.u64("f64 value")?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    type_id,
                })
            }
        })
    }

    fn array_value(&mut self, depth: usize, key: &str) -> Result<MetaValue, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: key.to_string(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let elem_type = self.u32("array element type")?;
        let min_size = min_value_bytes(elem_type).ok_or_else(|| GgufError::UnknownValueType {
            key: key.to_string(),
            type_id: elem_type,
        })?;
        let count = self.u64("array length")?;
        let count = self.check_count(count, min_size, "array length")?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(self.value(elem_type, depth + 1, key)?);
        }
        Ok(MetaValue::Array(items))
    }

    fn key_value(&mut self) -> Result<(String, MetaValue), GgufError> {
        let key = self.strict_string("metadata key")?;
        let type_id = self
            .u32("metadata value type")
            .map_err(|e| e.context(&format!("metadata `{key}`")))?;
        let value = self
            .value(type_id, 0, &key)
            .map_err(|e| e.context(&format!("metadata `{key}`")))?;
        Ok((key, value))
    }

    /// One tensor-table entry; `dtype`/`n_bytes` validated, `offset` not yet.
    fn tensor_info(&mut self) -> Result<TensorInfo, GgufError> {
        let name = self.strict_string("tensor name")?;
        let ctx = |e: GgufError| e.context(&format!("tensor info `{name}`"));
        let n_dims = self.u32("n_dims").map_err(ctx)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadDims {
                tensor: name,
                detail: format!("n_dims is {n_dims}, expected 1..={MAX_DIMS}"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("dimension").map_err(ctx)?);
        }
        let type_id = self.u32("ggml type").map_err(ctx)?;
        let offset = self.u64("data offset").map_err(ctx)?;
        let dtype = DType::from_ggml(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.clone(),
            type_id,
        })?;
        let n_bytes = tensor_n_bytes(&name, &dims, dtype)?;
        Ok(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            n_bytes,
        })
    }
}

/// Bytes taken by a tensor of `dims` and `dtype`, checking that no dimension is zero, the
/// element count does not overflow, and rows are whole quantisation blocks.
fn tensor_n_bytes(name: &str, dims: &[u64], dtype: DType) -> Result<u64, GgufError> {
    let bad = |detail: String| GgufError::BadDims {
        tensor: name.to_string(),
        detail,
    };
    if dims.contains(&0) {
        return Err(bad(format!("{dims:?} has a zero dimension")));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(format!("{dims:?}: element count overflows")))?;
    let block = dtype.block_len() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(bad(format!(
            "{dims:?}: rows of {} elements are not a whole number of {dtype} blocks of {block}",
            dims[0]
        )));
    }
    dtype.bytes_for(n).map(|b| b as u64).ok_or_else(|| {
        bad(format!(
            "{dims:?}: byte size of {n} {dtype} elements overflows"
        ))
    })
}

/// Parses header, metadata and tensor table and validates every tensor's byte range.
fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut r = Reader::new(buf);
    let magic = r.take(4, "magic").map_err(|_| GgufError::BadMagic {
        found: buf.to_vec(),
    })?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32("header version")?;
    check_version(version)?;
    let tensor_count = r.u64("header tensor count")?;
    let kv_count = r.u64("header metadata count")?;

    let metadata = read_metadata(&mut r, kv_count)?;
    if r.lossy_strings > 0 {
        log::warn!(
            "GGUF: {} metadata string value(s) were not valid UTF-8 and were decoded lossily",
            r.lossy_strings
        );
    }
    let alignment = alignment_of(&metadata)?;

    let n = r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor count")?;
    let mut tensors = Vec::with_capacity(n);
    let mut names = HashSet::with_capacity(n);
    for _ in 0..n {
        let info = r.tensor_info()?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor { name: info.name });
        }
        tensors.push(info);
    }

    let data_offset = align_up(r.pos as u64, alignment).ok_or_else(|| GgufError::BadAlignment {
        detail: format!("data section offset overflows with alignment {alignment}"),
    })?;
    check_tensor_ranges(&tensors, data_offset, alignment, buf.len() as u64)?;
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

fn check_version(version: u32) -> Result<(), GgufError> {
    match version {
        2 | 3 => Ok(()),
        1 => Err(GgufError::UnsupportedVersion {
            version,
            hint: "; version 1 files (2023) use 32-bit counts, re-convert with a current llama.cpp",
        }),
        _ => Err(GgufError::UnsupportedVersion {
            version,
            hint: "; the file is corrupt or from a newer GGUF revision",
        }),
    }
}

fn read_metadata(r: &mut Reader<'_>, kv_count: u64) -> Result<Vec<(String, MetaValue)>, GgufError> {
    let n = r.check_count(kv_count, MIN_KV_BYTES, "metadata count")?;
    let mut metadata = Vec::with_capacity(n);
    let mut keys = HashSet::with_capacity(n);
    for _ in 0..n {
        let (key, value) = r.key_value()?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey { key });
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// `general.alignment` if present (must be a nonzero power-of-two u32), else the default.
fn alignment_of(metadata: &[(String, MetaValue)]) -> Result<u64, GgufError> {
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match *v {
        MetaValue::U32(a) if a.is_power_of_two() => Ok(a.into()),
        MetaValue::U32(a) => Err(GgufError::BadAlignment {
            detail: format!("expected a nonzero power of two, found {a}; the file is corrupt"),
        }),
        ref other => Err(GgufError::BadAlignment {
            detail: format!(
                "expected a u32, found {}; the file is corrupt",
                other.describe()
            ),
        }),
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    Some(x.checked_add(alignment - 1)? / alignment * alignment)
}

/// Every tensor must start aligned, lie inside the file, and not overlap another.
fn check_tensor_ranges(
    tensors: &[TensorInfo],
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    for t in tensors {
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedOffset {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = u128::from(data_offset) + u128::from(t.offset);
        let end = start + u128::from(t.n_bytes);
        if end > u128::from(file_len) {
            return Err(GgufError::DataOutOfBounds {
                tensor: t.name.clone(),
                start,
                end,
                file_len,
            });
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        // In range (checked above), so no overflow.
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(GgufError::OverlappingTensors {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

/// One tensor queued in a [`GgufWriter`].
#[derive(Clone, Debug)]
struct WriterTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    bytes: Vec<u8>,
    offset_override: Option<u64>,
}

/// Builds GGUF files in memory: for tests here and elsewhere, and for tools that write
/// small synthetic models. It writes what it is given without validating it, so tests can
/// also build deliberately broken files.
///
/// Alignment follows `general.alignment` when it is set to a nonzero power-of-two `u32`
/// (see [`GgufWriter::alignment`]), and is [`DEFAULT_ALIGNMENT`] otherwise.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<WriterTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Overrides the header version (to test version checks).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets `general.alignment` (replacing any earlier value).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
        self.metadata
            .push((ALIGNMENT_KEY.to_string(), MetaValue::U32(alignment)));
        self
    }

    /// Appends a metadata pair (duplicates are written as given).
    pub fn add_meta(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Appends a tensor; `dims` in ggml order (`dims[0]` contiguous).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        dtype: DType,
        bytes: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.add_tensor_raw(name, dims, dtype.ggml_id(), None, bytes)
    }

    /// Appends a tensor with a raw ggml type id and, optionally, the offset to record in its
    /// info instead of the real one (the bytes are laid out as usual either way). For
    /// building invalid files in tests.
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        offset_override: Option<u64>,
        bytes: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.tensors.push(WriterTensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id,
            bytes: bytes.into(),
            offset_override,
        });
        self
    }

    fn effective_alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => (*a).into(),
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// The encoded file.
    ///
    /// # Panics
    /// If a metadata array mixes element types (a programming error in the caller: GGUF
    /// arrays are homogeneous).
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.effective_alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            offsets.push(offset);
            offset = (offset + t.bytes.len()).div_ceil(alignment) * alignment;
        }
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&t.offset_override.unwrap_or(off as u64).to_le_bytes());
        }
        let data_start = out.len().div_ceil(alignment) * alignment;
        out.resize(data_start, 0);
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.bytes);
        }
        out
    }
}

/// Convenience: a file with the given metadata and `(name, dims, dtype, bytes)` tensors.
pub fn write_gguf(
    metadata: &[(&str, MetaValue)],
    tensors: &[(&str, &[u64], DType, &[u8])],
) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.add_meta(*k, v.clone());
    }
    for (name, dims, dtype, bytes) in tensors {
        w.add_tensor(*name, dims, *dtype, *bytes);
    }
    w.to_bytes()
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Array(items) => {
            // An empty array records no element type; write it as u8.
            let elem_type = items.first().map_or(T_U8, MetaValue::type_id);
            assert!(
                items.iter().all(|i| i.type_id() == elem_type),
                "GgufWriter: GGUF arrays must have one element type"
            );
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> MetaValue {
        MetaValue::String(v.to_string())
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    fn parse_err(bytes: Vec<u8>) -> GgufError {
        match GgufFile::from_bytes(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    /// A small valid file: a couple of keys and two tensors.
    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_meta("general.architecture", s("llama"))
            .add_meta("llama.block_count", MetaValue::U32(2))
            .add_tensor(
                "a",
                &[4, 2],
                DType::F32,
                f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
            )
            .add_tensor("b", &[3], DType::F32, f32_bytes(&[9., 10., 11.]));
        w
    }

    fn header_len() -> usize {
        4 + 4 + 8 + 8
    }

    #[test]
    fn round_trip_every_metadata_type() {
        let values = vec![
            ("u8", MetaValue::U8(200)),
            ("i8", MetaValue::I8(-5)),
            ("u16", MetaValue::U16(60000)),
            ("i16", MetaValue::I16(-30000)),
            ("u32", MetaValue::U32(4_000_000_000)),
            ("i32", MetaValue::I32(-2_000_000_000)),
            ("f32", MetaValue::F32(1.5e-5)),
            ("bool_t", MetaValue::Bool(true)),
            ("bool_f", MetaValue::Bool(false)),
            ("string", s("héllo ✓")),
            ("empty_string", s("")),
            ("u64", MetaValue::U64(u64::MAX)),
            ("i64", MetaValue::I64(i64::MIN)),
            ("f64", MetaValue::F64(-2.25e300)),
            (
                "arr_i32",
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
            ),
            ("arr_str", MetaValue::Array(vec![s("a"), s(""), s("ccc")])),
            (
                "arr_arr_str",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![s("x"), s("y")]),
                    MetaValue::Array(vec![]),
                    MetaValue::Array(vec![s("z")]),
                ]),
            ),
            ("arr_empty", MetaValue::Array(vec![])),
        ];
        let bytes = write_gguf(
            &values
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>(),
            &[],
        );
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert!(f.tensors.is_empty());
        assert_eq!(f.metadata.len(), values.len());
        for ((k, v), (rk, rv)) in values.iter().zip(&f.metadata) {
            assert_eq!(k, rk);
            assert_eq!(v, rv, "key {k}");
        }
        assert_eq!(f.get("u8").unwrap().as_u64(), Some(200));
        assert_eq!(f.get("i8").unwrap().as_u64(), None);
        assert_eq!(f.get("i8").unwrap().as_i64(), Some(-5));
        assert_eq!(f.get("u64").unwrap().as_i64(), None);
        assert_eq!(f.get("i32").unwrap().as_f32(), Some(-2e9));
        assert_eq!(f.get("bool_t").unwrap().as_bool(), Some(true));
        assert_eq!(f.get("string").unwrap().as_str(), Some("héllo ✓"));
        assert_eq!(f.get_str_array("arr_str").unwrap(), vec!["a", "", "ccc"]);
        let nested = f.get("arr_arr_str").unwrap().as_array().unwrap();
        assert_eq!(nested[0].as_array().unwrap()[1].as_str(), Some("y"));
    }

    #[test]
    fn typed_getters_and_errors() {
        let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_f32("llama.block_count").unwrap(), 2.0);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        let e = f.get_u64("general.architecture").unwrap_err();
        assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("general.architecture") && msg.contains("llama"),
            "{msg}"
        );
        let e = f.get_str("nope").unwrap_err();
        assert!(matches!(e, GgufError::MissingKey { .. }) && e.to_string().contains("nope"));
        assert!(matches!(
            f.get_str_array("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.tensor("zzz"),
            Err(GgufError::TensorNotFound { .. })
        ));
    }

    #[test]
    fn str_array_with_non_string_element_is_an_error() {
        let bytes = write_gguf(&[("arr", MetaValue::Array(vec![MetaValue::U8(1)]))], &[]);
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert!(matches!(
            f.get_str_array("arr"),
            Err(GgufError::WrongType { .. })
        ));
    }

    #[test]
    fn tensors_round_trip_and_shapes() {
        let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
        let a = f.tensor_info("a").unwrap();
        assert_eq!(
            (a.dims.clone(), a.dtype, a.n_bytes, a.offset),
            (vec![4, 2], DType::F32, 32, 0)
        );
        assert_eq!(f.tensor_info("b").unwrap().offset, 32);
        assert_eq!(f.data_offset % 32, 0);
        let t = f.tensor("a").unwrap();
        assert_eq!((t.rows, t.cols), (2, 4));
        assert_eq!(t.bytes(), &f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.])[..]);
        let t = f.tensor("b").unwrap();
        assert_eq!((t.rows, t.cols), (1, 3));
        assert_eq!(t.bytes(), &f32_bytes(&[9., 10., 11.])[..]);
    }

    #[test]
    fn higher_rank_tensors_collapse_trailing_ones() {
        let mut w = GgufWriter::new();
        w.add_tensor("ok", &[2, 3, 1, 1], DType::F32, vec![0u8; 24])
            .add_tensor("cube", &[2, 2, 2], DType::F32, vec![0u8; 32]);
        let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
        let t = f.tensor("ok").unwrap();
        assert_eq!((t.rows, t.cols), (3, 2));
        assert!(matches!(
            f.tensor("cube"),
            Err(GgufError::NotAMatrix { .. })
        ));
    }

    #[test]
    fn zero_copy_from_mapped_file() {
        let q8: Vec<u8> = (0..34u8 * 2).collect();
        let mut w = sample();
        w.add_tensor("q", &[32, 2], DType::Q8_0, q8.clone());
        let path =
            std::env::temp_dir().join(format!("llmflash-gguf-test-{}.gguf", std::process::id()));
        std::fs::write(&path, w.to_bytes()).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let t = f.tensor("q").unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!((t.rows, t.cols, t.dtype), (2, 32, DType::Q8_0));
        assert_eq!(t.bytes(), &q8[..]);
        assert_eq!(t.row(1), &q8[34..]);
    }

    #[test]
    fn open_missing_file_is_io_error() {
        let e = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }) && e.to_string().contains("x.gguf"));
    }

    #[test]
    fn alignment_64_is_honoured() {
        let mut w = sample();
        w.alignment(64);
        w.add_tensor("c", &[5], DType::F32, f32_bytes(&[1.; 5]));
        let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        let offsets: Vec<u64> = f.tensors.iter().map(|t| t.offset).collect();
        assert_eq!(offsets, vec![0, 64, 128]);
        assert_eq!(f.tensor("c").unwrap().bytes(), &f32_bytes(&[1.; 5])[..]);
        assert_eq!(
            f.tensor("b").unwrap().bytes(),
            &f32_bytes(&[9., 10., 11.])[..]
        );
    }

    #[test]
    fn bad_alignment_values() {
        let mut w = sample();
        w.alignment(48);
        assert!(matches!(
            parse_err(w.to_bytes()),
            GgufError::BadAlignment { .. }
        ));
        let mut w = sample();
        w.alignment(0);
        assert!(matches!(
            parse_err(w.to_bytes()),
            GgufError::BadAlignment { .. }
        ));
        let mut w = sample();
        w.add_meta(ALIGNMENT_KEY, MetaValue::U64(32));
        let e = parse_err(w.to_bytes());
        assert!(
            matches!(e, GgufError::BadAlignment { .. }) && e.to_string().contains("u64"),
            "{e}"
        );
    }

    #[test]
    fn bad_magic() {
        let mut bytes = sample().to_bytes();
        bytes[0] = b'X';
        assert!(matches!(parse_err(bytes), GgufError::BadMagic { .. }));
        assert!(matches!(
            parse_err(b"GG".to_vec()),
            GgufError::BadMagic { .. }
        ));
        assert!(matches!(parse_err(Vec::new()), GgufError::BadMagic { .. }));
    }

    #[test]
    fn versions() {
        for v in [0, 1, 4, 99] {
            let mut w = sample();
            w.version(v);
            let e = parse_err(w.to_bytes());
            assert!(
                matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
                "{e}"
            );
        }
        let mut w = sample();
        w.version(2);
        assert_eq!(GgufFile::from_bytes(w.to_bytes()).unwrap().version, 2);
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let full = sample().to_bytes();
        // Every proper prefix must fail cleanly (never panic), and with a typed error.
        for len in 0..full.len() {
            let e = parse_err(full[..len].to_vec());
            assert!(
                matches!(
                    e,
                    GgufError::BadMagic { .. }
                        | GgufError::Truncated { .. }
                        | GgufError::CountTooLarge { .. }
                        | GgufError::DataOutOfBounds { .. }
                ),
                "prefix {len}: {e}"
            );
        }
        assert!(GgufFile::from_bytes(full).is_ok());
    }

    #[test]
    fn truncated_tensor_data_names_the_tensor() {
        let mut full = sample().to_bytes();
        full.truncate(full.len() - 1);
        let e = parse_err(full);
        assert!(
            matches!(&e, GgufError::DataOutOfBounds { tensor, .. } if tensor == "b"),
            "{e}"
        );
    }

    #[test]
    fn truncated_value_names_the_key() {
        let bytes = write_gguf(&[("some.key", s("a long string value"))], &[]);
        // Header, key (8 + 8), type (4), length (8), then 19 bytes of value; cut 3 short.
        let end = header_len() + 16 + 4 + 8 + 19;
        let e = parse_err(bytes[..end - 3].to_vec());
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("some.key"), "{e}");
    }

    #[test]
    fn absurd_string_length() {
        let mut bytes = write_gguf(&[("k", s("v"))], &[]);
        // The value's length field: header, key (8 + 1), type (4).
        let at = header_len() + 9 + 4;
        bytes[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let e = parse_err(bytes);
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // Key length too.
        let mut bytes = write_gguf(&[("k", s("v"))], &[]);
        bytes[header_len()..header_len() + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse_err(bytes), GgufError::Truncated { .. }));
    }

    #[test]
    fn absurd_array_count() {
        let mut bytes = write_gguf(&[("k", MetaValue::Array(vec![s("a")]))], &[]);
        // Header, key (8 + 1), type (4), element type (4), then the count.
        let at = header_len() + 9 + 4 + 4;
        bytes[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let e = parse_err(bytes);
        assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
        assert!(e.to_string().contains('k'));
    }

    #[test]
    fn absurd_tensor_and_kv_counts() {
        let mut bytes = sample().to_bytes();
        bytes[8..16].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(matches!(parse_err(bytes), GgufError::CountTooLarge { .. }));
        let mut bytes = sample().to_bytes();
        bytes[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(parse_err(bytes), GgufError::CountTooLarge { .. }));
    }

    #[test]
    fn invalid_utf8_key_is_an_error_value_is_lossy() {
        let mut bytes = write_gguf(&[("k", s("v"))], &[]);
        bytes[header_len() + 8] = 0xff; // the key's only byte
        assert!(matches!(parse_err(bytes), GgufError::InvalidUtf8 { .. }));

        let mut bytes = write_gguf(&[("k", s("v"))], &[]);
        let at = header_len() + 9 + 4 + 8; // the value's only byte
        bytes[at] = 0xff;
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.get_str("k").unwrap(), "\u{fffd}");

        let mut w = GgufWriter::new();
        w.add_tensor("t", &[1], DType::F32, vec![0u8; 4]);
        let mut bytes = w.to_bytes();
        bytes[header_len() + 8] = 0xc3; // truncated 2-byte sequence as the name
        assert!(matches!(parse_err(bytes), GgufError::InvalidUtf8 { .. }));
    }

    #[test]
    fn unknown_metadata_value_type() {
        let mut bytes = write_gguf(&[("k", MetaValue::U8(1))], &[]);
        let at = header_len() + 9;
        bytes[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
        let e = parse_err(bytes);
        assert!(
            matches!(&e, GgufError::UnknownValueType { key, type_id: 13 } if key == "k"),
            "{e}"
        );
        // Unknown element type inside an array.
        let mut bytes = write_gguf(&[("k", MetaValue::Array(vec![MetaValue::U8(1)]))], &[]);
        let at = header_len() + 9 + 4;
        bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
        assert!(matches!(
            parse_err(bytes),
            GgufError::UnknownValueType { type_id: 77, .. }
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = MetaValue::Array(vec![MetaValue::U8(1)]);
        for _ in 0..MAX_ARRAY_DEPTH {
            v = MetaValue::Array(vec![v]);
        }
        let e = parse_err(write_gguf(&[("deep", v)], &[]));
        assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
    }

    #[test]
    fn unknown_tensor_type() {
        let mut w = GgufWriter::new();
        w.add_tensor_raw("blk.0.weird", &[32], 99, None, vec![0u8; 64]);
        let e = parse_err(w.to_bytes());
        assert!(
            matches!(&e, GgufError::UnknownTensorType { type_id: 99, tensor } if tensor == "blk.0.weird")
        );
        let msg = e.to_string();
        assert!(
            msg.contains("99") && msg.contains("Q8_0") && msg.contains("blk.0.weird"),
            "{msg}"
        );
    }

    #[test]
    fn bad_dims() {
        let cases: Vec<(&[u64], DType)> = vec![
            (&[], DType::F32),
            (&[1, 1, 1, 1, 1], DType::F32),
            (&[4, 0], DType::F32),
            (&[u64::MAX, 2], DType::F32),
            (&[1 << 32, 1 << 32], DType::F32),
            (&[48, 2], DType::Q8_0),
            (&[128], DType::Q4K),
        ];
        for (dims, dtype) in cases {
            let mut w = GgufWriter::new();
            w.add_tensor("t", dims, dtype, vec![0u8; 64]);
            let e = parse_err(w.to_bytes());
            assert!(
                matches!(&e, GgufError::BadDims { tensor, .. } if tensor == "t"),
                "{dims:?}: {e}"
            );
        }
    }

    #[test]
    fn misaligned_offset() {
        let mut w = GgufWriter::new();
        w.add_tensor_raw("t", &[1], 0, Some(4), vec![0u8; 64]);
        let e = parse_err(w.to_bytes());
        assert!(
            matches!(
                e,
                GgufError::MisalignedOffset {
                    offset: 4,
                    alignment: 32,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn offset_past_end_or_overflowing() {
        for off in [1u64 << 20, u64::MAX - 31] {
            let mut w = GgufWriter::new();
            w.add_tensor_raw("t", &[8], 0, Some(off), vec![0u8; 32]);
            let e = parse_err(w.to_bytes());
            assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e}");
        }
    }

    #[test]
    fn overlapping_tensors() {
        let mut w = GgufWriter::new();
        w.add_tensor("a", &[16], DType::F32, vec![0u8; 64])
            .add_tensor_raw("b", &[8], 0, Some(32), vec![0u8; 32]);
        let e = parse_err(w.to_bytes());
        assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
    }

    #[test]
    fn duplicate_tensor_names() {
        let mut w = GgufWriter::new();
        w.add_tensor("t", &[1], DType::F32, vec![0u8; 4])
            .add_tensor("t", &[1], DType::F32, vec![0u8; 4]);
        assert!(
            matches!(parse_err(w.to_bytes()), GgufError::DuplicateTensor { name } if name == "t")
        );
    }

    #[test]
    fn duplicate_metadata_keys() {
        let bytes = write_gguf(&[("k", MetaValue::U8(1)), ("k", MetaValue::U8(2))], &[]);
        assert!(matches!(parse_err(bytes), GgufError::DuplicateKey { key } if key == "k"));
    }

    #[test]
    fn fuzz_single_byte_corruption_never_panics() {
        let mut w = sample();
        w.add_meta(
            "arr",
            MetaValue::Array(vec![MetaValue::Array(vec![s("x")])]),
        );
        let full = w.to_bytes();
        for i in 0..full.len() {
            for b in [0u8, 0x7f, 0xff] {
                let mut bytes = full.clone();
                bytes[i] = b;
                if let Ok(f) = GgufFile::from_bytes(bytes) {
                    for t in &f.tensors {
                        let _ = f.tensor(&t.name);
                    }
                }
            }
        }
    }

    /// A file written by llama.cpp's own `gguf` Python package (gguf-py 0.x `GGUFWriter`),
    /// so the reader is checked against the reference writer, not only against ours.
    const GGUF_PY_FILE_HEX: &[&str] = &[
        "474755460300000003000000000000000700000000000000140000000000000067656e6572616c2e61726368",
        "69746563747572650800000005000000000000006c6c616d6111000000000000006c6c616d612e626c6f636b",
        "5f636f756e74040000001e00000026000000000000006c6c616d612e617474656e74696f6e2e6c617965725f",
        "6e6f726d5f726d735f657073696c6f6e06000000acc527371c00000000000000746f6b656e697a65722e6767",
        "6d6c2e6164645f626f735f746f6b656e07000000011500000000000000746f6b656e697a65722e67676d6c2e",
        "746f6b656e730900000008000000030000000000000003000000000000003c733e060000000000000068c3a9",
        "6c6c6f01000000000000006206000000000000006e6573746564090000000900000002000000000000000800",
        "0000020000000000000001000000000000007801000000000000007908000000010000000000000001000000",
        "000000007a03000000000000006936340b000000f9ffffffffffffff0800000000000000742e776569676874",
        "02000000200000000000000002000000000000000000000000000000000000000800000000000000712e7765",
        "6967687402000000200000000000000002000000000000000800000000010000000000000100000000000000",
        "68010000000700000000000000010000006001000000000000000000000000000000803f0000004000004040",
        "000080400000a0400000c0400000e04000000041000010410000204100003041000040410000504100006041",
        "00007041000080410000884100009041000098410000a0410000a8410000b0410000b8410000c0410000c841",
        "0000d0410000d8410000e0410000e8410000f0410000f84100000042000004420000084200000c4200001042",
        "000014420000184200001c4200002042000024420000284200002c4200003042000034420000384200003c42",
        "00004042000044420000484200004c4200005042000054420000584200005c42000060420000644200006842",
        "00006c4200007042000074420000784200007c42000102030405060708090a0b0c0d0e0f1011121314151617",
        "18191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40414243",
        "00000000000000000000000000000000000000000000000000000000003c003c003c003c003c003c003c0000",
        "00000000000000000000000000000000",
    ];

    #[test]
    fn reads_file_written_by_gguf_py() {
        let hex: String = GGUF_PY_FILE_HEX.concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
        assert_eq!(
            f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            1e-5
        );
        assert_eq!(
            f.get("tokenizer.ggml.add_bos_token").unwrap().as_bool(),
            Some(true)
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            vec!["<s>", "héllo", "b"]
        );
        let nested = f.get("nested").unwrap().as_array().unwrap();
        assert_eq!(nested[1].as_array().unwrap()[0].as_str(), Some("z"));
        assert_eq!(f.get("i64").unwrap().as_i64(), Some(-7));
        let t = f.tensor("t.weight").unwrap();
        assert_eq!((t.dtype, t.rows, t.cols), (DType::F32, 2, 32));
        let want: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert_eq!(t.bytes(), &f32_bytes(&want)[..]);
        let q = f.tensor("q.weight").unwrap();
        assert_eq!((q.dtype, q.rows, q.cols), (DType::Q8_0, 2, 32));
        assert_eq!(q.bytes(), &(0..68u8).collect::<Vec<_>>()[..]);
        let h = f.tensor("h").unwrap();
        assert_eq!((h.dtype, h.rows, h.cols), (DType::F16, 1, 7));
        assert_eq!(h.bytes(), &[0x00, 0x3c].repeat(7)[..]);
    }

    #[test]
    fn large_vocabulary_parses() {
        let tokens: Vec<MetaValue> = (0..150_000).map(|i| s(&format!("tok{i}"))).collect();
        let bytes = write_gguf(&[("tokenizer.ggml.tokens", MetaValue::Array(tokens))], &[]);
        let start = std::time::Instant::now();
        let f = GgufFile::from_bytes(bytes).unwrap();
        let toks = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        eprintln!("150k-token vocabulary parsed in {:?}", start.elapsed());
        assert_eq!((toks.len(), toks[149_999]), (150_000, "tok149999"));
    }

    /// Finds a real GGUF model under `models/` (SmolLM2 preferred).
    fn real_model() -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        found.sort_by_key(|p| !p.to_string_lossy().contains("SmolLM2-135M-Instruct"));
        found.into_iter().next()
    }

    /// Opens whatever `models/*.gguf` exists (skips if none) and loads every tensor; for
    /// SmolLM2-135M-Instruct also checks known facts about the file.
    #[test]
    fn opens_real_model_if_present() {
        let Some(path) = real_model() else {
            eprintln!("skipping: no models/*.gguf (run the model fetch script)");
            return;
        };
        let start = std::time::Instant::now();
        let f = GgufFile::open(&path).unwrap();
        eprintln!("parsed {} in {:?}", path.display(), start.elapsed());
        assert!(f.version == 2 || f.version == 3);
        for info in &f.tensors {
            if matrix_shape(&info.dims).is_some() {
                f.tensor(&info.name).unwrap();
            }
        }
        if !path.to_string_lossy().contains("SmolLM2-135M-Instruct") {
            eprintln!(
                "{} is not SmolLM2-135M-Instruct; skipping its checks",
                path.display()
            );
            return;
        }
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
        let emb = f.tensor_info("token_embd.weight").unwrap();
        assert_eq!(
            (emb.dtype, emb.dims.clone()),
            (DType::Q8_0, vec![576, 49152])
        );
        let gate = f.tensor_info("blk.0.ffn_gate.weight").unwrap();
        assert_eq!(
            (gate.dtype, gate.dims.clone()),
            (DType::Q4_1, vec![576, 1536])
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
            49152
        );
        let t = f.tensor("token_embd.weight").unwrap();
        assert_eq!((t.rows, t.cols), (49152, 576));
    }
}
