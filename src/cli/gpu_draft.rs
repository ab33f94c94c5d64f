//! `generate --backend gpu --draft ...`: speculative decoding with a GPU decoder as the target:
//! the dense `GpuDecoder` for GGUF and HF models, `GpuFlashDecoder` for flash images (under
//! --vram-budget too). Their verify passes run every drafted position in one pass over the
//! weights (on the flash path, each bundle of the union of the positions' active sets read
//! once); drafts come from prompt lookup or a draft model on the CPU, or on the flash path
//! from the target itself over the neurons its GPU windows pin (`--draft self`).

use anyhow::bail;

use crate::api::gpu::{gpu_kv_type, open_gpu_flash};
use crate::api::Runner;
use crate::backend::gpu::flash::MAX_VERIFY_WIDTH;
use crate::backend::gpu::{GpuContext, GpuDecoder, GpuFlashDecoder};
use crate::backend::stats::FlashStats;
use crate::draft::{
    self, Draft, DraftError, DraftSource, ModelDraft, NgramDraft, SelfDraft, SelfTarget, Target,
};
use crate::engine::gpu::{gpu_run_stats, GpuCounters, GpuModel};
use crate::engine::model::Model;
use crate::engine::sampler::Sampler;
use crate::engine::Generation;

use super::draft_args::DraftArgs;

/// What one speculative decode on the GPU is asked to do.
pub struct Job<'a> {
    pub draft_model: Option<&'a Model>,
    pub args: &'a DraftArgs,
    pub ctx: usize,
    pub prompt: &'a [u32],
    pub max_new: usize,
}

/// Decodes `job.prompt` on the GPU with drafts from `job.args`, as `draft::generate` does on
/// the CPU.
pub fn generate(
    gpu: &GpuContext,
    runner: &Runner,
    job: &Job<'_>,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> anyhow::Result<Generation> {
    let model = &runner.model;
    // Refused before a decoder is built (which uploads the weights).
    match (job.args.source(), job.draft_model) {
        (DraftSource::Ngram, _) | (DraftSource::Model(_), Some(_)) => {}
        (DraftSource::SelfModel, _) if model.image.is_none() => bail!(
            "--draft self restricts the target's FFN to the neurons it pins in memory, and the \
             dense GPU decoder pins none (it holds every weight); convert the model to a flash \
             image and run it under --vram-budget, or use --draft ngram or a draft model"
        ),
        (DraftSource::SelfModel, _) if runner.options().vram_budget.is_none() => bail!(
            "--draft self on the GPU drafts from the neurons --vram-budget pins in each layer's \
             GPU window, and without a VRAM budget nothing is pinned; add --vram-budget SIZE, \
             or use --draft ngram or a draft model"
        ),
        (DraftSource::SelfModel, _) => {}
        (DraftSource::Model(p), None) => bail!("the draft model {} was not opened", p.display()),
        (DraftSource::None, _) => bail!("no draft source was chosen"),
    }
    let width = job.args.options().max + 1;
    if model.image.is_some() {
        if width > MAX_VERIFY_WIDTH {
            bail!(
                "--draft-max {} makes verify passes of {width} positions, and the GPU flash \
                 path's hold at most {MAX_VERIFY_WIDTH}: use --draft-max {} or less",
                width - 1,
                MAX_VERIFY_WIDTH - 1
            );
        }
        let dec = open_gpu_flash(gpu, runner, job.ctx, width)?;
        let draft: Box<dyn Draft<Measured<GpuFlashDecoder>>> = match job.args.source() {
            DraftSource::SelfModel => {
                let d = SelfDraft::new(&dec, job.args.options().p_min)?;
                log::info!(
                    "self draft over the pinned neurons per layer: {:?}",
                    dec.draft_neurons()
                );
                Box::new(d)
            }
            _ => make_draft(model, job)?,
        };
        return run(dec, draft, job, sampler, is_end, on_token);
    }
    let flash = runner.options();
    if flash.memory_budget.is_some() || flash.vram_budget.is_some() {
        bail!(
            "--memory-budget and --vram-budget need a flash image; convert the model first: \
             llmflash convert {} -o MODEL.flash",
            model.path.display()
        );
    }
    let kv = gpu_kv_type(flash);
    let dec = GpuDecoder::with_verify(gpu, &model.weights, job.ctx, kv, width)?;
    run(dec, make_draft(model, job)?, job, sampler, is_end, on_token)
}

