//! Model files: architecture config, GGUF and safetensors readers, quantised tensors,
//! tokenizer and chat template, and the loaded weights.

pub mod chat;
pub mod config;
pub mod gemma3;
pub mod gguf;
pub mod hf;
pub mod loader;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use loader::{load, LoadedModel};
