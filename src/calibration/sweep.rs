//! The sweep `llmflash calibrate` runs once the activations are recorded: fit a calibration
//! per sparsity level, measure each against dense on held-out text, and choose the one to
//! store. The command line only prints the [`Event`]s and the [`Choice`].

use std::time::{Duration, Instant};

use super::fit::{fit_level, mean_accuracy, LevelOptions};
use super::measure::{evaluate, EvaluateError};
use super::record::Records;
use crate::engine::flash::Selection;
use crate::engine::model::Model;
use crate::sparsity::predictor::Accuracy;
use crate::sparsity::{Calibration, CalibrationError, QualityRow, Sparsity};

/// What to fit and how to choose.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// Sparsities fitted (and measured, with an [`Evaluation`]): the quality table's rows.
    pub levels: Vec<f64>,
    /// The sparsity to store, fitted too when it is not among `levels`; `None` chooses (see
    /// [`Choice`]).
    pub sparsity: Option<f64>,
    pub level: LevelOptions,
    /// Largest perplexity increase over dense the chosen level may cost (0.05: 5%).
    pub max_increase: f64,
    /// The calibration text's sources, recorded in the stored metadata.
    pub sources: Vec<String>,
}

/// Held-out text the quality table is measured on (disjoint from the calibration text).
#[derive(Clone, Copy, Debug)]
pub struct Evaluation<'t> {
    pub tokens: &'t [u32],
    /// Where the text came from, recorded with how it was measured.
    pub source: &'t str,
    /// Perplexity window, and windows scored (all when `None`).
    pub ctx: usize,
    pub chunks: Option<usize>,
    pub bos: Option<u32>,
}

/// Progress of a sweep, in the order it happens.
#[derive(Clone, Debug)]
pub enum Event {
    /// The dense model's perplexity, measured once before the levels.
    Dense { ppl: f64, elapsed: Duration },
    /// A level fitted, with its mean held-out accuracy over layers.
    Fitted {
        sparsity: f64,
        accuracy: Accuracy,
        elapsed: Duration,
    },
    /// A level's perplexities with its true and its predicted active sets.
    Measured {
        sparsity: f64,
        oracle_ppl: f64,
        predictor_ppl: f64,
    },
}

/// Why the stored level was chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Choice {
    /// It was asked for.
    Asked,
    /// The sparsest level whose predictor perplexity is within the allowed increase.
    WithinIncrease,
    /// No held-out text: the middle level, unchecked.
    Unmeasured,
    /// No level is within the allowed increase: the least sparse one.
    NoneWithin,
}

/// The calibration to store (with its quality table) and why it was chosen.
pub struct Swept {
    pub calibration: Calibration,
    pub choice: Choice,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("calibration runs on a flash image; convert the model first: llmflash convert MODEL -o MODEL.flash")]
    NotAnImage,
    #[error("no sparsity level to fit: give at least one")]
    NoLevels,
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Evaluate(#[from] EvaluateError),
}

/// Fits every level of `opts` from `records` (recorded from `model`, a flash image), measures
/// each on `eval` when given, and returns the chosen calibration with the quality table and
/// how it was measured in its metadata. `on_event` sees each step as it finishes.
pub fn sweep(
    model: &Model,
    records: &Records,
    eval: Option<&Evaluation>,
    opts: &SweepOptions,
    mut on_event: impl FnMut(&Event),
) -> Result<Swept, SweepError> {
    let image = model.image.as_ref().ok_or(SweepError::NotAnImage)?;
    let levels = levels(opts);
    if levels.is_empty() {
        return Err(SweepError::NoLevels);
    }
    let perplexity = |cal: Option<&Calibration>, sel: Selection, e: &Evaluation| {
        let cal = cal.map(|c| c as &dyn Sparsity);
        evaluate(model, cal, sel, e.tokens, e.ctx, e.chunks, e.bos).map(|p| p.ppl)
    };
    let dense = match eval {
        Some(e) => {
            let t = Instant::now();
            let ppl = perplexity(None, Selection::All, e)?;
            on_event(&Event::Dense {
                ppl,
                elapsed: t.elapsed(),
            });
            Some(ppl)
        }
        None => None,
    };
    let mut quality = Vec::new();
    let mut fitted = Vec::new();
    for &s in &levels {
        let t = Instant::now();
        let cal = fit_level(image, records, s, &opts.level, opts.sources.clone())?;
        let acc = mean_accuracy(&cal);
        on_event(&Event::Fitted {
            sparsity: s,
            accuracy: acc,
            elapsed: t.elapsed(),
        });
        if let (Some(dense_ppl), Some(e)) = (dense, eval) {
            let oracle_ppl = perplexity(Some(&cal), Selection::Oracle, e)?;
            let predictor_ppl = perplexity(Some(&cal), Selection::Predictor, e)?;
            on_event(&Event::Measured {
                sparsity: s,
                oracle_ppl,
                predictor_ppl,
            });
            quality.push(QualityRow {
                sparsity: s,
                dense_ppl,
                oracle_ppl,
                predictor_ppl,
                predicted_density: acc.predicted_density,
                recall: acc.recall,
                precision: acc.precision,
            });
        }
        fitted.push(cal);
    }
    let (chosen, choice) = choose(opts, &levels, &quality);
    let mut calibration = fitted.swap_remove(chosen);
    calibration.meta.quality = quality;
    calibration.meta.evaluation = eval.map(|e| {
        let chunks = e.chunks.map_or("all".into(), |c| c.to_string());
        format!("{} ctx {} chunks {chunks}", e.source, e.ctx)
    });
    Ok(Swept {
        calibration,
        choice,
    })
}

