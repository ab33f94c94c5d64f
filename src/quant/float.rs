//! Plain float weights (F32, F16, BF16) dotted with an f32 activation. llama.cpp converts the
//! activation to f16 for f16 weights; we keep it f32, which is at least as accurate.

use half::{bf16, f16};

use super::{ActKind, ActivationBuffer, DType, QuantError};

/// Scalar dots keep 8 independent partial sums so the compiler can vectorise them.
fn dot_lanes(n: usize, x: &[f32], w: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += w(i + k) * x[i + k];
        }
    }
    let tail: f32 = (full..n).map(|i| w(i) * x[i]).sum();
    acc.iter().sum::<f32>() + tail
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

fn bf16_at(b: &[u8], i: usize) -> f32 {
    bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

pub fn dot_f32_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(row.len() / 4, x, |i| f32_at(row, i))
}

pub fn dot_f16_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(row.len() / 2, x, |i| f16_at(row, i))
}

pub fn dot_bf16_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes(row.len() / 2, x, |i| bf16_at(row, i))
}

pub fn dot_f32(row: &[u8], x: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `use_simd` found avx2, fma and f16c.
        return unsafe { avx2::dot_f32(row, x) };
    }
    let _ = simd;
    dot_f32_scalar(row, x)
}

pub fn dot_f16(row: &[u8], x: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot_f32`.
        return unsafe { avx2::dot_f16(row, x) };
    }
    let _ = simd;
    dot_f16_scalar(row, x)
}

pub fn dot_bf16(row: &[u8], x: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot_f32`.
        return unsafe { avx2::dot_bf16(row, x) };
    }
    let _ = simd;
    dot_bf16_scalar(row, x)
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::super::x86::{hsum_ps, load16};
    use std::arch::x86_64::*;

    /// 8 f32 weights from `b[at..at + 32]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn load_f32(b: &[u8], at: usize) -> __m256 {
        let s = &b[at..at + 32];
        // SAFETY: `s` is exactly 32 readable bytes; loadu has no alignment requirement.
        unsafe { _mm256_loadu_ps(s.as_ptr().cast()) }
    }

    /// 8 f16 weights from `b[at..at + 16]`, widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn load_f16(b: &[u8], at: usize) -> __m256 {
        _mm256_cvtph_ps(load16(b, at))
    }

    /// 8 bf16 weights from `b[at..at + 16]`: a bf16 is the top half of an f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn load_bf16(b: &[u8], at: usize) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load16(b, at)), 16))
    }

    fn load_x(x: &[f32], at: usize) -> __m256 {
        let s = &x[at..at + 8];
        // SAFETY: `s` is exactly 8 readable f32; loadu has no alignment requirement and needs
        // only AVX, which every caller (the kernels below) has enabled.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// One kernel per width: a dot of a row of floats with `x`, 32 values per step in 4
    /// accumulators to hide FMA latency; the (rare) tail goes to the scalar code. A macro
    /// rather than a function pointer so that the loads inline.
    macro_rules! kernel {
        ($name:ident, $width:expr, $load:ident, $tail:path) => {
            /// # Safety
            /// The CPU must support avx2, fma and f16c.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(row: &[u8], x: &[f32]) -> f32 {
                let n = (row.len() / $width).min(x.len());
                let full = n / 32 * 32;
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in (0..full).step_by(32) {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let at = i + 8 * k;
                        *a = _mm256_fmadd_ps($load(row, at * $width), load_x(x, at), *a);
                    }
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                hsum_ps(s) + $tail(&row[full * $width..n * $width], &x[full..n])
            }
        };
    }

    kernel!(dot_f32, 4, load_f32, super::dot_f32_scalar);
    kernel!(dot_f16, 2, load_f16, super::dot_f16_scalar);
    kernel!(dot_bf16, 2, load_bf16, super::dot_bf16_scalar);
}

pub fn dequantize_f32(bytes: &[u8], out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = f32_at(bytes, i);
    }
}

pub fn dequantize_f16(bytes: &[u8], out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = f16_at(bytes, i);
    }
}

pub fn dequantize_bf16(bytes: &[u8], out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = bf16_at(bytes, i);
    }
}

pub fn quantize_f32(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|v| v.to_le_bytes()));
}

pub fn quantize_f16(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()));
}

pub fn quantize_bf16(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()));
}

/// F32 as [`super::Format`] sees it: blocks of one value, dotted with f32 activations.
pub struct F32;

impl super::Format for F32 {
    const DTYPE: DType = DType::F32;
    const BLOCK_LEN: usize = 1;
    const BLOCK_BYTES: usize = 4;
    const ACT: ActKind = ActKind::F32;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize_f32(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot_f32(row, &act.f32, simd)
    }

    fn quantize(x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        quantize_f32(x, out);
        Ok(())
    }
}

/// F16 as [`super::Format`] sees it: blocks of one value, dotted with f32 activations.
pub struct F16;

impl super::Format for F16 {
    const DTYPE: DType = DType::F16;
    const BLOCK_LEN: usize = 1;
    const BLOCK_BYTES: usize = 2;
    const ACT: ActKind = ActKind::F32;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize_f16(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot_f16(row, &act.f32, simd)
    }

    fn quantize(x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        quantize_f16(x, out);
        Ok(())
    }
}

/// BF16 as [`super::Format`] sees it: blocks of one value, dotted with f32 activations.
pub struct BF16;

impl super::Format for BF16 {
    const DTYPE: DType = DType::BF16;
    const BLOCK_LEN: usize = 1;
    const BLOCK_BYTES: usize = 2;
    const ACT: ActKind = ActKind::F32;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize_bf16(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot_bf16(row, &act.f32, simd)
    }

    fn quantize(x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        quantize_bf16(x, out);
        Ok(())
    }
}
