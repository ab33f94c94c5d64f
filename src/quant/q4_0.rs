//! Q4_0: blocks of 32 values, `{f16 d; u8 qs[16]}` (18 bytes). Value j (0..15) is
//! `(qs[j] & 0xF) - 8`, value j + 16 is `(qs[j] >> 4) - 8`, times d. Dots against Q8_0.

use super::{f16_at, round_f16, ActKind, ActivationBuffer, DType, Q8Act, QuantError};

pub const QK: usize = 32;
pub const BYTES: usize = 18;

/// f32 -> Q4_0 (ggml `quantize_row_q4_0_ref`): the value of largest magnitude maps to -8,
/// so the scale keeps its sign and the full range -8..7 is used.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&round_f16(d).1);
        // `as i8` truncates toward zero like C's (int8_t) cast; +8.5 makes it round.
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            out.push(q(xb[j]) | (q(xb[j + QK / 2]) << 4));
        }
    }
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
            *l = d * ((q & 0xF) as i32 - 8) as f32;
            *h = d * ((q >> 4) as i32 - 8) as f32;
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

pub fn dot_scalar(row: &[u8], act: &Q8Act) -> f32 {
    let mut sum = 0.0f32;
    for ((b, qa), &da) in row
        .chunks_exact(BYTES)
        .zip(act.qs.chunks_exact(QK))
        .zip(&act.d)
    {
        let (lo, hi) = qa.split_at(QK / 2);
        let mut sumi = 0i32;
        for ((&q, &a0), &a1) in b[2..].iter().zip(lo).zip(hi) {
            sumi += ((q & 0xF) as i32 - 8) * a0 as i32 + ((q >> 4) as i32 - 8) * a1 as i32;
        }
        sum += sumi as f32 * (f16_at(b, 0) * da);
    }
    sum
}

/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(row: &[u8], act: &Q8Act) -> f32 {
    use super::x86::hsum_ps;
    use std::arch::x86_64::*;
    let nb = row.len() / BYTES;
    // Checked once here so the indexing below needs no per-block bounds checks.
    assert!(act.qs.len() >= nb * QK && act.d.len() >= nb);
    // Two accumulators, alternating by block, so consecutive FMAs do not wait on each other.
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 1 < nb {
        acc0 = block(row, act, i, acc0);
        acc1 = block(row, act, i + 1, acc1);
        i += 2;
    }
    if i < nb {
        acc0 = block(row, act, i, acc0);
    }
    hsum_ps(_mm256_add_ps(acc0, acc1))
}

/// `acc + d_w * d_a * (w_i · a_i)` for block `i`, in 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn block(
    row: &[u8],
    act: &Q8Act,
    i: usize,
    acc: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use super::x86::*;
    use std::arch::x86_64::*;
    let b = &row[i * BYTES..(i + 1) * BYTES];
    let w = _mm256_sub_epi8(nibbles32(b, 2), _mm256_set1_epi8(8));
    let a = load32_i8(&act.qs, i * QK);
    let d = _mm256_set1_ps(f16_at(b, 0) * act.d[i]);
    _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_i8(w, a)), acc)
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q4_0;

impl super::Format for Q4_0 {
    const DTYPE: DType = DType::Q4_0;
    const BLOCK_LEN: usize = QK;
    const BLOCK_BYTES: usize = BYTES;
    const ACT: ActKind = ActKind::Q8_0;

    fn dequantize(bytes: &[u8], out: &mut [f32]) {
        dequantize(bytes, out)
    }

    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32 {
        dot(row, &act.q8, simd)
    }

    fn quantize(x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        quantize(x, out);
        Ok(())
    }
}
