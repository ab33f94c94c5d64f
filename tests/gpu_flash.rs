//! The flash path on the GPU (`generate --backend gpu` on a flash image): bundles streamed from
//! the image into per-layer GPU windows, the calibrated predictor run on the GPU. Its tokens
//! must not depend on the VRAM budget, and must be the CPU flash path's. Skipped with a note
//! when no GPU adapter exists, unless LLMFLASH_REQUIRE_GPU=1.

mod common;

use std::path::Path;
use std::process::Command;

use llmflash::backend::gpu::{GpuFlashDecoder, GpuFlashOptions};
use llmflash::backend::kv_cache::KvType;
use llmflash::calibration::fit::{fit_level, LevelOptions};
use llmflash::calibration::record::record;
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::image::BundleDtype;
use llmflash::sparsity::predictor::FitOptions;
use llmflash::sparsity::{Calibration, Sets};

use common::tokens;

/// A calibrated copy of the tiny llama fixture (the default predictors for SwiGLU: the mlp
/// form; 50% sparsity).
fn calibrated_image(name: &str) -> std::path::PathBuf {
    let path = common::to_image(&common::fixture("hf/llama"), name, BundleDtype::Source);
    let model = Model::open(&path).expect("open");
    let ids = tokens(400, model.weights.config.vocab_size);
    let records = record(&model, &ids, 64, None, ids.len(), |_, _| {}).expect("record");
    let opts = LevelOptions {
        fit: FitOptions {
            rank: 8,
            epochs: 4,
            ..FitOptions::default()
        },
        recall: 0.9,
        ..LevelOptions::default()
    };
    let image = model.image.as_ref().expect("an image");
    let cal = fit_level(image, &records, 0.5, &opts, vec!["test".into()]).expect("fit");
    cal.save(&path).expect("save");
    path
}

fn generate(model: &Path, args: &[&str]) -> Result<(Vec<u32>, serde_json::Value), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .arg("generate")
        .arg("-m")
        .arg(model)
        .args([
            "--json",
            "--greedy",
            "--ignore-eos",
            "--token-ids",
            "5,17,99,3,42",
        ])
        .args(["-n", "16"])
        .args(args)
        .output()
        .expect("running llmflash");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    Ok((common::u32s(&v["tokens"]), v["stats"].clone()))
}

/// The smallest budget with the predictor for `generate`'s runs, plus `extra`.
fn minimum_plus(image: &Path, extra: u64) -> String {
    let run = ["--token-ids", "5,17,99,3,42", "-n", "16", "--predictor"];
    (common::vram_minimum(image, &run) + 1024 + extra).to_string()
}

#[test]
fn gpu_flash_tokens_do_not_depend_on_the_vram_budget_and_match_the_cpu() {
    if common::gpu().is_none() {
        return;
    }
    let image = calibrated_image("gpu-flash");
    // The GPU keeps its KV cache in f32; so does the CPU here.
    let (cpu, cpu_stats) = generate(&image, &["--backend", "cpu", "--kv-type", "f32"]).unwrap();
    assert_eq!(cpu_stats["strategy"], "flash");
    let tiny = minimum_plus(&image, 0);
    let gpu = ["--backend", "gpu", "--predictor", "--vram-budget"];
    let (small, small_stats) = generate(&image, &[&gpu[..], &[&tiny]].concat()).unwrap();
    let (large, large_stats) = generate(&image, &[&gpu[..], &["1GiB"]].concat()).unwrap();
    let (unplanned, _) = generate(&image, &["--backend", "gpu"]).unwrap();
    // With an f16 KV cache the plan counts half the cache, so the f32 minimum leaves room,
    // and again the window does not change the tokens. (They may differ from the f32 cache's:
    // a rounded key can move a predictor's score across its threshold.)
    let f16 = [
        "--backend",
        "gpu",
        "--predictor",
        "--kv-type",
        "f16",
        "--vram-budget",
    ];
    let (small16, _) = generate(&image, &[&f16[..], &[&tiny]].concat()).unwrap();
    let (large16, _) = generate(&image, &[&f16[..], &["1GiB"]].concat()).unwrap();
    assert_eq!(small, large, "tiny ({tiny} B) vs large VRAM budget");
    assert_eq!(large, unplanned);
    assert_eq!(small16, large16, "f16 KV cache: tiny vs large VRAM budget");
    assert_eq!(large, cpu, "GPU flash vs CPU flash");
    // The tiny window reloads what the large one keeps; both read only predicted neurons.
    let f = |s: &serde_json::Value, k: &str| s["flash"][k].as_u64().unwrap();
    assert!(f(&small_stats, "neurons_loaded") > f(&large_stats, "neurons_loaded"));
    // 2 layers of 128 neurons: the predictor drops some (the tiny random model's rank-8
    // predictor keeps about 90% for a recall of 0.9), and the GPU's predictor picks the same
    // sets as the CPU's.
    let needed = f(&large_stats, "neurons_needed");
    let all = f(&large_stats, "tokens") * 2 * 128;
    assert!(needed < all, "{needed} of {all}");
    assert_eq!(needed, f(&small_stats, "neurons_needed"));
    assert_eq!(
        needed,
        f(&cpu_stats, "neurons_needed"),
        "GPU vs CPU predicted neurons"
    );
    eprintln!("tiny budget {tiny} B: {small_stats}\nlarge budget: {large_stats}");
    let g = |s: &serde_json::Value, k: &str| s["gpu"][k].as_f64().unwrap();
    assert!(
        g(&small_stats, "bytes_uploaded_per_token") > g(&large_stats, "bytes_uploaded_per_token")
    );
    assert!(g(&small_stats, "gpu_wait_ms") > 0.0);
    assert_eq!(small_stats["strategy"], "gpu-flash");

    // Left to choose at the tiny budget, the planner keeps the predictor or computes every
    // neuron, and the tokens follow its choice.
    let (chosen, stats) = generate(&image, &["--backend", "gpu", "--vram-budget", &tiny]).unwrap();
    match stats["flash"]["selection"].as_str() {
        Some("predictor") => assert_eq!(chosen, large),
        Some("dense") => {
            let (dense, _) = generate(&image, &["--backend", "gpu", "--dense"]).unwrap();
            assert_eq!(chosen, dense);
        }
        other => panic!("selection {other:?}"),
    }
    std::fs::remove_file(image).ok();
}

