//! The ring of mapped staging buffers the missing bundles and a layer's lists are read into.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::GpuFlashDecoder;
use crate::backend::gpu::GpuError;

/// A mapped staging buffer of the ring, and whether its re-mapping has completed.
pub(super) struct Staging {
    pub(super) buf: wgpu::Buffer,
    pub(super) ready: Arc<AtomicBool>,
}

impl GpuFlashDecoder<'_> {
    /// Waits until the next staging buffer is mapped and returns its index.
    pub(super) fn acquire_staging(&mut self) -> Result<usize, GpuError> {
        let i = self.next_staging;
        self.next_staging = (i + 1) % self.staging.len();
        if !self.staging[i].ready.load(Ordering::Acquire) {
            let t = Instant::now();
            while !self.staging[i].ready.load(Ordering::Acquire) {
                self.core
                    .ctx
                    .device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| GpuError::Readback(e.to_string()))?;
            }
            self.core.wait += t.elapsed();
        }
        Ok(i)
    }
}
