//! `llmflash generate`: stream a continuation of a prompt.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::api::gpu::open_gpu_target;
use crate::backend::gpu::device::F16Mode;
use crate::backend::gpu::{GpuContext, GpuOptions};
use crate::engine::sampler::Sampler;
use crate::model::chat::ChatMessage;
use crate::model::tokenizer::StreamDecoder;

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
    #[command(flatten)]
    sampling: super::sampling_args::SamplingArgs,
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
    let runner = super::open_runner(&a.model, &a.flash)?;
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
    let sampling = a.sampling.sampling();
    let mut sampler = Sampler::new(sampling);
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
                ctx,
                prompt: &prompt,
                max_new: a.n,
            };
            super::gpu_draft::generate(&gpu, &runner, &job, &mut sampler, is_end, on_token)?
        } else {
            let mut target = open_gpu_target(&gpu, &runner, ctx)?;
            crate::draft::generate(
                &mut target,
                None,
                &a.draft.options(),
                &prompt,
                a.n,
                &mut sampler,
                is_end,
                on_token,
            )?
        }
    } else {
        if a.gpu_adapter.is_some() || a.gpu_f16 != F16Mode::Auto {
            bail!("--gpu-adapter and --gpu-f16 need --backend gpu");
        }
        let mut session = runner.session(ctx)?;
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
