//! `generate --backend gpu --draft ...`: speculative decoding with the dense GPU decoder as
//! the target. Its verify pass runs every drafted position in one pass over the weights
//! (`GpuDecoder::verify`); drafts come from prompt lookup or a draft model on the CPU.

use anyhow::bail;

use crate::backend::gpu::{GpuContext, GpuDecoder};
use crate::draft::{self, Draft, DraftError, DraftSource, ModelDraft, NgramDraft, Target};
use crate::engine::gpu::{gpu_run_stats, GpuCounters, GpuModel};
use crate::engine::kv_cache::KvType;
use crate::engine::model::Model;
use crate::engine::sampler::Sampler;
use crate::engine::stats::FlashStats;
use crate::engine::Generation;

use super::draft_args::DraftArgs;
use super::flash_args::FlashArgs;

/// Decodes `prompt` on the GPU with drafts from `args`, as `draft::generate` does on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    gpu: &GpuContext,
    model: &Model,
    draft_model: Option<&Model>,
    args: &DraftArgs,
    flash: &FlashArgs,
    ctx: usize,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> anyhow::Result<Generation> {
    if model.image.is_some() {
        bail!(
            "--draft on --backend gpu runs the dense GPU decoder (a GGUF or HF model); the GPU \
             flash path has no verify pass yet: give the source GGUF, drop --draft, or use \
             --backend cpu"
        );
    }
    if flash.memory_budget.is_some() || flash.vram_budget.is_some() {
        bail!("--memory-budget and --vram-budget need a flash image, which --draft on --backend gpu does not run yet; drop the budget or use --backend cpu");
    }
    let opts = args.options();
    let mut draft: Box<dyn Draft<Measured> + '_> = match (args.source(), draft_model) {
        (DraftSource::Ngram, _) => Box::new(NgramDraft::new()),
        (DraftSource::Model(_), Some(m)) => {
            let bytes = args.needs(model, Some(m), ctx).reserved as usize;
            Box::new(ModelDraft::new(
                m.session(ctx, None, None)?,
                opts.p_min,
                bytes,
            ))
        }
        (DraftSource::SelfModel, _) => bail!(
            "--draft self restricts the target's FFN to neurons held in host memory, which the \
             GPU decoder does not do; on --backend gpu use --draft ngram or a draft model"
        ),
        (DraftSource::Model(p), None) => bail!("the draft model {} was not opened", p.display()),
        (DraftSource::None, _) => bail!("no draft source was chosen"),
    };
    let kv = flash.kv_type.unwrap_or(KvType::F32);
    let dec = GpuDecoder::with_verify(gpu, &model.weights, ctx, kv, opts.max + 1)?;
    let mut target = Measured {
        dec,
        after_prompt: None,
    };
    let name = args.source().name();
    let mut gen = draft::generate(
        &mut target,
        Some((draft.as_mut(), &name)),
        &opts,
        prompt,
        max_new,
        sampler,
        is_end,
        on_token,
    )?;
    let after = target.dec.counters();
    let before = target.after_prompt.unwrap_or_default();
    gen.stats.strategy = "gpu".into();
    gen.stats.gpu = Some(gpu_run_stats(
        &target.dec,
        &before,
        &after,
        gen.tokens.len(),
    ));
    Ok(gen)
}

/// The GPU decoder as a draft target, noting its counters when the prompt is done (so the
/// GPU stats cover decoding only, as on the plain path).
struct Measured {
    dec: GpuDecoder,
    after_prompt: Option<GpuCounters>,
}

impl Target for Measured {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        Target::prefill(&mut self.dec, prompt)?;
        self.after_prompt = Some(self.dec.counters());
        Ok(self.dec.logits())
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Target::step(&mut self.dec, token)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        Target::verify(&mut self.dec, tokens)
    }
    fn truncate(&mut self, len: usize) {
        self.dec.truncate(len)
    }
    fn position(&self) -> usize {
        self.dec.position()
    }
    fn capacity(&self) -> usize {
        self.dec.capacity()
    }
    fn vocab(&self) -> usize {
        self.dec.vocab_size()
    }
    fn verify_width(&self) -> usize {
        self.dec.verify_width()
    }
    fn flash_stats(&self) -> Option<FlashStats> {
        None
    }
}
