//! The dense decode step wholly on the GPU: weights uploaded once, the KV cache resident on the
//! GPU, every dispatch of a token recorded into one compute pass, and one readback per token (the
//! logits, or 4 bytes with [`GpuDecoder::step_greedy`]). The same computation as
//! `backend::cpu::forward`, for the llama family (SwiGLU, RMSNorm, RoPE, qwen2's q/k/v biases,
//! qwen3's q/k head norms) and
//! OPT (ReLU, LayerNorm, learned positions, projections, pre- or post-norm).
//!
//! Numerics: activations stay f32 into every matvec (the CPU quantises them to Q8 for quantised
//! weights, as llama.cpp does), so on quantised models the two backends differ by that
//! quantisation noise; on float weights they agree to f32 summation order.

use crate::backend::cpu::attention::AttnShape;
use crate::backend::gpu::buffers::{
    storage_bytes, storage_zeroed, uniform, write, GpuMatrix, Readback,
};
use crate::backend::gpu::kernels::add::add;
use crate::backend::gpu::kernels::argmax::argmax;
use crate::backend::gpu::kernels::attention::attention;
use crate::backend::gpu::kernels::embed::{Gather, RowSource};
use crate::backend::gpu::kernels::ffn_act::ffn_act;
use crate::backend::gpu::kernels::kv_store::kv_store;
use crate::backend::gpu::kernels::matvec::matvec;
use crate::backend::gpu::kernels::norm::GpuNorm;
use crate::backend::gpu::kernels::rope::{rope, rope_table};
use crate::backend::gpu::kernels::{Dispatch, Step, Width};
use crate::backend::gpu::timer::GpuTimer;
use crate::backend::gpu::{GpuContext, GpuError};
use crate::backend::kv_cache::KvType;
use crate::model::config::{Arch, Config, FfnKind};
use crate::model::weights::{Linear, ModelWeights};
use std::time::{Duration, Instant};

/// The activations of a pass, each its own buffer (a dispatch may not read and write the same
/// buffer), with room for one vector per column (a decode step uses column 0; a verify pass one
/// column per token).
pub(crate) struct Scratch {
    pub(crate) x: wgpu::Buffer,
    pub(crate) h: wgpu::Buffer,
    pub(crate) q: wgpu::Buffer,
    pub(crate) k: wgpu::Buffer,
    pub(crate) v: wgpu::Buffer,
    pub(crate) att: wgpu::Buffer,
    pub(crate) out: wgpu::Buffer,
    pub(crate) a: wgpu::Buffer,
    pub(crate) b: wgpu::Buffer,
    pub(crate) emb: wgpu::Buffer,
    pub(crate) scores: wgpu::Buffer,
    pub(crate) logits: wgpu::Buffer,
    pub(crate) token: wgpu::Buffer,
    /// The pass's tokens, one per column: the embedding gather's rows.
    pub(crate) rows: wgpu::Buffer,
}

impl Scratch {
    fn new(
        ctx: &GpuContext,
        c: &Config,
        max_ctx: usize,
        columns: usize,
    ) -> Result<Scratch, GpuError> {
        let f = |what: &str, n: usize| storage_zeroed(ctx, what, (n.max(1) * columns * 4) as u64);
        let q_dim = c.n_heads * c.head_dim;
        Ok(Scratch {
            x: f("x", c.hidden_size)?,
            h: f("h", c.hidden_size)?,
            q: f("q", q_dim)?,
            k: f("k", c.kv_dim())?,
            v: f("v", c.kv_dim())?,
            att: f("att", q_dim)?,
            out: f("out", c.hidden_size)?,
            a: f("ffn a", c.intermediate_size)?,
            b: f("ffn b", c.intermediate_size)?,
            emb: f("embedding", c.embed_dim)?,
            scores: f("scores", c.n_heads * max_ctx)?,
            logits: f("logits", c.vocab_size)?,
            token: f("token", 1)?,
            rows: f("tokens", 1)?,
        })
    }
}

/// One layer's prepared dispatches: attention up to the FFN input (`h`), the FFN into `out`
/// (empty on the flash path, which encodes its own), then the residual add (and OPT-350m's
/// post-norm).
pub(crate) struct LayerCode {
    pub(crate) attn: Vec<Dispatch>,
    pub(crate) ffn: Vec<Dispatch>,
    pub(crate) post: Vec<Dispatch>,
}

