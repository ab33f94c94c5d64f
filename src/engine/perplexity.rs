//! Perplexity in llama.cpp's convention, so numbers compare with `llama-perplexity`:
//! the text is cut into non-overlapping windows of `ctx` tokens; when the tokenizer adds a
//! BOS, each window's first token is replaced by it; the loss is taken over the second half of
//! each window (positions ctx/2 .. ctx-1 predict the tokens after them).

use crate::backend::cpu::ops::log_softmax_at;
use crate::engine::{EngineError, Session};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub ctx: usize,
    pub tokens_scored: usize,
    /// Running perplexity after each chunk, as llama.cpp prints `[1]x,[2]y,...`.
    pub running: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens; perplexity over a context of {ctx} needs at least {need} (twice the context). Use a longer text or a shorter context")]
    TooShort {
        tokens: usize,
        ctx: usize,
        need: usize,
    },
    #[error("a perplexity context must hold at least 4 positions, got {0}")]
    BadCtx(usize),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Computes perplexity of `tokens` over at most `max_chunks` windows (all when `None`),
/// calling `progress(chunk, running_ppl)` after each. The session must hold `ctx` positions.
pub fn perplexity(
    session: &mut Session,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, f64),
) -> Result<Perplexity, PerplexityError> {
    if ctx < 4 {
        return Err(PerplexityError::BadCtx(ctx));
    }
    if tokens.len() < 2 * ctx {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            ctx,
            need: 2 * ctx,
        });
    }
    let n_chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    let first = ctx / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    for chunk in 0..n_chunks {
        let mut window = tokens[chunk * ctx..(chunk + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        session.reset();
        session.prefill(&window[..first])?;
        session.score(&window[first..ctx - 1], |i, logits| {
            nll -= log_softmax_at(logits, window[first + i + 1] as usize);
            count += 1;
        })?;
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        progress(chunk + 1, ppl);
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunks: n_chunks,
        ctx,
        tokens_scored: count,
        running,
    })
}
