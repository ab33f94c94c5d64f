//! Matrix-vector products over quantised rows, spread across all cores.

use rayon::prelude::*;

use crate::backend::cpu::quant::{self, ActivationBuffer};
use crate::model::tensor::Tensor;
use crate::model::weights::Linear;

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
