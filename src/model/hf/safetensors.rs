//! The weights: `*.safetensors` files (one, or shards listed by [`INDEX_FILE`]), each
//! memory-mapped and its header validated.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;
use serde_json::Value;

use super::{read_small_file, HfError, INDEX_FILE};
use crate::model::tensor::{Storage, Tensor};
use crate::quant::DType;

/// Largest JSON header accepted (the safetensors crate uses the same bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Deserialize)]
pub(super) struct IndexFile {
    pub(super) weight_map: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Finds the model's safetensors files and loads all their tensors, checking that no tensor
/// is defined twice and (with an index) that the index matches the shards.
pub(super) fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>, HfError> {
    let index_path = dir.join(INDEX_FILE);
    let mut index: Option<BTreeMap<String, String>> = None;
    let files: Vec<PathBuf> = if index_path.is_file() {
        let text = read_small_file(&index_path)?;
        let parsed: IndexFile = serde_json::from_str(&text).map_err(|e| HfError::BadIndex {
            file: index_path.clone(),
            detail: format!(
                "expected {{\"weight_map\": {{tensor name: shard file}}}}, could not parse it: {e}"
            ),
        })?;
        if parsed.weight_map.is_empty() {
            return Err(HfError::BadIndex {
                file: index_path,
                detail: "weight_map is empty; expected it to list every tensor".to_string(),
            });
        }
        // Shards in first-mention order of the sorted map would be arbitrary; sort by name.
        let mut shards: Vec<&String> = parsed.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut files = Vec::with_capacity(shards.len());
        for shard in shards {
            let plain = Path::new(shard)
                .file_name()
                .is_some_and(|f| f == std::ffi::OsStr::new(shard.as_str()));
            if !plain {
                return Err(HfError::BadIndex {
                    file: index_path,
                    detail: format!(
                        "shard `{shard}` is not a plain file name; expected shards beside the index"
                    ),
                });
            }
            let path = dir.join(shard);
            if !path.is_file() {
                let tensor = parsed
                    .weight_map
                    .iter()
                    .find(|(_, s)| *s == shard)
                    .map(|(t, _)| t.clone())
                    .unwrap_or_default();
                return Err(HfError::MissingShard {
                    index: index_path,
                    shard: shard.clone(),
                    tensor,
                });
            }
            files.push(path);
        }
        index = Some(parsed.weight_map);
        files
    } else {
        let rd = fs::read_dir(dir).map_err(|error| HfError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let mut files = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|error| HfError::Io {
                path: dir.to_path_buf(),
                error,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        files
    };
    if files.is_empty() {
        return Err(HfError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }

    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut origin: HashMap<String, usize> = HashMap::new();
    for (i, file) in files.iter().enumerate() {
        for t in read_safetensors(file)? {
            if let Some(&j) = origin.get(&t.name) {
                return Err(HfError::DuplicateTensor {
                    name: t.name,
                    first: files[j].clone(),
                    second: file.clone(),
                });
            }
            origin.insert(t.name.clone(), i);
            tensors.insert(t.name.clone(), t);
        }
    }

    if let Some(map) = index {
        for (name, shard) in &map {
            let found_in = origin.get(name).map(|&i| &files[i]);
            let ok = found_in.is_some_and(|f| f.file_name() == Some(std::ffi::OsStr::new(shard)));
            // A non-weight buffer with an integer dtype was skipped on purpose.
            let skipped = found_in.is_none() && skipped_buffer_name(name);
            if !(ok || skipped) {
                let found = match found_in {
                    Some(f) => format!("it is in `{}`", f.display()),
                    None => "that shard does not contain it".to_string(),
                };
                return Err(HfError::BadIndex {
                    file: index_path.clone(),
                    detail: format!("maps tensor `{name}` to shard `{shard}`, but {found}"),
                });
            }
        }
    }

    // Some OPT checkpoints drop the `model.` prefix; make both spellings resolve.
    let aliases: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("decoder."))
        .map(|(k, t)| (format!("model.{k}"), t.clone()))
        .filter(|(k, _)| !tensors.contains_key(k))
        .collect();
    tensors.extend(aliases);
    Ok(tensors)
}

/// Names under which a non-float (skipped) buffer is acceptable in an index.
fn skipped_buffer_name(name: &str) -> bool {
    !(name.ends_with(".weight") || name.ends_with(".bias"))
}

/// Non-float dtypes that mark buffers (position ids, masks), not weights.
fn is_integer_dtype(dtype: &str) -> bool {
    matches!(
        dtype,
        "BOOL" | "U8" | "I8" | "U16" | "I16" | "U32" | "I32" | "U64" | "I64"
    )
}

/// One tensor of a safetensors file, as [`parse_safetensors`] validated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: DType,
    /// Leading dimensions flattened (1 for 0-D and 1-D tensors).
    pub rows: usize,
    pub cols: usize,
    /// Byte range of the tensor's data in the file (absolute: after the header).
    pub offset: usize,
    pub len: usize,
}

/// Maps one safetensors file and returns its F32/F16/BF16 tensors, borrowing the map.
fn read_safetensors(path: &Path) -> Result<Vec<Tensor>, HfError> {
    let bad = |detail: String| HfError::BadFile {
        file: path.to_path_buf(),
        detail,
    };
    let io = |error| HfError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    // SAFETY: the file is mapped read-only and never written by this process. As with every
    // memory map, another process truncating or rewriting the file while it is mapped is
    // outside what we can guard against.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let map = Arc::new(map);
    let entries = parse_safetensors(path, &map)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let storage = Storage::Mapped {
            map: Arc::clone(&map),
            offset: e.offset,
            len: e.len,
        };
        let t = Tensor::new(e.name.clone(), e.dtype, e.rows, e.cols, storage).map_err(|err| {
            HfError::BadTensor {
                file: path.to_path_buf(),
                name: e.name,
                detail: err.to_string(),
            }
        })?;
        out.push(t);
    }
    Ok(out)
}

/// Parses and validates the header of a safetensors file held in `bytes` (the whole file):
/// the header length, the JSON, each entry's dtype, shape and data range. Integer buffers
/// that models carry but do not use are skipped; other dtypes than F32/F16/BF16 are refused.
/// `path` only names the file in errors. Pure parsing (no I/O), used by the loader and by
/// the fuzz targets.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<SafetensorsEntry>, HfError> {
    let bad = |detail: String| HfError::BadFile {
        file: path.to_path_buf(),
        detail,
    };
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }

    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} is larger than the {} bytes after it",
            file_len - 8
        )));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    // Both fit in usize: they are bounded by the length of a slice.
    let data_start = 8 + header_len as usize;
    let data_len = (file_len - 8 - header_len) as usize;
    let header_bytes = &bytes[8..data_start];
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(header_bytes).map_err(|e| {
            bad(format!(
                "header is not a JSON object ({e}); expected {{name: {{dtype, shape, data_offsets}}}}"
            ))
        })?;

    let mut out = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad_t = |detail: String| HfError::BadTensor {
            file: path.to_path_buf(),
            name: name.clone(),
            detail,
        };
        let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
            bad_t(format!(
                "header entry is malformed ({e}); expected {{\"dtype\", \"shape\", \"data_offsets\": [begin, end]}}"
            ))
        })?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other if is_integer_dtype(other) && skipped_buffer_name(&name) => {
                log::debug!("{}: skipping {other} buffer `{name}`", path.display());
                continue;
            }
            other => {
                return Err(HfError::UnsupportedDType {
                    file: path.to_path_buf(),
                    name,
                    dtype: other.to_string(),
                })
            }
        };

        let shape_str = format!("{:?}", entry.shape);
        let mut n: u64 = 1;
        for &d in &entry.shape {
            n = n
                .checked_mul(d)
                .ok_or_else(|| bad_t(format!("shape {shape_str} overflows")))?;
        }
        let (rows, cols) = match entry.shape.as_slice() {
            [] => (1, 1),
            [c] => (1, *c),
            // Higher ranks: leading dims flatten into rows (cannot overflow: a prefix of n).
            [lead @ .., c] => (lead.iter().fold(1u64, |a, &d| a.saturating_mul(d)), *c),
        };
        let elem = dtype.block_bytes() as u64;
        let want = n
            .checked_mul(elem)
            .ok_or_else(|| bad_t(format!("shape {shape_str} of {dtype} overflows")))?;

        let [begin, end] = entry.data_offsets;
        if end < begin {
            return Err(bad_t(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        if end > data_len as u64 {
            return Err(bad_t(format!(
                "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes)"
            )));
        }
        if end - begin != want {
            return Err(bad_t(format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape_str} of {dtype} needs {want}",
                end - begin
            )));
        }
        // All three are now bounded by the mapped length.
        let (Ok(rows), Ok(cols)) = (usize::try_from(rows), usize::try_from(cols)) else {
            return Err(bad_t(format!("shape {shape_str} does not fit in memory")));
        };
        out.push(SafetensorsEntry {
            name,
            dtype,
            rows,
            cols,
            offset: data_start + begin as usize,
            len: (end - begin) as usize,
        });
    }
    Ok(out)
}
