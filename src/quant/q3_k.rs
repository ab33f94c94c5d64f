//! Q3_K: super-blocks of 256 values, `{u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}` (110
//! bytes): 16 groups of 16 values, each with a 6-bit scale stored minus 32; value = d * (sc -
//! 32) * q, q = 2 low bits - (4 unless the high bit is set), -4..3. The values come in 8 runs
//! of 32: run c (c = 4n + k) takes bits 2k..2k + 2 of `qs[32n..32n + 32]` and bit c of
//! `hmask[0..32]`; its first 16 values use scale 2c, the next 16 scale 2c + 1. Dots against
//! Q8_K. "Q3_K_M" files are mostly this (with Q4_K and Q5_K rows).
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_q3_K_q8_K`: per super-block the
//! integer sums in eight lanes (`q8_k::lanes4`; lanes 0..3 hold a run's first group, 4..7 its
//! second), added to eight running f32 lanes with one fused multiply-add, summed pairwise at
//! the end; so the scalar reference equals the AVX2 kernel to the bit.

use super::q8_k::{fma_lanes, lanes4};
use super::{f16_at, hsum_lanes, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 110;
/// Where `qs`, `scales` and `d` start in a block.
const QS: usize = 32;
const SCALES: usize = 96;
const D: usize = 108;

/// The 16 scales, minus 32 (-32..31). The low 4 bits of scales 0..7 are the low nibbles of
/// bytes 0..7 and those of 8..15 their high nibbles; the top 2 bits of scale s are bits
/// 2 (s / 4).. of byte 8 + s % 4. Four scales per u32 word, as ggml's `kmask` shuffle in
/// `dequantize_row_q3_K` does it.
#[inline]
fn scales(s: &[u8]) -> [i32; 16] {
    let word = |at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
    let (a0, a1, a2) = (word(0), word(4), word(8));
    let (lo4, hi2) = (0x0F0F_0F0Fu32, 0x0303_0303u32);
    let w = [
        (a0 & lo4) | ((a2 & hi2) << 4),
        (a1 & lo4) | (((a2 >> 2) & hi2) << 4),
        ((a0 >> 4) & lo4) | (((a2 >> 4) & hi2) << 4),
        ((a1 >> 4) & lo4) | (((a2 >> 6) & hi2) << 4),
    ];
    std::array::from_fn(|g| w[g / 4].to_le_bytes()[g % 4] as i32 - 32)
}

/// The quants (-4..3) of run `c` of the block `b`.
#[inline(always)]
fn unpack_run(b: &[u8], c: usize) -> [i8; 32] {
    let (n, k) = (c / 4, c % 4);
    let (qs, hm) = (&b[QS + 32 * n..QS + 32 * n + 32], &b[..32]);
    std::array::from_fn(|p| {
        let low = ((qs[p] >> (2 * k)) & 3) as i8;
        if hm[p] & (1 << c) != 0 {
            low
        } else {
            low - 4
        }
    })
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, D);
        let sc = scales(&b[SCALES..SCALES + 12]);
        for (c, y) in y.chunks_exact_mut(32).enumerate() {
            let q = unpack_run(b, c);
            for (h, (y, q)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                let dl = d * sc[2 * c + h] as f32;
                for (y, &q) in y.iter_mut().zip(q) {
                    *y = dl * q as f32;
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
    for ((b, qa), &da) in blocks.zip(&act.d) {
        let sc = scales(&b[SCALES..SCALES + 12]);
        let mut sumi = [0i32; 8];
        for c in 0..8 {
            let p = lanes4(&unpack_run(b, c), &qa[32 * c..]);
            for l in 0..8 {
                sumi[l] += sc[2 * c + l / 4] * p[l];
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
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let sc = scales(&b[SCALES..SCALES + 12]);
        let dw = f16_at(b, D);
        let hbits = load32(b, 0);
        // Runs outer, activations inner: each run is unpacked once and only K integer
        // accumulators stay live (integer sums are exact, so the order is free).
        let mut sumi = [_mm256_setzero_si256(); K];
        for c in 0..8 {
            // Run c as ggml splits it for `maddubs`, which wants unsigned weights: the low 2
            // bits (0..3) and the offset (4 where the high bit is clear, else 0), subtracted
            // after the products; the scales of its two groups in the low and high halves.
            let (n, k) = (c / 4, c % 4);
            let bits = load32(b, QS + 32 * n);
            let low = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * k as i32)), m3);
            let clear = _mm256_andnot_si256(hbits, _mm256_set1_epi8((1u8 << c) as i8));
            let four = _mm256_slli_epi16::<2>(_mm256_srl_epi16(clear, _mm_cvtsi32_si128(c as i32)));
            let s = _mm256_set_m128i(
                _mm_set1_epi16(sc[2 * c + 1] as i16),
                _mm_set1_epi16(sc[2 * c] as i16),
            );
            for (sumi, act) in sumi.iter_mut().zip(acts) {
                let a = load32_i8(&act.qs, i * QK + 32 * c);
                // Both products are at most 2 * 4 * 127 in an i16 pair sum: no saturation.
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(low, a), _mm256_maddubs_epi16(four, a));
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
pub struct Q3K;

impl super::Format for Q3K {
    const DTYPE: DType = DType::Q3K;
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
