//! `llmflash generate`: stream a continuation of a prompt.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::backend::gpu::device::F16Mode;
use crate::backend::gpu::{GpuContext, GpuDecoder, GpuFlashDecoder, GpuFlashOptions, GpuOptions};
use crate::budget::{self, Needs};
use crate::engine::flash::{Selection, Strategy};
use crate::engine::gpu::{generate_gpu, GpuModel};
use crate::engine::kv_cache::{KvCache, KvType};
use crate::engine::sampler::{Sampler, Sampling};
use crate::model::chat::ChatMessage;
use crate::model::tokenizer::StreamDecoder;
use crate::sparsity::Sets;

use super::draft_args::BuiltDraft;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or an HF directory.
    #[arg(short, long)]
    model: PathBuf,
    /// The prompt.
    #[arg(short, long, required_unless_present = "token_ids", default_value = "")]
    prompt: String,
    /// The prompt as comma-separated token ids (models without a tokenizer, such as
    /// synthetic images); the output is then token ids only.
    #[arg(long, value_delimiter = ',', conflicts_with = "chat")]
    token_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(short, long, default_value_t = 64, value_parser = super::values::tokens)]
    n: usize,
    /// Always take the most likely token (the default unless --temp is given).
    #[arg(long, conflicts_with_all = ["temp", "top_p", "top_k", "seed"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, allow_negative_numbers = true, value_parser = super::values::temperature)]
    temp: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true, value_parser = super::values::top_p)]
    top_p: f32,
    /// Keep only the K most likely tokens before sampling (0 = all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true, value_parser = super::values::top_k)]
    top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Compute backend: cpu, or gpu (wgpu: Vulkan, Metal, DX12 or GL; lavapipe where no GPU
    /// exists, which is a CPU emulating a GPU).
    #[arg(long, value_parser = ["cpu", "gpu"], default_value = "cpu")]
    backend: String,
    /// With --backend gpu: the first adapter whose name contains this (case-insensitive).
    #[arg(long)]
    gpu_adapter: Option<String>,
    /// With --backend gpu: how shaders read f16 values (weights, block scales, an f16 KV
    /// cache). native: as f16 arrays (the SHADER_F16 feature); packed: two per 32-bit word,
    /// which every adapter runs; auto: native where the adapter offers it.
    #[arg(long, value_enum, default_value_t = F16Mode::Auto)]
    gpu_f16: F16Mode,
    /// Context length (positions) to allocate.
    #[arg(long, default_value_t = 2048, value_parser = super::values::context)]
    ctx: usize,
    /// Print one JSON object (text, tokens, stats) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Keep generating past end-of-text tokens (benchmarks: always N tokens).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    flash: super::flash_args::FlashArgs,
    #[command(flatten)]
    draft: super::draft_args::DraftArgs,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let runner = super::runner::Runner::open(&a.model, &a.flash)?;
    let budgeted_image = runner.model.image.is_some() && a.flash.memory_budget.is_some();
    a.draft.resolve(budgeted_image && a.backend == "cpu");
    let draft_model = a.draft.open_model(&runner.model)?;
    let runner = a
        .draft
        .plan(runner, draft_model.as_ref(), a.ctx.min(a.n + 4096));
    let model = &runner.model;
    let tok = model.tokenizer.as_ref();
    let prompt = match (&a.token_ids, tok) {
        (Some(ids), _) => ids.clone(),
        (None, Some(tok)) => tok.encode(&prompt_text(&a, model)?, true, a.chat),
        (None, None) => bail!(
            "{} has no tokenizer; give the prompt as --token-ids 1,2,3",
            a.model.display()
        ),
    };
    let sampling = match a.temp {
        Some(t) if !a.greedy => Sampling::Random {
            temperature: t,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        _ => Sampling::Greedy,
    };
    let mut sampler = Sampler::new(sampling.clone());
    // The KV cache only needs the positions this run can reach.
    let ctx = a.ctx.min(prompt.len() + a.n + 1);
    let mut stream = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    let mut text_out = String::new();
    let json = a.json;
    let is_end = |t: u32| !a.ignore_eos && tok.is_some_and(|tok| tok.is_end_of_generation(t));
    let on_token = |t: u32| {
        let piece = match tok {
            Some(tok) => stream.push(tok, t),
            None => format!("{t} "),
        };
        if json {
            text_out.push_str(&piece);
        } else {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let gen = if a.backend == "gpu" {
        let gpu = GpuContext::new(&GpuOptions {
            adapter: a.gpu_adapter.clone(),
            backends: None,
            f16: a.gpu_f16,
        })?;
        if gpu.info.device_type == wgpu::DeviceType::Cpu {
            eprintln!(
                "note: the GPU adapter `{}` is a CPU emulating a GPU: its speed says nothing about a GPU's",
                gpu.info.name
            );
        }
        if a.draft.enabled() {
            let job = super::gpu_draft::Job {
                draft_model: draft_model.as_ref(),
                args: &a.draft,
                flash: &a.flash,
                ctx,
                prompt: &prompt,
                max_new: a.n,
            };
            super::gpu_draft::generate(&gpu, &runner, &job, &mut sampler, is_end, on_token)?
        } else {
            let mut dec = open_gpu_model(&gpu, &runner, ctx, &a.flash)?;
            let greedy = sampling == Sampling::Greedy;
            generate_gpu(
                dec.as_mut(),
                &prompt,
                a.n,
                greedy,
                &mut sampler,
                is_end,
                on_token,
            )?
        }
    } else {
        if a.gpu_adapter.is_some() || a.gpu_f16 != F16Mode::Auto {
            bail!("--gpu-adapter and --gpu-f16 need --backend gpu");
        }
        let mut session = runner.session(ctx, &a.flash)?;
        let mut draft = BuiltDraft::new(&a.draft, &runner, &session, draft_model.as_ref(), ctx)?;
        let name = a.draft.source().name();
        crate::draft::generate(
            &mut session,
            draft.as_dyn(&name),
            &a.draft.options(),
            &prompt,
            a.n,
            &mut sampler,
            is_end,
            on_token,
        )?
    };
    let tail = stream.finish();
    if json {
        text_out.push_str(&tail);
        let obj = serde_json::json!({
            "text": text_out,
            "prompt_tokens": prompt,
            "tokens": gen.tokens,
            "stats": gen.stats,
        });
        writeln!(out, "{obj}")?;
    } else {
        writeln!(out, "{tail}")?;
        log::info!("{:.1} tokens/s", gen.stats.tokens_per_s);
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tokens/s]",
            gen.stats.prompt_tokens, gen.stats.generated_tokens, gen.stats.tokens_per_s
        );
    }
    Ok(())
}

/// The prompt text, wrapped in the chat template with --chat.
fn prompt_text(a: &Args, model: &crate::engine::model::Model) -> anyhow::Result<String> {
    if !a.chat {
        return Ok(a.prompt.clone());
    }
    let Some(t) = model.chat_template.as_ref() else {
        bail!("{} has no chat template; drop --chat", a.model.display());
    };
    let msg = ChatMessage {
        role: "user".into(),
        content: a.prompt.clone(),
    };
    t.render(&[msg], true)
        .context("rendering the chat template")
}

/// The GPU decoder for `runner`'s model: dense for GGUF and HF models; for a flash image, the
/// flash path (bundles streamed from the SSD into GPU window buffers).
pub(super) fn open_gpu_model<'r>(
    gpu: &GpuContext,
    runner: &'r super::runner::Runner,
    ctx: usize,
    flash: &super::flash_args::FlashArgs,
) -> anyhow::Result<Box<dyn GpuModel + 'r>> {
    let model = &runner.model;
    refuse_memory_budget(flash)?;
    if model.image.is_some() {
        return Ok(Box::new(open_gpu_flash(gpu, runner, ctx, flash, 1)?));
    }
    if flash.vram_budget.is_some() {
        bail!(
            "--vram-budget needs a flash image; convert the model first: llmflash convert {} -o MODEL.flash",
            model.path.display()
        );
    }
    Ok(Box::new(GpuDecoder::with_kv_type(
        gpu,
        &model.weights,
        ctx,
        gpu_kv_type(flash),
    )?))
}

