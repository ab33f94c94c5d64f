//! Q8_0: blocks of 32 values, `{f16 d; i8 qs[32]}` (34 bytes), value = d * q.
//! Also the Q8_0 / Q8_1 activation quantiser used by the Q4_0, Q4_1 and Q8_0 kernels.

use super::{f16_at, round_f16, ActKind, ActivationBuffer, DType, Q8Act, QuantError};

pub const QK: usize = 32;
pub const BYTES: usize = 34;

/// ggml's x86 `quantize_row_q8_0` / `quantize_row_q8_1` (the AVX2 ones llama.cpp runs, not
/// the `_ref` ones) into `act`: `d = amax / 127` (stored as f16), `q = x * (127 / amax)`
/// rounded half to even. With `with_sums`, also `s = d * sum(q)` as Q8_1 (f16-rounded like
/// `block_q8_1.s`). The exact formula matters: SmolLM2 amplifies a single value rounded the
/// other way into log-probabilities ~0.1 nats apart.
pub fn quantize_act(x: &[f32], act: &mut Q8Act, with_sums: bool) {
    // Inside an SSE4.1/AVX2 function `round_ties_even` is one instruction; elsewhere a libm
    // call per value (same result either way).
    #[cfg(target_arch = "x86_64")]
    if super::use_simd() {
        // SAFETY: use_simd() found avx2 (which implies sse4.1).
        return unsafe { quantize_act_avx2(x, act, with_sums) };
    }
    quantize_act_body(x, act, with_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_avx2(x: &[f32], act: &mut Q8Act, with_sums: bool) {
    quantize_act_body(x, act, with_sums)
}

#[inline(always)]
fn quantize_act_body(x: &[f32], act: &mut Q8Act, with_sums: bool) {
    let nb = x.len() / QK;
    act.qs.resize(x.len(), 0);
    act.d.clear();
    act.s.clear();
    for (xb, qb) in x.chunks_exact(QK).zip(act.qs.chunks_exact_mut(QK)) {
        let raw_d = block_scale(xb, qb);
        act.d.push(round_f16(raw_d).0);
        if with_sums {
            // ggml multiplies by the unrounded scale, then rounds the product to f16.
            let sum: i32 = qb.iter().map(|&q| q as i32).sum();
            act.s.push(round_f16(sum as f32 * raw_d).0);
        }
    }
    debug_assert_eq!(act.d.len(), nb);
}

/// Quantises one block of 32 into `q`, returning the unrounded scale.
#[inline(always)]
fn block_scale(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // ggml computes q from 127 / amax (not 1 / d) but stores the f16-rounded d.
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = (xi * id).round_ties_even() as i8;
    }
    d
}

/// f32 -> Q8_0 weight blocks (ggml `quantize_row_q8_0_ref`).
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    let mut q = [0i8; QK];
    for xb in x.chunks_exact(QK) {
        let d = block_scale(xb, &mut q);
        out.extend_from_slice(&round_f16(d).1);
        out.extend(q.iter().map(|&v| v as u8));
    }
}

pub fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (yi, &q) in y.iter_mut().zip(&b[2..]) {
            *yi = d * (q as i8) as f32;
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

/// Per block: integer dot of the quants, then one f32 multiply by both scales (as ggml).
pub fn dot_scalar(row: &[u8], act: &Q8Act) -> f32 {
    let mut sum = 0.0f32;
    for ((b, qa), &da) in row
        .chunks_exact(BYTES)
        .zip(act.qs.chunks_exact(QK))
        .zip(&act.d)
    {
        let sumi: i32 = b[2..]
            .iter()
            .zip(qa)
            .map(|(&w, &a)| (w as i8) as i32 * a as i32)
            .sum();
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
    // One accumulator, blocks in order: ggml's summation order (see q4_1::dot_avx2). The
    // kernel is bound by memory bandwidth, not by the FMA latency chain.
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        acc = block(row, act, i, acc);
    }
    hsum_ps(acc)
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
    let w = load32(b, 2);
    let a = load32_i8(&act.qs, i * QK);
    let d = _mm256_set1_ps(f16_at(b, 0) * act.d[i]);
    _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_i8(w, a)), acc)
}

/// One row dotted with `K` activations (a prefill batch), each exactly as [`dot_avx2`].
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_acts_avx2<const K: usize>(row: &[u8], acts: [&Q8Act; K]) -> [f32; K] {
    use super::x86::hsum_ps;
    use std::arch::x86_64::*;
    let nb = row.len() / BYTES;
    for act in acts {
        assert!(act.qs.len() >= nb * QK && act.d.len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); K];
    for i in 0..nb {
        for k in 0..K {
            acc[k] = block(row, acts[k], i, acc[k]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// [`axpy_avx2`] into four outputs at once, `outs[k] += a[k] * w`, with each block of `w`
/// dequantised once; an output whose `a[k]` is zero is left untouched (as the caller skips a
/// zero activation). Each output gets exactly the roundings of `axpy_avx2`.
///
/// # Safety
/// AVX2 must be available; `bytes` whole blocks and every output as long as they hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy4_avx2(a: [f32; 4], bytes: &[u8], outs: [&mut [f32]; 4]) {
    use std::arch::x86_64::*;
    let av = a.map(|a| _mm256_set1_ps(a));
    for (bi, b) in bytes.chunks_exact(BYTES).enumerate() {
        let d = _mm256_set1_ps(f16_at(b, 0));
        for (j, q) in b[2..].chunks_exact(8).enumerate() {
            // SAFETY: `q` is 8 readable bytes; each output holds the block's 32 floats.
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr().cast()));
            let w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
            let at = bi * QK + j * 8;
            for k in 0..4 {
                if a[k] == 0.0 {
                    continue;
                }
                let o = &mut outs[k][at..at + 8];
                let sum = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), _mm256_mul_ps(av[k], w));
                _mm256_storeu_ps(o.as_mut_ptr(), sum);
            }
        }
    }
}

/// `out += a * dequantize(bytes)`, eight values at a time, with the same two roundings per
/// value as [`dequantize`] followed by a scalar multiply-add (no fusing).
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_avx2(a: f32, bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let av = _mm256_set1_ps(a);
    for (b, o) in bytes.chunks_exact(BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        for (q, o) in b[2..].chunks_exact(8).zip(o.chunks_exact_mut(8)) {
            // SAFETY: `q` is 8 readable bytes and `o` 8 writable floats; unaligned access.
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr().cast()));
            let w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
            let sum = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), _mm256_mul_ps(av, w));
            _mm256_storeu_ps(o.as_mut_ptr(), sum);
        }
    }
}

/// The format as [`super::Format`] sees it: what the dispatch in `quant/mod.rs` calls.
pub struct Q8_0;

impl super::Format for Q8_0 {
    const DTYPE: DType = DType::Q8_0;
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
}
