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
