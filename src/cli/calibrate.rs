//! `llmflash calibrate`: record the dense model's FFN activity over calibration text, set
//! per-layer thresholds, fit the low-rank predictors, measure perplexity dense vs oracle vs
//! predictor, and store the chosen calibration in the image.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::calibration::fit::LevelOptions;
use crate::calibration::measure::sample_text;
use crate::calibration::record::record;
use crate::calibration::sweep::{sweep, Choice, Evaluation, Event, SweepOptions};
use crate::engine::model::Model;
use crate::sparsity::predictor::{FitOptions, Form};
use crate::sparsity::Calibration;

#[derive(clap::Args)]
pub struct Args {
    /// The flash image to calibrate (written by `llmflash convert`).
    image: PathBuf,
    /// CPU arithmetic of activations against quantised weights while recording and measuring:
    /// q8 (llama.cpp's) or f32 (the GPU backend's).
    #[arg(long, value_enum, default_value_t = crate::quant::Activations::Q8)]
    activations: crate::quant::Activations,
    /// Calibration text files (e.g. `tools/fetch-calibration-text` writes data/sotu-calib.txt).
    /// Without any, the model writes its own: --tokens tokens sampled from it unprompted
    /// (docs/calibration.md compares the two).
    #[arg(long, num_args = 1..)]
    text: Vec<PathBuf>,
    /// Sparsity to store. Default: the highest of --levels whose predictor perplexity stays
    /// within --max-increase of dense.
    #[arg(long, value_parser = super::values::sparsity)]
    sparsity: Option<f64>,
    /// Sparsities measured for the quality table.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7", value_parser = super::values::sparsity)]
    levels: Vec<f64>,
    /// Rank of each layer's predictor.
    #[arg(long, default_value_t = 64, value_parser = super::values::rank)]
    rank: usize,
    /// Recall the predictors' decision thresholds aim for on held-out tokens.
    #[arg(long, default_value_t = 0.99, value_parser = super::values::recall)]
    recall: f64,
    /// Predictor form: `mlp` (a ReLU between the two low-rank factors: it misses fewer large
    /// SwiGLU contributions; the default for SwiGLU models), `linear` (the paper's, fitted by
    /// class-balanced BCE; the default for ReLU models) or `product` (low-rank gate and up
    /// estimates, scored by |silu(g) u|; SwiGLU only).
    #[arg(long)]
    predictor: Option<String>,
    /// Fit the BCE with plain class balance instead of weighting positives by magnitude.
    #[arg(long)]
    unweighted: bool,
    /// Training epochs of each predictor.
    #[arg(long, default_value_t = 8, value_parser = super::values::epochs)]
    epochs: usize,
    /// Calibration tokens to record (the last 15% are held out for recall/precision).
    #[arg(long, default_value_t = 4096, value_parser = super::values::calibration_tokens)]
    tokens: usize,
    /// Positions per recorded segment.
    #[arg(long, default_value_t = 256, value_parser = super::values::context)]
    ctx: usize,
    /// Held-out text for the quality table (disjoint from the calibration text).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Perplexity window of the quality table.
    #[arg(long, default_value_t = 512, value_parser = super::values::context)]
    eval_ctx: usize,
    /// Windows scored per perplexity (all when omitted).
    #[arg(long, value_parser = super::values::chunks)]
    eval_chunks: Option<usize>,
    /// Largest perplexity increase over dense the default sparsity may cost.
    #[arg(long, default_value_t = 0.05, value_parser = super::values::increase)]
    max_increase: f64,
    /// Keep the neurons in model order on disk instead of storing them hottest first (see
    /// `llmflash reorder`).
    #[arg(long)]
    no_reorder: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // The texts first: a bad file is refused before the model loads.
    let texts: Vec<String> = a
        .text
        .iter()
        .map(|f| super::read_text(f))
        .collect::<Result<_, _>>()?;
    let eval_text = a.eval.as_deref().map(super::read_text).transpose()?;
    let mut model =
        Model::open(&a.image).with_context(|| format!("loading {}", a.image.display()))?;
    model.weights.activations = a.activations;
    if model.image.is_none() {
        bail!(
            "{} is not a flash image; convert it first: llmflash convert {} -o MODEL.flash",
            a.image.display(),
            a.image.display()
        );
    }
    let Some(tok) = model.tokenizer.as_ref() else {
        bail!(
            "{} has no tokenizer; calibration needs one",
            a.image.display()
        );
    };
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let mut tokens = Vec::new();
    for text in &texts {
        tokens.extend(tok.encode(text, false, false));
    }
    if texts.is_empty() {
        let t = Instant::now();
        eprintln!(
            "no --text: sampling {} tokens of calibration text from the model",
            a.tokens
        );
        tokens = sample_text(&model, a.tokens, a.ctx, 0x5eed)
            .context("sampling calibration text from the model")?;
        eprintln!("sampled in {:.1} s", t.elapsed().as_secs_f64());
    }
    if tokens.len() < 2 * a.ctx.min(a.tokens) {
        bail!(
            "the calibration text has {} tokens; give at least {} (more text, or a smaller --tokens/--ctx)",
            tokens.len(),
            2 * a.ctx.min(a.tokens)
        );
    }

