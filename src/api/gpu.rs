//! Opening a model on the GPU: the dense decoder, or for a flash image the flash decoder
//! under a VRAM plan (the same planner as the host's memory budget, with the GPU's buffers).

use anyhow::{bail, Context};

use super::options::RunOptions;
use super::runner::{choose_selection, Runner, PREDICTOR_READ_SHARE};
use crate::backend::gpu::{GpuContext, GpuDecoder, GpuFlashDecoder, GpuFlashOptions};
use crate::backend::kv_cache::{KvCache, KvType};
use crate::backend::stats::FlashStats;
use crate::budget::{self, Needs};
use crate::draft::{DraftError, Target};
use crate::engine::flash::{Selection, Strategy};
use crate::engine::gpu::GpuModel;
use crate::sparsity::Sets;

/// A decoder on the GPU: the dense one, or a flash image's. What
/// [`Engine::generate`](super::Engine::generate) runs on when the engine was given a GPU, and
/// what [`Engine::gpu_decoder`](super::Engine::gpu_decoder) hands a host application for its
/// own loop ([`GpuTarget::model`]: single steps between frames).
pub enum GpuTarget<'r> {
    /// Every weight in VRAM.
    Dense(Box<GpuDecoder>),
    /// A flash image: bundles streamed from the SSD into GPU windows.
    Flash(Box<GpuFlashDecoder<'r>>),
}

impl<'r> GpuTarget<'r> {
    /// The decoder's single-step interface.
    pub fn model(&mut self) -> &mut (dyn GpuModel + 'r) {
        match self {
            GpuTarget::Dense(d) => d.as_mut(),
            GpuTarget::Flash(f) => f.as_mut(),
        }
    }
}

/// Runs `$body` with `$d` bound to whichever decoder `$target` holds (`mut`: mutably).
macro_rules! either {
    ($target:expr, $d:ident => $body:expr) => {
        match $target {
            GpuTarget::Dense($d) => {
                let $d = &**$d;
                $body
            }
            GpuTarget::Flash($d) => {
                let $d = &**$d;
                $body
            }
        }
    };
    ($target:expr, mut $d:ident => $body:expr) => {
        match $target {
            GpuTarget::Dense($d) => {
                let $d = &mut **$d;
                $body
            }
            GpuTarget::Flash($d) => {
                let $d = &mut **$d;
                $body
            }
        }
    };
}

impl Target for GpuTarget<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<&[f32], DraftError> {
        either!(self, mut d => Target::prefill(d, prompt))
    }
    fn step(&mut self, token: u32) -> Result<&[f32], DraftError> {
        either!(self, mut d => Target::step(d, token))
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<&[f32], DraftError> {
        either!(self, mut d => Target::verify(d, tokens))
    }
    fn truncate(&mut self, len: usize) {
        either!(self, mut d => Target::truncate(d, len))
    }
    fn position(&self) -> usize {
        either!(self, d => Target::position(d))
    }
    fn capacity(&self) -> usize {
        either!(self, d => Target::capacity(d))
    }
    fn vocab(&self) -> usize {
        either!(self, d => Target::vocab(d))
    }
    fn verify_width(&self) -> usize {
        either!(self, d => Target::verify_width(d))
    }
    fn flash_stats(&self) -> Option<FlashStats> {
        either!(self, d => Target::flash_stats(d))
    }
    fn step_greedy(&mut self, token: u32) -> Result<u32, DraftError> {
        either!(self, mut d => Target::step_greedy(d, token))
    }
    fn gpu(&self) -> Option<&dyn GpuModel> {
        either!(self, d => Target::gpu(d))
    }
}

