//! Calibration end to end: record a model's FFN activity, fit thresholds and predictors,
//! store them in the image and read them back; then the sparse paths it enables must not
//! depend on where bundles live or how small the window is.

mod common;

use llmflash::backend::kv_cache::KvType;
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::image::{reorder_neurons, BundleDtype};
use llmflash::sparsity::{Calibration, Sets, Sparsity};

use common::{calibrate, tokens};

fn options(
    strategy: Strategy,
    selection: Selection,
    slots: Option<usize>,
    layers: usize,
) -> FlashOptions {
    FlashOptions {
        strategy,
        selection,
        window_slots: slots.map(|s| vec![s; layers]),
        io_threads: 3,
        ..FlashOptions::default()
    }
}

/// Greedy tokens and the logits at each step.
fn decode(
    model: &Model,
    cal: Option<&dyn Sparsity>,
    opts: FlashOptions,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>, u64) {
    // An f32 cache: these tests compare FFN paths, and an f16 cache would magnify their
    // float-rounding differences into f16 rounding flips.
    let mut s = model
        .session(prompt.len() + n + 1, Some(opts), cal)
        .expect("session")
        .with_kv_type(KvType::F32);
    let mut logits = vec![s.prefill(prompt).expect("prefill").to_vec()];
    let mut out = Vec::new();
    for _ in 0..n {
        let last = logits.last().unwrap();
        let next = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b }) as u32;
        out.push(next);
        logits.push(s.step(next, true).expect("step").to_vec());
    }
    let needed = s.ffn().flash_stats().map_or(0, |st| st.neurons_needed);
    (out, logits, needed)
}

/// Every strategy and window size gives the same logits for `selection`.
fn sparse_paths_agree(
    model: &Model,
    cal: &Calibration,
    selection: Selection,
    prompt: &[u32],
) -> u64 {
    let layers = model.weights.config.n_layers;
    let (want, want_logits, needed) = decode(
        model,
        Some(cal),
        options(Strategy::Mmap, selection, None, layers),
        prompt,
        8,
    );
    for (strategy, slots) in [
        (Strategy::Resident, None),
        (Strategy::Naive, None),
        (Strategy::Flash, None),
        (Strategy::Flash, Some(5)),
        (Strategy::Flash, Some(0)),
    ] {
        let (got, got_logits, _) = decode(
            model,
            Some(cal),
            options(strategy, selection, slots, layers),
            prompt,
            8,
        );
        assert_eq!(
            got, want,
            "{selection:?} {strategy:?} {slots:?}: tokens differ"
        );
        assert!(
            got_logits == want_logits,
            "{selection:?} {strategy:?} {slots:?}: logits differ"
        );
    }
    // Hot neurons pinned in a small window: still the same.
    let slots = vec![6; layers];
    let pinned = cal.hot_neurons(Sets::Predicted, &slots);
    assert!(
        pinned.iter().any(|p| !p.is_empty()),
        "no hot neurons to pin"
    );
    let opts = FlashOptions {
        pinned: Some(pinned),
        ..options(Strategy::Flash, selection, Some(6), layers)
    };
    let (got, got_logits, _) = decode(model, Some(cal), opts, prompt, 8);
    assert_eq!(got, want, "{selection:?} with pins: tokens differ");
    assert!(
        got_logits == want_logits,
        "{selection:?} with pins: logits differ"
    );
    needed
}

