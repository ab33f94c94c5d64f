//! Qwen3 (q/k head norms, no q/k/v biases, heads not hidden / heads wide) from the tiny random
//! HF checkpoint in `tests/fixtures/hf/qwen3` (transformers' logits in `reference.json`, checked
//! by `tests/hf_reference.rs`): the same tensors written as a GGUF with llama.cpp's names give
//! the same logits; converted to a flash image, every strategy and window size gives the same
//! logits and the resident model's greedy tokens, calibrated too; from the command line it
//! converts, calibrates and generates under a memory budget, on the GPU too (dense and under a
//! VRAM budget, the CPU's tokens); `inspect` names the architecture, and an architecture the
//! engine does not run is refused at load, named. (The dense GPU decoder against transformers
//! and the CPU: `tests/gpu_decoder.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use llmflash::backend::kv_cache::KvType;
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::engine::sampler::argmax;
use llmflash::engine::Session;
use llmflash::image::BundleDtype;
use llmflash::model::config::Arch;
use llmflash::model::gguf::{GgufWriter, MetaValue};
use llmflash::model::hf::HfModel;
use llmflash::model::load;
use llmflash::model::tokenizer::bytes_to_unicode;
use llmflash::model::weights::ModelWeights;
use llmflash::quant::DType;

fn hf_dir() -> PathBuf {
    common::fixture("hf/qwen3")
}

/// llama.cpp's GGUF name of an HF tensor name (`convert_hf_to_gguf.py`'s Qwen3 mapping).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer.name");
    let name = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{name}")
}

/// The checkpoint as llama.cpp's converter writes it (`--outtype bf16`): metadata under
/// `qwen3.*`, matrices in bf16 with ggml's dimension order, norms in f32, and a byte-level
/// GPT-2 vocabulary of the 256 bytes (no merges). `drop` names a tensor left out;
/// `arch` replaces `general.architecture`.
fn write_gguf(path: &Path, arch: &str, drop: Option<&str>) {
    let m = HfModel::open(&hf_dir()).expect("open the HF checkpoint");
    let c = &m.config;
    let mut w = GgufWriter::new();
    let u32_of = |v: usize| MetaValue::U32(v as u32);
    w.add_meta("general.architecture", MetaValue::String(arch.into()));
    for (key, value) in [
        ("block_count", u32_of(c.n_layers)),
        ("context_length", u32_of(c.max_positions)),
        ("embedding_length", u32_of(c.hidden_size)),
        ("feed_forward_length", u32_of(c.intermediate_size)),
        ("attention.head_count", u32_of(c.n_heads)),
        ("attention.head_count_kv", u32_of(c.n_kv_heads)),
        ("attention.key_length", u32_of(c.head_dim)),
        ("attention.value_length", u32_of(c.head_dim)),
        (
            "rope.freq_base",
            MetaValue::F32(c.rope_theta.expect("RoPE")),
        ),
        (
            "attention.layer_norm_rms_epsilon",
            MetaValue::F32(c.norm_eps),
        ),
    ] {
        w.add_meta(format!("{arch}.{key}"), value);
    }
    let bytes = bytes_to_unicode();
    let tokens = (0..c.vocab_size)
        .map(|i| MetaValue::String(bytes[i].to_string()))
        .collect();
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.add_meta("tokenizer.ggml.pre", MetaValue::String("qwen2".into()));
    w.add_meta("tokenizer.ggml.tokens", MetaValue::Array(tokens));
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    let names: Vec<String> = m.tensor_names().map(String::from).collect();
    for hf in &names {
        let name = gguf_name(hf);
        if drop == Some(name.as_str()) {
            continue;
        }
        let t = m.tensor(hf).expect("tensor");
        assert_eq!(t.dtype, DType::BF16, "{hf}");
        if t.rows == 1 {
            // A vector: f32, as the converter keeps 1-D tensors.
            let f32s: Vec<u8> = t
                .bytes()
                .chunks_exact(2)
                .flat_map(|b| {
                    f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16).to_le_bytes()
                })
                .collect();
            w.add_tensor(name, &[t.cols as u64], DType::F32, f32s);
        } else {
            w.add_tensor(
                name,
                &[t.cols as u64, t.rows as u64],
                DType::BF16,
                t.bytes(),
            );
        }
    }
    std::fs::write(path, w.to_bytes()).expect("write the GGUF");
}

