//! One decode step on the CPU: token in, logits out, KV cache extended by one position.
//!
//! Written once for the llama family (SwiGLU, RMSNorm, RoPE; qwen2's qkv bias falls out of
//! `Linear`'s optional bias) and OPT (ReLU, LayerNorm with biases, learned positions,
//! pre- or post-norm).

use crate::backend::cpu::attention::{attend_window, AttnShape};
use crate::backend::cpu::matvec::{linear, matmul_rows, matvec};
use crate::backend::cpu::ops::{
    add_into, apply_norm, geglu, head_norm, rope, rope_angles, softcap, swiglu,
};
use crate::backend::kv_cache::KvCache;
use crate::backend::streamed::{OutputRows, RowSource};
use crate::model::config::{Arch, Config, FfnKind};
use crate::model::tensor::Tensor;
use crate::model::weights::{Ffn, Layer, ModelWeights, Norm};
use crate::quant::{self, ActivationBuffer, Activations};
use crate::storage::ReadError;

/// Scratch buffers of one decode step, allocated once per session.
pub struct CpuState {
    pub(super) x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    embed: Vec<f32>,
    out: Vec<f32>,
    pub logits: Vec<f32>,
    act: ActivationBuffer,
    /// The current position's rotary `(cos, sin)` per pair, shared by every layer.
    rope: Vec<[f32; 2]>,
    /// The same for the sliding-window layers' RoPE base, when it differs (Gemma 3).
    rope_sliding: Vec<[f32; 2]>,
    /// One head, for the per-head q/k norms.
    head: Vec<f32>,
}

impl CpuState {
    /// Scratch for one position of a model with config `c`, quantising in `mode`.
    pub fn new(c: &Config, mode: Activations) -> CpuState {
        let d = c.hidden_size;
        let q_dim = c.n_heads * c.head_dim;
        CpuState {
            x: vec![0.0; d],
            h: vec![0.0; d],
            q: vec![0.0; q_dim],
            k: vec![0.0; c.kv_dim()],
            v: vec![0.0; c.kv_dim()],
            att: vec![0.0; q_dim],
            embed: vec![0.0; c.embed_dim],
            out: vec![0.0; d],
            logits: vec![0.0; c.vocab_size],
            act: ActivationBuffer::new(mode),
            rope: Vec::with_capacity(c.head_dim / 2),
            rope_sliding: Vec::with_capacity(c.head_dim / 2),
            head: Vec::with_capacity(c.head_dim),
        }
    }
}

/// Computes one layer's feed-forward block. The dense one multiplies the resident matrices;
/// the flash offloading path (and calibration, which watches the dense one) plug in here.
pub trait FfnCompute {
    /// `out = FFN_layer(h)`, where `h` is the normed input of layer `layer`.
    fn ffn(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError>;

    /// Whether a prompt may go through this FFN a batch at a time, layer by layer
    /// ([`FfnCompute::ffn_batch`]). Dense weights can, and so can the flash path when every
    /// token needs the same bundles (dense with lookahead); with a predictor its window follows
    /// tokens one at a time, and prefill then feeds the prompt token by token.
    fn batched(&self) -> bool {
        false
    }

    /// `out[i] = FFN_layer(hs[i])` for rows of `hidden` values; the same values as `ffn` on
    /// each row.
    fn ffn_batch(
        &mut self,
        layer: usize,
        hidden: usize,
        hs: &[f32],
        out: &mut [f32],
    ) -> Result<(), ReadError> {
        for (h, o) in hs.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
            self.ffn(layer, h, o)?;
        }
        Ok(())
    }

    /// Whether a speculative verify pass (a few drafted positions at once) may go through
    /// [`FfnCompute::ffn_batch`]: each bundle it needs then comes from flash once for every
    /// position, while each row still computes exactly what a single token would. Wider than
    /// [`FfnCompute::batched`]: a predictor's window can serve the union of a handful of
    /// positions' active sets, though not a 64-token prompt batch's.
    fn verify_batched(&self) -> bool {
        self.batched()
    }

    /// Whether [`FfnCompute::ffn_draft`] has neurons to draft from.
    fn has_draft(&self) -> bool {
        false
    }

    /// `out` = the FFN of `layer` restricted to the neurons held in memory (a speculative
    /// draft: no I/O). Providers without such a set leave it to [`FfnCompute::ffn`].
    fn ffn_draft(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        self.ffn(layer, h, out)
    }

    /// Starts (or stops) measuring each neuron's share of the FFN's activity, token by token:
    /// what [`FfnCompute::load_draft_neurons`] chooses from.
    fn record_activity(&mut self, _on: bool) {}

