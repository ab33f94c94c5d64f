//! A batch of prompt tokens through the model at once: the same arithmetic as one
//! [`forward`](super::forward::forward) per token, reorganised so that each weight matrix is
//! read once per batch instead of once per token.
//!
//! Decoding one token is bound by memory bandwidth: every weight byte is read for a handful of
//! multiply-adds. A prompt's tokens are all known up front, so each layer multiplies a whole
//! batch (`matmul`: every weight row dotted with every token's activation while it is in
//! cache). Attention still runs token by token over the cache, each token seeing the positions
//! up to its own. Every product, sum and rounding is the one the single-token path performs, so
//! the logits are bit-for-bit those of feeding the tokens one at a time (tested).
//!
//! The tokens of a batch need not belong to one sequence: [`forward_columns`] takes columns
//! of several sequences, each with its own KV cache (a server decoding many requests at once,
//! see [`crate::engine::batch`]). Only attention looks at a column's sequence.

use crate::backend::cpu::attention::{attend_window, AttnShape};
use crate::backend::cpu::forward::{embed, output, qk_prepare, residual, CpuState, FfnCompute};
use crate::backend::cpu::matvec::{linear_batch, matmul_rows};
use crate::backend::cpu::ops::{add_into, apply_norm, rope_angles, softcap};
use crate::backend::kv_cache::KvCache;
use crate::backend::streamed::OutputRows;
use crate::model::config::Config;
use crate::model::weights::{Layer, ModelWeights};
use crate::quant::{ActivationBuffer, Activations};
use crate::storage::ReadError;

/// Row-major `tokens x width` activations of one batch, allocated once per session and grown
/// to the largest batch seen.
#[derive(Default)]
pub struct BatchState {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    out: Vec<f32>,
    acts: Vec<ActivationBuffer>,
    scratch: Vec<f32>,
    rope: Vec<[f32; 2]>,
    head: Vec<f32>,
    /// One row of normed block output (Gemma's post-norms).
    normed: Vec<f32>,
    logits: Vec<f32>,
    /// Per column: its cache and its position in that cache.
    cache: Vec<usize>,
    pos: Vec<usize>,
}

impl BatchState {
    fn resize(&mut self, c: &Config, mode: Activations, n: usize) {
        let (d, q_dim) = (c.hidden_size, c.n_heads * c.head_dim);
        for (buf, width) in [
            (&mut self.x, d),
            (&mut self.h, d),
            (&mut self.q, q_dim),
            (&mut self.k, c.kv_dim()),
            (&mut self.v, c.kv_dim()),
            (&mut self.att, q_dim),
            (&mut self.out, d),
        ] {
            buf.resize(n * width, 0.0);
        }
        self.acts.resize_with(n, || ActivationBuffer::new(mode));
    }

    /// Keeps only the hidden states of columns `picked` (ascending, each `< n`), moved to the
    /// front in that order, so that [`output_all`] projects just those.
    fn keep_rows(&mut self, picked: &[usize], d: usize) {
        for (j, &col) in picked.iter().enumerate() {
            debug_assert!(j <= col, "picked columns are ascending and distinct");
            self.x.copy_within(col * d..(col + 1) * d, j * d);
        }
        let k = picked.len();
        self.x.truncate(k * d);
        self.h.truncate(k * d);
        self.acts.truncate(k);
    }

    /// Each column's cache and position: its cache's length plus the earlier columns of the
    /// same cache (nothing is committed until the whole batch has run).
    fn place(&mut self, caches: &[KvCache], cols: &[(usize, u32)]) {
        self.cache.clear();
        self.pos.clear();
        for (i, &(cache, _)) in cols.iter().enumerate() {
            let earlier = cols[..i].iter().filter(|col| col.0 == cache).count();
            self.cache.push(cache);
            self.pos.push(caches[cache].len() + earlier);
        }
    }
}

/// Which logits a batch computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits<'a> {
    /// After the last token only, into the session's `CpuState::logits`.
    Last,
    /// After every token, into [`BatchState::logits`] (row-major, one vocabulary per token).
    All,
    /// After the listed columns only (ascending), into [`BatchState::logits`] in that order:
    /// the last token of each prompt in a batch of several (the vocabulary projection is the
    /// costliest matrix, and only those rows are sampled).
    Of(&'a [usize]),
}

