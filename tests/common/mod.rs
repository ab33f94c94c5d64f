//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use llmflash::calibration::fit::{fit_level, LevelOptions};
use llmflash::calibration::record::record;
use llmflash::engine::model::Model;
use llmflash::image::{convert, BundleDtype, ConvertOptions};
use llmflash::sparsity::predictor::FitOptions;
use llmflash::sparsity::Calibration;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// Whether CI asked for model-dependent tests to fail instead of skipping.
fn models_required() -> bool {
    std::env::var("LLMFLASH_REQUIRE_MODELS").is_ok_and(|v| v == "1")
}

/// The path of a model under `models/`, or `None` (with a note) when it has not been fetched.
/// Under `LLMFLASH_REQUIRE_MODELS=1` (set by `tools/test`, so in CI) a missing model fails.
pub fn model(file: &str, fetch_hint: &str) -> Option<PathBuf> {
    let p = root().join("models").join(file);
    if p.exists() {
        return Some(p);
    }
    if models_required() && !fetch_hint.contains("opt-in") {
        panic!("{} is missing: run {fetch_hint}", p.display());
    }
    skipped(&format!("{} is missing (run {fetch_hint})", p.display()));
    None
}

/// Notes a test skipped and why: on stderr, and in `target/test-skips.log`, which `tools/test`
/// counts and prints at the end (a skip is never silent).
pub fn skipped(why: &str) {
    use std::io::Write;
    eprintln!("skipping: {why}");
    let log = root().join("target/test-skips.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // One write of the whole line: tests skip from several threads at once, and
        // `writeln!` may split a line into writes that interleave with another test's.
        let _ = f.write_all(format!("{why}\n").as_bytes());
    }
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("token id") as u32)
        .collect()
}

/// A scratch path under target/ (O_DIRECT needs a real filesystem; /tmp may be tmpfs).
pub fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-images");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.flash", std::process::id()))
}

pub fn to_image(source: &Path, name: &str, dtype: BundleDtype) -> PathBuf {
    let out = scratch(name);
    let model = llmflash::model::load(source).expect("load source");
    let opts = ConvertOptions {
        bundle_dtype: dtype,
        progress: false,
    };
    convert(&model, &out, &opts).expect("convert");
    out
}

/// A GPU context shared by a test binary's tests, or `None` (with a note) when this machine has
/// no adapter. Under `LLMFLASH_REQUIRE_GPU=1` a missing adapter fails instead.
pub fn gpu() -> Option<&'static llmflash::backend::gpu::GpuContext> {
    use llmflash::backend::gpu::{GpuContext, GpuOptions};
    static CTX: std::sync::OnceLock<Result<GpuContext, String>> = std::sync::OnceLock::new();
    match CTX.get_or_init(|| GpuContext::new(&GpuOptions::default()).map_err(|e| e.to_string())) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("LLMFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LLMFLASH_REQUIRE_GPU=1 but {e}");
            }
            skipped(&format!("no GPU adapter ({e})"));
            None
        }
    }
}

/// Pseudo-random token ids below `vocab` (a fixed sequence, so failures reproduce).
pub fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab as u32
        })
        .collect()
}

/// A quick calibration of `model`'s image on `tokens` at `sparsity` (predictors of `rank`,
/// 4 epochs, recall 0.9): enough for tests of the sparse paths, not for quality.
pub fn calibrate(model: &Model, tokens: &[u32], sparsity: f64, rank: usize) -> Calibration {
    let records = record(model, tokens, 64, None, tokens.len(), |_, _| {}).expect("record");
    assert_eq!(records.tokens(), tokens.len());
    let opts = LevelOptions {
        fit: FitOptions {
            rank,
            epochs: 4,
            ..FitOptions::default()
        },
        recall: 0.9,
        ..LevelOptions::default()
    };
    let image = model.image.as_ref().expect("an image");
    fit_level(image, &records, sparsity, &opts, vec!["test".into()]).expect("fit")
}

/// Per layer, the first `slots` neurons of each FFN section on disk (the pins of a dense run
/// under a budget).
pub fn prefix_pins(model: &Model, slots: usize) -> Vec<Vec<u32>> {
    let image = model.image.as_ref().expect("an image");
    (0..model.weights.config.n_layers)
        .map(|l| match &image.ffn_section(l).permutation {
            Some(p) => p[..slots].to_vec(),
            None => (0..slots as u32).collect(),
        })
        .collect()
}

/// The smallest `--vram-budget` that `generate --backend gpu ARGS` accepts for `image`, read from
/// the refusal of a 1-byte budget ("needs at least 49.1 MiB (...)"), rounded up. `args` must
/// hold the run's prompt and `-n`: the KV cache is planned for the positions they reach.
pub fn vram_minimum(image: &Path, args: &[&str]) -> u64 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["generate", "-m"])
        .arg(image)
        .args(["--backend", "gpu"])
        .args(args)
        .args(["--vram-budget", "1"])
        .output()
        .expect("running llmflash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--vram-budget"),
        "{err}"
    );
    let at = err.find("at least ").expect("states the minimum") + "at least ".len();
    let mut words = err[at..].split_whitespace();
    let value: f64 = words.next().unwrap().parse().unwrap();
    let unit = match words.next().unwrap() {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "B" => 1,
        u => panic!("unit {u}"),
    };
    // The message rounds to a tenth of its unit.
    (value * unit as f64).ceil() as u64 + unit / 10
}
