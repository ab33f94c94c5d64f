//! The library's front door: open a model under a memory budget and generate from it.
//!
//! [`Engine`] is what an application embeds: built from a model path and a memory budget, it
//! tokenises prompts (plain text, a chat, or ids), plans a session for each generation, and
//! streams the text through a callback. Below it, [`Runner`] opens a model with its
//! [`RunOptions`] and plans the sessions that decode it, and [`gpu`] opens it on the GPU.
//!
//! ```no_run
//! use llmflash::api::{Engine, GenerateOptions, Prompt};
//! use llmflash::model::chat::ChatMessage;
//!
//! # fn main() -> anyhow::Result<()> {
//! let engine = Engine::builder("model.gguf").memory_budget(256 << 20).build()?;
//! let chat = [ChatMessage::new("user", "Write a haiku about flash memory.")];
//! let reply = engine.generate(&Prompt::Chat(&chat), &GenerateOptions::default(), |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! eprintln!("[{} tokens, {:.1} tokens/s]", reply.tokens.len(), reply.stats.tokens_per_s);
//! # Ok(())
//! # }
//! ```

pub mod cache;
pub mod chat;
pub mod engine;
pub mod gpu;
pub mod notice;
pub mod options;
pub mod runner;
pub mod text;

pub use chat::Conversation;
pub use engine::{Completion, Engine, EngineBuilder, FinishReason, GenerateOptions, Prompt};
pub use notice::Notice;
pub use options::RunOptions;
pub use runner::{DraftNeeds, Runner};
pub use text::TextStream;