impl BatchState {
    /// The logits of the last `Logits::All` or `Logits::Of` batch: `rows x vocab`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Runs `tokens` at positions `kv.len()..` through the model, appends their keys and values to
/// `kv`, and computes `logits`: [`forward_columns`] with one sequence. `ffn` must support
/// batches ([`FfnCompute::batched`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_batch(
    w: &ModelWeights,
    kv: &mut KvCache,
    s: &mut CpuState,
    b: &mut BatchState,
    tokens: &[u32],
    logits: Logits<'_>,
    ffn: &mut dyn FfnCompute,
    rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    let cols: Vec<(usize, u32)> = tokens.iter().map(|&t| (0, t)).collect();
    let caches = std::slice::from_mut(kv);
    forward_columns(w, caches, &cols, s, b, logits, ffn, rows)
}

/// Runs a batch of columns through the model, each column `(cache, token)` a token of the
/// sequence whose keys and values are `caches[cache]`: several independent sequences share
/// every weight read (and every flash read of `ffn.ffn_batch`), while each attends over its
/// own cache only. A column's position is its cache's `len()` plus the number of earlier
/// columns of the same cache, so a sequence may contribute several consecutive tokens.
/// After every layer succeeded each cache advances by its columns (a failed read commits
/// nothing); then `logits` are computed (`Last`: the last column's). Each column's logits
/// are those of [`forward`](super::forward::forward) on its cache alone, to the bit.
/// Every cache index must be `< caches.len()`, with room for its columns (the caller checks).
#[allow(clippy::too_many_arguments)]
pub fn forward_columns(
    w: &ModelWeights,
    caches: &mut [KvCache],
    cols: &[(usize, u32)],
    s: &mut CpuState,
    b: &mut BatchState,
    logits: Logits<'_>,
    ffn: &mut dyn FfnCompute,
    mut rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    let c = &w.config;
    let (n, d) = (cols.len(), c.hidden_size);
    b.resize(c, w.activations, n);
    b.place(caches, cols);
    for (i, &(_, t)) in cols.iter().enumerate() {
        embed(w, s, t, b.pos[i], rows.as_deref_mut())?;
        b.x[i * d..(i + 1) * d].copy_from_slice(&s.x);
    }
    for (l, layer) in w.layers.iter().enumerate() {
        if c.pre_norm {
            norm_rows(&layer.attn_norm, c, &b.x, &mut b.h);
            attention_batch(c, layer, caches, l, b);
            residual_rows(&layer.extra_norms.post_attn, c, b);
            norm_rows(&layer.ffn_norm, c, &b.x, &mut b.h);
            ffn.ffn_batch(l, d, &b.h, &mut b.out)?;
            residual_rows(&layer.extra_norms.post_ffn, c, b);
        } else {
            // Post-norm (OPT-350m): x = norm(x + block(x)).
            b.h.copy_from_slice(&b.x);
            attention_batch(c, layer, caches, l, b);
            add_into(&mut b.x, &b.out);
            norm_rows(&layer.attn_norm, c, &b.x, &mut b.h);
            b.x.copy_from_slice(&b.h);
            ffn.ffn_batch(l, d, &b.h, &mut b.out)?;
            add_into(&mut b.x, &b.out);
            norm_rows(&layer.ffn_norm, c, &b.x, &mut b.h);
            b.x.copy_from_slice(&b.h);
        }
    }
    // A failed read above returns before this: the positions are never committed.
    for &(cache, _) in cols {
        caches[cache].advance();
    }
    match logits {
        Logits::Last if n == 0 => Ok(()),
        Logits::Last => {
            s.x.copy_from_slice(&b.x[(n - 1) * d..]);
            output(w, s, rows)
        }
        Logits::All => output_all(w, s, b, rows),
        // No row wanted: a streamed head is not read for nothing.
        Logits::Of([]) => Ok(()),
        Logits::Of(picked) => {
            b.keep_rows(picked, d);
            output_all(w, s, b, rows)
        }
    }
}

