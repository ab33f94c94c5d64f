//! `llmflash chat`: a conversation in the terminal, with the model's chat template, replies
//! streamed as they are generated, and Ctrl-C stopping a reply rather than the program.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::api::{Conversation, Engine, GenerateOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, an HF directory or a flash image.
    #[arg(short, long)]
    model: PathBuf,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most.
    #[arg(short, long, default_value_t = 512, value_parser = super::values::tokens)]
    n: usize,
    #[command(flatten)]
    sampling: super::sampling_args::SamplingArgs,
    /// Context length (positions) the conversation keeps; older turns are dropped past it.
    #[arg(long, default_value_t = 4096, value_parser = super::values::context)]
    ctx: usize,
    /// Keep generating past end-of-text tokens (up to -n).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    flash: super::flash_args::FlashArgs,
    #[command(flatten)]
    draft: super::draft_args::DraftArgs,
}

/// Set by Ctrl-C; a reply in progress stops at its next token.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let budgeted = a.flash.memory_budget.is_some();
    a.draft.resolve(budgeted);
    let notices = Box::new(|n: &crate::api::Notice| eprintln!("{}", super::hints::notice(n)));
    let mut builder = Engine::builder(&a.model)
        .options(a.flash.run_options())
        .notices(notices)
        .context(a.ctx);
    if let Some(d) = a.draft.ngram_only("chat", "") {
        builder = builder.ngram_drafts(d);
    }
    let engine = builder.build()?;
    if engine.model().chat_template.is_none() {
        anyhow::bail!(
            "{} has no chat template: use `llmflash generate` for plain text",
            a.model.display()
        );
    }
    let mut chat = Conversation::new(&engine, a.system.as_deref())?;
    let opts = GenerateOptions {
        max_tokens: a.n,
        sampling: a.sampling.sampling(),
        ignore_eos: a.ignore_eos,
        ..GenerateOptions::default()
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
    eprintln!(
        "chatting with {} (/reset forgets the conversation, /exit or Ctrl-D leaves; Ctrl-C \
         stops a reply)",
        engine.model().path.display()
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        INTERRUPTED.store(false, Ordering::SeqCst);
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let message = line.trim();
        match message {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                chat.reset();
                eprintln!("[the conversation is forgotten]");
                continue;
            }
            _ => {}
        }
        INTERRUPTED.store(false, Ordering::SeqCst);
        let reply = chat.reply(message, &opts, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        writeln!(out)?;
        match reply {
            Ok(r) => {
                if r.dropped > 0 {
                    eprintln!(
                        "[{} earliest exchange(s) dropped: the conversation outgrew the \
                         {}-position context]",
                        r.dropped,
                        engine.context()
                    );
                }
                if r.completion.finish_reason == crate::api::FinishReason::Cancelled {
                    eprintln!("[stopped]");
                }
                log::info!("{:.1} tokens/s", r.completion.stats.tokens_per_s);
            }
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
}
