//! IQ4_XS: super-blocks of 256 values, `{f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}`
//! (136 bytes): 8 sub-blocks of 32 laid out as IQ4_NL blocks without their own f16 scale
//! (sub-block s's nibbles in `qs[16s..16s + 16]`, IQ4_NL's table), each with a 6-bit scale
//! stored minus 32 (low 4 bits in nibble s % 2 of `scales_l[s / 2]`, top 2 bits at bit 2s of
//! `scales_h`); value = d * (ls - 32) * table[nibble]. Dots against Q8_K.
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_iq4_xs_q8_K`: per super-block the
//! integer sums in eight lanes (four products each), added to eight running f32 lanes with one
//! fused multiply-add, summed pairwise at the end; so the scalar reference equals the AVX2
//! kernel to the bit.

use super::iq4_nl::{levels, KVALUES};
use super::q8_k::{fma_lanes, lanes4};
use super::{f16_at, hsum_lanes, ActKind, ActivationBuffer, DType, Q8KAct};

pub const QK: usize = 256;
pub const BYTES: usize = 136;
const QS: usize = 8;

/// The 8 sub-block scales, minus 32 (-32..31).
#[inline]
fn scales(b: &[u8]) -> [i32; 8] {
    let h = u16::from_le_bytes([b[2], b[3]]);
    std::array::from_fn(|s| {
        let low = (b[4 + s / 2] >> (4 * (s % 2))) & 0xF;
        let high = ((h >> (2 * s)) & 3) as u8;
        (low | high << 4) as i32 - 32
    })
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let ls = scales(b);
        for (s, y) in y.chunks_exact_mut(32).enumerate() {
            let dl = d * ls[s] as f32;
            for (y, &q) in y.iter_mut().zip(&levels(&b[QS + 16 * s..])) {
                *y = dl * q as f32;
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
        let ls = scales(b);
        let mut sumi = [0i32; 8];
        for s in 0..8 {
            let p = lanes4(&levels(&b[QS + 16 * s..]), &qa[32 * s..]);
            for l in 0..8 {
                sumi[l] += ls[s] * p[l];
            }
        }
        fma_lanes(&mut acc, f16_at(b, 0) * da, &sumi);
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
    let table = _mm_loadu_si128(KVALUES.as_ptr().cast());
    let m4 = _mm_set1_epi8(0x0F);
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.holds(nb));
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let ls = scales(b);
        let dw = f16_at(b, 0);
        // Sub-blocks outer, activations inner: each is unpacked once and only K integer
        // accumulators stay live (integer sums are exact, so the order is free).
        let mut sumi = [_mm256_setzero_si256(); K];
        for (s, &ls) in ls.iter().enumerate() {
            // |levels| (what `maddubs` wants unsigned), the levels (whose signs move onto the
            // activations) and the scale.
            let q = load16(b, QS + 16 * s);
            let w = _mm256_set_m128i(
                _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), m4)),
                _mm_shuffle_epi8(table, _mm_and_si128(q, m4)),
            );
            let (wabs, sc) = (_mm256_sign_epi8(w, w), _mm256_set1_epi16(ls as i16));
            for (sumi, act) in sumi.iter_mut().zip(acts) {
                let a = _mm256_sign_epi8(load32_i8(&act.qs, i * QK + 32 * s), w);
                // At most 2 * 127 * 127 per i16 pair: no saturation.
                let p = _mm256_maddubs_epi16(wabs, a);
                *sumi = _mm256_add_epi32(*sumi, _mm256_madd_epi16(p, sc));
            }
        }
        for k in 0..K {
            let d = _mm256_set1_ps(dw * acts[k].d[i]);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[k]), acc[k]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct IQ4XS;

impl super::Format for IQ4XS {
    const DTYPE: DType = DType::IQ4XS;
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