/// Every token's logits into `b.logits`: the vocabulary projection batched when the head is
/// one resident matrix, read once for the batch when it is streamed, row by row for OPT's
/// output projection.
fn output_all(
    w: &ModelWeights,
    s: &mut CpuState,
    b: &mut BatchState,
    mut rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    let (c, n) = (&w.config, b.acts.len());
    let (d, vocab) = (c.hidden_size, c.vocab_size);
    b.logits.resize(n * vocab, 0.0);
    if let (Some(rows), None) = (rows.as_deref_mut(), &w.project_out) {
        match &w.final_norm {
            Some(norm) => norm_rows(norm, c, &b.x, &mut b.h),
            None => b.h.copy_from_slice(&b.x),
        }
        let head = rows.head();
        for (act, h) in b.acts.iter_mut().zip(b.h.chunks_exact(d)) {
            act.quantize_for(head.dtype(), h)
                .expect("lm_head columns match the hidden size (checked at load time)");
        }
        head.matvecs(&b.acts, &mut b.logits)?;
        if let Some(cap) = c.final_logit_softcap {
            softcap(&mut b.logits, cap);
        }
        return Ok(());
    }
    if rows.is_some() || w.project_out.is_some() {
        for (x, out) in b.x.chunks_exact(d).zip(b.logits.chunks_exact_mut(vocab)) {
            s.x.copy_from_slice(x);
            output(w, s, rows.as_deref_mut())?;
            out.copy_from_slice(&s.logits);
        }
        return Ok(());
    }
    match &w.final_norm {
        Some(norm) => norm_rows(norm, c, &b.x, &mut b.h),
        None => b.h.copy_from_slice(&b.x),
    }
    matmul_rows(&w.lm_head, &b.h, &mut b.acts, &mut b.scratch, &mut b.logits);
    if let Some(cap) = c.final_logit_softcap {
        softcap(&mut b.logits, cap);
    }
    Ok(())
}

/// `x += out` row by row, through the post-norm where the model has one (as `forward`).
fn residual_rows(post: &Option<crate::model::weights::Norm>, c: &Config, b: &mut BatchState) {
    let d = c.hidden_size;
    b.normed.resize(d, 0.0);
    for (x, o) in b.x.chunks_exact_mut(d).zip(b.out.chunks_exact(d)) {
        residual(post, c, x, o, &mut b.normed);
    }
}

fn norm_rows(norm: &crate::model::weights::Norm, c: &Config, xs: &[f32], out: &mut [f32]) {
    let d = c.hidden_size;
    for (x, o) in xs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        apply_norm(norm, x, c.norm_eps, o);
    }
}

/// Self-attention of the batch's normed inputs `b.h` into `b.out`: the projections batched,
/// then each column rotated, cached and attending over its own cache up to its position.
fn attention_batch(
    c: &Config,
    layer: &Layer,
    caches: &mut [KvCache],
    l: usize,
    b: &mut BatchState,
) {
    let a = &layer.attn;
    linear_batch(&a.q, &b.h, &mut b.acts, &mut b.scratch, &mut b.q);
    linear_batch(&a.k, &b.h, &mut b.acts, &mut b.scratch, &mut b.k);
    linear_batch(&a.v, &b.h, &mut b.acts, &mut b.scratch, &mut b.v);
    let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.kv_dim());
    let shape = AttnShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    for (i, (&pos, &cache)) in b.pos.iter().zip(&b.cache).enumerate() {
        let kv = &mut caches[cache];
        let q = &mut b.q[i * q_dim..(i + 1) * q_dim];
        let k = &mut b.k[i * kv_dim..(i + 1) * kv_dim];
        if let Some(theta) = c.rope_theta_of(l) {
            rope_angles(pos, c.head_dim, theta, &mut b.rope);
        }
        let scale = qk_prepare(c, layer, q, k, &b.rope, &mut b.head);
        // Columns of one cache come in position order, so each sees its predecessors here.
        kv.write_at(l, pos, k, &b.v[i * kv_dim..(i + 1) * kv_dim]);
        let att = &mut b.att[i * q_dim..(i + 1) * q_dim];
        let first = c.attn_start(l, pos);
        attend_window(q, kv.layer(l, pos + 1), first, pos + 1, shape, scale, att);
    }
    linear_batch(&a.o, &b.att, &mut b.acts, &mut b.scratch, &mut b.out);
}
