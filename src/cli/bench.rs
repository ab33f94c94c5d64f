//! `llmflash bench`: decode speed, median over several runs.

use std::path::PathBuf;

use anyhow::bail;

use crate::engine::sampler::{Sampler, Sampling};
use crate::engine::{generate, Session};

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or an HF directory.
    #[arg(short, long)]
    model: PathBuf,
    /// Weight strategies to measure (only `resident` so far).
    #[arg(long, value_delimiter = ',', default_value = "resident")]
    strategies: Vec<String>,
    /// Tokens to generate per run.
    #[arg(short, long, default_value_t = 64)]
    n: usize,
    /// Runs per strategy; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    for s in &a.strategies {
        if s != "resident" {
            bail!("strategy `{s}` is not available yet; available: resident");
        }
    }
    let model = super::open_model(&a.model)?;
    let prompt = [model.tokenizer.as_ref().and_then(|t| t.bos()).unwrap_or(0)];
    let mut speeds = Vec::with_capacity(a.runs);
    let mut last = None;
    for _ in 0..a.runs.max(1) {
        let mut session = Session::new(&model.weights, a.n + 1);
        let mut sampler = Sampler::new(Sampling::Greedy);
        // Never stop early: the bench measures a fixed number of decode steps.
        let gen = generate(&mut session, &prompt, a.n, &mut sampler, |_| false, |_| {})?;
        speeds.push(gen.stats.tokens_per_s);
        last = Some(gen.stats);
    }
    speeds.sort_by(f64::total_cmp);
    let median = speeds[speeds.len() / 2];
    let stats = last.expect("at least one run");
    if a.json {
        let obj = serde_json::json!({
            "model": super::model_name(&a.model),
            "strategy": "resident",
            "tokens": a.n,
            "runs": speeds,
            "median_tokens_per_s": median,
            "peak_rss_bytes": stats.peak_rss_bytes,
        });
        println!("{obj}");
    } else {
        println!(
            "| model | strategy | tokens | runs | tokens/s (median) | ms/token | peak RSS MiB |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {} | resident | {} | {} | {:.1} | {:.2} | {:.0} |",
            super::model_name(&a.model),
            a.n,
            speeds.len(),
            median,
            1e3 / median,
            stats.peak_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
