//! Attention over an f16 KV cache with the arithmetic of ggml's CPU flash attention
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk` with f16 K and V), step for step:
//!
//! 1. the query is rounded to f16;
//! 2. each score is an f16 dot product summed in ggml's AVX2 lane order, times the scale;
//! 3. an online softmax keeps a running maximum `m` and sum `S`; the weighted values are
//!    accumulated *in f16*: `acc = f16(acc * e^(m_old - m))` on a new maximum, then
//!    `acc = f16(fma(v, e^(s - m), acc))`;
//! 4. `out = acc / S`.
//!
//! llama.cpp runs exactly this by default. SmolLM2's greedy trajectories are chaotic (a value
//! rounded the other way moves later log-probabilities by ~0.1 nats), so anything less exact
//! drifts from llama.cpp's tokens within a few dozen steps; with this kernel they agree bit for
//! bit. The lane-by-lane reference below is bit-identical to the AVX2 kernel on any target
//! (`mul_add` is a true fused multiply-add), and the tests hold the two together.

use half::f16;
use rayon::prelude::*;

use crate::backend::cpu::attention::AttnShape;

/// `out[h] = softmax(q_h . K_g^T * scale) V_g` over `n_pos` cached positions, `g` being the KV
/// head that query head `h` shares.
pub fn attend_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    n_pos: usize,
    shape: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    let head_dim = shape.head_dim;
    let simd = crate::quant::use_simd();
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        || Scratch::new(head_dim),
        |scratch, (h, out_h)| {
            let head = Head {
                keys,
                values,
                n_pos,
                stride: shape.kv_dim(),
                offset: shape.kv_offset(h),
            };
            let q_h = &q[h * head_dim..(h + 1) * head_dim];
            head.attend(q_h, scale, scratch, out_h, simd);
        },
    );
}

/// One KV head's rows: position `t` starts at `t * stride + offset`.
struct Head<'a> {
    keys: &'a [f16],
    values: &'a [f16],
    n_pos: usize,
    stride: usize,
    offset: usize,
}

/// Per-thread buffers: the query in f16 and the f16 value accumulator.
struct Scratch {
    q16: Vec<f16>,
    acc: Vec<f16>,
}

impl Scratch {
    fn new(head_dim: usize) -> Scratch {
        Scratch {
            q16: vec![f16::ZERO; head_dim],
            acc: vec![f16::ZERO; head_dim],
        }
    }
}

impl Scratch {
    /// A new head: the query rounded to f16, the accumulator zeroed.
    fn start(&mut self, q: &[f32]) {
        for (h, &v) in self.q16.iter_mut().zip(q) {
            *h = f16::from_f32(v);
        }
        self.acc.fill(f16::ZERO);
    }
}

impl Head<'_> {
    fn attend(&self, q: &[f32], scale: f32, s: &mut Scratch, out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && q.len().is_multiple_of(8) {
            // SAFETY: `simd` is true only when the CPU has avx2, fma and f16c.
            return unsafe { self.attend_avx2(q, scale, s, out) };
        }
        let _ = simd;
        self.attend_lanes(q, scale, s, out)
    }

    /// The reference: every operation of ggml's kernel written out per lane.
    fn attend_lanes(&self, q: &[f32], scale: f32, s: &mut Scratch, out: &mut [f32]) {
        let d = q.len();
        s.start(q);
        let acc = &mut s.acc;
        let (mut sum, mut max) = (0.0f32, f32::NEG_INFINITY);
        for t in 0..self.n_pos {
            let at = t * self.stride + self.offset;
            let score = dot_f16_lanes(&self.keys[at..at + d], &s.q16) * scale;
            let (ms, vs) = softmax_step(score, &mut max);
            if ms != 1.0 {
                for a in acc.iter_mut() {
                    *a = f16::from_f32(a.to_f32() * ms);
                }
            }
            for (a, &x) in acc.iter_mut().zip(&self.values[at..at + d]) {
                *a = f16::from_f32(x.to_f32().mul_add(vs, a.to_f32()));
            }
            sum = sum.mul_add(ms, vs);
        }
        finish(acc.iter().map(|a| a.to_f32()), sum, out);
    }

    /// The same arithmetic, eight lanes at a time with F16C conversions.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_avx2(&self, q: &[f32], scale: f32, s: &mut Scratch, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let d = q.len();
        s.start(q);
        // The f16 accumulator lives in the scratch buffer, eight lanes at a time.
        let acc = &mut s.acc;
        let (mut sum, mut max) = (0.0f32, f32::NEG_INFINITY);
        for t in 0..self.n_pos {
            let at = t * self.stride + self.offset;
            let k = &self.keys[at..at + d];
            let score = dot_f16_avx2(k, &s.q16) * scale;
            let (ms, vs) = softmax_step(score, &mut max);
            let v = &self.values[at..at + d];
            let (msv, vsv) = (_mm256_set1_ps(ms), _mm256_set1_ps(vs));
            for (j, a) in acc.chunks_exact_mut(8).enumerate() {
                let mut y = _mm256_cvtph_ps(load_f16x8(a, 0));
                if ms != 1.0 {
                    y = _mm256_cvtph_ps(_mm256_cvtps_ph::<0>(_mm256_mul_ps(y, msv)));
                }
                let x = _mm256_cvtph_ps(load_f16x8(v, 8 * j));
                let y = _mm256_cvtps_ph::<0>(_mm256_fmadd_ps(x, vsv, y));
                // SAFETY: `a` is 8 writable f16 (16 bytes); the store is unaligned.
                _mm_storeu_si128(a.as_mut_ptr().cast(), y);
            }
            sum = sum.mul_add(ms, vs);
        }
        finish(acc.iter().map(|a| a.to_f32()), sum, out);
    }
}

/// One step of the online softmax for a new score: returns `(ms, vs)`, the factor that rescales
/// what was accumulated so far and the weight of the new row, and updates the running maximum.
#[inline(always)]
fn softmax_step(score: f32, max: &mut f32) -> (f32, f32) {
    if score > *max {
        let old = std::mem::replace(max, score);
        ((old - score).exp(), 1.0)
    } else {
        (1.0, (score - *max).exp())
    }
}

/// `out = acc / sum`, as ggml scales by the reciprocal.
fn finish(acc: impl Iterator<Item = f32>, sum: f32, out: &mut [f32]) {
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a * inv;
    }
}

/// `ggml_vec_dot_f16` on AVX2, lane by lane: four 8-lane f32 accumulators fed by fused
/// multiply-adds over 32 values at a time, reduced `(s0 + s2) + (s1 + s3)`, the halves added,
/// then two horizontal adds; a tail past the last 32 is added in f64.
fn dot_f16_lanes(x: &[f16], y: &[f16]) -> f32 {
    const STEP: usize = 32;
    let n = x.len();
    let body = n - n % STEP;
    let mut sum = [[0.0f32; 8]; 4];
    for i in (0..body).step_by(STEP) {
        for (j, acc) in sum.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let at = i + 8 * j + l;
                *a = x[at].to_f32().mul_add(y[at].to_f32(), *a);
            }
        }
    }
    let r: [f32; 8] = std::array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let t: [f32; 4] = std::array::from_fn(|k| r[k] + r[k + 4]);
    let mut total = ((t[0] + t[1]) + (t[2] + t[3])) as f64;
    for i in body..n {
        total += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    total as f32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f16_avx2(x: &[f16], y: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    const STEP: usize = 32;
    let n = x.len();
    let body = n - n % STEP;
    let mut sum = [_mm256_setzero_ps(); 4];
    for i in (0..body).step_by(STEP) {
        for (j, acc) in sum.iter_mut().enumerate() {
            let a = _mm256_cvtph_ps(load_f16x8(x, i + 8 * j));
            let b = _mm256_cvtph_ps(load_f16x8(y, i + 8 * j));
            *acc = _mm256_fmadd_ps(a, b, *acc);
        }
    }
    let r = _mm256_add_ps(_mm256_add_ps(sum[0], sum[2]), _mm256_add_ps(sum[1], sum[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps::<1>(r));
    let t = _mm_hadd_ps(t, t);
    let mut total = _mm_cvtss_f32(_mm_hadd_ps(t, t)) as f64;
    for i in body..n {
        total += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    total as f32
}

/// Eight f16 values from `v[at..at + 8]` (bounds-checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_f16x8(v: &[f16], at: usize) -> std::arch::x86_64::__m128i {
    let s = &v[at..at + 8];
    // SAFETY: `s` holds 8 f16 (16 bytes); the load is unaligned.
    unsafe { std::arch::x86_64::_mm_loadu_si128(s.as_ptr().cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::attention::attend;
    use crate::backend::kv_cache::KvLayer;
    use crate::rng::Rng;

    fn rng_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        rng.vec(n, 0.5 * scale)
    }

    fn to_f16(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn avx2_kernel_is_bit_identical_to_the_lane_reference() {
        let mut seed = Rng::new(0x9e37_79b9_7f4a_7c15);
        for (head_dim, n_pos) in [(64, 1), (64, 37), (128, 300), (40, 9)] {
            let q = rng_vec(&mut seed, head_dim, 6.0);
            let keys = to_f16(&rng_vec(&mut seed, n_pos * head_dim, 4.0));
            let values = to_f16(&rng_vec(&mut seed, n_pos * head_dim, 2.0));
            let head = Head {
                keys: &keys,
                values: &values,
                n_pos,
                stride: head_dim,
                offset: 0,
            };
            let mut s = Scratch::new(head_dim);
            let (mut lanes, mut simd) = (vec![0.0; head_dim], vec![0.0; head_dim]);
            head.attend_lanes(&q, 0.125, &mut s, &mut lanes);
            head.attend(&q, 0.125, &mut s, &mut simd, true);
            assert_eq!(lanes, simd, "head_dim {head_dim}, {n_pos} positions");
        }
    }

    #[test]
    fn close_to_exact_softmax_attention() {
        // f16 rounding aside, it is attention: compare with the f32 path on the same values.
        let mut seed = Rng::new(7);
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let n_pos = 50;
        let q = rng_vec(&mut seed, 4 * 64, 2.0);
        let keys = to_f16(&rng_vec(&mut seed, n_pos * 128, 2.0));
        let values = to_f16(&rng_vec(&mut seed, n_pos * 128, 2.0));
        let (k32, v32): (Vec<f32>, Vec<f32>) = (
            keys.iter().map(|x| x.to_f32()).collect(),
            values.iter().map(|x| x.to_f32()).collect(),
        );
        let (mut a, mut b) = (vec![0.0; 256], vec![0.0; 256]);
        attend(
            &q,
            KvLayer::F16 {
                keys: &keys,
                values: &values,
            },
            n_pos,
            shape,
            0.125,
            &mut a,
        );
        attend(
            &q,
            KvLayer::F32 {
                keys: &k32,
                values: &v32,
            },
            n_pos,
            shape,
            0.125,
            &mut b,
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 2e-3, "{x} vs {y}");
        }
    }

    #[test]
    fn dot_matches_f64_within_rounding() {
        let mut seed = Rng::new(3);
        let x = to_f16(&rng_vec(&mut seed, 100, 2.0));
        let y = to_f16(&rng_vec(&mut seed, 100, 2.0));
        let exact: f64 = x.iter().zip(&y).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
        assert!((dot_f16_lanes(&x, &y) as f64 - exact).abs() < 1e-4);
    }
}