/// The GPU's KV cache type: f32 unless asked. The GPU's attention is f32 arithmetic either way
/// (not ggml's f16 flash attention, which the CPU's f16 cache reproduces), so f16 only saves
/// memory there.
pub(super) fn gpu_kv_type(flash: &super::flash_args::FlashArgs) -> KvType {
    flash.kv_type.unwrap_or(KvType::F32)
}

fn refuse_memory_budget(flash: &super::flash_args::FlashArgs) -> anyhow::Result<()> {
    if flash.memory_budget.is_some() {
        bail!("--memory-budget plans host memory for --backend cpu; with --backend gpu use --vram-budget");
    }
    Ok(())
}

/// The GPU flash decoder for `runner`'s flash image, with verify passes of up to
/// `verify_width` positions (1: single steps); under --vram-budget the plan counts the
/// activations of that many positions.
pub(super) fn open_gpu_flash<'r>(
    gpu: &GpuContext,
    runner: &'r super::runner::Runner,
    ctx: usize,
    flash: &super::flash_args::FlashArgs,
    verify_width: usize,
) -> anyhow::Result<GpuFlashDecoder<'r>> {
    let model = &runner.model;
    refuse_memory_budget(flash)?;
    let Some(image) = &model.image else {
        bail!("{} is not a flash image", model.path.display());
    };
    let widest = crate::backend::gpu::flash::MAX_VERIFY_WIDTH;
    if verify_width > widest {
        bail!(
            "--draft-max {} makes verify passes of {verify_width} positions, and the GPU flash \
             path's hold at most {widest}: use --draft-max {} or less",
            verify_width - 1,
            widest - 1
        );
    }
    let kv = gpu_kv_type(flash);
    if flash.strategy != Strategy::Flash {
        bail!("--backend gpu runs the flash strategy only (bundles streamed into GPU windows); drop --strategy or use --backend cpu");
    }
    if flash.synthetic_activity.is_some() {
        bail!("--synthetic-activity is not supported with --backend gpu; use --backend cpu");
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
        Selection::Oracle => bail!("--oracle is not supported with --backend gpu"),
    };
    let base = flash.options(selection);
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

