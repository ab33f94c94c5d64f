//! Elementwise and normalisation ops of a transformer layer, in f32.

use crate::model::config::RopeStyle;
use crate::model::weights::Norm;

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Sum of squares in f64, as ggml does, so the scale is the same to the last bit.
    let sum_sq: f64 = x.iter().map(|v| (v * v) as f64).sum();
    let mean_sq = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// LayerNorm: `out = (x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let scale = 1.0 / (var + eps).sqrt();
    for (i, o) in out.iter_mut().enumerate() {
        *o = (x[i] - mean) * scale * weight[i] + bias.map_or(0.0, |b| b[i]);
    }
}

/// Applies `norm` as LayerNorm when it has a bias (OPT), RMSNorm otherwise (llama family).
pub fn apply_norm(norm: &Norm, x: &[f32], eps: f32, out: &mut [f32]) {
    match &norm.bias {
        Some(b) => layer_norm(x, &norm.weight, Some(b), eps, out),
        None => rms_norm(x, &norm.weight, eps, out),
    }
}

/// ggml's rotary cache for position `pos`: `(cos, sin)` of `pos * theta^(-2i/head_dim)` for each
/// pair i, with the angle built as ggml builds it (a running f32 product, not a power per
/// pair) so that the rotations agree with llama.cpp to the last bit.
pub fn rope_angles(pos: usize, head_dim: usize, theta: f32, out: &mut Vec<[f32; 2]>) {
    out.clear();
    let step = theta.powf(-2.0 / head_dim as f32);
    let mut angle = pos as f32;
    for _ in 0..head_dim / 2 {
        out.push([angle.cos(), angle.sin()]);
        angle *= step;
    }
}

/// Rotates each head of `x` (a concatenation of heads of `head_dim`) by `angles` (from
/// [`rope_angles`]). The fused multiply-adds are where GCC puts them in ggml's rope loop, again
/// for bit-equality.
pub fn rope(x: &mut [f32], head_dim: usize, angles: &[[f32; 2]], style: RopeStyle) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_simd() {
        // SAFETY: use_simd() found avx2, fma and f16c on this CPU.
        return unsafe { rope_fma(x, head_dim, angles, style) };
    }
    rope_lanes(x, head_dim, angles, style)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_fma(x: &mut [f32], head_dim: usize, angles: &[[f32; 2]], style: RopeStyle) {
    rope_lanes(x, head_dim, angles, style)
}

/// `mul_add` compiles to one instruction where FMA is enabled (the caller above, aarch64) and
/// to an exact libm call elsewhere: the same bits either way.
#[inline(always)]
fn rope_lanes(x: &mut [f32], head_dim: usize, angles: &[[f32; 2]], style: RopeStyle) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &[cos, sin]) in angles.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0.mul_add(cos, -(x1 * sin));
            head[b] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// `x * sigmoid(x)`, computed as ggml's vectorised `ggml_v_silu` computes each lane (its own
/// polynomial `exp`, not libm's), so SwiGLU activations equal llama.cpp's bit for bit.
pub fn silu(x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_simd() {
        // SAFETY: use_simd() found avx2, fma and f16c on this CPU.
        return unsafe { silu_fma(x) };
    }
    silu_lane(x)
}

/// `up[i] *= silu(gate[i])`: the SwiGLU activation in place.
pub fn swiglu(up: &mut [f32], gate: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_simd() {
        // SAFETY: as in `silu`.
        return unsafe { swiglu_fma(up, gate) };
    }
    swiglu_lanes(up, gate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_fma(x: f32) -> f32 {
    silu_lane(x)
}

/// GELU, tanh approximation, as ggml's CPU backend computes it on f32 rows (GGML_GELU_FP16,
/// its default): 0 below -10, the identity above 10, and in between a table indexed by the
/// input rounded to f16, holding `gelu(x)` rounded to f16. So Gemma's activations equal
/// llama.cpp's to the bit.
pub fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        gelu_table()[half::f16::from_f32(x).to_bits() as usize]
    }
}

/// One neuron of GeGLU: `gelu(g) * u` (exactly 0 below -10, as ggml's `ggml_vec_geglu_f32`).
pub fn geglu_one(g: f32, u: f32) -> f32 {
    if g <= -10.0 {
        0.0
    } else {
        gelu(g) * u
    }
}

/// `up[i] = gelu(gate[i]) * up[i]`: the GeGLU activation in place.
pub fn geglu(up: &mut [f32], gate: &[f32]) {
    for (u, &g) in up.iter_mut().zip(gate) {
        *u = geglu_one(g, *u);
    }
}

/// Gemma's per-head RMSNorm of queries or keys, in place (`scratch` holds one head).
pub fn head_norm(norm: &Norm, x: &mut [f32], head_dim: usize, eps: f32, scratch: &mut Vec<f32>) {
    scratch.resize(head_dim, 0.0);
    for head in x.chunks_exact_mut(head_dim) {
        apply_norm(norm, head, eps, scratch);
        head.copy_from_slice(scratch);
    }
}

/// `logits = cap * tanh(logits / cap)` (ggml: scale by `1/cap`, tanh, scale by `cap`).
pub fn softcap(logits: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for l in logits {
        *l = (*l * inv).tanh() * cap;
    }
}

