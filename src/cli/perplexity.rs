//! `llmflash perplexity`: llama.cpp-compatible perplexity of a text file.

use std::path::PathBuf;

use anyhow::bail;

use crate::engine::perplexity::perplexity;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or an HF directory.
    #[arg(short, long)]
    model: PathBuf,
    /// Text file to score.
    #[arg(short, long)]
    file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512, value_parser = super::values::context)]
    ctx: usize,
    /// Score at most this many windows.
    #[arg(long, value_parser = super::values::chunks)]
    chunks: Option<usize>,
    #[command(flatten)]
    flash: super::flash_args::FlashArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // The text first: a bad file is refused before the model loads.
    let text = super::read_text(&a.file)?;
    let runner = super::open_runner(&a.model, &a.flash)?.scoring();
    let Some(tok) = runner.model.tokenizer.as_ref() else {
        bail!(
            "{} has no tokenizer; perplexity needs one",
            a.model.display()
        );
    };
    let tokens = tok.encode(&text, true, false);
    let bos = if tok.add_bos() { tok.bos() } else { None };
    eprintln!("{} tokens, ctx {}", tokens.len(), a.ctx);
    let mut session = runner.session(a.ctx)?;
    let result = perplexity(&mut session, &tokens, a.ctx, bos, a.chunks, |i, p| {
        eprint!("[{i}]{p:.4},");
    })?;
    eprintln!();
    println!(
        "chunks = {}, ctx = {}, scored tokens = {}",
        result.chunks, result.ctx, result.tokens_scored
    );
    println!("ppl = {:.4}", result.ppl);
    Ok(())
}
