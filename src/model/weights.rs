//! The loaded weights of one model, in a form every backend reads, and the loaders that fill
//! them from a GGUF file or an HF directory.
//!
//! Matrices stay in their file's dtype (quantised blocks are multiplied directly); the small
//! vectors (norms, biases) are dequantised to f32 once at load time.

use crate::model::config::{Arch, Config, RopeStyle};
use crate::model::gguf::GgufFile;
use crate::model::hf::HfModel;
use crate::model::tensor::Tensor;
use crate::quant::{self, Activations};

/// A linear layer `y = W x + b`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

/// RMSNorm (no bias) or LayerNorm (with bias, mean-centred).
#[derive(Clone, Debug)]
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

/// The feed-forward matrices (biases live in [`FfnBias`]). SwiGLU models have `gate`; ReLU
/// models (OPT) do not.
#[derive(Clone, Debug)]
pub struct Ffn {
    pub gate: Option<Tensor>,
    pub up: Tensor,
    pub down: Tensor,
}

/// The FFN's biases (OPT): small, so they stay resident even when the matrices live on flash.
#[derive(Clone, Debug, Default)]
pub struct FfnBias {
    /// One per neuron, added to `up x`.
    pub up: Option<Vec<f32>>,
    /// One per output, added after the down projection.
    pub down: Option<Vec<f32>>,
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub ffn_norm: Norm,
    /// The dense FFN matrices; `None` for a flash image, whose FFN weights stay on disk in
    /// bundles.
    pub ffn: Option<Ffn>,
    pub ffn_bias: FfnBias,
    /// Gemma 3's and Qwen3's extra norms (each `None` where the family has none).
    pub extra_norms: ExtraNorms,
}

/// The norms Gemma 3 adds to a layer (all RMSNorm): on each query and key head before RoPE
/// (`head_dim` weights), and on the attention and FFN outputs before their residual adds.
/// Qwen3 has the first two only.
#[derive(Clone, Debug, Default)]
pub struct ExtraNorms {
    pub q: Option<Norm>,
    pub k: Option<Norm>,
    pub post_attn: Option<Norm>,
    pub post_ffn: Option<Norm>,
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub config: Config,
    /// Token embeddings, `vocab x embed_dim`.
    pub embed: Tensor,
    /// Learned positions (OPT), `max_positions + offset x hidden`.
    pub positions: Option<Tensor>,
    /// Row of `positions` that holds position 0 (OPT reserves two rows).
    pub position_offset: usize,
    /// OPT-350m style projections between `embed_dim` and `hidden_size`.
    pub project_in: Option<Linear>,
    pub project_out: Option<Linear>,
    pub layers: Vec<Layer>,
    pub final_norm: Option<Norm>,
    /// Output projection, `vocab x embed_dim`; the embedding matrix when tied.
    pub lm_head: Tensor,
    /// How the CPU's activations meet these quantised weights: llama.cpp's Q8 (the default)
    /// or f32, the GPU backend's arithmetic. Set it before building sessions.
    pub activations: Activations,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] crate::model::gguf::GgufError),
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> LoadError {
    LoadError::Invalid(msg.into())
}

/// Dequantises a 1-D tensor (a norm weight or a bias) to f32, checking its length.
fn vector(t: &Tensor, len: usize) -> Result<Vec<f32>, LoadError> {
    if t.len() != len {
        return Err(invalid(format!(
            "tensor `{}` has {} elements, expected {len}; the file does not match its config",
            t.name,
            t.len()
        )));
    }
    let mut out = vec![0.0f32; len];
    quant::dequantize(t.dtype, t.bytes(), &mut out)
        .map_err(|e| invalid(format!("tensor `{}`: {e}", t.name)))?;
    Ok(out)
}

/// Checks that a matrix is `rows x cols`.
fn matrix(t: Tensor, rows: usize, cols: usize) -> Result<Tensor, LoadError> {
    if t.rows != rows || t.cols != cols {
        return Err(invalid(format!(
            "tensor `{}` is {} x {}, expected {rows} x {cols}; the file does not match its config",
            t.name, t.rows, t.cols
        )));
    }
    Ok(t)
}

