//! One token's attention over the GPU-resident KV cache (shaders/attention.wgsl).

use super::kv_store::cache_words;
use super::layout::{struct_layout, StructLayout};
use super::{kernel, need, Columns, Dispatch};
use crate::backend::cpu::attention::AttnShape;
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::backend::kv_cache::KvType;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_ctx: u32,
    scale: f32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/attention.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        n_heads,
        n_kv_heads,
        head_dim,
        max_ctx,
        scale,
        _pad
    })
}

/// `out = attend(q, K[..n_pos], V[..n_pos])` with `n_pos = Step::n_pos`. The caches hold
/// `max_ctx` rows of `n_kv_heads * head_dim` values of type `kv`; `scores` is scratch of
/// `n_heads * max_ctx`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    ctx: &GpuContext,
    kv: KvType,
    shape: AttnShape,
    max_ctx: usize,
    scale: f32,
    q: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    scores: &wgpu::Buffer,
    out: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(GpuError::Shape(format!(
            "attention: {n_heads} heads do not share {n_kv_heads} KV heads evenly"
        )));
    }
    need(q, n_heads * head_dim, "query")?;
    need(out, n_heads * head_dim, "attention output")?;
    let words = cache_words(kv, max_ctx * n_kv_heads * head_dim);
    need(kc, words, "key cache")?;
    need(vc, words, "value cache")?;
    need(scores, n_heads * max_ctx, "attention scores")?;
    let k = kernel(
        ctx,
        "attention",
        &[
            Binding::Uniform,
            Binding::Read,
            Binding::Read,
            Binding::Read,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
        &[("KV_F16", (kv == KvType::F16) as u8 as f64)],
    )?;
    let p = uniform(
        ctx,
        "attention",
        &Params {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            max_ctx: max_ctx as u32,
            scale,
            _pad: [0; 3],
        },
    );
    k.dispatch(
        ctx,
        &[&p, q, kc, vc, scores, out, step],
        [n_heads as u32, 1, 1],
    )
    .map(|d| d.with_columns(Columns::Each))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::attention::attend;
    use crate::backend::gpu::buffers::{read, storage_f32, storage_zeroed, write};
    use crate::backend::gpu::kernels::{kv_store::kv_store, Step};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{forms, max_rel_err, Rng};
    use crate::backend::gpu::GpuContext;
    use crate::backend::kv_cache::KvLayer;

    /// Fills a GPU cache position by position with `kv_store`, then attends at several lengths
    /// and compares with the CPU's `attend` over the same keys and values (rounded to f16 first
    /// for an f16 cache: the GPU then computes in f32 over exactly those values).
    #[test]
    fn gqa_attention_over_the_gpu_cache_matches_cpu() {
        for form in forms() {
            for kv in [KvType::F32, KvType::F16] {
                check_attention(&form, kv);
            }
        }
    }

    fn check_attention(ctx: &GpuContext, kv: KvType) {
        let mut rng = Rng::new(6);
        let shape = AttnShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let (kv_dim, max_ctx) = (shape.n_kv_heads * shape.head_dim, 150);
        let q_dim = shape.n_heads * shape.head_dim;
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let keys = rng.vec(max_ctx * kv_dim, 2.0);
        let values = rng.vec(max_ctx * kv_dim, 1.0);
        let stored = |x: &[f32]| -> Vec<f32> {
            match kv {
                KvType::F32 => x.to_vec(),
                KvType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            }
        };
        let (keys_held, values_held) = (stored(&keys), stored(&values));
        let cache_bytes = (max_ctx * kv_dim * kv.bytes_per_value()) as u64;
        let kc = storage_zeroed(ctx, "kc", cache_bytes).unwrap();
        let vc = storage_zeroed(ctx, "vc", cache_bytes).unwrap();
        let scores = storage_zeroed(ctx, "scores", (shape.n_heads * max_ctx * 4) as u64).unwrap();
        let out = storage_zeroed(ctx, "out", (q_dim * 4) as u64).unwrap();
        let bk = storage_zeroed(ctx, "k", (kv_dim * 4) as u64).unwrap();
        let bv = storage_zeroed(ctx, "v", (kv_dim * 4) as u64).unwrap();
        let step = uniform(ctx, "step", &Step::default());
        let store = kv_store(ctx, kv, kv_dim, max_ctx, &bk, &bv, &kc, &vc, &step).unwrap();
        let q = rng.vec(q_dim, 1.0);
        let bq = storage_f32(ctx, "q", &q).unwrap();
        let att = attention(
            ctx, kv, shape, max_ctx, scale, &bq, &kc, &vc, &scores, &out, &step,
        )
        .unwrap();
        for pos in 0..max_ctx {
            write(ctx, &bk, &keys[pos * kv_dim..][..kv_dim]);
            write(ctx, &bv, &values[pos * kv_dim..][..kv_dim]);
            let s = Step {
                pos: pos as u32,
                n_pos: pos as u32 + 1,
                ..Step::default()
            };
            write(ctx, &step, &[s]);
            let check = [0, 1, 63, 64, 65, 149].contains(&pos);
            if check {
                submit(ctx, &[store.clone(), att.clone()]);
            } else {
                submit(ctx, std::slice::from_ref(&store));
                continue;
            }
            let got: Vec<f32> = read(ctx, &out, q_dim).unwrap();
            let n = pos + 1;
            let mut want = vec![0.0; q_dim];
            let cache = KvLayer::F32 {
                keys: &keys_held[..n * kv_dim],
                values: &values_held[..n * kv_dim],
            };
            attend(&q, cache, n, shape, scale, &mut want);
            // Dots of 64 terms, a softmax (exp may differ by ulps), a weighted sum of up to 150
            // values: 1e-5 of the largest output covers the different summation orders.
            let err = max_rel_err(&got, &want, 1e-3);
            assert!(
                err < 1e-5,
                "{kv:?} cache, f16 {}, n_pos {n}: relative error {err:e}",
                ctx.half.name()
            );
        }
    }
}
