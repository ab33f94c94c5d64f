//! Matrix-vector products over quantised rows, spread across all cores.

use rayon::prelude::*;

use crate::model::tensor::Tensor;
use crate::model::weights::Linear;
use crate::quant::{self, ActivationBuffer};

/// Rows handed to one rayon task: enough to amortise scheduling (a few microseconds) over
/// dot products of well under a microsecond each, small enough to balance two to sixteen cores.
const ROWS_PER_TASK: usize = 64;

/// `out = W x`, where `act` holds `x` quantised for `w.dtype`.
pub fn matvec(w: &Tensor, act: &ActivationBuffer, out: &mut [f32]) {
    debug_assert_eq!(out.len(), w.rows);
    let row_bytes = w.row_bytes();
    let bytes = w.bytes();
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK * row_bytes;
            let rows = &bytes[first..first + chunk.len() * row_bytes];
            quant::matvec(w.dtype, rows, act, chunk);
        });
}

/// `out = W x + b`: quantises `x` for the weight's dtype into `act`, then multiplies.
pub fn linear(l: &Linear, x: &[f32], act: &mut ActivationBuffer, out: &mut [f32]) {
    act.quantize_for(l.weight.dtype, x)
        .expect("activation length matches the weight's columns (checked at load time)");
    matvec(&l.weight, act, out);
    if let Some(b) = &l.bias {
        for (o, &bv) in out.iter_mut().zip(b) {
            *o += bv;
        }
    }
}

/// `out[b] = W x_b` for a batch of activations (`acts[b]` holds `x_b` quantised for `w.dtype`);
/// `out` is `acts.len()` rows of `w.rows`. Each weight row is dotted with every activation
/// while it is in cache, so the weights stream from memory once per batch instead of once per
/// token; every product is the same [`quant::vec_dot`] as in [`matvec`], so each `out[b]` equals
/// `matvec(w, acts[b])` bit for bit. `scratch` holds the row-major transpose between the two.
pub fn matmul(w: &Tensor, acts: &[ActivationBuffer], scratch: &mut Vec<f32>, out: &mut [f32]) {
    let (n, rows) = (acts.len(), w.rows);
    debug_assert_eq!(out.len(), n * rows);
    let row_bytes = w.row_bytes();
    let bytes = w.bytes();
    scratch.clear();
    scratch.resize(n * rows, 0.0);
    // Tasks own whole weight rows: `scratch[r * n + b] = row_r . x_b`.
    scratch
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            for (i, dots) in chunk.chunks_exact_mut(n).enumerate() {
                let row = &bytes[(first + i) * row_bytes..(first + i + 1) * row_bytes];
                let mut groups = dots.chunks_exact_mut(4).zip(acts.chunks_exact(4));
                for (d, a) in &mut groups {
                    d.copy_from_slice(&quant::vec_dot4(
                        w.dtype,
                        [row; 4],
                        [&a[0], &a[1], &a[2], &a[3]],
                    ));
                }
                let done = n - n % 4;
                for (d, act) in dots[done..].iter_mut().zip(&acts[done..]) {
                    *d = quant::vec_dot(w.dtype, row, act);
                }
            }
        });
    for (r, dots) in scratch.chunks_exact(n).enumerate() {
        for (b, &d) in dots.iter().enumerate() {
            out[b * rows + r] = d;
        }
    }
}

/// [`linear`] for a batch: `xs` and `out` are `acts.len()` rows (of `l`'s columns and rows).
pub fn linear_batch(
    l: &Linear,
    xs: &[f32],
    acts: &mut [ActivationBuffer],
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    matmul_rows(&l.weight, xs, acts, scratch, out);
    if let Some(b) = &l.bias {
        for row in out.chunks_exact_mut(l.weight.rows) {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

/// `out[i] = W xs[i]` for a batch: each row of `xs` quantised for `W`'s dtype into `acts`,
/// then [`matmul`].
pub fn matmul_rows(
    w: &Tensor,
    xs: &[f32],
    acts: &mut [ActivationBuffer],
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    quantize_rows(w.dtype, xs, acts);
    matmul(w, acts, scratch, out);
}

/// Quantises each row of `xs` into `acts` for weights of `dtype`.
fn quantize_rows(dtype: crate::quant::DType, xs: &[f32], acts: &mut [ActivationBuffer]) {
    let cols = xs.len() / acts.len();
    acts.par_iter_mut()
        .zip(xs.par_chunks(cols))
        .for_each(|(act, x)| {
            act.quantize_for(dtype, x)
                .expect("activation length matches the weight's columns (checked at load time)")
        });
}
