//! Architecture configuration shared by every loader (GGUF, HF directory) and every backend.

use serde::{Deserialize, Serialize};

/// Model families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama, Mistral, SmolLM2: SwiGLU FFN, RMSNorm, RoPE, optional GQA.
    Llama,
    /// Qwen2: as Llama plus a bias on q, k and v.
    Qwen2,
    /// OPT: ReLU FFN with biases, LayerNorm, learned positions.
    Opt,
}

/// The FFN's shape: SwiGLU `down(silu(gate x) * up x)` or ReLU `down(relu(up x + b) ) + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnKind {
    SwiGlu,
    Relu,
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
}

impl Config {
    pub fn ffn_kind(&self) -> FfnKind {
        match self.arch {
            Arch::Llama | Arch::Qwen2 => FfnKind::SwiGlu,
            Arch::Opt => FfnKind::Relu,
        }
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
                return Err(format!("{name} is 0"));
            }
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
        if self.hidden_size > 1 << 20 || self.vocab_size > 1 << 24 || self.n_layers > 4096 {
            return Err("implausibly large dimensions".to_string());
        }
        Ok(())
    }
}
