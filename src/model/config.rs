//! Architecture configuration shared by every loader (GGUF, HF directory) and every backend.

use serde::{Deserialize, Serialize};

/// Model families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama, Mistral, SmolLM2: SwiGLU FFN, RMSNorm, RoPE, optional GQA.
    Llama,
    /// Qwen2: as Llama plus a bias on q, k and v.
    Qwen2,
    /// Qwen3: as Qwen2 without the q/k/v biases, with an RMSNorm on each query and key head
    /// before RoPE, and a `head_dim` of its own (not necessarily hidden / heads).
    Qwen3,
    /// OPT: ReLU FFN with biases, LayerNorm, learned positions.
    Opt,
    /// Gemma 3: embeddings scaled by sqrt(hidden), RMSNorm on q and k per head, a norm after
    /// attention and after the FFN as well as before each, GELU-tanh gating, and sliding-window
    /// layers (their own RoPE base) interleaved with global ones.
    Gemma3,
}

/// The FFN's shape: SwiGLU `down(silu(gate x) * up x)`, GeGLU `down(gelu_tanh(gate x) * up x)`
/// or ReLU `down(relu(up x + b) ) + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnKind {
    SwiGlu,
    Relu,
    /// Gated like SwiGLU, with GELU (tanh approximation) in place of SiLU (Gemma).
    GeGlu,
}

impl FfnKind {
    /// Whether the FFN has a gate matrix (SwiGLU and GeGLU).
    pub fn gated(self) -> bool {
        matches!(self, FfnKind::SwiGlu | FfnKind::GeGlu)
    }
}

/// How rotary embedding pairs dimensions within a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): ggml's "normal" mode, used on GGUF llama weights (whose q/k rows the
    /// converter permuted for exactly this).
    Adjacent,
    /// Pairs (i, i + head_dim/2): HF's `rotate_half`, ggml's NEOX mode (qwen2 GGUF).
    Halves,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Epsilon of RMSNorm or LayerNorm.
    pub norm_eps: f32,
    /// RoPE base frequency; `None` for models with learned positions (OPT).
    pub rope_theta: Option<f32>,
    pub rope_style: RopeStyle,
    /// Longest context the model was trained for.
    pub max_positions: usize,
    /// Whether the output projection is the token embedding matrix.
    pub tied_embeddings: bool,
    /// OPT only: LayerNorm before (true) or after (false) each sub-block.
    pub pre_norm: bool,
    /// OPT only: width of the embeddings when `project_in`/`project_out` exist.
    pub embed_dim: usize,
    /// Sliding-window attention (Gemma 3): a sliding layer's query at position p sees the
    /// positions `p - window + 1 ..= p`; `None` when every layer is global.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends through the sliding window (empty: none does).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding layers (Gemma 3: 10000, against 1e6 for the global ones);
    /// `None`: every layer uses `rope_theta`.
    #[serde(default)]
    pub rope_theta_sliding: Option<f32>,
    /// The factor queries are multiplied by before `q·k`; `None`: `1/sqrt(head_dim)`.
    #[serde(default)]
    pub attn_scale: Option<f32>,
    /// Final logits squashed as `c * tanh(logits / c)` (Gemma 2 style); `None`: left as they
    /// are (Gemma 3).
    #[serde(default)]
    pub final_logit_softcap: Option<f32>,
}

/// Checks that `value` of the parameter `key` is a finite number above 0 (a norm epsilon, a
/// RoPE base), with a message naming both.
pub fn check_positive(key: &str, value: f32) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(format!(
        "`{key}` is {value}; expected a finite number above 0 (the file is corrupt or not a \
         model this engine runs)"
    ))
}

impl Arch {
    /// The architecture's name as GGUF's `general.architecture` spells it (`opt`, which GGUF
    /// does not carry, as HF's `model_type` does).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Opt => "opt",
            Arch::Gemma3 => "gemma3",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Config {
    pub fn ffn_kind(&self) -> FfnKind {
        match self.arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => FfnKind::SwiGlu,
            Arch::Opt => FfnKind::Relu,
            Arch::Gemma3 => FfnKind::GeGlu,
        }
    }

    /// The factor token embeddings are multiplied by (Gemma: `sqrt(hidden)`, in f32 as
    /// llama.cpp computes it).
    pub fn embed_scale(&self) -> Option<f32> {
        match self.arch {
            Arch::Gemma3 => Some((self.hidden_size as f32).sqrt()),
            _ => None,
        }
    }