    let t = Instant::now();
    let total = tokens.len().min(a.tokens);
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("recording {bar:40} {pos}/{len} tokens {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let records = record(&model, &tokens, a.ctx, bos, a.tokens, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    eprintln!(
        "recorded {} tokens x {} layers in {:.1} s",
        records.tokens(),
        records.layers.len(),
        t.elapsed().as_secs_f64()
    );

    let level = LevelOptions {
        fit: FitOptions {
            rank: a.rank,
            epochs: a.epochs,
            magnitude_weighted: !a.unweighted,
            ..FitOptions::default()
        },
        recall: a.recall,
        form: match a.predictor.as_deref() {
            None => None,
            Some("linear") => Some(Form::Linear),
            Some("product") => Some(Form::Product),
            Some("mlp") => Some(Form::Mlp),
            Some(other) => bail!("unknown --predictor `{other}`: choose mlp, linear or product"),
        },
        ..LevelOptions::default()
    };
    let opts = SweepOptions {
        levels: a.levels.clone(),
        sparsity: a.sparsity,
        level,
        max_increase: a.max_increase,
        sources: a.text.iter().map(|p| p.display().to_string()).collect(),
    };
    let eval_tokens = eval_text.map(|text| tok.encode(&text, true, false));
    let eval_source = a.eval.as_ref().map(|f| f.display().to_string());
    let eval = eval_tokens.as_deref().zip(eval_source.as_deref());
    let eval = eval.map(|(tokens, source)| Evaluation {
        tokens,
        source,
        ctx: a.eval_ctx,
        chunks: a.eval_chunks,
        bos,
    });
    let swept = sweep(&model, &records, eval.as_ref(), &opts, print_event)?;
    let cal = swept.calibration;
    print_choice(swept.choice, &cal, a.max_increase);
    drop(model);
    cal.save(&a.image)
        .with_context(|| format!("writing the calibration into {}", a.image.display()))?;
    print_report(&cal);
    if !a.no_reorder {
        super::reorder::reorder(&a.image)?;
    }
    Ok(())
}

fn print_event(e: &Event) {
    match e {
        Event::Dense { ppl, elapsed } => {
            eprintln!(
                "dense perplexity {ppl:.4} ({:.1} s)",
                elapsed.as_secs_f64()
            )
        }
        Event::Fitted {
            sparsity,
            accuracy: acc,
            elapsed,
        } => eprintln!(
            "sparsity {sparsity:.2}: fitted in {:.1} s; held-out recall {:.3}, precision {:.3}, predicted {:.1}% of neurons (true {:.1}%)",
            elapsed.as_secs_f64(),
            acc.recall,
            acc.precision,
            100.0 * acc.predicted_density,
            100.0 * acc.true_density
        ),
        Event::Measured {
            oracle_ppl,
            predictor_ppl,
            ..
        } => eprintln!("  perplexity: oracle {oracle_ppl:.4}, predictor {predictor_ppl:.4}"),
    }
}

/// Says why the stored level was chosen when it was not asked for or not checked.
fn print_choice(choice: Choice, cal: &Calibration, max_increase: f64) {
    let s = cal.meta.sparsity;
    match choice {
        Choice::Asked | Choice::WithinIncrease => {}
        Choice::Unmeasured => {
            eprintln!("no --eval text: storing sparsity {s} without a quality check")
        }
        Choice::NoneWithin => eprintln!(
            "warning: no level keeps the predictor within +{:.0}% of dense; storing the least sparse ({s})",
            100.0 * max_increase
        ),
    }
}

fn print_report(cal: &Calibration) {
    let m = &cal.meta;
    println!(
        "calibration: sparsity {:.2}, {:?} predictor of rank {}, recall target {:.2}, {} tokens ({} held out), predictors {:.1} MiB",
        m.sparsity,
        m.form,
        m.rank,
        m.recall_target,
        m.tokens,
        m.held_out_tokens,
        cal.predictor_bytes() as f64 / (1 << 20) as f64
    );
    if !m.quality.is_empty() {
        println!(
            "\nquality ({}):",
            m.evaluation.as_deref().unwrap_or("held-out text")
        );
        println!("sparsity  dense ppl  oracle ppl  predictor ppl  vs dense  predicted  recall  precision");
        for q in &m.quality {
            println!(
                "{:>8.2}  {:>9.4}  {:>10.4}  {:>13.4}  {:>+7.2}%  {:>8.1}%  {:>6.3}  {:>9.3}",
                q.sparsity,
                q.dense_ppl,
                q.oracle_ppl,
                q.predictor_ppl,
                100.0 * (q.predictor_ppl / q.dense_ppl - 1.0),
                100.0 * q.predicted_density,
                q.recall,
                q.precision
            );
        }
    }
    println!("\nlayer  threshold  recall  precision  predicted  true");
    for (l, lm) in m.layers.iter().enumerate() {
        let a = &lm.accuracy;
        println!(
            "{l:>5}  {:>9.4}  {:>6.3}  {:>9.3}  {:>8.1}%  {:>4.1}%",
            lm.threshold,
            a.recall,
            a.precision,
            100.0 * a.predicted_density,
            100.0 * a.true_density
        );
    }
}
