//! `llmflash generate --backend gpu` against `--backend cpu` through the command line. Skipped
//! with a note when no GPU adapter exists (install mesa-vulkan-drivers for lavapipe), unless
//! LLMFLASH_REQUIRE_GPU=1.

mod common;

use std::process::Command;

/// Runs `llmflash generate --json` with `args` and returns the generated tokens and the stats.
pub fn generate(model: &std::path::Path, args: &[&str]) -> (Vec<u32>, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .arg("generate")
        .arg("-m")
        .arg(model)
        .args(["--json", "--greedy", "--ignore-eos"])
        .args(args)
        .output()
        .expect("running llmflash");
    assert!(
        out.status.success(),
        "llmflash generate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    (common::u32s(&v["tokens"]), v["stats"].clone())
}

/// Float weights: the CPU runs on f32 activations too, so both backends compute the same sums in
/// another order and pick the same greedy tokens.
fn same_tokens(fixture: &str) {
    if common::gpu().is_none() {
        return;
    }
    let dir = common::fixture(fixture);
    let args = ["--token-ids", "1,2,3,4,5", "-n", "24"];
    // The GPU keeps its KV cache in f32; so does the CPU here.
    let cpu_args = ["--backend", "cpu", "--kv-type", "f32"];
    let (cpu, _) = generate(&dir, &[&args[..], &cpu_args].concat());
    let (gpu, stats) = generate(&dir, &[&args[..], &["--backend", "gpu"]].concat());
    assert_eq!(gpu, cpu, "{fixture}: GPU and CPU greedy tokens");
    assert_eq!(cpu.len(), 24);
    // An f16 cache on the GPU (two values to a word) rounds keys and values by about 1e-3, less
    // than these fixtures' margins between the top two logits, and takes half the memory.
    let (gpu16, stats16) = generate(
        &dir,
        &[&args[..], &["--backend", "gpu", "--kv-type", "f16"]].concat(),
    );
    assert_eq!(gpu16, cpu, "{fixture}: GPU with an f16 KV cache");
    let held = |s: &serde_json::Value| s["gpu"]["resident_bytes"].as_u64().unwrap();
    assert!(held(&stats16) < held(&stats), "{stats16} vs {stats}");
    let g = &stats["gpu"];
    assert!(stats["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(g["gpu_wait_ms"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(g["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    assert_eq!(stats["strategy"], "gpu");
    // Timestamp queries where the adapter has them (lavapipe does), else null.
    let t = &g["gpu_time_ms_per_token"];
    assert!(t.is_null() || t.as_f64().unwrap() > 0.0, "{stats}");
}

#[test]
fn hf_llama_gpu_matches_cpu() {
    same_tokens("hf/llama");
}

#[test]
fn hf_opt_gpu_matches_cpu() {
    same_tokens("hf/opt");
}

#[test]
fn unknown_adapter_is_refused_with_the_list() {
    if common::gpu().is_none() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["generate", "-m"])
        .arg(common::fixture("hf/llama"))
        .args(["--token-ids", "1,2", "-n", "2", "--backend", "gpu"])
        .args(["--gpu-adapter", "no-such-adapter-xyz"])
        .output()
        .expect("running llmflash");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-adapter-xyz"), "{err}");
}

/// `bench --backend cpu,gpu` on a flash image: one row per backend and budget, the GPU rows
/// with their upload and GPU-time columns.
#[test]
fn bench_measures_both_backends() {
    if common::gpu().is_none() {
        return;
    }
    let image = common::to_image(
        &common::fixture("hf/llama"),
        "bench-gpu",
        llmflash::image::BundleDtype::Source,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["bench", "-m"])
        .arg(&image)
        .args(["--backend", "cpu,gpu", "--strategies", "flash,resident"])
        .args(["--vram-budget", "1GiB", "-n", "4", "--runs", "1", "--json"])
        .args(["--extra", "--token-ids 1,2,3 --ignore-eos"])
        .output()
        .expect("running llmflash bench");
    std::fs::remove_file(&image).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    let rows = rows.as_array().expect("rows");
    let backends: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["backend"].as_str().unwrap(),
                r["strategy"].as_str().unwrap(),
            )
        })
        .collect();
    // The GPU runs the flash strategy only on images.
    assert_eq!(
        backends,
        [("cpu", "flash"), ("cpu", "resident"), ("gpu", "flash")]
    );
    let gpu = &rows[2];
    assert!(gpu["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(gpu["uploaded_bytes_per_token"].as_f64().unwrap() > 0.0);
    assert!(gpu["adapter"].is_string());
}
