//! llmflash: run language models larger than the memory they are given.
//!
//! An implementation of "LLM in a flash" (Alizadeh et al., arXiv 2312.11514). See
//! `docs/architecture.md` in the repository for the architecture: the per-token data flow,
//! what each module below owns, and how the modules depend on each other.

pub mod api;
pub mod backend;
pub mod budget;
pub mod cli;
pub mod draft;
pub mod engine;
pub mod image;
pub mod model;
pub mod serve;
pub mod sparsity;
pub mod storage;
pub mod window;
