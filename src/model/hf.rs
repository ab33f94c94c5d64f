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

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;
use serde_json::Value;

use super::config::{Arch, Config, RopeStyle};
use super::tensor::{DType, Storage, Tensor};

/// Name of the shard index written by transformers' `save_pretrained`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Largest JSON header accepted (the safetensors crate uses the same bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;
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
         mistral, qwen2, opt"
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
            Arch::Llama | Arch::Qwen2 => ("model.embed_tokens.weight", c.hidden_size),
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

// ---------------------------------------------------------------------------------------------
// config.json

struct ParsedConfig {
    config: Config,
    /// Whether `tie_word_embeddings` was present in the file.
    tie_explicit: bool,
}

/// Maps a transformers `config.json` onto [`Config`] and validates it.
pub fn parse_config(json: &str) -> Result<Config, HfError> {
    parse_config_inner(json).map(|p| p.config)
}

fn parse_config_inner(json: &str) -> Result<ParsedConfig, HfError> {
    let v: Value = serde_json::from_str(json).map_err(|e| HfError::ConfigNotJson {
        detail: e.to_string(),
    })?;
    let Some(obj) = v.as_object() else {
        return Err(HfError::ConfigNotJson {
            detail: format!("top level is {}, not an object", kind_of(&v)),
        });
    };
    let arch = detect_arch(obj)?;
    let keys = Keys {
        obj,
        arch: match arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Opt => "opt",
        },
    };
    let tie = keys.opt_bool("tie_word_embeddings")?;
    let tie_explicit = tie.is_some();

    let config = match arch {
        Arch::Llama | Arch::Qwen2 => {
            // transformers < 5 writes `rope_scaling` and a top-level `rope_theta`;
            // transformers >= 5 writes both inside `rope_parameters`.
            let rope_params = obj.get("rope_parameters").filter(|v| !v.is_null());
            for (key, rs) in [
                ("rope_scaling", obj.get("rope_scaling")),
                ("rope_parameters", rope_params),
            ] {
                let Some(rs) = rs.filter(|v| !v.is_null()) else {
                    continue;
                };
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(HfError::Unsupported {
                        what: format!("{key} type `{kind}`"),
                    });
                }
            }
            let nested_theta = rope_params
                .and_then(|p| p.get("rope_theta"))
                .map(|v| {
                    v.as_f64()
                        .filter(|t| t.is_finite() && *t > 0.0 && *t <= f32::MAX as f64)
                        .map(|t| t as f32)
                        .ok_or_else(|| HfError::BadValue {
                            key: "rope_parameters.rope_theta".into(),
                            expected: "a finite number above 0",
                            found: v.to_string(),
                        })
                })
                .transpose()?;
            let act = keys.opt_str("hidden_act")?.unwrap_or("silu");
            if act != "silu" {
                return Err(HfError::Unsupported {
                    what: format!("hidden_act `{act}` (only silu, for the SwiGLU FFN)"),
                });
            }
            for key in ["mlp_bias"]
                .into_iter()
                .chain((arch == Arch::Llama).then_some("attention_bias"))
            {
                if keys.opt_bool(key)? == Some(true) {
                    return Err(HfError::Unsupported {
                        what: format!("{key} = true (biases on these projections)"),
                    });
                }
            }
            if keys.opt_bool("use_sliding_window")? == Some(true) {
                log::warn!(
                    "config.json: sliding-window attention is ignored (full attention is used)"
                );
            }
            let hidden_size = keys.usize("hidden_size")?;
            let n_heads = keys.usize("num_attention_heads")?;
            let n_kv_heads = keys.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
            let head_dim = match keys.opt_usize("head_dim")? {
                Some(d) => d,
                None => default_head_dim(hidden_size, n_heads)?,
            };
            Config {
                arch,
                vocab_size: keys.usize("vocab_size")?,
                hidden_size,
                intermediate_size: keys.usize("intermediate_size")?,
                n_layers: keys.usize("num_hidden_layers")?,
                n_heads,
                n_kv_heads,
                head_dim,
                norm_eps: keys.f32("rms_norm_eps")?,
                rope_theta: Some(match keys.opt_f32("rope_theta")? {
                    Some(t) => t,
                    None => nested_theta.unwrap_or(10000.0),
                }),
                rope_style: RopeStyle::Halves,
                max_positions: keys.usize("max_position_embeddings")?,
                tied_embeddings: tie.unwrap_or(false),
                pre_norm: true,
                embed_dim: hidden_size,
            }
        }
        Arch::Opt => {
            let act = keys.opt_str("activation_function")?.unwrap_or("relu");
            if act != "relu" {
                return Err(HfError::Unsupported {
                    what: format!("OPT activation_function `{act}` (only relu)"),
                });
            }
            if keys.opt_bool("enable_bias")? == Some(false) {
                return Err(HfError::Unsupported {
                    what: "OPT without biases (enable_bias = false)".to_string(),
                });
            }
            if keys.opt_bool("layer_norm_elementwise_affine")? == Some(false) {
                return Err(HfError::Unsupported {
                    what: "OPT LayerNorm without weights (layer_norm_elementwise_affine = false)"
                        .to_string(),
                });
            }
            let hidden_size = keys.usize("hidden_size")?;
            let n_heads = keys.usize("num_attention_heads")?;
            Config {
                arch,
                vocab_size: keys.usize("vocab_size")?,
                hidden_size,
                intermediate_size: keys.usize("ffn_dim")?,
                n_layers: keys.usize("num_hidden_layers")?,
                n_heads,
                n_kv_heads: n_heads,
                head_dim: default_head_dim(hidden_size, n_heads)?,
                // OPT's LayerNorms use torch's default epsilon; the config has no key for it.
                norm_eps: 1e-5,
                rope_theta: None,
                rope_style: RopeStyle::Halves,
                max_positions: keys.usize("max_position_embeddings")?,
                tied_embeddings: tie.unwrap_or(true),
                pre_norm: keys.opt_bool("do_layer_norm_before")?.unwrap_or(true),
                embed_dim: keys
                    .opt_usize("word_embed_proj_dim")?
                    .unwrap_or(hidden_size),
            }
        }
    };
    config.validate().map_err(HfError::InvalidConfig)?;
    Ok(ParsedConfig {
        config,
        tie_explicit,
    })
}

