//! The CPU backend: matvec over all cores with the quantised dot products of
//! [`crate::quant`], attention, the elementwise ops of a transformer layer, one decode step
//! and batched prefill.

pub mod attention;
pub mod attention_f16;
pub mod forward;
pub mod matvec;
pub mod ops;
pub mod prefill;
pub mod sparse_ffn;
