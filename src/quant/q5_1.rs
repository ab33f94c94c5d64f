//! Q5_1: blocks of 32 values, `{f16 d; f16 m; u32 qh; u8 qs[16]}` (24 bytes); value =
//! `q * d + m` with q five bits stored as in Q5_0 (nibbles in Q4_0's order, bit j of qh the
//! fifth bit of value j). Dots against Q8_1, whose `s = d_a * sum(q_a)` turns the offset term
//! `m * sum(a)` into one multiply per block.
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_q5_1_q8_1` does: the scaled
//! products in eight FMA lanes (as in Q5_0, see q5_0.rs), the `m * s` terms in one f32 added
//! block after block, the two added at the end.

use super::q5_0::{pack, unpack};
use super::{f16_at, hsum_lanes, round_f16, ActKind, ActivationBuffer, DType, Q8Act, QuantError};

pub const QK: usize = 32;
pub const BYTES: usize = 24;

/// f32 -> Q5_1 (ggml `quantize_row_q5_1_ref`): min and max of the block span 32 levels.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(QK) {
        let min = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = xb.iter().fold(-f32::MAX, |m, &v| m.max(v));
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // Never negative; the clamp only guards f32 rounding at the top (as gguf-py's clip).
        let q = |v: f32| (((v - min) * id + 0.5) as u8).min(31);
        let qs: [u8; QK] = std::array::from_fn(|j| q(xb[j]));
        out.extend_from_slice(&round_f16(d).1);
        out.extend_from_slice(&round_f16(min).1);
        out.extend_from_slice(&pack(&qs));
    }
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (y, q) in y.iter_mut().zip(unpack(b, 4)) {
            *y = q as f32 * d + m;
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
    let mut lanes = [0.0f32; 8];
    let mut mins = 0.0f32;
    let blocks = row.chunks_exact(BYTES).zip(act.qs.chunks_exact(QK));
    for ((b, qa), (&da, &sa)) in blocks.zip(act.d.iter().zip(&act.s)) {
        let d = f16_at(b, 0) * da;
        let w = unpack(b, 4);
        for (lane, (w4, a4)) in lanes
            .iter_mut()
            .zip(w.chunks_exact(4).zip(qa.chunks_exact(4)))
        {
            let s: i32 = w4.iter().zip(a4).map(|(&w, &a)| w as i32 * a as i32).sum();
            *lane = d.mul_add(s as f32, *lane);
        }
        mins += f16_at(b, 2) * sa;
    }
    hsum_lanes(lanes) + mins
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
    assert!(act.qs.len() >= nb * QK && act.d.len() >= nb && act.s.len() >= nb);
    // One accumulator, blocks in order, mins summed separately: ggml's exact order.
    let mut acc = (_mm256_setzero_ps(), 0.0f32);
    for i in 0..nb {
        acc = block(row, act, i, acc);
    }
    hsum_ps(acc.0) + acc.1
}

/// The 32 values of the block at `b` as unsigned bytes, 0..31.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn values(b: &[u8]) -> std::arch::x86_64::__m256i {
    use super::x86::*;
    use std::arch::x86_64::*;
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let high = _mm256_and_si256(bits32(qh), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles32(b, 8), high)
}

/// Adds block `i`'s `d_w * d_a * (q · a)` to `acc.0` (8 lanes) and `m_w * s_a` to `acc.1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn block(
    row: &[u8],
    act: &Q8Act,
    i: usize,
    acc: (std::arch::x86_64::__m256, f32),
) -> (std::arch::x86_64::__m256, f32) {
    use super::x86::*;
    use std::arch::x86_64::*;
    let b = &row[i * BYTES..(i + 1) * BYTES];
    let a = load32_i8(&act.qs, i * QK);
    let d = _mm256_set1_ps(f16_at(b, 0) * act.d[i]);
    // The values are unsigned, so they feed `maddubs` directly.
    let v = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(values(b), a)), acc.0);
    (v, acc.1 + f16_at(b, 2) * act.s[i])
}

/// Four independent dots (`rows[k] · acts[k]`) interleaved block by block, each exactly as
/// [`dot_avx2`] computes it: the four chains of fused multiply-adds overlap.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4_avx2(rows: [&[u8]; 4], acts: [&Q8Act; 4]) -> [f32; 4] {
    use super::x86::hsum_ps;
    use std::arch::x86_64::*;
    let nb = rows[0].len() / BYTES;
    for k in 0..4 {
        assert!(rows[k].len() == nb * BYTES);
        let act = acts[k];
        assert!(act.qs.len() >= nb * QK && act.d.len() >= nb && act.s.len() >= nb);
    }
    let mut acc = [(_mm256_setzero_ps(), 0.0f32); 4];
    for i in 0..nb {
        for k in 0..4 {
            acc[k] = block(rows[k], acts[k], i, acc[k]);
        }
    }
    acc.map(|(v, m)| hsum_ps(v) + m)
}

/// One row dotted with `K` activations (a batch's tokens): the weight block is loaded and
/// unpacked once for all of them. Each result is exactly [`dot_avx2`]`(row, acts[k])`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_acts_avx2<const K: usize>(row: &[u8], acts: [&Q8Act; K]) -> [f32; K] {
    use super::x86::*;
    use std::arch::x86_64::*;
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.qs.len() >= nb * QK && act.d.len() >= nb && act.s.len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); K];
    let mut mins = [0.0f32; K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let w = values(b);
        let (dw, mw) = (f16_at(b, 0), f16_at(b, 2));
        for k in 0..K {
            let a = load32_i8(&acts[k].qs, i * QK);
            let d = _mm256_set1_ps(dw * acts[k].d[i]);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(w, a)), acc[k]);
            mins[k] += mw * acts[k].s[i];
        }
    }
    std::array::from_fn(|k| hsum_ps(acc[k]) + mins[k])
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q5_1;

impl super::Format for Q5_1 {
    const DTYPE: DType = DType::Q5_1;
    const BLOCK_LEN: usize = QK;
    const BLOCK_BYTES: usize = BYTES;
    const ACT: ActKind = ActKind::Q8_1;

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

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_acts4(row: &[u8], acts: [&ActivationBuffer; 4]) -> Option<[f32; 4]> {
        // SAFETY: the caller's (see `Format::dot_acts4`).
        Some(unsafe { dot_acts_avx2(row, acts.map(|a| &a.q8)) })
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot4(rows: [&[u8]; 4], acts: [&ActivationBuffer; 4]) -> Option<[f32; 4]> {
        // SAFETY: the caller's (see `Format::dot4`).
        Some(unsafe { dot4_avx2(rows, acts.map(|a| &a.q8)) })
    }
}
