//! `cargo bench --bench decode [-- MODEL.gguf]`: CPU decode speed with every weight resident,
//! plus the two kernels that dominate it, as medians over several runs.
//!
//! - decode: tokens/s of greedy decoding (64 tokens after a short prompt) on the default model,
//!   SmolLM2-135M-Instruct Q4_1 (`tools/fetch-model`), or the GGUF/HF model given;
//! - matvec: one FFN-sized quantised matrix-vector product (the model's `ffn_up` of layer 0);
//! - attention: one layer's f16 flash attention over 512 cached positions.
//!
//! Compare with llama.cpp in the same sitting: `llama-bench -m MODEL -p 0 -n 64 -t 2` (see
//! docs/benchmarks.md). The flash-offloading table (strategies, budgets, bytes read, peak
//! memory) is `llmflash bench`, which runs each configuration in its own process so that peak
//! RSS belongs to one configuration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use half::f16;
use llmflash::backend::cpu::attention::{attend, AttnShape};
use llmflash::backend::cpu::matvec::matvec;
use llmflash::backend::kv_cache::KvLayer;
use llmflash::draft::{generate, DraftOptions};
use llmflash::engine::sampler::{Sampler, Sampling};
use llmflash::engine::Session;
use llmflash::model::load;
use llmflash::quant::ActivationBuffer;

const RUNS: usize = 5;

fn main() -> anyhow::Result<()> {
    // Run on a pool thread, as the CLI does: a caller outside the pool would hand every
    // parallel matvec to the workers and wait, hundreds of times per token.
    rayon::ThreadPoolBuilder::new().build()?.install(run)
}

fn run() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the first other argument, if any, is the model.
    let arg = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let path = arg.map(PathBuf::from).unwrap_or_else(default_model);
    if !path.exists() {
        eprintln!(
            "{} is missing: run tools/fetch-model (or pass a model path)",
            path.display()
        );
        return Ok(());
    }
    let model = load(&path)?;
    let w = &model.weights;
    println!(
        "{} on {} threads, median of {RUNS} runs",
        path.display(),
        rayon::current_num_threads()
    );

    let prompt: Vec<u32> = (1..9).collect();
    let tps = median(|| {
        let mut session = Session::new(w, 256);
        let mut sampler = Sampler::new(Sampling::Greedy);
        let g = generate(
            &mut session,
            None,
            &DraftOptions::default(),
            &prompt,
            64,
            &mut sampler,
            |_| false,
            |_| {},
        )
        .expect("decoding");
        Duration::from_secs_f64(g.stats.decode_ms / 1e3 / g.tokens.len() as f64)
    });
    println!(
        "decode (resident)      {:8.1} tokens/s",
        1.0 / tps.as_secs_f64()
    );

    if let Some(ffn) = w.layers[0].ffn.as_ref() {
        let up = &ffn.up;
        let x: Vec<f32> = (0..up.cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut act = ActivationBuffer::default();
        act.quantize_for(up.dtype, &x)?;
        let mut out = vec![0.0; up.rows];
        let t = median(|| {
            let t0 = Instant::now();
            for _ in 0..100 {
                matvec(up, &act, &mut out);
            }
            t0.elapsed() / 100
        });
        println!(
            "matvec {} {}x{}  {:8.1} us ({:.1} GB/s)",
            up.dtype,
            up.rows,
            up.cols,
            t.as_secs_f64() * 1e6,
            up.bytes().len() as f64 / t.as_secs_f64() / 1e9
        );
    }

    let c = &w.config;
    let shape = AttnShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    let n_pos = 512;
    let kv: Vec<f16> = (0..n_pos * c.kv_dim())
        .map(|i| f16::from_f32((i as f32 * 0.011).cos()))
        .collect();
    let q: Vec<f32> = (0..c.n_heads * c.head_dim)
        .map(|i| (i as f32 * 0.05).sin())
        .collect();
    let mut out = vec![0.0; q.len()];
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let t = median(|| {
        let t0 = Instant::now();
        for _ in 0..100 {
            let cache = KvLayer::F16 {
                keys: &kv,
                values: &kv,
            };
            attend(&q, cache, n_pos, shape, scale, &mut out);
        }
        t0.elapsed() / 100
    });
    println!(
        "attention f16, {n_pos} pos {:8.1} us per layer",
        t.as_secs_f64() * 1e6
    );
    Ok(())
}

/// The median of `RUNS` timings of `f`, after one warm-up run.
fn median(mut f: impl FnMut() -> Duration) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..RUNS).map(|_| f()).collect();
    t.sort();
    t[RUNS / 2]
}

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}
