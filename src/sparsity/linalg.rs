//! The few dense kernels predictor training needs, on row-major f32 matrices.
//!
//! Written as dot products and axpys over contiguous rows, with independent partial sums,
//! so the compiler vectorises them; on x86-64 with AVX2+FMA the same loops are compiled for
//! those instructions. Training is a one-off step of `calibrate`, so this is all it needs.

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_simd() {
        // SAFETY: use_simd() checked that the CPU has avx2 and fma.
        return unsafe { axpy_avx2(a, x, y) };
    }
    axpy_plain(a, x, y)
}

/// `x . y`.
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_simd() {
        // SAFETY: as in `axpy`.
        return unsafe { dot_avx2(x, y) };
    }
    dot_plain(x, y)
}

#[inline(always)]
fn axpy_plain(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn dot_plain(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xs, ys) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += xs[k] * ys[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    dot_plain(x, y)
}

/// `c[m x n] = a[m x k] * b[n x k]^T` (every entry a dot product of two rows).
pub fn matmul_nt(a: &[f32], b: &[f32], k: usize, c: &mut [f32]) {
    let n = b.len() / k;
    for (arow, crow) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)) {
        for (cv, brow) in crow.iter_mut().zip(b.chunks_exact(k)) {
            *cv = dot(arow, brow);
        }
    }
}

/// `c[m x n] = a[m x k] * b[k x n]`.
pub fn matmul_nn(a: &[f32], b: &[f32], k: usize, c: &mut [f32]) {
    let n = b.len() / k;
    for (arow, crow) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)) {
        crow.fill(0.0);
        for (&av, brow) in arow.iter().zip(b.chunks_exact(n)) {
            if av != 0.0 {
                axpy(av, brow, crow);
            }
        }
    }
}

/// `c[k x n] += a[m x k]^T * b[m x n]` (a sum of outer products, as weight gradients are).
pub fn matmul_tn_acc(a: &[f32], b: &[f32], k: usize, c: &mut [f32]) {
    let n = c.len() / k;
    for (arow, brow) in a.chunks_exact(k).zip(b.chunks_exact(n)) {
        for (&av, crow) in arow.iter().zip(c.chunks_exact_mut(n)) {
            if av != 0.0 {
                axpy(av, brow, crow);
            }
        }
    }
}

/// Orthonormalises the columns of `q[rows x cols]` in place (modified Gram-Schmidt); a
/// column that collapses to zero is left zero.
pub fn orthonormalize_columns(q: &mut [f32], cols: usize) {
    let rows = q.len() / cols;
    let mut col = vec![0.0f32; rows];
    let mut other = vec![0.0f32; rows];
    for j in 0..cols {
        (0..rows).for_each(|i| col[i] = q[i * cols + j]);
        for p in 0..j {
            (0..rows).for_each(|i| other[i] = q[i * cols + p]);
            let r = dot(&col, &other);
            axpy(-r, &other, &mut col);
        }
        let norm = dot(&col, &col).sqrt();
        let scale = if norm > 1e-12 { 1.0 / norm } else { 0.0 };
        (0..rows).for_each(|i| q[i * cols + j] = col[i] * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    fn seq(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32 * 2654435761u32) ^ seed) % 97) as f32 / 48.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_match_the_definition() {
        let (m, k, n) = (5, 19, 11);
        let a = seq(m * k, 1);
        let b = seq(k * n, 2);
        let want = naive(&a, &b, m, k, n);
        let close = |x: &[f32]| x.iter().zip(&want).all(|(p, q)| (p - q).abs() < 1e-4);

        let mut c = vec![0.0; m * n];
        matmul_nn(&a, &b, k, &mut c);
        assert!(close(&c));
        matmul_nt(&a, &transpose(&b, k, n), k, &mut c);
        assert!(close(&c));
        // a^T^T * b: pass a^T as the m x k operand of the transposed product.
        let mut c2 = vec![0.0; m * n];
        matmul_tn_acc(&transpose(&a, m, k), &b, m, &mut c2);
        assert!(c2.iter().zip(&want).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    #[test]
    fn gram_schmidt_gives_orthonormal_columns() {
        let (rows, cols) = (40, 6);
        let mut q = seq(rows * cols, 7);
        orthonormalize_columns(&mut q, cols);
        let t = transpose(&q, rows, cols);
        for i in 0..cols {
            for j in 0..cols {
                let d = dot(&t[i * rows..(i + 1) * rows], &t[j * rows..(j + 1) * rows]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-4, "({i},{j}) = {d}");
            }
        }
    }
}
