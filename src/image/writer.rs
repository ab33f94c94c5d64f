//! Writing images: [`convert`] from a loaded model, and [`append_extra`] for data computed
//! later (calibration, predictors). The synthetic models of [`write_synthetic`] (in
//! `synthetic.rs`) are written through the same [`Out`].
//!
//! [`write_synthetic`]: super::write_synthetic

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::progress::Progress;
use super::{
    align_up, BlobEntry, BundleDtype, BundleLayout, Crc32, FfnSection, FlashImage, Header,
    ImageError, ImageMeta, PartRole, SourceInfo, TensorEntry, ALIGN, FORMAT_VERSION,
};
use crate::model::config::Config;
use crate::model::loader::LoadedModel;
use crate::model::tensor::Tensor;
use crate::model::weights::{Ffn, Linear, ModelWeights, Norm};
use crate::quant;
use crate::quant::DType;
use crate::storage::AtomicOutput;

/// Options of [`convert`].
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    pub bundle_dtype: BundleDtype,
    /// Show a progress bar (one step per layer).
    pub progress: bool,
}

/// Bytes of a resident tensor, as the writer sees them.
pub(crate) enum ResidentData<'a> {
    Tensor(&'a Tensor),
    F32(&'a [f32]),
}

pub(crate) struct Resident<'a> {
    pub name: String,
    pub data: ResidentData<'a>,
}

impl Resident<'_> {
    fn dtype_rows_cols(&self) -> (DType, usize, usize) {
        match &self.data {
            ResidentData::Tensor(t) => (t.dtype, t.rows, t.cols),
            ResidentData::F32(v) => (DType::F32, 1, v.len()),
        }
    }
}

/// Every non-FFN tensor of `w`, named as in GGUF.
pub(crate) fn resident_tensors(w: &ModelWeights) -> Vec<Resident<'_>> {
    let mut out = Vec::new();
    fn tensor<'a>(name: String, t: &'a Tensor, out: &mut Vec<Resident<'a>>) {
        out.push(Resident {
            name,
            data: ResidentData::Tensor(t),
        });
    }
    fn vector<'a>(out: &mut Vec<Resident<'a>>, name: String, v: &'a [f32]) {
        out.push(Resident {
            name,
            data: ResidentData::F32(v),
        });
    }
    fn linear<'a>(out: &mut Vec<Resident<'a>>, prefix: &str, l: &'a Linear) {
        out.push(Resident {
            name: format!("{prefix}.weight"),
            data: ResidentData::Tensor(&l.weight),
        });
        if let Some(b) = &l.bias {
            vector(out, format!("{prefix}.bias"), b);
        }
    }
    fn norm<'a>(out: &mut Vec<Resident<'a>>, prefix: &str, n: &'a Norm) {
        vector(out, format!("{prefix}.weight"), &n.weight);
        if let Some(b) = &n.bias {
            vector(out, format!("{prefix}.bias"), b);
        }
    }
    tensor("token_embd.weight".into(), &w.embed, &mut out);
    if let Some(p) = &w.positions {
        tensor("position_embd.weight".into(), p, &mut out);
    }
    if let Some(l) = &w.project_in {
        linear(&mut out, "project_in", l);
    }
    for (i, layer) in w.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        norm(&mut out, &format!("{p}.attn_norm"), &layer.attn_norm);
        linear(&mut out, &format!("{p}.attn_q"), &layer.attn.q);
        linear(&mut out, &format!("{p}.attn_k"), &layer.attn.k);
        linear(&mut out, &format!("{p}.attn_v"), &layer.attn.v);
        linear(&mut out, &format!("{p}.attn_output"), &layer.attn.o);
        norm(&mut out, &format!("{p}.ffn_norm"), &layer.ffn_norm);
        let x = &layer.extra_norms;
        let names = crate::model::weights::gguf_extra_norm_names(i);
        for (name, n) in names.iter().zip([&x.q, &x.k, &x.post_attn, &x.post_ffn]) {
            if let Some(n) = n {
                norm(&mut out, name, n);
            }
        }
        if let Some(b) = &layer.ffn_bias.up {
            vector(&mut out, format!("{p}.ffn_up.bias"), b);
        }
        if let Some(b) = &layer.ffn_bias.down {
            vector(&mut out, format!("{p}.ffn_down.bias"), b);
        }
    }
    if let Some(l) = &w.project_out {
        linear(&mut out, "project_out", l);
    }
    if let Some(n) = &w.final_norm {
        norm(&mut out, "output_norm", n);
    }
    let tied = w.lm_head.bytes().as_ptr() == w.embed.bytes().as_ptr()
        && w.lm_head.bytes().len() == w.embed.bytes().len();
    if !tied {
        tensor("output.weight".into(), &w.lm_head, &mut out);
    }
    out
}