/// The VRAM plan for `budget` and the selection it runs: as under --memory-budget, the
/// predictor gives way to computing every neuron unless it is expected to read under 3/4 of
/// the dense bytes (`keep` keeps it). On the GPU, dense selection also needs no readback of
/// the active set, so the next layer's reads start while this one computes.
fn choose_vram_plan(
    runner: &super::runner::Runner,
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
    super::runner::choose_selection(
        "VRAM plan",
        plans,
        super::runner::PREDICTOR_READ_SHARE,
        reads,
        |m| eprintln!("{m}"),
    )
    .map_err(|(predicted, _)| predicted)
}

/// The VRAM plan of a flash image on the GPU, and the overflow reserve it counts (one layer's
/// expected active neurons): the same planner as --memory-budget, with the GPU's buffers.
pub(super) fn plan_vram(
    runner: &super::runner::Runner,
    ctx: usize,
    kv: KvType,
    budget: u64,
    predicted: bool,
    columns: usize,
) -> anyhow::Result<(budget::Plan, usize)> {
    let model = &runner.model;
    let Some(image) = &model.image else {
        bail!("--vram-budget needs a flash image");
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
    let plan = budget::plan(budget, &needs).context("--vram-budget")?;
    let reserve = active.iter().copied().fold(1.0, f64::max).ceil() as usize;
    Ok((plan, reserve))
}
