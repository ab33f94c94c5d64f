//! Per-layer thresholds for a target sparsity, and the labels and frequencies they imply.

use half::f16;

use crate::model::config::FfnKind;

/// The threshold below which `sparsity` of the recorded magnitudes fall (SwiGLU), or the
/// smallest positive value (ReLU: a neuron is active exactly when it is not zero).
pub fn threshold(magnitudes: &[f16], sparsity: f64, kind: FfnKind) -> f32 {
    if kind == FfnKind::Relu || magnitudes.is_empty() {
        return f32::MIN_POSITIVE;
    }
    let mut v: Vec<f32> = magnitudes.iter().map(|m| m.to_f32()).collect();
    let k = ((sparsity.clamp(0.0, 1.0) * v.len() as f64) as usize).min(v.len() - 1);
    let (_, t, _) = v.select_nth_unstable_by(k, f32::total_cmp);
    *t
}

/// 0/1 labels, `|a| >= threshold`, in the magnitudes' layout.
pub fn labels(magnitudes: &[f16], threshold: f32) -> Vec<u8> {
    magnitudes
        .iter()
        .map(|m| (m.to_f32() >= threshold) as u8)
        .collect()
}

/// Per neuron, the fraction of tokens on which it is active.
pub fn frequencies(labels: &[u8], n: usize) -> Vec<f32> {
    let tokens = labels.len() / n;
    let mut counts = vec![0u32; n];
    for row in labels.chunks_exact(n) {
        for (c, &y) in counts.iter_mut().zip(row) {
            *c += y as u32;
        }
    }
    counts
        .iter()
        .map(|&c| c as f32 / tokens.max(1) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mags(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn threshold_splits_at_the_quantile() {
        let m = mags(&(0..100).map(|i| i as f32).collect::<Vec<_>>());
        let t = threshold(&m, 0.3, FfnKind::SwiGlu);
        assert_eq!(t, 30.0);
        let active = labels(&m, t).iter().filter(|&&y| y == 1).count();
        assert_eq!(active, 70);
    }

    #[test]
    fn relu_keeps_exactly_the_nonzeros() {
        let m = mags(&[0.0, 0.5, 0.0, 2.0]);
        let t = threshold(&m, 0.9, FfnKind::Relu);
        assert_eq!(labels(&m, t), vec![0, 1, 0, 1]);
    }

    #[test]
    fn frequencies_count_per_neuron() {
        // Two tokens, three neurons.
        let f = frequencies(&[1, 0, 1, 1, 0, 0], 3);
        assert_eq!(f, vec![1.0, 0.0, 0.5]);
    }
}
