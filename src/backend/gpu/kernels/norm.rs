//! RMSNorm and LayerNorm (shaders/rms_norm.wgsl, shaders/layer_norm.wgsl), one workgroup each,
//! and RMSNorm of each head in place (shaders/head_norm.wgsl), one workgroup per head.

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

/// [`Params`] as laid out, checked against `shaders/rms_norm.wgsl`'s,
/// `shaders/layer_norm.wgsl`'s and `shaders/head_norm.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
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

    /// RMSNorm of each of the `heads` heads of `v` (`self.n` wide each, per column) in place,
    /// every head with these weights: Qwen3's q and k norms.
    pub fn dispatch_heads(
        &self,
        ctx: &GpuContext,
        eps: f32,
        heads: usize,
        v: &wgpu::Buffer,
    ) -> Result<Dispatch, GpuError> {
        if self.bias.is_some() {
            return Err(GpuError::Shape(
                "a head norm with a bias: only RMSNorm runs per head".to_string(),
            ));
        }
        need(v, self.n * heads, "head norm vector")?;
        let p = uniform(
            ctx,
            "head norm",
            &Params {
                n: self.n as u32,
                eps,
                flags: 0,
                _pad: 0,
            },
        );
        let k = kernel(
            ctx,
            "head_norm",
            &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
            &[],
        )?;
        k.dispatch(ctx, &[&p, &self.weight, v], [heads as u32, 1, 1])
            .map(|d| d.with_columns(Columns::Each))
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

    #[test]
    fn head_norm_matches_cpu_on_every_head_and_column() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(4);
        for (n, heads, columns) in [(128, 16, 1), (24, 4, 3), (256, 2, 2), (7, 5, 2)] {
            let x: Vec<f32> = rng.vec(n * heads * columns, 3.0);
            let norm = Norm {
                weight: rng.vec(n, 1.0),
                bias: None,
            };
            let g = GpuNorm::upload(ctx, "head norm", &norm).unwrap();
            let v = storage_f32(ctx, "v", &x).unwrap();
            let d = g.dispatch_heads(ctx, 1e-6, heads, &v).unwrap();
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                d.encode_columns(&mut pass, columns);
            }
            ctx.queue.submit([enc.finish()]);
            let got: Vec<f32> = read(ctx, &v, x.len()).unwrap();
            let mut want = vec![0.0; x.len()];
            for (w, h) in want.chunks_mut(n).zip(x.chunks(n)) {
                apply_norm(&norm, h, 1e-6, w);
            }
            let err = max_rel_err(&got, &want, 1e-3);
            assert!(err < 1e-5, "n={n} heads={heads}: relative error {err:e}");
        }
    }
}
