//! Times the GPU kernels at SmolLM2's shapes and, given a model, the dense GPU decode step.
//!
//!     cargo run --release --example gpu_timings [-- models/SmolLM2-135M-Instruct.Q4_1.gguf]
//!
//! On lavapipe these are times of a CPU emulating a GPU (LLVM-compiled shaders on the host's
//! cores), useful for relative costs only.

use std::time::Instant;

use llmflash::backend::cpu::quant;
use llmflash::backend::gpu::buffers::{read, storage_f32, GpuMatrix};
use llmflash::backend::gpu::kernels::matvec::matvec;
use llmflash::backend::gpu::kernels::Width;
use llmflash::backend::gpu::pipeline::{submit, Dispatch};
use llmflash::backend::gpu::{GpuContext, GpuDecoder, GpuOptions};
use llmflash::model::tensor::DType;

/// A verify pass of `n` tokens (speculative decoding) against `n` decode steps of
/// `step_ms` each: medians of 5 passes at the same positions, cut back after each.
fn verify_timings(dec: &mut GpuDecoder, step_ms: f64) -> Result<(), Box<dyn std::error::Error>> {
    let at = dec.position();
    for n in [1usize, 2, 4, 7, 8, 16] {
        let tokens: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
        let mut t = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            dec.verify(&tokens)?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
            dec.truncate(at);
        }
        t.sort_by(f64::total_cmp);
        let ms = t[t.len() / 2];
        println!(
            "verify pass of {n:>2} tokens: {ms:.1} ms, {:.2}x the time of {n} steps",
            ms / (n as f64 * step_ms)
        );
    }
    Ok(())
}

/// Median milliseconds of `reps` submissions of `d`, each waited for.
fn time(ctx: &GpuContext, d: &[Dispatch], out: &wgpu::Buffer, reps: usize) -> f64 {
    let mut t = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        submit(ctx, d);
        let _: Vec<f32> = read(ctx, out, 1).expect("readback");
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new(&GpuOptions::default())?;
    println!("{}", ctx.describe());
    let empty = storage_f32(&ctx, "e", &[0.0])?;
    println!(
        "round trip (no dispatch): {:.3} ms",
        time(&ctx, &[], &empty, 20)
    );
    for (dtype, rows, cols) in [
        (DType::Q4_1, 1536, 576),
        (DType::Q4_1, 576, 1536),
        (DType::Q8_0, 49152, 576),
        (DType::F16, 4096, 4096),
        (DType::Q8_0, 4096, 4096),
        (DType::Q4_1, 4096, 4096),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
            .collect();
        let mut bytes = Vec::new();
        quant::quantize(dtype, &w, &mut bytes)?;
        let m = GpuMatrix::from_bytes(&ctx, "w", dtype, rows, cols, &bytes)?;
        let x = storage_f32(&ctx, "x", &vec![0.5; cols])?;
        let y = storage_f32(&ctx, "y", &vec![0.0; rows])?;
        let d = matvec(&ctx, &m, &x, None, &y, Width::One, 1)?;
        println!(
            "matvec {dtype} {rows} x {cols} ({:.1} MB): {:.2} ms",
            bytes.len() as f64 / 1e6,
            time(&ctx, &d, &y, 10)
        );
    }
    if let Some(path) = std::env::args().nth(1) {
        let model = llmflash::model::load(std::path::Path::new(&path))?;
        let kv = llmflash::engine::kv_cache::KvType::F32;
        let mut dec = GpuDecoder::with_verify(&ctx, &model.weights, 512, kv, 16)?;
        dec.step(1)?;
        let n = 16;
        let t0 = Instant::now();
        for i in 0..n {
            dec.step(2 + i)?;
        }
        let with_logits = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        let t0 = Instant::now();
        let mut t = 2;
        for _ in 0..n {
            t = dec.step_greedy(t)?;
        }
        let greedy = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "decode step at positions 1..{}: {with_logits:.1} ms with logits, {greedy:.1} ms greedy (argmax on the GPU)",
            2 * n + 1
        );
        verify_timings(&mut dec, with_logits)?;
    }
    Ok(())
}