    /// Makes the draft set of every layer the `per_layer` neurons most active while
    /// recording (GRIFFIN: a prompt's own neurons predict its continuation better than the
    /// globally frequent ones), reading into memory those not already held. Returns the
    /// bytes the set holds beyond the window. Providers without a draft say why not.
    fn load_draft_neurons(&mut self, _per_layer: usize) -> Result<usize, String> {
        Err("only a flash image's FFN drafts from a chosen set of neurons".into())
    }

    /// I/O, memory and compute costs so far, for FFNs that read from flash.
    fn flash_stats(&self) -> Option<crate::backend::stats::FlashStats> {
        None
    }
}

/// An FFN provider seen through its draft ([`FfnCompute::ffn_draft`]): what a self-drafting
/// step runs in place of the full FFN.
pub struct DraftFfn<'f, 'w>(pub &'f mut (dyn FfnCompute + 'w));

impl FfnCompute for DraftFfn<'_, '_> {
    fn ffn(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        self.0.ffn_draft(layer, h, out)
    }
}

/// The FFN with every weight resident: three matvecs over the quantised matrices.
pub struct DenseFfn<'w> {
    weights: &'w ModelWeights,
    a: Vec<f32>,
    b: Vec<f32>,
    act: ActivationBuffer,
    batch: FfnBatch,
}

/// Scratch of a batched FFN: the hidden activations of every row and the quantised inputs.
#[derive(Default)]
struct FfnBatch {
    up: Vec<f32>,
    gate: Vec<f32>,
    acts: Vec<ActivationBuffer>,
    scratch: Vec<f32>,
}

impl<'w> DenseFfn<'w> {
    pub fn new(weights: &'w ModelWeights) -> DenseFfn<'w> {
        let f = weights.config.intermediate_size;
        DenseFfn {
            weights,
            a: vec![0.0; f],
            b: vec![0.0; f],
            act: ActivationBuffer::new(weights.activations),
            batch: FfnBatch::default(),
        }
    }

    /// The FFN's hidden activations `silu(gate h) * (up h)` (SwiGLU) or `relu(up h + b)`
    /// (ReLU), left in the returned slice: what calibration measures and predictors learn.
    pub fn hidden(&mut self, layer: usize, h: &[f32]) -> &[f32] {
        let c = &self.weights.config;
        let l = &self.weights.layers[layer];
        let f = dense(l, layer);
        act_matvec(&f.up, h, &mut self.act, &mut self.a);
        if let Some(b) = &l.ffn_bias.up {
            add_into(&mut self.a, b);
        }
        match (c.ffn_kind(), &f.gate) {
            (FfnKind::SwiGlu, Some(gate)) => {
                act_matvec(gate, h, &mut self.act, &mut self.b);
                swiglu(&mut self.a, &self.b);
            }
            (FfnKind::GeGlu, Some(gate)) => {
                act_matvec(gate, h, &mut self.act, &mut self.b);
                geglu(&mut self.a, &self.b);
            }
            _ => self.a.iter_mut().for_each(|u| *u = u.max(0.0)),
        }
        &self.a
    }
}

/// A layer's dense FFN matrices. Sessions over a flash image never use `DenseFfn`, so their
/// absence here is a programming error, not bad input.
fn dense(l: &Layer, layer: usize) -> &Ffn {
    l.ffn.as_ref().unwrap_or_else(|| {
        panic!("layer {layer} has no resident FFN matrices (a flash image needs FlashFfn)")
    })
}

/// `out = W x` with `x` quantised for `W`'s dtype.
fn act_matvec(w: &Tensor, x: &[f32], act: &mut ActivationBuffer, out: &mut [f32]) {
    act.quantize_for(w.dtype, x)
        .expect("activation length matches the weight's columns (checked at load time)");
    matvec(w, act, out);
}

impl FfnCompute for DenseFfn<'_> {
    fn batched(&self) -> bool {
        true
    }

    fn ffn_batch(
        &mut self,
        layer: usize,
        hidden: usize,
        hs: &[f32],
        out: &mut [f32],
    ) -> Result<(), ReadError> {
        let n = hs.len() / hidden;
        let (c, l) = (&self.weights.config, &self.weights.layers[layer]);
        let f = dense(l, layer);
        let b = &mut self.batch;
        let mode = self.weights.activations;
        b.acts.resize_with(n, || ActivationBuffer::new(mode));
        b.up.resize(n * c.intermediate_size, 0.0);
        matmul_rows(&f.up, hs, &mut b.acts, &mut b.scratch, &mut b.up);
        if let Some(bias) = &l.ffn_bias.up {
            b.up.chunks_exact_mut(c.intermediate_size)
                .for_each(|u| add_into(u, bias));
        }
        match (c.ffn_kind(), &f.gate) {
            (kind @ (FfnKind::SwiGlu | FfnKind::GeGlu), Some(gate)) => {
                b.gate.resize(n * c.intermediate_size, 0.0);
                matmul_rows(gate, hs, &mut b.acts, &mut b.scratch, &mut b.gate);
                let rows = b.up.chunks_exact_mut(c.intermediate_size);
                for (u, g) in rows.zip(b.gate.chunks_exact(c.intermediate_size)) {
                    match kind {
                        FfnKind::GeGlu => geglu(u, g),
                        _ => swiglu(u, g),
                    }
                }
            }
            _ => b.up.iter_mut().for_each(|u| *u = u.max(0.0)),
        }
        matmul_rows(&f.down, &b.up, &mut b.acts, &mut b.scratch, out);
        if let Some(bias) = &l.ffn_bias.down {
            out.chunks_exact_mut(hidden).for_each(|o| add_into(o, bias));
        }
        Ok(())
    }

