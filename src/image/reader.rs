//! Opening, validating and reading an image.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::{
    crc32, BlobEntry, BundleLayout, FfnSection, ImageError, ImageMeta, PartRole, TensorEntry,
    ALIGN, FORMAT_VERSION,
};
use crate::model::loader::TokenizerSource;
use crate::model::tensor::{Storage, Tensor};
use crate::model::weights::{
    gguf_extra_norm_names, Attention, ExtraNorms, FfnBias, Layer, Linear, ModelWeights, Norm,
};
use crate::quant::{self, Activations};

/// An open, validated flash image, memory-mapped.
#[derive(Clone)]
pub struct FlashImage {
    pub meta: ImageMeta,
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Resident tensors read into process memory (see [`FlashImage::open_loaded`]); when
    /// `None`, tensors are slices of the map.
    owned: Option<std::collections::HashMap<String, Arc<Vec<u8>>>>,
}

impl std::fmt::Debug for FlashImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlashImage({})", self.path.display())
    }
}

impl FlashImage {
    /// Maps and validates `path`: magic, version, header and metadata checksums, the
    /// metadata's consistency with the config, that every tensor and FFN section lies inside
    /// the file and is aligned, and the checksum of every resident tensor. FFN sections are
    /// not hashed here (see [`FlashImage::verify_ffn`]).
    pub fn open(path: &Path) -> Result<FlashImage, ImageError> {
        let io = |action: &'static str| ImageError::io(path, action);
        // A FIFO would block `open`: only a regular file is opened.
        crate::storage::input::regular_file(path).map_err(io("cannot open"))?;
        let file = File::open(path).map_err(io("cannot open"))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, we assume the file
        // is not truncated or rewritten by another process while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io("cannot map"))?;
        let meta = validate(path, &map, true)?;
        Ok(FlashImage {
            meta,
            path: path.to_path_buf(),
            map: Arc::new(map),
            owned: None,
        })
    }

    /// Validates an image held in memory exactly as [`FlashImage::open`] validates a mapped
    /// file (header, checksums, metadata, ranges, resident-tensor checksums) and returns its
    /// metadata; `path` only names the image in errors. Pure parsing, for fuzzing and tools.
    pub fn validate_bytes(path: &Path, bytes: &[u8]) -> Result<ImageMeta, ImageError> {
        validate(path, bytes, true)
    }

