//! Measuring what a calibration costs in perplexity (dense vs oracle vs predictor), and
//! calibration text written by the model itself.

use crate::engine::flash::{FlashOptions, Selection, Strategy};
use crate::engine::model::Model;
use crate::engine::perplexity::{perplexity, Perplexity, PerplexityError};
use crate::sparsity::Sparsity;

/// Perplexity of `tokens` with the FFN neurons chosen by `selection` (`All` needs no
/// calibration), computed from the memory-mapped image.
pub fn evaluate(
    model: &Model,
    cal: Option<&dyn Sparsity>,
    selection: Selection,
    tokens: &[u32],
    ctx: usize,
    chunks: Option<usize>,
    bos: Option<u32>,
) -> Result<Perplexity, EvaluateError> {
    let opts = FlashOptions {
        strategy: Strategy::Mmap,
        selection,
        ..FlashOptions::default()
    };
    let mut session = model.session(ctx, Some(opts), cal)?;
    Ok(perplexity(
        &mut session,
        tokens,
        ctx,
        bos,
        chunks,
        |_, _| {},
    )?)
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Model(#[from] crate::engine::model::ModelError),
    #[error(transparent)]
    Perplexity(#[from] PerplexityError),
}

/// Why [`sample_text`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Model(#[from] crate::engine::model::ModelError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// Calibration text written by the model itself, for an image calibrated without text of
/// the user's: `n` tokens in windows of `window`, each sampled from the beginning of a
/// sequence (BOS, where the model has one) at temperature 1 with nucleus 0.95, from `seed`.
/// What the model writes unprompted needs nothing fetched at run time; docs/calibration.md
/// measures it against real text.
pub fn sample_text(
    model: &Model,
    n: usize,
    window: usize,
    seed: u64,
) -> Result<Vec<u32>, SampleError> {
    use crate::engine::sampler::{Sampler, Sampling};
    // Every neuron, so that the text is the dense model's (what calibration measures).
    let opts = FlashOptions {
        selection: Selection::All,
        ..FlashOptions::default()
    };
    let window = window.max(2);
    let start = model.tokenizer.as_ref().and_then(|t| t.bos()).unwrap_or(0);
    let mut tokens = Vec::with_capacity(n);
    let mut round = 0u64;
    while tokens.len() < n {
        let mut session = model.session(window, Some(opts.clone()), None)?;
        let mut sampler = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            seed: seed.wrapping_add(round),
        });
        let mut next = sampler.sample(session.prefill(&[start])?);
        while tokens.len() < n && session.position() < window {
            tokens.push(next);
            next = sampler.sample(session.step(next, true)?);
        }
        round += 1;
    }
    Ok(tokens)
}