/// The GPU decoder for `runner`'s model: dense for GGUF and HF models; for a flash image, the
/// flash path (bundles streamed from the SSD into GPU window buffers, under the options'
/// VRAM budget when there is one).
pub fn open_gpu_target<'r>(
    gpu: &GpuContext,
    runner: &'r Runner,
    ctx: usize,
) -> anyhow::Result<GpuTarget<'r>> {
    let model = &runner.model;
    let flash = runner.options();
    refuse_memory_budget(flash)?;
    if model.image.is_some() {
        return Ok(GpuTarget::Flash(Box::new(open_gpu_flash(
            gpu, runner, ctx, 1,
        )?)));
    }
    if flash.vram_budget.is_some() {
        bail!(
            "a VRAM budget needs a flash image, and {} is not one: convert it first",
            model.path.display()
        );
    }
    Ok(GpuTarget::Dense(Box::new(GpuDecoder::with_kv_type(
        gpu,
        &model.weights,
        ctx,
        gpu_kv_type(flash),
    )?)))
}

/// The GPU's KV cache type: f32 unless asked. The GPU's attention is f32 arithmetic either way
/// (not ggml's f16 flash attention, which the CPU's f16 cache reproduces), so f16 only saves
/// memory there.
pub fn gpu_kv_type(flash: &RunOptions) -> KvType {
    flash.kv_type.unwrap_or(KvType::F32)
}

fn refuse_memory_budget(flash: &RunOptions) -> anyhow::Result<()> {
    if flash.memory_budget.is_some() {
        bail!(
            "a memory budget plans host memory for the CPU backend; on the GPU give a VRAM budget"
        );
    }
    Ok(())
}

/// The GPU flash decoder for `runner`'s flash image, with verify passes of up to
/// `verify_width` positions (1: single steps); under a VRAM budget the plan counts the
/// activations of that many positions.
pub fn open_gpu_flash<'r>(
    gpu: &GpuContext,
    runner: &'r Runner,
    ctx: usize,
    verify_width: usize,
) -> anyhow::Result<GpuFlashDecoder<'r>> {
    let model = &runner.model;
    let flash = runner.options();
    refuse_memory_budget(flash)?;
    let Some(image) = &model.image else {
        bail!("{} is not a flash image", model.path.display());
    };
    let widest = crate::backend::gpu::flash::MAX_VERIFY_WIDTH;
    if verify_width > widest {
        bail!(
            "a draft of {} tokens makes verify passes of {verify_width} positions, and the GPU \
             flash path's hold at most {widest}: draft {} tokens or fewer",
            verify_width - 1,
            widest - 1
        );
    }
    let kv = gpu_kv_type(flash);
    if flash.strategy != Strategy::Flash {
        bail!("the GPU backend runs the flash strategy only (bundles streamed into GPU windows); use the flash strategy or the CPU backend");
    }
    if flash.synthetic_activity.is_some() {
        bail!("synthetic activity is not supported on the GPU backend; use the CPU backend");
    }
    let mut selection = flash.selection(runner.calibration.is_some());
    let plan = match flash.vram_budget {
        Some(budget) => {
            let (sel, plan) = choose_vram_plan(
                runner,
                ctx,
                kv,
                budget,
                selection,
                flash.predictor,
                verify_width,
            )?;
            selection = sel;
            Some(plan)
        }
        None => None,
    };
    let predictors = match selection {
        Selection::All => {
            if !flash.dense && runner.calibration.is_none() {
                log::warn!(
                    "{} is not calibrated: computing every FFN neuron (run `llmflash calibrate`)",
                    model.path.display()
                );
            }
            None
        }
        Selection::Predictor => runner.predicting()?.map(|c| c.predictors.as_slice()),
        Selection::Oracle => bail!("the oracle selection is not supported on the GPU backend"),
    };
    let base = flash.flash_options(selection);
    let mut opts = GpuFlashOptions {
        window_tokens: base.window_tokens,
        io_threads: base.io_threads,
        coalesce: base.coalesce,
        direct: base.direct,
        kv_type: kv,
        verify: base.verify,
        verify_width,
        ..GpuFlashOptions::default()
    };
    if let Some(plan) = plan {
        log::info!("VRAM plan: {plan:?}");
        opts.pinned = runner.pins(selection, &plan.0.window_slots);
        opts.window_slots = Some(plan.0.window_slots);
        opts.overflow_slots = plan.1;
    }
    Ok(GpuFlashDecoder::new(
        gpu,
        image,
        &model.weights,
        predictors,
        ctx,
        opts,
    )?)
}