/// Reads tensors by name from either kind of file, so the assembly below is written once.
trait TensorSource {
    fn get(&self, name: &str) -> Result<Tensor, LoadError>;
    fn has(&self, name: &str) -> bool;

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor, LoadError> {
        matrix(self.get(name)?, rows, cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        vector(&self.get(name)?, len)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, LoadError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    fn linear(&self, w: &str, b: &str, rows: usize, cols: usize) -> Result<Linear, LoadError> {
        Ok(Linear {
            weight: self.matrix(w, rows, cols)?,
            bias: self.optional_vector(b, rows)?,
        })
    }

    fn norm(&self, w: &str, b: &str, len: usize) -> Result<Norm, LoadError> {
        Ok(Norm {
            weight: self.vector(w, len)?,
            bias: self.optional_vector(b, len)?,
        })
    }
}

impl TensorSource for GgufFile {
    fn get(&self, name: &str) -> Result<Tensor, LoadError> {
        Ok(self.tensor(name)?)
    }
    fn has(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }
}

impl TensorSource for HfModel {
    fn get(&self, name: &str) -> Result<Tensor, LoadError> {
        Ok(self.tensor(name)?)
    }
    fn has(&self, name: &str) -> bool {
        HfModel::has(self, name)
    }
}

/// Tensor names of one layer in a file's naming scheme.
struct LayerNames {
    attn_norm: String,
    attn_norm_b: String,
    q: String,
    k: String,
    v: String,
    o: String,
    ffn_norm: String,
    ffn_norm_b: String,
    gate: Option<String>,
    up: String,
    down: String,
    /// Gemma 3 and Qwen3: the q and k head norms (names without `.weight`).
    qk_norm: Option<[String; 2]>,
    /// Gemma 3: the post-attention and post-FFN norms (names without `.weight`).
    post_norms: Option<[String; 2]>,
}

fn bias_of(weight: &str) -> String {
    weight.replace(".weight", ".bias")
}

fn gguf_layer_names(i: usize) -> LayerNames {
    let p = format!("blk.{i}");
    LayerNames {
        attn_norm: format!("{p}.attn_norm.weight"),
        attn_norm_b: format!("{p}.attn_norm.bias"),
        q: format!("{p}.attn_q.weight"),
        k: format!("{p}.attn_k.weight"),
        v: format!("{p}.attn_v.weight"),
        o: format!("{p}.attn_output.weight"),
        ffn_norm: format!("{p}.ffn_norm.weight"),
        ffn_norm_b: format!("{p}.ffn_norm.bias"),
        gate: Some(format!("{p}.ffn_gate.weight")),
        up: format!("{p}.ffn_up.weight"),
        down: format!("{p}.ffn_down.weight"),
        qk_norm: None,
        post_norms: None,
    }
}

/// GGUF names of the extra norms in layer `i` (q and k head norms, then Gemma 3's post norms),
/// without `.weight`.
pub(crate) fn gguf_extra_norm_names(i: usize) -> [String; 4] {
    let p = format!("blk.{i}");
    [
        format!("{p}.attn_q_norm"),
        format!("{p}.attn_k_norm"),
        format!("{p}.post_attention_norm"),
        format!("{p}.post_ffw_norm"),
    ]
}

fn hf_llama_layer_names(i: usize) -> LayerNames {
    let p = format!("model.layers.{i}");
    LayerNames {
        attn_norm: format!("{p}.input_layernorm.weight"),
        attn_norm_b: format!("{p}.input_layernorm.bias"),
        q: format!("{p}.self_attn.q_proj.weight"),
        k: format!("{p}.self_attn.k_proj.weight"),
        v: format!("{p}.self_attn.v_proj.weight"),
        o: format!("{p}.self_attn.o_proj.weight"),
        ffn_norm: format!("{p}.post_attention_layernorm.weight"),
        ffn_norm_b: format!("{p}.post_attention_layernorm.bias"),
        gate: Some(format!("{p}.mlp.gate_proj.weight")),
        up: format!("{p}.mlp.up_proj.weight"),
        down: format!("{p}.mlp.down_proj.weight"),
        qk_norm: None,
        post_norms: None,
    }
}

/// HF names of Qwen3's q and k head norms in layer `i`, without `.weight`.
fn hf_qk_norm_names(i: usize) -> [String; 2] {
    let p = format!("model.layers.{i}.self_attn");
    [format!("{p}.q_norm"), format!("{p}.k_norm")]
}

fn hf_opt_layer_names(i: usize) -> LayerNames {
    let p = format!("model.decoder.layers.{i}");
    LayerNames {
        attn_norm: format!("{p}.self_attn_layer_norm.weight"),
        attn_norm_b: format!("{p}.self_attn_layer_norm.bias"),
        q: format!("{p}.self_attn.q_proj.weight"),
        k: format!("{p}.self_attn.k_proj.weight"),
        v: format!("{p}.self_attn.v_proj.weight"),
        o: format!("{p}.self_attn.out_proj.weight"),
        ffn_norm: format!("{p}.final_layer_norm.weight"),
        ffn_norm_b: format!("{p}.final_layer_norm.bias"),
        gate: None,
        up: format!("{p}.fc1.weight"),
        down: format!("{p}.fc2.weight"),
        qk_norm: None,
        post_norms: None,
    }
}

fn load_layer(src: &impl TensorSource, c: &Config, n: &LayerNames) -> Result<Layer, LoadError> {
    let (d, f, q_dim, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.n_heads * c.head_dim,
        c.kv_dim(),
    );
    let gate = match &n.gate {
        Some(g) => Some(src.matrix(g, f, d)?),
        None => None,
    };
    // Where the names are given the norms must exist: a qwen3 file without its q norm is
    // refused, not run as qwen2.
    let norm = |name: &str, len| -> Result<Option<Norm>, LoadError> {
        Ok(Some(Norm {
            weight: src.vector(&format!("{name}.weight"), len)?,
            bias: None,
        }))
    };
    let mut extra_norms = ExtraNorms::default();
    if let Some([q, k]) = &n.qk_norm {
        extra_norms.q = norm(q, c.head_dim)?;
        extra_norms.k = norm(k, c.head_dim)?;
    }
    if let Some([pa, pf]) = &n.post_norms {
        extra_norms.post_attn = norm(pa, d)?;
        extra_norms.post_ffn = norm(pf, d)?;
    }
    Ok(Layer {
        extra_norms,
        attn_norm: src.norm(&n.attn_norm, &n.attn_norm_b, d)?,
        attn: Attention {
            q: src.linear(&n.q, &bias_of(&n.q), q_dim, d)?,
            k: src.linear(&n.k, &bias_of(&n.k), kv, d)?,
            v: src.linear(&n.v, &bias_of(&n.v), kv, d)?,
            o: src.linear(&n.o, &bias_of(&n.o), d, q_dim)?,
        },
        ffn_norm: src.norm(&n.ffn_norm, &n.ffn_norm_b, d)?,
        ffn: Some(Ffn {
            gate,
            up: src.matrix(&n.up, f, d)?,
            down: src.matrix(&n.down, d, f)?,
        }),
        ffn_bias: FfnBias {
            up: src.optional_vector(&bias_of(&n.up), f)?,
            down: src.optional_vector(&bias_of(&n.down), d)?,
        },
    })
}

impl ModelWeights {
    /// Reads the config from GGUF metadata and maps every tensor (zero copy).
    pub fn from_gguf(file: &GgufFile) -> Result<ModelWeights, LoadError> {
        let config = gguf_config(file)?;
        let (v, d) = (config.vocab_size, config.hidden_size);
        let embed = file.matrix("token_embd.weight", v, d)?;
        let lm_head = if config.tied_embeddings {
            embed.clone()
        } else {
            file.matrix("output.weight", v, d)?
        };
        let arch = config.arch;
        let layers = (0..config.n_layers)
            .map(|i| {
                let mut names = gguf_layer_names(i);
                let [q, k, pa, pf] = gguf_extra_norm_names(i);
                if matches!(arch, Arch::Gemma3 | Arch::Qwen3) {
                    names.qk_norm = Some([q, k]);
                }
                if arch == Arch::Gemma3 {
                    names.post_norms = Some([pa, pf]);
                }
                load_layer(file, &config, &names)
            })
            .collect::<Result<_, _>>()?;
        Ok(ModelWeights {
            final_norm: Some(file.norm("output_norm.weight", "output_norm.bias", d)?),
            config,
            embed,
            positions: None,
            position_offset: 0,
            project_in: None,
            project_out: None,
            layers,
            lm_head,
            activations: Activations::default(),
        })
    }

    /// Maps the tensors of an HF checkpoint (llama, mistral, qwen2, qwen3, OPT).
    pub fn from_hf(model: &HfModel) -> Result<ModelWeights, LoadError> {
        match model.config.arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => hf_llama(model),
            Arch::Opt => hf_opt(model),
            Arch::Gemma3 => Err(invalid(
                "HF gemma3 checkpoints are not supported yet; run the GGUF instead",
            )),
        }
    }
}

fn hf_llama(m: &HfModel) -> Result<ModelWeights, LoadError> {
    let config = m.config.clone();
    let (v, d) = (config.vocab_size, config.hidden_size);
    let embed = m.matrix("model.embed_tokens.weight", v, d)?;
    let lm_head = if config.tied_embeddings {
        embed.clone()
    } else {
        m.matrix("lm_head.weight", v, d)?
    };
    let layers = (0..config.n_layers)
        .map(|i| {
            let mut names = hf_llama_layer_names(i);
            if config.arch == Arch::Qwen3 {
                names.qk_norm = Some(hf_qk_norm_names(i));
            }
            load_layer(m, &config, &names)
        })
        .collect::<Result<_, _>>()?;
    Ok(ModelWeights {
        final_norm: Some(m.norm("model.norm.weight", "model.norm.bias", d)?),
        config,
        embed,
        positions: None,
        position_offset: 0,
        project_in: None,
        project_out: None,
        layers,
        lm_head,
        activations: Activations::default(),
    })
}

/// OPT reserves the first two rows of its position table (a fairseq legacy).
const OPT_POSITION_OFFSET: usize = 2;

fn hf_opt(m: &HfModel) -> Result<ModelWeights, LoadError> {
    let config = m.config.clone();
    let (v, d, e) = (config.vocab_size, config.hidden_size, config.embed_dim);
    let embed = m.matrix("model.decoder.embed_tokens.weight", v, e)?;
    let positions = m.get("model.decoder.embed_positions.weight")?;
    if positions.cols != d || positions.rows < OPT_POSITION_OFFSET + 1 {
        return Err(invalid(format!(
            "OPT position table is {} x {}, expected at least {} x {d}",
            positions.rows,
            positions.cols,
            OPT_POSITION_OFFSET + 1
        )));
    }
    let lm_head = if config.tied_embeddings || !m.has("lm_head.weight") {
        embed.clone()
    } else {
        m.matrix("lm_head.weight", v, e)?
    };
    let (project_in, project_out) = if e != d {
        (
            Some(m.linear(
                "model.decoder.project_in.weight",
                "model.decoder.project_in.bias",
                d,
                e,
            )?),
            Some(m.linear(
                "model.decoder.project_out.weight",
                "model.decoder.project_out.bias",
                e,
                d,
            )?),
        )
    } else {
        (None, None)
    };
    let final_norm = if m.has("model.decoder.final_layer_norm.weight") {
        Some(m.norm(
            "model.decoder.final_layer_norm.weight",
            "model.decoder.final_layer_norm.bias",
            d,
        )?)
    } else {
        None
    };
    let layers = (0..config.n_layers)
        .map(|i| load_layer(m, &config, &hf_opt_layer_names(i)))
        .collect::<Result<_, _>>()?;
    Ok(ModelWeights {
        config,
        embed,
        positions: Some(positions),
        position_offset: OPT_POSITION_OFFSET,
        project_in,
        project_out,
        layers,
        final_norm,
        lm_head,
        activations: Activations::default(),
    })
}

/// Builds the architecture config from `general.architecture` and its `<arch>.*` keys.
pub fn gguf_config(f: &GgufFile) -> Result<Config, LoadError> {
    let name = f.get_str("general.architecture")?.to_string();
    let (arch, rope_style) = match name.as_str() {
        "llama" => (Arch::Llama, RopeStyle::Adjacent),
        "qwen2" => (Arch::Qwen2, RopeStyle::Halves),
        "qwen3" => (Arch::Qwen3, RopeStyle::Halves),
        "gemma3" => (Arch::Gemma3, RopeStyle::Halves),
        other => {
            return Err(invalid(format!(
                "GGUF architecture `{other}` is not supported; supported: llama, qwen2, qwen3, \
                 gemma3"
            )))
        }
    };
    let key = |k: &str| format!("{name}.{k}");
    // Counts and sizes: at least 1, named by their GGUF key when not.
    let usize_of = |k: &str| -> Result<usize, LoadError> {
        match f.get_u64(&key(k))? {
            0 => Err(invalid(format!(
                "GGUF metadata `{}` is 0; expected at least 1 (the file is corrupt)",
                key(k)
            ))),
            v => Ok(v as usize),
        }
    };
    let positive = |k: &str, v: f32| -> Result<f32, LoadError> {
        crate::model::config::check_positive(&key(k), v)
            .map(|_| v)
            .map_err(|e| invalid(format!("GGUF metadata {e}")))
    };
    let hidden_size = usize_of("embedding_length")?;
    let n_heads = usize_of("attention.head_count")?;
    let n_kv_heads = match f.get(&key("attention.head_count_kv")) {
        Some(_) => usize_of("attention.head_count_kv")?,
        None => n_heads,
    };
    let head_dim = match f.get(&key("attention.key_length")) {
        Some(_) => usize_of("attention.key_length")?,
        None => hidden_size / n_heads.max(1),
    };
    // Keys and values share one head width in the cache and in attention.
    if f.get(&key("attention.value_length")).is_some() {
        let value_dim = usize_of("attention.value_length")?;
        if value_dim != head_dim {
            return Err(invalid(format!(
                "GGUF metadata `{}` is {value_dim} and the key heads are {head_dim} wide; \
                 models whose value heads differ in width from their key heads are not \
                 supported",
                key("attention.value_length")
            )));
        }
    }
    let vocab_size = match f.get(&key("vocab_size")) {
        Some(_) => usize_of("vocab_size")?,
        None => f
            .tensor_info("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| invalid("GGUF has no token_embd.weight tensor"))?
            as usize,
    };
    let rope_theta = match f.get(&key("rope.freq_base")) {
        Some(_) => positive("rope.freq_base", f.get_f32(&key("rope.freq_base"))?)?,
        None => 10_000.0,
    };
    if let Some(v) = f.get(&key("rope.scaling.type")) {
        let kind = v.as_str().unwrap_or("?");
        if kind != "none" {
            return Err(invalid(format!(
                "rope scaling `{kind}` is not supported yet; use a model without rope scaling"
            )));
        }
    }
    let mut config = Config {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: usize_of("feed_forward_length")?,
        n_layers: usize_of("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        norm_eps: positive(
            "attention.layer_norm_rms_epsilon",
            f.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        )?,
        rope_theta: Some(rope_theta),
        rope_style,
        max_positions: usize_of("context_length")?,
        tied_embeddings: f.tensor_info("output.weight").is_none(),
        pre_norm: true,
        embed_dim: hidden_size,
        sliding_window: None,
        sliding_layers: Vec::new(),
        rope_theta_sliding: None,
        attn_scale: None,
        final_logit_softcap: None,
    };
    if arch == Arch::Gemma3 {
        crate::model::gemma3::gguf_params(f, &mut config)?;
    }
    config
        .validate()
        .map_err(|e| invalid(format!("GGUF config is inconsistent: {e}")))?;
    Ok(config)
}
