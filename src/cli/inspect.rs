//! `llmflash inspect`: what a model file holds.

use std::path::PathBuf;

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
        print!("{}", image.summary());
        return Ok(());
    }
    let m = super::open_model(&a.model)?;
    let w = &m.weights;
    println!("file:    {} ({})", m.path.display(), m.format);
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
    Ok(())
}
