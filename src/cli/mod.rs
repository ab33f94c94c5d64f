//! The `llmflash` command line: thin subcommands that parse, call the library and print.

mod bench;
mod calibrate;
mod chat;
mod convert;
mod draft_args;
mod flash_args;
mod generate;
mod gpu_draft;
mod hints;
mod inspect;
mod perplexity;
mod reorder;
mod sampling_args;
mod serve;
mod values;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::api::Runner;
use crate::model::{load, LoadedModel};

#[derive(Parser)]
#[command(
    name = "llmflash",
    version,
    about = "Run language models larger than memory"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true, value_parser = values::threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Generate(generate::Args),
    /// Perplexity of a text file, in llama.cpp's convention.
    Perplexity(perplexity::Args),
    /// Print what a model file or flash image holds.
    Inspect(inspect::Args),
    /// Write a flash image (FFN weights in row-column bundles) from a GGUF or HF model.
    Convert(convert::Args),
    /// Fit sparsity thresholds and neuron predictors into a flash image.
    Calibrate(calibrate::Args),
    /// Store a calibrated image's neurons hottest first (calibrate does this by default).
    Reorder(reorder::Args),
    /// Measure decode speed.
    Bench(bench::Args),
    /// Chat with the model in the terminal.
    Chat(chat::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, decoding requests together.
    Serve(serve::Args),
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hints::hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().context("starting the worker threads")?;
    // Run the command on a worker: each matvec's parallel split then starts from inside the
    // pool, instead of parking this thread on a latch and waking a worker for every one of
    // the ~250 matvecs of a token (a futex round trip each, measured at ~40% of decode time).
    pool.install(|| match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Reorder(a) => reorder::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
    })
}

/// Reads a text input (a regular file of at most 64 MiB), with the path in any error.
fn read_text(path: &Path) -> anyhow::Result<String> {
    crate::storage::input::read_text(path, crate::storage::input::MAX_TEXT_BYTES)
        .with_context(|| format!("reading {}", path.display()))
}

/// Opens a model to run with the flags' options; the planner's notices are printed with the
/// flag that changes each.
fn open_runner(path: &Path, flash: &flash_args::FlashArgs) -> anyhow::Result<Runner> {
    let notices = Box::new(|n: &crate::api::Notice| eprintln!("{}", hints::notice(n)));
    Runner::open_with(path, flash.run_options(), notices)
}

/// Loads a model, with the path in any error.
fn open_model(path: &Path) -> anyhow::Result<LoadedModel> {
    load(path).with_context(|| format!("loading {}", path.display()))
}
