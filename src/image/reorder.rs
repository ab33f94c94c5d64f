//! Putting a layer's neurons on disk in a chosen order (the image's permutation table).
//!
//! Under a memory budget the window pins the most frequently active neurons and reads the
//! others from flash every time they are needed. When the image stores neurons in model order
//! those others are scattered over the whole section, so their reads either stay small (the
//! SSD is IOPS-bound below ~32 KiB) or are coalesced across pinned bundles that are read again
//! for nothing. Stored hottest first, the pinned set is a prefix of each section and the
//! neurons read from flash form one contiguous tail, read in few large requests.
//!
//! Only the bundle order and the permutation table change: every bundle keeps its bytes, and
//! everything indexed by model neuron (thresholds, predictors, frequencies) stays valid.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::writer::commit_meta;
use super::{crc32, FlashImage, ImageError};
use crate::storage::AtomicOutput;

/// Rewrites the image at `path` so that disk slot `j` of layer `l` holds model neuron
/// `orders[l][j]`. The new image is written to a copy beside it and renamed over it once
/// complete (see [`AtomicOutput::rewrite`]), so an interrupted reorder leaves the original
/// intact (it needs the image's size in free disk space meanwhile). `on_layer` is called after
/// each layer (for progress).
pub fn reorder_neurons(
    path: &Path,
    orders: &[Vec<u32>],
    mut on_layer: impl FnMut(usize),
) -> Result<(), ImageError> {
    let image = FlashImage::open(path)?;
    check_orders(&image, orders)?;
    let mut out = AtomicOutput::rewrite(path)?;
    let tmp = out.tmp_path().to_path_buf();
    let io = |action: &'static str| ImageError::io(&tmp, action);
    let file = out.file_mut();
    let mut meta = image.meta.clone();
    for (layer, order) in orders.iter().enumerate() {
        let (section, checksums) = permuted_section(&image, layer, order)?;
        write_at(file, image.ffn_section(layer).offset, &section).map_err(io("cannot write"))?;
        let s = &mut meta.ffn[layer];
        s.crc32 = crc32(&section);
        s.bundle_crc32c = checksums;
        s.permutation = (!is_identity(order)).then(|| order.clone());
        on_layer(layer);
    }
    let end = file.seek(SeekFrom::End(0)).map_err(io("cannot seek"))?;
    drop(image);
    commit_meta(file, &tmp, end, &meta)?;
    out.commit()?;
    Ok(())
}

/// Each order must list every neuron of its layer exactly once.
fn check_orders(image: &FlashImage, orders: &[Vec<u32>]) -> Result<(), ImageError> {
    let bad = |detail: String| ImageError::Meta {
        path: image.file().to_path_buf(),
        detail: format!("cannot reorder: {detail}"),
    };
    if orders.len() != image.meta.ffn.len() {
        return Err(bad(format!(
            "{} neuron orders for {} layers",
            orders.len(),
            image.meta.ffn.len()
        )));
    }
    for (layer, order) in orders.iter().enumerate() {
        let n = image.ffn_section(layer).n_neurons;
        let mut seen = vec![false; n];
        let ok = order.len() == n
            && order
                .iter()
                .all(|&i| (i as usize) < n && !std::mem::replace(&mut seen[i as usize], true));
        if !ok {
            return Err(bad(format!(
                "the order of layer {layer} is not a permutation of its {n} neurons"
            )));
        }
    }
    Ok(())
}

/// Layer `layer`'s section with model neuron `order[j]` in slot `j`, plus the section's padding.
/// Layer `layer`'s section with its bundles in `order`, and their checksums. Every bundle is
/// checked before it is copied: a damaged image is refused, not given fresh checksums.
fn permuted_section(
    image: &FlashImage,
    layer: usize,
    order: &[u32],
) -> Result<(Vec<u8>, Vec<u32>), ImageError> {
    let old = image.section_bytes(layer);
    let stride = image.bundle().stride;
    let mut slot_of = vec![0usize; order.len()];
    match &image.ffn_section(layer).permutation {
        Some(perm) => perm
            .iter()
            .enumerate()
            .for_each(|(slot, &n)| slot_of[n as usize] = slot),
        None => slot_of.iter_mut().enumerate().for_each(|(i, s)| *s = i),
    }
    let mut out = Vec::with_capacity(old.len());
    let mut checksums = Vec::with_capacity(order.len());
    let recorded = &image.ffn_section(layer).bundle_crc32c;
    for &neuron in order {
        let slot = slot_of[neuron as usize];
        let bundle = &old[slot * stride..(slot + 1) * stride];
        image
            .check_bundle(layer, slot, bundle)
            .map_err(|e| ImageError::Meta {
                path: image.file().to_path_buf(),
                detail: format!("cannot reorder layer {layer}: {e}"),
            })?;
        out.extend_from_slice(bundle);
        checksums.push(recorded[slot]);
    }
    out.extend_from_slice(&old[out.len()..]);
    Ok((out, checksums))
}

fn is_identity(order: &[u32]) -> bool {
    order.iter().enumerate().all(|(j, &n)| j == n as usize)
}

fn write_at(file: &mut File, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}
