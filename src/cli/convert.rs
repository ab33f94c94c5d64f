//! `llmflash convert`: write a flash image from a GGUF file or an HF directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::image::{convert, BundleDtype, ConvertOptions, FlashImage};

#[derive(clap::Args)]
pub struct Args {
    /// Source model: a GGUF file or an HF directory.
    model: PathBuf,
    /// Output image.
    #[arg(short, long)]
    output: PathBuf,
    /// Dtype of the FFN bundles: `source` keeps the model's own gate/up blocks and stores
    /// down columns as q8_0; `f16` or `q8_0` convert every part.
    #[arg(long, default_value = "source")]
    bundle_dtype: BundleDtype,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let t = Instant::now();
    let model = super::open_model(&a.model)?;
    let opts = ConvertOptions {
        bundle_dtype: a.bundle_dtype,
        progress: true,
    };
    convert(&model, &a.output, &opts)
        .with_context(|| format!("converting {} to {}", a.model.display(), a.output.display()))?;
    let image = FlashImage::open(&a.output).context("re-opening the new image")?;
    image
        .verify_ffn()
        .context("checking the new image's FFN sections")?;
    eprintln!(
        "wrote {} in {:.1} s",
        a.output.display(),
        t.elapsed().as_secs_f64()
    );
    print!("{}", image.summary());
    Ok(())
}
