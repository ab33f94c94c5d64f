//! Q8_K: the activation form for the K-quant kernels. Blocks of 256 values with an f32 scale
//! and the sum of each 16 quants (`bsums`), which lets Q4_K fold its per-sub-block minimums into
//! 8 multiplies instead of touching the values again.

use super::Q8KAct;

pub const QK: usize = 256;

/// ggml's `quantize_row_q8_K_ref`: the value of largest magnitude maps to -127 (so the scale
/// carries its sign), quants round half to even (ggml's `nearest_int`) and are clamped to 127.
pub fn quantize_act(x: &[f32], act: &mut Q8KAct) {
    // Inside an SSE4.1/AVX2 function `round_ties_even` is one instruction; elsewhere a libm
    // call per value (same result either way).
    #[cfg(target_arch = "x86_64")]
    if super::use_simd() {
        // SAFETY: use_simd() found avx2 (which implies sse4.1).
        return unsafe { quantize_act_avx2(x, act) };
    }
    quantize_act_body(x, act)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_avx2(x: &[f32], act: &mut Q8KAct) {
    quantize_act_body(x, act)
}

#[inline(always)]
fn quantize_act_body(x: &[f32], act: &mut Q8KAct) {
    act.qs.resize(x.len(), 0);
    act.d.clear();
    act.bsums.clear();
    for (xb, qb) in x.chunks_exact(QK).zip(act.qs.chunks_exact_mut(QK)) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            qb.fill(0);
            act.d.push(0.0);
            act.bsums.extend_from_slice(&[0; QK / 16]);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        act.bsums.extend(
            qb.chunks_exact(16)
                .map(|g| g.iter().map(|&q| q as i16).sum::<i16>()),
        );
        act.d.push(1.0 / iscale);
    }
}

/// The eight i32 lanes that ggml's AVX2 K-quant kernels get from 32 weight quants `q` and 32
/// activation quants `a` with `maddubs` then `madd`: lane `l` is `q[4l..4l + 4] · a[4l..4l +
/// 4]`. The scalar references of Q2_K, Q3_K and Q5_K build their integer sums from these lanes
/// so that they add the same numbers in f32 as the AVX2 kernels do (and equal them to the bit).
#[inline(always)]
pub(super) fn lanes4(q: &[i8; 32], a: &[i8]) -> [i32; 8] {
    std::array::from_fn(|l| (4 * l..4 * l + 4).map(|k| q[k] as i32 * a[k] as i32).sum())
}

/// `acc[l] += d * sumi[l]` with one rounding per lane, as `_mm256_fmadd_ps(d, cvt(sumi), acc)`.
#[inline(always)]
pub(super) fn fma_lanes(acc: &mut [f32; 8], d: f32, sumi: &[i32; 8]) {
    for (a, &s) in acc.iter_mut().zip(sumi) {
        *a = d.mul_add(s as f32, *a);
    }
}