    /// Like [`FlashImage::open`], but reads the resident tensors into process memory with
    /// direct reads (when `direct`), checking their checksums there. Memory-mapped tensors
    /// live in the page cache, which the kernel may evict under a memory cap and read again
    /// on the next token; owned ones are counted in RSS and stay, so a memory budget holds.
    /// Tensors named in `skip` stay mapped (and untouched: the caller streams them or reads
    /// them itself).
    pub fn open_loaded(path: &Path, direct: bool, skip: &[&str]) -> Result<FlashImage, ImageError> {
        use crate::storage::{CoalesceOptions, FlashFile, ReadPool};
        let file = crate::storage::input::regular_file(path)
            .and_then(|_| File::open(path))
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                action: "cannot open",
                error: source,
            })?;
        // SAFETY: as in `open`.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            action: "cannot map",
            error: source,
        })?;
        // Only the metadata is read through the map, and the streamed tables row by row:
        // readahead would fill the page cache (counted against a memory cap) with pages of
        // tensors that are read directly instead.
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        let meta = validate(path, &map, false)?;
        let flash = FlashFile::open(path, direct)?;
        let pool = ReadPool::new(Arc::new(flash), 4);
        // Read in pieces of at most PIECE bytes, a few at a time, straight into each tensor's
        // own buffer: the staging area stays small, so the peak RSS is the tensors alone.
        const PIECE: usize = 1 << 20;
        const BATCH: usize = 4;
        let loaded = |t: &TensorEntry| !skip.contains(&t.name.as_str());
        let mut buffers: Vec<Vec<u8>> = meta
            .tensors
            .iter()
            .map(|t| vec![0u8; if loaded(t) { t.len as usize } else { 0 }])
            .collect();
        let mut pieces: Vec<(u64, usize, usize, usize)> = Vec::new(); // offset, len, tensor, at
        for (i, t) in meta.tensors.iter().enumerate().filter(|(_, t)| loaded(t)) {
            let mut at = 0;
            while at < t.len as usize {
                let len = PIECE.min(t.len as usize - at);
                pieces.push((t.offset + at as u64, len, i, at));
                at += len;
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        for batch in pieces.chunks(BATCH) {
            let ranges: Vec<(u64, usize)> = batch.iter().map(|p| (p.0, p.1)).collect();
            pool.read_ranges(&ranges, &CoalesceOptions::default(), &mut |k, bytes| {
                let (_, len, i, at) = batch[k];
                buffers[i][at..at + len].copy_from_slice(bytes);
            })?;
        }
        drop(pool);
        let mut bad = None;
        let mut owned = std::collections::HashMap::with_capacity(buffers.len());
        for (t, bytes) in meta.tensors.iter().zip(buffers) {
            if !loaded(t) {
                continue;
            }
            let computed = crc32(&bytes);
            if computed != t.crc32 && bad.is_none() {
                bad = Some((t.name.clone(), t.crc32, computed));
            }
            owned.insert(t.name.clone(), Arc::new(bytes));
        }
        if let Some((name, stored, computed)) = bad {
            return Err(ImageError::Checksum {
                path: path.to_path_buf(),
                what: format!("tensor {name}"),
                stored,
                computed,
            });
        }
        Ok(FlashImage {
            meta,
            path: path.to_path_buf(),
            map: Arc::new(map),
            owned: Some(owned),
        })
    }

    /// Bytes of tensors read into process memory by [`FlashImage::open_loaded`] (0 for a
    /// mapped image).
    pub fn owned_bytes(&self) -> u64 {
        (self.owned.iter().flat_map(|o| o.values()))
            .map(|b| b.len() as u64)
            .sum()
    }

    /// Hashes every FFN section and compares with the recorded checksums.
    pub fn verify_ffn(&self) -> Result<(), ImageError> {
        use rayon::prelude::*;
        self.meta.ffn.par_iter().try_for_each(|s| {
            let bytes = self.range(s.offset, s.len);
            let computed = crc32(bytes);
            if computed != s.crc32 {
                return Err(ImageError::Checksum {
                    path: self.path.clone(),
                    what: format!("the FFN section of layer {}", s.layer),
                    stored: s.crc32,
                    computed,
                });
            }
            Ok(())
        })
    }

    /// Bytes `offset..offset + len` of the map (ranges validated at open).
    fn range(&self, offset: u64, len: u64) -> &[u8] {
        &self.map[offset as usize..(offset + len) as usize]
    }

    fn err(&self, detail: String) -> ImageError {
        ImageError::Meta {
            path: self.path.clone(),
            detail,
        }
    }

    fn tensor_entry(&self, name: &str) -> Option<&TensorEntry> {
        self.meta.tensor(name)
    }

    /// A resident tensor as a zero-copy slice of the image.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, ImageError> {
        let Some(e) = self.tensor_entry(name) else {
            return Ok(None);
        };
        let storage = match self.owned.as_ref().and_then(|o| o.get(name)) {
            Some(bytes) => Storage::Owned(bytes.clone()),
            None => Storage::Mapped {
                map: self.map.clone(),
                offset: e.offset as usize,
                len: e.len as usize,
            },
        };
        Tensor::new(&e.name, e.dtype, e.rows, e.cols, storage)
            .map(Some)
            .map_err(|x| self.err(x.to_string()))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor, ImageError> {
        let t = self
            .tensor(name)?
            .ok_or_else(|| self.err(format!("tensor `{name}` is missing")))?;
        if t.rows != rows || t.cols != cols {
            return Err(self.err(format!(
                "tensor `{name}` is {} x {}, expected {rows} x {cols}",
                t.rows, t.cols
            )));
        }
        Ok(t)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ImageError> {
        let Some(t) = self.tensor(name)? else {
            return Ok(None);
        };
        if t.len() != len {
            return Err(self.err(format!(
                "tensor `{name}` has {} values, expected {len}",
                t.len()
            )));
        }
        let mut out = vec![0f32; len];
        quant::dequantize(t.dtype, t.bytes(), &mut out)
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
        Ok(Some(out))
    }

    fn required_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ImageError> {
        self.vector(name, len)?
            .ok_or_else(|| self.err(format!("tensor `{name}` is missing")))
    }

    fn linear(&self, prefix: &str, rows: usize, cols: usize) -> Result<Linear, ImageError> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), rows, cols)?,
            bias: self.vector(&format!("{prefix}.bias"), rows)?,
        })
    }

    fn norm(&self, prefix: &str, len: usize) -> Result<Norm, ImageError> {
        Ok(Norm {
            weight: self.required_vector(&format!("{prefix}.weight"), len)?,
            bias: self.vector(&format!("{prefix}.bias"), len)?,
        })
    }

    /// The resident weights, zero copy (norms and biases are copied into `Vec<f32>`). Every
    /// layer has `ffn: None`: the FFN lives in the bundles.
    pub fn weights(&self) -> Result<ModelWeights, ImageError> {
        let c = &self.meta.config;
        let (v, d, e, f) = (
            c.vocab_size,
            c.hidden_size,
            c.embed_dim,
            c.intermediate_size,
        );
        let (q_dim, kv) = (c.n_heads * c.head_dim, c.kv_dim());
        let embed = self.matrix("token_embd.weight", v, e)?;
        let lm_head = match self.tensor_entry("output.weight") {
            Some(_) => self.matrix("output.weight", v, e)?,
            None => embed.clone(),
        };
        let positions = self.tensor("position_embd.weight")?;
        if let Some(p) = &positions {
            if p.cols != d || p.rows <= self.meta.position_offset {
                return Err(self.err(format!(
                    "position table is {} x {}, expected at least {} x {d}",
                    p.rows,
                    p.cols,
                    self.meta.position_offset + 1
                )));
            }
        }
        let project_in = match self.tensor_entry("project_in.weight") {
            Some(_) => Some(self.linear("project_in", d, e)?),
            None => None,
        };
        let project_out = match self.tensor_entry("project_out.weight") {
            Some(_) => Some(self.linear("project_out", e, d)?),
            None => None,
        };
        let final_norm = match self.tensor_entry("output_norm.weight") {
            Some(_) => Some(self.norm("output_norm", d)?),
            None => None,
        };
        let layers = (0..c.n_layers)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Layer {
                    attn_norm: self.norm(&format!("{p}.attn_norm"), d)?,
                    attn: Attention {
                        q: self.linear(&format!("{p}.attn_q"), q_dim, d)?,
                        k: self.linear(&format!("{p}.attn_k"), kv, d)?,
                        v: self.linear(&format!("{p}.attn_v"), kv, d)?,
                        o: self.linear(&format!("{p}.attn_output"), d, q_dim)?,
                    },
                    ffn_norm: self.norm(&format!("{p}.ffn_norm"), d)?,
                    ffn: None,
                    ffn_bias: FfnBias {
                        up: self.vector(&format!("{p}.ffn_up.bias"), f)?,
                        down: self.vector(&format!("{p}.ffn_down.bias"), d)?,
                    },
                    extra_norms: {
                        let [q, k, pa, pf] = gguf_extra_norm_names(i);
                        let opt =
                            |name: &str, len| match self.tensor_entry(&format!("{name}.weight")) {
                                Some(_) => self.norm(name, len).map(Some),
                                None => Ok(None),
                            };
                        ExtraNorms {
                            q: opt(&q, c.head_dim)?,
                            k: opt(&k, c.head_dim)?,
                            post_attn: opt(&pa, d)?,
                            post_ffn: opt(&pf, d)?,
                        }
                    },
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        Ok(ModelWeights {
            config: c.clone(),
            embed,
            position_offset: if positions.is_some() {
                self.meta.position_offset
            } else {
                0
            },
            positions,
            project_in,
            project_out,
            layers,
            final_norm,
            lm_head,
            activations: Activations::default(),
        })
    }

    pub fn tokenizer_source(&self) -> Option<&TokenizerSource> {
        self.meta.tokenizer.as_ref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.meta.chat_template.as_deref()
    }

    /// The FFN section of `layer`. Panics if `layer >= n_layers` (a caller bug: the number of
    /// sections was checked against the config at open).
    pub fn ffn_section(&self, layer: usize) -> &FfnSection {
        &self.meta.ffn[layer]
    }

    pub fn bundle(&self) -> &BundleLayout {
        &self.meta.bundle
    }

    /// The file offset of the bundle in `disk_slot` of `layer`'s section: where every reader
    /// (window, lookahead, naive, GPU staging) finds a neuron.
    pub fn bundle_offset(&self, layer: usize, disk_slot: usize) -> u64 {
        self.meta.ffn[layer].offset + disk_slot as u64 * self.meta.bundle.stride as u64
    }

    /// The `stride` bytes of the bundle in `disk_slot` of `layer`'s section. Panics on an
    /// out-of-range layer or slot (a caller bug; sizes were validated at open).
    pub fn bundle_bytes(&self, layer: usize, disk_slot: usize) -> &[u8] {
        let s = &self.meta.ffn[layer];
        assert!(
            disk_slot < s.n_neurons,
            "bundle slot {disk_slot} out of range (layer {layer} has {})",
            s.n_neurons
        );
        let stride = self.meta.bundle.stride as u64;
        self.range(self.bundle_offset(layer, disk_slot), stride)
    }

    /// Checks `bytes`, just read from disk slot `disk_slot` of `layer`'s section, against the
    /// bundle's recorded checksum; a mismatch names the file offset. Slots were validated at
    /// open; one out of range is a mismatch too, never a panic.
    pub fn check_bundle(
        &self,
        layer: usize,
        disk_slot: usize,
        bytes: &[u8],
    ) -> Result<(), crate::storage::StorageError> {
        let s = &self.meta.ffn[layer];
        let stored = s.bundle_crc32c.get(disk_slot).copied().unwrap_or(!0);
        let computed = super::bundle_checksum(bytes);
        if computed == stored {
            return Ok(());
        }
        Err(crate::storage::StorageError::Checksum {
            path: self.path.clone(),
            offset: s.offset + (disk_slot * self.meta.bundle.stride) as u64,
            len: bytes.len(),
            stored,
            computed,
        })
    }

    /// Checks each bundle of `bytes`, the consecutive disk slots of `layer` from `first_slot`.
    pub fn check_bundles(
        &self,
        layer: usize,
        first_slot: usize,
        bytes: &[u8],
    ) -> Result<(), crate::storage::StorageError> {
        use rayon::prelude::*;
        let stride = self.meta.bundle.stride.max(1);
        // On the worker threads: a whole layer's tail is tens of MB, ~10 GB/s per core.
        bytes
            .par_chunks_exact(stride)
            .enumerate()
            .try_for_each(|(k, b)| self.check_bundle(layer, first_slot + k, b))
    }

    /// The whole FFN section of `layer` (`n_neurons * stride` bytes).
    pub fn section_bytes(&self, layer: usize) -> &[u8] {
        let s = &self.meta.ffn[layer];
        self.range(s.offset, s.len)
    }

    pub fn file(&self) -> &Path {
        &self.path
    }

    pub fn extra(&self, key: &str) -> Option<&Value> {
        self.meta.extra.get(key)
    }

    /// The blob `name` appended under `extra[key]`, checksum-verified.
    pub fn blob(&self, key: &str, name: &str) -> Result<&[u8], ImageError> {
        let missing = || ImageError::MissingExtra {
            path: self.path.clone(),
            key: key.to_string(),
            name: Some(name.to_string()),
        };
        let entry = self
            .extra(key)
            .and_then(|x| x.get("blobs"))
            .and_then(|b| b.get(name))
            .ok_or_else(missing)?;
        let entry: BlobEntry = serde_json::from_value(entry.clone())
            .map_err(|e| self.err(format!("blob `{name}` of extra `{key}`: {e}")))?;
        let file_len = self.map.len() as u64;
        let end = entry.offset.saturating_add(entry.len);
        if end > file_len {
            return Err(ImageError::Truncated {
                path: self.path.clone(),
                what: format!("blob `{name}` of extra `{key}`"),
                end,
                len: file_len,
            });
        }
        let bytes = self.range(entry.offset, entry.len);
        let computed = crc32(bytes);
        if computed != entry.crc32 {
            return Err(ImageError::Checksum {
                path: self.path.clone(),
                what: format!("blob `{name}` of extra `{key}`"),
                stored: entry.crc32,
                computed,
            });
        }
        Ok(bytes)
    }

    /// A human-readable description for `llmflash inspect`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let m = &self.meta;
        let c = &m.config;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "flash image {} (format {})",
            self.path.display(),
            m.format
        );
        let _ = writeln!(
            s,
            "  file: {:.1} MiB; source: {} ({}, {:.1} MiB)",
            mib(self.map.len() as u64),
            m.source.path,
            m.source.format,
            mib(m.source.size)
        );
        let _ = writeln!(
            s,
            "  model: {:?}, {} layers, hidden {}, ffn {} ({:?}), heads {}/{} (kv), head_dim {}, vocab {}, max positions {}, tied embeddings {}",
            c.arch,
            c.n_layers,
            c.hidden_size,
            c.intermediate_size,
            c.ffn_kind(),
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.max_positions,
            c.tied_embeddings
        );
        let _ = writeln!(
            s,
            "  tokenizer: {}; chat template: {}",
            match &m.tokenizer {
                Some(TokenizerSource::Spec(_)) => "GGUF spec",
                Some(TokenizerSource::HfJson { .. }) => "HF tokenizer.json",
                None => "none",
            },
            if m.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        );
        let parts: Vec<String> = m
            .bundle
            .parts
            .iter()
            .map(|p| format!("{} {} @{}+{}", p.role.name(), p.dtype, p.offset, p.len))
            .collect();
        let _ = writeln!(
            s,
            "  bundle: stride {} bytes = [{}]",
            m.bundle.stride,
            parts.join(" | ")
        );
        let resident = m.resident_bytes();
        let ffn = m.ffn_bytes();
        let _ = writeln!(
            s,
            "  resident: {} tensors, {:.1} MiB; FFN: {} sections, {:.1} MiB ({:.1}% of weights)",
            m.tensors.len(),
            mib(resident),
            m.ffn.len(),
            mib(ffn),
            100.0 * ffn as f64 / (resident + ffn).max(1) as f64
        );
        if let Some(first) = m.ffn.first() {
            let _ = writeln!(
                s,
                "  per layer: {} neurons x {} bytes = {:.2} MiB",
                first.n_neurons,
                m.bundle.stride,
                mib(first.len)
            );
        }
        let permuted: Vec<String> = m
            .ffn
            .iter()
            .filter(|x| x.permutation.is_some())
            .map(|x| x.layer.to_string())
            .collect();
        let _ = writeln!(
            s,
            "  neuron permutation: {}",
            if permuted.is_empty() {
                "none (identity)".to_string()
            } else {
                format!("layers {}", permuted.join(","))
            }
        );
        let keys: Vec<&str> = m.extra.keys().map(|k| k.as_str()).collect();
        let _ = write!(
            s,
            "  extra: {}",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        );
        s
    }
}

