//! `llmflash bench`: the paper's latency table (Table 2): per strategy and memory budget, bytes
//! read per token, read throughput, I/O, memory-management and compute time per token,
//! tokens/s and peak memory; medians over several runs, with ratios against `naive` measured
//! in the same run.
//!
//! Each run is a separate `llmflash generate --json` process, so that peak RSS belongs to one
//! strategy alone; with `--drop-caches` (root) the page cache is emptied before each run, so
//! that `mmap` pays for its reads as it would on a cold start.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::budget::{parse_bytes, Bytes};
use crate::engine::flash::Strategy;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a flash image (every strategy), or a GGUF/HF model (`resident` only).
    #[arg(short, long, required_unless_present = "probe_disk")]
    model: Option<PathBuf>,
    /// Instead of decoding, measure this disk's random direct-read throughput against read
    /// size and concurrency, in the given directory (it writes a 1 GiB probe file there and
    /// removes it afterwards).
    #[arg(long, value_name = "PATH")]
    probe_disk: Option<PathBuf>,
    /// Where --probe-disk saves the curve (JSON).
    #[arg(long, default_value = "disk-curve.json")]
    curve: PathBuf,
    /// Strategies to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "naive,mmap,resident,flash"
    )]
    strategies: Vec<Strategy>,
    /// Memory budgets for the flash strategy (comma-separated, e.g. 100MiB,52MiB); the
    /// baselines run without a window.
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes)]
    memory_budget: Vec<u64>,
    /// Backends to measure (comma-separated): cpu, gpu. On a flash image the GPU runs the flash
    /// strategy only (with each --vram-budget); on a GGUF/HF model, the dense decoder.
    #[arg(long, value_delimiter = ',', default_value = "cpu", value_parser = ["cpu", "gpu"])]
    backend: Vec<String>,
    /// With the gpu backend: the adapter whose name contains this.
    #[arg(long)]
    gpu_adapter: Option<String>,
    /// With the gpu backend: how shaders read f16 values (auto, native or packed; see
    /// `generate --help`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "packed"])]
    gpu_f16: String,
    /// VRAM budgets for the gpu backend on a flash image (comma-separated); none: every
    /// neuron gets a GPU window slot.
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes)]
    vram_budget: Vec<u64>,
    /// Tokens to generate per run.
    #[arg(short, long, default_value_t = 32, value_parser = super::values::tokens)]
    n: usize,
    /// Runs per configuration; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = super::values::runs)]
    runs: usize,
    /// Prompt of every run.
    #[arg(short, long, default_value = "The history of the printing press")]
    prompt: String,
    /// Empty the page cache before each run (needs root).
    #[arg(long)]
    drop_caches: bool,
    /// Draft sources to measure for speculative decoding (comma-separated: none, self, ngram,
    /// a model path); each configuration runs with each, and rows get their ratio to `none`.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    draft: Vec<String>,
    /// Extra flags passed to every `generate` run (e.g. "--dense" or "--unbundled").
    #[arg(long, allow_hyphen_values = true)]
    extra: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Medians of one configuration.
