//! The sparse FFN over row-column bundles: for each active neuron i, one bundle holds
//! `gate_i`, `up_i` (rows) and `down_i` (a column), so
//! `out = sum_i act(gate_i . h) * (up_i . h) * down_i` reads nothing but those bundles.
//!
//! The sum runs over neurons in the order given, split into fixed chunks whose partial sums
//! are added in chunk order, so the result depends only on the neurons and their bytes, not
//! on the thread count or on where the bundles live (window slots, a memory map, or a
//! scratch buffer): the flash path and its in-memory reference agree bit for bit.

use rayon::prelude::*;

use crate::backend::cpu::ops::{geglu_one, silu};
use crate::image::{FlashImage, PartRole};
use crate::model::config::FfnKind;
use crate::quant::DType;
use crate::quant::{self, ActivationBuffer, Activations};

/// Where one weight vector sits inside a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub dtype: DType,
    pub offset: usize,
    pub len: usize,
}

impl Part {
    /// This part of `bundle`.
    pub fn of<'b>(&self, bundle: &'b [u8]) -> &'b [u8] {
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

/// Reusable state of the sparse FFN: the quantised input and the chunk partial sums (and,
/// for batches, every token's quantised input and activations).
pub struct SparseFfn {
    mode: Activations,
    act_gate: ActivationBuffer,
    act_up: ActivationBuffer,
    partials: Vec<Vec<f32>>,
    batch_gate: Vec<ActivationBuffer>,
    batch_up: Vec<ActivationBuffer>,
    /// `acts[i * tokens + t]`: neuron `i`'s activation for token `t`.
    batch_acts: Vec<f32>,
    /// The last single-token call's activations, one per neuron given.
    acts: Vec<f32>,
    /// Tokens of the last `compute_batch`, 0 when the last call was `compute`.
    last_tokens: usize,
}

impl Default for SparseFfn {
    /// In llama.cpp's arithmetic ([`Activations::Q8`]).
    fn default() -> Self {
        Self::new(Activations::default())
    }
}

impl SparseFfn {
    /// Scratch for a sparse FFN that quantises its input in `mode`.
    pub fn new(mode: Activations) -> SparseFfn {
        SparseFfn {
            mode,
            act_gate: ActivationBuffer::new(mode),
            act_up: ActivationBuffer::new(mode),
            partials: Vec::new(),
            batch_gate: Vec::new(),
            batch_up: Vec::new(),
            batch_acts: Vec::new(),
            acts: Vec::new(),
            last_tokens: 0,
        }
    }

