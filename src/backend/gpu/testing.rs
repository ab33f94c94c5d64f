//! Helpers for the GPU tests: one shared context per test binary, skipped with a message when no
//! adapter exists (unless LLMFLASH_REQUIRE_GPU=1), and a small deterministic random source.

use std::sync::OnceLock;

use crate::backend::gpu::shaders::Half;
use crate::backend::gpu::{GpuContext, GpuError, GpuOptions};
use crate::quant;
use crate::quant::DType;

/// The shared context, or `None` (after printing why) when this machine has no adapter.
/// Under `LLMFLASH_REQUIRE_GPU=1` a missing adapter fails the test instead.
pub fn ctx() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    let r = CTX.get_or_init(|| GpuContext::new(&GpuOptions::default()).map_err(describe));
    match r {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("LLMFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LLMFLASH_REQUIRE_GPU=1 but {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The shared context in each f16 form the device supports: packed always, native where the
/// device has SHADER_F16 (lavapipe does). Kernels that read f16 are tested in every form.
pub fn forms() -> Vec<GpuContext> {
    let Some(c) = ctx() else { return Vec::new() };
    let mut out = Vec::new();
    for half in [Half::Packed, Half::Native] {
        let mut f = c.clone();
        match f.set_half(half) {
            Ok(()) => out.push(f),
            Err(e) => eprintln!("skipping the {} f16 form: {e}", half.name()),
        }
    }
    out
}

fn describe(e: GpuError) -> String {
    e.to_string()
}

pub use crate::rng::Rng;

/// Largest |a - b| relative to the largest |b| (at least `floor`).
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `n` values of `dtype`: a random matrix quantised, or for the K-quants (whose scale
/// searching quantisers only ggml has) random blocks: every bit pattern of the quants and
/// packed scales is valid, and the f16 super-scales are set to small finite values.
pub fn random_rows(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    let blocks = n / dtype.block_len();
    let scales: &[usize] = match dtype {
        DType::Q4K => &[0, 2],
        DType::Q6K => &[208],
        _ => {
            let wf = rng.vec(n, 1.0);
            let mut bytes = Vec::new();
            quant::quantize(dtype, &wf, &mut bytes).unwrap();
            return bytes;
        }
    };
    let size = dtype.block_bytes();
    let mut bytes: Vec<u8> = (0..blocks * size).map(|_| rng.below(256) as u8).collect();
    for block in bytes.chunks_exact_mut(size) {
        for &at in scales {
            let d = half::f16::from_f32(0.002 + 0.02 * rng.symmetric().abs());
            block[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    bytes
}
