//! The low-rank activation predictor on the GPU (the paper's section 3.1), the same computation as
//! `sparsity::predictor::Predictor`: heads `z = B (A h) + bias` by two matvecs (A and B in f16,
//! as stored), then shaders/predictor_select.wgsl keeps neuron i when its score reaches `tau`
//! (`z_i` for the linear form, `|silu(z_i) * z_{n+i}|` for the product form), compacted in
//! increasing order into `[count, id_0, id_1, ...]`.

use super::layout::{struct_layout, StructLayout};
use super::{ffn_act::ffn_act, kernel, matvec::matvec, need, Columns, Dispatch, Width};
use crate::backend::gpu::buffers::{storage_bytes, storage_zeroed, uniform, GpuMatrix};
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::model::config::FfnKind;
use crate::quant::DType;
use crate::sparsity::predictor::{Form, Predictor};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    threshold: f32,
    form: u32,
    _pad: u32,
}

/// [`Params`] as laid out, checked against `shaders/predictor_select.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        n,
        threshold,
        form,
        _pad
    })
}

fn form_code(form: Form) -> u32 {
    match form {
        // The MLP's ReLU runs before B: its scores are one linear head, as the linear form's.
        Form::Linear | Form::Mlp => 0,
        Form::Product => 1,
    }
}

/// `list = [count, ids i < n whose score reaches threshold, in increasing order...]`; `list`
/// holds `1 + n`, `z` holds `n` (linear) or `2n` (product) heads, per column of the pass (up to
/// `columns`; column c's list at `c * (n + 1)`).
pub fn select(
    ctx: &GpuContext,
    n: usize,
    form: Form,
    threshold: f32,
    z: &wgpu::Buffer,
    list: &wgpu::Buffer,
    columns: usize,
) -> Result<Dispatch, GpuError> {
    let columns = columns.max(1);
    need(z, form.heads() * n * columns, "predictor heads")?;
    need(list, (n + 1) * columns, "active list")?;
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
            form: form_code(form),
            _pad: 0,
        },
    );
    Ok(k.dispatch(ctx, &[&p, z, list], [1, 1, 1])?
        .with_columns(Columns::Each))
}

/// A predictor's weights on the GPU and its scratch (the rank vector and the heads).
pub struct GpuPredictor {
    pub a: GpuMatrix,
    pub b: GpuMatrix,
    pub form: Form,
    /// Neurons (the length of the active list's id space).
    pub n: usize,
    pub threshold: f32,
    bias: Option<wgpu::Buffer>,
    low: wgpu::Buffer,
    z: wgpu::Buffer,
    /// Columns the scratch has room for.
    columns: usize,
}

impl GpuPredictor {
    /// A predictor from its matrices: `a` (rank x d), `b` (heads * n x rank), an optional
    /// per-head bias, and the decision threshold on the score.
    pub fn new(
        ctx: &GpuContext,
        a: GpuMatrix,
        b: GpuMatrix,
        bias: Option<&[f32]>,
        form: Form,
        threshold: f32,
    ) -> Result<GpuPredictor, GpuError> {
        if b.cols != a.rows || !b.rows.is_multiple_of(form.heads()) {
            return Err(GpuError::Shape(format!(
                "predictor: A is {} x {} but B is {} x {}; B's columns must be A's rows (the rank) and its rows {} per neuron",
                a.rows, a.cols, b.rows, b.cols, form.heads()
            )));
        }
        if bias.is_some_and(|v| v.len() != b.rows) {
            return Err(GpuError::Shape(format!(
                "predictor: {} biases for {} heads",
                bias.map_or(0, |v| v.len()),
                b.rows
            )));
        }
        let bias = bias
            .map(|v| storage_bytes(ctx, "predictor bias", bytemuck::cast_slice(v)))
            .transpose()?;
        let low = storage_zeroed(ctx, "predictor rank", (a.rows * 4) as u64)?;
        let z = storage_zeroed(ctx, "predictor heads", (b.rows * 4) as u64)?;
        Ok(GpuPredictor {
            n: b.rows / form.heads(),
            a,
            b,
            form,
            threshold,
            bias,
            low,
            z,
            columns: 1,
        })
    }

    /// This predictor with scratch for passes of up to `columns` columns (a verify pass's
    /// positions; see [`GpuPredictor::dispatches`]).
    pub fn with_columns(
        mut self,
        ctx: &GpuContext,
        columns: usize,
    ) -> Result<GpuPredictor, GpuError> {
        self.columns = columns.max(1);
        let f =
            |what: &str, rows: usize| storage_zeroed(ctx, what, (rows * 4 * self.columns) as u64);
        self.low = f("predictor rank", self.a.rows)?;
        self.z = f("predictor heads", self.b.rows)?;
        Ok(self)
    }