/// The VRAM plan for `budget` and the selection it runs: as under a memory budget, the
/// predictor gives way to computing every neuron unless it is expected to read under 3/4 of
/// the dense bytes (`keep` keeps it). On the GPU, dense selection also needs no readback of
/// the active set, so the next layer's reads start while this one computes.
fn choose_vram_plan(
    runner: &Runner,
    ctx: usize,
    kv: KvType,
    budget: u64,
    selection: Selection,
    keep: bool,
    columns: usize,
) -> anyhow::Result<(Selection, (budget::Plan, usize))> {
    let cal = match (selection, &runner.calibration) {
        (Selection::Predictor, Some(cal)) if !keep => cal,
        _ => {
            let predicted = selection == Selection::Predictor;
            let plan = plan_vram(runner, ctx, kv, budget, predicted, columns)?;
            return Ok((selection, plan));
        }
    };
    let n = runner.model.weights.config.intermediate_size;
    let stride = runner.model.image.as_ref().map_or(0, |i| i.bundle().stride) as f64;
    let plans = (
        plan_vram(runner, ctx, kv, budget, true, columns),
        plan_vram(runner, ctx, kv, budget, false, columns),
    );
    let reads = |(plan, _): &(budget::Plan, usize), selection| -> f64 {
        let slots = &plan.window_slots;
        let misses: f64 = match selection {
            Selection::Predictor => (slots.iter().enumerate())
                .map(|(l, &s)| cal.expected_misses(Sets::Predicted, l, s))
                .sum(),
            _ => slots.iter().map(|&s| n.saturating_sub(s) as f64).sum(),
        };
        misses * stride
    };
    choose_selection("VRAM plan", plans, PREDICTOR_READ_SHARE, reads, |n| {
        runner.notify(&n)
    })
    .map_err(|(predicted, _)| predicted)
}

/// The VRAM plan of a flash image on the GPU, and the overflow reserve it counts (one layer's
/// expected active neurons): the same planner as a memory budget's, with the GPU's buffers.
pub fn plan_vram(
    runner: &Runner,
    ctx: usize,
    kv: KvType,
    budget: u64,
    predicted: bool,
    columns: usize,
) -> anyhow::Result<(budget::Plan, usize)> {
    let model = &runner.model;
    let Some(image) = &model.image else {
        bail!("a VRAM budget needs a flash image");
    };
    let c = &model.weights.config;
    let n = c.intermediate_size;
    let ctx = ctx.min(c.max_positions).max(1);
    let cal = runner.calibration.as_ref().filter(|_| predicted);
    let active = match cal {
        Some(_) => runner.expected_active(Selection::Predictor),
        None => runner.expected_active(Selection::All),
    };
    let needs = Needs {
        // The GPU path keeps the embedding and output head in VRAM: nothing is streamed.
        resident: image.meta.resident_bytes(),
        tables: Vec::new(),
        stream_staging: 0,
        predictors: cal.map_or(0, |c| c.predictor_bytes()),
        kv_cache: KvCache::bytes_for(c, ctx, kv),
        // Activations, attention scores, logits and the predicted lists, per position of a pass
        // (`columns`: a verify pass's), then the active list and the slot map with its masks.
        scratch: (((10 * c.hidden_size + 2 * n + c.n_heads * ctx + c.vocab_size + 2 * (n + 1))
            * columns.max(1)
            + 2 * (n + 1)
            + 2 * n)
            * 4) as u64,
        stride: image.bundle().stride as u64,
        // Device memory: the process's own memory is not in it.
        process: 0,
        neurons: vec![n; c.n_layers],
        active: active.clone(),
    };
    let plan = budget::plan(budget, &needs).context("planning the VRAM budget")?;
    let reserve = active.iter().copied().fold(1.0, f64::max).ceil() as usize;
    Ok((plan, reserve))
}
