//! One decode step on the CPU: token in, logits out, KV cache extended by one position.
//!
//! Written once for the llama family (SwiGLU, RMSNorm, RoPE; qwen2's qkv bias falls out of
//! `Linear`'s optional bias) and OPT (ReLU, LayerNorm with biases, learned positions,
//! pre- or post-norm).

use crate::backend::cpu::attention::{attend, AttnShape};
use crate::backend::cpu::matvec::linear;
use crate::backend::cpu::ops::{add_into, apply_norm, rope, rope_frequencies, silu};
use crate::backend::cpu::quant::{self, ActivationBuffer};
use crate::engine::kv_cache::KvCache;
use crate::model::config::{Config, FfnKind};
use crate::model::weights::{Ffn, Layer, ModelWeights};

/// Scratch buffers of one decode step, allocated once per session.
pub struct CpuState {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    ffn_a: Vec<f32>,
    ffn_b: Vec<f32>,
    embed: Vec<f32>,
    out: Vec<f32>,
    pub logits: Vec<f32>,
    act: ActivationBuffer,
    rope_freqs: Vec<f32>,
}

impl CpuState {
    pub fn new(c: &Config) -> CpuState {
        let d = c.hidden_size;
        let q_dim = c.n_heads * c.head_dim;
        CpuState {
            x: vec![0.0; d],
            h: vec![0.0; d],
            q: vec![0.0; q_dim],
            k: vec![0.0; c.kv_dim()],
            v: vec![0.0; c.kv_dim()],
            att: vec![0.0; q_dim],
            ffn_a: vec![0.0; c.intermediate_size],
            ffn_b: vec![0.0; c.intermediate_size],
            embed: vec![0.0; c.embed_dim],
            out: vec![0.0; d],
            logits: vec![0.0; c.vocab_size],
            act: ActivationBuffer::new(),
            rope_freqs: c
                .rope_theta
                .map(|t| rope_frequencies(c.head_dim, t))
                .unwrap_or_default(),
        }
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
) {
    let c = &w.config;
    let pos = kv.len();
    embed(w, s, token, pos);
    for (l, layer) in w.layers.iter().enumerate() {
        if c.pre_norm {
            apply_norm(&layer.attn_norm, &s.x, c.norm_eps, &mut s.h);
            attention(c, layer, kv, l, pos, s);
            add_into(&mut s.x, &s.out);
            apply_norm(&layer.ffn_norm, &s.x, c.norm_eps, &mut s.h);
            ffn_dense(c, &layer.ffn, s);
            add_into(&mut s.x, &s.out);
        } else {
            // Post-norm (OPT-350m): x = norm(x + block(x)).
            s.h.copy_from_slice(&s.x);
            attention(c, layer, kv, l, pos, s);
            add_into(&mut s.x, &s.out);
            apply_norm(&layer.attn_norm, &s.x, c.norm_eps, &mut s.h);
            s.x.copy_from_slice(&s.h);
            ffn_dense(c, &layer.ffn, s);
            add_into(&mut s.x, &s.out);
            apply_norm(&layer.ffn_norm, &s.x, c.norm_eps, &mut s.h);
            s.x.copy_from_slice(&s.h);
        }
    }
    kv.advance();
    if want_logits {
        output(w, s);
    }
}

/// Token embedding (plus OPT's projection and learned position) into `s.x`.
fn embed(w: &ModelWeights, s: &mut CpuState, token: u32, pos: usize) {
    let row = w.embed.row(token as usize);
    quant::dequantize(w.embed.dtype, row, &mut s.embed)
        .expect("embedding rows are whole blocks (checked at load time)");
    match &w.project_in {
        Some(p) => linear(p, &s.embed, &mut s.act, &mut s.x),
        None => s.x.copy_from_slice(&s.embed),
    }
    if let Some(table) = &w.positions {
        let row = table.row(w.position_offset + pos);
        quant::dequantize(table.dtype, row, &mut s.h).expect("position rows are whole blocks");
        add_into(&mut s.x, &s.h);
    }
}

/// Self-attention of the normed input `s.h`; result (after the output projection) in `s.out`.
fn attention(c: &Config, layer: &Layer, kv: &mut KvCache, l: usize, pos: usize, s: &mut CpuState) {
    let a = &layer.attn;
    linear(&a.q, &s.h, &mut s.act, &mut s.q);
    linear(&a.k, &s.h, &mut s.act, &mut s.k);
    linear(&a.v, &s.h, &mut s.act, &mut s.v);
    if c.rope_theta.is_some() {
        rope(&mut s.q, c.head_dim, pos, &s.rope_freqs, c.rope_style);
        rope(&mut s.k, c.head_dim, pos, &s.rope_freqs, c.rope_style);
    }
    kv.write(l, &s.k, &s.v);
    let shape = AttnShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let (keys, values) = kv.layer(l, pos + 1);
    attend(&s.q, keys, values, pos + 1, shape, scale, &mut s.att);
    linear(&a.o, &s.att, &mut s.act, &mut s.out);
}

/// The dense FFN of the normed input `s.h`; result in `s.out`.
fn ffn_dense(c: &Config, f: &Ffn, s: &mut CpuState) {
    linear(&f.up, &s.h, &mut s.act, &mut s.ffn_a);
    match (c.ffn_kind(), &f.gate) {
        (FfnKind::SwiGlu, Some(gate)) => {
            linear(gate, &s.h, &mut s.act, &mut s.ffn_b);
            for (u, &g) in s.ffn_a.iter_mut().zip(&s.ffn_b) {
                *u *= silu(g);
            }
        }
        _ => s.ffn_a.iter_mut().for_each(|u| *u = u.max(0.0)),
    }
    linear(&f.down, &s.ffn_a, &mut s.act, &mut s.out);
}

/// Final norm, optional projection, and the vocabulary projection into `s.logits`.
fn output(w: &ModelWeights, s: &mut CpuState) {
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
        .quantize_for(w.lm_head.dtype, hidden)
        .expect("lm_head columns match the hidden size (checked at load time)");
    crate::backend::cpu::matvec::matvec(&w.lm_head, &s.act, &mut s.logits);
}
