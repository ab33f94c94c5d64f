//! Greedy choice on the GPU (shaders/argmax.wgsl): the index of the largest logit.

use super::layout::{struct_layout, StructLayout};
use super::{kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::uniform;
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/argmax.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params { n, _pad })
}

/// `out[0] = argmax(x[..n])`, first index on ties (as `sampler::argmax`).
pub fn argmax(
    ctx: &GpuContext,
    n: usize,
    x: &wgpu::Buffer,
    out: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(x, n, "argmax input")?;
    need(out, 1, "argmax output")?;
    let k = kernel(
        ctx,
        "argmax",
        &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
        &[],
    )?;
    let p = uniform(
        ctx,
        "argmax",
        &Params {
            n: n as u32,
            _pad: [0; 3],
        },
    );
    k.dispatch(ctx, &[&p, x, out], [1, 1, 1])
        .map(|d| d.with_columns(Columns::Each))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32, storage_zeroed};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, Rng};

    /// The greedy sampler's rule (`engine::sampler::argmax`, a layer above this one, so
    /// restated here): the first of equal maxima wins.
    fn cpu_argmax(x: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in x.iter().enumerate() {
            if v > x[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn matches_cpu_argmax_including_ties() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(8);
        let n = 49152;
        let out = storage_zeroed(ctx, "out", 4).unwrap();
        // No NaN or infinity cases: WGSL lets implementations assume neither occurs.
        let mut cases = vec![rng.vec(n, 10.0), vec![0.5; n], vec![-3.0e38; n]];
        // Ties between far-apart indices: the first wins.
        let mut tie = rng.vec(n, 1.0);
        tie[40_000] = 7.0;
        tie[123] = 7.0;
        tie[9_999] = 7.0;
        cases.push(tie);
        for (i, x) in cases.iter().enumerate() {
            let bx = storage_f32(ctx, "x", x).unwrap();
            submit(ctx, &[argmax(ctx, n, &bx, &out).unwrap()]);
            let got: Vec<u32> = read(ctx, &out, 1).unwrap();
            assert_eq!(got[0], cpu_argmax(x), "case {i}");
        }
    }
}
