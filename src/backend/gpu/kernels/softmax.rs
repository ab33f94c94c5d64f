//! In-place softmax of rows (shaders/softmax.wgsl), e.g. for sampling at a temperature on the
//! GPU.

use super::layout::{struct_layout, StructLayout};
use super::{kernel, need, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    stride: u32,
    _pad: [u32; 2],
}

/// [`Params`] as laid out, checked against `shaders/softmax.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params { n, stride, _pad })
}

/// Softmax of `rows` rows of `n` values, row r at `r * stride`.
pub fn softmax(
    ctx: &GpuContext,
    rows: usize,
    n: usize,
    stride: usize,
    v: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    if n > stride {
        return Err(GpuError::Shape(format!(
            "softmax rows of {n} values cannot be {stride} apart"
        )));
    }
    need(v, rows.saturating_sub(1) * stride + n, "softmax input")?;
    let k = kernel(ctx, "softmax", &[Binding::Uniform, Binding::ReadWrite], &[])?;
    let p = uniform(
        ctx,
        "softmax",
        &Params {
            n: n as u32,
            stride: stride as u32,
            _pad: [0; 2],
        },
    );
    k.dispatch(ctx, &[&p, v], [rows.max(1) as u32, 1, 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::softmax as cpu_softmax;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, Rng};

    #[test]
    fn rows_match_cpu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(7);
        let (rows, n, stride) = (3, 1000, 1024);
        let v = rng.vec(rows * stride, 20.0);
        let bv = storage_f32(ctx, "v", &v).unwrap();
        submit(ctx, &[softmax(ctx, rows, n, stride, &bv).unwrap()]);
        let got: Vec<f32> = read(ctx, &bv, rows * stride).unwrap();
        for r in 0..rows {
            let mut want = v[r * stride..r * stride + n].to_vec();
            cpu_softmax(&mut want);
            let row = &got[r * stride..r * stride + n];
            // Probabilities: exp differs by ulps and the sum by order; 1e-6 absolute on values
            // that sum to 1.
            for (g, w) in row.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "row {r}: got {g} want {w}");
            }
            // The padding between rows is left alone.
            assert_eq!(
                &got[r * stride + n..(r + 1) * stride],
                &v[r * stride + n..(r + 1) * stride]
            );
        }
    }
}
