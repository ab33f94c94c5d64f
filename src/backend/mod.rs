//! Compute backends. Each runs one decode step over the loaded weights.

pub mod cpu;
pub mod gpu;
