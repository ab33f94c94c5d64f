//! `llmflash reorder`: store each layer's neurons hottest first, so that under a memory
//! budget the neurons left on flash sit together and are read in few large requests.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::image::{reorder_neurons, FlashImage};
use crate::sparsity::{Calibration, Sets};

#[derive(clap::Args)]
pub struct Args {
    /// A calibrated flash image (`llmflash calibrate` reorders by default; this is for images
    /// calibrated with --no-reorder, or before this step existed).
    image: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    reorder(&a.image)
}

/// Reorders `path` by its calibration's predicted neuron frequencies (a no-op when the image
/// is already in that order).
pub fn reorder(path: &Path) -> anyhow::Result<()> {
    let image = FlashImage::open(path).with_context(|| format!("opening {}", path.display()))?;
    let Some(cal) = Calibration::load(&image)? else {
        bail!(
            "{} is not calibrated: the neuron order comes from the calibration's frequencies; \
             run `llmflash calibrate {} --text FILE` first",
            path.display(),
            path.display()
        );
    };
    let orders: Vec<Vec<u32>> = (0..image.meta.ffn.len())
        .map(|l| cal.hot_order(Sets::Predicted, l))
        .collect();
    let unchanged = orders.iter().enumerate().all(|(l, order)| {
        let perm = image.ffn_section(l).permutation.as_deref();
        perm.map_or_else(
            || order.iter().enumerate().all(|(j, &n)| j == n as usize),
            |p| p == &order[..],
        )
    });
    drop(image);
    if unchanged {
        eprintln!("{}: neurons already stored hottest first", path.display());
        return Ok(());
    }
    let bar = ProgressBar::new(orders.len() as u64).with_style(
        ProgressStyle::with_template("reordering {bar:40} layer {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    reorder_neurons(path, &orders, |_| bar.inc(1))
        .with_context(|| format!("reordering the neurons of {}", path.display()))?;
    bar.finish_and_clear();
    eprintln!("{}: neurons stored hottest first", path.display());
    Ok(())
}