    /// The hidden activations of the last call, neuron-major: `acts[i * tokens + t]` for the
    /// `i`-th neuron given and token `t`, with the token count (what a draft's choice of
    /// neurons from a prompt measures).
    pub fn last_activations(&self) -> (&[f32], usize) {
        match self.last_tokens {
            0 => (&self.acts, 1),
            t => (&self.batch_acts, t),
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
        self.acts.clear();
        self.acts.resize(neurons.len(), 0.0);
        self.last_tokens = 0;
        let (act_gate, act_up) = (&self.act_gate, &self.act_up);
        self.partials[..chunks]
            .par_iter_mut()
            .zip(neurons.par_chunks(NEURONS_PER_CHUNK))
            .zip(self.acts.par_chunks_mut(NEURONS_PER_CHUNK))
            .for_each(|((acc, chunk), acts)| {
                acc.clear();
                acc.resize(out.len(), 0.0);
                for (&(id, bundle), slot) in chunk.iter().zip(acts) {
                    let a = activation(parts, bundle, id, act_gate, act_up, up_bias);
                    *slot = a;
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

impl SparseFfn {
    /// [`SparseFfn::compute`] for each row of `hs` (`hidden` values each) into the same row
    /// of `outs`, bit for bit, with each bundle's gate and up rows dotted with four tokens'
    /// inputs at a time while they are in cache ([`quant::vec_dot4`]). The down columns are
    /// then summed token by token, in the same chunks and order as `compute`.
    pub fn compute_batch(
        &mut self,
        parts: &BundleParts,
        hidden: usize,
        hs: &[f32],
        neurons: &[Neuron],
        up_bias: Option<&[f32]>,
        outs: &mut [f32],
    ) {
        let tokens = hs.len() / hidden;
        let mode = self.mode;
        let quantize = |dtype, acts: &mut Vec<ActivationBuffer>| {
            acts.resize_with(tokens, || ActivationBuffer::new(mode));
            acts.par_iter_mut()
                .zip(hs.par_chunks_exact(hidden))
                .for_each(|(a, h)| {
                    a.quantize_for(dtype, h)
                        .expect("part length matches the hidden size (checked at open)")
                });
        };
        if let Some(g) = &parts.gate {
            quantize(g.dtype, &mut self.batch_gate);
        }
        quantize(parts.up.dtype, &mut self.batch_up);
        self.batch_acts.clear();
        self.batch_acts.resize(neurons.len() * tokens, 0.0);
        self.last_tokens = tokens;
        let (gate_acts, up_acts) = (&self.batch_gate, &self.batch_up);
        self.batch_acts
            .par_chunks_mut(tokens)
            .zip(neurons.par_iter())
            .for_each_init(Vec::new, |gate, (a, &(id, bundle))| {
                // `a` first holds the up dots, then the activations.
                dots(parts.up.dtype, parts.up.of(bundle), up_acts, a);
                if let Some(g) = &parts.gate {
                    gate.resize(tokens, 0.0);
                    dots(g.dtype, g.of(bundle), gate_acts, gate);
                }
                for (t, a) in a.iter_mut().enumerate() {
                    let g = parts.gate.map(|_| gate[t]);
                    *a = combine(parts.kind, g, *a, id, up_bias);
                }
            });
        let acts = &self.batch_acts;
        // Four tokens per task: each down column is dequantised once for the four.
        outs.par_chunks_mut(4 * hidden)
            .enumerate()
            .for_each(|(g, out)| {
                let m = out.len() / hidden;
                let mut partial = vec![0.0f32; 4 * hidden];
                out.fill(0.0);
                for (c, chunk) in neurons.chunks(NEURONS_PER_CHUNK).enumerate() {
                    partial.fill(0.0);
                    for (k, &(_, bundle)) in chunk.iter().enumerate() {
                        let at = (c * NEURONS_PER_CHUNK + k) * tokens + 4 * g;
                        let mut a = [0.0f32; 4];
                        a[..m].copy_from_slice(&acts[at..at + m]);
                        if a.iter().any(|&v| v != 0.0) {
                            let mut rows = partial.chunks_exact_mut(hidden);
                            let four = std::array::from_fn(|_| rows.next().expect("4 rows"));
                            quant::axpy4(parts.down.dtype, a, parts.down.of(bundle), four);
                        }
                    }
                    for (o, &v) in out.iter_mut().zip(&partial) {
                        *o += v;
                    }
                }
            });
    }
}

/// `out[t] = row . acts[t]` for every token, four at a time where a kernel takes one row with
/// four activations; each equal to [`quant::vec_dot`] bit for bit.
fn dots(dtype: DType, row: &[u8], acts: &[ActivationBuffer], out: &mut [f32]) {
    let mut groups = acts.chunks_exact(4);
    let mut outs = out.chunks_exact_mut(4);
    for (a, o) in (&mut groups).zip(&mut outs) {
        o.copy_from_slice(&quant::vec_dot4(
            dtype,
            [row; 4],
            [&a[0], &a[1], &a[2], &a[3]],
        ));
    }
    for (a, o) in groups.remainder().iter().zip(outs.into_remainder()) {
        *o = quant::vec_dot(dtype, row, a);
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

/// `silu(gate) * (up + b)`, `gelu(gate) * (up + b)` or `relu(up + b)` from the two dot
/// products.
fn combine(kind: FfnKind, gate: Option<f32>, up: f32, id: u32, up_bias: Option<&[f32]>) -> f32 {
    let mut u = up;
    if let Some(b) = up_bias {
        u += b[id as usize];
    }
    match (kind, gate) {
        (FfnKind::SwiGlu, Some(g)) => silu(g) * u,
        (FfnKind::GeGlu, Some(g)) => geglu_one(g, u),
        _ => u.max(0.0),
    }
}

/// The hidden activations of the given neurons, with `h` quantised in `mode` (the "oracle"
/// active set is computed from these; calibration compares them with thresholds).
pub fn activations(
    parts: &BundleParts,
    mode: Activations,
    h: &[f32],
    neurons: &[Neuron],
    up_bias: Option<&[f32]>,
    out: &mut Vec<f32>,
) {
    let mut act_gate = ActivationBuffer::new(mode);
    let mut act_up = ActivationBuffer::new(mode);
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
        SparseFfn::default().compute(&parts(d, FfnKind::SwiGlu), &h, &neurons, None, &mut out);
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
        SparseFfn::default().compute(&p, &h, &[(0, &b0)], Some(&bias), &mut out);
        assert_eq!(out, [0.0; 4], "relu(2 - 5) = 0");
        SparseFfn::default().compute(&p, &h, &[(1, &b0)], Some(&bias), &mut out);
        assert_eq!(out, [2.0, 2.0, 0.0, 0.0]);
    }

    /// Quantised bundles `[gate | up | down]` of `d` values each, from a seeded sine.
    fn quantised(
        n: usize,
        d: usize,
        rows: DType,
        down: DType,
        seed: f32,
    ) -> (Vec<Vec<u8>>, BundleParts) {
        let vec = |i: usize, k: usize| -> Vec<f32> {
            (0..d)
                .map(|j| ((i * 3 + k) as f32 * seed + j as f32 * 0.7).sin())
                .collect()
        };
        let q = |dtype, x: &[f32]| {
            let mut b = Vec::new();
            if quant::quantize(dtype, x, &mut b).is_err() {
                b = k_quant_blocks(dtype, x);
            }
            b
        };
        let bundles: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                [
                    q(rows, &vec(i, 0)),
                    q(rows, &vec(i, 1)),
                    q(down, &vec(i, 2)),
                ]
                .concat()
            })
            .collect();
        let (rb, db) = (rows.bytes_for(d).unwrap(), down.bytes_for(d).unwrap());
        let part = |dtype, offset, len| Part { dtype, offset, len };
        let parts = BundleParts {
            kind: FfnKind::SwiGlu,
            gate: Some(part(rows, 0, rb)),
            up: part(rows, rb, rb),
            down: part(down, 2 * rb, db),
        };
        (bundles, parts)
    }

    /// K-quant blocks (which this crate only reads) with bytes drawn from `x` and finite,
    /// small f16 scales: Q4_K and Q5_K start `[d | dmin | ...]`, Q2_K ends `[... | d | dmin]`,
    /// Q3_K and Q6_K end `[... | d]`.
    fn k_quant_blocks(dtype: DType, x: &[f32]) -> Vec<u8> {
        let n = dtype.bytes_for(x.len()).expect("whole blocks");
        let mut b: Vec<u8> = (0..n)
            .map(|i| (x[i % x.len()].to_bits() >> 7) as u8 ^ i as u8)
            .collect();
        let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
        for block in b.chunks_exact_mut(dtype.block_bytes()) {
            match dtype {
                DType::Q4K | DType::Q5K => {
                    block[0..2].copy_from_slice(&f16(0.01));
                    block[2..4].copy_from_slice(&f16(0.002));
                }
                DType::Q2K => {
                    block[80..82].copy_from_slice(&f16(0.01));
                    block[82..84].copy_from_slice(&f16(0.002));
                }
                DType::Q3K | DType::Q6K => {
                    let end = block.len();
                    block[end - 2..].copy_from_slice(&f16(0.003));
                }
                other => panic!("{other} is quantised by the crate"),
            }
        }
        b
    }

    #[test]
    fn a_batch_computes_each_token_exactly_as_alone() {
        let d = 256;
        for (rows, down) in [
            (DType::Q4_1, DType::Q8_0),
            (DType::Q5_0, DType::Q8_0),
            (DType::Q5_1, DType::Q8_0),
            (DType::Q4K, DType::Q8_0),
            (DType::Q2K, DType::Q8_0),
            (DType::Q3K, DType::Q8_0),
            (DType::Q5K, DType::Q8_0),
            (DType::Q6K, DType::F16),
            (DType::F32, DType::F32),
        ] {
            let (bundles, parts) = quantised(100, d, rows, down, 0.37);
            // Every other neuron, so chunks hold ids that are not consecutive.
            let neurons: Vec<Neuron> = (0..100)
                .step_by(2)
                .map(|i| (i as u32, bundles[i].as_slice()))
                .collect();
            for tokens in [1, 4, 7] {
                let hs: Vec<f32> = (0..tokens * d).map(|j| (j as f32 * 0.013).cos()).collect();
                let mut ffn = SparseFfn::default();
                let mut batch = vec![0.0; tokens * d];
                ffn.compute_batch(&parts, d, &hs, &neurons, None, &mut batch);
                assert!(batch.iter().all(|v| v.is_finite()) && batch.iter().any(|&v| v != 0.0));
                for t in 0..tokens {
                    let mut alone = vec![0.0; d];
                    ffn.compute(&parts, &hs[t * d..(t + 1) * d], &neurons, None, &mut alone);
                    assert!(
                        alone == batch[t * d..(t + 1) * d],
                        "{rows}/{down}, {tokens} tokens: token {t} differs"
                    );
                }
            }
        }
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
                SparseFfn::default().compute(
                    &parts(d, FfnKind::SwiGlu),
                    &h,
                    &neurons,
                    None,
                    &mut out,
                )
            });
            out
        };
        assert_eq!(run(1), run(3));
    }
}
