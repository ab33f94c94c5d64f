//! Synthetic neuron activity, for measuring the I/O path on models that have no meaningful
//! activations (random-weight images at the paper's scale, from `convert --synthetic`).
//!
//! Each layer keeps an active set of `density * n` neurons on average. Every token, each
//! active neuron turns off with probability `churn`, and inactive ones turn on at the rate
//! that keeps the density stationary, so a fraction `churn` of each token's set is new: the
//! temporal locality the sliding window exploits (measured on SmolLM2 at 50% sparsity: 2-5%
//! of a layer is new per token). It is a workload, not a model: never use it for quality.

use std::cell::RefCell;

use super::Sparsity;
use crate::rng::Rng;

pub struct SyntheticActivity {
    density: f64,
    churn: f64,
    layers: RefCell<Vec<LayerActivity>>,
}

struct LayerActivity {
    active: Vec<bool>,
    rng: Rng,
}

impl SyntheticActivity {
    /// `density` and `churn` in (0, 1]; `n` neurons in each of `layers` layers.
    pub fn new(layers: usize, n: usize, density: f64, churn: f64, seed: u64) -> Self {
        let density = density.clamp(1e-6, 1.0);
        let layers = (0..layers)
            .map(|l| {
                let mut s = LayerActivity {
                    active: vec![false; n],
                    rng: Rng::new(seed ^ (l as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                };
                for i in 0..n {
                    s.active[i] = s.rng.unit() < density;
                }
                s
            })
            .collect();
        SyntheticActivity {
            density,
            churn: churn.clamp(0.0, 1.0),
            layers: RefCell::new(layers),
        }
    }
}

impl SyntheticActivity {
    /// Active neurons per token, per layer, on average (for the budget planner).
    pub fn expected_active(&self) -> Vec<f64> {
        let layers = self.layers.borrow();
        layers
            .iter()
            .map(|l| self.density * l.active.len() as f64)
            .collect()
    }
}

impl Sparsity for SyntheticActivity {
    fn predict(&self, layer: usize, _h: &[f32], active: &mut Vec<u32>) {
        let mut layers = self.layers.borrow_mut();
        let s = &mut layers[layer];
        let on_rate = if self.density < 1.0 {
            self.churn * self.density / (1.0 - self.density)
        } else {
            1.0
        };
        for i in 0..s.active.len() {
            let r = s.rng.unit();
            let was = s.active[i];
            let now = if was { r >= self.churn } else { r < on_rate };
            s.active[i] = now;
            if now {
                active.push(i as u32);
            }
        }
    }

    /// Every neuron passes the oracle: synthetic weights have no activations worth keeping.
    fn threshold(&self, _layer: usize) -> f32 {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_density_and_churn() {
        let (n, tokens) = (20_000, 20);
        let s = SyntheticActivity::new(1, n, 0.1, 0.2, 3);
        let mut prev: Vec<u32> = Vec::new();
        s.predict(0, &[], &mut prev);
        for _ in 0..tokens {
            let mut cur = Vec::new();
            s.predict(0, &[], &mut cur);
            let density = cur.len() as f64 / n as f64;
            assert!((density - 0.1).abs() < 0.01, "density {density}");
            let kept = cur.iter().filter(|i| prev.binary_search(i).is_ok()).count();
            let new = 1.0 - kept as f64 / cur.len() as f64;
            assert!((new - 0.2).abs() < 0.03, "new fraction {new}");
            prev = cur;
        }
    }
}
