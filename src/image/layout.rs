//! The image's metadata types: what the JSON at the end of the file holds.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::config::{Config, FfnKind};
use crate::model::loader::TokenizerSource;
use crate::quant::DType;

/// The dtype of the FFN bundles, chosen at convert time (`--bundle-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BundleDtype {
    /// Gate and up rows copied verbatim from the source (requantised to Q8_0/F16 only when
    /// the source mixes dtypes across layers); the down column, which is strided in the
    /// source, requantised to Q8_0 for quantised sources (F16 when the hidden size is not a
    /// multiple of 32) and to F16 for float sources (F32, F16, BF16).
    #[default]
    Source,
    /// Every part F16.
    F16,
    /// Every part Q8_0 (the hidden size must be a multiple of 32).
    Q8_0,
}

impl FromStr for BundleDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "source" => Ok(BundleDtype::Source),
            "f16" => Ok(BundleDtype::F16),
            "q8_0" | "q8" => Ok(BundleDtype::Q8_0),
            other => Err(format!(
                "unknown bundle dtype `{other}`: expected `source` (keep the model's dtype), `f16` or `q8_0`"
            )),
        }
    }
}

impl std::fmt::Display for BundleDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BundleDtype::Source => "source",
            BundleDtype::F16 => "f16",
            BundleDtype::Q8_0 => "q8_0",
        })
    }
}

/// Which FFN matrix a bundle part comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartRole {
    /// Row i of the gate matrix (SwiGLU only).
    Gate,
    /// Row i of the up matrix.
    Up,
    /// Column i of the down matrix.
    Down,
}

impl PartRole {
    pub fn name(self) -> &'static str {
        match self {
            PartRole::Gate => "gate",
            PartRole::Up => "up",
            PartRole::Down => "down",
        }
    }
}

/// One part of a bundle: `elems` values of `dtype` at `offset..offset + len` of the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundlePart {
    pub role: PartRole,
    pub dtype: DType,
    pub offset: usize,
    pub len: usize,
    pub elems: usize,
}

/// The layout of every bundle of the image (the same for all layers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleLayout {
    pub parts: Vec<BundlePart>,
    pub stride: usize,
}

impl BundleLayout {
    /// Packs `parts` (role, dtype) of `elems` values each back to back.
    pub fn new(parts: &[(PartRole, DType)], elems: usize) -> Result<BundleLayout, String> {
        let mut out = Vec::with_capacity(parts.len());
        let mut offset = 0usize;
        for &(role, dtype) in parts {
            let len = dtype.bytes_for(elems).ok_or_else(|| {
                format!(
                    "a {} part of {elems} values is not a whole number of {dtype} blocks ({} values); choose another bundle dtype (e.g. f16)",
                    role.name(),
                    dtype.block_len()
                )
            })?;
            out.push(BundlePart {
                role,
                dtype,
                offset,
                len,
                elems,
            });
            offset = offset
                .checked_add(len)
                .ok_or_else(|| "bundle size overflows".to_string())?;
        }
        Ok(BundleLayout {
            parts: out,
            stride: offset,
        })
    }

    pub fn part(&self, role: PartRole) -> Option<&BundlePart> {
        self.parts.iter().find(|p| p.role == role)
    }

    /// Checks the layout against the model: the roles its FFN kind needs, in order, each of
    /// `hidden` values, packed back to back.
    pub fn check(&self, kind: FfnKind, hidden: usize) -> Result<(), String> {
        let want: &[PartRole] = match kind {
            FfnKind::SwiGlu | FfnKind::GeGlu => &[PartRole::Gate, PartRole::Up, PartRole::Down],
            FfnKind::Relu => &[PartRole::Up, PartRole::Down],
        };
        let roles: Vec<PartRole> = self.parts.iter().map(|p| p.role).collect();
        if roles != want {
            return Err(format!(
                "bundle parts are {roles:?}, expected {want:?} for a {kind:?} FFN"
            ));
        }
        let mut offset = 0usize;
        for p in &self.parts {
            if p.elems != hidden {
                return Err(format!(
                    "bundle part {} has {} values, expected the hidden size {hidden}",
                    p.role.name(),
                    p.elems
                ));
            }
            if p.offset != offset {
                return Err(format!(
                    "bundle part {} starts at byte {}, expected {offset}",
                    p.role.name(),
                    p.offset
                ));
            }
            if p.dtype.bytes_for(p.elems) != Some(p.len) {
                return Err(format!(
                    "bundle part {} is {} bytes, but {} {} values take {:?}",
                    p.role.name(),
                    p.len,
                    p.elems,
                    p.dtype,
                    p.dtype.bytes_for(p.elems)
                ));
            }
            offset = offset
                .checked_add(p.len)
                .ok_or_else(|| "bundle size overflows".to_string())?;
        }
        if offset != self.stride {
            return Err(format!(
                "bundle stride is {}, but its parts add up to {offset}",
                self.stride
            ));
        }
        Ok(())
    }
}

/// One layer's FFN section: `n_neurons` bundles of `stride` bytes at `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FfnSection {
    pub layer: usize,
    pub offset: u64,
    pub len: u64,
    pub n_neurons: usize,
    pub crc32: u32,
    /// Disk slot j holds model neuron `permutation[j]`; `None` is the identity.
    pub permutation: Option<Vec<u32>>,
    /// The CRC-32C ([`crate::image::bundle_checksum`]) of each disk slot's bundle: what every
    /// read of a bundle is checked against before use.
    pub bundle_crc32c: Vec<u32>,
}

/// A resident tensor stored verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
    /// For the tables a session may stream row by row (the token embedding and the output
    /// head: [`crate::image::STREAMED_TABLES`]), the CRC-32C of each row, checked on every
    /// streamed read; empty for the other tensors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub row_crc32c: Vec<u32>,
}

/// The model the image was converted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    /// "gguf", "hf" or "synthetic".
    pub format: String,
    /// Bytes of the source file (or of the files of an HF directory).
    pub size: u64,
}

/// A blob appended by [`crate::image::append_extra`], as recorded in
/// `extra[key]["blobs"][name]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

/// The metadata JSON at the end of an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub format: u32,
    pub config: Config,
    pub tokenizer: Option<TokenizerSource>,
    pub chat_template: Option<String>,
    pub source: SourceInfo,
    /// Row of `position_embd.weight` that holds position 0 (OPT reserves two rows).
    #[serde(default)]
    pub position_offset: usize,
    pub tensors: Vec<TensorEntry>,
    pub bundle: BundleLayout,
    pub ffn: Vec<FfnSection>,
    #[serde(default)]
    pub extra: Map<String, Value>,
}

impl ImageMeta {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of the resident tensors.
    pub fn resident_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Bytes of the FFN sections.
    pub fn ffn_bytes(&self) -> u64 {
        self.ffn.iter().map(|s| s.len).sum()
    }
}
