//! The low-rank activation predictor on the GPU (the paper's §3.1): `z = B (A h)`, neuron i
//! active when `z_i > threshold`, compacted in increasing order into `[count, id_0, id_1, ...]`
//! (shaders/predictor_select.wgsl after two matvecs).

use super::{kernel, matvec::matvec, need, Dispatch};
use crate::backend::gpu::buffers::{storage_zeroed, uniform, GpuMatrix};
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    threshold: f32,
    _pad: [u32; 2],
}

/// `list = [count, ids of z[..n] > threshold in increasing order...]`; `list` holds `1 + n`.
pub fn select(
    ctx: &GpuContext,
    n: usize,
    threshold: f32,
    z: &wgpu::Buffer,
    list: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    need(z, n, "predictor logits")?;
    need(list, n + 1, "active list")?;
    let k = kernel(
        ctx,
        "predictor_select",
        &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
        &[],
    )?;
    let p = uniform(
        ctx,
        "predictor_select",
        &Params {
            n: n as u32,
            threshold,
            _pad: [0; 2],
        },
    );
    k.dispatch(ctx, &[&p, z, list], [1, 1, 1])
}

/// One layer's predictor: `a` is `r x d` (the down-projection to rank r), `b` is `n x r`.
pub struct GpuPredictor {
    pub a: GpuMatrix,
    pub b: GpuMatrix,
    pub threshold: f32,
    /// Scratch: `A h` (r values) and `z` (n values).
    low: wgpu::Buffer,
    z: wgpu::Buffer,
}

impl GpuPredictor {
    pub fn new(
        ctx: &GpuContext,
        a: GpuMatrix,
        b: GpuMatrix,
        threshold: f32,
    ) -> Result<GpuPredictor, GpuError> {
        if b.cols != a.rows {
            return Err(GpuError::Shape(format!(
                "predictor: A is {} x {} but B is {} x {}; B's columns must be A's rows (the rank)",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        let low = storage_zeroed(ctx, "predictor rank", (a.rows * 4) as u64)?;
        let z = storage_zeroed(ctx, "predictor logits", (b.rows * 4) as u64)?;
        Ok(GpuPredictor {
            a,
            b,
            threshold,
            low,
            z,
        })
    }

    /// Neurons the predictor scores.
    pub fn n(&self) -> usize {
        self.b.rows
    }

    /// The logits `z`, after the dispatches ran.
    pub fn logits(&self) -> &wgpu::Buffer {
        &self.z
    }

    /// Dispatches that fill `list` (room for `1 + n` values) from `h`.
    pub fn dispatches(
        &self,
        ctx: &GpuContext,
        h: &wgpu::Buffer,
        list: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>, GpuError> {
        let mut d = matvec(ctx, &self.a, h, None, &self.low)?;
        d.extend(matvec(ctx, &self.b, &self.low, None, &self.z)?);
        d.push(select(ctx, self.n(), self.threshold, &self.z, list)?);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, Rng};
    use crate::model::tensor::DType;

    #[test]
    fn selection_is_exact_and_ordered() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(9);
        for (n, t) in [(1536, 0.3), (1000, -2.0), (5, 0.0), (8960, 0.9), (300, 5.0)] {
            let z = rng.vec(n, 1.0);
            let bz = storage_f32(ctx, "z", &z).unwrap();
            let list = storage_zeroed(ctx, "list", ((n + 1) * 4) as u64).unwrap();
            submit(ctx, &[select(ctx, n, t, &bz, &list).unwrap()]);
            let got: Vec<u32> = read(ctx, &list, n + 1).unwrap();
            let want: Vec<u32> = (0..n as u32).filter(|&i| z[i as usize] > t).collect();
            assert_eq!(got[0] as usize, want.len(), "n={n} t={t}: count");
            assert_eq!(&got[1..=want.len()], &want[..], "n={n} t={t}: ids");
        }
    }

    #[test]
    fn low_rank_predictor_matches_cpu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(10);
        let (d, r, n) = (576, 64, 1536);
        let (a, b) = (rng.vec(r * d, 0.2), rng.vec(n * r, 0.2));
        let h = rng.vec(d, 1.0);
        let ga =
            GpuMatrix::from_bytes(ctx, "A", DType::F32, r, d, bytemuck::cast_slice(&a)).unwrap();
        let gb =
            GpuMatrix::from_bytes(ctx, "B", DType::F32, n, r, bytemuck::cast_slice(&b)).unwrap();
        // The CPU reference in f64.
        let low: Vec<f64> = (0..r)
            .map(|i| (0..d).map(|j| a[i * d + j] as f64 * h[j] as f64).sum())
            .collect();
        let z: Vec<f64> = (0..n)
            .map(|i| (0..r).map(|j| b[i * r + j] as f64 * low[j]).sum())
            .collect();
        let mut sorted = z.clone();
        sorted.sort_by(f64::total_cmp);
        let t = sorted[n / 2] as f32;
        let p = GpuPredictor::new(ctx, ga, gb, t).unwrap();
        let bh = storage_f32(ctx, "h", &h).unwrap();
        let list = storage_zeroed(ctx, "list", ((n + 1) * 4) as u64).unwrap();
        submit(ctx, &p.dispatches(ctx, &bh, &list).unwrap());
        let got: Vec<u32> = read(ctx, &list, n + 1).unwrap();
        let active = &got[1..=got[0] as usize];
        assert!(
            active.windows(2).all(|w| w[0] < w[1]),
            "ids are not increasing"
        );
        // f32 sums of 576 and 64 terms: a logit within 1e-4 of the threshold may land on either
        // side; every other neuron must be classified as the f64 reference does.
        for (i, &zi) in z.iter().enumerate() {
            let margin = zi - t as f64;
            if margin.abs() < 1e-4 {
                continue;
            }
            assert_eq!(
                active.binary_search(&(i as u32)).is_ok(),
                margin > 0.0,
                "neuron {i}: logit {zi} vs threshold {t}"
            );
        }
    }
}
