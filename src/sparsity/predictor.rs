//! The per-layer low-rank predictor: from the FFN input `h`, guess which neurons will be
//! active before any of their weights are read (the paper's section 3.1).
//!
//! `z = B (A h) + c`, with `A` (rank x d) and `B` (n x rank); neuron i is predicted active
//! when `z_i >= tau`. Fitting starts from a truncated range of the gate projection (the up
//! projection for ReLU models), whose product with `h` is the pre-activation the neuron's
//! fate depends on, then minimises a class-balanced binary cross-entropy against the true
//! active sets, as the paper does. `tau` is then set on held-out tokens for a recall target:
//! a missed neuron costs quality, an extra one only a read.

use half::f16;

use super::linalg::{axpy, matmul_nn, matmul_nt, matmul_tn_acc, orthonormalize_columns};
use crate::backend::cpu::ops::silu;
use crate::quant::{dot_f16, use_simd};
use crate::rng::Rng;

/// Ranks above this are refused (the predictor's scratch lives on the stack).
pub const MAX_RANK: usize = 1024;

/// A fitted predictor, stored as f16 (it is resident at run time; halving it matters under a
/// tight budget and costs nothing measurable in recall).
#[derive(Clone, Debug)]
pub struct Predictor {
    pub form: Form,
    pub rank: usize,
    pub d: usize,
    pub n: usize,
    /// `A`, rank rows of d, f16 little-endian.
    a: Vec<u8>,
    /// `B`, `heads * n` rows of rank, f16 little-endian.
    b: Vec<u8>,
    bias: Vec<f32>,
    /// Decision threshold on `z`.
    pub tau: f32,
}

/// What the predictor's score is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// `z = B A h + c`, one logit per neuron, fitted by class-balanced BCE: the paper's
    /// predictor, exact in kind for ReLU models (activity is the sign of a linear form).
    Linear,
    /// Two low-rank heads estimate the gate and up pre-activations, `g ~ B_g A h`,
    /// `u ~ B_u A h`, and the score is the estimated contribution `|silu(g) u|`. For SwiGLU
    /// a linear score cannot work: `|silu(g) u|` is large for `u` of either sign.
    Product,
    /// `z = B relu(A h) + c`: the linear form with a ReLU between its factors (a Deja Vu-style
    /// two-layer MLP of hidden width `rank`, at the linear form's size), fitted the same way.
    /// The rectified features can express magnitudes such as `|w . h|`, which no linear score
    /// can.
    Mlp,
}

