//! IQ4_NL: blocks of 32 values, `{f16 d; u8 qs[16]}` (18 bytes), the nibble order of Q4_0
//! (value j < 16 in the low nibble of `qs[j]`, value j + 16 in its high nibble); a nibble is an
//! index into ggml's non-linear table `kvalues_iq4nl`, value = d * table[nibble]. Dots against
//! Q8_0. llama.cpp writes it for the rows of an IQ4_XS model that are not a multiple of 256
//! wide.
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_iq4_nl_q8_0`: blocks in pairs,
//! the even blocks' integer sums in one set of eight f32 lanes and the odd blocks' in another
//! (four products per lane, one fused multiply-add per block), the two sets added lane by
//! lane and summed pairwise; an odd last block added after that with one fused multiply-add
//! (ggml's scalar tail, which GCC contracts). So the scalar reference equals the AVX2 kernel to
//! the bit.

use super::q8_k::{fma_lanes, lanes4};
use super::{f16_at, hsum_lanes, ActKind, ActivationBuffer, DType, Q8Act};

pub const QK: usize = 32;
pub const BYTES: usize = 18;

/// ggml's `kvalues_iq4nl`: the 16 levels, denser near zero.
pub(super) const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 32 levels of the 16 bytes of nibbles `qs` (low nibbles first, as Q4_0).
#[inline(always)]
pub(super) fn levels(qs: &[u8]) -> [i8; 32] {
    std::array::from_fn(|j| {
        if j < 16 {
            KVALUES[(qs[j] & 0xF) as usize]
        } else {
            KVALUES[(qs[j - 16] >> 4) as usize]
        }
    })
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&levels(&b[2..])) {
            *y = d * q as f32;
        }
    }
}

pub fn dot(row: &[u8], act: &Q8Act, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `use_simd` found avx2, fma and f16c.
        return unsafe { dot_avx2(row, act) };
    }
    let _ = simd;
    dot_scalar(row, act)
}

/// The reference, in the AVX2 kernel's lanes (see the module docs).
pub fn dot_scalar(row: &[u8], act: &Q8Act) -> f32 {
    let nb = row.len() / BYTES;
    let block = |i: usize| {
        let b = &row[i * BYTES..(i + 1) * BYTES];
        let d = act.d[i] * f16_at(b, 0);
        (d, lanes4(&levels(&b[2..]), &act.qs[i * QK..]))
    };
    let mut acc = [[0.0f32; 8]; 2];
    for i in 0..nb / 2 * 2 {
        let (d, sumi) = block(i);
        fma_lanes(&mut acc[i % 2], d, &sumi);
    }
    let mut sum = hsum_lanes(std::array::from_fn(|l| acc[0][l] + acc[1][l]));
    if nb % 2 == 1 {
        let (d, sumi) = block(nb - 1);
        sum = d.mul_add(sumi.iter().sum::<i32>() as f32, sum);
    }
    sum
}

/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(row: &[u8], act: &Q8Act) -> f32 {
    use super::x86::*;
    use std::arch::x86_64::*;
    let nb = row.len() / BYTES;
    assert!(act.qs.len() >= nb * QK && act.d.len() >= nb);
    let table = _mm_loadu_si128(KVALUES.as_ptr().cast());
    // The block's 32 levels as i8 and its integer sums in eight lanes (ggml's `mul_add_epi8`
    // then `madd` by one: products of |w| and a with w's sign, at most 2 * 127 * 127 per pair).
    let block = |i: usize| {
        let b = &row[i * BYTES..(i + 1) * BYTES];
        let q = load16(b, 2);
        let m4 = _mm_set1_epi8(0x0F);
        let w = _mm256_set_m128i(
            _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), m4)),
            _mm_shuffle_epi8(table, _mm_and_si128(q, m4)),
        );
        let sumi = dot_i8_i8(w, load32_i8(&act.qs, i * QK));
        (act.d[i] * f16_at(b, 0), sumi)
    };
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb / 2 * 2 {
        let (d, sumi) = block(i);
        acc[i % 2] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[i % 2]);
    }
    let mut sum = hsum_ps(_mm256_add_ps(acc[0], acc[1]));
    if nb % 2 == 1 {
        let (d, sumi) = block(nb - 1);
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sumi);
        sum = d.mul_add(lanes.iter().sum::<i32>() as f32, sum);
    }
    sum
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct IQ4NL;

impl super::Format for IQ4NL {
    const DTYPE: DType = DType::IQ4NL;
    const BLOCK_LEN: usize = QK;
    const BLOCK_BYTES: usize = BYTES;
    const ACT: ActKind = ActKind::Q8_0;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot(row, &act.q8, simd)
    }
}
