//! Residual add `y += x` (shaders/add.wgsl).

use super::layout::{struct_layout, StructLayout};
use super::{groups_for, kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/add.wgsl`'s `Params` by `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params { n, _pad })
}

/// `y[..n] += x[..n]`.
pub fn add(
    ctx: &GpuContext,
    n: usize,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(x, n, "add x")?;
    need(y, n, "add y")?;
    let k = kernel(
        ctx,
        "add",
        &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
        &[],
    )?;
    let p = uniform(
        ctx,
        "add",
        &Params {
            n: n as u32,
            _pad: [0; 3],
        },
    );
    k.dispatch(ctx, &[&p, x, y], groups_for(n, 64))
        .map(|d| d.with_columns(Columns::Each))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::add_into;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, Rng};

    #[test]
    fn matches_cpu_add() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(1);
        let n = 1000;
        let (x, mut y) = (rng.vec(n, 2.0), rng.vec(n, 2.0));
        let (bx, by) = (
            storage_f32(ctx, "x", &x).unwrap(),
            storage_f32(ctx, "y", &y).unwrap(),
        );
        submit(ctx, &[add(ctx, n, &bx, &by).unwrap()]);
        let got: Vec<f32> = read(ctx, &by, n).unwrap();
        add_into(&mut y, &x);
        // One f32 add per element on both sides: identical.
        assert_eq!(got, y);
    }
}