impl Form {
    /// Score rows per neuron in `B` (and biases): one, or two for the product form.
    pub fn heads(self) -> usize {
        match self {
            Form::Linear | Form::Mlp => 1,
            Form::Product => 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    #[error("predictor blob is {found} bytes, expected {expected} for rank {rank}, d {d}, n {n}; the image's calibration is damaged: run `llmflash calibrate` again")]
    Size {
        found: usize,
        expected: usize,
        rank: usize,
        d: usize,
        n: usize,
    },
    #[error("predictor rank {0} is outside 1..={MAX_RANK}")]
    Rank(usize),
}

impl Predictor {
    /// Bytes of a stored (and resident) predictor of this shape.
    pub fn blob_len(form: Form, rank: usize, d: usize, n: usize) -> usize {
        let rows = form.heads() * n;
        2 * rank * d + 2 * rows * rank + 4 * rows
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.a.len() + self.b.len() + 4 * self.bias.len()
    }

    /// Serialises as `A | B | bias` (f16, f16, f32; little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes());
        out.extend_from_slice(&self.a);
        out.extend_from_slice(&self.b);
        self.bias
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out
    }

    pub fn from_bytes(
        bytes: &[u8],
        form: Form,
        rank: usize,
        d: usize,
        n: usize,
        tau: f32,
    ) -> Result<Predictor, PredictorError> {
        if rank == 0 || rank > MAX_RANK {
            return Err(PredictorError::Rank(rank));
        }
        let expected = Self::blob_len(form, rank, d, n);
        if bytes.len() != expected {
            return Err(PredictorError::Size {
                found: bytes.len(),
                expected,
                rank,
                d,
                n,
            });
        }
        let (a, rest) = bytes.split_at(2 * rank * d);
        let (b, bias) = rest.split_at(2 * form.heads() * n * rank);
        Ok(Predictor {
            form,
            rank,
            d,
            n,
            a: a.to_vec(),
            b: b.to_vec(),
            bias: bias
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            tau,
        })
    }

    /// The scores `z` for input `h` into `z` (length n).
    pub fn scores(&self, h: &[f32], z: &mut [f32]) {
        let (u, simd) = (self.project(h), use_simd());
        for (i, zi) in z.iter_mut().enumerate() {
            *zi = self.score(i, &u[..self.rank], simd);
        }
    }

    /// Appends the neurons predicted active for `h` to `active`. Runs per layer per token:
    /// no allocation, one score at a time.
    pub fn predict(&self, h: &[f32], active: &mut Vec<u32>) {
        let (u, simd) = (self.project(h), use_simd());
        let u = &u[..self.rank];
        active.extend((0..self.n as u32).filter(|&i| self.score(i as usize, u, simd) >= self.tau));
    }

    /// `A h` (the first `rank` values).
    fn project(&self, h: &[f32]) -> [f32; MAX_RANK] {
        let simd = use_simd();
        let mut u = [0.0f32; MAX_RANK];
        for (j, uj) in u[..self.rank].iter_mut().enumerate() {
            *uj = dot_f16(&self.a[2 * j * self.d..2 * (j + 1) * self.d], h, simd);
        }
        if self.form == Form::Mlp {
            u[..self.rank].iter_mut().for_each(|v| *v = v.max(0.0));
        }
        u
    }

    /// Neuron `i`'s score from the projection `u`.
    fn score(&self, i: usize, u: &[f32], simd: bool) -> f32 {
        let row = 2 * self.rank;
        let head = |r: usize| dot_f16(&self.b[r * row..(r + 1) * row], u, simd) + self.bias[r];
        match self.form {
            Form::Linear | Form::Mlp => head(i),
            Form::Product => (silu(head(i)) * head(self.n + i)).abs(),
        }
    }
}

/// Training settings.
#[derive(Clone, Debug)]
pub struct FitOptions {
    pub rank: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub seed: u64,
    /// Weight each positive by its magnitude over the threshold (capped), so that missing a
    /// large contribution costs more than missing one at the threshold.
    pub magnitude_weighted: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            rank: 64,
            epochs: 8,
            batch: 256,
            learning_rate: 2e-3,
            seed: 0x5eed,
            magnitude_weighted: true,
        }
    }
}

/// Training examples of one layer: `inputs` (tokens x d) and 0/1 `labels` (tokens x n).
pub struct Examples<'a> {
    pub inputs: &'a [f32],
    pub labels: &'a [u8],
    /// `|a|` per label, and the threshold the labels came from.
    pub magnitudes: &'a [f16],
    pub threshold: f32,
    pub d: usize,
    pub n: usize,
}

impl Examples<'_> {
    pub fn tokens(&self) -> usize {
        self.inputs.len() / self.d
    }
    fn input(&self, t: usize) -> &[f32] {
        &self.inputs[t * self.d..(t + 1) * self.d]
    }
    fn label(&self, t: usize) -> &[u8] {
        &self.labels[t * self.n..(t + 1) * self.n]
    }
    fn magnitude(&self, t: usize) -> &[f16] {
        &self.magnitudes[t * self.n..(t + 1) * self.n]
    }
}

/// The predictor in training: f32, with `B` stored transposed (rank x n) so every product
/// below runs over long contiguous rows.
struct Params {
    form: Form,
    rank: usize,
    d: usize,
    n: usize,
    a: Vec<f32>,
    bt: Vec<f32>,
    c: Vec<f32>,
}

