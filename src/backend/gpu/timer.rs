//! GPU execution time from timestamp queries, where the device has TIMESTAMP_QUERY: every
//! compute pass of a token writes a begin and an end timestamp; the token's last command buffer
//! resolves them, and the decoder sums `end - begin` after its readback. Where the feature is
//! missing (some GL and WebGPU adapters) nothing is measured and stats say "n/a".

use std::cell::Cell;
use std::time::Duration;

use crate::backend::gpu::GpuContext;

/// Pairs of queries per token at most; passes beyond it are not timed.
const PAIRS: u32 = 1024;

pub struct GpuTimer {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    period_ns: f64,
    /// Queries written since the last [`GpuTimer::resolve`].
    used: Cell<u32>,
    /// Queries resolved into `read` and not yet collected.
    pending: Cell<u32>,
    pub total: Duration,
}

impl GpuTimer {
    /// A timer, or `None` when the device cannot write timestamps.
    pub fn new(ctx: &GpuContext) -> Option<GpuTimer> {
        if !ctx
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            return None;
        }
        let count = 2 * PAIRS;
        let bytes = count as u64 * 8;
        Some(GpuTimer {
            set: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("pass timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count,
            }),
            resolve: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: ctx.queue.get_timestamp_period() as f64,
            used: Cell::new(0),
            pending: Cell::new(0),
            total: Duration::ZERO,
        })
    }

    /// The timestamp writes of the next pass, while pairs remain.
    pub fn writes(&self) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        let i = self.used.get();
        if i >= 2 * PAIRS {
            return None;
        }
        self.used.set(i + 2);
        Some(wgpu::ComputePassTimestampWrites {
            query_set: &self.set,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        })
    }

    /// Records the resolution of this token's queries (call in its last command buffer).
    pub fn resolve(&self, enc: &mut wgpu::CommandEncoder) {
        let n = self.used.get();
        self.used.set(0);
        self.pending.set(n);
        if n > 0 {
            enc.resolve_query_set(&self.set, 0..n, &self.resolve, 0);
            enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, n as u64 * 8);
        }
    }

    /// After the token's command buffers completed: adds the passes' GPU time to `total`.
    pub fn collect(&mut self, ctx: &GpuContext) {
        let n = self.pending.replace(0);
        if n == 0 {
            return;
        }
        let slice = self.read.slice(..n as u64 * 8);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        if ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .is_err()
            || !matches!(rx.recv(), Ok(Ok(())))
        {
            return;
        }
        if let Ok(view) = slice.get_mapped_range() {
            let ticks: &[u64] = bytemuck::cast_slice(&view);
            let sum: u64 = ticks
                .chunks_exact(2)
                .map(|p| p[1].saturating_sub(p[0]))
                .sum();
            self.total += Duration::from_nanos((sum as f64 * self.period_ns) as u64);
        }
        self.read.unmap();
    }
}
