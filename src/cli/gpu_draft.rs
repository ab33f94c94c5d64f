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
use crate::draft::{self, Draft, DraftSource, ModelDraft, NgramDraft, SelfDraft, Target};
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
        let draft: Box<dyn Draft<GpuFlashDecoder>> = match job.args.source() {
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

/// The speculative loop on GPU decoder `dec` with `draft`.
fn run<D: Target>(
    mut dec: D,
    mut draft: Box<dyn Draft<D> + '_>,
    job: &Job<'_>,
    sampler: &mut Sampler,
    is_end: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> anyhow::Result<Generation> {
    let name = job.args.source().name();
    Ok(draft::generate(
        &mut dec,
        Some((draft.as_mut(), &name)),
        &job.args.options(),
        job.prompt,
        job.max_new,
        sampler,
        is_end,
        on_token,
    )?)
}
