//! Quantised dot products and (de)quantisation, bit-compatible with ggml's CPU path.
//!
//! A matvec `y = W x` quantises `x` once ([`ActivationBuffer::quantize_for`]) into the form the
//! weight dtype's kernel wants (Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K for
//! Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS, plain f32 for float weights), then calls [`vec_dot`] once
//! per weight row. This is exactly llama.cpp's scheme, so our logits track its logits closely.
//!
//! [`Activations::F32`] (`--activations f32`) instead keeps `x` in f32 for every weight dtype
//! and dots it with the dequantised row: the GPU backend's arithmetic, for comparing the two.
//! The choice belongs to each model's weights and is carried by each [`ActivationBuffer`], so
//! two engines in one process may compute differently.
//!
//! Weight rows are raw GGUF bytes at any alignment: every block field is read with
//! `from_le_bytes` (scalar) or unaligned loads (SIMD); nothing casts `&[u8]` to a block type.
//! Each format lives in its own file with a scalar reference and, on x86_64, an AVX2+FMA+F16C
//! kernel picked at run time, and implements `Format` there (after candle's `GgmlType`):
//! its block geometry, activation form, dequantisation and dots. The public functions below
//! dispatch on the dtype through `by_format!`, the one `match` over the formats, so a new
//! format is a `DType` variant, its file with one `Format` impl, and one line there.

mod dtype;
pub use dtype::DType;
mod float;
/// An f16 row dotted with f32 values (the predictors use it directly).
pub use float::dot_f16;
mod iq4_nl;
mod iq4_xs;
mod q2_k;
mod q3_k;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod q8_k;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// How activations meet quantised weights. A setting of each model
/// ([`ModelWeights::activations`](crate::model::weights::ModelWeights::activations)), carried
/// by every [`ActivationBuffer`] its compute makes, so two engines in one process may differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Activations {
    /// Quantised to Q8 blocks and dotted in integers, as llama.cpp does (its logits, to the
    /// bit).
    #[default]
    Q8,
    /// Kept in f32 and dotted with the dequantised weights, as the GPU backend does (slower:
    /// each row is dequantised on every use).
    F32,
}

/// Errors from (de)quantisation. Messages say what was expected, what was found, what to do.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{dtype}: {len} values is not a whole number of {block}-value blocks; rows of {dtype} must have a multiple of {block} columns")]
    PartialBlock {
        dtype: DType,
        len: usize,
        block: usize,
    },
    #[error("{dtype}: {bytes} bytes is not a whole number of {block_bytes}-byte blocks; the tensor data is truncated or has the wrong dtype")]
    PartialBytes {
        dtype: DType,
        bytes: usize,
        block_bytes: usize,
    },
    #[error("{dtype}: the input holds {expected} values but the output has room for {found}; size the output to match")]
    OutputLength {
        dtype: DType,
        expected: usize,
        found: usize,
    },
    #[error("quantising f32 to {0} is not implemented; use Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a float dtype")]
    Unsupported(DType),
}

