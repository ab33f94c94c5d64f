//! Synthetic models: [`write_synthetic`] writes a random model of a [`SyntheticShape`] as a
//! flash image, for I/O benchmarks at scales no test model reaches.

use std::path::{Path, PathBuf};

use serde_json::Map;

use super::progress::Progress;
use super::writer::{write_section, Out};
use super::{
    BundleDtype, BundleLayout, Crc32, ImageError, ImageMeta, PartRole, SourceInfo, TensorEntry,
    ALIGN, FORMAT_VERSION,
};
use crate::model::config::{Arch, Config, RopeStyle};
use crate::quant;
use crate::quant::DType;
use crate::rng::Rng;

/// The shape of a synthetic model for [`write_synthetic`].
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticShape {
    pub hidden: usize,
    pub ffn: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab: usize,
    /// Dtype of the resident matrices (F16 or Q8_0).
    pub resident_dtype: DType,
    /// PRNG seed.
    pub seed: u64,
}

impl SyntheticShape {
    /// Llama-2-7B's shape, resident matrices in Q8_0 (about 7 GB with Q8_0 bundles).
    pub fn llama7b() -> SyntheticShape {
        SyntheticShape {
            hidden: 4096,
            ffn: 11008,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: 32,
            vocab: 32000,
            resident_dtype: DType::Q8_0,
            seed: 7,
        }
    }

    /// A few-hundred-KiB model for tests.
    pub fn tiny() -> SyntheticShape {
        SyntheticShape {
            hidden: 64,
            ffn: 160,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 100,
            resident_dtype: DType::F16,
            seed: 1,
        }
    }

    pub fn config(&self) -> Config {
        Config {
            arch: Arch::Llama,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.hidden / self.n_heads.max(1),
            norm_eps: 1e-5,
            rope_theta: Some(10_000.0),
            rope_style: RopeStyle::Adjacent,
            max_positions: 4096,
            tied_embeddings: false,
            pre_norm: true,
            embed_dim: self.hidden,
            sliding_window: None,
            sliding_layers: Vec::new(),
            rope_theta_sliding: None,
            attn_scale: None,
            final_logit_softcap: None,
        }
    }
}

/// Fills `row` with `n` random values of `dtype` (scaled to ±`scale`).
fn random_row(rng: &mut Rng, dtype: DType, n: usize, scale: f32, out: &mut Vec<u8>) {
    let mut x = vec![0f32; n];
    for v in &mut x {
        *v = rng.symmetric() * scale;
    }
    if quant::quantize(dtype, &x, out).is_err() {
        // Unreachable for the dtypes used here (shapes are checked up front).
        out.clear();
    }
}

/// Writes a random model of `shape` (llama architecture, no tokenizer) as a flash image, for
/// I/O benchmarks at scales no test model reaches. Streams: at most one chunk of rows of a
/// resident matrix or one chunk of bundles is held at a time.
pub fn write_synthetic(
    out: &Path,
    shape: SyntheticShape,
    bundle_dtype: BundleDtype,
) -> Result<ImageMeta, ImageError> {
    write_synthetic_with(out, shape, bundle_dtype, true)
}

