//! `llmflash inspect`: what a model file holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::weights::ModelWeights;
use crate::quant::DType;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or an HF directory.
    model: PathBuf,
    /// Also list every weight tensor.
    #[arg(long)]
    tensors: bool,
    /// For a flash image: also check every FFN section's checksum (reads the whole file).
    #[arg(long)]
    verify: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if crate::image::is_flash_image(&a.model) {
        let image = crate::image::FlashImage::open(&a.model)?;
        if a.verify {
            image.verify_ffn()?;
            println!("FFN sections: checksums OK");
        }
        let summary = image.summary();
        print!("{summary}");
        if !summary.ends_with('\n') {
            println!();
        }
        let bundles = image.bundle().parts.iter().map(|p| p.dtype);
        let weights = image.weights()?;
        print_backends(&weights.config, matrix_dtypes(&weights).chain(bundles));
        return Ok(());
    }
    let m = super::open_model(&a.model)?;
    let w = &m.weights;
    println!("file:    {} ({})", m.path.display(), m.format);
    println!("architecture: {}", w.config.arch);
    println!("config:  {}", serde_json::to_string_pretty(&w.config)?);
    if let Some(t) = &m.tokenizer {
        println!(
            "tokenizer: {} tokens, bos {:?}, eos {:?}, add_bos {}",
            t.vocab_size(),
            t.bos(),
            t.eos(),
            t.add_bos()
        );
    }
    println!(
        "chat template: {}",
        if m.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    let mut total = 0usize;
    let mut show = |t: &crate::model::tensor::Tensor| {
        total += t.bytes().len();
        if a.tensors {
            println!(
                "  {:<40} {:>5} {:>6} x {:<6} {:>10} bytes",
                t.name,
                t.dtype.name(),
                t.rows,
                t.cols,
                t.bytes().len()
            );
        }
    };
    show(&w.embed);
    for l in &w.layers {
        for lin in [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o] {
            show(&lin.weight);
        }
        if let Some(f) = &l.ffn {
            for t in [Some(&f.up), Some(&f.down), f.gate.as_ref()]
                .into_iter()
                .flatten()
            {
                show(t);
            }
        }
    }
    if !w.config.tied_embeddings {
        show(&w.lm_head);
    }
    println!("matrices: {:.1} MiB", total as f64 / (1 << 20) as f64);
    print_backends(&w.config, matrix_dtypes(w));
    Ok(())
}

/// The dtype of every weight matrix (the tensors the backends' matvec kernels must read).
fn matrix_dtypes(w: &ModelWeights) -> impl Iterator<Item = DType> + '_ {
    let layers = w.layers.iter().flat_map(|l| {
        let attn = [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o].map(|lin| lin.weight.dtype);
        let ffn = l.ffn.iter().flat_map(|f| {
            [Some(&f.up), Some(&f.down), f.gate.as_ref()]
                .into_iter()
                .flatten()
                .map(|t| t.dtype)
        });
        attn.into_iter().chain(ffn)
    });
    [w.embed.dtype, w.lm_head.dtype].into_iter().chain(layers)
}

/// The matrices' types, and up front which backend runs the file: the CPU reads every type
/// a file can load with; the GPU kernels read fewer, and a file with any other is refused
/// when it is loaded, never at token 40.
fn print_backends(c: &crate::model::config::Config, dtypes: impl Iterator<Item = DType>) {
    let mut counts: BTreeMap<&'static str, (usize, bool)> = BTreeMap::new();
    for d in dtypes {
        let gpu = crate::backend::gpu::kernels::dtype_code(d).is_some();
        counts.entry(d.name()).or_insert((0, gpu)).0 += 1;
    }
    let types: Vec<String> = counts
        .iter()
        .map(|(n, (c, _))| format!("{c} x {n}"))
        .collect();
    println!("matrix types: {}", types.join(", "));
    let missing: Vec<&str> = (counts.iter())
        .filter(|(_, (_, gpu))| !gpu)
        .map(|(n, _)| *n)
        .collect();
    use crate::model::config::Arch;
    if c.arch == Arch::Gemma3 {
        println!(
            "backends: cpu (the GPU backend does not run {}: --backend gpu refuses it)",
            c.arch
        );
    } else if missing.is_empty() {
        println!("backends: cpu, gpu");
    } else {
        println!(
            "backends: cpu (the GPU kernels do not read {}: --backend gpu refuses this file)",
            missing.join(", ")
        );
    }
}
