//! Rotary position embedding in place (shaders/rope.wgsl), from a (cos, sin) table.

use super::layout::{struct_layout, StructLayout};
use super::{kernel, need, Columns, Dispatch};
use crate::backend::cpu::ops::rope_angles;
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::model::config::RopeStyle;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_heads: u32,
    head_dim: u32,
    _pad: [u32; 2],
}

/// [`Params`] as laid out, checked against `shaders/rope.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        n_heads,
        head_dim,
        _pad
    })
}

/// `(cos, sin)` for every position below `max_ctx` and every pair of a `head_dim` head, from
/// the CPU reference's [`rope_angles`], so both backends rotate by the same values.
pub fn rope_table(head_dim: usize, theta: f32, max_ctx: usize) -> Vec<[f32; 2]> {
    let mut t = Vec::with_capacity(max_ctx * head_dim / 2);
    let mut angles = Vec::new();
    for pos in 0..max_ctx {
        rope_angles(pos, head_dim, theta, &mut angles);
        t.extend_from_slice(&angles);
    }
    t
}

/// Rotates `n_heads` heads of `head_dim` in `v` by position `Step::pos`; `table` is
/// [`rope_table`] for `head_dim / 2` frequencies.
pub fn rope(
    ctx: &GpuContext,
    style: RopeStyle,
    n_heads: usize,
    head_dim: usize,
    table: &wgpu::Buffer,
    v: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(v, n_heads * head_dim, "rope vector")?;
    need(table, head_dim, "rope table")?;
    let k = kernel(
        ctx,
        "rope",
        &[
            Binding::Uniform,
            Binding::Read,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
        &[(
            "STYLE",
            match style {
                RopeStyle::Adjacent => 0.0,
                RopeStyle::Halves => 1.0,
            },
        )],
    )?;
    let p = uniform(
        ctx,
        "rope",
        &Params {
            n_heads: n_heads as u32,
            head_dim: head_dim as u32,
            _pad: [0; 2],
        },
    );
    let pairs = n_heads * head_dim / 2;
    k.dispatch(
        ctx,
        &[&p, table, v, step],
        [pairs.div_ceil(64).max(1) as u32, 1, 1],
    )
    .map(|d| d.with_columns(Columns::Each))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::rope as cpu_rope;
    use crate::backend::gpu::buffers::{read, storage_bytes, storage_f32, write};
    use crate::backend::gpu::kernels::Step;
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, max_rel_err, Rng};

    #[test]
    fn both_styles_match_cpu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(5);
        let (heads, hd, max_ctx) = (9, 64, 300);
        let table = rope_table(hd, 100_000.0, max_ctx);
        let bt = storage_bytes(ctx, "table", bytemuck::cast_slice(&table)).unwrap();
        let step = uniform(ctx, "step", &Step::default());
        for style in [RopeStyle::Adjacent, RopeStyle::Halves] {
            for pos in [0usize, 1, 37, 299] {
                let x = rng.vec(heads * hd, 2.0);
                let bv = storage_f32(ctx, "v", &x).unwrap();
                write(
                    ctx,
                    &step,
                    &[Step {
                        pos: pos as u32,
                        ..Step::default()
                    }],
                );
                submit(
                    ctx,
                    &[rope(ctx, style, heads, hd, &bt, &bv, &step).unwrap()],
                );
                let got: Vec<f32> = read(ctx, &bv, x.len()).unwrap();
                let mut want = x.clone();
                cpu_rope(
                    &mut want,
                    hd,
                    &table[pos * hd / 2..(pos + 1) * hd / 2],
                    style,
                );
                // Same cos and sin; a GPU may fuse `x0 * c - x1 * s` into one FMA.
                let err = max_rel_err(&got, &want, 1e-3);
                assert!(err < 1e-6, "{style:?} pos {pos}: relative error {err:e}");
            }
        }
    }
}
