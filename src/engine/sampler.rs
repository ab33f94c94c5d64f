//! Choosing the next token from logits: greedy, or temperature with top-k and top-p.

use crate::rng::Rng;

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Softmax at `temperature`, restricted to the `top_k` most likely tokens (0 = all) and
    /// then to the smallest prefix whose probability reaches `top_p`.
    Random {
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
    },
}

pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Sampler {
        let seed = match &sampling {
            Sampling::Random { seed, .. } => *seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: Rng::new(seed),
        }
    }

    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// Whether every choice is the most likely token (greedy, or a temperature of 0).
    pub fn is_greedy(&self) -> bool {
        match self.sampling {
            Sampling::Greedy => true,
            Sampling::Random { temperature, .. } => temperature <= 0.0,
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let u = self.rng.unit();
        self.distribution(logits).draw(u)
    }

    /// A uniform draw in [0, 1) from this sampler's generator (speculative acceptance).
    pub fn uniform(&mut self) -> f64 {
        self.rng.unit()
    }

    /// The distribution [`Sampler::sample`] draws from: the most likely token alone when
    /// greedy, else the softmax at the temperature cut to top-k and then top-p.
    pub fn distribution(&self, logits: &[f32]) -> Dist {
        match self.sampling {
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                ..
            } if temperature > 0.0 => top_p_distribution(logits, temperature, top_k, top_p),
            _ => Dist {
                ids: vec![argmax(logits)],
                probs: vec![1.0],
            },
        }
    }
}

/// A distribution over a few tokens: `probs[i]` is the probability of `ids[i]`, most likely
/// first, summing to 1.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dist {
    pub ids: Vec<u32>,
    pub probs: Vec<f64>,
}

impl Dist {
    /// The probability of `token` (0 outside the kept tokens).
    pub fn prob(&self, token: u32) -> f64 {
        self.ids
            .iter()
            .position(|&t| t == token)
            .map_or(0.0, |i| self.probs[i])
    }

    /// The token at cumulative probability `u` in [0, 1), in the order held.
    pub fn draw(&self, u: f64) -> u32 {
        let mut target = u * self.probs.iter().sum::<f64>();
        for (&id, &p) in self.ids.iter().zip(&self.probs) {
            if target < p {
                return id;
            }
            target -= p;
        }
        *self
            .ids
            .last()
            .expect("a distribution holds at least one token")
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The probability of the most likely token under softmax (a draft's confidence).
pub fn top_probability(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0.0;
    }
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    1.0 / total
}

/// Softmax at `temperature` over the `top_k` most likely tokens (0 = all), cut to the
/// smallest prefix whose probability reaches `top_p`, renormalised.
fn top_p_distribution(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Dist {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if top_k > 0 {
        ids.truncate(top_k);
    }
    let max = logits[ids[0] as usize];
    let mut probs: Vec<f64> = ids
        .iter()
        .map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    let mut acc = 0.0;
    for (n, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= top_p as f64 {
            keep = n + 1;
            break;
        }
    }
    ids.truncate(keep);
    probs.truncate(keep);
    let mass: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= mass);
    Dist { ids, probs }
}

/// Samples with the uniform draw `u` in [0, 1).
#[cfg(test)]
fn sample_top_p(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f64) -> u32 {
    top_p_distribution(logits, temperature, top_k, top_p).draw(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_max() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 2.0, 1.0];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_top_p(&logits, 1.0, 1, 1.0, u), 1);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // Probabilities ~[0.84, 0.11, 0.04]; top_p 0.8 keeps only the first.
        let logits = [3.0, 1.0, 0.0];
        assert_eq!(sample_top_p(&logits, 1.0, 0, 0.8, 0.99), 0);
        // With everything kept, a draw near 1 lands on the least likely token.
        assert_eq!(sample_top_p(&logits, 1.0, 0, 1.0, 0.999), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling::Random {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
        };
        let (mut a, mut b) = (Sampler::new(s.clone()), Sampler::new(s));
        for _ in 0..20 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
    }
}