    fn ffn(&mut self, layer: usize, h: &[f32], out: &mut [f32]) -> Result<(), ReadError> {
        self.hidden(layer, h);
        let l = &self.weights.layers[layer];
        act_matvec(&dense(l, layer).down, &self.a, &mut self.act, out);
        if let Some(b) = &l.ffn_bias.down {
            add_into(out, b);
        }
        Ok(())
    }
}

/// Runs `token` at position `kv.len()` through the model, appends its keys and values to `kv`,
/// and, when `want_logits`, leaves the next-token logits in `state.logits`.
pub fn forward(
    w: &ModelWeights,
    kv: &mut KvCache,
    s: &mut CpuState,
    token: u32,
    want_logits: bool,
    ffn: &mut dyn FfnCompute,
    mut rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    let c = &w.config;
    let pos = kv.len();
    if let Some(theta) = c.rope_theta {
        rope_angles(pos, c.head_dim, theta, &mut s.rope);
    }
    if let Some(theta) = c.rope_theta_sliding {
        rope_angles(pos, c.head_dim, theta, &mut s.rope_sliding);
    }
    embed(w, s, token, pos, rows.as_deref_mut())?;
    for (l, layer) in w.layers.iter().enumerate() {
        if c.pre_norm {
            apply_norm(&layer.attn_norm, &s.x, c.norm_eps, &mut s.h);
            attention(c, layer, kv, l, pos, s);
            residual(&layer.extra_norms.post_attn, c, &mut s.x, &s.out, &mut s.h);
            apply_norm(&layer.ffn_norm, &s.x, c.norm_eps, &mut s.h);
            ffn.ffn(l, &s.h, &mut s.out)?;
            residual(&layer.extra_norms.post_ffn, c, &mut s.x, &s.out, &mut s.h);
        } else {
            // Post-norm (OPT-350m): x = norm(x + block(x)).
            s.h.copy_from_slice(&s.x);
            attention(c, layer, kv, l, pos, s);
            add_into(&mut s.x, &s.out);
            apply_norm(&layer.attn_norm, &s.x, c.norm_eps, &mut s.h);
            s.x.copy_from_slice(&s.h);
            ffn.ffn(l, &s.h, &mut s.out)?;
            add_into(&mut s.x, &s.out);
            apply_norm(&layer.ffn_norm, &s.x, c.norm_eps, &mut s.h);
            s.x.copy_from_slice(&s.h);
        }
    }
    // A failed read above returns before this: the position is never committed.
    kv.advance();
    if want_logits {
        output(w, s, rows)?;
    }
    Ok(())
}

/// `x += block`, or `x += norm(block)` where the model normalises a block's output before its
/// residual add (Gemma 3's post-attention and post-FFN norms); `scratch` takes the normed
/// block.
pub(super) fn residual(
    post: &Option<Norm>,
    c: &Config,
    x: &mut [f32],
    block: &[f32],
    scratch: &mut [f32],
) {
    match post {
        Some(n) => {
            apply_norm(n, block, c.norm_eps, scratch);
            add_into(x, scratch);
        }
        None => add_into(x, block),
    }
}

/// Token embedding (plus OPT's projection and learned position) into `s.x`.
pub(super) fn embed(
    w: &ModelWeights,
    s: &mut CpuState,
    token: u32,
    pos: usize,
    rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    match rows {
        Some(r) => r.embed_row(token, &mut s.embed)?,
        None => quant::dequantize(w.embed.dtype, w.embed.row(token as usize), &mut s.embed)
            .expect("embedding rows are whole blocks (checked at load time)"),
    }
    match &w.project_in {
        Some(p) => linear(p, &s.embed, &mut s.act, &mut s.x),
        None => s.x.copy_from_slice(&s.embed),
    }
    if let Some(scale) = w.config.embed_scale() {
        s.x.iter_mut().for_each(|v| *v *= scale);
    }
    if let Some(table) = &w.positions {
        let row = table.row(w.position_offset + pos);
        quant::dequantize(table.dtype, row, &mut s.h).expect("position rows are whole blocks");
        add_into(&mut s.x, &s.h);
    }
    Ok(())
}