pub(crate) fn write_synthetic_with(
    out: &Path,
    shape: SyntheticShape,
    bundle_dtype: BundleDtype,
    progress: bool,
) -> Result<ImageMeta, ImageError> {
    let config = shape.config();
    let err = |detail: String| ImageError::Convert {
        path: PathBuf::from("synthetic"),
        detail,
    };
    config
        .validate()
        .map_err(|e| err(format!("inconsistent shape: {e}")))?;
    let (d, f) = (config.hidden_size, config.intermediate_size);
    let rd = shape.resident_dtype;
    if !matches!(rd, DType::F16 | DType::Q8_0 | DType::F32) || rd.bytes_for(d).is_none() {
        return Err(err(format!(
            "resident dtype {rd} with hidden size {d}: use F16, or Q8_0 with a multiple of 32"
        )));
    }
    let part_dtype = match bundle_dtype {
        BundleDtype::F16 => DType::F16,
        BundleDtype::Source | BundleDtype::Q8_0 => DType::Q8_0,
    };
    let layout = BundleLayout::new(
        &[
            (PartRole::Gate, part_dtype),
            (PartRole::Up, part_dtype),
            (PartRole::Down, part_dtype),
        ],
        d,
    )
    .map_err(err)?;
    let q_dim = config.n_heads * config.head_dim;
    let kv = config.kv_dim();
    if q_dim != d || rd.bytes_for(q_dim).is_none() {
        return Err(err(format!(
            "hidden size {d} must be n_heads x head_dim and a whole number of {rd} blocks"
        )));
    }

    {
        let mut o = Out::create(out, &[])?;
        o.write(&vec![0u8; ALIGN as usize])?;
        let mut rng = Rng::new(shape.seed);
        let mut tensors = Vec::new();
        let mut row = Vec::new();
        let mut matrix = |o: &mut Out, rng: &mut Rng, name: String, rows: usize, cols: usize| {
            o.align()?;
            let offset = o.pos;
            let mut crc = Crc32::new();
            let mut row_crc32c = Vec::new();
            let streamed = super::STREAMED_TABLES.contains(&name.as_str());
            let scale = 1.0 / (cols as f32).sqrt();
            for _ in 0..rows {
                random_row(rng, rd, cols, scale, &mut row);
                crc.update(&row);
                if streamed {
                    row_crc32c.push(super::bundle_checksum(&row));
                }
                o.write(&row)?;
            }
            Ok::<_, ImageError>(TensorEntry {
                name,
                dtype: rd,
                rows,
                cols,
                offset,
                len: o.pos - offset,
                crc32: crc.finish(),
                row_crc32c,
            })
        };
        let ones = vec![1f32; d];
        let ones: &[u8] = bytemuck::cast_slice(&ones);
        tensors.push(matrix(
            &mut o,
            &mut rng,
            "token_embd.weight".into(),
            shape.vocab,
            d,
        )?);
        let mut pb = Progress::new(progress, shape.n_layers, "writing synthetic model");
        let mut sections = Vec::new();
        for l in 0..shape.n_layers {
            let p = format!("blk.{l}");
            tensors.push(o.write_tensor(
                &format!("{p}.attn_norm.weight"),
                DType::F32,
                1,
                d,
                ones,
            )?);
            tensors.push(matrix(
                &mut o,
                &mut rng,
                format!("{p}.attn_q.weight"),
                q_dim,
                d,
            )?);
            tensors.push(matrix(
                &mut o,
                &mut rng,
                format!("{p}.attn_k.weight"),
                kv,
                d,
            )?);
            tensors.push(matrix(
                &mut o,
                &mut rng,
                format!("{p}.attn_v.weight"),
                kv,
                d,
            )?);
            tensors.push(matrix(
                &mut o,
                &mut rng,
                format!("{p}.attn_output.weight"),
                d,
                q_dim,
            )?);
            tensors.push(o.write_tensor(
                &format!("{p}.ffn_norm.weight"),
                DType::F32,
                1,
                d,
                ones,
            )?);
            let seed = shape.seed ^ ((l as u64 + 1) << 32);
            let layout_ref = &layout;
            let section = write_section(&mut o, l, f, layout.stride, |i, bundle| {
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
                let mut q = Vec::new();
                for part in &layout_ref.parts {
                    let scale = if part.role == PartRole::Down {
                        1.0 / (f as f32).sqrt()
                    } else {
                        1.0 / (d as f32).sqrt()
                    };
                    random_row(&mut rng, part.dtype, d, scale, &mut q);
                    if q.len() != part.len {
                        return Err(format!("{} part: bad random row", part.role.name()));
                    }
                    bundle[part.offset..part.offset + part.len].copy_from_slice(&q);
                }
                Ok(())
            })?;
            sections.push(section);
            pb.inc(1);
        }
        pb.finish();
        tensors.push(o.write_tensor("output_norm.weight", DType::F32, 1, d, ones)?);
        tensors.push(matrix(
            &mut o,
            &mut rng,
            "output.weight".into(),
            shape.vocab,
            d,
        )?);
        let meta = ImageMeta {
            format: FORMAT_VERSION,
            config: config.clone(),
            tokenizer: None,
            chat_template: None,
            source: SourceInfo {
                path: format!("synthetic:{shape:?}"),
                format: "synthetic".into(),
                size: 0,
            },
            position_offset: 0,
            tensors,
            bundle: layout.clone(),
            ffn: sections,
            extra: Map::new(),
        };
        o.finish(&meta)?;
        Ok(meta)
    }
}
