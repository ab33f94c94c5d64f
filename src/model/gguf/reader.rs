//! Parsing: the bounds-checked [`Reader`], the header, metadata and tensor table, and
//! [`GgufFile`], which hands out the tensors.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use super::value::{
    min_value_bytes, MetaValue, T_ARRAY, T_BOOL, T_F32, T_F64, T_I16, T_I32, T_I64, T_I8, T_STRING,
    T_U16, T_U32, T_U64, T_U8,
};
use super::{GgufError, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::model::tensor::{Storage, Tensor};
use crate::quant::DType;

/// Smallest possible encoded size of one metadata key/value pair: an empty key (8-byte
/// length), a type (4) and a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoded tensor info: empty name (8), n_dims (4), one dim (8), type (4),
/// offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

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
pub(super) fn matrix_shape(dims: &[u64]) -> Option<(usize, usize)> {
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
