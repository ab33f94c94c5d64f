//! Q5_0: blocks of 32 values, `{f16 d; u32 qh; u8 qs[16]}` (22 bytes). Value j is
//! `(nibble_j | bit j of qh << 4) - 16`, times d, the nibbles in Q4_0's order (value j < 16 in
//! the low nibble of `qs[j]`, value j + 16 in its high nibble). Dots against Q8_0.
//!
//! llama.cpp writes its "Q4_K_M" models' rows that are not a multiple of 256 wide (Qwen2.5
//! 0.5B's 896 columns) in Q5_0, so this is most of such a model.
//!
//! Both dot kernels sum exactly as ggml's AVX2 `ggml_vec_dot_q5_0_q8_0` does: per block, eight
//! lanes of four products each, added to eight running lanes with one fused multiply-add,
//! blocks in order, the lanes summed pairwise at the end. The scalar reference spells those
//! lanes out instead of summing block after block (ggml's generic order), so that it equals
//! the AVX2 kernel to the bit and a model's logits do not depend on the CPU.

use super::{f16_at, hsum_lanes, round_f16, ActKind, ActivationBuffer, DType, Q8Act, QuantError};

pub const QK: usize = 32;
pub const BYTES: usize = 22;

/// f32 -> Q5_0 (ggml `quantize_row_q5_0_ref`): the value of largest magnitude maps to -16, so
/// the scale keeps its sign and the full range -16..15 is used.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // `as u8` truncates toward zero like C's cast (the sum is never negative: |v * id| is
        // at most 16); +16.5 makes it round, ties upwards.
        let q = |v: f32| ((v * id + 16.5) as u8).min(31);
        let qs: [u8; QK] = std::array::from_fn(|j| q(xb[j]));
        out.extend_from_slice(&round_f16(d).1);
        out.extend_from_slice(&pack(&qs));
    }
}

/// The `qh` and `qs` fields (20 bytes) of 32 five-bit values: the fifth bits in `qh` (bit j
/// for value j), the low four bits as nibbles.
pub(super) fn pack(q: &[u8; QK]) -> [u8; 20] {
    let mut out = [0u8; 20];
    let qh = (0..QK).fold(0u32, |h, j| h | (((q[j] >> 4) as u32 & 1) << j));
    out[..4].copy_from_slice(&qh.to_le_bytes());
    for j in 0..QK / 2 {
        out[4 + j] = (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4);
    }
    out
}

/// The 32 five-bit values (0..31) of the `qh` and `qs` fields that start at `b[at..]`.
#[inline(always)]
pub(super) fn unpack(b: &[u8], at: usize) -> [u8; QK] {
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 4 + QK / 2];
    std::array::from_fn(|j| {
        let nibble = if j < QK / 2 {
            qs[j] & 0xF
        } else {
            qs[j - QK / 2] >> 4
        };
        nibble | ((((qh >> j) & 1) as u8) << 4)
    })
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (y, q) in y.iter_mut().zip(unpack(b, 2)) {
            *y = d * (q as i32 - 16) as f32;
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
    for ((b, qa), &da) in row
        .chunks_exact(BYTES)
        .zip(act.qs.chunks_exact(QK))
        .zip(&act.d)
    {
        let d = f16_at(b, 0) * da;
        let w = unpack(b, 2);
        for (lane, (w4, a4)) in lanes
            .iter_mut()
            .zip(w.chunks_exact(4).zip(qa.chunks_exact(4)))
        {
            let s: i32 = w4
                .iter()
                .zip(a4)
                .map(|(&w, &a)| (w as i32 - 16) * a as i32)
                .sum();
            *lane = d.mul_add(s as f32, *lane);
        }
    }
    hsum_lanes(lanes)
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
    // One accumulator, blocks in order: ggml's exact order (two alternating accumulators
    // would be faster where the data is in cache, but sum differently).
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        acc = block(row, act, i, acc);
    }
    hsum_ps(acc)
}

/// The 32 values of the block at `b` as signed bytes, -16..15.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn values(b: &[u8]) -> std::arch::x86_64::__m256i {
    use super::x86::*;
    use std::arch::x86_64::*;
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    // `nibble - 16` is `nibble | 0xF0` as an i8, and `nibble + 16 - 16` is the nibble: set the
    // top four bits where the fifth bit is clear (ggml's andnot trick).
    let high = _mm256_andnot_si256(bits32(qh), _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(nibbles32(b, 6), high)
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
    let a = load32_i8(&act.qs, i * QK);
    let d = _mm256_set1_ps(f16_at(b, 0) * act.d[i]);
    _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_i8(values(b), a)), acc)
}

/// Four independent dots (`rows[k] · acts[k]`) interleaved block by block, each exactly as
/// [`dot_avx2`] computes it: the four chains of fused multiply-adds overlap (a matvec's four
/// rows, whose single chains would each wait on the previous block's FMA).
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
        assert!(acts[k].qs.len() >= nb * QK && acts[k].d.len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        for k in 0..4 {
            acc[k] = block(rows[k], acts[k], i, acc[k]);
        }
    }
    acc.map(|v| hsum_ps(v))
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
        assert!(act.qs.len() >= nb * QK && act.d.len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for (i, b) in row.chunks_exact(BYTES).enumerate() {
        let w = values(b);
        // `dot_i8_i8`'s sign trick, hoisted: |w| once, w's sign moved onto each activation.
        let wabs = _mm256_sign_epi8(w, w);
        let dw = f16_at(b, 0);
        for k in 0..K {
            let a = _mm256_sign_epi8(load32_i8(&acts[k].qs, i * QK), w);
            let d = _mm256_set1_ps(dw * acts[k].d[i]);
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(wabs, a)), acc[k]);
        }
    }
    acc.map(|v| hsum_ps(v))
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q5_0;

impl super::Format for Q5_0 {
    const DTYPE: DType = DType::Q5_0;
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
