//! The sparse FFN over row-column bundles: for each active neuron i, one bundle holds
//! `gate_i`, `up_i` (rows) and `down_i` (a column), so
//! `out = sum_i act(gate_i . h) * (up_i . h) * down_i` reads nothing but those bundles.
//!
//! The sum runs over neurons in the order given, split into fixed chunks whose partial sums
//! are added in chunk order, so the result depends only on the neurons and their bytes, not
//! on the thread count or on where the bundles live (window slots, a memory map, or a
//! scratch buffer): the flash path and its in-memory reference agree bit for bit.

use rayon::prelude::*;

use crate::backend::cpu::ops::silu;
use crate::backend::cpu::quant::{self, ActivationBuffer};
use crate::image::{FlashImage, PartRole};
use crate::model::config::FfnKind;
use crate::model::tensor::DType;

/// Where one weight vector sits inside a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub dtype: DType,
    pub offset: usize,
    pub len: usize,
}

impl Part {
    fn of<'b>(&self, bundle: &'b [u8]) -> &'b [u8] {
        &bundle[self.offset..self.offset + self.len]
    }
}

/// The layout of a bundle: `[gate | up | down]` (SwiGLU) or `[up | down]` (ReLU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundleParts {
    pub kind: FfnKind,
    pub gate: Option<Part>,
    pub up: Part,
    pub down: Part,
}

impl BundleParts {
    /// The parts of `image`'s bundles. Errs with a message naming the missing part (an image
    /// without up or down parts is malformed).
    pub fn of_image(image: &FlashImage, kind: FfnKind) -> Result<BundleParts, String> {
        let layout = image.bundle();
        let part = |role: PartRole| {
            layout.part(role).map(|p| Part {
                dtype: p.dtype,
                offset: p.offset,
                len: p.len,
            })
        };
        let missing = |what: &str| format!("the image's bundles have no {what} part");
        Ok(BundleParts {
            kind,
            gate: part(PartRole::Gate),
            up: part(PartRole::Up).ok_or_else(|| missing("up"))?,
            down: part(PartRole::Down).ok_or_else(|| missing("down"))?,
        })
    }
}

/// Neurons per task: a chunk's partial sum is one `d`-vector, so chunks must be large enough
/// that adding the partials costs little next to the chunk's dot products.
const NEURONS_PER_CHUNK: usize = 32;

/// One active neuron: its id (for the per-neuron bias) and its bundle's bytes.
pub type Neuron<'b> = (u32, &'b [u8]);

/// Reusable state of the sparse FFN: the quantised input and the chunk partial sums.
pub struct SparseFfn {
    act_gate: ActivationBuffer,
    act_up: ActivationBuffer,
    partials: Vec<Vec<f32>>,
}

impl Default for SparseFfn {
    fn default() -> Self {
        Self::new()
    }
}

impl SparseFfn {
    pub fn new() -> SparseFfn {
        SparseFfn {
            act_gate: ActivationBuffer::new(),
            act_up: ActivationBuffer::new(),
            partials: Vec::new(),
        }
    }

