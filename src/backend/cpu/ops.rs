//! Elementwise and normalisation ops of a transformer layer, in f32.

use crate::model::config::RopeStyle;
use crate::model::weights::Norm;

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Sum of squares in f64, as ggml does, so the scale is the same to the last bit.
    let sum_sq: f64 = x.iter().map(|v| (v * v) as f64).sum();
    let mean_sq = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// LayerNorm: `out = (x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let scale = 1.0 / (var + eps).sqrt();
    for (i, o) in out.iter_mut().enumerate() {
        *o = (x[i] - mean) * scale * weight[i] + bias.map_or(0.0, |b| b[i]);
    }
}

/// Applies `norm` as LayerNorm when it has a bias (OPT), RMSNorm otherwise (llama family).
pub fn apply_norm(norm: &Norm, x: &[f32], eps: f32, out: &mut [f32]) {
    match &norm.bias {
        Some(b) => layer_norm(x, &norm.weight, Some(b), eps, out),
        None => rms_norm(x, &norm.weight, eps, out),
    }
}

/// The rotation frequencies of one head: `theta^(-2i/head_dim)` for each pair i.
pub fn rope_frequencies(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Rotates each head of `x` (a concatenation of heads of `head_dim`) by position `pos`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, freqs: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &f) in freqs.iter().enumerate() {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = match style {
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax, numerically stable.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `log(softmax(x))[target]`, computed without materialising the softmax.
pub fn log_softmax_at(x: &[f32], target: usize) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    x[target] as f64 - max - sum.ln()
}

pub fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0, -4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] + 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, &[1.0; 4], Some(&[0.5; 4]), 0.0, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6);
        let var: f32 = out.iter().map(|v| (v - 0.5).powi(2)).sum::<f32>() / 4.0;
        assert!((var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rope_styles_pair_different_dims_and_keep_norm() {
        let freqs = rope_frequencies(4, 10000.0);
        let base = [1.0, 2.0, 3.0, 4.0];
        let (mut a, mut h) = (base, base);
        rope(&mut a, 4, 3, &freqs, RopeStyle::Adjacent);
        rope(&mut h, 4, 3, &freqs, RopeStyle::Halves);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&a) - norm(&base)).abs() < 1e-4);
        assert!((norm(&h) - norm(&base)).abs() < 1e-4);
        // Pair 0 rotates by 3 rad: adjacent pairs (x0, x1), halves pairs (x0, x2).
        let (s, c) = 3f32.sin_cos();
        assert!((a[0] - (c - 2.0 * s)).abs() < 1e-5);
        assert!((h[0] - (c - 3.0 * s)).abs() < 1e-5);
        let mut zero = base;
        rope(&mut zero, 4, 0, &freqs, RopeStyle::Adjacent);
        assert_eq!(zero, base);
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let mut x = [1.0, 2.0, 3.0];
        let l = log_softmax_at(&x, 2);
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((l - (x[2] as f64).ln()).abs() < 1e-6);
    }
}
