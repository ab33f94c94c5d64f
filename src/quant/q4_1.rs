//! Q4_1: blocks of 32 values, `{f16 d; f16 m; u8 qs[16]}` (20 bytes); value = nibble * d + m,
//! nibble order as Q4_0. Dots against Q8_1, whose `s = d_a * sum(q_a)` turns the offset term
//! `m * sum(a)` into one multiply per block.

use super::{f16_at, round_f16, ActKind, ActivationBuffer, DType, Q8Act, QuantError};

pub const QK: usize = 32;
pub const BYTES: usize = 20;

/// f32 -> Q4_1 (ggml `quantize_row_q4_1_ref`): min and max of the block span 16 levels.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(QK) {
        let min = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = xb.iter().fold(-f32::MAX, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&round_f16(d).1);
        out.extend_from_slice(&round_f16(min).1);
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            out.push(q(xb[j]) | (q(xb[j + QK / 2]) << 4));
        }
    }
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
            *l = (q & 0xF) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
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
    let blocks = row.chunks_exact(BYTES).zip(act.qs.chunks_exact(QK));
    for ((b, qa), (&da, &sa)) in blocks.zip(act.d.iter().zip(&act.s)) {
        let (lo, hi) = qa.split_at(QK / 2);
        let mut sumi = 0i32;
        for ((&q, &a0), &a1) in b[4..].iter().zip(lo).zip(hi) {
            sumi += (q & 0xF) as i32 * a0 as i32 + (q >> 4) as i32 * a1 as i32;
        }
        sum += sumi as f32 * (f16_at(b, 0) * da) + f16_at(b, 2) * sa;
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
    assert!(act.qs.len() >= nb * QK && act.d.len() >= nb && act.s.len() >= nb);
    // Two accumulators each for the vector and the min terms, alternating by block, so
    // consecutive adds do not wait on each other.
    // One accumulator, blocks in order, mins summed separately: ggml's exact order. SmolLM2
    // is chaotic under activation quantisation (a 1-ulp change upstream can move a value
    // across a rounding boundary), so matching llama.cpp token for token needs equal sums.
    let mut acc = (_mm256_setzero_ps(), 0.0f32);
    for i in 0..nb {
        acc = block(row, act, i, acc);
    }
    hsum_ps(acc.0) + acc.1
}

/// Adds block `i`'s `d_w * d_a * (nibbles · a)` to `acc.0` (8 lanes) and `m_w * s_a` to `acc.1`.
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
    // Nibbles are unsigned, so they feed `maddubs` directly.
    let w = nibbles32(b, 4);
    let a = load32_i8(&act.qs, i * QK);
    let d = _mm256_set1_ps(f16_at(b, 0) * act.d[i]);
    let v = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(w, a)), acc.0);
    (v, acc.1 + f16_at(b, 2) * act.s[i])
}

/// Four independent dots (`rows[k] · acts[k]`) interleaved block by block. Each is computed
/// exactly as [`dot_avx2`] computes it (same operations in the same order), but the four
/// dependency chains of fused multiply-adds overlap, so a core is no longer waiting on one
/// chain's latency: about twice the throughput where the data is in cache (prefill batches,
/// the weights of a matvec already streamed in).
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
        let (row, act) = (rows[k], acts[k]);
        assert!(row.len() == nb * BYTES);
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
        let w = nibbles32(b, 4);
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
pub struct Q4_1;

impl super::Format for Q4_1 {
    const DTYPE: DType = DType::Q4_1;
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
