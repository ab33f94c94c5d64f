//! Appends a position's key and value to a layer's GPU-resident KV cache (shaders/kv_store.wgsl).

use super::layout::{struct_layout, StructLayout};
use super::{groups_for, kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::backend::kv_cache::KvType;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    kv_dim: u32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/kv_store.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params { kv_dim, _pad })
}

/// `kc[pos] = k`, `vc[pos] = v` at `Step::pos`; the caches hold `capacity` rows of `kv_dim`
/// values of type `kv` (f16: two to a u32, rounded by `pack2x16float`).
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    ctx: &GpuContext,
    kv: KvType,
    kv_dim: usize,
    capacity: usize,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(k, kv_dim, "key")?;
    need(v, kv_dim, "value")?;
    if kv == KvType::F16 && !kv_dim.is_multiple_of(2) {
        return Err(GpuError::Shape(format!(
            "an f16 KV cache packs values in pairs, but a position holds {kv_dim}; use an f32 KV cache"
        )));
    }
    let words = cache_words(kv, kv_dim * capacity);
    need(kc, words, "key cache")?;
    need(vc, words, "value cache")?;
    let kern = kernel(
        ctx,
        "kv_store",
        &[
            Binding::Uniform,
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
        "kv_store",
        &Params {
            kv_dim: kv_dim as u32,
            _pad: [0; 3],
        },
    );
    kern.dispatch(ctx, &[&p, k, v, kc, vc, step], groups_for(kv_dim, 64))
        .map(|d| d.with_columns(Columns::Each))
}

/// 32-bit words a cache of `values` values of type `kv` takes.
pub fn cache_words(kv: KvType, values: usize) -> usize {
    (values * kv.bytes_per_value()).div_ceil(4)
}
