//! Q2_K: super-blocks of 256 values, `{u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}` (84 bytes):
//! 16 groups of 16 values, each with a 4-bit scale (low nibble of `scales[g]`) and a 4-bit min
//! (high nibble); value = d * sc * q - dmin * m, q the 2-bit quant 0..3. The values come in 8
//! runs of 32 as in Q3_K: run c (c = 4n + k) takes bits 2k..2k + 2 of `qs[32n..32n + 32]`, its
//! first 16 values group 2c, the next 16 group 2c + 1. Dots against Q8_K.
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_q2_K_q8_K`: per super-block, first
//! the mins' term (in eight lanes of two groups each, `-d_a * dmin` times the integer sums of
//! `m * bsums`), then the quants' integer sums (`q8_k::lanes4`; lanes 0..3 a run's first group,
//! 4..7 its second), each added to the same eight running f32 lanes with a fused multiply-add,
//! the lanes summed pairwise at the end; so the scalar reference equals the AVX2 kernel to the
//! bit.

use super::q8_k::{fma_lanes, lanes4};
use super::{f16_at, hsum_lanes, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 84;
/// Where `qs`, `d` and `dmin` start in a block.
const QS: usize = 16;
const D: usize = 80;
const DMIN: usize = 82;

/// The 2-bit quants (0..3) of run `c` of the block `b`.
#[inline(always)]
fn unpack_run(b: &[u8], c: usize) -> [i8; 32] {
    let (n, k) = (c / 4, c % 4);
    let qs = &b[QS + 32 * n..QS + 32 * n + 32];
    std::array::from_fn(|p| ((qs[p] >> (2 * k)) & 3) as i8)
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin) = (f16_at(b, D), f16_at(b, DMIN));
        for (c, y) in y.chunks_exact_mut(32).enumerate() {
            let q = unpack_run(b, c);
            for (h, (y, q)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                let sc = b[2 * c + h];
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                for (y, &q) in y.iter_mut().zip(q) {
                    *y = dl * q as f32 - ml;
                }
            }
        }
    }
}

pub fn dot(row: &[u8], act: &Q8KAct, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `use_simd` found avx2, fma and f16c.
        return unsafe { dot_avx2(row, act) };
    }
    let _ = simd;
    dot_scalar(row, act)
}

/// The reference, in the AVX2 kernel's lanes (see the module docs).
pub fn dot_scalar(row: &[u8], act: &Q8KAct) -> f32 {
    let mut acc = [0.0f32; 8];
    let blocks = row.chunks_exact(BYTES).zip(act.qs.chunks_exact(QK));
    for (((b, qa), &da), bs) in blocks.zip(&act.d).zip(act.bsums.chunks_exact(16)) {
        let m = |g: usize| (b[g] >> 4) as i32 * bs[g] as i32;
        let mins: [i32; 8] = std::array::from_fn(|l| m(2 * l) + m(2 * l + 1));
        fma_lanes(&mut acc, -da * f16_at(b, DMIN), &mins);
        let mut sumi = [0i32; 8];
        for c in 0..8 {
            let p = lanes4(&unpack_run(b, c), &qa[32 * c..]);
            for l in 0..8 {
                sumi[l] += (b[2 * c + l / 4] & 0xF) as i32 * p[l];
            }
        }
        fma_lanes(&mut acc, da * f16_at(b, D), &sumi);
    }
    hsum_lanes(acc)
}

/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(row: &[u8], act: &Q8KAct) -> f32 {
    dot_acts_avx2(row, [act])[0]
}

/// One row dotted with `K` activations, the weight block unpacked once for all of them (a
/// prefill batch); each result is exactly what `dot_avx2` gives for that activation.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_acts_avx2<const K: usize>(row: &[u8], acts: [&Q8KAct; K]) -> [f32; K] {
    use super::x86::*;
    use std::arch::x86_64::*;
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0xF);
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let (dw, dmin) = (f16_at(b, D), f16_at(b, DMIN));
        let packed = load16(b, 0);
        let mins = _mm256_cvtepi8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4));
        for k in 0..K {
            let (act, da) = (acts[k], acts[k].d[i]);
            let bs = _mm256_loadu_si256(act.bsums[16 * i..16 * i + 16].as_ptr().cast());
            let prod = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(-da * dmin), prod, acc[k]);
        }
        // Runs outer, activations inner: each run is unpacked once and only K integer
        // accumulators stay live (integer sums are exact, so the order is free).
        let mut sumi = [_mm256_setzero_si256(); K];
        for c in 0..8 {
            // Run c: its quants 0..3, the scales of its two groups in the low and high halves.
            let (n, k) = (c / 4, c % 4);
            let bits = load32(b, QS + 32 * n);
            let q2 = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * k as i32)), m3);
            let s = _mm256_set_m128i(
                _mm_set1_epi16((b[2 * c + 1] & 0xF) as i16),
                _mm_set1_epi16((b[2 * c] & 0xF) as i16),
            );
            for (sumi, act) in sumi.iter_mut().zip(acts) {
                let a = load32_i8(&act.qs, i * QK + 32 * c);
                let p = _mm256_maddubs_epi16(q2, a);
                *sumi = _mm256_add_epi32(*sumi, _mm256_madd_epi16(s, p));
            }
        }
        for k in 0..K {
            let d = _mm256_set1_ps(acts[k].d[i] * dw);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[k]), acc[k]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q2K;

impl super::Format for Q2K {
    const DTYPE: DType = DType::Q2K;
    const BLOCK_LEN: usize = QK;
    const BLOCK_BYTES: usize = BYTES;
    const ACT: ActKind = ActKind::Q8K;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot(row, &act.q8k, simd)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_acts4(row: &[u8], acts: [&ActivationBuffer; 4]) -> Option<[f32; 4]> {
        // SAFETY: the caller's (see `Format::dot_acts4`).
        Some(unsafe { dot_acts_avx2(row, acts.map(|a| &a.q8k)) })
    }
}