fn default_head_dim(hidden: usize, heads: usize) -> Result<usize, HfError> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(HfError::InvalidConfig(format!(
            "hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and there \
             is no head_dim key"
        )));
    }
    Ok(hidden / heads)
}

fn detect_arch(obj: &serde_json::Map<String, Value>) -> Result<Arch, HfError> {
    let from_name = |s: &str| -> Option<Arch> {
        match s.to_ascii_lowercase().as_str() {
            "llama" | "mistral" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "opt" => Some(Arch::Opt),
            _ => None,
        }
    };
    if let Some(mt) = obj.get("model_type") {
        let Some(s) = mt.as_str() else {
            return Err(HfError::BadValue {
                key: "model_type".into(),
                expected: "a string",
                found: mt.to_string(),
            });
        };
        return from_name(s).ok_or_else(|| HfError::UnsupportedArch {
            found: s.to_string(),
        });
    }
    // No model_type: fall back to the class name, e.g. "LlamaForCausalLM".
    let first = obj
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match first {
        Some(class) => {
            let base = ["ForCausalLM", "Model"]
                .iter()
                .find_map(|suffix| class.strip_suffix(suffix))
                .unwrap_or(class);
            from_name(base).ok_or_else(|| HfError::UnsupportedArch {
                found: class.to_string(),
            })
        }
        None => Err(HfError::MissingKey {
            key: "model_type".into(),
            arch: "transformers",
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to config keys; `null` counts as absent.
struct Keys<'a> {
    obj: &'a serde_json::Map<String, Value>,
    arch: &'static str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, expected: &'static str, v: &Value) -> HfError {
        let mut found = v.to_string();
        if found.len() > 80 {
            found.truncate(77);
            found.push_str("...");
        }
        HfError::BadValue {
            key: key.to_string(),
            expected,
            found,
        }
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T, HfError> {
        v.ok_or_else(|| HfError::MissingKey {
            key: key.to_string(),
            arch: self.arch,
        })
    }

    /// A count or size (every one this reader takes must be at least 1).
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a whole number above 0", v)),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, HfError> {
        let v = self.opt_usize(key)?;
        self.required(key, v)
    }

    /// A positive parameter (every float this reader takes, an epsilon or a RoPE base, must
    /// be above 0).
    fn opt_f32(&self, key: &str) -> Result<Option<f32>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 && x <= f32::MAX as f64 && x as f32 > 0.0 => {
                    Ok(Some(x as f32))
                }
                _ => Err(self.bad(key, "a finite number above 0", v)),
            },
        }
    }

    fn f32(&self, key: &str) -> Result<f32, HfError> {
        let v = self.opt_f32(key)?;
        self.required(key, v)
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "true or false", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a string", v)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors

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

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Finds the model's safetensors files and loads all their tensors, checking that no tensor
/// is defined twice and (with an index) that the index matches the shards.
fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>, HfError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "llmflash-hf-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
            fs::write(self.0.join(name), bytes).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const LLAMA_CONFIG: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 8, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "max_position_embeddings": 16, "rope_scaling": null
    }"#;

    const OPT_CONFIG: &str = r#"{
        "model_type": "opt", "vocab_size": 8, "hidden_size": 4, "ffn_dim": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
        "do_layer_norm_before": false, "word_embed_proj_dim": 2, "activation_function": "relu"
    }"#;

    /// A tensor to write: name, dtype string, shape, raw bytes.
    type Entry = (String, String, Vec<u64>, Vec<u8>);

    fn entry(name: &str, dtype: &str, shape: &[u64], bytes: Vec<u8>) -> Entry {
        (name.to_string(), dtype.to_string(), shape.to_vec(), bytes)
    }

    fn f32_entry(name: &str, shape: &[u64]) -> Entry {
        let n: u64 = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
        entry(name, "F32", shape, bytemuck::cast_slice(&data).to_vec())
    }

    /// Builds a safetensors file from a raw header string and data.
    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Builds a well-formed safetensors file.
    fn st_file(entries: &[Entry]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in entries {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let mut h = Value::Object(header).to_string();
        while !(8 + h.len()).is_multiple_of(8) {
            h.push(' ');
        }
        raw_file(&h, &data)
    }

    fn llama_dir(tag: &str) -> TempDir {
        let d = TempDir::new(tag);
        d.write("config.json", LLAMA_CONFIG);
        d
    }

    fn open_err(d: &TempDir) -> HfError {
        match HfModel::open(&d.0) {
            Ok(_) => panic!("expected an error opening {}", d.0.display()),
            Err(e) => e,
        }
    }

    // ---- config.json ----

    #[test]
    fn parse_llama_config() {
        let c = parse_config(LLAMA_CONFIG).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.n_layers),
            (8, 4, 6, 1)
        );
        assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (2, 1, 2));
        assert_eq!(c.norm_eps, 1e-6);
        assert_eq!(c.rope_theta, Some(500000.0));
        assert_eq!(c.rope_style, RopeStyle::Halves);
        assert_eq!(c.max_positions, 16);
        assert!(!c.tied_embeddings);
        assert!(c.pre_norm);
        assert_eq!(c.embed_dim, 4);
    }

    #[test]
    fn parse_config_defaults_and_architectures_fallback() {
        let json = r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 8,
            "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": null, "head_dim": null,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 16}"#;
        let c = parse_config(json).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.n_kv_heads, c.head_dim), (2, 4));
        assert_eq!(c.rope_theta, Some(10000.0));
    }

    #[test]
    fn parse_qwen2_config() {
        let json = LLAMA_CONFIG
            .replace("\"llama\"", "\"qwen2\"")
            .replace("\"rope_scaling\": null", "\"tie_word_embeddings\": true");
        let c = parse_config(&json).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.tied_embeddings);
    }

    #[test]
    fn parse_opt_config() {
        let c = parse_config(OPT_CONFIG).unwrap();
        assert_eq!(c.arch, Arch::Opt);
        assert_eq!(c.intermediate_size, 16);
        assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (2, 2, 2));
        assert_eq!(c.rope_theta, None);
        assert_eq!(c.norm_eps, 1e-5);
        assert_eq!(c.max_positions, 32);
        assert!(c.tied_embeddings);
        assert!(!c.pre_norm);
        assert_eq!(c.embed_dim, 2);
    }

    #[test]
    fn opt_non_relu_is_refused() {
        let json = OPT_CONFIG.replace("\"relu\"", "\"gelu\"");
        let e = parse_config(&json).unwrap_err();
        assert!(matches!(e, HfError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("gelu"), "{e}");
    }

    #[test]
    fn config_not_json() {
        let e = parse_config("{ this is not json").unwrap_err();
        assert!(matches!(e, HfError::ConfigNotJson { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        let e = parse_config("[1, 2]").unwrap_err();
        assert!(matches!(e, HfError::ConfigNotJson { .. }), "{e}");
    }

    #[test]
    fn unsupported_model_type() {
        let json = LLAMA_CONFIG.replace("\"llama\"", "\"gpt2\"");
        let e = parse_config(&json).unwrap_err();
        assert!(
            matches!(e, HfError::UnsupportedArch { ref found } if found == "gpt2"),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("gpt2") && msg.contains("llama") && msg.contains("opt"),
            "{msg}"
        );
    }

    #[test]
    fn missing_required_key() {
        let json = LLAMA_CONFIG.replace("\"intermediate_size\": 6,", "");
        let e = parse_config(&json).unwrap_err();
        assert!(
            matches!(e, HfError::MissingKey { ref key, .. } if key == "intermediate_size"),
            "{e}"
        );
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }

    #[test]
    fn wrong_key_type() {
        let json = LLAMA_CONFIG.replace("\"hidden_size\": 4", "\"hidden_size\": \"4\"");
        let e = parse_config(&json).unwrap_err();
        assert!(
            matches!(e, HfError::BadValue { ref key, .. } if key == "hidden_size"),
            "{e}"
        );
        let json = LLAMA_CONFIG.replace("\"hidden_size\": 4", "\"hidden_size\": -4");
        let e = parse_config(&json).unwrap_err();
        assert!(matches!(e, HfError::BadValue { .. }), "{e}");
    }

    #[test]
    fn non_positive_parameters_and_zero_counts_are_refused() {
        let cases = [
            (
                "\"rms_norm_eps\": 1e-6",
                "\"rms_norm_eps\": -1e-6",
                "rms_norm_eps",
            ),
            (
                "\"rms_norm_eps\": 1e-6",
                "\"rms_norm_eps\": 0",
                "rms_norm_eps",
            ),
            (
                "\"rope_theta\": 500000.0",
                "\"rope_theta\": 0.0",
                "rope_theta",
            ),
            (
                "\"rope_theta\": 500000.0",
                "\"rope_theta\": -5",
                "rope_theta",
            ),
            (
                "\"num_key_value_heads\": 1",
                "\"num_key_value_heads\": 0",
                "num_key_value_heads",
            ),
            (
                "\"num_attention_heads\": 2",
                "\"num_attention_heads\": 0",
                "num_attention_heads",
            ),
            ("\"hidden_size\": 4", "\"hidden_size\": 0", "hidden_size"),
        ];
        for (from, to, key) in cases {
            let json = LLAMA_CONFIG.replace(from, to);
            assert_ne!(json, LLAMA_CONFIG, "{from}");
            let e = parse_config(&json).unwrap_err();
            assert!(
                matches!(e, HfError::BadValue { key: ref k, .. } if k == key),
                "{to}: {e}"
            );
            assert!(e.to_string().contains("above 0"), "{e}");
        }
        // rope_theta nested in rope_parameters (transformers >= 5).
        let json = LLAMA_CONFIG.replace(
            "\"rope_theta\": 500000.0",
            "\"rope_parameters\": {\"rope_theta\": -1.0}",
        );
        let e = parse_config(&json).unwrap_err();
        assert!(e.to_string().contains("rope_parameters.rope_theta"), "{e}");
    }

    #[test]
    fn rope_theta_inside_rope_parameters() {
        // transformers >= 5 nests rope_theta (and the rope type) in `rope_parameters`.
        let json = r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 16,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}"#;
        assert_eq!(parse_config(json).unwrap().rope_theta, Some(100000.0));
        let yarn = json.replace("\"default\"", "\"yarn\"");
        assert!(matches!(
            parse_config(&yarn),
            Err(HfError::Unsupported { .. })
        ));
    }

    #[test]
    fn rope_scaling_is_refused() {
        let json = LLAMA_CONFIG.replace(
            "\"rope_scaling\": null",
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
        );
        let e = parse_config(&json).unwrap_err();
        assert!(matches!(e, HfError::Unsupported { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("rope_scaling type `llama3` is not supported yet"),
            "{msg}"
        );
    }

    #[test]
    fn llama_biases_and_other_activations_are_refused() {
        for (from, to) in [
            ("\"rope_scaling\": null", "\"attention_bias\": true"),
            ("\"rope_scaling\": null", "\"mlp_bias\": true"),
            ("\"rope_scaling\": null", "\"hidden_act\": \"gelu\""),
        ] {
            let e = parse_config(&LLAMA_CONFIG.replace(from, to)).unwrap_err();
            assert!(matches!(e, HfError::Unsupported { .. }), "{e}");
        }
        // Qwen2 has q/k/v biases by design; `attention_bias` is not a Qwen2 key but harmless.
        let json = LLAMA_CONFIG
            .replace("\"llama\"", "\"qwen2\"")
            .replace("\"rope_scaling\": null", "\"attention_bias\": true");
        assert!(parse_config(&json).is_ok());
    }

    #[test]
    fn invalid_config_is_refused() {
        let json = LLAMA_CONFIG.replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 3");
        let e = parse_config(&json).unwrap_err();
        assert!(matches!(e, HfError::InvalidConfig(_)), "{e}");
        assert!(e.to_string().contains("n_kv_heads"), "{e}");
    }

    // ---- opening directories ----

    #[test]
    fn open_single_file_llama() {
        let d = llama_dir("single");
        let half_bytes: Vec<u8> = (0..8u16).flat_map(|x| x.to_le_bytes()).collect();
        d.write(
            "model.safetensors",
            st_file(&[
                f32_entry("model.embed_tokens.weight", &[8, 4]),
                f32_entry("lm_head.weight", &[8, 4]),
                entry("model.norm.weight", "BF16", &[4], half_bytes[..8].to_vec()),
                entry(
                    "model.layers.0.mlp.up_proj.weight",
                    "F16",
                    &[2, 4],
                    half_bytes,
                ),
                entry("position_ids", "I64", &[2], vec![0; 16]),
            ]),
        );
        let m = HfModel::open(&d.0).unwrap();
        assert!(!m.config.tied_embeddings);
        let e = m.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!((e.dtype, e.rows, e.cols), (DType::F32, 8, 4));
        let row1: &[f32] = bytemuck::cast_slice(e.row(1));
        assert_eq!(row1, &[4.0, 5.0, 6.0, 7.0]);
        let n = m.tensor("model.norm.weight").unwrap();
        assert_eq!((n.dtype, n.rows, n.cols), (DType::BF16, 1, 4));
        let u = m.tensor("model.layers.0.mlp.up_proj.weight").unwrap();
        assert_eq!((u.dtype, u.rows, u.cols), (DType::F16, 2, 4));
        assert_eq!(u.row(1), &[4, 0, 5, 0, 6, 0, 7, 0]);
        assert!(!m.has("position_ids"), "integer buffers are skipped");
        assert_eq!(m.tensor_names().count(), 4);
    }

    /// Files written by the reference `safetensors` crate (the format HF's writer produces).
    #[test]
    fn reads_files_from_reference_writer() {
        use safetensors::tensor::{serialize, Dtype, TensorView};
        let emb: Vec<f32> = (0..32).map(|i| i as f32 * 0.5).collect();
        let emb_bytes: Vec<u8> = bytemuck::cast_slice(&emb).to_vec();
        let norm: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let views = vec![
            (
                "model.embed_tokens.weight",
                TensorView::new(Dtype::F32, vec![8, 4], &emb_bytes).unwrap(),
            ),
            (
                "model.norm.weight",
                TensorView::new(Dtype::BF16, vec![4], &norm).unwrap(),
            ),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = serialize(views, Some(meta)).unwrap();
        let d = llama_dir("reference");
        d.write("model.safetensors", bytes);
        let m = HfModel::open(&d.0).unwrap();
        let e = m.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, f32>(e.row(7)), &emb[28..32]);
        let n = m.tensor("model.norm.weight").unwrap();
        assert_eq!((n.dtype, n.rows, n.cols), (DType::BF16, 1, 4));
        assert_eq!(n.bytes(), &norm[..]);
    }

    #[test]
    fn missing_lm_head_without_key_means_tied() {
        let d = llama_dir("tied");
        d.write(
            "model.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        let m = HfModel::open(&d.0).unwrap();
        assert!(m.config.tied_embeddings);
    }

    #[test]
    fn missing_lm_head_with_explicit_untied_is_refused() {
        let d = TempDir::new("untied");
        d.write(
            "config.json",
            LLAMA_CONFIG.replace("\"rope_scaling\": null", "\"tie_word_embeddings\": false"),
        );
        d.write(
            "model.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        let e = open_err(&d);
        assert!(
            matches!(e, HfError::MissingTensor { ref name, .. } if name == "lm_head.weight"),
            "{e}"
        );
    }

    #[test]
    fn missing_tensor_lists_nearby_names() {
        let d = llama_dir("nearby");
        d.write(
            "model.safetensors",
            st_file(&[
                f32_entry("model.embed_tokens.weight", &[8, 4]),
                f32_entry("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
            ]),
        );
        let m = HfModel::open(&d.0).unwrap();
        let e = m
            .tensor("model.layers.0.self_attn.k_proj.weight")
            .unwrap_err();
        assert!(matches!(e, HfError::MissingTensor { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("k_proj") && msg.contains("q_proj"), "{msg}");
    }

    #[test]
    fn embedding_shape_must_match_config() {
        let d = llama_dir("embshape");
        d.write(
            "model.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[9, 4])]),
        );
        let e = open_err(&d);
        assert!(matches!(e, HfError::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
    }

    #[test]
    fn opt_without_model_prefix_is_aliased() {
        let d = TempDir::new("optalias");
        d.write("config.json", OPT_CONFIG);
        d.write(
            "model.safetensors",
            st_file(&[
                f32_entry("decoder.embed_tokens.weight", &[8, 2]),
                f32_entry("decoder.embed_positions.weight", &[34, 4]),
            ]),
        );
        let m = HfModel::open(&d.0).unwrap();
        assert!(m.config.tied_embeddings);
        let p = m.tensor("model.decoder.embed_positions.weight").unwrap();
        assert_eq!((p.rows, p.cols), (34, 4));
        assert!(m.has("decoder.embed_positions.weight"));
    }

    #[test]
    fn sharded_with_index() {
        let d = llama_dir("sharded");
        d.write(
            "a.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        d.write(
            "b.safetensors",
            st_file(&[f32_entry("lm_head.weight", &[8, 4])]),
        );
        // A stray file the index does not mention must be ignored.
        d.write(
            "consolidated.safetensors",
            st_file(&[f32_entry("lm_head.weight", &[8, 4])]),
        );
        d.write(
            INDEX_FILE,
            r#"{"metadata": {"total_size": 256}, "weight_map": {
                "model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}"#,
        );
        let m = HfModel::open(&d.0).unwrap();
        assert!(!m.config.tied_embeddings);
        assert_eq!(
            m.tensor_names().collect::<Vec<_>>(),
            ["lm_head.weight", "model.embed_tokens.weight"]
        );
    }

    #[test]
    fn missing_config() {
        let d = TempDir::new("noconfig");
        d.write(
            "model.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        let e = open_err(&d);
        assert!(matches!(e, HfError::MissingConfig { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn config_not_json_in_dir() {
        let d = TempDir::new("badconfig");
        d.write("config.json", "not json at all");
        let e = open_err(&d);
        assert!(matches!(e, HfError::ConfigNotJson { .. }), "{e}");
    }

    #[test]
    fn no_safetensors_files() {
        let d = llama_dir("noweights");
        d.write("pytorch_model.bin", b"\0\0\0\0");
        let e = open_err(&d);
        assert!(matches!(e, HfError::NoWeights { .. }), "{e}");
        assert!(e.to_string().contains("safetensors"), "{e}");
    }

    fn assert_bad_file(d: &TempDir, needle: &str) {
        let e = open_err(d);
        assert!(matches!(e, HfError::BadFile { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains(needle),
            "{msg}"
        );
    }

    #[test]
    fn file_shorter_than_header_length() {
        let d = llama_dir("short");
        d.write("model.safetensors", [1u8, 2, 3]);
        assert_bad_file(&d, "shorter");
    }

    #[test]
    fn header_length_larger_than_file() {
        let d = llama_dir("hdrlen");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        d.write("model.safetensors", bytes);
        assert_bad_file(&d, "header length");
    }

    #[test]
    fn header_not_json() {
        let d = llama_dir("hdrjson");
        d.write("model.safetensors", raw_file("{ not json \u{1}", &[]));
        assert_bad_file(&d, "not a JSON object");
        let d = llama_dir("hdrutf8");
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        d.write("model.safetensors", bytes);
        assert_bad_file(&d, "not a JSON object");
    }

    #[test]
    fn parse_safetensors_from_bytes() {
        let h = br#"{"__metadata__": {"format": "pt"}, "w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [4, 16]}, "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}"#;
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(h);
        bytes.extend_from_slice(&[0u8; 16]);
        let path = Path::new("mem.safetensors");
        let mut got = parse_safetensors(path, &bytes).unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        let start = 8 + h.len();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].rows, got[0].cols, got[0].offset, got[0].len),
            (1, 1, start, 4)
        );
        assert_eq!((got[1].rows, got[1].cols, got[1].offset), (2, 3, start + 4));
        assert_eq!((got[1].dtype, got[1].len), (DType::F16, 12));
        let e = parse_safetensors(path, &bytes[..7]).unwrap_err();
        assert!(
            e.to_string().contains("shorter than the 8-byte header"),
            "{e}"
        );
        let e = parse_safetensors(path, &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    fn assert_bad_tensor(d: &TempDir, tensor: &str, needle: &str) {
        let e = open_err(d);
        assert!(
            matches!(e, HfError::BadTensor { ref name, .. } if name == tensor),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains(tensor) && msg.contains(needle),
            "{msg}"
        );
    }

    #[test]
    fn data_offsets_past_end() {
        let d = llama_dir("pastend");
        let h = r#"{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}"#;
        d.write("model.safetensors", raw_file(h, &[0; 8]));
        assert_bad_tensor(&d, "w", "past the end");
    }

    #[test]
    fn data_offsets_end_before_begin() {
        let d = llama_dir("endbegin");
        let h = r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}"#;
        d.write("model.safetensors", raw_file(h, &[0; 16]));
        assert_bad_tensor(&d, "w", "end before");
    }

    #[test]
    fn data_size_does_not_match_shape() {
        let d = llama_dir("size");
        let h = r#"{"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 16]}}"#;
        d.write("model.safetensors", raw_file(h, &[0; 16]));
        assert_bad_tensor(&d, "w", "needs 12");
    }

    #[test]
    fn shape_product_overflow() {
        let d = llama_dir("overflow");
        let h = format!(
            r#"{{"w": {{"dtype": "F32", "shape": [{}, {}], "data_offsets": [0, 4]}}}}"#,
            u64::MAX / 2,
            4
        );
        d.write("model.safetensors", raw_file(&h, &[0; 4]));
        assert_bad_tensor(&d, "w", "overflows");
        // Elements fit but bytes do not.
        let d = llama_dir("overflow2");
        let h = format!(
            r#"{{"w": {{"dtype": "F32", "shape": [{}], "data_offsets": [0, 4]}}}}"#,
            u64::MAX / 2
        );
        d.write("model.safetensors", raw_file(&h, &[0; 4]));
        assert_bad_tensor(&d, "w", "overflows");
    }

    #[test]
    fn malformed_header_entry() {
        let d = llama_dir("entry");
        let h = r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#;
        d.write("model.safetensors", raw_file(h, &[0; 4]));
        assert_bad_tensor(&d, "w", "malformed");
    }

    #[test]
    fn unknown_or_unsupported_dtype() {
        for (tag, name, dtype) in [
            ("unknown", "w", "Q9"),
            ("f8", "model.layers.0.mlp.up_proj.weight", "F8_E4M3"),
            ("i8weight", "model.layers.0.mlp.up_proj.weight", "I8"),
        ] {
            let d = llama_dir(tag);
            let h = format!(
                r#"{{"{name}": {{"dtype": "{dtype}", "shape": [4], "data_offsets": [0, 4]}}}}"#
            );
            d.write("model.safetensors", raw_file(&h, &[0; 4]));
            let e = open_err(&d);
            assert!(
                matches!(e, HfError::UnsupportedDType { name: ref n, dtype: ref t, .. } if n == name && t == dtype),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(name) && msg.contains(dtype) && msg.contains("model.safetensors"),
                "{msg}"
            );
        }
    }

    #[test]
    fn index_names_missing_shard() {
        let d = llama_dir("noshard");
        d.write(
            "a.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        d.write(
            INDEX_FILE,
            r#"{"weight_map": {"model.embed_tokens.weight": "a.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
        );
        let e = open_err(&d);
        assert!(
            matches!(e, HfError::MissingShard { ref shard, ref tensor, .. }
                if shard == "model-00002-of-00002.safetensors" && tensor == "lm_head.weight"),
            "{e}"
        );
        assert!(
            e.to_string().contains("model-00002-of-00002.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn index_with_path_traversal_is_refused() {
        let d = llama_dir("traversal");
        d.write(
            INDEX_FILE,
            r#"{"weight_map": {"lm_head.weight": "../x.safetensors"}}"#,
        );
        let e = open_err(&d);
        assert!(matches!(e, HfError::BadIndex { .. }), "{e}");
    }

    #[test]
    fn index_not_json_or_inconsistent() {
        let d = llama_dir("badindex");
        d.write(INDEX_FILE, "nope");
        let e = open_err(&d);
        assert!(matches!(e, HfError::BadIndex { .. }), "{e}");
        assert!(e.to_string().contains(INDEX_FILE), "{e}");

        let d = llama_dir("wrongshard");
        d.write(
            "a.safetensors",
            st_file(&[f32_entry("model.embed_tokens.weight", &[8, 4])]),
        );
        d.write(
            "b.safetensors",
            st_file(&[f32_entry("lm_head.weight", &[8, 4])]),
        );
        d.write(
            INDEX_FILE,
            r#"{"weight_map": {"model.embed_tokens.weight": "b.safetensors",
                "lm_head.weight": "a.safetensors"}}"#,
        );
        let e = open_err(&d);
        assert!(matches!(e, HfError::BadIndex { .. }), "{e}");
        assert!(e.to_string().contains("lm_head.weight"), "{e}");
    }

    #[test]
    fn tensor_in_two_shards() {
        let d = llama_dir("dup");
        d.write(
            "a.safetensors",
            st_file(&[
                f32_entry("model.embed_tokens.weight", &[8, 4]),
                f32_entry("model.norm.weight", &[4]),
            ]),
        );
        d.write(
            "b.safetensors",
            st_file(&[
                f32_entry("lm_head.weight", &[8, 4]),
                f32_entry("model.norm.weight", &[4]),
            ]),
        );
        d.write(
            INDEX_FILE,
            r#"{"weight_map": {"model.embed_tokens.weight": "a.safetensors",
                "model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}"#,
        );
        let e = open_err(&d);
        assert!(
            matches!(e, HfError::DuplicateTensor { ref name, .. } if name == "model.norm.weight"),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("a.safetensors") && msg.contains("b.safetensors"),
            "{msg}"
        );

        // Without an index, two files defining the same tensor are refused as well.
        fs::remove_file(d.0.join(INDEX_FILE)).unwrap();
        let e = open_err(&d);
        assert!(matches!(e, HfError::DuplicateTensor { .. }), "{e}");
    }

    // ---- real checkpoints written by transformers (tests/fixtures/hf, when present) ----

    fn fixture(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name);
        if p.join("config.json").is_file() {
            Some(p)
        } else {
            eprintln!("skipping: fixture {} is absent", p.display());
            None
        }
    }

    /// Checks the config against the raw config.json and the main tensors' shapes.
    fn check_fixture(name: &str, arch: Arch, dtype: Option<DType>) -> Option<HfModel> {
        let dir = fixture(name)?;
        let m = HfModel::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let c = &m.config;
        assert_eq!(c.arch, arch, "{name}");
        assert_eq!(
            Some(c.vocab_size as u64),
            raw["vocab_size"].as_u64(),
            "{name}"
        );
        assert_eq!(
            Some(c.hidden_size as u64),
            raw["hidden_size"].as_u64(),
            "{name}"
        );
        assert_eq!(
            Some(c.n_layers as u64),
            raw["num_hidden_layers"].as_u64(),
            "{name}"
        );
        assert_eq!(
            Some(c.n_heads as u64),
            raw["num_attention_heads"].as_u64(),
            "{name}"
        );
        let l = c.n_layers - 1;
        let shapes: Vec<(String, usize, usize)> = match arch {
            Arch::Llama | Arch::Qwen2 => {
                assert_eq!(
                    Some(c.intermediate_size as u64),
                    raw["intermediate_size"].as_u64(),
                    "{name}"
                );
                let q = c.n_heads * c.head_dim;
                vec![
                    (
                        "model.embed_tokens.weight".into(),
                        c.vocab_size,
                        c.hidden_size,
                    ),
                    (
                        format!("model.layers.{l}.self_attn.q_proj.weight"),
                        q,
                        c.hidden_size,
                    ),
                    (
                        format!("model.layers.{l}.self_attn.k_proj.weight"),
                        c.kv_dim(),
                        c.hidden_size,
                    ),
                    (
                        format!("model.layers.{l}.self_attn.o_proj.weight"),
                        c.hidden_size,
                        q,
                    ),
                    (
                        format!("model.layers.{l}.mlp.gate_proj.weight"),
                        c.intermediate_size,
                        c.hidden_size,
                    ),
                    (
                        format!("model.layers.{l}.mlp.down_proj.weight"),
                        c.hidden_size,
                        c.intermediate_size,
                    ),
                    (
                        format!("model.layers.{l}.input_layernorm.weight"),
                        1,
                        c.hidden_size,
                    ),
                    ("model.norm.weight".into(), 1, c.hidden_size),
                ]
            }
            Arch::Opt => {
                assert_eq!(
                    Some(c.intermediate_size as u64),
                    raw["ffn_dim"].as_u64(),
                    "{name}"
                );
                let p = format!("model.decoder.layers.{l}");
                vec![
                    (
                        "model.decoder.embed_tokens.weight".into(),
                        c.vocab_size,
                        c.embed_dim,
                    ),
                    (
                        "model.decoder.embed_positions.weight".into(),
                        c.max_positions + 2,
                        c.hidden_size,
                    ),
                    (
                        format!("{p}.self_attn.q_proj.weight"),
                        c.hidden_size,
                        c.hidden_size,
                    ),
                    (format!("{p}.self_attn.q_proj.bias"), 1, c.hidden_size),
                    (
                        format!("{p}.self_attn.out_proj.weight"),
                        c.hidden_size,
                        c.hidden_size,
                    ),
                    (
                        format!("{p}.fc1.weight"),
                        c.intermediate_size,
                        c.hidden_size,
                    ),
                    (format!("{p}.fc1.bias"), 1, c.intermediate_size),
                    (
                        format!("{p}.fc2.weight"),
                        c.hidden_size,
                        c.intermediate_size,
                    ),
                    (format!("{p}.self_attn_layer_norm.weight"), 1, c.hidden_size),
                    (format!("{p}.final_layer_norm.bias"), 1, c.hidden_size),
                ]
            }
        };
        for (t, rows, cols) in shapes {
            let x = m.tensor(&t).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((x.rows, x.cols), (rows, cols), "{name}: {t}");
            if let Some(d) = dtype {
                assert_eq!(x.dtype, d, "{name}: {t}");
            }
        }
        Some(m)
    }

    #[test]
    fn fixture_llama() {
        if let Some(m) = check_fixture("llama", Arch::Llama, None) {
            assert_eq!(m.config.tied_embeddings, !m.has("lm_head.weight"));
        }
    }

    #[test]
    fn fixture_llama_tied_bf16() {
        if let Some(m) = check_fixture("llama-tied", Arch::Llama, Some(DType::BF16)) {
            assert!(m.config.tied_embeddings);
        }
    }

    #[test]
    fn fixture_qwen2_f16() {
        if let Some(m) = check_fixture("qwen2", Arch::Qwen2, Some(DType::F16)) {
            let c = &m.config;
            let b = m.tensor("model.layers.0.self_attn.k_proj.bias").unwrap();
            assert_eq!((b.rows, b.cols), (1, c.kv_dim()));
        }
    }

    #[test]
    fn fixture_opt() {
        if let Some(m) = check_fixture("opt", Arch::Opt, None) {
            assert_eq!(m.config.embed_dim, m.config.hidden_size);
            assert!(m.config.rope_theta.is_none());
        }
    }

    #[test]
    fn fixture_opt_proj() {
        if let Some(m) = check_fixture("opt-proj", Arch::Opt, None) {
            let c = &m.config;
            assert_ne!(c.embed_dim, c.hidden_size);
            let pin = m.tensor("model.decoder.project_in.weight").unwrap();
            assert_eq!((pin.rows, pin.cols), (c.hidden_size, c.embed_dim));
            let pout = m.tensor("model.decoder.project_out.weight").unwrap();
            assert_eq!((pout.rows, pout.cols), (c.embed_dim, c.hidden_size));
        }
    }

    #[test]
    fn fixture_llama_sharded() {
        let Some(dir) = fixture("llama-sharded") else {
            return;
        };
        assert!(
            dir.join(INDEX_FILE).is_file(),
            "llama-sharded has no {INDEX_FILE}"
        );
        if let Some(m) = check_fixture("llama-sharded", Arch::Llama, None) {
            let idx: IndexFile =
                serde_json::from_str(&fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
            for name in idx.weight_map.keys() {
                assert!(m.has(name), "{name} listed by the index but not loaded");
            }
        }
    }
}
