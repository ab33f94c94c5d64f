//! Times the GPU kernels at SmolLM2's shapes and, given a model, the dense GPU decode step and
//! its verify passes; given a flash image, the GPU flash decoder's steps and verify passes, with
//! every neuron in the window and with a window of SLOTS pinned neurons per layer (default 256;
//! the rest streamed from the image every pass).
//!
//!     cargo run --release --example gpu_timings [-- models/SmolLM2-135M-Instruct.Q4_1.gguf]
//!     cargo run --release --example gpu_timings -- smol.flash [SLOTS]
//!
//! On lavapipe these are times of a CPU emulating a GPU (LLVM-compiled shaders on the host's
//! cores), useful for relative costs only.

use std::time::Instant;

use llmflash::backend::gpu::buffers::{read, storage_f32, GpuMatrix};
use llmflash::backend::gpu::kernels::matvec::matvec;
use llmflash::backend::gpu::kernels::Width;
use llmflash::backend::gpu::pipeline::{submit, Dispatch};
use llmflash::backend::gpu::{
    GpuContext, GpuDecoder, GpuFlashDecoder, GpuFlashOptions, GpuOptions,
};
use llmflash::draft::Target;
use llmflash::engine::model::Model;
use llmflash::quant;
use llmflash::quant::DType;

/// The median of `t`.
fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// A verify pass of `n` tokens (speculative decoding) against `n` decode steps at the same
/// positions, for each `n` of `sizes`: medians of 5 of each, cut back after each.
fn verify_timings<T: Target>(
    dec: &mut T,
    sizes: &[usize],
) -> Result<(), Box<dyn std::error::Error>> {
    let at = dec.position();
    let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
    for &n in sizes {
        let tokens: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
        let (mut steps, mut passes) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t0 = Instant::now();
            for &t in &tokens {
                dec.step(t)?;
            }
            steps.push(ms(t0));
            dec.truncate(at);
            let t0 = Instant::now();
            dec.verify(&tokens)?;
            passes.push(ms(t0));
            dec.truncate(at);
        }
        let (steps, pass) = (median(steps), median(passes));
        println!(
            "verify pass of {n:>2} tokens: {pass:.1} ms, {n} steps {steps:.1} ms: {:.2}x",
            pass / steps
        );
    }
    Ok(())
}

/// The GPU flash decoder on `model`'s image: steps and verify passes with every neuron held,
/// then with `slots` pinned neurons per layer (the first on disk) and the rest streamed.
fn flash_timings(
    ctx: &GpuContext,
    model: &Model,
    slots: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let Some(image) = model.image.as_ref() else {
        return Err("not a flash image".into());
    };
    let c = &model.weights.config;
    let prefix: Vec<Vec<u32>> = (0..c.n_layers)
        .map(|l| match &image.ffn_section(l).permutation {
            Some(p) => p.iter().take(slots).copied().collect(),
            None => (0..slots.min(c.intermediate_size) as u32).collect(),
        })
        .collect();
    for (what, window_slots, pinned) in [
        ("every neuron held", None, None),
        ("pinned prefix", Some(vec![slots; c.n_layers]), Some(prefix)),
    ] {
        let opts = GpuFlashOptions {
            window_slots,
            pinned,
            verify_width: 8,
            ..GpuFlashOptions::default()
        };
        let mut dec = GpuFlashDecoder::new(ctx, image, &model.weights, None, 512, opts)?;
        dec.prefill(&[1, 2, 3, 4])?;
        let before = dec.flash_stats().bytes_read;
        dec.step(5)?;
        let per_step = dec.flash_stats().bytes_read - before;
        println!(
            "flash, {what}: {:.1} MB read per step",
            per_step as f64 / 1e6
        );
        verify_timings(&mut dec, &[1, 2, 4, 8])?;
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
        let model = Model::open(std::path::Path::new(&path))?;
        if model.image.is_some() {
            let slots = match std::env::args().nth(2) {
                Some(s) => s.parse()?,
                None => 256,
            };
            return flash_timings(&ctx, &model, slots);
        }
        let kv = llmflash::backend::kv_cache::KvType::F32;
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
        verify_timings(&mut dec, &[1, 2, 4, 7, 8, 16])?;
    }
    Ok(())
}
