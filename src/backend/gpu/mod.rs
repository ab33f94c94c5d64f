//! The wgpu backend: a decode step computed on a GPU (or on lavapipe, Mesa's Vulkan driver for
//! the CPU, where no GPU exists).
//!
//! - [`device`]: [`GpuContext`], created by the engine or from a host application's own
//!   `wgpu::Device` and `wgpu::Queue`, with the limits the kernels must honour.
//! - [`buffers`]: uploads (weights as raw ggml blocks, split into row chunks that each fit one
//!   storage binding) and readbacks.
//! - [`pipeline`]: compute pipelines with explicit bind group layouts, and [`pipeline::Dispatch`],
//!   a pipeline bound to its buffers, ready to encode.
//! - [`shaders`]: the WGSL sources (`shaders/`, one file per kernel), validated by naga in tests.
//! - [`kernels`]: one Rust wrapper per kernel, each tested against the CPU reference.
//! - [`forward`]: [`GpuDecoder`], the dense decode step wholly on the GPU.
//! - [`flash`]: [`GpuFlashDecoder`], a flash image's FFN streamed from the SSD into per-layer
//!   GPU window buffers through a staging ring, selected by the predictor on the GPU.
//!
//! Weights stay in their file's dtype on the GPU and are dequantised in the shaders. f16 values
//! (f16 weights, every quantised block's scale, an f16 KV cache) are read natively, through
//! `array<f16>` views, where the device has SHADER_F16, and two per `u32` with
//! `unpack2x16float` where it does not (the GL fallback, some older GPUs): [`shaders::Half`].
//! Both forms compute in f32 and give the same numbers.

pub mod buffers;
pub mod device;
pub mod flash;
pub mod forward;
pub mod kernels;
pub mod pipeline;
pub mod shaders;
#[cfg(test)]
pub(crate) mod testing;
pub mod timer;

pub use device::{GpuContext, GpuOptions};
pub use flash::{GpuFlashDecoder, GpuFlashOptions};
pub use forward::GpuDecoder;

use crate::quant::DType;

/// Errors of the GPU backend. Each says what was expected, what was found, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found{detail}: install mesa-vulkan-drivers for a CPU Vulkan device (lavapipe), check WGPU_BACKEND if it is set, or run on the CPU backend")]
    NoAdapter { detail: String },
    #[error("no GPU adapter's name contains `{wanted}`; the adapters here are: {available}. Pass part of one of these names, or none to take the default")]
    AdapterNotFound { wanted: String, available: String },
    #[error(
        "could not open the GPU device `{adapter}`: {reason}; try another adapter or the CPU backend"
    )]
    RequestDevice { adapter: String, reason: String },
    #[error("{what} needs {bytes} bytes in one GPU storage binding, but `{adapter}` allows at most {limit}; use a smaller context or the CPU backend")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
        adapter: String,
    },
    #[error("{what} is {dtype}, which the GPU kernels do not read (they read F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K); use the CPU backend for this model")]
    UnsupportedDtype { what: String, dtype: DType },
    #[error("{0}")]
    Shape(String),
    #[error("the GPU rejected {what}: {reason}")]
    Validation { what: String, reason: String },
    /// A read of weights from the image failed or did not match its checksum: the pass
    /// stops, nothing from it is used.
    #[error(transparent)]
    Read(#[from] crate::storage::ReadError),
    #[error("reading results back from the GPU failed: {0}")]
    Readback(String),
    #[error(
        "the context is full ({capacity} positions); use a larger context or a shorter prompt"
    )]
    ContextFull { capacity: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
}
