//! Q6_K: super-blocks of 256 values, `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}` (210
//! bytes). A 6-bit quant is 4 low bits from `ql` and 2 high bits from `qh`, minus 32; each of
//! the 16 groups of 16 values has an i8 scale. Each half (128 values) uses 64 bytes of `ql`
//! (values l and l+64 share byte l, l+32 and l+96 share byte l+32) and 32 bytes of `qh` (byte l
//! holds the high bits of values l, l+32, l+64, l+96 at bit offsets 0, 2, 4, 6). Dots against
//! Q8_K.

use super::{f16_at, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 210;

/// The 6-bit quants (-32..31) of one half: `out[32k + l]` for k in 0..4, l in 0..32.
fn unpack_half(ql: &[u8], qh: &[u8], out: &mut [i32; 128]) {
    for l in 0..32 {
        let h = qh[l];
        out[l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i32 - 32;
        out[l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i32 - 32;
        out[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
        out[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
    }
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    let mut q = [0i32; 128];
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 208);
        for (n, y) in y.chunks_exact_mut(128).enumerate() {
            unpack_half(&b[64 * n..], &b[128 + 32 * n..], &mut q);
            for (g, (y, q)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                let s = d * (b[192 + 8 * n + g] as i8) as f32;
                for (yi, &qi) in y.iter_mut().zip(q) {
                    *yi = s * qi as f32;
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

pub fn dot_scalar(row: &[u8], act: &Q8KAct) -> f32 {
    let mut sum = 0.0f32;
    let mut q = [0i32; 128];
    for ((b, qa), &da) in row
        .chunks_exact(BYTES)
        .zip(act.qs.chunks_exact(QK))
        .zip(&act.d)
    {
        let mut sumi = 0i32;
        for (n, a) in qa.chunks_exact(128).enumerate() {
            unpack_half(&b[64 * n..], &b[128 + 32 * n..], &mut q);
            for (g, (a, q)) in a.chunks_exact(16).zip(q.chunks_exact(16)).enumerate() {
                let s: i32 = a.iter().zip(q).map(|(&a, &q)| a as i32 * q).sum();
                sumi += (b[192 + 8 * n + g] as i8) as i32 * s;
            }
        }
        sum += da * f16_at(b, 208) * sumi as f32;
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
    let m2 = _mm256_set1_epi8(3);
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let scales = load16(b, 192);
        let scales16 = _mm256_cvtepi8_epi16(scales);
        let dw = f16_at(b, 208);
        // The unsigned (0..63) quants of the block, 32 at a time, with the scales of their
        // two groups of 16 (lanes 0..7 and 8..15).
        let q: [(__m256i, __m256i); 8] = std::array::from_fn(|c| {
            let (n, k) = (c / 4, c % 4);
            let h = load32(b, 128 + 32 * n);
            let (l0, l1) = (load32(b, 64 * n), load32(b, 64 * n + 32));
            let (low, shift) = match k {
                0 => (_mm256_and_si256(l0, m4), 0),
                1 => (_mm256_and_si256(l1, m4), 2),
                2 => (_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), 4),
                _ => (_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), 6),
            };
            let high = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(shift)), m2);
            let qk = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
            let g = (8 * n + 2 * k) as i64;
            let pick = _mm_set_epi64x((g + 1) * 0x0101_0101_0101_0101, g * 0x0101_0101_0101_0101);
            (qk, _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick)))
        });
        for k in 0..K {
            let act = acts[k];
            // ggml's lane layout, which the f32 accumulation below depends on: the quants are
            // taken unsigned and their -32 offset is removed at the end through the
            // activation sums, lane l holding the 32 activations of groups 2l and 2l + 1.
            let bs = _mm256_loadu_si256(act.bsums[16 * i..16 * i + 16].as_ptr().cast());
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, scales16));
            let mut sumi = _mm256_setzero_si256();
            for (c, &(qk, sc)) in q.iter().enumerate() {
                let a = load32_i8(&act.qs, i * QK + 32 * c);
                let p = _mm256_maddubs_epi16(qk, a);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p));
            }
            let sumi = _mm256_sub_epi32(sumi, offset);
            let d = _mm256_set1_ps(act.d[i] * dw);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[k]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q6K;

impl super::Format for Q6K {
    const DTYPE: DType = DType::Q6K;
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