#[test]
fn tiny_llama_calibration_round_trips_and_never_depends_on_the_window() {
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "calib-llama",
        BundleDtype::Source,
    );
    let model = Model::open(&path).expect("open");
    let c = model.weights.config.clone();
    let (n, layers) = (c.intermediate_size, c.n_layers);
    let cal = calibrate(&model, &tokens(400, c.vocab_size), 0.5, 8);
    for l in &cal.meta.layers {
        assert!(l.threshold > 0.0);
        assert!(
            (l.accuracy.true_density - 0.5).abs() < 0.1,
            "{:?}",
            l.accuracy
        );
        assert!(l.accuracy.recall >= 0.85, "{:?}", l.accuracy);
    }
    cal.save(&path).expect("save");
    drop(model);

    let model = Model::open(&path).expect("reopen");
    let loaded = Calibration::load(model.image.as_ref().unwrap())
        .expect("load")
        .expect("calibrated");
    assert_eq!(loaded.meta.layers.len(), layers);
    for (a, b) in loaded.meta.layers.iter().zip(&cal.meta.layers) {
        assert_eq!((a.threshold, a.tau), (b.threshold, b.tau));
    }
    assert_eq!(loaded.frequencies, cal.frequencies);
    for (a, b) in loaded.predictors.iter().zip(&cal.predictors) {
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    let prompt = tokens(6, c.vocab_size);
    let total = (layers * n * (prompt.len() + 8)) as u64;
    let oracle = sparse_paths_agree(&model, &loaded, Selection::Oracle, &prompt);
    let predicted = sparse_paths_agree(&model, &loaded, Selection::Predictor, &prompt);
    // The sparse paths really are sparse: the oracle keeps about half of the neurons.
    assert!(oracle < total * 7 / 10, "oracle used {oracle} of {total}");
    assert!(predicted < total, "predictor used every neuron");

    // Stored hottest first, the image decodes the same, and the pinned neurons are each
    // section's first slots.
    let before = decode(
        &model,
        Some(&loaded),
        options(Strategy::Mmap, Selection::Predictor, None, layers),
        &prompt,
        8,
    );
    drop(model);
    let orders: Vec<Vec<u32>> = (0..layers)
        .map(|l| loaded.hot_order(Sets::Predicted, l))
        .collect();
    reorder_neurons(&path, &orders, |_| {}).expect("reorder");
    let model = Model::open(&path).expect("reopen reordered");
    let image = model.image.as_ref().unwrap();
    for (l, pins) in loaded
        .hot_neurons(Sets::Predicted, &vec![n; layers])
        .iter()
        .enumerate()
    {
        let perm = image.ffn_section(l).permutation.clone().unwrap_or_default();
        assert!(
            perm.is_empty() || perm[..pins.len()] == pins[..],
            "layer {l}"
        );
    }
    let reloaded = Calibration::load(image).expect("load").expect("calibrated");
    let after = decode(
        &model,
        Some(&reloaded),
        options(Strategy::Flash, Selection::Predictor, Some(5), layers),
        &prompt,
        8,
    );
    assert_eq!(after.0, before.0, "reordering changed the tokens");
    assert!(after.1 == before.1, "reordering changed the logits");
    std::fs::remove_file(path).ok();
}

/// A threshold of zero keeps every neuron: the oracle path must then be the dense path, bit
/// for bit, whatever the window.
struct KeepAll;

impl Sparsity for KeepAll {
    fn predict(&self, _: usize, _: &[f32], _: &mut Vec<u32>) {}
    fn threshold(&self, _: usize) -> f32 {
        0.0
    }
}