/// Library level: the GPU flash decoder's logits against the CPU flash path's at every step,
/// with the same calibration (predictor on the GPU vs on the CPU).
#[test]
fn gpu_flash_logits_match_the_cpu_flash_path() {
    let Some(ctx) = common::gpu() else { return };
    let image = calibrated_image("gpu-flash-logits");
    let model = Model::open(&image).expect("open");
    let cal = Calibration::load(model.image.as_ref().unwrap())
        .unwrap()
        .expect("calibrated");
    let prompt = tokens(6, model.weights.config.vocab_size);
    let opts = FlashOptions {
        strategy: Strategy::Flash,
        selection: Selection::Predictor,
        io_threads: 2,
        ..FlashOptions::default()
    };
    let mut cpu = model
        .session(64, Some(opts), Some(&cal))
        .expect("session")
        .with_kv_type(KvType::F32);
    let layers = model.weights.config.n_layers;
    let pins = cal.hot_neurons(Sets::Predicted, &vec![3; layers]);
    assert!(pins.iter().any(|p| !p.is_empty()), "nothing to pin");
    for (slots, pinned) in [
        (None, None),
        (Some(vec![3; layers]), None),
        (Some(vec![3; layers]), Some(pins)),
    ] {
        let mut gpu = GpuFlashDecoder::new(
            ctx,
            model.image.as_ref().unwrap(),
            &model.weights,
            Some(&cal.predictors),
            64,
            GpuFlashOptions {
                window_slots: slots.clone(),
                overflow_slots: 5,
                io_threads: 2,
                pinned,
                ..GpuFlashOptions::default()
            },
        )
        .expect("GPU flash decoder");
        cpu.reset();
        let mut want = cpu.prefill(&prompt).unwrap().to_vec();
        let mut got = gpu.prefill(&prompt).unwrap().to_vec();
        for step in 0..10 {
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff / scale < 1e-4,
                "{slots:?} step {step}: relative difference {}",
                diff / scale
            );
            let next = llmflash::engine::sampler::argmax(&want);
            want = cpu.step(next, true).unwrap().to_vec();
            got = gpu.step(next).unwrap().to_vec();
        }
        assert!(gpu.uploaded() > 0);
    }
    std::fs::remove_file(image).ok();
}

/// Passes of a verify check: each keeps all but its last two positions (as after a rejection)
/// and runs them again in the next.
fn kept(passes: &[usize]) -> usize {
    passes.iter().map(|&n| n.saturating_sub(2).max(1)).sum()
}