/// What every GPU decoder shares: weights except the FFN bundles, the KV cache, the scratch
/// buffers and every prepared dispatch. [`GpuDecoder`] runs it densely; the flash decoder
/// (`backend::gpu::flash`) splits each token at every layer's FFN.
pub(crate) struct Core {
    pub(crate) ctx: GpuContext,
    pub(crate) config: Config,
    max_ctx: usize,
    /// Columns (tokens) a pass may run at most: 1 for decoding, more for verify passes.
    pub(crate) columns: usize,
    pub(crate) pos: usize,
    /// The pass's [`Step`] uniform, bound by every kernel that takes columns.
    pub(crate) step: wgpu::Buffer,
    embed_gather: Gather,
    /// OPT's learned positions, row `position_offset + pos`.
    positions: Option<(GpuMatrix, Gather)>,
    position_offset: usize,
    /// After the embedding gather (OPT's project_in), before the learned positions.
    project_in: Vec<Dispatch>,
    /// Every layer, in order.
    pub(crate) layers: Vec<LayerCode>,
    /// Final norm, projection and lm_head.
    output: Vec<Dispatch>,
    greedy: Dispatch,
    pub(crate) s: Scratch,
    logits_rb: Readback,
    token_rb: Readback,
    logits: Vec<f32>,
    /// The greedy tokens of the last pass, one per column.
    tokens: Vec<u32>,
    /// Time spent blocked on the GPU (waiting for readbacks), since creation.
    pub(crate) wait: Duration,
    /// GPU time of every pass, where the device has timestamp queries.
    pub(crate) timer: Option<GpuTimer>,
    /// Bytes written to the GPU when it was built (weights, tables).
    pub(crate) resident_bytes: u64,
    /// Weights, caches and tables: bind groups keep them alive too, but owning them states it.
    _resident: Vec<GpuMatrix>,
    _buffers: Vec<wgpu::Buffer>,
}

/// A session's decoder on the GPU: [`GpuDecoder::step`] runs one token at the next position.
pub struct GpuDecoder {
    core: Core,
}

/// Uploads a linear layer: the matrix and its bias.
fn upload_linear(
    ctx: &GpuContext,
    l: &Linear,
    keep: &mut Vec<wgpu::Buffer>,
) -> Result<(GpuMatrix, Option<wgpu::Buffer>), GpuError> {
    let m = GpuMatrix::upload(ctx, &l.weight)?;
    let b = match &l.bias {
        Some(b) => {
            let buf = storage_bytes(
                ctx,
                &format!("{} bias", l.weight.name),
                bytemuck::cast_slice(b),
            )?;
            keep.push(buf.clone());
            Some(buf)
        }
        None => None,
    };
    Ok((m, b))
}

impl GpuDecoder {
    /// Uploads `w` and prepares every dispatch of a step, for contexts of up to `max_ctx`
    /// positions (clamped to what the model was trained for). Fails with a message when the
    /// model has tensors the kernels do not read, has no resident FFN (a flash image: the sparse
    /// path is `backend::gpu::flash`), or when a layer's KV cache would not fit one storage
    /// binding. The KV cache is f32; see [`GpuDecoder::with_kv_type`].
    pub fn new(ctx: &GpuContext, w: &ModelWeights, max_ctx: usize) -> Result<GpuDecoder, GpuError> {
        GpuDecoder::with_kv_type(ctx, w, max_ctx, KvType::F32)
    }

    /// [`GpuDecoder::new`] with the KV cache's values in `kv`: f16 halves the cache (two values
    /// to a 32-bit word, no adapter feature needed), and attention still computes in f32.
    pub fn with_kv_type(
        ctx: &GpuContext,
        w: &ModelWeights,
        max_ctx: usize,
        kv: KvType,
    ) -> Result<GpuDecoder, GpuError> {
        GpuDecoder::with_verify(ctx, w, max_ctx, kv, 1)
    }

    /// [`GpuDecoder::with_kv_type`] able to run verify passes of up to `columns` tokens
    /// ([`GpuDecoder::verify`]): the activations get room for that many columns (the KV cache
    /// and weights are the same).
    pub fn with_verify(
        ctx: &GpuContext,
        w: &ModelWeights,
        max_ctx: usize,
        kv: KvType,
        columns: usize,
    ) -> Result<GpuDecoder, GpuError> {
        Ok(GpuDecoder {
            core: Core::new(ctx, w, max_ctx, kv, true, columns)?,
        })
    }

