//! `llmflash serve`: an OpenAI-compatible HTTP server (see [`crate::serve`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::bail;

use crate::api::Engine;
use crate::serve::{serve, ServeOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file, an HF directory or a flash image.
    #[arg(short, long)]
    model: PathBuf,
    /// Address to listen on. Loopback by default: give 0.0.0.0 to be reachable from other
    /// machines (then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together: each pass over the weights (each flash read) serves all of
    /// them. Each has a KV cache of its own, counted in --memory-budget.
    #[arg(long, default_value_t = 4, value_parser = parallel)]
    parallel: usize,
    /// Context positions for all sequences together; each gets CTX / PARALLEL.
    #[arg(long, default_value_t = 4096, value_parser = super::values::context)]
    ctx: usize,
    /// Requests that may wait for a free sequence; past them a request gets 503.
    #[arg(long, default_value_t = 64, value_parser = queue)]
    queue: usize,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long)]
    api_key: Option<String>,
    /// Largest request body accepted.
    #[arg(long, default_value = "1MiB", value_parser = body_limit)]
    max_body: u64,
    /// Compute backend: cpu (batched decoding of several sequences runs on the CPU).
    #[arg(long, value_parser = ["cpu", "gpu"], default_value = "cpu")]
    backend: String,
    #[command(flatten)]
    flash: super::flash_args::FlashArgs,
    #[command(flatten)]
    draft: super::draft_args::DraftArgs,
}

fn parallel(s: &str) -> Result<usize, String> {
    super::values::count_in(s, 1, 64)
}

fn queue(s: &str) -> Result<usize, String> {
    super::values::count_in(s, 0, 1 << 16)
}

fn body_limit(s: &str) -> Result<u64, String> {
    super::values::bytes_in(s, 1 << 10, 1 << 30)
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    if a.backend == "gpu" {
        bail!(
            "serve decodes its batch of sequences on the CPU backend only; drop --backend gpu \
             (generate --backend gpu runs one sequence on the GPU)"
        );
    }
    // As for generate: prompt lookup by default where a pass is mostly flash reads.
    a.draft.resolve(a.flash.memory_budget.is_some());
    let notices = Box::new(|n: &crate::api::Notice| eprintln!("{}", super::hints::notice(n)));
    let mut builder = Engine::builder(&a.model)
        .options(a.flash.run_options())
        .notices(notices)
        .context(a.ctx)
        .sequences(a.parallel);
    let why = " (its drafts join the batch's pass; a self or model draft would run a pass of \
               its own per sequence)";
    if let Some(d) = a.draft.ngram_only("the server", why) {
        builder = builder.ngram_drafts(d);
    }
    let engine = builder.build()?;
    let opts = ServeOptions {
        addr: SocketAddr::new(a.host, a.port),
        parallel: a.parallel,
        context: a.ctx,
        queue: a.queue,
        api_key: a.api_key.clone(),
        body_limit: a.max_body as usize,
    };
    let id = crate::serve::model_id(&engine);
    serve(engine, &opts, |addr| {
        eprintln!(
            "serving {id} on http://{addr}/v1 ({} sequences of {} positions; Ctrl-C stops)",
            opts.parallel,
            opts.context / opts.parallel
        )
    })
}