#[derive(Clone, Debug, Serialize)]
struct Row {
    backend: String,
    strategy: Strategy,
    /// For the flash strategy: which neurons ran (the planner may choose dense) and whether
    /// reads ran a layer ahead.
    selection: Option<String>,
    lookahead: bool,
    budget: Option<u64>,
    runs: usize,
    bytes_read_per_token: f64,
    read_mb_per_s: f64,
    io_ms: f64,
    mem_ms: f64,
    compute_ms: f64,
    total_ms: f64,
    tokens_per_s: f64,
    peak_rss_bytes: u64,
    speedup_vs_naive: Option<f64>,
    /// Bytes copied to the GPU per token (gpu backend).
    uploaded_bytes_per_token: f64,
    /// Time blocked on the GPU per token (gpu backend).
    gpu_wait_ms: f64,
    /// GPU execution time per token from timestamp queries (n/a where unsupported).
    gpu_ms: Option<f64>,
    /// The GPU adapter, and whether it is a CPU emulating a GPU (lavapipe).
    adapter: Option<String>,
    emulated: bool,
    /// How the GPU shaders read f16 values (native or packed).
    f16: Option<String>,
    /// Speculative decoding: the draft source, the share of drafted tokens accepted, tokens
    /// per pass of the full model, and tokens/s against the same configuration's `none` row.
    draft: String,
    acceptance: Option<f64>,
    tokens_per_pass: Option<f64>,
    vs_no_draft: Option<f64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(path) = &a.probe_disk {
        // Refused before the probe runs (it writes 1 GiB): a curve path that cannot be written.
        crate::storage::check_output(&a.curve, &[])
            .with_context(|| format!("checking the curve path {}", a.curve.display()))?;
        return probe_disk(path, &a.curve);
    }
    let model = a.model.clone().context("--model is required")?;
    let is_image = crate::image::is_flash_image(&model);
    if !is_image && a.strategies.iter().any(|s| *s != Strategy::Resident) {
        bail!(
            "{} is not a flash image: only --strategies resident applies. Convert it first: \
             llmflash convert {} -o MODEL.flash",
            model.display(),
            model.display()
        );
    }
    let mut rows = Vec::new();
    for backend in &a.backend {
        let gpu = backend == "gpu";
        for &strategy in &a.strategies {
            // The GPU runs the flash path on images and the dense decoder otherwise.
            let gpu_strategy = if is_image {
                Strategy::Flash
            } else {
                Strategy::Resident
            };
            if gpu && strategy != gpu_strategy {
                eprintln!("bench: gpu backend skips {strategy:?} (it runs {gpu_strategy:?} only)");
                continue;
            }
            let listed = if gpu {
                &a.vram_budget
            } else {
                &a.memory_budget
            };
            let budgets: Vec<Option<u64>> = if strategy == Strategy::Flash && !listed.is_empty() {
                listed.iter().map(|&b| Some(b)).collect()
            } else {
                vec![None]
            };
            for budget in budgets {
                let first = rows.len();
                // Run by run, each draft source in turn: a machine whose speed drifts then
                // moves every source's median alike, and the ratios stay fair.
                let mut samples = vec![Vec::new(); a.draft.len()];
                for run in 0..a.runs.max(1) {
                    for (draft, got) in a.draft.iter().zip(&mut samples) {
                        eprintln!(
                            "bench: {backend} {strategy:?}, budget {:?}, draft {draft}, run {}",
                            budget.map(Bytes),
                            run + 1
                        );
                        got.push(sample(&a, is_image, backend, strategy, budget, draft)?);
                    }
                }
                for (draft, got) in a.draft.iter().zip(&samples) {
                    rows.push(row(got, backend, strategy, budget, draft));
                }
                let plain = rows[first..].iter().find(|r| r.draft == "none");
                let plain = plain.map(|r| r.tokens_per_s);
                for r in &mut rows[first..] {
                    r.vs_no_draft = plain.filter(|&p| p > 0.0).map(|p| r.tokens_per_s / p);
                }
            }
        }
    }
    let naive = rows
        .iter()
        .find(|r| r.strategy == Strategy::Naive && r.backend == "cpu")
        .map(|r| r.tokens_per_s);
    for r in &mut rows {
        r.speedup_vs_naive = naive.map(|n| r.tokens_per_s / n);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
        if let Some(r) = rows.iter().find(|r| r.emulated) {
            println!(
                "\nnote: the gpu rows ran on `{}`, a CPU emulating a GPU (lavapipe): they measure the GPU code path, not a GPU's speed; do not compare them with the cpu rows as GPU numbers.",
                r.adapter.as_deref().unwrap_or("?")
            );
        }
        if let Some(r) = rows.iter().find(|r| r.backend == "gpu") {
            println!(
                "GPU adapter: {}, f16 {}.",
                r.adapter.as_deref().unwrap_or("?"),
                r.f16.as_deref().unwrap_or("?")
            );
            println!("GPU ms: the passes' execution time from timestamp queries (n/a where the adapter has none); GPU wait: the time the CPU blocked on the GPU.");
        }
    }
    Ok(())
}