    /// The context this decoder runs on.
    pub fn ctx(&self) -> &GpuContext {
        &self.core.ctx
    }

    /// Time spent blocked waiting for the GPU (readbacks), since creation.
    pub fn gpu_wait(&self) -> Duration {
        self.core.wait
    }

    /// GPU execution time (timestamp queries) of the tokens read back so far; `None` where
    /// the device has no timestamp queries.
    pub fn gpu_time(&self) -> Option<Duration> {
        self.core.gpu_time()
    }

    /// Bytes uploaded when the decoder was built (weights and tables).
    pub fn resident_bytes(&self) -> u64 {
        self.core.resident_bytes
    }

    /// Positions consumed so far: the next token goes here.
    pub fn position(&self) -> usize {
        self.core.pos
    }

    /// The context capacity.
    pub fn capacity(&self) -> usize {
        self.core.max_ctx
    }

    /// Tokens in the vocabulary: the length of a row of logits.
    pub fn vocab_size(&self) -> usize {
        self.core.config.vocab_size
    }

    /// The logits read back last (rows of the vocabulary, one per position of that pass).
    pub fn logits(&self) -> &[f32] {
        &self.core.logits
    }

    /// Forgets every position (a new sequence); the cache is overwritten as positions come.
    pub fn reset(&mut self) {
        self.core.pos = 0;
    }

    /// Runs `token` at the next position and returns the next-token logits.
    pub fn step(&mut self, token: u32) -> Result<&[f32], GpuError> {
        self.core.run(&[token], Output::Logits)?;
        self.core.read_logits(1)
    }

    /// Runs `token` and returns the most likely next token, chosen on the GPU (greedy decoding
    /// reads back 4 bytes instead of the logits).
    pub fn step_greedy(&mut self, token: u32) -> Result<u32, GpuError> {
        self.core.run(&[token], Output::Greedy)?;
        Ok(self.core.read_tokens(1)?[0])
    }

    /// Runs `token` without computing logits (a prompt token whose successor is known). Nothing
    /// is read back, so the GPU may still be working when this returns.
    pub fn feed(&mut self, token: u32) -> Result<(), GpuError> {
        self.core.run(&[token], Output::None)
    }

    /// Feeds `tokens` and returns the logits after the last one. A decoder built for verify
    /// passes runs the prompt that many tokens per pass.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], GpuError> {
        let columns = self.core.columns;
        prefill_passes(tokens, columns, |chunk, out| self.core.run(chunk, out))?;
        self.core.read_logits(1)
    }

    /// Tokens a verify pass may hold (the `columns` the decoder was built with).
    pub fn verify_width(&self) -> usize {
        self.core.columns
    }

    /// Runs `tokens` at the next positions in one pass (each weight read once for all of them)
    /// and returns every position's next-token logits, `tokens.len()` rows of the vocabulary
    /// one after another. Each row equals what [`GpuDecoder::step`] would return there, to the
    /// bit: every column runs the single step's code.
    pub fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], GpuError> {
        self.core.run(tokens, Output::Logits)?;
        self.core.read_logits(tokens.len())
    }

    /// [`GpuDecoder::verify`] reading back only each position's most likely next token.
    pub fn verify_greedy(&mut self, tokens: &[u32]) -> Result<&[u32], GpuError> {
        self.core.run(tokens, Output::Greedy)?;
        self.core.read_tokens(tokens.len())
    }

    /// Cuts the sequence back to its first `len` positions (after a verify pass, to the
    /// accepted prefix). O(1): later positions' cache rows are overwritten as they come again.
    pub fn truncate(&mut self, len: usize) {
        self.core.pos = self.core.pos.min(len);
    }
}