/// The form an activation vector is in, borrowed from an [`ActivationBuffer`].
#[derive(Clone, Copy, Debug)]
pub enum QuantizedActivation<'a> {
    /// Plain f32, for F32/F16/BF16 weights.
    F32(&'a [f32]),
    /// ggml `block_q8_0`, for Q4_0, Q5_0, Q8_0 and IQ4_NL weights.
    Q8_0(&'a Q8Act),
    /// ggml `block_q8_1` (Q8_0 plus `s = d * sum(qs)`), for Q4_1 and Q5_1 weights.
    Q8_1(&'a Q8Act),
    /// ggml `block_q8_K`, for the K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_XS.
    Q8K(&'a Q8KAct),
}

/// A Q8_0 / Q8_1 activation as structure of arrays (contiguous `qs` suit SIMD loads).
#[derive(Clone, Debug, Default)]
pub struct Q8Act {
    /// 32 values per block.
    pub qs: Vec<i8>,
    /// Per-block scale; ggml stores it as f16, so this is the f16-rounded value.
    pub d: Vec<f32>,
    /// Q8_1 only: per-block `d * sum(qs)`, f16-rounded like ggml's `block_q8_1.s`.
    pub s: Vec<f32>,
}

/// A Q8_K activation: 256 values per block, f32 scale, sums of each 16 values.
#[derive(Clone, Debug, Default)]
pub struct Q8KAct {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    /// 16 per block: the sum of each run of 16 `qs`.
    pub bsums: Vec<i16>,
}

impl Q8KAct {
    /// Whether it holds `nb` whole blocks (values, scales and run sums): what every K-quant
    /// kernel checks before its unchecked SIMD loads.
    pub fn holds(&self, nb: usize) -> bool {
        self.qs.len() >= nb * q8_k::QK && self.d.len() >= nb && self.bsums.len() >= nb * 16
    }
}

/// One block format of a weight row, implemented in the format's own file.
trait Format {
    const DTYPE: DType;
    /// Values per block, and bytes per block: what [`DType::block_len`] and
    /// [`DType::block_bytes`] return.
    const BLOCK_LEN: usize;
    const BLOCK_BYTES: usize;
    /// The activation form its dot kernel reads.
    const ACT: ActKind;

    /// Whole blocks to f32 (`out` holds exactly their values).
    fn dequantize(bytes: &[u8], out: &mut [f32]);

    /// A row of whole blocks dotted with an activation of form [`Self::ACT`], as many values.
    fn dot(row: &[u8], act: &ActivationBuffer, simd: bool) -> f32;

    /// f32 to whole blocks appended to `out`, as ggml's reference quantiser does; the formats
    /// whose quantisers search scales (the K-quants, IQ4) are not implemented.
    fn quantize(x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        let _ = (x, out);
        Err(QuantError::Unsupported(Self::DTYPE))
    }

    /// `row · acts[k]` for four activations at once, interleaved, equal to [`Self::dot`] bit
    /// for bit; `None` where the format has no such kernel.
    ///
    /// # Safety
    /// avx2, fma and f16c are available, and every activation is of form [`Self::ACT`] with
    /// as many values as the row.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_acts4(row: &[u8], acts: [&ActivationBuffer; 4]) -> Option<[f32; 4]> {
        let _ = (row, acts);
        None
    }

    /// `rows[k] · acts[k]` for four rows at once, as [`Self::dot_acts4`] does for one row.
    ///
    /// # Safety
    /// As for [`Self::dot_acts4`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot4(rows: [&[u8]; 4], acts: [&ActivationBuffer; 4]) -> Option<[f32; 4]> {
        let _ = (rows, acts);
        None
    }
}

/// Evaluates `$body` with `$f` naming the [`Format`] of `$dtype`: the one place that maps
/// dtypes to their formats.
macro_rules! by_format {
    ($dtype:expr, $f:ident => $body:expr) => {
        by_format!(@match $dtype, $f, $body;
            F32 => float::F32,
            F16 => float::F16,
            BF16 => float::BF16,
            Q4_0 => q4_0::Q4_0,
            Q4_1 => q4_1::Q4_1,
            Q5_0 => q5_0::Q5_0,
            Q5_1 => q5_1::Q5_1,
            Q8_0 => q8_0::Q8_0,
            Q2K => q2_k::Q2K,
            Q3K => q3_k::Q3K,
            Q4K => q4_k::Q4K,
            Q5K => q5_k::Q5K,
            Q6K => q6_k::Q6K,
            IQ4NL => iq4_nl::IQ4NL,
            IQ4XS => iq4_xs::IQ4XS,
        )
    };
    (@match $dtype:expr, $f:ident, $body:expr; $($variant:ident => $format:ty,)*) => {
        match $dtype {
            $(DType::$variant => {
                type $f = $format;
                $body
            })*
        }
    };
}

impl DType {
    /// Elements per block (1 for plain floats), as the format declares it.
    pub fn block_len(self) -> usize {
        by_format!(self, F => F::BLOCK_LEN)
    }

    /// Bytes per block, as the format declares it.
    pub fn block_bytes(self) -> usize {
        by_format!(self, F => F::BLOCK_BYTES)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    Empty,
    F32,
    Q8_0,
    Q8_1,
    Q8K,
}

/// Reusable scratch for one quantised activation vector, in the arithmetic it was made for.
/// Each form keeps its own buffers, so alternating between weight dtypes reuses capacity
/// instead of reallocating.
#[derive(Clone, Debug)]
pub struct ActivationBuffer {
    mode: Activations,
    kind: ActKind,
    f32: Vec<f32>,
    q8: Q8Act,
    q8k: Q8KAct,
}

impl Default for ActivationBuffer {
    /// A buffer in llama.cpp's arithmetic ([`Activations::Q8`]).
    fn default() -> Self {
        Self::new(Activations::default())
    }
}

impl ActivationBuffer {
    /// An empty buffer that quantises in `mode`'s arithmetic.
    pub fn new(mode: Activations) -> Self {
        ActivationBuffer {
            mode,
            kind: ActKind::Empty,
            f32: Vec::new(),
            q8: Q8Act::default(),
            q8k: Q8KAct::default(),
        }
    }

    /// Quantises `x` in the form that `weight`'s dot kernel expects. `x.len()` must be a
    /// multiple of `weight`'s block length.
    pub fn quantize_for(&mut self, weight: DType, x: &[f32]) -> Result<(), QuantError> {
        check_whole_blocks(weight, x.len())?;
        self.kind = ActKind::Empty;
        let form = match self.mode {
            Activations::F32 => ActKind::F32,
            Activations::Q8 => act_kind_for(weight),
        };
        match form {
            ActKind::F32 => {
                self.f32.clear();
                self.f32.extend_from_slice(x);
            }
            ActKind::Q8_0 => q8_0::quantize_act(x, &mut self.q8, false),
            ActKind::Q8_1 => q8_0::quantize_act(x, &mut self.q8, true),
            ActKind::Q8K => q8_k::quantize_act(x, &mut self.q8k),
            ActKind::Empty => unreachable!("act_kind_for never gives Empty"),
        }
        self.kind = form;
        Ok(())
    }

    /// The activation currently held, or `None` before the first `quantize_for`.
    pub fn activation(&self) -> Option<QuantizedActivation<'_>> {
        Some(match self.kind {
            ActKind::Empty => return None,
            ActKind::F32 => QuantizedActivation::F32(&self.f32),
            ActKind::Q8_0 => QuantizedActivation::Q8_0(&self.q8),
            ActKind::Q8_1 => QuantizedActivation::Q8_1(&self.q8),
            ActKind::Q8K => QuantizedActivation::Q8K(&self.q8k),
        })
    }

    /// Number of activation values held.
    pub fn len(&self) -> usize {
        match self.kind {
            ActKind::Empty => 0,
            ActKind::F32 => self.f32.len(),
            ActKind::Q8_0 | ActKind::Q8_1 => self.q8.qs.len(),
            ActKind::Q8K => self.q8k.qs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The activation form each weight dtype's kernel reads.
fn act_kind_for(dtype: DType) -> ActKind {
    by_format!(dtype, F => F::ACT)
}

/// Dot product of one weight row (raw bytes of whole `dtype` blocks) with the activation in
/// `act`.
///
/// # Panics
/// If `act` was not quantised for `dtype`, or the row holds a different number of values than
/// `act`: both are caller bugs, and the check costs two compares per row.
pub fn vec_dot(dtype: DType, row: &[u8], act: &ActivationBuffer) -> f32 {
    check_dot(dtype, row, act);
    let simd = use_simd();
    if act.kind == ActKind::F32 && act_kind_for(dtype) != ActKind::F32 {
        return dot_dequantized(dtype, row, &act.f32, simd);
    }
    by_format!(dtype, F => F::dot(row, act, simd))
}

/// Four dot products `rows[k] · acts[k]` at once, each equal to [`vec_dot`]`(dtype, rows[k],
/// acts[k])` bit for bit; interleaved where an AVX2 kernel exists (one row with four
/// activations: Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and IQ4_XS; four rows with one
/// activation: Q4_1, Q5_0, Q5_1), one by one otherwise.
pub fn vec_dot4(dtype: DType, rows: [&[u8]; 4], acts: [&ActivationBuffer; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if use_simd() && acts.iter().all(|a| a.kind == act_kind_for(dtype)) {
        for (row, act) in rows.iter().zip(&acts) {
            check_dot(dtype, row, act);
        }
        let one_row = rows.iter().all(|r| std::ptr::eq(*r, rows[0]));
        // SAFETY: use_simd() found avx2, fma and f16c; the activations are of the right kind
        // and length (checked above).
        let four = unsafe {
            match one_row {
                true => by_format!(dtype, F => F::dot_acts4(rows[0], acts)),
                false => by_format!(dtype, F => F::dot4(rows, acts)),
            }
        };
        if let Some(four) = four {
            return four;
        }
    }
    std::array::from_fn(|k| vec_dot(dtype, rows[k], acts[k]))
}

/// A quantised row dotted with f32 activations: the row dequantised a block at a time
/// ([`dequantize`], exact), each block's dot summed in f32.
fn dot_dequantized(dtype: DType, row: &[u8], x: &[f32], simd: bool) -> f32 {
    // The largest block holds 256 values (the K-quants).
    let mut w = [0f32; 256];
    let (bytes, len) = (dtype.block_bytes(), dtype.block_len());
    let mut acc = 0.0;
    for (block, xs) in row.chunks_exact(bytes).zip(x.chunks_exact(len)) {
        let w = &mut w[..len];
        dequantize(dtype, block, w).expect("whole blocks (checked by check_dot)");
        acc += float::dot_f32(bytemuck::cast_slice(w), xs, simd);
    }
    acc
}

/// `vec_dot`'s contract: `act` quantised for `dtype` (or kept in f32 under
/// [`Activations::F32`]), as many values as the row.
fn check_dot(dtype: DType, row: &[u8], act: &ActivationBuffer) {
    assert!(
        act.kind == act_kind_for(dtype)
            || (act.kind == ActKind::F32 && act.mode == Activations::F32),
        "vec_dot: activation was not quantised for {dtype}"
    );
    assert!(
        row.len().is_multiple_of(dtype.block_bytes())
            && row.len() / dtype.block_bytes() * dtype.block_len() == act.len(),
        "vec_dot: {dtype} row of {} bytes does not match an activation of {} values",
        row.len(),
        act.len()
    );
}

/// `out[r] = row_r · act` for `rows` consecutive rows in `weights`, single-threaded. The
/// parallel matvec splits rows across threads and calls this per chunk.
pub fn matvec(dtype: DType, weights: &[u8], act: &ActivationBuffer, out: &mut [f32]) {
    let row_bytes = act.len() / dtype.block_len() * dtype.block_bytes();
    assert_eq!(
        weights.len(),
        row_bytes * out.len(),
        "matvec: {dtype} weights of {} bytes are not {} rows of {row_bytes} bytes",
        weights.len(),
        out.len()
    );
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    let mut rows = weights.chunks_exact(row_bytes);
    let mut outs = out.chunks_exact_mut(4);
    for (r, ys) in (&mut outs).enumerate() {
        prefetch(weights, (4 * r + PREFETCH_ROWS) * row_bytes, 4 * row_bytes);
        let four: [&[u8]; 4] = std::array::from_fn(|_| rows.next().expect("4 rows per 4 outputs"));
        ys.copy_from_slice(&vec_dot4(dtype, four, [act; 4]));
    }
    for (y, row) in outs.into_remainder().iter_mut().zip(rows) {
        *y = vec_dot(dtype, row, act);
    }
}

/// How many rows ahead `matvec` asks the cache for. Weights stream from DRAM once per token;
/// the hardware prefetcher stops at 4 KiB page boundaries (the weights are a memory-mapped
/// file), so without hints a single core stalls on every new page.
const PREFETCH_ROWS: usize = 4;

/// Hints the cache lines of `bytes[at..at + len]` into cache; out-of-range parts are skipped.
#[inline(always)]
fn prefetch(bytes: &[u8], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (at + len).min(bytes.len());
        let mut p = at;
        while p < end {
            // SAFETY: `p < bytes.len()`, so the pointer is inside the slice; prefetch never
            // faults and has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch(
                    bytes.as_ptr().add(p).cast(),
                    std::arch::x86_64::_MM_HINT_T0,
                )
            };
            p += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at, len);
}

/// Dequantises whole blocks of `dtype` into f32: the reference used by tests and loaders.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let bb = dtype.block_bytes();
    if !bytes.len().is_multiple_of(bb) {
        return Err(QuantError::PartialBytes {
            dtype,
            bytes: bytes.len(),
            block_bytes: bb,
        });
    }
    let n = bytes.len() / bb * dtype.block_len();
    if out.len() != n {
        return Err(QuantError::OutputLength {
            dtype,
            expected: n,
            found: out.len(),
        });
    }
    by_format!(dtype, F => F::dequantize(bytes, out));
    Ok(())
}

/// `out += a * dequantize(bytes)`: a weighted column added in place (the sparse FFN's down
/// projection), with the roundings of dequantising first and adding after (`w = d * q`, then
/// `out + a * w`), in one pass for Q8_0 on AVX2.
pub fn axpy(dtype: DType, a: f32, bytes: &[u8], out: &mut [f32]) {
    let (bb, bl) = (dtype.block_bytes(), dtype.block_len());
    assert!(
        bytes.len().is_multiple_of(bb) && bytes.len() / bb * bl == out.len(),
        "axpy: {dtype} column of {} bytes does not hold {} values",
        bytes.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::Q8_0 && use_simd() {
        // SAFETY: use_simd() found avx2, fma and f16c; the lengths match (checked above).
        return unsafe { q8_0::axpy_avx2(a, bytes, out) };
    }
    let mut w = [0.0f32; 256];
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        let w = &mut w[..bl];
        dequantize(dtype, b, w).expect("whole blocks (checked above)");
        for (o, &w) in o.iter_mut().zip(w.iter()) {
            *o += a * w;
        }
    }
}

/// [`axpy`] of one column into four outputs, `outs[k] += a[k] * dequantize(bytes)`, each
/// bit for bit as `axpy` would do it; outputs whose `a[k]` is zero are not touched.
pub fn axpy4(dtype: DType, a: [f32; 4], bytes: &[u8], outs: [&mut [f32]; 4]) {
    let (bb, bl) = (dtype.block_bytes(), dtype.block_len());
    assert!(
        bytes.len().is_multiple_of(bb) && outs.iter().all(|o| bytes.len() / bb * bl == o.len()),
        "axpy4: {dtype} column of {} bytes does not match the outputs",
        bytes.len()
    );
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::Q8_0 && use_simd() {
        // SAFETY: use_simd() found avx2, fma and f16c; the lengths match (checked above).
        return unsafe { q8_0::axpy4_avx2(a, bytes, outs) };
    }
    for (a, out) in a.into_iter().zip(outs) {
        if a != 0.0 {
            axpy(dtype, a, bytes, out);
        }
    }
}

/// Quantises `x` into `dtype` blocks appended to `out` (cleared first), matching ggml's
/// `quantize_row_*_ref`. The K-quants and IQ4 formats are not implemented (their quantisers
/// search scales).
pub fn quantize(dtype: DType, x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
    check_whole_blocks(dtype, x.len())?;
    out.clear();
    out.reserve(x.len() / dtype.block_len() * dtype.block_bytes());
    by_format!(dtype, F => F::quantize(x, out))
}

fn check_whole_blocks(dtype: DType, len: usize) -> Result<(), QuantError> {
    let block = dtype.block_len();
    if !len.is_multiple_of(block) {
        return Err(QuantError::PartialBlock { dtype, len, block });
    }
    Ok(())
}

/// Whether the AVX2+FMA+F16C kernels may run on this CPU (detected once).
#[cfg(target_arch = "x86_64")]
pub fn use_simd() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn use_simd() -> bool {
    false
}

/// The little-endian f16 at `b[at..at + 2]`, as f32.
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The sum of eight f32 lanes in the order of `x86::hsum_ps` (ggml's `hsum_float_8`): lane
/// i + 4 onto lane i, then lanes 2, 3 onto 0, 1, then lane 1 onto 0. The scalar Q5 references
/// sum this way so that they equal their AVX2 kernels to the bit.
#[inline(always)]
fn hsum_lanes(l: [f32; 8]) -> f32 {
    let s = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// Rounds through f16, as ggml does when it stores a scale in a `ggml_half`.
#[inline(always)]
fn round_f16(x: f32) -> (f32, [u8; 2]) {
    let h = half::f16::from_f32(x);
    (h.to_f32(), h.to_le_bytes())
}

/// The dtype `dtype`'s [`Format`] impl declares (for the test that the dispatch maps each
/// dtype to its own format; `mod tests` is declared above the dispatch macro).
#[cfg(test)]
fn format_dtype(dtype: DType) -> DType {
    by_format!(dtype, F => F::DTYPE)
}
