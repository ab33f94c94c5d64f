//! The CPU backend: quantised dot products (SIMD where available), matvec over all cores,
//! and the elementwise ops of a transformer layer.

pub mod attention;
pub mod attention_f16;
pub mod forward;
pub mod matvec;
pub mod ops;
pub mod prefill;
pub mod quant;
pub mod sparse_ffn;