impl Core {
    /// Uploads `w` and prepares every dispatch; with `dense_ffn` false, the layers' FFN
    /// dispatches are left to the caller (their down bias, if any, is added in `post`).
    pub(crate) fn new(
        ctx: &GpuContext,
        w: &ModelWeights,
        max_ctx: usize,
        kv: KvType,
        dense_ffn: bool,
        columns: usize,
    ) -> Result<Core, GpuError> {
        let c = w.config.clone();
        // The shaders have neither GELU gating nor Gemma 3's post norms, embedding scale and
        // sliding-window layers: refused here, before anything is uploaded.
        let unsupported = match c.arch {
            Arch::Gemma3 => Some("GELU gating, q/k and post norms, sliding-window layers"),
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Opt => None,
        };
        if let Some(what) = unsupported {
            return Err(GpuError::Shape(format!(
                "the GPU backend does not run {} models ({what}); run it on the CPU backend",
                c.arch
            )));
        }
        let max_ctx = max_ctx.min(c.max_positions).max(1);
        let columns = columns.clamp(1, max_ctx);
        let s = Scratch::new(ctx, &c, max_ctx, columns)?;
        let step = uniform(ctx, "step", &Step::default());
        let mut resident = Vec::new();
        let mut keep = Vec::new();

        let wide = Width::Step(&step);
        let embed = GpuMatrix::upload(ctx, &w.embed)?;
        let (first_target, project_in) = match &w.project_in {
            Some(p) => {
                let (m, b) = upload_linear(ctx, p, &mut keep)?;
                let d = matvec(ctx, &m, &s.emb, b.as_ref(), &s.x, wide, columns)?;
                resident.push(m);
                (&s.emb, d)
            }
            None => (&s.x, Vec::new()),
        };
        let embed_gather = Gather::new(
            ctx,
            &embed,
            RowSource::Token,
            false,
            first_target,
            &step,
            &s.rows,
            columns,
        )?;
        // Owned, and counted, with the other resident weights.
        resident.push(embed);
        let positions = match &w.positions {
            Some(t) => {
                let m = GpuMatrix::upload(ctx, t)?;
                let g = Gather::new(
                    ctx,
                    &m,
                    RowSource::Position,
                    true,
                    &s.x,
                    &step,
                    &s.rows,
                    columns,
                )?;
                Some((m, g))
            }
            None => None,
        };

        let table = match c.rope_theta {
            Some(theta) => {
                let t = rope_table(c.head_dim, theta, max_ctx);
                Some(storage_bytes(ctx, "rope table", bytemuck::cast_slice(&t))?)
            }
            None => None,
        };
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let cache_bytes = (max_ctx * c.kv_dim() * kv.bytes_per_value()) as u64;

        let mut layers = Vec::new();
        for (l, layer) in w.layers.iter().enumerate() {
            let kc = storage_zeroed(ctx, &format!("layer {l} keys"), cache_bytes)?;
            let vc = storage_zeroed(ctx, &format!("layer {l} values"), cache_bytes)?;
            let attn_norm =
                GpuNorm::upload(ctx, &format!("layer {l} attn_norm"), &layer.attn_norm)?;
            let ffn_norm = GpuNorm::upload(ctx, &format!("layer {l} ffn_norm"), &layer.ffn_norm)?;
            let (q, qb) = upload_linear(ctx, &layer.attn.q, &mut keep)?;
            let (k, kb) = upload_linear(ctx, &layer.attn.k, &mut keep)?;
            let (v, vb) = upload_linear(ctx, &layer.attn.v, &mut keep)?;
            let (o, ob) = upload_linear(ctx, &layer.attn.o, &mut keep)?;
            let bias =
                |b: &Option<Vec<f32>>, what: &str| -> Result<Option<wgpu::Buffer>, GpuError> {
                    b.as_ref()
                        .map(|b| storage_bytes(ctx, what, bytemuck::cast_slice(b)))
                        .transpose()
                };
            let up_b = bias(&layer.ffn_bias.up, "ffn up bias")?;
            let down_b = bias(&layer.ffn_bias.down, "ffn down bias")?;
            let mut attn = Vec::new();
            let mut ffn_code = Vec::new();
            let mut post = Vec::new();

            // Pre-norm: attention and FFN read norm(x) in h and add into x. Post-norm (OPT-350m):
            // attention reads x, the normed sum becomes the residual in h, the FFN adds into h,
            // and its normed sum lands back in x for the next layer.
            let (attn_in, resid) = if c.pre_norm {
                (&s.h, &s.x)
            } else {
                (&s.x, &s.x)
            };
            if c.pre_norm {
                attn.push(attn_norm.dispatch(ctx, c.norm_eps, &s.x, &s.h)?);
            }
            attn.extend(matvec(ctx, &q, attn_in, qb.as_ref(), &s.q, wide, columns)?);
            attn.extend(matvec(ctx, &k, attn_in, kb.as_ref(), &s.k, wide, columns)?);
            attn.extend(matvec(ctx, &v, attn_in, vb.as_ref(), &s.v, wide, columns)?);
            // Qwen3: RMSNorm of each query and key head, before RoPE.
            let head_norms = [
                (&layer.extra_norms.q, c.n_heads, &s.q, "q_norm"),
                (&layer.extra_norms.k, c.n_kv_heads, &s.k, "k_norm"),
            ];
            for (norm, heads, v, what) in head_norms {
                if let Some(n) = norm {
                    let g = GpuNorm::upload(ctx, &format!("layer {l} {what}"), n)?;
                    attn.push(g.dispatch_heads(ctx, c.norm_eps, heads, v)?);
                }
            }
            if let Some(t) = &table {
                attn.push(rope(
                    ctx,
                    c.rope_style,
                    c.n_heads,
                    c.head_dim,
                    t,
                    &s.q,
                    &step,
                )?);
                attn.push(rope(
                    ctx,
                    c.rope_style,
                    c.n_kv_heads,
                    c.head_dim,
                    t,
                    &s.k,
                    &step,
                )?);
            }
            attn.push(kv_store(
                ctx,
                kv,
                c.kv_dim(),
                max_ctx,
                &s.k,
                &s.v,
                &kc,
                &vc,
                &step,
            )?);
            attn.push(attention(
                ctx, kv, shape, max_ctx, scale, &s.q, &kc, &vc, &s.scores, &s.att, &step,
            )?);
            attn.extend(matvec(ctx, &o, &s.att, ob.as_ref(), &s.out, wide, columns)?);
            attn.push(add(ctx, c.hidden_size, &s.out, resid)?);
            let (ffn_in, ffn_resid) = if c.pre_norm {
                attn.push(ffn_norm.dispatch(ctx, c.norm_eps, &s.x, &s.h)?);
                (&s.h, &s.x)
            } else {
                attn.push(attn_norm.dispatch(ctx, c.norm_eps, &s.x, &s.h)?);
                (&s.h, &s.h)
            };
            if dense_ffn {
                let ffn = layer.ffn.as_ref().ok_or_else(|| {
                    GpuError::Shape(format!(
                        "layer {l} has no resident FFN matrices (a flash image): the dense GPU decoder needs a GGUF or HF model"
                    ))
                })?;
                let up = GpuMatrix::upload(ctx, &ffn.up)?;
                let down = GpuMatrix::upload(ctx, &ffn.down)?;
                let gate = match &ffn.gate {
                    Some(g) => Some(GpuMatrix::upload(ctx, g)?),
                    None => None,
                };
                ffn_code.extend(matvec(
                    ctx,
                    &up,
                    ffn_in,
                    up_b.as_ref(),
                    &s.a,
                    wide,
                    columns,
                )?);
                let kind = match (c.ffn_kind(), &gate) {
                    (FfnKind::SwiGlu, Some(g)) => {
                        ffn_code.extend(matvec(ctx, g, ffn_in, None, &s.b, wide, columns)?);
                        FfnKind::SwiGlu
                    }
                    _ => FfnKind::Relu,
                };
                ffn_code.push(ffn_act(ctx, kind, c.intermediate_size, &s.b, &s.a)?);
                ffn_code.extend(matvec(
                    ctx,
                    &down,
                    &s.a,
                    down_b.as_ref(),
                    &s.out,
                    wide,
                    columns,
                )?);
                resident.extend([up, down]);
                resident.extend(gate);
            } else if let Some(b) = &down_b {
                post.push(add(ctx, c.hidden_size, b, &s.out)?);
            }
            post.push(add(ctx, c.hidden_size, &s.out, ffn_resid)?);
            if !c.pre_norm {
                post.push(ffn_norm.dispatch(ctx, c.norm_eps, &s.h, &s.x)?);
            }
            layers.push(LayerCode {
                attn,
                ffn: ffn_code,
                post,
            });
            resident.extend([q, k, v, o]);
            keep.extend([kc, vc]);
            keep.extend(qb.into_iter().chain(kb).chain(vb).chain(ob));
            keep.extend(up_b.into_iter().chain(down_b));
        }

        let mut output = Vec::new();
        let mut hidden = &s.x;
        if let Some(n) = &w.final_norm {
            let norm = GpuNorm::upload(ctx, "output_norm", n)?;
            output.push(norm.dispatch(ctx, c.norm_eps, &s.x, &s.h)?);
            hidden = &s.h;
        }
        if let Some(p) = &w.project_out {
            let (m, b) = upload_linear(ctx, p, &mut keep)?;
            output.extend(matvec(ctx, &m, hidden, b.as_ref(), &s.emb, wide, columns)?);
            resident.push(m);
            hidden = &s.emb;
        }
        let lm_head = GpuMatrix::upload(ctx, &w.lm_head)?;
        output.extend(matvec(
            ctx, &lm_head, hidden, None, &s.logits, wide, columns,
        )?);
        resident.push(lm_head);
        let greedy = argmax(ctx, c.vocab_size, &s.logits, &s.token)?;
        keep.extend(table);

        let resident_bytes = resident
            .iter()
            .flat_map(|m: &GpuMatrix| &m.chunks)
            .map(|c| c.buffer.size())
            .chain(keep.iter().map(|b| b.size()))
            .sum();
        Ok(Core {
            timer: GpuTimer::new(ctx),
            wait: Duration::ZERO,
            resident_bytes,
            logits_rb: Readback::new(ctx, (c.vocab_size * 4 * columns) as u64),
            token_rb: Readback::new(ctx, (4 * columns) as u64),
            logits: vec![0.0; c.vocab_size],
            tokens: vec![0; columns],
            ctx: ctx.clone(),
            max_ctx,
            columns,
            pos: 0,
            step,
            embed_gather,
            positions,
            position_offset: w.position_offset,
            project_in,
            layers,
            output,
            greedy,
            s,
            config: c,
            _resident: resident,
            _buffers: keep,
        })
    }

