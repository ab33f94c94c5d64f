//! [`GgufWriter`]: builds GGUF files in memory, for tests and tools.

use super::value::{MetaValue, T_U8};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::quant::DType;

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
