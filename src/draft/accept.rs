//! Which drafted tokens the target keeps.
//!
//! Greedy: the longest prefix equal to the target's own argmax at each position, then the
//! target's argmax after it, so the output is exactly plain greedy decoding's.
//!
//! Sampled: the speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023). Drafted
//! token `x` drawn from the draft's `q` is kept with probability `min(1, p(x) / q(x))`, where
//! `p` is the distribution the plain sampler would draw from at that position; at the first
//! rejection the token is drawn from the residual `max(0, p - q)`, renormalised; when every
//! draft is kept, one more token comes from the last position's `p`. Each emitted token is
//! then distributed as plain sampling's. A draft proposed with certainty (an n-gram lookup, a
//! greedy draft) is the point mass `q(x) = 1`.

use std::collections::HashMap;

use crate::engine::sampler::{argmax, Dist, Sampler};

use super::Proposal;

/// The outcome of one verify pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Drafted tokens kept, a prefix of the proposal.
    pub kept: usize,
    /// The token after them, chosen from the target's logits.
    pub next: u32,
}

/// Accepts a prefix of `proposal` given the target's logits `rows` (`proposal.len() + 1` rows
/// of `vocab`: row `i` is the target's prediction for draft token `i`, the last one for what
/// follows them all).
pub fn accept(rows: &[f32], vocab: usize, proposal: &Proposal, sampler: &mut Sampler) -> Accepted {
    let row = |i: usize| &rows[i * vocab..(i + 1) * vocab];
    if sampler.is_greedy() {
        for (i, &x) in proposal.tokens.iter().enumerate() {
            let t = argmax(row(i));
            if t != x {
                return Accepted { kept: i, next: t };
            }
        }
        let k = proposal.len();
        return Accepted {
            kept: k,
            next: argmax(row(k)),
        };
    }
    for (i, &x) in proposal.tokens.iter().enumerate() {
        let p = sampler.distribution(row(i));
        let q = proposal.dists.get(i);
        let qx = q.map_or(1.0, |q| q.prob(x));
        let px = p.prob(x);
        if qx > 0.0 && sampler.uniform() * qx < px {
            continue;
        }
        let next = residual(&p, q, x).draw(sampler.uniform());
        return Accepted { kept: i, next };
    }
    let k = proposal.len();
    Accepted {
        kept: k,
        next: sampler.sample(row(k)),
    }
}

/// `max(0, p - q)` renormalised; `q = None` is the point mass on `x`. Where the residual has
/// no mass (`p <= q` everywhere, so a rejection had probability 0), `p` itself.
fn residual(p: &Dist, q: Option<&Dist>, x: u32) -> Dist {
    // q by token, so that a distribution over the whole vocabulary (top-k 0) costs one pass,
    // not one search of q per token of p.
    let q: HashMap<u32, f64> = match q {
        Some(q) => q.ids.iter().copied().zip(q.probs.iter().copied()).collect(),
        None => HashMap::from([(x, 1.0)]),
    };
    let mut r = Dist::default();
    for (&id, &pi) in p.ids.iter().zip(&p.probs) {
        let qi = q.get(&id).copied().unwrap_or(0.0);
        if pi > qi {
            r.ids.push(id);
            r.probs.push(pi - qi);
        }
    }
    let mass: f64 = r.probs.iter().sum();
    if r.ids.is_empty() || mass <= 0.0 {
        return p.clone();
    }
    r.probs.iter_mut().for_each(|v| *v /= mass);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::Sampling;

    fn sampler(seed: u64) -> Sampler {
        Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed,
        })
    }

    /// Target logits over 4 tokens (one position, then the bonus position).
    fn target() -> Vec<f32> {
        let p: [f32; 4] = [0.1, 0.2, 0.3, 0.4];
        let row: Vec<f32> = p.iter().map(|v| v.ln()).collect();
        [row.clone(), row].concat()
    }

    /// Chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// The first emitted token, over many seeded draws, with the draft drawn from `q`.
    fn first_token_counts(q: &[f64], draws: u64) -> Vec<u64> {
        let rows = target();
        let mut counts = vec![0u64; 4];
        let qd = Dist {
            ids: vec![0, 1, 2, 3],
            probs: q.to_vec(),
        };
        for seed in 0..draws {
            let mut s = sampler(seed);
            let x = qd.draw(s.uniform());
            let proposal = Proposal {
                tokens: vec![x],
                dists: vec![qd.clone()],
            };
            let a = accept(&rows, 4, &proposal, &mut s);
            let first = if a.kept == 1 { x } else { a.next };
            counts[first as usize] += 1;
        }
        counts
    }

    // 3 degrees of freedom: chi-square above 16.27 has probability 0.001 when the counts do
    // follow the target.
    const CHI2_3DOF_999: f64 = 16.27;

    #[test]
    fn speculative_sampling_keeps_the_target_distribution() {
        let p = [0.1, 0.2, 0.3, 0.4];
        for q in [[0.7, 0.1, 0.1, 0.1], [0.25; 4], [0.0, 0.0, 0.5, 0.5]] {
            let counts = first_token_counts(&q, 40_000);
            let chi = chi_square(&counts, &p);
            assert!(
                chi < CHI2_3DOF_999,
                "q {q:?}: counts {counts:?}, chi2 {chi}"
            );
        }
    }

    #[test]
    fn a_broken_rule_fails_the_same_test() {
        // Accepting every draft gives q's distribution, not p's: the test above must see it.
        let q = [0.7, 0.1, 0.1, 0.1];
        let qd = Dist {
            ids: vec![0, 1, 2, 3],
            probs: q.to_vec(),
        };
        let mut counts = vec![0u64; 4];
        for seed in 0..40_000u64 {
            let mut s = sampler(seed);
            counts[qd.draw(s.uniform()) as usize] += 1;
        }
        assert!(chi_square(&counts, &[0.1, 0.2, 0.3, 0.4]) > CHI2_3DOF_999);
    }

    #[test]
    fn point_mass_drafts_keep_the_target_distribution() {
        // An n-gram draft always proposes token 0: kept with p(0), else drawn from p without 0.
        let rows = target();
        let mut counts = vec![0u64; 4];
        for seed in 0..40_000u64 {
            let mut s = sampler(seed);
            let proposal = Proposal {
                tokens: vec![0],
                dists: vec![],
            };
            let a = accept(&rows, 4, &proposal, &mut s);
            counts[if a.kept == 1 { 0 } else { a.next } as usize] += 1;
        }
        let chi = chi_square(&counts, &[0.1, 0.2, 0.3, 0.4]);
        assert!(chi < CHI2_3DOF_999, "counts {counts:?}, chi2 {chi}");
    }

    #[test]
    fn greedy_keeps_the_agreeing_prefix() {
        // Rows' argmaxes: 2, 1, 3.
        let rows = [
            0.0, 0.0, 9.0, 0.0, //
            0.0, 9.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 9.0,
        ];
        let mut s = Sampler::new(Sampling::Greedy);
        let all = Proposal {
            tokens: vec![2, 1],
            dists: vec![],
        };
        assert_eq!(
            accept(&rows, 4, &all, &mut s),
            Accepted { kept: 2, next: 3 }
        );
        let wrong = Proposal {
            tokens: vec![2, 0],
            dists: vec![],
        };
        assert_eq!(
            accept(&rows, 4, &wrong, &mut s),
            Accepted { kept: 1, next: 1 }
        );
    }
}