/// A file being written sequentially, with its position tracked: a temporary file beside the
/// destination, renamed over it by [`Out::finish`] and removed if dropped unfinished.
pub(super) struct Out {
    path: PathBuf,
    file: BufWriter<AtomicOutput>,
    pub(super) pos: u64,
}

impl Out {
    /// Starts writing `dest`, which must not be any of `inputs` (see [`AtomicOutput`]).
    pub(super) fn create(dest: &Path, inputs: &[&Path]) -> Result<Out, ImageError> {
        let out = AtomicOutput::create(dest, inputs)?;
        Ok(Out {
            path: out.tmp_path().to_path_buf(),
            file: BufWriter::with_capacity(1 << 20, out),
            pos: 0,
        })
    }

    fn io(&self, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: self.path.clone(),
            action: "cannot write",
            error: source,
        }
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.file.write_all(bytes).map_err(|e| self.io(e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    pub(super) fn align(&mut self) -> Result<(), ImageError> {
        let target = align_up(self.pos).unwrap_or(self.pos);
        let zeros = [0u8; ALIGN as usize];
        let pad = (target - self.pos) as usize;
        self.write(&zeros[..pad])
    }

    pub(super) fn write_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<TensorEntry, ImageError> {
        self.align()?;
        let offset = self.pos;
        self.write(bytes)?;
        Ok(TensorEntry {
            name: name.to_string(),
            dtype,
            rows,
            cols,
            offset,
            len: bytes.len() as u64,
            crc32: super::crc32(bytes),
            row_crc32c: super::row_checksums(name, rows, bytes),
        })
    }

    /// Writes the meta JSON and then the header, syncs, and renames the file over the
    /// destination.
    pub(super) fn finish(mut self, meta: &ImageMeta) -> Result<(), ImageError> {
        let json = serde_json::to_vec(meta).map_err(|e| ImageError::Meta {
            path: self.path.clone(),
            detail: format!("cannot serialise: {e}"),
        })?;
        self.align()?;
        let meta_offset = self.pos;
        self.write(&json)?;
        self.file.flush().map_err(|e| self.io(e))?;
        let mut file = self.file.into_inner().map_err(|e| ImageError::Io {
            path: self.path.clone(),
            action: "cannot write",
            error: e.into_error(),
        })?;
        let io = |source| ImageError::Io {
            path: self.path.clone(),
            action: "cannot write",
            error: source,
        };
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&Header::for_meta(meta_offset, &json).encode())
            .map_err(io)?;
        file.commit()?;
        Ok(())
    }
}

/// How one bundle part is produced from the source.
#[derive(Clone, Copy, Debug)]
enum PartPlan {
    /// Copy the source row verbatim.
    Verbatim,
    /// Dequantise and requantise to the part's dtype.
    Requantize,
}

/// The bundle dtypes for a model whose FFN matrices have the given dtypes (per layer).
fn plan_layout(
    ffns: &[&Ffn],
    config: &Config,
    bd: BundleDtype,
) -> Result<(BundleLayout, Vec<PartPlan>), String> {
    let d = config.hidden_size;
    let uniform = |f: &dyn Fn(&Ffn) -> Option<DType>| -> Option<DType> {
        let first = ffns.first().and_then(|x| f(x))?;
        ffns.iter().all(|x| f(x) == Some(first)).then_some(first)
    };
    let requant_target = |src_quantized: bool| {
        if src_quantized && d.is_multiple_of(32) {
            DType::Q8_0
        } else {
            DType::F16
        }
    };
    let mut roles: Vec<(PartRole, Option<DType>, DType)> = Vec::new(); // role, uniform src, any src
    let any = |f: &dyn Fn(&Ffn) -> Option<DType>| ffns.iter().find_map(|x| f(x));
    if config.ffn_kind().gated() {
        let g = |x: &Ffn| x.gate.as_ref().map(|t| t.dtype);
        let a = any(&g).ok_or("a gated (SwiGLU/GeGLU) model without gate matrices")?;
        roles.push((PartRole::Gate, uniform(&g), a));
    }
    let u = |x: &Ffn| Some(x.up.dtype);
    let dn = |x: &Ffn| Some(x.down.dtype);
    roles.push((PartRole::Up, uniform(&u), any(&u).ok_or("no layers")?));
    roles.push((PartRole::Down, uniform(&dn), any(&dn).ok_or("no layers")?));

    let mut parts = Vec::new();
    let mut plans = Vec::new();
    for (role, uni, some) in roles {
        let (dtype, plan) = match bd {
            BundleDtype::F16 => (DType::F16, PartPlan::Requantize),
            BundleDtype::Q8_0 => {
                if !d.is_multiple_of(32) {
                    return Err(format!(
                        "bundle dtype q8_0 needs the hidden size to be a multiple of 32, but it is {d}; use the f16 bundle dtype"
                    ));
                }
                (DType::Q8_0, PartPlan::Requantize)
            }
            BundleDtype::Source => match (role, uni) {
                (PartRole::Down, _) => (requant_target(some.is_quantized()), PartPlan::Requantize),
                (_, Some(t)) => (t, PartPlan::Verbatim),
                (_, None) => {
                    log::warn!(
                        "FFN {} matrices have different dtypes across layers; requantising them for uniform bundles",
                        role.name()
                    );
                    (requant_target(some.is_quantized()), PartPlan::Requantize)
                }
            },
        };
        let plan = match (plan, role) {
            // A verbatim row copy when the dtypes already match.
            (PartPlan::Requantize, PartRole::Gate | PartRole::Up) if uni == Some(dtype) => {
                PartPlan::Verbatim
            }
            (p, _) => p,
        };
        parts.push((role, dtype));
        plans.push(plan);
    }
    let layout = BundleLayout::new(&parts, d)?;
    Ok((layout, plans))
}

/// Neurons per parallel chunk of bundles.
const CHUNK_NEURONS: usize = 512;

/// Streams one FFN section: `n` bundles of `stride` bytes, built in parallel chunks by
/// `fill(neuron, bundle)`.
pub(super) fn write_section<F>(
    w: &mut Out,
    layer: usize,
    n: usize,
    stride: usize,
    fill: F,
) -> Result<FfnSection, ImageError>
where
    F: Fn(usize, &mut [u8]) -> Result<(), String> + Sync,
{
    w.align()?;
    let offset = w.pos;
    let mut crc = Crc32::new();
    let mut bundle_crc32c = Vec::with_capacity(n);
    let mut buf = vec![0u8; CHUNK_NEURONS.min(n) * stride];
    let mut start = 0;
    while start < n {
        let count = CHUNK_NEURONS.min(n - start);
        let chunk = &mut buf[..count * stride];
        chunk
            .par_chunks_mut(stride.max(1))
            .enumerate()
            .try_for_each(|(k, b)| fill(start + k, b))
            .map_err(|detail| ImageError::Convert {
                path: w.path.clone(),
                detail: format!("layer {layer}: {detail}"),
            })?;
        crc.update(chunk);
        bundle_crc32c.extend(
            chunk
                .par_chunks(stride.max(1))
                .map(super::bundle_checksum)
                .collect::<Vec<u32>>(),
        );
        w.write(chunk)?;
        start += count;
    }
    Ok(FfnSection {
        layer,
        offset,
        len: (n * stride) as u64,
        n_neurons: n,
        crc32: crc.finish(),
        permutation: None,
        bundle_crc32c,
    })
}

fn source_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Converts `model` into a flash image at `out` (written to a temporary file beside it, then
/// renamed; `out` must be missing or a regular file, and not the model itself).
///
/// Resident tensors are copied straight from the source mapping; the FFN is streamed layer by
/// layer, holding at most one layer's down matrix in f32 besides a chunk of bundles.
pub fn convert(
    model: &LoadedModel,
    out: &Path,
    opts: &ConvertOptions,
) -> Result<ImageMeta, ImageError> {
    let w = &model.weights;
    let config = &w.config;
    let err = |detail: String| ImageError::Convert {
        path: model.path.clone(),
        detail,
    };
    config
        .validate()
        .map_err(|e| err(format!("inconsistent config: {e}")))?;
    let ffns: Vec<&Ffn> = w
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.ffn.as_ref().ok_or_else(|| {
                err(format!(
                    "layer {i} has no FFN matrices (is the source already a flash image?)"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if ffns.len() != config.n_layers {
        return Err(err(format!(
            "{} layers loaded, the config says {}",
            ffns.len(),
            config.n_layers
        )));
    }
    let (d, f) = (config.hidden_size, config.intermediate_size);
    for (i, x) in ffns.iter().enumerate() {
        let bad = |t: &Tensor, r: usize, c: usize| t.rows != r || t.cols != c;
        if x.gate.as_ref().is_some_and(|g| bad(g, f, d)) || bad(&x.up, f, d) || bad(&x.down, d, f) {
            return Err(err(format!(
                "layer {i}: FFN matrices are not {f} x {d} (gate, up) and {d} x {f} (down)"
            )));
        }
    }
    let (layout, plans) = plan_layout(&ffns, config, opts.bundle_dtype).map_err(err)?;

    {
        let mut o = Out::create(out, &[&model.path])?;
        o.write(&vec![0u8; ALIGN as usize])?;
        let mut tensors = Vec::new();
        for r in resident_tensors(w) {
            let (dtype, rows, cols) = r.dtype_rows_cols();
            let entry = match &r.data {
                ResidentData::Tensor(t) => o.write_tensor(&r.name, dtype, rows, cols, t.bytes())?,
                ResidentData::F32(v) => {
                    o.write_tensor(&r.name, dtype, rows, cols, bytemuck::cast_slice(v))?
                }
            };
            tensors.push(entry);
        }

        let mut pb = Progress::new(opts.progress, ffns.len(), "converting FFN");
        let mut sections = Vec::with_capacity(ffns.len());
        let mut down = vec![0f32; 0];
        for (li, x) in ffns.iter().enumerate() {
            // The whole down matrix of the layer in f32, for its strided columns.
            down.resize(d * f, 0.0);
            down.par_chunks_mut(f)
                .enumerate()
                .try_for_each(|(r, row)| quant::dequantize(x.down.dtype, x.down.row(r), row))
                .map_err(|e| err(format!("layer {li} down: {e}")))?;
            let down_ref = &down;
            let sources: Vec<Option<&Tensor>> = layout
                .parts
                .iter()
                .map(|p| match p.role {
                    PartRole::Gate => x.gate.as_ref(),
                    PartRole::Up => Some(&x.up),
                    PartRole::Down => None,
                })
                .collect();
            let section = write_section(&mut o, li, f, layout.stride, |i, bundle| {
                let mut tmp = vec![0f32; d];
                let mut q = Vec::new();
                for ((part, plan), src) in layout.parts.iter().zip(&plans).zip(&sources) {
                    let dst = &mut bundle[part.offset..part.offset + part.len];
                    match (src, plan) {
                        (Some(t), PartPlan::Verbatim) => dst.copy_from_slice(t.row(i)),
                        (Some(t), PartPlan::Requantize) => {
                            quant::dequantize(t.dtype, t.row(i), &mut tmp)
                                .map_err(|e| e.to_string())?;
                            quant::quantize(part.dtype, &tmp, &mut q).map_err(|e| e.to_string())?;
                            dst.copy_from_slice(&q);
                        }
                        (None, _) => {
                            for (r, v) in tmp.iter_mut().enumerate() {
                                *v = down_ref[r * f + i];
                            }
                            quant::quantize(part.dtype, &tmp, &mut q).map_err(|e| e.to_string())?;
                            dst.copy_from_slice(&q);
                        }
                    }
                }
                Ok(())
            })?;
            sections.push(section);
            pb.inc(1);
        }
        pb.finish();
        drop(down);

        let meta = ImageMeta {
            format: FORMAT_VERSION,
            config: config.clone(),
            tokenizer: model.tokenizer_source.clone(),
            chat_template: model.chat_template_source.clone(),
            source: SourceInfo {
                path: model.path.display().to_string(),
                format: model.format.to_string(),
                size: source_size(&model.path),
            },
            position_offset: if w.positions.is_some() {
                w.position_offset
            } else {
                0
            },
            tensors,
            bundle: layout,
            ffn: sections,
            extra: Map::new(),
        };
        o.finish(&meta)?;
        Ok(meta)
    }
}

/// Appends named blobs (each 4 KiB aligned, CRC recorded) and sets `extra[key]` to `json`
/// with a `"blobs"` map `name -> {offset, len, crc32}` added (a non-object `json` is stored
/// as `{"value": json}`). A previous `extra[key]` is replaced (its blobs stay in the file as
/// dead bytes). The image is never written in place: a copy beside it (see
/// [`AtomicOutput::rewrite`]) gets the blobs and the new metadata, is synced, and is renamed
/// over it, so an interrupted append leaves the previous image intact (it needs the image's
/// size in free disk space meanwhile).
pub fn append_extra(
    path: &Path,
    key: &str,
    json: Value,
    blobs: &[(&str, &[u8])],
) -> Result<(), ImageError> {
    let image = FlashImage::open(path)?;
    let mut meta = image.meta.clone();
    drop(image);
    let mut out = AtomicOutput::rewrite(path)?;
    let tmp = out.tmp_path().to_path_buf();
    let io = |action: &'static str| ImageError::io(&tmp, action);
    let file = out.file_mut();
    let mut pos = file.seek(SeekFrom::End(0)).map_err(io("cannot seek"))?;
    let mut table = Map::new();
    {
        let mut bw = BufWriter::new(&mut *file);
        let zeros = [0u8; ALIGN as usize];
        for (name, bytes) in blobs {
            let aligned = align_up(pos).unwrap_or(pos);
            bw.write_all(&zeros[..(aligned - pos) as usize])
                .map_err(io("cannot write"))?;
            bw.write_all(bytes).map_err(io("cannot write"))?;
            let entry = BlobEntry {
                offset: aligned,
                len: bytes.len() as u64,
                crc32: super::crc32(bytes),
            };
            table.insert(
                name.to_string(),
                serde_json::to_value(entry).unwrap_or(Value::Null),
            );
            pos = aligned + bytes.len() as u64;
        }
        bw.flush().map_err(io("cannot write"))?;
    }
    let mut obj = match json {
        Value::Object(m) => m,
        other => {
            let mut m = Map::new();
            m.insert("value".into(), other);
            m
        }
    };
    obj.insert("blobs".into(), Value::Object(table));
    meta.extra.insert(key.to_string(), Value::Object(obj));
    commit_meta(file, &tmp, pos, &meta)?;
    out.commit()?;
    Ok(())
}

/// Writes `meta` at `pos` (aligned up), syncs, then rewrites and syncs the header.
pub(crate) fn commit_meta(
    file: &mut File,
    path: &Path,
    pos: u64,
    meta: &ImageMeta,
) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        action: "cannot write",
        error: source,
    };
    let json = serde_json::to_vec(meta).map_err(|e| ImageError::Meta {
        path: path.to_path_buf(),
        detail: format!("cannot serialise: {e}"),
    })?;
    let meta_offset = align_up(pos).unwrap_or(pos);
    file.seek(SeekFrom::Start(meta_offset)).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.set_len(meta_offset + json.len() as u64).map_err(io)?;
    file.sync_all().map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(&Header::for_meta(meta_offset, &json).encode())
        .map_err(io)?;
    file.sync_all().map_err(io)
}