#[test]
fn oracle_with_an_unlimited_budget_is_the_dense_path() {
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "calib-dense",
        BundleDtype::Source,
    );
    let model = Model::open(&path).expect("open");
    let layers = model.weights.config.n_layers;
    let prompt = tokens(5, model.weights.config.vocab_size);
    let (dense, dense_logits, _) = decode(
        &model,
        None,
        options(Strategy::Resident, Selection::All, None, layers),
        &prompt,
        8,
    );
    for slots in [None, Some(3)] {
        let (got, got_logits, _) = decode(
            &model,
            Some(&KeepAll),
            options(Strategy::Flash, Selection::Oracle, slots, layers),
            &prompt,
            8,
        );
        assert_eq!(got, dense);
        assert!(got_logits == dense_logits, "oracle with {slots:?} slots");
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn relu_oracle_keeps_exactly_the_nonzero_neurons() {
    let path = common::to_image(&common::fixture("hf/opt"), "calib-opt", BundleDtype::F16);
    let model = Model::open(&path).expect("open");
    let c = &model.weights.config;
    let cal = calibrate(&model, &tokens(300, c.vocab_size), 0.5, 8);
    // ReLU: the target sparsity is ignored; active means non-zero.
    assert!(cal
        .meta
        .layers
        .iter()
        .all(|l| l.threshold == f32::MIN_POSITIVE));
    let layers = c.n_layers;
    let prompt = tokens(5, c.vocab_size);
    let (dense, dense_logits, _) = decode(
        &model,
        None,
        options(Strategy::Resident, Selection::All, None, layers),
        &prompt,
        8,
    );
    let (got, got_logits, _) = decode(
        &model,
        Some(&cal),
        options(Strategy::Flash, Selection::Oracle, Some(4), layers),
        &prompt,
        8,
    );
    // Dropping exact zeros changes only how the sum is grouped: same tokens, logits equal to
    // float rounding.
    assert_eq!(got, dense);
    for (a, b) in got_logits.iter().zip(&dense_logits) {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff / scale < 1e-5, "relative difference {}", diff / scale);
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn smollm2_predictor_tokens_do_not_depend_on_the_budget() {
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let path = common::to_image(&gguf, "calib-smollm2", BundleDtype::Source);
    let model = Model::open(&path).expect("open");
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let ids = tok.encode(&text, false, false);
    let cal = calibrate(&model, &ids[..384], 0.5, 16);
    let prompt = tok.encode("The capital of France is", false, false);
    let layers = model.weights.config.n_layers;
    let (big, _, _) = decode(
        &model,
        Some(&cal),
        options(Strategy::Flash, Selection::Predictor, None, layers),
        &prompt,
        12,
    );
    let (tiny, _, _) = decode(
        &model,
        Some(&cal),
        options(Strategy::Flash, Selection::Predictor, Some(16), layers),
        &prompt,
        12,
    );
    assert_eq!(
        big, tiny,
        "a 16-slot window changed the predictor path's tokens"
    );
    std::fs::remove_file(path).ok();
}

/// Runs `llmflash ARGS` and returns stdout and stderr; panics if it fails.
fn cli(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .output()
        .expect("running llmflash");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "llmflash {args:?} failed: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// Greedy tokens of `llmflash generate --json` with `extra`, its stats and its stderr.
fn cli_tokens(image: &str, prompt: &str, extra: &[&str]) -> (Vec<u32>, serde_json::Value, String) {
    let mut args = vec!["generate", "-m", image, "--token-ids", prompt, "-n", "8"];
    args.extend(["--json", "--greedy", "--ignore-eos"]);
    args.extend(extra);
    let (out, err) = cli(&args);
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    (common::u32s(&v["tokens"]), v["stats"].clone(), err)
}

#[test]
fn smollm2_reordered_and_budgeted_from_the_command_line_keeps_its_tokens() {
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let path = common::to_image(&gguf, "cli-smollm2", BundleDtype::Source);
    let model = Model::open(&path).expect("open");
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let cal = calibrate(&model, &tok.encode(&text, false, false)[..384], 0.5, 16);
    let prompt: Vec<String> = tok
        .encode("The capital of France is", false, false)
        .iter()
        .map(|t| t.to_string())
        .collect();
    let prompt = prompt.join(",");
    drop(model);
    cal.save(&path).expect("save");
    let image = path.to_str().expect("utf-8 path");

    let (dense, _, _) = cli_tokens(image, &prompt, &["--dense"]);
    let (predicted, _, _) = cli_tokens(image, &prompt, &[]);
    let (_, err) = cli(&["reorder", image]);
    assert!(err.contains("hottest first"), "{err}");
    let (_, err) = cli(&["reorder", image]);
    assert!(err.contains("already stored hottest first"), "{err}");

    // Stored hottest first, the predictor picks the same tokens.
    assert_eq!(cli_tokens(image, &prompt, &[]).0, predicted);
    // Every neuron under half the image's size: the tails are read ahead of each layer, or
    // (ablation) when it runs; the tokens are the dense ones either way.
    for extra in [&[][..], &["--no-lookahead"][..]] {
        let mut args = vec!["--dense", "--memory-budget", "78MiB"];
        args.extend(extra);
        let (tokens, stats, _) = cli_tokens(image, &prompt, &args);
        assert_eq!(tokens, dense, "{args:?}");
        assert!(
            stats["bytes_read_per_token"].as_f64().unwrap() > 1e6,
            "{stats}"
        );
    }
    // Left to choose, the planner either keeps the predictor or says it computes every neuron,
    // and the tokens follow its choice.
    let (tokens, stats, err) = cli_tokens(image, &prompt, &["--memory-budget", "78MiB"]);
    let flash = &stats["flash"];
    let all =
        flash["neurons_needed"].as_u64().unwrap() == 30 * 1536 * flash["tokens"].as_u64().unwrap();
    if err.contains("computing every FFN neuron") {
        assert!(all, "{flash}");
        assert_eq!(tokens, dense);
    } else {
        assert!(!all, "{flash}");
        assert_eq!(tokens, predicted);
    }
    let (tokens, _, _) = cli_tokens(image, &prompt, &["--memory-budget", "78MiB", "--predictor"]);
    assert_eq!(tokens, predicted);
    std::fs::remove_file(path).ok();
}

/// `calibrate` without `--text` samples its text from the model: a fixed number of tokens,
/// the same for the same seed, different for another, every one in the vocabulary, and none
/// of them the beginning-of-sequence token each window starts from.
#[test]
fn text_sampled_from_the_model_is_reproducible_and_in_the_vocabulary() {
    use llmflash::calibration::measure::sample_text;
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let model = Model::open(&gguf).expect("opening SmolLM2");
    let a = sample_text(&model, 100, 40, 7).expect("sampling");
    let b = sample_text(&model, 100, 40, 7).expect("sampling");
    let c = sample_text(&model, 100, 40, 8).expect("sampling");
    assert_eq!(a.len(), 100);
    assert_eq!(a, b, "the same seed gives the same text");
    assert_ne!(a, c, "another seed gives another text");
    let vocab = model.weights.config.vocab_size as u32;
    assert!(a.iter().all(|&t| t < vocab));
    let text = model.tokenizer.as_ref().unwrap().decode(&a);
    assert!(text.split_whitespace().count() > 20, "{text:?}");
}
