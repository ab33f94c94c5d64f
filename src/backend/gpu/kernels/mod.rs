//! One Rust wrapper per kernel of `shaders/`: each checks its arguments, compiles (once per
//! context) the pipeline variant it needs, and returns prepared [`Dispatch`]es. Every wrapper has
//! a test against the CPU reference, run on whatever adapter exists (lavapipe in CI) and skipped
//! with a message when there is none.

pub mod add;
pub mod argmax;
pub mod attention;
pub mod embed;
pub mod ffn_act;
pub mod kv_store;
pub mod layout;
pub mod matvec;
pub mod norm;
pub mod predictor;
pub mod rope;
pub mod softmax;
pub mod sparse_ffn;

use crate::backend::gpu::device::GpuContext;
use crate::backend::gpu::GpuError;
use crate::quant::DType;
use layout::{struct_layout, StructLayout};

pub use crate::backend::gpu::pipeline::{Columns, Dispatch};

/// The shaders' code for a dtype (`DT_*` in shaders/lib/quant.wgsl), or `None` for the dtypes
/// the kernels do not read (Q2_K, Q3_K, Q5_K, the Q5 and IQ4 formats, which only the CPU
/// backend reads: uploading such a tensor is a [`GpuError::UnsupportedDtype`]).
pub fn dtype_code(d: DType) -> Option<u32> {
    Some(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Q4_0 => 3,
        DType::Q4_1 => 4,
        DType::Q8_0 => 5,
        DType::Q4K => 6,
        DType::Q6K => 7,
        DType::Q5_0
        | DType::Q5_1
        | DType::Q2K
        | DType::Q3K
        | DType::Q5K
        | DType::IQ4NL
        | DType::IQ4XS => return None,
    })
}

/// Whether every 4-byte field that the shaders read of a `dtype` row of `cols` values starting at
/// `offset` (and at `offset + k * stride`) sits at a multiple of 4 bytes: the `ALIGNED` override
/// of shaders/lib/quant.wgsl, which saves a test per load.
pub fn aligned(dtype: DType, cols: usize, offset: usize, stride: usize) -> bool {
    let blocks_aligned = match dtype {
        DType::F32 | DType::Q4_1 | DType::Q4K => true,
        DType::F16 | DType::BF16 => cols.is_multiple_of(2),
        _ => false,
    };
    blocks_aligned && offset.is_multiple_of(4) && stride.is_multiple_of(4)
}

/// What changes from one pass to the next, written once per pass into one small uniform buffer
/// that every position-dependent kernel binds (`Step` in the shaders). A decode step is one
/// column (one token at `pos`); a verify pass is `n_cols` columns, tokens at `pos`, `pos + 1`,
/// and so on, whose kernels take the column from the workgroup's z index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Position of the pass's first token.
    pub pos: u32,
    /// Positions in the KV cache once the first token is stored: `pos + 1`.
    pub n_pos: u32,
    /// Tokens (columns) in this pass.
    pub n_cols: u32,
    /// The first position's row within the learned-position table (OPT).
    pub pos_row: u32,
}

/// [`Step`] as laid out, checked against the shaders' `Step` by `tests/wgsl_layout.rs`.
fn step_layout() -> StructLayout {
    struct_layout!(Step {
        pos,
        n_pos,
        n_cols,
        pos_row
    })
}

impl Default for Step {
    fn default() -> Self {
        Step {
            pos: 0,
            n_pos: 1,
            n_cols: 1,
            pos_row: 0,
        }
    }
}

/// Where a kernel that takes columns learns how many there are: one (a prepared uniform of its
/// own), or the decoder's per-pass [`Step`].
#[derive(Clone, Copy)]
pub enum Width<'a> {
    One,
    Step(&'a wgpu::Buffer),
}

/// One workgroup per `per` items, at least one.
fn groups_for(n: usize, per: usize) -> [u32; 3] {
    [n.div_ceil(per).max(1) as u32, 1, 1]
}

/// Checks that `buf` holds at least `n` 4-byte values.
fn need(buf: &wgpu::Buffer, n: usize, what: &str) -> Result<(), GpuError> {
    let have = buf.size() / 4;
    if have < n as u64 {
        return Err(GpuError::Shape(format!(
            "{what}: the buffer holds {have} values, the kernel needs {n}"
        )));
    }
    Ok(())
}

/// The dtype code, or an error naming the tensor.
fn code(d: DType, what: &str) -> Result<u32, GpuError> {
    dtype_code(d).ok_or_else(|| GpuError::UnsupportedDtype {
        what: what.to_string(),
        dtype: d,
    })
}

/// Compiles (or fetches) kernel `name` with its single entry point `main`.
fn kernel(
    ctx: &GpuContext,
    name: &str,
    bindings: &[crate::backend::gpu::pipeline::Binding],
    constants: &[(&str, f64)],
) -> Result<std::sync::Arc<crate::backend::gpu::pipeline::Kernel>, GpuError> {
    ctx.kernel(name, "main", bindings, constants)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dtypes only the CPU reads are refused up front, with a message that names the tensor
    /// and its dtype and points to the CPU backend (no adapter needed to check it).
    #[test]
    fn cpu_only_dtypes_are_refused_by_name() {
        for d in [
            DType::Q5_0,
            DType::Q5_1,
            DType::Q2K,
            DType::Q3K,
            DType::Q5K,
            DType::IQ4NL,
            DType::IQ4XS,
        ] {
            assert_eq!(dtype_code(d), None);
            let e = code(d, "tensor `t`").unwrap_err().to_string();
            assert!(
                e.contains(&format!("tensor `t` is {d}")) && e.contains("CPU backend"),
                "{e}"
            );
        }
    }
}
