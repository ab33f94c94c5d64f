//! The decode loop, KV cache, sampler and per-token statistics.
