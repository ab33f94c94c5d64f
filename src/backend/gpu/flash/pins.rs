//! Pinned neurons: bundles read once at setup into window slots that are never evicted.

use super::{FlashLayer, GpuFlashOptions};
use crate::backend::gpu::{GpuContext, GpuError};
use crate::image::FlashImage;
use crate::storage::{ReadError, ReadPool};

/// Pins `ids` in `layer`'s window and uploads their bundles into the slots they got; returns
/// the bytes read.
pub(super) fn pin(
    ctx: &GpuContext,
    image: &FlashImage,
    pool: &ReadPool,
    opts: &GpuFlashOptions,
    layer: &mut FlashLayer,
    l: usize,
    ids: &[u32],
) -> Result<u64, GpuError> {
    let (coalesce, verify) = (&opts.coalesce, opts.verify);
    let stride = image.bundle().stride;
    let loads = layer
        .window
        .pin(ids)
        .map_err(|e| GpuError::Shape(format!("pinning layer {l}: {e}")))?;
    let neurons: Vec<u32> = loads.iter().map(|&(n, _)| n).collect();
    let reads = layer.placement.reads(&neurons, &[(0, stride)]);
    let slots = &layer.slots;
    let mut bad = None;
    let read = pool
        .read_ranges(&reads.ranges, coalesce, &mut |r, bytes| {
            let k = reads.target(r).0;
            if verify && bad.is_none() {
                let slot = layer.placement.disk_slot(neurons[k]);
                bad = image.check_bundle(l, slot, bytes).err();
            }
            let at = loads[k].1 as u64 * stride as u64;
            ctx.queue.write_buffer(slots, at, bytes);
        })
        .map_err(|e| ReadError::new(format!("layer {l}'s pinned neurons"), e))?;
    if let Some(e) = bad {
        return Err(ReadError::new(format!("layer {l}'s pinned neurons"), e).into());
    }
    Ok(read.bytes_read)
}