/// The flash decoder's verify passes (speculative decoding) against its single steps with the
/// same options: every row of `verify` equals the step's logits at that position (to the bit
/// when `exact`: every column sums its own neurons in the single step's order; otherwise within
/// float rounding, because a window planned for the union of a pass's active sets may hold a
/// neuron that the step ran through the overflow reserve), after truncating back over rejected
/// positions; the greedy verify picks the steps' argmaxes and a batched prefill gives the last
/// step's logits.
fn check_flash_verify(
    model: &Model,
    predictors: Option<&[llmflash::sparsity::predictor::Predictor]>,
    opts: GpuFlashOptions,
    passes: &[usize],
    exact: bool,
    what: &str,
) {
    let Some(ctx) = common::gpu() else { return };
    let image = model.image.as_ref().expect("an image");
    let vocab = model.weights.config.vocab_size;
    let seq = tokens(kept(passes) + 4, vocab);
    let width = passes.iter().copied().max().unwrap_or(1).max(4);
    let open = |verify_width| {
        let opts = GpuFlashOptions {
            verify_width,
            ..opts.clone()
        };
        GpuFlashDecoder::new(ctx, image, &model.weights, predictors, 64, opts).expect("decoder")
    };
    let mut plain = open(1);
    let mut want: Vec<Vec<f32>> = Vec::new();
    let mut stepped_bytes = 0;
    for &t in &seq {
        want.push(plain.step(t).expect("step").to_vec());
        if want.len() == width + 1 {
            stepped_bytes = plain.flash_stats().bytes_read;
        }
    }
    let same = |got: &[f32], want: &[f32]| {
        if exact {
            return got == want;
        }
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = (got.iter().zip(want)).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale < 1e-5
    };
    let mut wide = open(width);
    assert_eq!(wide.verify_width(), width);
    let mut at = 0;
    for &n in passes {
        let rows = wide.verify(&seq[at..at + n]).expect("verify").to_vec();
        assert_eq!(rows.len(), n * vocab, "{what}: rows of a pass of {n}");
        for (i, row) in rows.chunks(vocab).enumerate() {
            assert!(
                same(row, &want[at + i]),
                "{what}: verify row {i} of {n} (position {}) differs from the step's logits",
                at + i
            );
        }
        let keep = n.saturating_sub(2).max(1);
        wide.truncate(at + keep);
        assert_eq!(wide.position(), at + keep);
        at += keep;
    }
    let greedy = wide
        .verify_greedy(&seq[at..at + 4])
        .expect("greedy")
        .to_vec();
    let argmaxes: Vec<u32> = (0..4)
        .map(|i| llmflash::engine::sampler::argmax(&want[at + i]))
        .collect();
    assert_eq!(
        greedy, argmaxes,
        "{what}: greedy verify vs the steps' argmaxes"
    );
    let mut fresh = open(width);
    let last = fresh.prefill(&seq[..width + 1]).expect("prefill").to_vec();
    assert!(
        same(&last, &want[width]),
        "{what}: a batched prefill's last logits"
    );
    // A pass reads each bundle of its union once: no more bytes than the same tokens' steps.
    let batched = fresh.flash_stats().bytes_read;
    assert!(
        batched <= stepped_bytes,
        "{what}: {batched} vs {stepped_bytes} bytes read"
    );
}

#[test]
fn gpu_flash_verify_passes_equal_steps_on_the_tiny_llama() {
    if common::gpu().is_none() {
        return;
    }
    let image = calibrated_image("gpu-flash-verify");
    let model = Model::open(&image).expect("open");
    let cal = Calibration::load(model.image.as_ref().unwrap())
        .unwrap()
        .expect("calibrated");
    let layers = model.weights.config.n_layers;
    let base = GpuFlashOptions {
        overflow_slots: 5,
        io_threads: 2,
        ..GpuFlashOptions::default()
    };
    // Passes of 1 to 11 positions: one and two sparse-FFN column blocks.
    let passes = [3, 1, 11, 2, 9];
    let p = Some(cal.predictors.as_slice());
    check_flash_verify(
        &model,
        p,
        base.clone(),
        &passes,
        true,
        "predictor, every slot",
    );
    let tight = GpuFlashOptions {
        window_slots: Some(vec![3; layers]),
        pinned: Some(cal.hot_neurons(Sets::Predicted, &vec![3; layers])),
        ..base.clone()
    };
    check_flash_verify(&model, p, tight, &passes, false, "predictor, 3 slots");
    let dense = GpuFlashOptions {
        window_slots: Some(vec![16; layers]),
        pinned: Some(common::prefix_pins(&model, 16)),
        ..base
    };
    check_flash_verify(&model, None, dense, &passes, true, "dense, 16 pinned slots");
    std::fs::remove_file(image).ok();
}

/// SmolLM2 as a flash image, every neuron computed, under a tight VRAM budget (a pinned prefix
/// of 256 of 1536 neurons per layer, the rest streamed through the overflow reserve every
/// pass): verify passes equal steps to the bit. Few positions: lavapipe runs it at a few
/// tokens per second.
#[test]
fn gpu_flash_verify_passes_equal_steps_on_smollm2() {
    if common::gpu().is_none() {
        return;
    }
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let image = common::to_image(&gguf, "gpu-flash-verify-smollm2", BundleDtype::Source);
    let model = Model::open(&image).expect("open");
    let layers = model.weights.config.n_layers;
    let opts = GpuFlashOptions {
        window_slots: Some(vec![256; layers]),
        pinned: Some(common::prefix_pins(&model, 256)),
        io_threads: 2,
        ..GpuFlashOptions::default()
    };
    check_flash_verify(
        &model,
        None,
        opts,
        &[3, 9],
        true,
        "SmolLM2 dense, 256 slots",
    );
    std::fs::remove_file(image).ok();
}
