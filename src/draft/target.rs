//! The model the decode loop runs on: the CPU [`Session`], or the GPU's [`GpuDecoder`] or
//! [`GpuFlashDecoder`]. The loop in `decode` (plain or speculative) needs only this of it.

use super::DraftError;
use crate::backend::gpu::{GpuDecoder, GpuFlashDecoder};
use crate::backend::stats::FlashStats;
use crate::engine::gpu::GpuModel;
use crate::engine::sampler::argmax;
use crate::engine::{finite, Session};

/// What the speculative loop runs on the target: a prompt, single steps, verify passes of
/// several tokens (each position's logits, one row of the vocabulary after another), and an
/// O(1) cut back to the accepted prefix.
pub trait Target {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError>;
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError>;
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError>;
    fn truncate(&mut self, len: usize);
    /// Positions consumed so far.
    fn position(&self) -> usize;
    /// Context capacity in positions.
    fn capacity(&self) -> usize;
    fn vocab(&self) -> usize;
    /// Tokens one verify pass may hold at most.
    fn verify_width(&self) -> usize;
    /// The flash path's counters, where the FFN comes from flash.
    fn flash_stats(&self) -> Option<FlashStats> {
        None
    }
    /// Bytes of a resident draft head the target holds for a self draft.
    fn draft_head_bytes(&self) -> usize {
        0
    }
    /// Runs `token` and returns the most likely next token (ties: the lowest id). A GPU
    /// decoder picks it on the GPU and reads back 4 bytes instead of the logits.
    fn step_greedy(&mut self, token: u32) -> Result<u32, DraftError> {
        let at = self.position() + 1;
        Ok(argmax(finite(self.step(token)?, at)?))
    }
    /// The GPU decoder behind the target, for the GPU part of the stats; `None` on the CPU.
    fn gpu(&self) -> Option<&dyn GpuModel> {
        None
    }
}

impl Target for Session<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        Ok(Session::prefill(self, prompt)?)
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(Session::step(self, token, true)?)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        Ok(Session::verify(self, tokens)?)
    }
    fn truncate(&mut self, len: usize) {
        Session::truncate(self, len)
    }
    fn position(&self) -> usize {
        Session::position(self)
    }
    fn capacity(&self) -> usize {
        Session::capacity(self)
    }
    fn vocab(&self) -> usize {
        self.weights().config.vocab_size
    }
    fn verify_width(&self) -> usize {
        usize::MAX
    }
    fn flash_stats(&self) -> Option<FlashStats> {
        Session::flash_stats(self)
    }
    fn draft_head_bytes(&self) -> usize {
        Session::draft_head_bytes(self)
    }
}

impl Target for GpuDecoder {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        Ok(GpuDecoder::prefill(self, prompt)?)
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(GpuDecoder::step(self, token)?)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        Ok(GpuDecoder::verify(self, tokens)?)
    }
    fn truncate(&mut self, len: usize) {
        GpuDecoder::truncate(self, len)
    }
    fn position(&self) -> usize {
        GpuDecoder::position(self)
    }
    fn capacity(&self) -> usize {
        GpuDecoder::capacity(self)
    }
    fn vocab(&self) -> usize {
        GpuDecoder::vocab_size(self)
    }
    fn verify_width(&self) -> usize {
        GpuDecoder::verify_width(self)
    }
    fn step_greedy(&mut self, token: u32) -> Result<u32, DraftError> {
        Ok(GpuDecoder::step_greedy(self, token)?)
    }
    fn gpu(&self) -> Option<&dyn GpuModel> {
        Some(self)
    }
}

impl Target for GpuFlashDecoder<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        Ok(GpuFlashDecoder::prefill(self, prompt)?)
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(GpuFlashDecoder::step(self, token)?)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        Ok(GpuFlashDecoder::verify(self, tokens)?)
    }
    fn truncate(&mut self, len: usize) {
        GpuFlashDecoder::truncate(self, len)
    }
    fn position(&self) -> usize {
        GpuFlashDecoder::position(self)
    }
    fn capacity(&self) -> usize {
        GpuFlashDecoder::capacity(self)
    }
    fn vocab(&self) -> usize {
        GpuFlashDecoder::vocab_size(self)
    }
    fn verify_width(&self) -> usize {
        GpuFlashDecoder::verify_width(self)
    }
    fn flash_stats(&self) -> Option<FlashStats> {
        Some(GpuFlashDecoder::flash_stats(self))
    }
    fn step_greedy(&mut self, token: u32) -> Result<u32, DraftError> {
        Ok(GpuFlashDecoder::step_greedy(self, token)?)
    }
    fn gpu(&self) -> Option<&dyn GpuModel> {
        Some(self)
    }
}
