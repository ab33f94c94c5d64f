//! Embedding gather (shaders/embed.wgsl): a row of a table in the file's dtype, dequantised.

use super::layout::{struct_layout, StructLayout};
use super::{aligned, code, kernel, need, Columns, Dispatch};
use crate::backend::gpu::buffers::{uniform, GpuMatrix};
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    cols: u32,
    row_bytes: u32,
    flags: u32,
    first_row: u32,
    rows: u32,
    _pad: [u32; 3],
}

/// [`Params`] as laid out, checked against `shaders/embed.wgsl`'s `Params` by
/// `tests/wgsl_layout.rs`.
pub(super) fn params_layout() -> StructLayout {
    struct_layout!(Params {
        cols,
        row_bytes,
        flags,
        first_row,
        rows,
        _pad
    })
}

/// Where each column's row comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSource {
    /// The `rows` buffer: the pass's tokens, one per column (token embeddings).
    Token,
    /// `Step::pos_row + c` (learned positions).
    Position,
}

/// A table's gathers, one prepared dispatch per chunk of the table: each chunk writes the
/// columns whose rows it holds, so a pass encodes them all.
pub struct Gather {
    pub dispatches: Vec<Dispatch>,
}

impl Gather {
    /// `y[c * cols..][..cols] = table[row_c]` (or `+=` with `accumulate`) for each column `c` of
    /// the pass, `row_c` from `source`. `y` holds `columns` vectors; `rows` holds a `u32` table
    /// row per column (read only for [`RowSource::Token`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &GpuContext,
        table: &GpuMatrix,
        source: RowSource,
        accumulate: bool,
        y: &wgpu::Buffer,
        step: &wgpu::Buffer,
        rows: &wgpu::Buffer,
        columns: usize,
    ) -> Result<Gather, GpuError> {
        let columns = columns.max(1);
        need(
            y,
            table.cols * columns,
            &format!("gather from `{}`", table.name),
        )?;
        need(
            rows,
            columns,
            &format!("the rows of the gather from `{}`", table.name),
        )?;
        let dt = code(table.dtype, &format!("tensor `{}`", table.name))?;
        let k = kernel(
            ctx,
            "embed",
            &[
                Binding::Uniform,
                Binding::Read,
                Binding::ReadWrite,
                Binding::Uniform,
                Binding::Read,
            ],
            &[
                ("DTYPE", dt as f64),
                (
                    "ALIGNED",
                    aligned(table.dtype, table.cols, 0, table.row_bytes) as u32 as f64,
                ),
            ],
        )?;
        let flags = (source == RowSource::Position) as u32 | (accumulate as u32) << 1;
        let dispatches = table
            .chunks
            .iter()
            .map(|c| {
                let p = uniform(
                    ctx,
                    &table.name,
                    &Params {
                        cols: table.cols as u32,
                        row_bytes: table.row_bytes as u32,
                        flags,
                        first_row: c.first_row as u32,
                        rows: c.rows as u32,
                        _pad: [0; 3],
                    },
                );
                let d = k.dispatch(
                    ctx,
                    &[&p, &c.buffer, y, step, rows],
                    [table.cols.div_ceil(64).max(1) as u32, 1, 1],
                )?;
                Ok(d.with_columns(Columns::Each))
            })
            .collect::<Result<_, GpuError>>()?;
        Ok(Gather { dispatches })
    }

    /// Encodes the gather of a pass of `n` columns.
    pub fn encode_columns(&self, pass: &mut wgpu::ComputePass<'_>, n: usize) {
        self.dispatches
            .iter()
            .for_each(|d| d.encode_columns(pass, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32, write};
    use crate::backend::gpu::kernels::Step;
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{forms, random_rows, Rng};
    use crate::backend::gpu::GpuContext;
    use crate::quant;
    use crate::quant::DType;

    #[test]
    fn rows_match_cpu_dequantisation() {
        for form in forms() {
            check(&form);
        }
    }

    fn check(ctx: &GpuContext) {
        let mut rng = Rng::new(4);
        let rows = 40;
        for (dtype, cols) in [
            (DType::Q8_0, 96),
            (DType::F16, 96),
            (DType::F32, 96),
            (DType::BF16, 96),
            (DType::Q4_1, 96),
            (DType::Q4_0, 96),
            (DType::Q4K, 512),
            (DType::Q6K, 256),
        ] {
            let bytes = random_rows(&mut rng, dtype, rows * cols);
            let table = GpuMatrix::from_bytes(ctx, "t", dtype, rows, cols, &bytes).unwrap();
            let step = crate::backend::gpu::buffers::uniform(ctx, "step", &Step::default());
            let y = storage_f32(ctx, "y", &vec![1.0; cols]).unwrap();
            let rows_buf = crate::backend::gpu::buffers::storage_zeroed(ctx, "rows", 4).unwrap();
            for (r, acc) in [(0usize, false), (17, false), (39, true)] {
                let g = Gather::new(ctx, &table, RowSource::Token, acc, &y, &step, &rows_buf, 1)
                    .unwrap();
                let before: Vec<f32> = read(ctx, &y, cols).unwrap();
                write(ctx, &rows_buf, &[r as u32]);
                submit(ctx, &g.dispatches);
                let got: Vec<f32> = read(ctx, &y, cols).unwrap();
                let mut want = vec![0.0; cols];
                quant::dequantize(
                    dtype,
                    &bytes[r * table.row_bytes..][..table.row_bytes],
                    &mut want,
                )
                .unwrap();
                if acc {
                    want.iter_mut().zip(&before).for_each(|(w, b)| *w += b);
                }
                // Each value is at most one multiply and one add of the same f32 operands (a
                // GPU may fuse them, one rounding fewer): equal to 1e-6 relative.
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{dtype} f16 {} row {r} col {j}: got {g} want {w}",
                        ctx.half.name()
                    );
                }
            }
        }
    }
}