    /// Uploads a calibrated predictor (its f16 A and B as stored, its f32 bias and tau).
    pub fn upload(ctx: &GpuContext, p: &Predictor, what: &str) -> Result<GpuPredictor, GpuError> {
        let bytes = p.to_bytes();
        let rows = p.form.heads() * p.n;
        let (a, rest) = bytes.split_at(2 * p.rank * p.d);
        let (b, bias) = rest.split_at(2 * rows * p.rank);
        let bias: Vec<f32> = bias
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let a = GpuMatrix::from_bytes(ctx, &format!("{what} A"), DType::F16, p.rank, p.d, a)?;
        let b = GpuMatrix::from_bytes(ctx, &format!("{what} B"), DType::F16, rows, p.rank, b)?;
        GpuPredictor::new(ctx, a, b, Some(&bias), p.form, p.tau)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes on the GPU.
    pub fn bytes(&self) -> u64 {
        [&self.a, &self.b]
            .iter()
            .flat_map(|m| &m.chunks)
            .map(|c| c.buffer.size())
            .sum::<u64>()
            + self.bias.as_ref().map_or(0, |b| b.size())
    }

    /// The heads `z` after [`GpuPredictor::dispatches`] ran.
    pub fn logits(&self) -> &wgpu::Buffer {
        &self.z
    }

    /// Predicts from `h` into `list` (`[count, ids...]`, room for `1 + n`), for each column of
    /// the pass (`width`; h_c at `c * d`, column c's list at `c * (n + 1)`).
    pub fn dispatches(
        &self,
        ctx: &GpuContext,
        h: &wgpu::Buffer,
        list: &wgpu::Buffer,
        width: Width<'_>,
    ) -> Result<Vec<Dispatch>, GpuError> {
        let cols = self.columns;
        let mut d = matvec(ctx, &self.a, h, None, &self.low, width, cols)?;
        if self.form == Form::Mlp {
            // relu(A h) in place: the ReLU FFN activation's kernel (it binds but ignores its
            // gate; `h` stands in, since one buffer cannot be bound read-only and read-write).
            d.push(ffn_act(ctx, FfnKind::Relu, self.a.rows, h, &self.low)?);
        }
        d.extend(matvec(
            ctx,
            &self.b,
            &self.low,
            self.bias.as_ref(),
            &self.z,
            width,
            cols,
        )?);
        d.push(select(
            ctx,
            self.n,
            self.form,
            self.threshold,
            &self.z,
            list,
            cols,
        )?);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{ctx, Rng};
    use crate::quant::DType;

    #[test]
    fn selection_is_exact_and_ordered() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(9);
        for (n, t) in [(1536, 0.3), (1000, -2.0), (5, 0.0), (8960, 0.9), (300, 5.0)] {
            let z = rng.vec(n, 1.0);
            let bz = storage_f32(ctx, "z", &z).unwrap();
            let list = storage_zeroed(ctx, "list", ((n + 1) * 4) as u64).unwrap();
            submit(
                ctx,
                &[select(ctx, n, Form::Linear, t, &bz, &list, 1).unwrap()],
            );
            let got: Vec<u32> = read(ctx, &list, n + 1).unwrap();
            let want: Vec<u32> = (0..n as u32).filter(|&i| z[i as usize] >= t).collect();
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
        let p = GpuPredictor::new(ctx, ga, gb, None, Form::Linear, t).unwrap();
        let bh = storage_f32(ctx, "h", &h).unwrap();
        let list = storage_zeroed(ctx, "list", ((n + 1) * 4) as u64).unwrap();
        submit(ctx, &p.dispatches(ctx, &bh, &list, Width::One).unwrap());
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
                margin >= 0.0,
                "neuron {i}: logit {zi} vs threshold {t}"
            );
        }
    }

    /// A calibrated predictor (f16 A and B, bias, tau), both forms, against
    /// `Predictor::predict`: every neuron whose score is not within rounding of tau agrees.
    #[test]
    fn calibrated_predictor_matches_the_cpu() {
        let Some(ctx) = ctx() else { return };
        let mut rng = Rng::new(11);
        let (d, rank, n) = (96, 16, 300);
        for form in [Form::Linear, Form::Product, Form::Mlp] {
            let rows = form.heads() * n;
            let f16s = |v: Vec<f32>| -> Vec<u8> {
                v.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect()
            };
            let mut blob = f16s(rng.vec(rank * d, 0.3));
            blob.extend(f16s(rng.vec(rows * rank, 0.3)));
            blob.extend(rng.vec(rows, 0.5).iter().flat_map(|x| x.to_le_bytes()));
            let h = rng.vec(d, 1.0);
            let probe = Predictor::from_bytes(&blob, form, rank, d, n, 0.0).unwrap();
            let mut z = vec![0.0; n];
            probe.scores(&h, &mut z);
            let mut sorted = z.clone();
            sorted.sort_by(f32::total_cmp);
            let tau = sorted[n / 2];
            let cpu = Predictor::from_bytes(&blob, form, rank, d, n, tau).unwrap();
            let mut want = Vec::new();
            cpu.predict(&h, &mut want);
            let gp = GpuPredictor::upload(ctx, &cpu, "test predictor").unwrap();
            let bh = storage_f32(ctx, "h", &h).unwrap();
            let list = storage_zeroed(ctx, "list", ((n + 1) * 4) as u64).unwrap();
            submit(ctx, &gp.dispatches(ctx, &bh, &list, Width::One).unwrap());
            let got: Vec<u32> = read(ctx, &list, n + 1).unwrap();
            let got = &got[1..=got[0] as usize];
            for i in 0..n as u32 {
                let zi = z[i as usize];
                if (zi - tau).abs() < 1e-4 * (1.0 + tau.abs()) {
                    continue;
                }
                assert_eq!(
                    got.contains(&i),
                    want.contains(&i),
                    "{form:?} neuron {i}: score {zi} vs tau {tau}"
                );
            }
        }
    }
}
