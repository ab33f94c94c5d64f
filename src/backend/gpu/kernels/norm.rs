//! RMSNorm and LayerNorm (shaders/rms_norm.wgsl, shaders/layer_norm.wgsl), one workgroup each.

use super::layout::{struct_layout, StructLayout};
use super::{kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::{storage_f32, uniform};
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::model::weights::Norm;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    eps: f32,
    flags: u32,
    _pad: u32,
}

/// [`Params`] as laid out, checked against `shaders/rms_norm.wgsl`'s and
/// `shaders/layer_norm.wgsl`'s `Params` by `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        n,
        eps,
        flags,
        _pad
    })
}

/// A norm's weights on the GPU: LayerNorm when it has a bias (OPT), RMSNorm otherwise, as
/// `ops::apply_norm` decides.
#[derive(Debug)]
pub struct GpuNorm {
    pub n: usize,
    weight: wgpu::Buffer,
    bias: Option<wgpu::Buffer>,
}

impl GpuNorm {
    pub fn upload(ctx: &GpuContext, what: &str, norm: &Norm) -> Result<GpuNorm, GpuError> {
        Ok(GpuNorm {
            n: norm.weight.len(),
            weight: storage_f32(ctx, what, &norm.weight)?,
            bias: match &norm.bias {
                Some(b) => Some(storage_f32(ctx, what, b)?),
                None => None,
            },
        })
    }

    /// `y = norm(x)`; `x` and `y` must be different buffers.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        eps: f32,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Result<Dispatch, GpuError> {
        need(x, self.n, "norm input")?;
        need(y, self.n, "norm output")?;
        let p = uniform(
            ctx,
            "norm",
            &Params {
                n: self.n as u32,
                eps,
                flags: self.bias.is_some() as u32,
                _pad: 0,
            },
        );
        match &self.bias {
            None => {
                let k = kernel(
                    ctx,
                    "rms_norm",
                    &[
                        Binding::Uniform,
                        Binding::Read,
                        Binding::Read,
                        Binding::ReadWrite,
                    ],
                    &[],
                )?;
                k.dispatch(ctx, &[&p, x, &self.weight, y], [1, 1, 1])
                    .map(|d| d.with_columns(Columns::Each))
            }
            Some(b) => {
                let k = kernel(
                    ctx,
                    "layer_norm",
                    &[
                        Binding::Uniform,
                        Binding::Read,
                        Binding::Read,
                        Binding::Read,
                        Binding::ReadWrite,
                    ],
                    &[],
                )?;
                k.dispatch(ctx, &[&p, x, &self.weight, b, y], [1, 1, 1])
                    .map(|d| d.with_columns(Columns::Each))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::apply_norm;
    use crate::backend::gpu::buffers::read;
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, max_rel_err, Rng};

    #[test]
    fn rms_and_layer_norm_match_cpu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(3);
        for (n, with_bias) in [(576, false), (1000, true), (64, true), (7, false)] {
            // An offset makes LayerNorm's mean matter.
            let x: Vec<f32> = rng.vec(n, 3.0).iter().map(|v| v + 0.7).collect();
            let norm = Norm {
                weight: rng.vec(n, 1.0),
                bias: with_bias.then(|| rng.vec(n, 1.0)),
            };
            let g = GpuNorm::upload(ctx, "norm", &norm).unwrap();
            let (bx, by) = (
                storage_f32(ctx, "x", &x).unwrap(),
                storage_f32(ctx, "y", &vec![0.0; n]).unwrap(),
            );
            submit(ctx, &[g.dispatch(ctx, 1e-5, &bx, &by).unwrap()]);
            let got: Vec<f32> = read(ctx, &by, n).unwrap();
            let mut want = vec![0.0; n];
            apply_norm(&norm, &x, 1e-5, &mut want);
            // The sums differ in order (a tree in f32 here, f64 or a sequential f32 sum on the
            // CPU): a few ulps of the scale, then one more rounding per output.
            let err = max_rel_err(&got, &want, 1e-3);
            assert!(err < 1e-5, "n={n} bias={with_bias}: relative error {err:e}");
        }
    }
}
