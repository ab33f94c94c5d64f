//! AVX2 helpers shared by the x86_64 kernels. All require avx2+fma+f16c, which callers check
//! once at run time (`use_simd`); being `#[target_feature]` functions, calling them from a
//! kernel with the same features is safe and they inline.

use std::arch::x86_64::*;

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f16 bits to f32 in one instruction (the `half` crate would re-check the CPU each call).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The little-endian f16 at `b[at..at + 2]`, as f32 (bounds-checked).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Pairwise i16 sums of 16 u8 x i8 products widened to 8 i32: `maddubs` then `madd` by 1.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// i8 x i8 products summed in groups of 4 into 8 i32 lanes. `maddubs` wants its first operand
/// unsigned, so move `a`'s sign onto `b` (ggml's trick): |a| * (b * sign(a)) == a * b.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// 32 bytes at `b[at..at + 32]`, unaligned.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn load32(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 32];
    // SAFETY: `s` is exactly 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// 32 i8 at `q[at..at + 32]`, unaligned.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn load32_i8(q: &[i8], at: usize) -> __m256i {
    let s = &q[at..at + 32];
    // SAFETY: as in `load32`.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// 16 bytes at `b[at..at + 16]`, unaligned.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn load16(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` is exactly 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// The 32 nibbles of 16 bytes as 32 bytes in ggml's order: low nibbles of bytes 0..15 first
/// (values 0..15 of a Q4 block), then the high nibbles (values 16..31).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn nibbles32(b: &[u8], at: usize) -> __m256i {
    let t = load16(b, at);
    let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 32 bytes, byte j 0xFF where bit j of `bits` is set and 0 elsewhere (ggml's
/// `bytes_from_bits_32`): the fifth bits of a Q5 block, spread out to meet its nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub fn bits32(bits: u32) -> __m256i {
    // Byte j takes the source byte j / 8 of `bits` ...
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // ... and is all ones exactly when bit j % 8 is set: every other bit is set by the mask.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}
