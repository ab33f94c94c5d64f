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
    let mut loads = layer
        .window
        .pin(ids)
        .map_err(|e| GpuError::Shape(format!("pinning layer {l}: {e}")))?;
    let offset = |n: u32| image.bundle_offset(l, layer.disk_slot[n as usize] as usize);
    loads.sort_unstable_by_key(|&(n, _)| offset(n));
    let ranges: Vec<(u64, usize)> = loads.iter().map(|&(n, _)| (offset(n), stride)).collect();
    let slots = &layer.slots;
    let mut bad = None;
    let read = pool
        .read_ranges(&ranges, coalesce, &mut |r, bytes| {
            if verify && bad.is_none() {
                let slot = layer.disk_slot[loads[r].0 as usize] as usize;
                bad = image.check_bundle(l, slot, bytes).err();
            }
            let at = loads[r].1 as u64 * stride as u64;
            ctx.queue.write_buffer(slots, at, bytes);
        })
        .map_err(|e| ReadError::new(format!("layer {l}'s pinned neurons"), e))?;
    if let Some(e) = bad {
        return Err(ReadError::new(format!("layer {l}'s pinned neurons"), e).into());
    }
    Ok(read.bytes_read)
}