fn scratch_gguf(name: &str) -> PathBuf {
    common::scratch(name).with_extension("gguf")
}

/// Logits at every position of `tokens` and the greedy continuation of `n` tokens after them.
fn run(session: &mut Session, tokens: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let logits: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| session.step(t, true).expect("step").to_vec())
        .collect();
    let mut next = argmax(logits.last().expect("a token"));
    let mut greedy = Vec::new();
    for _ in 0..n {
        greedy.push(next);
        next = argmax(session.step(next, true).expect("step"));
    }
    (logits, greedy)
}

fn resident(weights: &ModelWeights, tokens: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    run(
        &mut Session::new(weights, 64).with_kv_type(KvType::F32),
        tokens,
        n,
    )
}

fn reference() -> (Vec<u32>, Vec<u32>) {
    let r = common::read_json(&hf_dir().join("reference.json"));
    (common::u32s(&r["tokens"]), common::u32s(&r["greedy"]))
}

#[test]
fn gguf_with_llamacpp_names_gives_the_hf_logits() {
    let path = scratch_gguf("qwen3-gguf");
    write_gguf(&path, "qwen3", None);
    let gguf = load(&path).expect("load the GGUF");
    let hf = load(&hf_dir()).expect("load the HF checkpoint");
    let (g, h) = (&gguf.weights.config, &hf.weights.config);
    assert_eq!(g.arch, Arch::Qwen3);
    assert_eq!(g, h, "GGUF and HF configs");
    assert_eq!((g.head_dim, g.n_heads, g.hidden_size), (24, 4, 64));
    assert!(g.tied_embeddings);
    let (tokens, greedy) = reference();
    let want = resident(&hf.weights, &tokens, greedy.len());
    assert_eq!(want.1, greedy, "HF load vs transformers' greedy tokens");
    let got = resident(&gguf.weights, &tokens, greedy.len());
    assert!(got.0 == want.0, "GGUF logits differ from the HF load's");
    assert_eq!(got.1, greedy);
    std::fs::remove_file(&path).ok();
}

/// A qwen3 file must carry its head norms; without one it is refused at load, named, not run
/// as if it were qwen2.
#[test]
fn gguf_without_a_head_norm_is_refused() {
    let path = scratch_gguf("qwen3-no-k-norm");
    write_gguf(&path, "qwen3", Some("blk.1.attn_k_norm.weight"));
    let e = load(&path).err().expect("refused").to_string();
    assert!(e.contains("blk.1.attn_k_norm.weight"), "{e}");
    std::fs::remove_file(&path).ok();
}

fn options(strategy: Strategy, selection: Selection, slots: Option<usize>) -> FlashOptions {
    FlashOptions {
        strategy,
        selection,
        window_slots: slots.map(|s| vec![s; 2]),
        io_threads: 2,
        ..FlashOptions::default()
    }
}

