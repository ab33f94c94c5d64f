//! Hugging Face model directories: `config.json` plus `*.safetensors` weights, either one file
//! or shards listed by `model.safetensors.index.json`.
//!
//! Every `.safetensors` file is memory-mapped once and its tensors borrow ranges of that map
//! (zero copy). Nothing read from a file is trusted: header lengths, offsets and shapes are
//! checked against the file's real size before anything is sliced, and no allocation is sized
//! from a number found in a file.
//!
//! The safetensors format: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
//! data; offsets are relative to the start of the data.

mod config;
mod safetensors;
#[cfg(test)]
mod tests;

pub use config::parse_config;
pub use safetensors::{parse_safetensors, SafetensorsEntry};

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::config::{Arch, Config};
use super::tensor::Tensor;
use config::parse_config_inner;
use safetensors::load_tensors;

/// Name of the shard index written by transformers' `save_pretrained`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest `config.json` / index file read into memory.
const MAX_JSON_FILE_BYTES: u64 = 64 << 20;
/// How many present names a "tensor not found" error lists.
const NEARBY_NAMES: usize = 6;

/// Errors from reading an HF model directory. Each message says what was expected, what was
/// found and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    // The OS error is shown in the message, so it is not also a `source` (which a report
    // would print a second time).
    #[error("cannot read `{}`: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error(
        "`{}` has no config.json; expected a Hugging Face model directory (config.json plus \
         *.safetensors, as written by transformers' `save_pretrained`)",
        .dir.display()
    )]
    MissingConfig { dir: PathBuf },

    #[error("config.json is not valid JSON ({detail}); expected the model's transformers config")]
    ConfigNotJson { detail: String },

    #[error(
        "config.json: model type `{found}` is not supported; supported model types: llama, \
         mistral, qwen2, qwen3, opt"
    )]
    UnsupportedArch { found: String },

    #[error(
        "config.json: required key `{key}` is missing for a {arch} model; is this the model's \
         own config.json?"
    )]
    MissingKey { key: String, arch: &'static str },

    #[error("config.json: key `{key}` should be {expected}, found {found}")]
    BadValue {
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("config.json: {what} is not supported yet")]
    Unsupported { what: String },

    #[error("config.json describes a model this engine cannot run: {0}")]
    InvalidConfig(String),

    #[error(
        "no *.safetensors files in `{}`; expected model.safetensors, or shards listed by {INDEX_FILE} \
         (re-save .bin checkpoints with `save_pretrained(..., safe_serialization=True)`)",
        .dir.display()
    )]
    NoWeights { dir: PathBuf },

    #[error(
        "`{}`: {detail}; this is not a valid safetensors file (truncated or corrupt download?)",
        .file.display()
    )]
    BadFile { file: PathBuf, detail: String },

    #[error(
        "`{}`: tensor `{name}`: {detail}; the file is corrupt or was not written as safetensors",
        .file.display()
    )]
    BadTensor {
        file: PathBuf,
        name: String,
        detail: String,
    },

    #[error(
        "`{}`: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 weights are supported \
         (re-save the model in one of those)",
        .file.display()
    )]
    UnsupportedDType {
        file: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("`{}`: {detail}", .file.display())]
    BadIndex { file: PathBuf, detail: String },

    #[error(
        "`{}` maps tensor `{tensor}` to shard `{shard}`, which is not in the directory; the \
         download is incomplete (fetch the missing shard)",
        .index.display()
    )]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },

    #[error(
        "tensor `{name}` appears in both `{}` and `{}`; expected each tensor in exactly one file \
         (remove stray .safetensors files from the directory)",
        .first.display(), .second.display()
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("tensor `{name}` not found in `{}`; present names include: {nearby}", .dir.display())]
    MissingTensor {
        name: String,
        dir: PathBuf,
        nearby: String,
    },

    #[error("tensor `{name}` is {found}, but config.json implies {expected}")]
    ShapeMismatch {
        name: String,
        found: String,
        expected: String,
    },
}