/// The levels to fit: `opts.levels`, and the asked sparsity after them when it is not one.
fn levels(opts: &SweepOptions) -> Vec<f64> {
    let mut levels = opts.levels.clone();
    if let Some(s) = opts.sparsity {
        if !levels.iter().any(|&l| same(l, s)) {
            levels.push(s);
        }
    }
    levels
}

/// Sparsities are compared as parsed numbers, so 0.5 and 0.50 are one level.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The index (into `levels`, not empty) of the level to store: the one asked for, else the
/// sparsest whose predictor perplexity is within `max_increase` of dense, else (no quality
/// table) the middle level, else the least sparse.
fn choose(opts: &SweepOptions, levels: &[f64], quality: &[QualityRow]) -> (usize, Choice) {
    if let Some(i) = opts
        .sparsity
        .and_then(|s| levels.iter().position(|&l| same(l, s)))
    {
        return (i, Choice::Asked);
    }
    if quality.is_empty() {
        return (levels.len() / 2, Choice::Unmeasured);
    }
    let within = quality
        .iter()
        .enumerate()
        .filter(|(_, q)| q.predictor_ppl <= q.dense_ppl * (1.0 + opts.max_increase))
        .max_by(|a, b| a.1.sparsity.total_cmp(&b.1.sparsity));
    if let Some((i, _)) = within {
        return (i, Choice::WithinIncrease);
    }
    let least = quality
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.sparsity.total_cmp(&b.1.sparsity))
        .map_or(0, |(i, _)| i);
    (least, Choice::NoneWithin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(sparsity: Option<f64>) -> SweepOptions {
        SweepOptions {
            levels: vec![0.3, 0.5, 0.7],
            sparsity,
            level: LevelOptions::default(),
            max_increase: 0.05,
            sources: Vec::new(),
        }
    }

    fn row(sparsity: f64, predictor_ppl: f64) -> QualityRow {
        QualityRow {
            sparsity,
            dense_ppl: 10.0,
            oracle_ppl: predictor_ppl,
            predictor_ppl,
            predicted_density: 0.0,
            recall: 0.0,
            precision: 0.0,
        }
    }

    #[test]
    fn an_asked_sparsity_is_fitted_once_and_chosen() {
        assert_eq!(levels(&opts(Some(0.5))), vec![0.3, 0.5, 0.7]);
        assert_eq!(levels(&opts(Some(0.6))), vec![0.3, 0.5, 0.7, 0.6]);
        let o = opts(Some(0.6));
        assert_eq!(choose(&o, &levels(&o), &[]), (3, Choice::Asked));
    }

    #[test]
    fn the_sparsest_level_within_the_increase_is_chosen() {
        let o = opts(None);
        let l = levels(&o);
        assert_eq!(choose(&o, &l, &[]), (1, Choice::Unmeasured));
        let q = [row(0.3, 10.1), row(0.5, 10.4), row(0.7, 11.0)];
        assert_eq!(choose(&o, &l, &q), (1, Choice::WithinIncrease));
        let q = [row(0.3, 12.0), row(0.5, 13.0), row(0.7, 14.0)];
        assert_eq!(choose(&o, &l, &q), (0, Choice::NoneWithin));
    }
}