#[test]
fn flash_image_keeps_the_logits_and_greedy_tokens() {
    let hf = load(&hf_dir()).expect("load");
    let (tokens, greedy) = reference();
    let (want_logits, want) = resident(&hf.weights, &tokens, greedy.len());
    let image = common::to_image(&hf_dir(), "qwen3-flash", BundleDtype::Source);
    let model = Model::open(&image).expect("open the image");
    assert_eq!(model.weights.config, hf.weights.config);
    for l in &model.weights.layers {
        assert!(l.extra_norms.q.is_some() && l.extra_norms.k.is_some());
    }
    let flash = |opts: FlashOptions, cal: Option<&dyn llmflash::sparsity::Sparsity>| {
        let mut s = model.session(64, Some(opts), cal).expect("session");
        let out = run(&mut s, &tokens, greedy.len());
        let stats = s
            .ffn()
            .flash_stats()
            .map(|st| (st.neurons_loaded, st.neurons_needed));
        (out, stats)
    };
    let ((base, base_greedy), _) = flash(options(Strategy::Resident, Selection::All, None), None);
    // The down columns are f16 in the image (bf16 in the checkpoint): the resident model's
    // greedy tokens, logits within f16 rounding.
    assert_eq!(base_greedy, want, "image vs resident greedy tokens");
    for (pos, (got, want)) in base.iter().zip(&want_logits).enumerate() {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = (got.iter().zip(want)).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff / scale < 1e-2,
            "position {pos}: relative error {}",
            diff / scale
        );
    }
    // Wherever the bundles come from, through windows of any size: the same logits.
    for (strategy, slots) in [
        (Strategy::Mmap, None),
        (Strategy::Naive, None),
        (Strategy::Flash, None),
        (Strategy::Flash, Some(7)),
        (Strategy::Flash, Some(0)),
    ] {
        let ((got, got_greedy), stats) = flash(options(strategy, Selection::All, slots), None);
        assert!(
            got == base,
            "{strategy:?} with {slots:?} slots: logits differ"
        );
        assert_eq!(got_greedy, base_greedy, "{strategy:?} {slots:?}");
        if let (Strategy::Flash, Some(s), Some((loaded, _))) = (strategy, slots, stats) {
            // A window of `s` slots of 128 neurons reads the rest on every token.
            let per_token = 2 * (128 - s) as u64;
            assert!(
                loaded >= per_token * tokens.len() as u64,
                "{s} slots: {loaded} loaded"
            );
        }
    }
    // Calibrated: the predictor's sparse FFN is the same through a small window as through
    // the mapped image, and computes fewer neurons than all.
    let c = &model.weights.config;
    let cal = common::calibrate(&model, &common::tokens(256, c.vocab_size), 0.5, 8);
    let ((sparse, sparse_greedy), stats) = flash(
        options(Strategy::Mmap, Selection::Predictor, None),
        Some(&cal),
    );
    let (_, needed) = stats.expect("flash stats");
    let steps = (tokens.len() + greedy.len()) as u64;
    assert!(needed < steps * 2 * 128, "the predictor used every neuron");
    let ((got, got_greedy), _) = flash(
        options(Strategy::Flash, Selection::Predictor, Some(16)),
        Some(&cal),
    );
    assert!(got == sparse, "predictor: window vs mapped image");
    assert_eq!(got_greedy, sparse_greedy);
    std::fs::remove_file(&image).ok();
}

/// `llmflash ARGS`: stdout and stderr, with the cache of converted images in `cache`; panics
/// when it fails.
fn cli(args: &[&str], cache: &Path) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .env("LLMFLASH_CACHE", cache)
        .output()
        .expect("running llmflash");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "llmflash {args:?}: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// `generate --json`'s tokens and flash statistics.
fn generate(model: &str, extra: &[&str], cache: &Path) -> (Vec<u32>, serde_json::Value) {
    let mut args = vec!["generate", "-m", model, "--token-ids", "1,17,200,45,3,99"];
    args.extend(["-n", "12", "--json", "--greedy", "--ignore-eos"]);
    args.extend(extra);
    let (out, _) = cli(&args, cache);
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    (common::u32s(&v["tokens"]), v["stats"].clone())
}

