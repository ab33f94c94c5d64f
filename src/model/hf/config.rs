//! `config.json`: a transformers config mapped onto [`Config`] and validated.

use serde_json::Value;

use super::HfError;
use crate::model::config::{Arch, Config, RopeStyle};

pub(super) struct ParsedConfig {
    pub(super) config: Config,
    /// Whether `tie_word_embeddings` was present in the file.
    pub(super) tie_explicit: bool,
}

/// Maps a transformers `config.json` onto [`Config`] and validates it.
pub fn parse_config(json: &str) -> Result<Config, HfError> {
    parse_config_inner(json).map(|p| p.config)
}

pub(super) fn parse_config_inner(json: &str) -> Result<ParsedConfig, HfError> {
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
            Arch::Qwen3 => "qwen3",
            Arch::Opt => "opt",
            Arch::Gemma3 => "gemma3_text",
        },
    };
    let tie = keys.opt_bool("tie_word_embeddings")?;
    let tie_explicit = tie.is_some();

    let config = match arch {
        Arch::Gemma3 => {
            return Err(HfError::Unsupported {
                what: "HF gemma3 checkpoints (run the GGUF instead)".into(),
            })
        }
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {
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
            // Qwen2's q/k/v biases are always there (no key); llama's and Qwen3's are off
            // unless `attention_bias` turns them (and an o bias) on.
            for key in ["mlp_bias"]
                .into_iter()
                .chain((arch != Arch::Qwen2).then_some("attention_bias"))
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
                // transformers' Qwen3Config defaults to 128 whatever the hidden size.
                None if arch == Arch::Qwen3 => QWEN3_DEFAULT_HEAD_DIM,
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
                sliding_window: None,
                sliding_layers: Vec::new(),
                rope_theta_sliding: None,
                attn_scale: None,
                final_logit_softcap: None,
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
                sliding_window: None,
                sliding_layers: Vec::new(),
                rope_theta_sliding: None,
                attn_scale: None,
                final_logit_softcap: None,
            }
        }
    };
    config.validate().map_err(HfError::InvalidConfig)?;
    Ok(ParsedConfig {
        config,
        tie_explicit,
    })
}

/// `head_dim` of a Qwen3 config.json without the key (transformers' `Qwen3Config` default).
const QWEN3_DEFAULT_HEAD_DIM: usize = 128;

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
            "qwen3" => Some(Arch::Qwen3),
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