/// The draft `job` asks for, proposing to target `T`.
fn make_draft<'a, T: Target + ?Sized>(
    model: &Model,
    job: &Job<'a>,
) -> anyhow::Result<Box<dyn Draft<T> + 'a>> {
    Ok(match (job.args.source(), job.draft_model) {
        (DraftSource::Model(_), Some(m)) => {
            let bytes = job.args.needs(model, Some(m), job.ctx).reserved as usize;
            let p_min = job.args.options().p_min;
            Box::new(ModelDraft::new(
                m.session(job.ctx, None, None)?,
                p_min,
                bytes,
            ))
        }
        _ => Box::new(NgramDraft::new()),
    })
}

/// The speculative loop on GPU decoder `dec` with `draft`, with its GPU stats.
fn run<D: GpuTarget>(
    dec: D,
    mut draft: Box<dyn Draft<Measured<D>> + '_>,
    job: &Job<'_>,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> anyhow::Result<Generation> {
    let opts = job.args.options();
    let mut target = Measured {
        dec,
        after_prompt: None,
    };
    let name = job.args.source().name();
    let mut gen = draft::generate(
        &mut target,
        Some((draft.as_mut(), &name)),
        &opts,
        job.prompt,
        job.max_new,
        sampler,
        is_end,
        on_token,
    )?;
    let after = target.dec.counters();
    let before = target.after_prompt.unwrap_or_default();
    gen.stats.strategy = match after.flash {
        Some(_) => "gpu-flash",
        None => "gpu",
    }
    .into();
    gen.stats.gpu = Some(gpu_run_stats(
        &target.dec,
        &before,
        &after,
        gen.tokens.len(),
    ));
    Ok(gen)
}

/// A GPU decoder that verifies drafts, and whose last logits can be read again.
trait GpuTarget: Target + GpuModel {
    fn last_logits(&self) -> &[f32];
}

impl GpuTarget for GpuDecoder {
    fn last_logits(&self) -> &[f32] {
        self.logits()
    }
}

impl GpuTarget for GpuFlashDecoder<'_> {
    fn last_logits(&self) -> &[f32] {
        self.logits()
    }
}

/// A GPU decoder as a draft target, noting its counters when the prompt is done (so the GPU
/// stats cover decoding only, as on the plain path).
struct Measured<D> {
    dec: D,
    after_prompt: Option<GpuCounters>,
}

impl<D: GpuTarget> Target for Measured<D> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        Target::prefill(&mut self.dec, prompt)?;
        self.after_prompt = Some(self.dec.counters());
        Ok(self.dec.last_logits())
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Target::step(&mut self.dec, token)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        Target::verify(&mut self.dec, tokens)
    }
    fn truncate(&mut self, len: usize) {
        Target::truncate(&mut self.dec, len)
    }
    fn position(&self) -> usize {
        Target::position(&self.dec)
    }
    fn capacity(&self) -> usize {
        Target::capacity(&self.dec)
    }
    fn vocab(&self) -> usize {
        self.dec.vocab()
    }
    fn verify_width(&self) -> usize {
        Target::verify_width(&self.dec)
    }
    fn flash_stats(&self) -> Option<FlashStats> {
        Target::flash_stats(&self.dec)
    }
}

/// The self draft runs the flash decoder restricted to its pinned neurons (the counters
/// noted after the prompt stay the target's own).
impl SelfTarget for Measured<GpuFlashDecoder<'_>> {
    fn can_self_draft(&self) -> bool {
        self.dec.can_self_draft()
    }
    fn draft_step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        Ok(self.dec.draft_step(token)?)
    }
}