#[test]
fn command_line_converts_calibrates_and_generates_under_a_budget() {
    let dir = common::root()
        .join("target/test-files")
        .join(format!("qwen3-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache");
    let gguf = dir.join("qwen3.gguf");
    write_gguf(&gguf, "qwen3", None);
    let gguf = gguf.to_str().expect("utf-8");
    let hf = hf_dir();
    let hf = hf.to_str().expect("utf-8");

    // inspect names the architecture and says both backends run it.
    for m in [gguf, hf] {
        let (out, _) = cli(&["inspect", m], &cache);
        assert!(out.contains("architecture: qwen3"), "{out}");
        assert!(out.contains("backends: cpu, gpu"), "{out}");
    }

    let (want, _) = generate(gguf, &[], &cache);
    let (from_hf, _) = generate(hf, &[], &cache);
    assert_eq!(from_hf, want, "GGUF vs HF directory");

    // Under a budget the source is converted into the cache and run from the image.
    let (budgeted, stats) = generate(gguf, &["--memory-budget", "64MiB"], &cache);
    assert_eq!(stats["strategy"], "flash", "{stats}");
    assert!(
        stats["flash"]["bytes_read"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(budgeted, want, "budgeted flash image vs resident");

    // convert and calibrate (byte tokens of the calibration text), then every neuron read
    // through the window, and the predictor under a budget.
    let image = dir.join("qwen3.flash");
    let image = image.to_str().expect("utf-8");
    cli(&["convert", gguf, "-o", image], &cache);
    let text = common::fixture("text/python-doc-eval.txt");
    let text = text.to_str().expect("utf-8");
    let (_, err) = cli(
        &[
            "calibrate",
            image,
            "--text",
            text,
            "--tokens",
            "512",
            "--ctx",
            "64",
            "--rank",
            "8",
            "--sparsity",
            "0.5",
        ],
        &cache,
    );
    assert!(err.contains("recorded 512 tokens x 2 layers"), "{err}");
    assert!(err.contains("sparsity 0.50: fitted"), "{err}");
    let (out, _) = cli(&["inspect", image], &cache);
    assert!(out.contains("Qwen3"), "{out}");
    let (dense, stats) = generate(image, &["--strategy", "flash", "--dense"], &cache);
    assert_eq!(dense, want, "dense from the calibrated image");
    assert!(
        stats["flash"]["neurons_loaded"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let (predicted, stats) = generate(image, &["--memory-budget", "64MiB", "--predictor"], &cache);
    assert_eq!(stats["flash"]["selection"], "predictor", "{stats}");
    let needed = stats["flash"]["neurons_needed"].as_u64().unwrap();
    let tokens = stats["flash"]["tokens"].as_u64().unwrap();
    assert!(
        needed < tokens * 2 * 128,
        "the predictor computed every neuron: {stats}"
    );
    assert_eq!(predicted.len(), 12);
    std::fs::remove_dir_all(&dir).ok();
}

/// On the GPU (its f32 arithmetic, so the CPU's too), dense from the HF checkpoint and from
/// its flash image, under a VRAM budget too: the CPU's greedy tokens.
#[test]
fn gpu_generates_the_cpu_tokens_dense_and_from_the_image() {
    if common::gpu().is_none() {
        return;
    }
    let dir = common::root()
        .join("target/test-files")
        .join(format!("qwen3-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache");
    let hf = hf_dir();
    let hf = hf.to_str().expect("utf-8");
    let f32s = ["--activations", "f32", "--kv-type", "f32"];
    let (cpu, _) = generate(hf, &f32s, &cache);
    let gpu = ["--backend", "gpu", "--kv-type", "f32"];
    let (dense, _) = generate(hf, &gpu, &cache);
    assert_eq!(dense, cpu, "dense GPU decoder vs CPU");
    let image = common::to_image(&hf_dir(), "qwen3-gpu", BundleDtype::Source);
    let image_s = image.to_str().expect("utf-8");
    let (cpu_flash, _) = generate(image_s, &f32s, &cache);
    let (gpu_flash, _) = generate(image_s, &gpu, &cache);
    assert_eq!(
        gpu_flash, cpu_flash,
        "GPU flash decoder vs CPU, from the image"
    );
    let run = [
        "--token-ids",
        "1,17,200,45,3,99",
        "-n",
        "12",
        "--kv-type",
        "f32",
    ];
    let budget = (common::vram_minimum(&image, &run) + 64 * 1024).to_string();
    let mut args = gpu.to_vec();
    args.extend(["--vram-budget", &budget]);
    let (budgeted, stats) = generate(image_s, &args, &cache);
    assert_eq!(budgeted, cpu_flash, "under a VRAM budget: {stats}");
    std::fs::remove_file(&image).ok();
    std::fs::remove_dir_all(&dir).ok();
}

/// An architecture the engine does not run is refused at load, by name, from GGUF and HF.
#[test]
fn unsupported_architectures_are_refused_at_load_by_name() {
    let path = scratch_gguf("phi3");
    write_gguf(&path, "phi3", None);
    let e = load(&path).err().expect("refused").to_string();
    assert!(e.contains("architecture `phi3` is not supported"), "{e}");
    assert!(e.contains("qwen3"), "the supported list names qwen3: {e}");
    std::fs::remove_file(&path).ok();

    let dir = common::root()
        .join("target/test-files")
        .join(format!("phi3-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(hf_dir().join("config.json")).unwrap();
    assert!(config.contains("\"model_type\": \"qwen3\""));
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"model_type\": \"qwen3\"", "\"model_type\": \"phi3\""),
    )
    .unwrap();
    std::fs::copy(
        hf_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = load(&dir).err().expect("refused").to_string();
    assert!(e.contains("model type `phi3` is not supported"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