    /// Records `tokens` (one pass) and its outputs, and submits it.
    pub(crate) fn run(&mut self, tokens: &[u32], out: Output) -> Result<(), GpuError> {
        let mut enc = self.begin(tokens)?;
        {
            let mut pass = self.pass(&mut enc, "decode step");
            self.encode_head(&mut pass, tokens.len());
            for l in &self.layers {
                for d in l.attn.iter().chain(&l.ffn).chain(&l.post) {
                    d.encode_columns(&mut pass, tokens.len());
                }
            }
        }
        self.finish(&mut enc, out, tokens.len());
        self.ctx.queue.submit([enc.finish()]);
        Ok(())
    }

    /// Records the output dispatches (final norm, lm_head, argmax) of a pass of `n` columns in
    /// their own pass and the copy of their result into the readback buffer; advances the
    /// position past the pass.
    pub(crate) fn finish(&mut self, enc: &mut wgpu::CommandEncoder, out: Output, n: usize) {
        if out != Output::None {
            {
                let mut pass = self.pass(enc, "output");
                self.output
                    .iter()
                    .for_each(|d| d.encode_columns(&mut pass, n));
                if out == Output::Greedy {
                    self.greedy.encode_columns(&mut pass, n);
                }
            }
            let row = (self.config.vocab_size * 4) as u64;
            match out {
                Output::Greedy => self.token_rb.record(enc, &self.s.token, 0, 4 * n as u64),
                Output::LastLogits => {
                    self.logits_rb
                        .record(enc, &self.s.logits, row * (n as u64 - 1), row)
                }
                _ => self
                    .logits_rb
                    .record(enc, &self.s.logits, 0, row * n as u64),
            }
        }
        if let Some(t) = &self.timer {
            t.resolve(enc);
        }
        self.pos += n;
    }

