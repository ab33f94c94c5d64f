//! `llmflash convert`: write a flash image from a GGUF file or an HF directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::image::{
    convert, write_synthetic, BundleDtype, ConvertOptions, FlashImage, SyntheticShape,
};
use crate::storage::check_output;

#[derive(clap::Args)]
pub struct Args {
    /// Source model: a GGUF file or an HF directory.
    #[arg(required_unless_present = "synthetic")]
    model: Option<PathBuf>,
    /// Output image.
    #[arg(short, long)]
    output: PathBuf,
    /// Dtype of the FFN bundles: `source` keeps the model's own gate/up blocks and stores
    /// down columns as q8_0; `f16` or `q8_0` convert every part.
    #[arg(long, default_value = "source")]
    bundle_dtype: BundleDtype,
    /// Write a random-weight model of a known shape instead (`llama7b`: Llama-2-7B's layout,
    /// about 7 GB; `tiny`), for I/O benchmarks at scale. It has no tokenizer and no meaning.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let t = Instant::now();
    // Refused before the model loads: a special file or the source itself as the output.
    let inputs: Vec<&std::path::Path> = a.model.as_deref().into_iter().collect();
    check_output(&a.output, &inputs)?;
    let Some(source) = &a.model else {
        let shape = match a.synthetic.as_deref() {
            Some("llama7b") => SyntheticShape::llama7b(),
            Some("tiny") => SyntheticShape::tiny(),
            other => bail!("unknown --synthetic shape {other:?}: choose llama7b or tiny"),
        };
        let dtype = match a.bundle_dtype {
            BundleDtype::Source => BundleDtype::Q8_0,
            d => d,
        };
        write_synthetic(&a.output, shape, dtype)
            .with_context(|| format!("writing {}", a.output.display()))?;
        return finish(&a, t);
    };
    let model = super::open_model(source)?;
    let opts = ConvertOptions {
        bundle_dtype: a.bundle_dtype,
        progress: true,
    };
    convert(&model, &a.output, &opts)
        .with_context(|| format!("converting {} to {}", source.display(), a.output.display()))?;
    finish(&a, t)
}

/// Re-opens and checks the new image, and describes it.
fn finish(a: &Args, t: Instant) -> anyhow::Result<()> {
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