/// Starts from the rank-r range of `w` (n x d, the projection that decides activity):
/// `A = Q^T W`, `B = Q`, with `Q` an orthonormal basis of `W`'s top range found by a
/// randomised range finder with two power iterations. Then `B A h` is `W h` projected.
fn init_from(w: &[f32], d: usize, n: usize, rank: usize, rng: &mut Rng) -> Params {
    let omega: Vec<f32> = (0..d * rank).map(|_| rng.symmetric()).collect();
    let mut q = vec![0.0; n * rank];
    matmul_nn(w, &omega, d, &mut q);
    orthonormalize_columns(&mut q, rank);
    for _ in 0..2 {
        let mut z = vec![0.0; d * rank];
        matmul_tn_acc(w, &q, d, &mut z);
        matmul_nn(w, &z, d, &mut q);
        orthonormalize_columns(&mut q, rank);
    }
    let mut a = vec![0.0; rank * d];
    matmul_tn_acc(&q, w, rank, &mut a);
    let mut bt = vec![0.0; rank * n];
    for i in 0..n {
        for j in 0..rank {
            bt[j * n + i] = q[i * rank + j];
        }
    }
    Params {
        form: Form::Linear,
        rank,
        d,
        n,
        a,
        bt,
        c: vec![0.0; n],
    }
}

impl Params {
    /// `z = Bt^T (A h) + c` for a batch (`relu(A h)` for the MLP form): `u` (bs x rank),
    /// `z` (bs x n).
    fn forward(&self, h: &[f32], u: &mut [f32], z: &mut [f32]) {
        matmul_nt(h, &self.a, self.d, u);
        if self.form == Form::Mlp {
            u.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        matmul_nn(u, &self.bt, self.rank, z);
        for row in z.chunks_exact_mut(self.n) {
            axpy(1.0, &self.c, row);
        }
    }

    fn into_predictor(self) -> Predictor {
        let mut b = vec![0.0; self.n * self.rank];
        for j in 0..self.rank {
            for i in 0..self.n {
                b[i * self.rank + j] = self.bt[j * self.n + i];
            }
        }
        Predictor {
            form: self.form,
            rank: self.rank,
            d: self.d,
            n: self.n,
            a: f16_bytes(&self.a),
            b: f16_bytes(&b),
            bias: self.c,
            tau: 0.0,
        }
    }
}

/// `v` as little-endian f16, the predictors' stored form.
fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect()
}

