//! The FFN's hidden activation in place (shaders/ffn_act.wgsl): SwiGLU `u = u * silu(g)` or
//! ReLU `u = max(u, 0)`.

use super::layout::{struct_layout, StructLayout};
use super::{groups_for, kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::model::config::FfnKind;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/ffn_act.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params { n, _pad })
}

/// `up[..n] = act(gate, up)`; `gate` is ignored (but must be bound) for ReLU.
pub fn ffn_act(
    ctx: &GpuContext,
    kind: FfnKind,
    n: usize,
    gate: &wgpu::Buffer,
    up: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(up, n, "ffn_act up")?;
    let kind_code = match kind {
        FfnKind::SwiGlu => {
            need(gate, n, "ffn_act gate")?;
            0.0
        }
        FfnKind::Relu => 1.0,
        FfnKind::GeGlu => return Err(geglu_unsupported()),
    };
    let k = kernel(
        ctx,
        "ffn_act",
        &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
        &[("KIND", kind_code)],
    )?;
    let p = uniform(
        ctx,
        "ffn_act",
        &Params {
            n: n as u32,
            _pad: [0; 3],
        },
    );
    k.dispatch(ctx, &[&p, gate, up], groups_for(n, 64))
        .map(|d| d.with_columns(Columns::Each))
}

/// The GPU kernels compute SiLU and ReLU only; GELU-gated models (Gemma 3) are refused at
/// load time (`backend::gpu::check_supported`), and here for any caller that skipped that.
pub(crate) fn geglu_unsupported() -> GpuError {
    GpuError::Shape(
        "the GPU backend has no GELU-gated FFN (Gemma 3); run it on the CPU backend".to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::silu;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, max_rel_err, Rng};

    #[test]
    fn matches_cpu_silu_mul_and_relu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(2);
        let n = 1536;
        let (g, u) = (rng.vec(n, 8.0), rng.vec(n, 3.0));
        for kind in [FfnKind::SwiGlu, FfnKind::Relu] {
            let (bg, bu) = (
                storage_f32(ctx, "g", &g).unwrap(),
                storage_f32(ctx, "u", &u).unwrap(),
            );
            submit(ctx, &[ffn_act(ctx, kind, n, &bg, &bu).unwrap()]);
            let got: Vec<f32> = read(ctx, &bu, n).unwrap();
            let want: Vec<f32> = match kind {
                FfnKind::SwiGlu => u.iter().zip(&g).map(|(&u, &g)| u * silu(g)).collect(),
                FfnKind::Relu => u.iter().map(|&u| u.max(0.0)).collect(),
                FfnKind::GeGlu => unreachable!("only SwiGLU and ReLU are tested here"),
            };
            // The GPU's exp may differ from Rust's by a few ulps (Vulkan allows 3 + 2|x| ulp).
            let err = max_rel_err(&got, &want, 1e-3);
            assert!(err < 1e-5, "{kind:?}: relative error {err:e}");
        }
    }
}
