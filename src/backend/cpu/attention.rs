//! Causal self-attention of one new token over the KV cache, grouped-query aware: exact
//! softmax over an f32 cache, ggml's flash attention over an f16 one (`attention_f16`).

use rayon::prelude::*;

use crate::backend::cpu::attention_f16::attend_f16;
use crate::backend::cpu::ops::softmax;
use crate::backend::kv_cache::KvLayer;

/// Shape of the attention computation.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Values of one position's keys (or values): every KV head.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Where query head `h`'s KV head starts within a position's keys or values (GQA: each KV
    /// head serves `n_heads / n_kv_heads` query heads).
    pub fn kv_offset(&self, h: usize) -> usize {
        h / (self.n_heads / self.n_kv_heads) * self.head_dim
    }
}

/// `out[h] = softmax(q_h . K_g^T * scale) V_g` over positions `0..n_pos`, where `g` is the KV
/// head that query head `h` shares (GQA). The cache layer holds `n_pos` rows of
/// `n_kv_heads * head_dim` keys and values.
pub fn attend(
    q: &[f32],
    kv: KvLayer<'_>,
    n_pos: usize,
    shape: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    match kv {
        KvLayer::F16 { keys, values } => attend_f16(q, keys, values, n_pos, shape, scale, out),
        KvLayer::F32 { keys, values } => attend_f32(q, keys, values, n_pos, shape, scale, out),
    }
}

/// [`attend`] over positions `first..n_pos` only: a sliding-window layer, whose query sees
/// the last `window` positions (llama.cpp masks the others with -inf, and both of its
/// attention kernels skip masked positions, so leaving them out is the same arithmetic).
pub fn attend_window(
    q: &[f32],
    kv: KvLayer<'_>,
    first: usize,
    n_pos: usize,
    shape: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    let at = first * shape.kv_dim();
    let kv = match kv {
        KvLayer::F16 { keys, values } => KvLayer::F16 {
            keys: &keys[at..],
            values: &values[at..],
        },
        KvLayer::F32 { keys, values } => KvLayer::F32 {
            keys: &keys[at..],
            values: &values[at..],
        },
    };
    attend(q, kv, n_pos - first, shape, scale, out)
}

/// Exact softmax attention over an f32 cache.
fn attend_f32(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n_pos: usize,
    shape: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    let (head_dim, kv_dim) = (shape.head_dim, shape.kv_dim());
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(h, out_h)| {
            let at = shape.kv_offset(h);
            let q_h = &q[h * head_dim..(h + 1) * head_dim];
            let mut scores: Vec<f32> = (0..n_pos)
                .map(|t| {
                    let k = &keys[t * kv_dim + at..][..head_dim];
                    dot(q_h, k) * scale
                })
                .collect();
            softmax(&mut scores);
            out_h.fill(0.0);
            for (t, &p) in scores.iter().enumerate() {
                let v = &values[t * kv_dim + at..][..head_dim];
                for (o, &vv) in out_h.iter_mut().zip(v) {
                    *o += p * vv;
                }
            }
        });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// `attend` over an f32 cache and over an f16 copy (the test values are exact in f16).
    fn both(q: &[f32], k: &[f32], v: &[f32], n_pos: usize, shape: AttnShape) -> [Vec<f32>; 2] {
        let half = |x: &[f32]| x.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
        let (k16, v16) = (half(k), half(v));
        let mut out = [vec![0.0; q.len()], vec![0.0; q.len()]];
        let f32_cache = KvLayer::F32 { keys: k, values: v };
        let f16_cache = KvLayer::F16 {
            keys: &k16,
            values: &v16,
        };
        attend(q, f32_cache, n_pos, shape, 1.0, &mut out[0]);
        attend(q, f16_cache, n_pos, shape, 1.0, &mut out[1]);
        out
    }

    #[test]
    fn one_position_returns_its_value() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
        };
        for out in both(&[1.0, 0.0, 0.0, 1.0], &[5.0, 5.0], &[0.25, -1.0], 1, shape) {
            assert_eq!(out, [0.25, -1.0, 0.25, -1.0]);
        }
    }

    #[test]
    fn attends_to_the_matching_key() {
        // Two positions; a large score on the second makes the output its value.
        let shape = AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
        };
        for out in both(&[1.0], &[-50.0, 50.0], &[1.0, 2.0], 2, shape) {
            assert!((out[0] - 2.0).abs() < 1e-6);
        }
    }
}