    /// `out = sum over neurons of a_i * down_i` (plus nothing else: the caller adds the down
    /// bias). `up_bias` is indexed by neuron id (ReLU models).
    pub fn compute(
        &mut self,
        parts: &BundleParts,
        h: &[f32],
        neurons: &[Neuron],
        up_bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        if let Some(g) = &parts.gate {
            self.act_gate
                .quantize_for(g.dtype, h)
                .expect("gate part length matches the hidden size (checked at open)");
        }
        self.act_up
            .quantize_for(parts.up.dtype, h)
            .expect("up part length matches the hidden size (checked at open)");
        let chunks = neurons.len().div_ceil(NEURONS_PER_CHUNK);
        if self.partials.len() < chunks {
            self.partials.resize_with(chunks, Vec::new);
        }
        let (act_gate, act_up) = (&self.act_gate, &self.act_up);
        self.partials[..chunks]
            .par_iter_mut()
            .zip(neurons.par_chunks(NEURONS_PER_CHUNK))
            .for_each(|(acc, chunk)| {
                acc.clear();
                acc.resize(out.len(), 0.0);
                for &(id, bundle) in chunk {
                    let a = activation(parts, bundle, id, act_gate, act_up, up_bias);
                    if a != 0.0 {
                        quant::axpy(parts.down.dtype, a, parts.down.of(bundle), acc);
                    }
                }
            });
        out.fill(0.0);
        for p in &self.partials[..chunks] {
            for (o, &v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
    }
}

/// The neuron's hidden activation `a_i`.
fn activation(
    parts: &BundleParts,
    bundle: &[u8],
    id: u32,
    act_gate: &ActivationBuffer,
    act_up: &ActivationBuffer,
    up_bias: Option<&[f32]>,
) -> f32 {
    let up = quant::vec_dot(parts.up.dtype, parts.up.of(bundle), act_up);
    let gate = parts
        .gate
        .as_ref()
        .map(|g| quant::vec_dot(g.dtype, g.of(bundle), act_gate));
    combine(parts.kind, gate, up, id, up_bias)
}

/// `silu(gate) * (up + b)` or `relu(up + b)` from the two dot products.
fn combine(kind: FfnKind, gate: Option<f32>, up: f32, id: u32, up_bias: Option<&[f32]>) -> f32 {
    let mut u = up;
    if let Some(b) = up_bias {
        u += b[id as usize];
    }
    match (kind, gate) {
        (FfnKind::SwiGlu, Some(g)) => silu(g) * u,
        _ => u.max(0.0),
    }
}

/// The hidden activations of the given neurons (the "oracle" active set is computed from
/// these; calibration compares them with thresholds).
pub fn activations(
    parts: &BundleParts,
    h: &[f32],
    neurons: &[Neuron],
    up_bias: Option<&[f32]>,
    out: &mut Vec<f32>,
) {
    let mut act_gate = ActivationBuffer::new();
    let mut act_up = ActivationBuffer::new();
    if let Some(g) = &parts.gate {
        act_gate.quantize_for(g.dtype, h).expect("gate part length");
    }
    act_up
        .quantize_for(parts.up.dtype, h)
        .expect("up part length");
    out.clear();
    out.resize(neurons.len(), 0.0);
    let (act_gate, act_up) = (&act_gate, &act_up);
    out.par_chunks_mut(NEURONS_PER_CHUNK)
        .zip(neurons.par_chunks(NEURONS_PER_CHUNK))
        .for_each(|(o, chunk)| {
            for (a, &(id, b)) in o.iter_mut().zip(chunk) {
                *a = activation(parts, b, id, act_gate, act_up, up_bias);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bundles of F32 parts: gate = [g, 0...], up = [u, 0...], down = column.
    fn bundle(g: f32, u: f32, down: &[f32]) -> Vec<u8> {
        let d = down.len();
        let mut v = vec![0f32; 3 * d];
        v[0] = g;
        v[d] = u;
        v[2 * d..].copy_from_slice(down);
        bytemuck::cast_slice(&v).to_vec()
    }

    fn parts(d: usize, kind: FfnKind) -> BundleParts {
        let p = |i: usize| Part {
            dtype: DType::F32,
            offset: i * 4 * d,
            len: 4 * d,
        };
        BundleParts {
            kind,
            gate: Some(p(0)),
            up: p(1),
            down: p(2),
        }
    }

    #[test]
    fn sums_swiglu_neurons() {
        let d = 4;
        let b0 = bundle(1.0, 2.0, &[1.0, 0.0, 0.0, 0.0]);
        let b1 = bundle(-1.0, 3.0, &[0.0, 1.0, 0.0, 0.0]);
        let h = [1.0, 0.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        let neurons = [(0u32, b0.as_slice()), (1u32, b1.as_slice())];
        SparseFfn::new().compute(&parts(d, FfnKind::SwiGlu), &h, &neurons, None, &mut out);
        assert!((out[0] - silu(1.0) * 2.0).abs() < 1e-6);
        assert!((out[1] - silu(-1.0) * 3.0).abs() < 1e-6);
    }

    #[test]
    fn relu_with_bias() {
        let d = 4;
        let mut p = parts(d, FfnKind::Relu);
        p.gate = None;
        let b0 = bundle(0.0, 2.0, &[1.0, 1.0, 0.0, 0.0]);
        let h = [1.0, 0.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        let bias = [-5.0f32, 0.0];
        SparseFfn::new().compute(&p, &h, &[(0, &b0)], Some(&bias), &mut out);
        assert_eq!(out, [0.0; 4], "relu(2 - 5) = 0");
        SparseFfn::new().compute(&p, &h, &[(1, &b0)], Some(&bias), &mut out);
        assert_eq!(out, [2.0, 2.0, 0.0, 0.0]);
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let d = 8;
        let bundles: Vec<Vec<u8>> = (0..200)
            .map(|i| {
                let x = i as f32 * 0.37;
                let down: Vec<f32> = (0..d).map(|j| (x + j as f32).sin()).collect();
                bundle(x.cos(), x.sin(), &down)
            })
            .collect();
        let neurons: Vec<Neuron> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, b.as_slice()))
            .collect();
        let h = [0.5, -1.0, 0.25, 0.0, 1.0, 2.0, -0.5, 0.1];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0; d];
            pool.install(|| {
                SparseFfn::new().compute(&parts(d, FfnKind::SwiGlu), &h, &neurons, None, &mut out)
            });
            out
        };
        assert_eq!(run(1), run(3));
    }
}