    /// A compute pass, timed when the device has timestamp queries.
    pub(crate) fn pass<'e>(
        &self,
        enc: &'e mut wgpu::CommandEncoder,
        label: &str,
    ) -> wgpu::ComputePass<'e> {
        enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: self.timer.as_ref().and_then(|t| t.writes()),
        })
    }

    /// GPU execution time of the passes of every token read back so far, where measured.
    pub(crate) fn gpu_time(&self) -> Option<Duration> {
        self.timer.as_ref().map(|t| t.total)
    }

    /// The logits read back last (rows of the vocabulary, one per position of that pass).
    pub(crate) fn last_logits(&self) -> &[f32] {
        &self.logits
    }

    /// The context capacity in positions.
    pub(crate) fn capacity(&self) -> usize {
        self.max_ctx
    }

    /// Waits for the `rows` logit rows recorded by [`Core::finish`].
    pub(crate) fn read_logits(&mut self, rows: usize) -> Result<&[f32], GpuError> {
        let t = Instant::now();
        self.logits.resize(rows * self.config.vocab_size, 0.0);
        self.logits_rb.read(&self.ctx, &mut self.logits)?;
        self.wait += t.elapsed();
        if let Some(timer) = &mut self.timer {
            timer.collect(&self.ctx);
        }
        Ok(&self.logits)
    }

    /// Waits for the `n` greedy tokens recorded by [`Core::finish`].
    pub(crate) fn read_tokens(&mut self, n: usize) -> Result<&[u32], GpuError> {
        let t = Instant::now();
        self.tokens.resize(n, 0);
        self.token_rb.read(&self.ctx, &mut self.tokens)?;
        self.wait += t.elapsed();
        if let Some(timer) = &mut self.timer {
            timer.collect(&self.ctx);
        }
        Ok(&self.tokens)
    }

    /// Checks a pass of `tokens` at the current position: not empty, within the pass width,
    /// the vocabulary, the context and the learned positions.
    fn check(&self, tokens: &[u32]) -> Result<(), GpuError> {
        let n = tokens.len();
        if n == 0 || n > self.columns {
            return Err(GpuError::Shape(format!(
                "a pass runs 1 to {} tokens on this decoder, got {n}",
                self.columns
            )));
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(GpuError::BadToken { id, vocab });
        }
        if self.pos + n > self.max_ctx {
            return Err(GpuError::ContextFull {
                capacity: self.max_ctx,
            });
        }
        if let Some((table, _)) = &self.positions {
            let last = self.position_offset + self.pos + n - 1;
            if last >= table.rows {
                return Err(GpuError::Shape(format!(
                    "position {} is beyond the model's learned positions ({} rows)",
                    self.pos + n - 1,
                    table.rows
                )));
            }
        }
        Ok(())
    }

    /// Checks `tokens`, writes the pass's uniform and tokens, and returns a new encoder.
    pub(crate) fn begin(&self, tokens: &[u32]) -> Result<wgpu::CommandEncoder, GpuError> {
        self.check(tokens)?;
        let step = Step {
            pos: self.pos as u32,
            n_pos: self.pos as u32 + 1,
            n_cols: tokens.len() as u32,
            pos_row: (self.position_offset + self.pos) as u32,
        };
        write(&self.ctx, &self.step, &[step]);
        write(&self.ctx, &self.s.rows, tokens);
        Ok(self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("decode step"),
            }))
    }

    /// Encodes the embeddings of the `n` tokens written by [`Core::begin`] into `x`.
    pub(crate) fn encode_head(&self, pass: &mut wgpu::ComputePass<'_>, n: usize) {
        self.embed_gather.encode_columns(pass, n);
        self.project_in
            .iter()
            .for_each(|d| d.encode_columns(pass, n));
        if let Some((_, g)) = &self.positions {
            g.encode_columns(pass, n);
        }
    }
}

/// Runs a prompt as passes of up to `columns` tokens through `run`, asking for the last
/// token's logits only (every GPU decoder's prefill).
pub(crate) fn prefill_passes(
    tokens: &[u32],
    columns: usize,
    mut run: impl FnMut(&[u32], Output) -> Result<(), GpuError>,
) -> Result<(), GpuError> {
    if tokens.is_empty() {
        return Err(GpuError::Shape(
            "the prompt is empty: give at least one token".to_string(),
        ));
    }
    let mut chunks = tokens.chunks(columns.max(1)).peekable();
    while let Some(chunk) = chunks.next() {
        let out = if chunks.peek().is_none() {
            Output::LastLogits
        } else {
            Output::None
        };
        run(chunk, out)?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Nothing read back (a prompt token whose successor is known).
    None,
    /// Every column's logits.
    Logits,
    /// The last column's logits (the end of a prompt).
    LastLogits,
    /// Every column's most likely token.
    Greedy,
}