/// Adam's moment estimates for one parameter tensor.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(len: usize) -> Adam {
        Adam {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    fn step(&mut self, p: &mut [f32], g: &[f32], lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        let (c1, c2) = (1.0 - B1.powi(t), 1.0 - B2.powi(t));
        for i in 0..p.len() {
            self.m[i] = B1 * self.m[i] + (1.0 - B1) * g[i];
            self.v[i] = B2 * self.v[i] + (1.0 - B2) * g[i] * g[i];
            p[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

/// Fits a predictor to `train`, starting from `w` (n x d; see `init_from`). Positives are
/// weighted by negatives/positives so that both classes count equally (the paper's balanced
/// loss); `tau` is left at 0 for [`set_tau`].
pub fn fit(w: &[f32], train: &Examples, opts: &FitOptions) -> Result<Predictor, PredictorError> {
    fit_form(Form::Linear, w, train, opts)
}

/// [`fit`] for the [`Form::Mlp`] predictor: the same start and loss, a ReLU between `A` and
/// `B`. The start keeps the gate range's rectified half; training recovers the rest.
pub fn fit_mlp(
    w: &[f32],
    train: &Examples,
    opts: &FitOptions,
) -> Result<Predictor, PredictorError> {
    fit_form(Form::Mlp, w, train, opts)
}

fn fit_form(
    form: Form,
    w: &[f32],
    train: &Examples,
    opts: &FitOptions,
) -> Result<Predictor, PredictorError> {
    let (d, n) = (train.d, train.n);
    let rank = opts.rank.min(d).min(n);
    if rank == 0 || rank > MAX_RANK {
        return Err(PredictorError::Rank(opts.rank));
    }
    let mut rng = Rng::new(opts.seed);
    let mut p = init_from(w, d, n, rank, &mut rng);
    p.form = form;
    let tokens = train.tokens();
    if tokens == 0 {
        return Ok(p.into_predictor());
    }
    let positives = train.labels.iter().filter(|&&y| y != 0).count().max(1);
    let pos_weight = (train.labels.len() - positives).max(1) as f32 / positives as f32;
    const CAP: f32 = 16.0;
    let importance = |m: f16| (m.to_f32() / train.threshold.max(1e-12)).clamp(1.0, CAP);
    let mean_importance = if opts.magnitude_weighted {
        let total: f64 = train
            .labels
            .iter()
            .zip(train.magnitudes)
            .filter(|(&y, _)| y != 0)
            .map(|(_, &m)| importance(m) as f64)
            .sum();
        (total / positives as f64) as f32
    } else {
        1.0
    };

    let bs = opts.batch.clamp(1, tokens);
    let (mut h, mut u, mut z) = (vec![0.0; bs * d], vec![0.0; bs * rank], vec![0.0; bs * n]);
    let (mut du, mut ga, mut gbt) = (
        vec![0.0; bs * rank],
        vec![0.0; rank * d],
        vec![0.0; rank * n],
    );
    let mut gc = vec![0.0; n];
    let (mut adam_a, mut adam_bt, mut adam_c) =
        (Adam::new(rank * d), Adam::new(rank * n), Adam::new(n));
    let mut order: Vec<usize> = (0..tokens).collect();
    let mut step = 0;
    for _ in 0..opts.epochs {
        for i in (1..tokens).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for batch in order.chunks(bs) {
            let m = batch.len();
            for (k, &t) in batch.iter().enumerate() {
                h[k * d..(k + 1) * d].copy_from_slice(train.input(t));
            }
            p.forward(&h[..m * d], &mut u[..m * rank], &mut z[..m * n]);
            // dL/dz for the weighted BCE, averaged over the batch.
            for (k, &t) in batch.iter().enumerate() {
                let (zr, yr) = (&mut z[k * n..(k + 1) * n], train.label(t));
                let mr = train.magnitude(t);
                for ((zi, &y), &mag) in zr.iter_mut().zip(yr).zip(mr) {
                    let s = 1.0 / (1.0 + (-*zi).exp());
                    *zi = if y == 0 {
                        s
                    } else if opts.magnitude_weighted {
                        pos_weight * importance(mag) / mean_importance * (s - 1.0)
                    } else {
                        pos_weight * (s - 1.0)
                    } / m as f32;
                }
            }
            let dz = &z[..m * n];
            gc.fill(0.0);
            dz.chunks_exact(n).for_each(|row| axpy(1.0, row, &mut gc));
            gbt.fill(0.0);
            matmul_tn_acc(&u[..m * rank], dz, rank, &mut gbt);
            matmul_nt(dz, &p.bt, n, &mut du[..m * rank]);
            if form == Form::Mlp {
                // Through the ReLU: no gradient where the feature was cut to 0.
                for (g, &v) in du[..m * rank].iter_mut().zip(&u[..m * rank]) {
                    if v <= 0.0 {
                        *g = 0.0;
                    }
                }
            }
            ga.fill(0.0);
            matmul_tn_acc(&du[..m * rank], &h[..m * d], rank, &mut ga);
            step += 1;
            adam_a.step(&mut p.a, &ga, opts.learning_rate, step);
            adam_bt.step(&mut p.bt, &gbt, opts.learning_rate, step);
            adam_c.step(&mut p.c, &gc, opts.learning_rate, step);
        }
    }
    Ok(p.into_predictor())
}

/// Fits a [`Form::Product`] predictor by reduced-rank regression: `m` stacks the gate rows
/// over the up rows (2n x d); the rank-r map `Q Q^T m` that best reproduces `m h` over the
/// training inputs (in the least-squares sense) has `Q` spanning the top eigenvectors of
/// `m C m^T`, `C` the inputs' second moment, found by subspace iteration. No labels are
/// needed to fit it; `tau` is then set on held-out labels by [`set_tau`].
pub fn fit_product(
    m: &[f32],
    train: &Examples,
    opts: &FitOptions,
) -> Result<Predictor, PredictorError> {
    let (d, n) = (train.d, train.n);
    let rows = 2 * n;
    let rank = opts.rank.min(d);
    if rank == 0 || rank > MAX_RANK {
        return Err(PredictorError::Rank(opts.rank));
    }
    // C = H^T H / T, so the fit weighs directions by how much the inputs use them.
    let mut c = vec![0.0f32; d * d];
    matmul_tn_acc(train.inputs, train.inputs, d, &mut c);
    let scale = 1.0 / train.tokens().max(1) as f32;
    c.iter_mut().for_each(|v| *v *= scale);

    let mut rng = Rng::new(opts.seed);
    let mut q: Vec<f32> = (0..rows * rank).map(|_| rng.symmetric()).collect();
    orthonormalize_columns(&mut q, rank);
    let (mut x, mut y) = (vec![0.0f32; d * rank], vec![0.0f32; d * rank]);
    for _ in 0..4 {
        x.fill(0.0);
        matmul_tn_acc(m, &q, d, &mut x);
        matmul_nn(&c, &x, d, &mut y);
        matmul_nn(m, &y, d, &mut q);
        orthonormalize_columns(&mut q, rank);
    }
    let mut a = vec![0.0f32; rank * d];
    matmul_tn_acc(&q, m, rank, &mut a);
    Ok(Predictor {
        form: Form::Product,
        rank,
        d,
        n,
        a: f16_bytes(&a),
        b: f16_bytes(&q),
        bias: vec![0.0; rows],
        tau: 0.0,
    })
}

/// How a predictor does on held-out tokens at its `tau`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    /// Of the truly active neurons, the fraction predicted.
    pub recall: f64,
    /// Of the predicted neurons, the fraction truly active.
    pub precision: f64,
    /// Predicted neurons per token, as a fraction of the layer.
    pub predicted_density: f64,
    /// Truly active neurons per token, as a fraction of the layer.
    pub true_density: f64,
    /// Of the truly active neurons' total `|a|`, the fraction predicted.
    #[serde(default)]
    pub mass_recall: f64,
}

/// Sets `p.tau` to the largest value whose recall on `held_out` reaches `recall`, and
/// returns the accuracy there.
pub fn set_tau(p: &mut Predictor, held_out: &Examples, recall: f64) -> Accuracy {
    let mut z = vec![0.0; p.n];
    let mut positive_scores = Vec::new();
    let mut all_scores = Vec::with_capacity(held_out.tokens() * p.n);
    for t in 0..held_out.tokens() {
        p.scores(held_out.input(t), &mut z);
        for (&zi, &y) in z.iter().zip(held_out.label(t)) {
            if y != 0 {
                positive_scores.push(zi);
            }
        }
        all_scores.extend_from_slice(&z);
    }
    if positive_scores.is_empty() {
        p.tau = f32::INFINITY;
        return Accuracy::default();
    }
    positive_scores.sort_unstable_by(f32::total_cmp);
    // Keep at least `recall` of the positives: tau is the score of the first one kept.
    let missed = ((1.0 - recall.clamp(0.0, 1.0)) * positive_scores.len() as f64).floor() as usize;
    p.tau = positive_scores[missed.min(positive_scores.len() - 1)];
    accuracy(&all_scores, held_out, p.tau)
}

/// Per neuron, the fraction of `inputs` (tokens x d) for which `p` predicts it active: what
/// the window will see, so what hot-neuron pinning ranks by.
pub fn predicted_frequencies(p: &Predictor, inputs: &[f32]) -> Vec<f32> {
    let mut counts = vec![0u32; p.n];
    let mut active = Vec::new();
    let tokens = inputs.len() / p.d;
    for h in inputs.chunks_exact(p.d) {
        active.clear();
        p.predict(h, &mut active);
        active.iter().for_each(|&i| counts[i as usize] += 1);
    }
    counts
        .iter()
        .map(|&c| c as f32 / tokens.max(1) as f32)
        .collect()
}

fn accuracy(scores: &[f32], ex: &Examples, tau: f32) -> Accuracy {
    let labels = ex.labels;
    let (mut tp, mut fp, mut pos) = (0u64, 0u64, 0u64);
    let (mut mass, mut mass_kept) = (0.0f64, 0.0f64);
    for ((&z, &y), &m) in scores.iter().zip(labels).zip(ex.magnitudes) {
        let predicted = z >= tau;
        tp += (predicted && y != 0) as u64;
        fp += (predicted && y == 0) as u64;
        pos += (y != 0) as u64;
        if y != 0 {
            mass += m.to_f64();
            mass_kept += if predicted { m.to_f64() } else { 0.0 };
        }
    }
    let total = labels.len().max(1) as f64;
    Accuracy {
        recall: tp as f64 / pos.max(1) as f64,
        precision: tp as f64 / (tp + fp).max(1) as f64,
        predicted_density: (tp + fp) as f64 / total,
        true_density: pos as f64 / total,
        mass_recall: mass_kept / mass.max(1e-30),
    }
}

/// Unweighted BCE of a predictor on some examples.
#[cfg(test)]
fn loss(p: &Predictor, ex: &Examples) -> f64 {
    let mut z = vec![0.0; p.n];
    let mut total = 0.0f64;
    for t in 0..ex.tokens() {
        p.scores(ex.input(t), &mut z);
        for (&zi, &y) in z.iter().zip(ex.label(t)) {
            let s = (1.0 / (1.0 + (-zi as f64).exp())).clamp(1e-7, 1.0 - 1e-7);
            total -= if y != 0 { s.ln() } else { (1.0 - s).ln() };
        }
    }
    total / (ex.tokens() * p.n).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs whose labels follow a rank-1 linear rule: neuron i is active when
    /// `v_i * (w . h) > 0.3`. A rank-2 predictor must learn it almost perfectly.
    /// Recorded tokens: inputs (tokens x d), labels and magnitudes (tokens x n).
    type Recorded = (Vec<f32>, Vec<u8>, Vec<f16>);

    /// Neuron i's contribution is `v_i (w . h)` (`magnitude`: its absolute value), active
    /// above 0.3.
    fn rule(tokens: usize, d: usize, n: usize, magnitude: bool, seed: u64) -> Recorded {
        let mut rng = Rng::new(seed);
        let w: Vec<f32> = (0..d).map(|_| rng.symmetric()).collect();
        let v: Vec<f32> = (0..n).map(|_| rng.symmetric()).collect();
        let mut inputs = Vec::new();
        let (mut labels, mut mags) = (Vec::new(), Vec::new());
        for _ in 0..tokens {
            let h: Vec<f32> = (0..d).map(|_| rng.symmetric()).collect();
            let s: f32 = h.iter().zip(&w).map(|(a, b)| a * b).sum();
            for &vi in &v {
                let a = if magnitude { (vi * s).abs() } else { vi * s };
                labels.push((a > 0.3) as u8);
                mags.push(f16::from_f32(a.max(0.0)));
            }
            inputs.extend(h);
        }
        (inputs, labels, mags)
    }

    /// Tokens `a..b` of `r` as examples.
    fn tokens(r: &Recorded, d: usize, n: usize, a: usize, b: usize) -> Examples<'_> {
        Examples {
            inputs: &r.0[a * d..b * d],
            labels: &r.1[a * n..b * n],
            magnitudes: &r.2[a * n..b * n],
            threshold: 0.3,
            d,
            n,
        }
    }

    /// A start unrelated to the rules: the fit must do the work.
    fn arbitrary_start(n: usize, d: usize) -> Vec<f32> {
        (0..n * d)
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
            .collect()
    }

    /// Neuron i is active when `|v_i (w . h)|` is large, whatever its sign: the shape of a
    /// SwiGLU contribution, which a linear score cannot express (it can only say "large and
    /// positive"). The MLP form's rectified features can: at the same rank and recall it must
    /// predict far fewer inactive neurons.
    #[test]
    fn the_mlp_form_learns_a_magnitude_rule_that_the_linear_form_cannot() {
        let (d, n, tokens, split) = (24, 40, 1500, 1200);
        let r = rule(tokens, d, n, true, 7);
        let ex = |a: usize, b: usize| self::tokens(&r, d, n, a, b);
        let start = arbitrary_start(n, d);
        let opts = FitOptions {
            rank: 4,
            epochs: 40,
            batch: 64,
            learning_rate: 1e-2,
            ..FitOptions::default()
        };
        let mut linear = fit(&start, &ex(0, split), &opts).unwrap();
        let mut mlp = fit_mlp(&start, &ex(0, split), &opts).unwrap();
        assert_eq!(mlp.form, Form::Mlp);
        assert_eq!(
            mlp.bytes(),
            linear.bytes(),
            "the same size as the linear form"
        );
        let lin = set_tau(&mut linear, &ex(split, tokens), 0.95);
        let rect = set_tau(&mut mlp, &ex(split, tokens), 0.95);
        assert!(rect.recall >= 0.95, "{rect:?}");
        assert!(
            rect.precision > lin.precision + 0.15,
            "mlp {rect:?} vs linear {lin:?}"
        );
        // Stored and read back, it predicts the same sets.
        let q = Predictor::from_bytes(&mlp.to_bytes(), Form::Mlp, mlp.rank, d, n, mlp.tau).unwrap();
        let h = &r.0[1300 * d..1301 * d];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        mlp.predict(h, &mut a);
        q.predict(h, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn learns_a_low_rank_rule_and_sets_tau_for_recall() {
        let (d, n) = (24, 40);
        let r = rule(1200, d, n, false, 42);
        let split = 1000;
        let ex = |a: usize, b: usize| self::tokens(&r, d, n, a, b);
        let w = arbitrary_start(n, d);
        let opts = FitOptions {
            rank: 2,
            epochs: 30,
            batch: 64,
            learning_rate: 1e-2,
            ..FitOptions::default()
        };
        let mut p = fit(&w, &ex(0, split), &opts).unwrap();
        let before = loss(
            &fit(
                &w,
                &ex(0, split),
                &FitOptions {
                    epochs: 0,
                    ..opts.clone()
                },
            )
            .unwrap(),
            &ex(split, 1200),
        );
        let after = loss(&p, &ex(split, 1200));
        assert!(after < before * 0.5, "loss {before} -> {after}");
        let acc = set_tau(&mut p, &ex(split, 1200), 0.95);
        assert!(acc.recall >= 0.95, "{acc:?}");
        assert!(acc.precision > 0.8, "{acc:?}");

        // Serialised and read back, it predicts the same sets.
        let q = Predictor::from_bytes(&p.to_bytes(), Form::Linear, p.rank, d, n, p.tau).unwrap();
        let h = &r.0[1100 * d..1101 * d];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        p.predict(h, &mut a);
        q.predict(h, &mut b);
        assert_eq!(a, b);
        assert!(
            Predictor::from_bytes(&p.to_bytes()[1..], Form::Linear, p.rank, d, n, 0.0).is_err()
        );
    }
}
