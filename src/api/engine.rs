//! [`Engine`]: a model opened under a memory budget, generating text from prompts. What an
//! application embeds; the command line's `generate` is one such user.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::gpu::{open_gpu_target, GpuTarget};
use super::notice::{log_notice, Notify};
use super::options::RunOptions;
use super::runner::{DraftNeeds, Runner};
use super::text::TextStream;
use crate::backend::gpu::GpuContext;
use crate::draft::{generate_while, DraftOptions, NgramDraft, Target};
use crate::engine::model::Model;
use crate::engine::sampler::{Sampler, Sampling};
use crate::engine::stats::GenerationStats;
use crate::engine::Session;
use crate::model::chat::ChatMessage;
use crate::model::tokenizer::Tokenizer;
use crate::quant::Activations;

/// Positions of context an engine allocates unless told otherwise.
pub const DEFAULT_CONTEXT: usize = 2048;

/// What to generate from.
#[derive(Clone, Copy, Debug)]
pub enum Prompt<'a> {
    /// Plain text, tokenised with the model's tokenizer.
    Text(&'a str),
    /// A conversation, rendered with the model's chat template and ending with the opening of
    /// the assistant's turn.
    Chat(&'a [ChatMessage]),
    /// Token ids (models without a tokenizer, or text tokenised elsewhere).
    Tokens(&'a [u32]),
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// The text ends before the first of these (not included).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks: always `max_tokens`).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> GenerateOptions {
        GenerateOptions {
            max_tokens: 128,
            sampling: Sampling::Greedy,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the context was full.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The text generated (up to a stop string, if one ended it).
    pub text: String,
    /// The tokens generated.
    pub tokens: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Why the generation ended.
    pub finish_reason: FinishReason,
    /// Speeds, reads and memory.
    pub stats: GenerationStats,
}

/// Builds an [`Engine`]: the model, the memory budget and the run options.
pub struct EngineBuilder {
    path: PathBuf,
    options: RunOptions,
    context: usize,
    notices: Option<Notify>,
    drafts: Option<DraftOptions>,
    sequences: usize,
    gpu: Option<GpuContext>,
}

impl EngineBuilder {
    /// A memory budget for the whole process, in bytes. A GGUF file or HF directory is then
    /// converted into a flash image once, into the cache ([`super::cache`]).
    pub fn memory_budget(mut self, bytes: u64) -> EngineBuilder {
        self.options.memory_budget = Some(bytes);
        self
    }

    /// Generate on this GPU (`wgpu` device and queue: an application's own, through
    /// [`GpuContext::from_device`], or a new one from [`GpuContext::new`]) instead of the CPU.
    /// A flash image then streams its bundles into GPU windows, planned under
    /// [`EngineBuilder::vram_budget`] when one is given; a host memory budget does not apply.
    pub fn gpu(mut self, gpu: GpuContext) -> EngineBuilder {
        self.gpu = Some(gpu);
        self
    }

    /// A budget of GPU memory, in bytes, for a flash image on [`EngineBuilder::gpu`]: the
    /// planner sizes the GPU windows, pins and overflow to fit it.
    pub fn vram_budget(mut self, bytes: u64) -> EngineBuilder {
        self.options.vram_budget = Some(bytes);
        self
    }

    /// How the CPU's activations meet quantised weights: [`Activations::Q8`] (llama.cpp's
    /// arithmetic, the default) or [`Activations::F32`] (the GPU backend's). A setting of this
    /// engine's model: other engines in the process keep their own.
    pub fn activations(mut self, activations: Activations) -> EngineBuilder {
        self.options.activations = activations;
        self
    }

    /// Positions of context each generation may use at most (prompt and output).
    pub fn context(mut self, positions: usize) -> EngineBuilder {
        self.context = positions.max(1);
        self
    }

    /// Every run option at once (strategy, window, reads, ...).
    pub fn options(mut self, options: RunOptions) -> EngineBuilder {
        self.options = options;
        self
    }

    /// Where the planner's notices go (default: the log, at `warn`).
    pub fn notices(mut self, notices: Notify) -> EngineBuilder {
        self.notices = Some(notices);
        self
    }

    /// Speculative decoding with prompt-lookup (n-gram) drafts: under a memory budget each
    /// pass of flash reads can then verify several tokens. Greedy output is unchanged.
    pub fn ngram_drafts(mut self, options: DraftOptions) -> EngineBuilder {
        self.drafts = Some(options);
        self
    }

    /// Plans memory for `n` sequences decoded together (a server's batch: see
    /// [`crate::engine::batch::BatchDecoder`]), each with a KV cache of its own.
    pub fn sequences(mut self, n: usize) -> EngineBuilder {
        self.sequences = n.max(1);
        self
    }

    /// Opens the model and plans its memory.
    pub fn build(self) -> anyhow::Result<Engine> {
        if self.gpu.is_some() && self.options.memory_budget.is_some() {
            bail!(
                "a memory budget plans host memory for the CPU backend; on the GPU give a VRAM \
                 budget (EngineBuilder::vram_budget)"
            );
        }
        let notices = self.notices.unwrap_or_else(log_notice);
        let runner = Runner::open_with(&self.path, self.options, notices)?;
        let runner = match &self.drafts {
            Some(d) => runner.drafting(d.max, DraftNeeds::default()),
            None => runner,
        }
        .serving(self.sequences);
        Ok(Engine {
            runner,
            context: self.context,
            drafts: self.drafts,
            gpu: self.gpu,
        })
    }
}

/// A model opened to generate from. Each [`Engine::generate`] plans a session for the
/// positions it needs under the engine's budget, decodes, and frees it.
pub struct Engine {
    runner: Runner,
    context: usize,
    drafts: Option<DraftOptions>,
    gpu: Option<GpuContext>,
}

impl Engine {
    /// An engine over the model at `path` (a GGUF file, an HF directory or a flash image),
    /// to be configured.
    pub fn builder(path: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder {
            path: path.as_ref().to_path_buf(),
            options: RunOptions::default(),
            context: DEFAULT_CONTEXT,
            notices: None,
            drafts: None,
            sequences: 1,
            gpu: None,
        }
    }

    /// The prompt-lookup draft settings, when the engine was built with
    /// [`EngineBuilder::ngram_drafts`] (the server drafts for every sequence of its batch
    /// with them).
    pub fn drafts(&self) -> Option<&DraftOptions> {
        self.drafts.as_ref()
    }

    /// The model with its tokenizer, chat template and weights.
    pub fn model(&self) -> &Model {
        &self.runner.model
    }

    /// The planner behind the engine, for sessions of one's own ([`Runner::session`]).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Positions of context a generation may use.
    pub fn context(&self) -> usize {
        self.context.min(self.model().weights.config.max_positions)
    }

    /// The model's tokenizer, or an error saying the model has none.
    pub fn tokenizer(&self) -> anyhow::Result<&Tokenizer> {
        let model = self.model();
        model.tokenizer.as_ref().with_context(|| {
            format!(
                "{} has no tokenizer: give the prompt as token ids",
                model.path.display()
            )
        })
    }

    /// The prompt's token ids.
    pub fn encode(&self, prompt: &Prompt) -> anyhow::Result<Vec<u32>> {
        Ok(match prompt {
            Prompt::Tokens(ids) => ids.to_vec(),
            Prompt::Text(text) => self.tokenizer()?.encode(text, true, false),
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                self.tokenizer()?.encode(&text, true, true)
            }
        })
    }

    /// `messages` in the model's chat template, ending with the assistant's turn opened.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> anyhow::Result<String> {
        let model = self.model();
        let Some(template) = model.chat_template.as_ref() else {
            bail!(
                "{} has no chat template: give the prompt as plain text",
                model.path.display()
            );
        };
        template
            .render(messages, true)
            .context("rendering the chat template")
    }

    /// A session for a prompt of `prompt` tokens and up to `max_tokens` more, planned under
    /// the engine's budget.
    pub fn session(&self, prompt: usize, max_tokens: usize) -> anyhow::Result<Session<'_>> {
        let ctx = self.context();
        if prompt >= ctx {
            bail!(
                "the prompt has {prompt} tokens and the context holds {ctx}: shorten the \
                 prompt or open the engine with a longer context"
            );
        }
        self.runner.session(ctx.min(prompt + max_tokens + 1))
    }

    /// Generates from `prompt`, calling `on_text` with each piece of text as it is decided
    /// (whole characters, never part of a stop string); `on_text` returns false to stop.
    ///
    /// ```no_run
    /// use llmflash::api::{Engine, GenerateOptions, Prompt};
    ///
    /// # fn main() -> anyhow::Result<()> {
    /// let engine = Engine::builder("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ///     .memory_budget(96 << 20)
    ///     .build()?;
    /// let opts = GenerateOptions { max_tokens: 32, ..GenerateOptions::default() };
    /// let done = engine.generate(&Prompt::Text("The capital of France is"), &opts, |piece| {
    ///     print!("{piece}");
    ///     true
    /// })?;
    /// println!("\n{} tokens, {:?}", done.tokens.len(), done.finish_reason);
    /// # Ok(())
    /// # }
    /// ```
    pub fn generate(
        &self,
        prompt: &Prompt,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<Completion> {
        let ids = self.encode(prompt)?;
        if self.gpu.is_some() {
            let mut gpu = self.gpu_decoder(ids.len() + opts.max_tokens + 1)?;
            return self.generate_on(&mut gpu, &ids, 0, opts, on_text);
        }
        let mut session = self.session(ids.len(), opts.max_tokens)?;
        self.generate_in(&mut session, &ids, 0, opts, on_text)
    }

    /// A decoder on the engine's GPU with `positions` of context (at most the engine's), for
    /// an application that drives its own loop (e.g. a token between frames, on the device
    /// it renders with); errs when the engine was built without [`EngineBuilder::gpu`].
    pub fn gpu_decoder(&self, positions: usize) -> anyhow::Result<GpuTarget<'_>> {
        let Some(gpu) = &self.gpu else {
            bail!(
                "this engine runs on the CPU: build it with EngineBuilder::gpu to decode on a GPU"
            );
        };
        open_gpu_target(gpu, &self.runner, positions.min(self.context()))
    }

    /// [`Engine::generate`] from token ids `ids` in `session`, whose cache already holds the
    /// first `cached` of them (a conversation's earlier turns).
    pub fn generate_in(
        &self,
        session: &mut Session<'_>,
        ids: &[u32],
        cached: usize,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<Completion> {
        self.generate_on(session, ids, cached, opts, on_text)
    }

    /// The generate loop on any target: a CPU session or a GPU decoder.
    fn generate_on<T: Target + ?Sized>(
        &self,
        session: &mut T,
        ids: &[u32],
        cached: usize,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<Completion> {
        if cached >= ids.len() || session.position() != cached {
            bail!(
                "the session holds {} positions and {cached} of the {} prompt tokens are said \
                 to be cached: at least one prompt token must be new",
                session.position(),
                ids.len()
            );
        }
        let tok = self.model().tokenizer.as_ref();
        let mut stream = TextStream::new(&opts.stop);
        let (mut text, mut cancelled) = (String::new(), false);
        let on_token = |t: u32| {
            let Some(tok) = tok else { return true };
            let piece = stream.push(tok, t);
            text.push_str(&piece);
            if !piece.is_empty() && !on_text(&piece) {
                cancelled = true;
            }
            !cancelled && !stream.stopped()
        };
        let is_end = |t: u32| !opts.ignore_eos && tok.is_some_and(|k| k.is_end_of_generation(t));
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut ngram = NgramDraft::new();
        let drafts = self.drafts.unwrap_or_default();
        let draft = self.drafts.as_ref().map(|_| {
            let d: &mut dyn crate::draft::Draft<T> = &mut ngram;
            (d, "ngram")
        });
        let gen = generate_while(
            session,
            draft,
            &drafts,
            &ids[cached..],
            opts.max_tokens,
            &mut sampler,
            is_end,
            on_token,
        )?;
        let tail = stream.finish();
        if !tail.is_empty() && !cancelled {
            on_text(&tail);
        }
        text.push_str(&tail);
        let full = session.position() >= session.capacity();
        let finish_reason = if stream.stopped() {
            FinishReason::Stop
        } else if cancelled {
            FinishReason::Cancelled
        } else if gen.tokens.len() >= opts.max_tokens || full {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Ok(Completion {
            text,
            tokens: gen.tokens,
            prompt_tokens: ids.len() - cached,
            finish_reason,
            stats: gen.stats,
        })
    }
}
