//! llmflash: run language models larger than the memory they are given.
//!
//! An implementation of "LLM in a flash" (Alizadeh et al., arXiv 2312.11514). See
//! `DESIGN.md` for the architecture; each module below owns one concern.

pub mod backend;
pub mod budget;
pub mod cli;
pub mod draft;
pub mod engine;
pub mod image;
pub mod model;
pub mod sparsity;
pub mod storage;
pub mod window;