/// Self-attention of the normed input `s.h`; result (after the output projection) in `s.out`.
fn attention(c: &Config, layer: &Layer, kv: &mut KvCache, l: usize, pos: usize, s: &mut CpuState) {
    let a = &layer.attn;
    linear(&a.q, &s.h, &mut s.act, &mut s.q);
    linear(&a.k, &s.h, &mut s.act, &mut s.k);
    linear(&a.v, &s.h, &mut s.act, &mut s.v);
    let angles = match c.rope_theta_sliding.is_some() && c.is_sliding(l) {
        true => &s.rope_sliding,
        false => &s.rope,
    };
    let scale = qk_prepare(c, layer, &mut s.q, &mut s.k, angles, &mut s.head);
    kv.write(l, &s.k, &s.v);
    let shape = AttnShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    let first = c.attn_start(l, pos);
    attend_window(
        &s.q,
        kv.layer(l, pos + 1),
        first,
        pos + 1,
        shape,
        scale,
        &mut s.att,
    );
    linear(&a.o, &s.att, &mut s.act, &mut s.out);
}

/// One position's projected queries and keys made ready for the cache and `q·k`: Gemma's
/// per-head norms, RoPE, and Gemma's query scaling. Returns the scale attention applies to
/// `q·k` itself. llama.cpp scales Gemma's queries in f32 before its attention kernel (which
/// then scales by 1), the other families' scores inside the kernel; both are kept.
pub(super) fn qk_prepare(
    c: &Config,
    layer: &Layer,
    q: &mut [f32],
    k: &mut [f32],
    angles: &[[f32; 2]],
    head: &mut Vec<f32>,
) -> f32 {
    if let Some(n) = &layer.extra_norms.q {
        head_norm(n, q, c.head_dim, c.norm_eps, head);
    }
    if let Some(n) = &layer.extra_norms.k {
        head_norm(n, k, c.head_dim, c.norm_eps, head);
    }
    if c.rope_theta.is_some() {
        rope(q, c.head_dim, angles, c.rope_style);
        rope(k, c.head_dim, angles, c.rope_style);
    }
    match c.arch {
        Arch::Gemma3 => {
            let scale = c.query_scale();
            q.iter_mut().for_each(|v| *v *= scale);
            1.0
        }
        _ => c.query_scale(),
    }
}

/// Final norm, optional projection, and the vocabulary projection into `s.logits`.
pub(super) fn output(
    w: &ModelWeights,
    s: &mut CpuState,
    rows: Option<&mut OutputRows>,
) -> Result<(), ReadError> {
    let mut head = rows.map(|r| r.head());
    let dtype = head.as_ref().map_or(w.lm_head.dtype, |h| h.dtype());
    head_input(w, s, dtype);
    match head.as_mut() {
        Some(h) => h.matvec(&s.act, &mut s.logits)?,
        None => matvec(&w.lm_head, &s.act, &mut s.logits),
    }
    if let Some(cap) = w.config.final_logit_softcap {
        softcap(&mut s.logits, cap);
    }
    Ok(())
}

/// Logits over the first `head.rows()` token ids only (a draft's resident head over the most
/// frequent tokens, when the full head is streamed); every other token gets `-inf`.
pub fn output_prefix(
    w: &ModelWeights,
    s: &mut CpuState,
    head: &mut RowSource,
) -> Result<(), ReadError> {
    head_input(w, s, head.dtype());
    let n = head.rows().min(s.logits.len());
    let (known, rest) = s.logits.split_at_mut(n);
    head.matvec(&s.act, known)?;
    if let Some(cap) = w.config.final_logit_softcap {
        softcap(known, cap);
    }
    rest.fill(f32::NEG_INFINITY);
    Ok(())
}

/// The vocabulary projection's input (final norm, OPT's projection) quantised for `dtype`
/// into `s.act`.
fn head_input(w: &ModelWeights, s: &mut CpuState, dtype: crate::quant::DType) {
    let c = &w.config;
    match &w.final_norm {
        Some(n) => apply_norm(n, &s.x, c.norm_eps, &mut s.h),
        None => s.h.copy_from_slice(&s.x),
    }
    let hidden = match &w.project_out {
        Some(p) => {
            linear(p, &s.h, &mut s.act, &mut s.embed);
            &s.embed
        }
        None => &s.h,
    };
    s.act
        .quantize_for(dtype, hidden)
        .expect("lm_head columns match the hidden size (checked at load time)");
}
