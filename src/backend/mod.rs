//! Compute backends. Each runs one decode step over the loaded weights.
//!
//! The modules beside `cpu` and `gpu` are what both use and the engine above them hands in:
//! the KV cache ([`kv_cache`]), the embedding and output head resident or streamed from an
//! image ([`streamed`]), and the flash path's counters ([`stats`]).

pub mod cpu;
pub mod gpu;
pub mod kv_cache;
pub mod stats;
pub mod streamed;
