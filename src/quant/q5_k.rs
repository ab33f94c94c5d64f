//! Q5_K: super-blocks of 256 values, `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`
//! (176 bytes): Q4_K with a fifth bit per value. The 8 sub-blocks of 32 have 6-bit scales and
//! mins packed as Q4_K's; value = d * sc * q - dmin * m with q = nibble | fifth bit << 4. As in
//! Q4_K, each 32 bytes of `qs` hold two sub-blocks (low nibbles, then high nibbles); byte l of
//! `qh` holds the fifth bits of value l of every sub-block, sub-block s at bit s. Dots against
//! Q8_K. The "Q5_K_M" files people download are mostly this (and Q6_K).
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_q5_K_q8_K`: per super-block the
//! integer sums in eight lanes (see `q8_k::lanes4`), added to eight running f32 lanes with one
//! fused multiply-add; the mins' term in integers, added to a separate running f32 with one
//! fused multiply-add (ggml's C compiles `summs += dmin * int` to `vfmadd231ss`); at the end the
//! lanes summed pairwise, then the mins' sum. So the scalar reference equals the AVX2 kernel to
//! the bit.

use super::q4_k::{mins_dot, scales_mins};
use super::q8_k::{fma_lanes, lanes4};
use super::{f16_at, hsum_lanes, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 176;
/// Where `qh` and `qs` start in a block.
const QH: usize = 16;
const QS: usize = 48;

/// The 5-bit quants (0..31) of sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles).
#[inline(always)]
fn unpack_pair(b: &[u8], j: usize) -> ([i8; 32], [i8; 32]) {
    let (qs, qh) = (&b[QS + 32 * j..QS + 32 * j + 32], &b[QH..QH + 32]);
    let lo = std::array::from_fn(|l| ((qs[l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4)) as i8);
    let hi = std::array::from_fn(|l| ((qs[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4)) as i8);
    (lo, hi)
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = scales_mins(&b[4..16]);
        for (j, y) in y.chunks_exact_mut(64).enumerate() {
            let (lo, hi) = unpack_pair(b, j);
            let (d1, m1) = (d * sc[2 * j] as f32, dmin * mn[2 * j] as f32);
            let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * mn[2 * j + 1] as f32);
            let (ylo, yhi) = y.split_at_mut(32);
            for l in 0..32 {
                ylo[l] = d1 * lo[l] as f32 - m1;
                yhi[l] = d2 * hi[l] as f32 - m2;
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
    let (mut acc, mut summs) = ([0.0f32; 8], 0.0f32);
    let blocks = row.chunks_exact(BYTES).zip(act.qs.chunks_exact(QK));
    for (((b, qa), &da), bsums) in blocks.zip(&act.d).zip(act.bsums.chunks_exact(16)) {
        let (sc, mn) = scales_mins(&b[4..16]);
        summs = (-da * f16_at(b, 2)).mul_add(mins_dot(&mn, bsums) as f32, summs);
        let mut sumi = [0i32; 8];
        for j in 0..4 {
            let (lo, hi) = unpack_pair(b, j);
            let (pl, ph) = (lanes4(&lo, &qa[64 * j..]), lanes4(&hi, &qa[64 * j + 32..]));
            for l in 0..8 {
                sumi[l] += sc[2 * j] as i32 * pl[l] + sc[2 * j + 1] as i32 * ph[l];
            }
        }
        fma_lanes(&mut acc, da * f16_at(b, 0), &sumi);
    }
    hsum_lanes(acc) + summs
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
    let m4 = _mm256_set1_epi8(0x0F);
    let m1 = _mm256_set1_epi8(1);
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    let mut summs = [0.0f32; K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let (sc, mn) = scales_mins(&b[4..16]);
        let (dw, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let hbits = load32(b, QH);
        // The quants 0..31 of sub-blocks 2j and 2j + 1: the nibbles, plus bit 2j (2j + 1) of
        // `qh` moved to bit 4.
        let q: [(__m256i, __m256i); 4] = std::array::from_fn(|j| {
            let q4 = load32(b, QS + 32 * j);
            let fifth = |bit: i32| {
                let h = _mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(bit)), m1);
                _mm256_slli_epi16::<4>(h)
            };
            (
                _mm256_or_si256(_mm256_and_si256(q4, m4), fifth(2 * j as i32)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4),
                    fifth(2 * j as i32 + 1),
                ),
            )
        });
        for k in 0..K {
            let (act, da) = (acts[k], acts[k].d[i]);
            let summ = mins_dot(&mn, &act.bsums[16 * i..16 * i + 16]);
            summs[k] = (-da * dmin).mul_add(summ as f32, summs[k]);
            let mut sumi = _mm256_setzero_si256();
            for (j, &(lo, hi)) in q.iter().enumerate() {
                let a0 = load32_i8(&act.qs, i * QK + 64 * j);
                let a1 = load32_i8(&act.qs, i * QK + 64 * j + 32);
                // Products are at most 2 * 31 * 127, so the i16 pair sums cannot saturate.
                let pl = _mm256_maddubs_epi16(lo, a0);
                let ph = _mm256_maddubs_epi16(hi, a1);
                let pl = _mm256_madd_epi16(_mm256_set1_epi16(sc[2 * j] as i16), pl);
                let ph = _mm256_madd_epi16(_mm256_set1_epi16(sc[2 * j + 1] as i16), ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            let d = _mm256_set1_ps(da * dw);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[k]);
        }
    }
    std::array::from_fn(|k| hsum_ps(acc[k]) + summs[k])
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q5K;

impl super::Format for Q5K {
    const DTYPE: DType = DType::Q5K;
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