/// One `llmflash generate --json` run of a configuration: its stats.
fn sample(
    a: &Args,
    is_image: bool,
    backend: &str,
    strategy: Strategy,
    budget: Option<u64>,
    draft: &str,
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("locating the llmflash binary")?;
    if a.drop_caches {
        drop_page_cache()?;
    }
    let mut cmd = Command::new(&exe);
    // This process runs inside the worker pool sized by --threads: pass the size on.
    cmd.args(["--threads", &rayon::current_num_threads().to_string()])
        .arg("generate")
        .arg("-m")
        .arg(a.model.as_deref().context("--model is required")?)
        .args([
            "-p",
            &a.prompt,
            "-n",
            &a.n.to_string(),
            "--json",
            "--greedy",
        ]);
    if is_image {
        cmd.args(["--strategy", &format!("{strategy:?}").to_lowercase()]);
    }
    cmd.args(["--backend", backend]);
    let budget_flag = if backend == "gpu" {
        if let Some(name) = &a.gpu_adapter {
            cmd.args(["--gpu-adapter", name]);
        }
        cmd.args(["--gpu-f16", &a.gpu_f16]);
        "--vram-budget"
    } else {
        "--memory-budget"
    };
    if let Some(b) = budget {
        cmd.args([budget_flag, &b.to_string()]);
    }
    if backend == "cpu" {
        cmd.args(["--draft", draft]);
    }
    if let Some(extra) = &a.extra {
        cmd.args(extra.split_whitespace());
    }
    let out = cmd.output().context("running llmflash generate")?;
    if !out.status.success() {
        bail!(
            "generate failed for {backend} {strategy:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("parsing the JSON printed by llmflash generate")?;
    Ok(json["stats"].clone())
}

/// The medians of one configuration's runs.
fn row(
    samples: &[serde_json::Value],
    backend: &str,
    strategy: Strategy,
    budget: Option<u64>,
    draft: &str,
) -> Row {
    // The median of a stats field, at the top level or in a section (`gpu`, `draft`).
    let median_of = |section: Option<&str>, key: &str| {
        let field = |s: &serde_json::Value| match section {
            Some(sec) => s[sec][key].as_f64(),
            None => s[key].as_f64(),
        };
        median(samples.iter().map(|s| field(s).unwrap_or(0.0)).collect())
    };
    let med = |key: &str| median_of(None, key);
    let draft_med = |key: &str| median_of(Some("draft"), key);
    let io_ms = med("io_ms_per_token");
    let bytes = med("bytes_read_per_token");
    let tokens_per_s = med("tokens_per_s");
    let gpu = |key: &str| median_of(Some("gpu"), key);
    let first_gpu = samples.first().map(|s| &s["gpu"]);
    let first = samples.first().cloned().unwrap_or_default();
    Row {
        backend: backend.to_string(),
        uploaded_bytes_per_token: gpu("bytes_uploaded_per_token"),
        gpu_wait_ms: gpu("gpu_wait_ms_per_token"),
        gpu_ms: samples
            .iter()
            .all(|s| s["gpu"]["gpu_time_ms_per_token"].is_f64())
            .then(|| gpu("gpu_time_ms_per_token"))
            .filter(|_| backend == "gpu"),
        adapter: first_gpu.and_then(|g| g["adapter"].as_str().map(String::from)),
        emulated: first_gpu.is_some_and(|g| g["emulated"].as_bool() == Some(true)),
        f16: first_gpu.and_then(|g| g["f16"].as_str().map(String::from)),
        strategy,
        selection: (first["flash"]["selection"].as_str())
            .filter(|s| !s.is_empty())
            .map(String::from),
        lookahead: first["flash"]["lookahead"].as_bool() == Some(true),
        budget,
        runs: samples.len(),
        bytes_read_per_token: bytes,
        read_mb_per_s: if io_ms > 0.0 {
            bytes / io_ms / 1e3
        } else {
            0.0
        },
        io_ms,
        mem_ms: med("mem_ms_per_token"),
        compute_ms: med("compute_ms_per_token"),
        total_ms: if tokens_per_s > 0.0 {
            1e3 / tokens_per_s
        } else {
            0.0
        },
        tokens_per_s,
        peak_rss_bytes: med("peak_rss_bytes") as u64,
        speedup_vs_naive: None,
        draft: draft.to_string(),
        acceptance: (draft != "none").then(|| draft_med("acceptance_rate")),
        tokens_per_pass: (draft != "none").then(|| draft_med("tokens_per_pass")),
        vs_no_draft: None,
    }
}

impl Row {
    /// `Flash (dense, lookahead)`: the strategy, and for flash which neurons ran.
    fn strategy_label(&self) -> String {
        match (&self.selection, self.strategy) {
            (Some(sel), Strategy::Flash) => {
                let ahead = if self.lookahead { ", lookahead" } else { "" };
                format!("{:?} ({sel}{ahead})", self.strategy)
            }
            _ => format!("{:?}", self.strategy),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn drop_page_cache() -> anyhow::Result<()> {
    // Sync first so that dirty pages can be dropped too.
    Command::new("sync").status().context("running sync")?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("writing /proc/sys/vm/drop_caches (--drop-caches needs root on Linux)")
}

fn print_table(rows: &[Row]) {
    println!(
        "| backend | strategy | budget | draft | accepted | tokens/pass | MB read/token | read MB/s | I/O ms | mem ms | compute ms | total ms | tokens/s | vs naive | vs no draft | peak RSS | MB uploaded/token | GPU wait ms | GPU ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let gpu = r.backend == "gpu";
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.backend,
            r.strategy_label(),
            r.budget.map_or("-".to_string(), |b| Bytes(b).to_string()),
            r.draft,
            r.acceptance.map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
            r.tokens_per_pass.map_or("-".into(), |v| format!("{v:.2}")),
            r.bytes_read_per_token / 1e6,
            r.read_mb_per_s,
            r.io_ms,
            r.mem_ms,
            r.compute_ms,
            r.total_ms,
            r.tokens_per_s,
            r.speedup_vs_naive
                .map_or("-".into(), |s| format!("{s:.2}x")),
            r.vs_no_draft.map_or("-".into(), |s| format!("{s:.2}x")),
            Bytes(r.peak_rss_bytes),
            if gpu { format!("{:.3}", r.uploaded_bytes_per_token / 1e6) } else { "-".into() },
            if gpu { format!("{:.2}", r.gpu_wait_ms) } else { "-".into() },
            r.gpu_ms.map_or(if gpu { "n/a".into() } else { "-".into() }, |m| format!("{m:.2}")),
        );
    }
}

/// `bench --probe-disk`: random direct reads of 4 KiB to 1 MiB at 1 to 16 in flight, over a
/// 1 GiB probe file written in the given directory, printed and saved for comparison with
/// `bench` runs.
fn probe_disk(path: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let chunks = [4096, 16384, 65536, 131072, 262144, 1 << 20];
    let concurrency = [1, 2, 4, 8, 16];
    // (Any other path is refused by the probe, before it writes anything.)
    if path.is_dir() {
        eprintln!(
            "probing {} ({} points, ~0.5 s each)",
            path.display(),
            chunks.len() * concurrency.len()
        );
    }
    let curve = crate::storage::probe(
        path,
        1 << 30,
        &chunks,
        &concurrency,
        std::time::Duration::from_millis(500),
    )
    .with_context(|| format!("probing {}", path.display()))?;
    println!(
        "random direct reads (MB/s){}",
        if curve.direct {
            ""
        } else {
            " -- page cache NOT bypassed"
        }
    );
    print!("{:>8}", "chunk");
    concurrency
        .iter()
        .for_each(|c| print!("  {:>7}", format!("x{c}")));
    println!();
    for &chunk in &chunks {
        print!("{:>8}", Bytes(chunk as u64).to_string());
        for &c in &concurrency {
            let p = curve
                .points
                .iter()
                .find(|p| p.chunk == chunk && p.concurrency == c);
            print!("  {:>7.0}", p.map_or(f64::NAN, |p| p.mb_per_s));
        }
        println!();
    }
    curve
        .save(out)
        .with_context(|| format!("saving the curve to {}", out.display()))?;
    eprintln!("saved {}", out.display());
    Ok(())
}
