//! llmflash: run language models larger than the memory they are given.
//!
//! An implementation of "LLM in a flash" (Alizadeh et al., arXiv 2312.11514). See
//! `docs/architecture.md` in the repository for the architecture: the per-token data flow,
//! what each module below owns, and how the modules depend on each other.
//!
//! The front door is [`api`]: an [`api::Engine`] opens a model (a GGUF file, an HF directory
//! or a flash image) under a memory budget and generates from it; [`serve`] serves one over
//! an OpenAI-compatible HTTP API. The other modules are the engine's parts, in layers, each
//! using only those before it here: `rng`, `budget`, `storage`, `window`, `quant`, `model`, `image`,
//! `backend` (its shared types, then `backend::cpu`), `sparsity`, `backend::gpu`, `engine`,
//! `calibration`, `draft` (`tests/layering.rs` checks the order).
//!
//! ```no_run
//! use llmflash::api::{Engine, GenerateOptions, Prompt};
//!
//! # fn main() -> anyhow::Result<()> {
//! // The model's FFN weights stay on flash; 128 MiB holds everything else.
//! let engine = Engine::builder("model.gguf").memory_budget(128 << 20).build()?;
//! let opts = GenerateOptions { max_tokens: 64, ..GenerateOptions::default() };
//! engine.generate(&Prompt::Text("Flash memory is"), &opts, |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! Features: `cli` (default: the `llmflash` command, with clap, indicatif and env_logger) and
//! `serve` (default: the HTTP server, with axum and tokio). An application embedding the
//! engine can leave both out with `default-features = false`.

#[warn(missing_docs)]
pub mod api;
pub mod backend;
pub mod budget;
pub mod calibration;
#[cfg(feature = "cli")]
pub mod cli;
pub mod draft;
pub mod engine;
pub mod image;
pub mod model;
pub mod quant;
pub mod rng;
#[cfg(feature = "serve")]
#[warn(missing_docs)]
pub mod serve;
pub mod sparsity;
pub mod storage;
pub mod window;