/// ggml's `ggml_gelu_f32`, `0.5x(1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`, with the one
/// fused multiply-add GCC makes of it in ggml's table setup (`1 + (0.044715 x) x`) and libm's
/// `tanhf`.
fn gelu_exact(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    // ggml's 0.79788456080286535587989211986876f, as the f32 it rounds to.
    let sqrt_2_over_pi = f32::from_bits(0x3f4c_422a);
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    let t = (sqrt_2_over_pi * x * inner).tanh();
    (1.0 + t) * (0.5 * x)
}

/// `gelu_exact` of every f16 value, rounded to f16 and widened back (ggml's
/// `ggml_table_gelu_f16`), built on first use.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                half::f16::from_f32(gelu_exact(x)).to_f32()
            })
            .collect()
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(up: &mut [f32], gate: &[f32]) {
    swiglu_lanes(up, gate)
}

#[inline(always)]
fn swiglu_lanes(up: &mut [f32], gate: &[f32]) {
    for (u, &g) in up.iter_mut().zip(gate) {
        *u *= silu_lane(g);
    }
}

#[inline(always)]
fn silu_lane(x: f32) -> f32 {
    x / (1.0 + exp_lane(0.0 - x))
}

/// One lane of ggml's AVX2 `ggml_v_expf`: `e^x = 2^n * (1 + j(b))` with `n = round(x log2 e)`,
/// `b` the reduced argument and `j` a degree-5 polynomial; the constants are ggml's (given as
/// bit patterns: Rust has no hex float literals).
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x)); // ln 2, hi + lo
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)));
    let j = j.mul_add(u, c(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return k.mul_add(j, k);
    }
    // Out of the direct exponent range: scale in two steps, or saturate.
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// In-place softmax, numerically stable.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `log(softmax(x))[target]`, computed without materialising the softmax.
pub fn log_softmax_at(x: &[f32], target: usize) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    x[target] as f64 - max - sum.ln()
}

pub fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's f16 GELU table, as a hash of its entries: the value a C program with ggml's
    /// expression and flags (gcc -O3 -mavx2 -mfma -mf16c, which makes the one FMA `gelu_exact`
    /// has; without FMA the table differs) printed. Hash: h = h * 1000003 + bits, wrapping.
    #[test]
    fn gelu_table_is_ggmls() {
        let h = (0..=u16::MAX).fold(0u64, |h, bits| {
            let x = half::f16::from_bits(bits).to_f32();
            let y = half::f16::from_f32(gelu_exact(x)).to_bits();
            h.wrapping_mul(1_000_003).wrapping_add(y as u64)
        });
        assert_eq!(h, 0x7b51_72ac_e782_36c2);
        assert_eq!(gelu(-10.5), 0.0);
        assert_eq!(gelu(12.0), 12.0);
        assert_eq!(geglu_one(-11.0, f32::INFINITY), 0.0);
        assert!((gelu(1.0) - 0.841_192).abs() < 1e-3);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0, -4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] + 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, &[1.0; 4], Some(&[0.5; 4]), 0.0, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6);
        let var: f32 = out.iter().map(|v| (v - 0.5).powi(2)).sum::<f32>() / 4.0;
        assert!((var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rope_styles_pair_different_dims_and_keep_norm() {
        let mut angles = Vec::new();
        rope_angles(3, 4, 10000.0, &mut angles);
        let base = [1.0, 2.0, 3.0, 4.0];
        let (mut a, mut h) = (base, base);
        rope(&mut a, 4, &angles, RopeStyle::Adjacent);
        rope(&mut h, 4, &angles, RopeStyle::Halves);
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&a) - norm(&base)).abs() < 1e-4);
        assert!((norm(&h) - norm(&base)).abs() < 1e-4);
        // Pair 0 rotates by 3 rad: adjacent pairs (x0, x1), halves pairs (x0, x2).
        let (s, c) = 3f32.sin_cos();
        assert!((a[0] - (c - 2.0 * s)).abs() < 1e-5);
        assert!((h[0] - (c - 3.0 * s)).abs() < 1e-5);
        let mut zero = base;
        rope_angles(0, 4, 10000.0, &mut angles);
        rope(&mut zero, 4, &angles, RopeStyle::Adjacent);
        assert_eq!(zero, base);
    }

    #[test]
    fn ggml_exp_is_within_two_ulps_of_libm_and_saturates() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_lane(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}): {got} vs {want}");
            x += 0.0137;
        }
        assert_eq!(exp_lane(-200.0), 0.0);
        assert_eq!(exp_lane(200.0), f32::INFINITY);
        // Past the direct exponent range but representable: the two-step scaling.
        let sub = exp_lane(-95.0);
        assert!(sub > 0.0 && (sub / (-95.0f32).exp() - 1.0).abs() < 1e-3);
    }

    #[test]
    fn silu_and_swiglu_agree_with_the_definition() {
        let gate: Vec<f32> = (0..40).map(|i| i as f32 * 0.7 - 14.0).collect();
        let mut up = vec![1.5f32; 40];
        swiglu(&mut up, &gate);
        for (&u, &g) in up.iter().zip(&gate) {
            let want = 1.5 * g / (1.0 + (-g).exp());
            assert!(
                (u - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{g}: {u} vs {want}"
            );
            assert_eq!(u, 1.5 * silu(g));
        }
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let mut x = [1.0, 2.0, 3.0];
        let l = log_softmax_at(&x, 2);
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((l - (x[2] as f64).ln()).abs() < 1e-6);
    }
}
