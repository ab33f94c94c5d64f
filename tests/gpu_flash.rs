//! The flash path on the GPU (`generate --backend gpu` on a flash image): bundles streamed from
//! the image into per-layer GPU windows, the calibrated predictor run on the GPU. Its tokens
//! must not depend on the VRAM budget, and must be the CPU flash path's. Skipped with a note
//! when no GPU adapter exists, unless LLMFLASH_REQUIRE_GPU=1.

mod common;

use std::path::Path;
use std::process::Command;

use llmflash::backend::gpu::{GpuFlashDecoder, GpuFlashOptions};
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::kv_cache::KvType;
use llmflash::engine::model::Model;
use llmflash::image::BundleDtype;
use llmflash::sparsity::calibrate::{fit_level, LevelOptions};
use llmflash::sparsity::predictor::FitOptions;
use llmflash::sparsity::record::record;
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

/// The smallest budget, from the refusal's message ("needs at least 321 KiB"), plus `extra`.
fn minimum_plus(image: &Path, extra: u64) -> String {
    let err = generate(
        image,
        &["--backend", "gpu", "--predictor", "--vram-budget", "1"],
    )
    .unwrap_err();
    assert!(err.contains("--vram-budget"), "{err}");
    let at = err.find("at least ").expect("states the minimum") + "at least ".len();
    let mut words = err[at..].split_whitespace();
    let value: f64 = words.next().unwrap().parse().unwrap();
    let unit = match words.next().unwrap() {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "B" => 1,
        u => panic!("unit {u}"),
    };
    ((value * unit as f64).ceil() as u64 + 1024 + extra).to_string()
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