/// Checks the header and metadata of a mapped image; returns the metadata.
fn validate(path: &Path, map: &[u8], hash_resident: bool) -> Result<ImageMeta, ImageError> {
    let file_len = map.len() as u64;
    let meta_err = |detail: String| ImageError::Meta {
        path: path.to_path_buf(),
        detail,
    };
    let truncated = |what: String, end: u64| ImageError::Truncated {
        path: path.to_path_buf(),
        what,
        end,
        len: file_len,
    };
    let header = super::header::Header::decode(path, map)?;
    let (meta_offset, meta_len) = (header.meta_offset, header.meta_len);
    let meta_end = meta_offset.saturating_add(meta_len);
    if meta_end > file_len {
        return Err(truncated("the metadata".into(), meta_end));
    }
    if meta_offset < ALIGN {
        return Err(meta_err(format!(
            "metadata at byte {meta_offset} overlaps the header"
        )));
    }
    let json = &map[meta_offset as usize..meta_end as usize];
    let stored = header.meta_crc;
    let computed = crc32(json);
    if stored != computed {
        return Err(ImageError::Checksum {
            path: path.to_path_buf(),
            what: "the metadata".into(),
            stored,
            computed,
        });
    }
    let meta: ImageMeta =
        serde_json::from_slice(json).map_err(|e| meta_err(format!("bad JSON: {e}")))?;
    if meta.format != FORMAT_VERSION {
        return Err(meta_err(format!(
            "metadata says format {}, the header says {FORMAT_VERSION}",
            meta.format
        )));
    }
    let c = &meta.config;
    c.validate()
        .map_err(|e| meta_err(format!("inconsistent config: {e}")))?;

    // A range inside the file, aligned, not overlapping the header.
    let check_range = |what: &dyn Fn() -> String, offset: u64, len: u64| {
        let end = offset.saturating_add(len);
        if end > file_len {
            return Err(truncated(what(), end));
        }
        if !offset.is_multiple_of(ALIGN) || offset < ALIGN {
            return Err(meta_err(format!(
                "{} starts at byte {offset}, which is not a 4096-aligned offset after the header",
                what()
            )));
        }
        Ok(())
    };

    for t in &meta.tensors {
        let what = || format!("tensor {}", t.name);
        let want = t
            .rows
            .checked_mul(t.cols)
            .and_then(|n| t.dtype.bytes_for(n))
            .and_then(|n| t.dtype.bytes_for(t.cols).map(|_| n));
        if want.map(|n| n as u64) != Some(t.len) {
            return Err(meta_err(format!(
                "tensor {} is {} bytes, but {} x {} {} takes {want:?}",
                t.name, t.len, t.rows, t.cols, t.dtype
            )));
        }
        check_range(&what, t.offset, t.len)?;
        if super::STREAMED_TABLES.contains(&t.name.as_str()) && t.row_crc32c.len() != t.rows {
            return Err(meta_err(format!(
                "tensor {} has {} row checksums for {} rows",
                t.name,
                t.row_crc32c.len(),
                t.rows
            )));
        }
    }
    // Names must be unique (lookups are by name).
    {
        let mut names: Vec<&str> = meta.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(meta_err(format!("tensor {} appears twice", w[0])));
        }
    }

    meta.bundle
        .check(c.ffn_kind(), c.hidden_size)
        .map_err(meta_err)?;
    if meta.bundle.stride == 0 {
        return Err(meta_err("bundle stride is 0".into()));
    }
    if meta.ffn.len() != c.n_layers {
        return Err(meta_err(format!(
            "{} FFN sections for {} layers",
            meta.ffn.len(),
            c.n_layers
        )));
    }
    for (i, s) in meta.ffn.iter().enumerate() {
        let what = || format!("the FFN section of layer {i}");
        if s.layer != i {
            return Err(meta_err(format!(
                "FFN section {i} is labelled layer {}",
                s.layer
            )));
        }
        if s.n_neurons != c.intermediate_size {
            return Err(meta_err(format!(
                "layer {i} has {} neurons, the config says {}",
                s.n_neurons, c.intermediate_size
            )));
        }
        let want = (s.n_neurons as u64).checked_mul(meta.bundle.stride as u64);
        if want != Some(s.len) {
            return Err(meta_err(format!(
                "the FFN section of layer {i} is {} bytes, expected {} neurons x {} bytes",
                s.len, s.n_neurons, meta.bundle.stride
            )));
        }
        check_range(&what, s.offset, s.len)?;
        if s.bundle_crc32c.len() != s.n_neurons {
            return Err(meta_err(format!(
                "layer {i}: {} bundle checksums for {} neurons",
                s.bundle_crc32c.len(),
                s.n_neurons
            )));
        }
        if let Some(p) = &s.permutation {
            if p.len() != s.n_neurons {
                return Err(meta_err(format!(
                    "layer {i}: permutation has {} entries for {} neurons",
                    p.len(),
                    s.n_neurons
                )));
            }
            let mut seen = vec![false; s.n_neurons];
            for &j in p {
                match seen.get_mut(j as usize) {
                    Some(x) if !*x => *x = true,
                    _ => {
                        return Err(meta_err(format!(
                            "layer {i}: permutation is not a permutation of 0..{} (entry {j})",
                            s.n_neurons
                        )))
                    }
                }
            }
        }
    }
    if c.ffn_kind().gated() && meta.bundle.part(PartRole::Gate).is_none() {
        return Err(meta_err(
            "a gated (SwiGLU/GeGLU) model's bundles need a gate part".into(),
        ));
    }

    // Resident tensors are small enough to hash at every open.
    for t in meta.tensors.iter().filter(|_| hash_resident) {
        let bytes = &map[t.offset as usize..(t.offset + t.len) as usize];
        let computed = crc32(bytes);
        if computed != t.crc32 {
            return Err(ImageError::Checksum {
                path: path.to_path_buf(),
                what: format!("tensor {}", t.name),
                stored: t.crc32,
                computed,
            });
        }
    }
    Ok(meta)
}