/// An opened HF model directory: its config and its (memory-mapped) tensors.
#[derive(Clone, Debug)]
pub struct HfModel {
    pub config: Config,
    pub dir: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl HfModel {
    /// Reads `dir/config.json` and maps every safetensors file of the model.
    pub fn open(dir: &Path) -> Result<HfModel, HfError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(HfError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let json = read_small_file(&config_path)?;
        let parsed = parse_config_inner(&json)?;
        let mut config = parsed.config;

        let tensors = load_tensors(dir)?;
        let mut model = HfModel {
            config: config.clone(),
            dir: dir.to_path_buf(),
            tensors,
        };

        // A config without `tie_word_embeddings` and a checkpoint without `lm_head.weight`:
        // the only way the model can produce logits is through the embedding matrix.
        if !config.tied_embeddings && !model.has("lm_head.weight") {
            if parsed.tie_explicit {
                return Err(model.missing(
                    "lm_head.weight",
                    "config.json sets tie_word_embeddings=false",
                ));
            }
            log::debug!("no lm_head.weight and no tie_word_embeddings key: using tied embeddings");
            config.tied_embeddings = true;
        }
        model.config = config;
        model.check_embeddings()?;
        log::debug!(
            "opened HF model {} ({:?}, {} tensors)",
            dir.display(),
            model.config.arch,
            model.tensors.len()
        );
        Ok(model)
    }

    /// A (cheap, shared-storage) clone of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<Tensor, HfError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| self.missing(name, ""))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted. OPT checkpoints stored as `decoder.*` appear under both
    /// `decoder.*` and `model.decoder.*`.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    /// The error for a missing tensor, listing the present names closest to `name`.
    fn missing(&self, name: &str, why: &str) -> HfError {
        let mut scored: Vec<(usize, &str)> = self
            .tensors
            .keys()
            .map(|k| (common_prefix(k, name), k.as_str()))
            .collect();
        // Longest shared prefix first; ties keep sorted name order (sort is stable).
        scored.sort_by_key(|s| std::cmp::Reverse(s.0));
        let mut nearby: Vec<&str> = scored.iter().take(NEARBY_NAMES).map(|s| s.1).collect();
        nearby.sort_unstable();
        let mut nearby = if nearby.is_empty() {
            "(none)".to_string()
        } else {
            nearby.join(", ")
        };
        if self.tensors.len() > NEARBY_NAMES {
            nearby.push_str(&format!(" (of {})", self.tensors.len()));
        }
        if !why.is_empty() {
            nearby.push_str(&format!("; {why}"));
        }
        HfError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
            nearby,
        }
    }

    /// The token embedding must exist and match `vocab_size x embed_dim`, so a config that
    /// does not belong to the weights is caught at load time.
    fn check_embeddings(&self) -> Result<(), HfError> {
        let c = &self.config;
        let (name, cols) = match c.arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => {
                ("model.embed_tokens.weight", c.hidden_size)
            }
            Arch::Opt => ("model.decoder.embed_tokens.weight", c.embed_dim),
        };
        let t = self.tensor(name)?;
        if t.rows != c.vocab_size || t.cols != cols {
            return Err(HfError::ShapeMismatch {
                name: name.to_string(),
                found: format!("{} x {}", t.rows, t.cols),
                expected: format!("{} x {} (vocab_size x hidden)", c.vocab_size, cols),
            });
        }
        Ok(())
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// Reads a JSON-sized file, refusing absurdly large ones instead of allocating for them.
fn read_small_file(path: &Path) -> Result<String, HfError> {
    let io = |error| HfError::Io {
        path: path.to_path_buf(),
        error,
    };
    crate::storage::input::regular_file(path).map_err(io)?;
    let file = fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_JSON_FILE_BYTES {
        return Err(HfError::BadFile {
            file: path.to_path_buf(),
            detail: format!(
                "{len} bytes is too large for a JSON file (limit {MAX_JSON_FILE_BYTES})"
            ),
        });
    }
    let mut s = String::new();
    file.take(MAX_JSON_FILE_BYTES)
        .read_to_string(&mut s)
        .map_err(io)?;
    Ok(s)
}
