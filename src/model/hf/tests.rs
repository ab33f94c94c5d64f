use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use serde_json::Value;

use super::safetensors::IndexFile;
use super::*;
use crate::model::config::RopeStyle;
use crate::quant::DType;
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
fn parse_qwen3_config() {
    let json = LLAMA_CONFIG
        .replace("\"llama\"", "\"qwen3\"")
        .replace("\"rope_scaling\": null", "\"head_dim\": 6");
    let c = parse_config(&json).unwrap();
    assert_eq!(c.arch, Arch::Qwen3);
    assert_eq!(c.rope_style, RopeStyle::Halves);
    // head_dim is its own: 6, not hidden / heads = 2.
    assert_eq!((c.n_heads, c.head_dim), (2, 6));
    // Without the key, transformers' Qwen3Config default (128), not hidden / heads.
    let json = LLAMA_CONFIG.replace("\"llama\"", "\"qwen3\"");
    assert_eq!(parse_config(&json).unwrap().head_dim, 128);
    // Biases on the attention projections are not run.
    let json = LLAMA_CONFIG
        .replace("\"llama\"", "\"qwen3\"")
        .replace("\"rope_scaling\": null", "\"attention_bias\": true");
    let e = parse_config(&json).unwrap_err().to_string();
    assert!(e.contains("attention_bias"), "{e}");
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
    use ::safetensors::tensor::{serialize, Dtype, TensorView};
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
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {
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
        Arch::Gemma3 => unreachable!("no HF gemma3 fixture"),
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
fn fixture_qwen3_bf16() {
    if let Some(m) = check_fixture("qwen3", Arch::Qwen3, Some(DType::BF16)) {
        let c = &m.config;
        // The fixture's heads are not hidden / heads wide, and it has no q/k/v biases.
        assert_ne!(c.n_heads * c.head_dim, c.hidden_size);
        assert!(!m.has("model.layers.0.self_attn.q_proj.bias"));
        for t in ["q_norm", "k_norm"] {
            let n = m
                .tensor(&format!("model.layers.0.self_attn.{t}.weight"))
                .unwrap();
            assert_eq!(n.len(), c.head_dim, "{t}");
        }
        assert!(c.tied_embeddings && !m.has("lm_head.weight"));
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
