//! Embedding gather (shaders/embed.wgsl): a row of a table in the file's dtype, dequantised.

use super::{aligned, code, kernel, need, Dispatch};
use crate::backend::gpu::buffers::{uniform, GpuMatrix};
use crate::backend::gpu::pipeline::Binding;
use crate::backend::gpu::{GpuContext, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    cols: u32,
    row_bytes: u32,
    flags: u32,
    _pad: u32,
}

/// Which row of the Step uniform the gather takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSource {
    /// `Step::token_row` (token embeddings).
    Token,
    /// `Step::pos_row` (learned positions).
    Position,
}

/// A table's gathers, one prepared dispatch per chunk: the row is only known per token, so the
/// caller picks the chunk ([`GpuMatrix::chunk_of`]) and writes the row within it into the Step.
pub struct Gather {
    pub dispatches: Vec<Dispatch>,
}

impl Gather {
    /// `y[..cols] = table[row]` (or `+=` with `accumulate`), the row from `step`.
    pub fn new(
        ctx: &GpuContext,
        table: &GpuMatrix,
        source: RowSource,
        accumulate: bool,
        y: &wgpu::Buffer,
        step: &wgpu::Buffer,
    ) -> Result<Gather, GpuError> {
        need(y, table.cols, &format!("gather from `{}`", table.name))?;
        let dt = code(table.dtype, &format!("tensor `{}`", table.name))?;
        let k = kernel(
            ctx,
            "embed",
            &[
                Binding::Uniform,
                Binding::Read,
                Binding::ReadWrite,
                Binding::Uniform,
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
        let p = uniform(
            ctx,
            &table.name,
            &Params {
                cols: table.cols as u32,
                row_bytes: table.row_bytes as u32,
                flags,
                _pad: 0,
            },
        );
        let dispatches = table
            .chunks
            .iter()
            .map(|c| {
                k.dispatch(
                    ctx,
                    &[&p, &c.buffer, y, step],
                    [table.cols.div_ceil(64).max(1) as u32, 1, 1],
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Gather { dispatches })
    }

    /// The dispatch for row `r` of `table` (the table this gather was built from) and the row's
    /// index within its chunk, to be written into the Step; `None` when `r` is out of range.
    pub fn for_row(&self, table: &GpuMatrix, r: usize) -> Option<(&Dispatch, u32)> {
        let i = table
            .chunks
            .iter()
            .position(|c| r >= c.first_row && r < c.first_row + c.rows)?;
        Some((&self.dispatches[i], (r - table.chunks[i].first_row) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::quant;
    use crate::backend::gpu::buffers::{read, storage_f32, write};
    use crate::backend::gpu::kernels::Step;
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::{forms, Rng};
    use crate::backend::gpu::GpuContext;
    use crate::model::tensor::DType;

    #[test]
    fn rows_match_cpu_dequantisation() {
        for form in forms() {
            check(&form);
        }
    }

    fn check(ctx: &GpuContext) {
        let mut rng = Rng::new(4);
        let (rows, cols) = (40, 96);
        for dtype in [
            DType::Q8_0,
            DType::F16,
            DType::F32,
            DType::BF16,
            DType::Q4_1,
            DType::Q4_0,
        ] {
            let mut bytes = Vec::new();
            quant::quantize(dtype, &rng.vec(rows * cols, 2.0), &mut bytes).unwrap();
            let table = GpuMatrix::from_bytes(ctx, "t", dtype, rows, cols, &bytes).unwrap();
            let step = crate::backend::gpu::buffers::uniform(ctx, "step", &Step::default());
            let y = storage_f32(ctx, "y", &vec![1.0; cols]).unwrap();
            for (r, acc) in [(0usize, false), (17, false), (39, true)] {
                let g = Gather::new(ctx, &table, RowSource::Token, acc, &y, &step).unwrap();
                let before: Vec<f32> = read(ctx, &y, cols).unwrap();
                write(
                    ctx,
                    &step,
                    &[Step {
                        token_row: r as u32,
                        ..Step::default()
                    }],
                );
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