    /// Whether layer `l` attends through the sliding window.
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(l).copied().unwrap_or(false)
    }

    /// The first cache position layer `l`'s query at `pos` attends to: 0 for a global layer,
    /// `pos + 1 - window` (at least 0) for a sliding one (llama.cpp masks key `p0` from query
    /// `p1` when `p1 - p0 >= window`).
    pub fn attn_start(&self, l: usize, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) if self.is_sliding(l) => (pos + 1).saturating_sub(w),
            _ => 0,
        }
    }

    /// The RoPE base of layer `l`.
    pub fn rope_theta_of(&self, l: usize) -> Option<f32> {
        match self.rope_theta_sliding {
            Some(local) if self.is_sliding(l) => Some(local),
            _ => self.rope_theta,
        }
    }

    /// The query scale of attention.
    pub fn query_scale(&self) -> f32 {
        self.attn_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Width of the key/value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on, so a bad file fails at load time with
    /// a message instead of panicking mid-generation.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} is 0; expected at least 1"));
            }
        }
        check_positive("norm_eps", self.norm_eps)?;
        if let Some(theta) = self.rope_theta {
            check_positive("rope_theta", theta)?;
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_heads ({}) is not a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.rope_theta.is_some() && !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        if let Some(theta) = self.rope_theta_sliding {
            check_positive("rope_theta_sliding", theta)?;
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window is 0; expected at least 1".into());
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.n_layers {
            return Err(format!(
                "the sliding-window pattern names {} layers, the model has {}",
                self.sliding_layers.len(),
                self.n_layers
            ));
        }
        for (key, v) in [
            ("attn_scale", self.attn_scale),
            ("final_logit_softcap", self.final_logit_softcap),
        ] {
            if let Some(v) = v {
                check_positive(key, v)?;
            }
        }
        if self.hidden_size > 1 << 20 || self.vocab_size > 1 << 24 || self.n_layers > 4096 {
            return Err("implausibly large dimensions".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{write_gguf, GgufFile, MetaValue};
    use crate::model::weights::gguf_config;

    /// A small valid llama config, from the GGUF metadata below (the image module's
    /// `SyntheticShape` sits a layer above this one).
    fn config() -> Config {
        gguf_with("llama.block_count", MetaValue::U32(2)).expect("a valid config")
    }

    #[test]
    fn non_finite_or_non_positive_parameters_are_refused() {
        assert!(config().validate().is_ok());
        for eps in [f32::NAN, f32::INFINITY, 0.0, -1e-5] {
            let c = Config {
                norm_eps: eps,
                ..config()
            };
            let e = c.validate().unwrap_err();
            assert!(e.contains("`norm_eps` is") && e.contains("above 0"), "{e}");
        }
        for theta in [f32::NAN, f32::NEG_INFINITY, 0.0, -10_000.0] {
            let c = Config {
                rope_theta: Some(theta),
                ..config()
            };
            let e = c.validate().unwrap_err();
            assert!(e.contains("`rope_theta` is"), "{e}");
        }
        let c = Config {
            n_kv_heads: 0,
            ..config()
        };
        assert!(c.validate().unwrap_err().contains("n_kv_heads is 0"));
    }

    /// GGUF metadata of a small llama, with `key` set to `value` (or added).
    fn gguf_with(key: &str, value: MetaValue) -> Result<Config, String> {
        let mut meta: Vec<(&str, MetaValue)> = vec![
            ("general.architecture", MetaValue::String("llama".into())),
            ("llama.embedding_length", MetaValue::U32(64)),
            ("llama.attention.head_count", MetaValue::U32(4)),
            ("llama.attention.head_count_kv", MetaValue::U32(2)),
            ("llama.vocab_size", MetaValue::U32(100)),
            ("llama.feed_forward_length", MetaValue::U32(160)),
            ("llama.block_count", MetaValue::U32(2)),
            ("llama.context_length", MetaValue::U32(256)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-5),
            ),
            ("llama.rope.freq_base", MetaValue::F32(10_000.0)),
        ];
        meta.retain(|(k, _)| *k != key);
        meta.push((key, value));
        let f = GgufFile::from_bytes(write_gguf(&meta, &[])).map_err(|e| e.to_string())?;
        gguf_config(&f).map_err(|e| e.to_string())
    }

    #[test]
    fn gguf_parameters_are_named_by_their_key() {
        assert!(gguf_with("llama.rope.freq_base", MetaValue::F32(10_000.0)).is_ok());
        let e = gguf_with("llama.rope.freq_base", MetaValue::F32(f32::NAN)).unwrap_err();
        assert!(e.contains("`llama.rope.freq_base` is NaN"), "{e}");
        let e = gguf_with("llama.rope.freq_base", MetaValue::F32(-1.0)).unwrap_err();
        assert!(e.contains("`llama.rope.freq_base` is -1"), "{e}");
        let e = gguf_with(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(f32::INFINITY),
        )
        .unwrap_err();
        assert!(
            e.contains("`llama.attention.layer_norm_rms_epsilon` is inf"),
            "{e}"
        );
        let e = gguf_with(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(0.0),
        )
        .unwrap_err();
        assert!(e.contains("layer_norm_rms_epsilon` is 0"), "{e}");
        let e = gguf_with("llama.attention.head_count", MetaValue::U32(0)).unwrap_err();
        assert!(e.contains("`llama.attention.head_count` is 0"), "{e}");
        let e = gguf_with("llama.attention.head_count_kv", MetaValue::U32(0)).unwrap_err();
        assert!(e.contains("`llama.attention.head_count_kv` is 0"), "{e}");
        // Value heads as wide as the key heads (64 / 4) load; narrower ones are refused.
        assert!(gguf_with("llama.attention.value_length", MetaValue::U32(16)).is_ok());
        let e = gguf_with("llama.attention.value_length", MetaValue::U32(8)).unwrap_err();
        assert!(
            e.contains("`llama.attention.value_length` is 8 and the key heads are 16 wide"),
            "{e}"
        );
    }
}
