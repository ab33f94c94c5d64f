//! Appends a position's key and value to a layer's GPU-resident KV cache (shaders/kv_store.wgsl).

use super::{groups_for, kernel, need, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    kv_dim: u32,
    _pad: [u32; 3],
}

/// `kc[pos] = k`, `vc[pos] = v` at `Step::pos`; the caches hold `capacity` rows of `kv_dim`.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    ctx: &GpuContext,
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
    need(kc, kv_dim * capacity, "key cache")?;
    need(vc, kv_dim * capacity, "value cache")?;
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
        &[],
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
}
