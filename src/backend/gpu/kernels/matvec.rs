//! `y = W x (+ b)` over raw ggml rows (shaders/matvec.wgsl), one dispatch per row chunk.

use super::layout::{struct_layout, StructLayout};
use super::{aligned, code, kernel, need, Columns, Dispatch, Step, Width};
use crate::backend::gpu::buffers::{uniform, GpuMatrix};
use crate::backend::gpu::pipeline::{grid, Binding};
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_bytes: u32,
    out_offset: u32,
    flags: u32,
    groups_x: u32,
    out_stride: u32,
    _pad: u32,
}

/// [`Params`] as laid out, checked against `shaders/matvec.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        rows,
        cols,
        row_bytes,
        out_offset,
        flags,
        groups_x,
        out_stride,
        _pad
    })
}

/// Columns a matvec workgroup takes (`COLS` in shaders/matvec.wgsl).
pub const COLUMNS_PER_GROUP: u32 = 8;

/// `y[..rows] = w x[..cols] (+ bias)`, for each column of the pass (`width`): column `c` reads
/// `x[c * cols..]` and writes `y[c * rows..]`, so `x` and `y` hold `columns` vectors each.
/// `x` and `y` must be different buffers.
pub fn matvec(
    ctx: &GpuContext,
    w: &GpuMatrix,
    x: &wgpu::Buffer,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    width: Width<'_>,
    columns: usize,
) -> Result<Vec<Dispatch>, GpuError> {
    let columns = columns.max(1);
    need(x, w.cols * columns, &format!("matvec `{}` input", w.name))?;
    need(y, w.rows * columns, &format!("matvec `{}` output", w.name))?;
    if let Some(b) = bias {
        need(b, w.rows, &format!("matvec `{}` bias", w.name))?;
    }
    let dt = code(w.dtype, &format!("tensor `{}`", w.name))?;
    let k = kernel(
        ctx,
        "matvec",
        &[
            Binding::Uniform,
            Binding::Read,
            Binding::Read,
            Binding::Read,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
        &[
            ("DTYPE", dt as f64),
            ("LANES", ctx.tuning.lanes as f64),
            (
                "ALIGNED",
                aligned(w.dtype, w.cols, 0, w.row_bytes) as u32 as f64,
            ),
        ],
    )?;
    let rows_per_group = 64 / ctx.tuning.lanes as usize;
    let one;
    let step = match width {
        Width::One => {
            one = uniform(ctx, "one column", &Step::default());
            &one
        }
        Width::Step(s) => s,
    };
    w.chunks
        .iter()
        .filter(|c| c.rows > 0)
        .map(|c| {
            let groups = grid(ctx, c.rows.div_ceil(rows_per_group) as u32);
            let p = uniform(
                ctx,
                &w.name,
                &Params {
                    rows: c.rows as u32,
                    cols: w.cols as u32,
                    row_bytes: w.row_bytes as u32,
                    out_offset: c.first_row as u32,
                    flags: bias.is_some() as u32,
                    groups_x: groups[0],
                    out_stride: w.rows as u32,
                    _pad: 0,
                },
            );
            // Without a bias the shader never reads binding 3; `x` stands in for it.
            let d = k.dispatch(ctx, &[&p, &c.buffer, x, bias.unwrap_or(x), y, step], groups)?;
            Ok(d.with_columns(Columns::Blocks(COLUMNS_PER_GROUP)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{forms, random_rows, Rng};
    use crate::backend::gpu::GpuContext;
    use crate::quant;
    use crate::quant::DType;

    /// Quantises a random `rows x cols` matrix to `dtype`, runs the GPU matvec (with a bias, and
    /// split into chunks of at most `max_binding` bytes), and compares with the CPU reference:
    /// the dequantised rows (`quant::dequantize`) dotted with x in f64. The GPU dots f32
    /// activations with exactly those weights, so the only difference is f32 rounding of the
    /// sum: at most ~cols * 2^-24 * sum|w_j x_j| per row; the bound allows 1e-5 of sum|w_j x_j|.
    fn check(dtype: DType, rows: usize, cols: usize, max_binding: Option<u64>) {
        // Both work splits, whatever this adapter would pick: 16 lanes per row (GPUs) and one
        // (CPU adapters); both f16 forms.
        for form in forms() {
            for lanes in [16, 1] {
                check_with(&form, dtype, rows, cols, max_binding, lanes);
            }
        }
    }

    fn check_with(
        form: &GpuContext,
        dtype: DType,
        rows: usize,
        cols: usize,
        max_binding: Option<u64>,
        lanes: u32,
    ) {
        let mut ctx = form.clone();
        ctx.tuning.lanes = lanes;
        if let Some(m) = max_binding {
            ctx.limits.max_storage_buffer_binding_size = m;
        }
        let mut rng = Rng::new(dtype as u64 * 31 + rows as u64);
        let bytes = random_rows(&mut rng, dtype, rows * cols);
        let mut deq = vec![0f32; rows * cols];
        quant::dequantize(dtype, &bytes, &mut deq).unwrap();
        let x = rng.vec(cols, 2.0);
        let b = rng.vec(rows, 0.5);
        let w = GpuMatrix::from_bytes(&ctx, "w", dtype, rows, cols, &bytes).unwrap();
        if max_binding.is_some() {
            assert!(w.chunks.len() > 1, "the matrix was meant to be split");
        }
        let bx = storage_f32(&ctx, "x", &x).unwrap();
        let bb = storage_f32(&ctx, "b", &b).unwrap();
        let by = storage_f32(&ctx, "y", &vec![f32::NAN; rows]).unwrap();
        submit(
            &ctx,
            &matvec(&ctx, &w, &bx, Some(&bb), &by, Width::One, 1).unwrap(),
        );
        let got: Vec<f32> = read(&ctx, &by, rows).unwrap();
        for r in 0..rows {
            let row = &deq[r * cols..(r + 1) * cols];
            let want: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                + b[r] as f64;
            let mag: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a * b).abs() as f64)
                .sum();
            let err = (got[r] as f64 - want).abs();
            assert!(
                err <= 1e-5 * mag + 1e-6,
                "{dtype} lanes {lanes} f16 {} row {r}: got {} want {want} (error {err:e}, scale {mag})",
                ctx.half.name(),
                got[r]
            );
        }
    }

    #[test]
    fn quantised_rows_match_cpu_dequantisation() {
        // 3 blocks per row: Q8_0 rows are 102 bytes, so every other row starts 2 mod 4 and
        // exercises the spliced loads.
        for dtype in [DType::Q8_0, DType::Q4_1, DType::Q4_0] {
            check(dtype, 37, 96, None);
        }
        // SmolLM2's shapes: d = 576 and ffn = 1536 columns.
        check(DType::Q4_1, 64, 576, None);
        check(DType::Q8_0, 32, 1536, None);
    }

    #[test]
    fn k_quant_rows_match_cpu_dequantisation() {
        // 2 blocks per row; Q6_K rows are 420 bytes, so odd rows start 2 mod 4 (spliced loads).
        for dtype in [DType::Q4K, DType::Q6K] {
            check(dtype, 19, 512, None);
        }
        // Qwen2.5-Coder-1.5B's shapes: d = 1536 and ffn = 8960 columns.
        check(DType::Q4K, 8, 1536, None);
        check(DType::Q6K, 4, 8960, None);
        check(DType::Q6K, 30, 256, Some(2048));
    }

    #[test]
    fn float_rows_match_cpu_including_a_tail() {
        // 70 columns: 8 units of 8 and a tail of 6 that lane 0 takes.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check(dtype, 41, 70, None);
            check(dtype, 9, 64, None);
        }
    }

    #[test]
    fn matrices_split_across_bindings_match() {
        // 1 KiB bindings: a handful of rows per chunk, outputs at each chunk's row offset.
        check(DType::Q8_0, 50, 96, Some(1024));
        check(DType::F16, 50, 70, Some(1024));
    }
}
