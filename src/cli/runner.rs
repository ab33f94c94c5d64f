//! Opening a model for the run commands and building sessions under a memory budget.

use std::path::Path;

use anyhow::{bail, Context};

use crate::budget::{self, Needs};
use crate::cli::flash_args::FlashArgs;
use crate::engine::flash::{Selection, Sparsity, Strategy};
use crate::engine::model::Model;
use crate::engine::Session;
use crate::sparsity::synthetic::SyntheticActivity;
use crate::sparsity::Calibration;

pub struct Runner {
    pub model: Model,
    /// The image's calibration (thresholds, predictors), when it has one.
    pub calibration: Option<Calibration>,
    /// Random active sets instead of a predictor (`--synthetic-activity`).
    synthetic: Option<SyntheticActivity>,
}

impl Runner {
    /// Opens `path`; a flash image's resident tensors are read into memory (direct reads
    /// unless `args.no_direct`), except for the `mmap` strategy, which maps everything.
    pub fn open(path: &Path, args: &FlashArgs) -> anyhow::Result<Runner> {
        let load = (args.strategy != Strategy::Mmap).then_some(!args.no_direct);
        let model =
            Model::open_with(path, load).with_context(|| format!("loading {}", path.display()))?;
        let calibration = match &model.image {
            Some(image) => Calibration::load(image)
                .with_context(|| format!("reading the calibration of {}", path.display()))?,
            None => None,
        };
        let c = &model.weights.config;
        let synthetic = args.synthetic_activity.map(|density| {
            SyntheticActivity::new(
                c.n_layers,
                c.intermediate_size,
                density,
                args.synthetic_churn,
                0x5eed,
            )
        });
        Ok(Runner {
            model,
            calibration,
            synthetic,
        })
    }

    fn sparsity(&self) -> Option<&dyn Sparsity> {
        match (&self.synthetic, &self.calibration) {
            (Some(s), _) => Some(s),
            (None, Some(c)) => Some(c),
            (None, None) => None,
        }
    }

    /// A session over `ctx` positions; for a flash image, with `args`' strategy and budget.
    pub fn session(&self, ctx: usize, args: &FlashArgs) -> anyhow::Result<Session<'_>> {
        let Some(image) = &self.model.image else {
            if args.memory_budget.is_some() {
                bail!(
                    "--memory-budget needs a flash image; convert the model first: \
                     llmflash convert {} -o MODEL.flash",
                    self.model.path.display()
                );
            }
            return Ok(self.model.session(ctx, None, None)?);
        };
        let sparsity = self.sparsity();
        let selection = args.selection(sparsity.is_some());
        if selection == Selection::All && !args.dense {
            log::warn!(
                "{} is not calibrated: computing every FFN neuron (run `llmflash calibrate`)",
                self.model.path.display()
            );
        }
        let mut opts = args.options(selection);
        if let Some(budget) = args.memory_budget {
            let c = &self.model.weights.config;
            let n = c.intermediate_size;
            let needs = Needs {
                resident: image.meta.resident_bytes(),
                // Loaded with the calibration, used or not.
                predictors: self.calibration.as_ref().map_or(0, |c| c.predictor_bytes()),
                kv_cache: (c.n_layers * ctx.min(c.max_positions) * c.kv_dim() * 2 * 4) as u64,
                scratch: (c.vocab_size * 4 + 8 * c.hidden_size * 4 + 4 * n * 4) as u64,
                stride: image.bundle().stride as u64,
                neurons: vec![n; c.n_layers],
                active: match (selection, &self.synthetic, &self.calibration) {
                    (Selection::All, _, _) => vec![n as f64; c.n_layers],
                    (_, Some(_), _) => {
                        let density = args.synthetic_activity.unwrap_or(1.0);
                        vec![density * n as f64; c.n_layers]
                    }
                    (_, None, Some(cal)) => cal.expected_active(),
                    (_, None, None) => vec![n as f64; c.n_layers],
                },
            };
            let plan = budget::plan(budget, &needs)?;
            log::info!("memory plan: {plan:?}");
            opts.window_slots = Some(plan.window_slots);
        }
        Ok(self.model.session(ctx, Some(opts), sparsity)?)
    }
}
