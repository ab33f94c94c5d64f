//! Q4_K: super-blocks of 256 values, `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}` (144
//! bytes): 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min packed into `scales`.
//! Value = d * sc * nibble - dmin * m. Each 32 bytes of `qs` hold two sub-blocks: low nibbles
//! are the first 32 values, high nibbles the next 32. Dots against Q8_K.

use super::{f16_at, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 144;

/// The 8 six-bit scales and 8 six-bit mins packed in 12 bytes (ggml `get_scale_min_k4`):
/// bytes 0..4 hold scales 0..3 and 4..8 mins 0..3 in their low 6 bits; sub-blocks 4..7 take
/// their low 4 bits from bytes 8..12 and their top 2 bits from the spare bits of bytes 0..8.
#[inline]
pub fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = scales_mins(&b[4..16]);
        for (j, (q, y)) in b[16..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (d1, m1) = (d * sc[2 * j] as f32, dmin * mn[2 * j] as f32);
            let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * mn[2 * j + 1] as f32);
            let (lo, hi) = y.split_at_mut(32);
            for ((l, h), &q) in lo.iter_mut().zip(hi).zip(q) {
                *l = d1 * (q & 0xF) as f32 - m1;
                *h = d2 * (q >> 4) as f32 - m2;
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

/// The mins term needs no pass over the values (Q5_K's too): `sum(m_j * a)` over sub-block j is
/// `m_j * (bsums[2j] + bsums[2j+1])`.
pub(super) fn mins_dot(mn: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..8)
        .map(|j| mn[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

pub fn dot_scalar(row: &[u8], act: &Q8KAct) -> f32 {
    let mut sum = 0.0f32;
    let blocks = row.chunks_exact(BYTES).zip(act.qs.chunks_exact(QK));
    for (((b, qa), &da), bsums) in blocks.zip(&act.d).zip(act.bsums.chunks_exact(16)) {
        let (sc, mn) = scales_mins(&b[4..16]);
        let mut sumi = 0i32;
        for (j, (q, a)) in b[16..]
            .chunks_exact(32)
            .zip(qa.chunks_exact(64))
            .enumerate()
        {
            let (lo, hi) = a.split_at(32);
            let (mut sl, mut sh) = (0i32, 0i32);
            for ((&q, &al), &ah) in q.iter().zip(lo).zip(hi) {
                sl += (q & 0xF) as i32 * al as i32;
                sh += (q >> 4) as i32 * ah as i32;
            }
            sumi += sc[2 * j] as i32 * sl + sc[2 * j + 1] as i32 * sh;
        }
        let summ = mins_dot(&mn, bsums);
        sum += da * f16_at(b, 0) * sumi as f32 - da * f16_at(b, 2) * summ as f32;
    }
    sum
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
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    // The minimums' term in ggml's four lanes (lane k: sub-blocks 2k and 2k + 1), for the
    // same rounding.
    let mut acc_m = [_mm_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let (sc, mn) = scales_mins(&b[4..16]);
        let (dw, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let q: [(__m256i, __m256i); 4] = std::array::from_fn(|j| {
            let q4 = load32(b, 16 + 32 * j);
            (
                _mm256_and_si256(q4, m4),
                _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
            )
        });
        for k in 0..K {
            let (act, da) = (acts[k], acts[k].d[i]);
            let bsums = &act.bsums[16 * i..16 * i + 16];
            let pair = |j: usize| bsums[2 * j] as i32 + bsums[2 * j + 1] as i32;
            let lanes: [i32; 4] = std::array::from_fn(|l| {
                mn[2 * l] as i32 * pair(2 * l) + mn[2 * l + 1] as i32 * pair(2 * l + 1)
            });
            let prod = _mm_cvtepi32_ps(_mm_loadu_si128(lanes.as_ptr().cast()));
            acc_m[k] = _mm_fmadd_ps(_mm_set1_ps(-(da * dmin)), prod, acc_m[k]);
            let mut sumi = _mm256_setzero_si256();
            for (j, &(lo, hi)) in q.iter().enumerate() {
                let a0 = load32_i8(&act.qs, i * QK + 64 * j);
                let a1 = load32_i8(&act.qs, i * QK + 64 * j + 32);
                // Products are at most 2 * 15 * 127, so the i16 pair sums cannot saturate.
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
    std::array::from_fn(|k| {
        let m = _mm_add_ps(acc_m[k], _mm_movehl_ps(acc_m[k], acc_m[k]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        hsum_ps(acc[k]) + _mm_cvtss_f32(m)
    })
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q4K;

impl super::Format for Q4K {
    const DTYPE: DType = DType::Q4K;
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
