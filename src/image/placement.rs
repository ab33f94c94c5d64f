//! Where each model neuron's bundle lies in a flash image, and the reads that bring a set of
//! bundles into memory. The one planner of both flash paths (the CPU's `FlashFfn` and the
//! GPU's `GpuFlashDecoder`): window loads, overflow, pins and draft copies are all planned
//! here, so their offsets, their order on disk and the permutation they go through cannot
//! drift apart.

use super::FlashImage;

/// One layer's bundles on disk: the inverse of the section's permutation (model neuron ->
/// disk slot) and the section's place in the file.
#[derive(Clone, Debug)]
pub struct Placement {
    section: u64,
    stride: usize,
    disk_slot: Vec<u32>,
}

impl Placement {
    /// Layer `layer`'s placement. The image checked at open that its permutation holds each
    /// of `0..n_neurons` once, so every neuron has a slot.
    pub fn of(image: &FlashImage, layer: usize) -> Placement {
        let section = image.ffn_section(layer);
        let mut disk_slot: Vec<u32> = (0..section.n_neurons as u32).collect();
        if let Some(perm) = &section.permutation {
            for (slot, &neuron) in perm.iter().enumerate() {
                disk_slot[neuron as usize] = slot as u32;
            }
        }
        Placement {
            section: section.offset,
            stride: image.bundle().stride,
            disk_slot,
        }
    }

    pub fn n_neurons(&self) -> usize {
        self.disk_slot.len()
    }

    /// The disk slot of model neuron `neuron`'s bundle.
    pub fn disk_slot(&self, neuron: u32) -> usize {
        self.disk_slot[neuron as usize] as usize
    }

    /// The file offset of model neuron `neuron`'s bundle (`FlashImage::bundle_offset` of its
    /// slot).
    pub fn offset(&self, neuron: u32) -> u64 {
        self.section + self.disk_slot(neuron) as u64 * self.stride as u64
    }

    /// The reads that bring `neurons`' bundles into memory: `pieces` of each (byte ranges
    /// within a bundle: `[(0, stride)]` for whole bundles, or each part on its own when
    /// bundling is off), in file order, so that the read pool can coalesce neighbours.
    pub fn reads(&self, neurons: &[u32], pieces: &[(usize, usize)]) -> Reads {
        let mut order: Vec<u32> = (0..neurons.len() as u32).collect();
        order.sort_unstable_by_key(|&k| self.offset(neurons[k as usize]));
        let ranges = order
            .iter()
            .flat_map(|&k| {
                let base = self.offset(neurons[k as usize]);
                pieces.iter().map(move |&(at, len)| (base + at as u64, len))
            })
            .collect();
        Reads {
            ranges,
            order,
            pieces: pieces.len().max(1),
        }
    }
}

/// Byte ranges in file order, and for each which bundle (and which piece of it) it fills.
#[derive(Clone, Debug, Default)]
pub struct Reads {
    /// `(file offset, length)`, ascending.
    pub ranges: Vec<(u64, usize)>,
    order: Vec<u32>,
    pieces: usize,
}

impl Reads {
    /// Range `r` fills piece `.1` of the bundle of `neurons[.0]` (the slice given to
    /// [`Placement::reads`]).
    pub fn target(&self, r: usize) -> (usize, usize) {
        (self.order[r / self.pieces] as usize, r % self.pieces)
    }
}
