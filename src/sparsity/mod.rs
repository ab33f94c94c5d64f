//! Calibrated activation sparsity: per-layer thresholds on each neuron's contribution,
//! per-neuron activation frequencies, and the low-rank predictors that guess the active set
//! before any FFN weight is read. `llmflash calibrate` computes them and stores them in the
//! flash image; the flash path loads them (resident) through [`Calibration::load`].
//!
//! A neuron is *active* for a token when its hidden activation `a_i` (`silu(g_i) * u_i` for
//! SwiGLU, `relu(u_i + b_i)` for ReLU models) reaches the layer's threshold in magnitude:
//! the product rule measures what the neuron actually adds to the output, which thresholding
//! `|silu(g_i)|` alone does not (see FACTS.md: +28% perplexity at 50% sparsity for the gate
//! rule, +1.4% for the product rule on SmolLM2).

pub mod linalg;
pub mod predictor;
pub mod synthetic;
pub mod thresholds;

use serde::{Deserialize, Serialize};

use crate::image::{append_extra, FlashImage, ImageError};
use predictor::{Accuracy, Form, Predictor, PredictorError};

/// What calibration provides to the flash path: per layer, a predicted active set and the
/// threshold that defines the true one. `engine::flash::FlashFfn` takes one; it is defined
/// here, with the calibration that implements it, below the backends and the engine.
pub trait Sparsity {
    /// The neurons predicted active for FFN input `h` of `layer`, appended to `active`.
    fn predict(&self, layer: usize, h: &[f32], active: &mut Vec<u32>);
    /// A neuron is truly active when `|a_i|` reaches this.
    fn threshold(&self, layer: usize) -> f32;
}

/// The key of the calibration in the image's metadata.
pub const EXTRA_KEY: &str = "calibration";
/// The version of the stored calibration this build reads and writes.
pub(crate) const FORMAT: u32 = 2;

/// One layer's calibration, as stored in the image's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerMeta {
    /// Active when `|a_i| >= threshold`.
    pub threshold: f32,
    /// The predictor's decision threshold on its score.
    pub tau: f32,
    /// Measured on held-out calibration tokens.
    pub accuracy: Accuracy,
}

/// One row of the quality table `calibrate` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QualityRow {
    pub sparsity: f64,
    pub dense_ppl: f64,
    pub oracle_ppl: f64,
    pub predictor_ppl: f64,
    /// Mean over layers of the predicted active fraction on held-out calibration tokens.
    pub predicted_density: f64,
    pub recall: f64,
    pub precision: f64,
}

/// Everything about a calibration except its large arrays.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationMeta {
    pub format: u32,
    /// Target fraction of neurons below threshold (ReLU models: measured natural zeros).
    pub sparsity: f64,
    pub form: Form,
    pub rank: usize,
    pub recall_target: f64,
    /// Tokens recorded (training + held out) and the files they came from.
    pub tokens: usize,
    pub held_out_tokens: usize,
    pub sources: Vec<String>,
    pub layers: Vec<LayerMeta>,
    /// The quality table, when `calibrate` measured one.
    #[serde(default)]
    pub quality: Vec<QualityRow>,
    /// How the quality table was measured: text file, ctx and chunks.
    #[serde(default)]
    pub evaluation: Option<String>,
}

/// A loaded (or freshly computed) calibration: what the flash path needs at run time.
pub struct Calibration {
    pub meta: CalibrationMeta,
    /// Per layer, per neuron (model order): the fraction of calibration tokens it was active.
    pub frequencies: Vec<Vec<f32>>,
    /// The same for the predictor's sets: what the window sees, so what pinning ranks by.
    pub predicted_frequencies: Vec<Vec<f32>>,
    /// One per layer; empty when loaded with [`Calibration::load_stats`].
    pub predictors: Vec<Predictor>,
    /// Resident bytes of the predictors, loaded or not.
    pub(crate) predictor_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Predictor(#[from] PredictorError),
    #[error("the calibration in {path} is unreadable ({detail}); run `llmflash calibrate` again")]
    Damaged { path: String, detail: String },
    #[error("the `product` predictor scores neurons as |silu(g) u|, which does not fit a GELU-gated model (Gemma 3); fit the mlp form (the default) or the linear one")]
    ProductNeedsSilu,
}

impl Calibration {
    /// The calibration stored in `image`, if it has one, with its predictors.
    pub fn load(image: &FlashImage) -> Result<Option<Calibration>, CalibrationError> {
        let Some(mut cal) = Self::load_stats(image)? else {
            return Ok(None);
        };
        cal.predictors = cal.read_predictors(image)?;
        Ok(Some(cal))
    }

    /// This calibration (loaded with [`Calibration::load_stats`] from `image`) with its
    /// predictors read from the image.
    pub fn with_predictors(&self, image: &FlashImage) -> Result<Calibration, CalibrationError> {
        Ok(Calibration {
            meta: self.meta.clone(),
            frequencies: self.frequencies.clone(),
            predicted_frequencies: self.predicted_frequencies.clone(),
            predictors: self.read_predictors(image)?,
            predictor_bytes: self.predictor_bytes,
        })
    }

    fn read_predictors(&self, image: &FlashImage) -> Result<Vec<Predictor>, CalibrationError> {
        let c = &image.meta.config;
        let meta = &self.meta;
        (meta.layers.iter().enumerate())
            .map(|(l, lm)| {
                let blob = image.blob(EXTRA_KEY, &format!("predictor.{l}"))?;
                let (d, n) = (c.hidden_size, c.intermediate_size);
                Ok(Predictor::from_bytes(
                    blob, meta.form, meta.rank, d, n, lm.tau,
                )?)
            })
            .collect()
    }

    /// The calibration stored in `image` without its predictors (thresholds, frequencies and
    /// held-out statistics): what planning needs, at a fraction of the memory.
    pub fn load_stats(image: &FlashImage) -> Result<Option<Calibration>, CalibrationError> {
        let Some(extra) = image.extra(EXTRA_KEY) else {
            return Ok(None);
        };
        let damaged = |detail: String| CalibrationError::Damaged {
            path: image.file().display().to_string(),
            detail,
        };
        let meta: CalibrationMeta =
            serde_json::from_value(extra.clone()).map_err(|e| damaged(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(damaged(format!(
                "calibration format {} (this build reads {FORMAT})",
                meta.format
            )));
        }
        let c = &image.meta.config;
        if meta.layers.len() != c.n_layers {
            return Err(damaged(format!(
                "{} layers calibrated, the model has {}",
                meta.layers.len(),
                c.n_layers
            )));
        }
        let n = c.intermediate_size;
        let per_neuron = |name: &str| -> Result<Vec<Vec<f32>>, CalibrationError> {
            let bytes = image.blob(EXTRA_KEY, name)?;
            if bytes.len() != 4 * n * c.n_layers {
                return Err(damaged(format!("{name} are {} bytes", bytes.len())));
            }
            Ok(bytes
                .chunks_exact(4 * n)
                .map(|l| {
                    l.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                })
                .collect())
        };
        let one = Predictor::blob_len(meta.form, meta.rank, c.hidden_size, n) as u64;
        Ok(Some(Calibration {
            frequencies: per_neuron("frequencies")?,
            predicted_frequencies: per_neuron("predicted_frequencies")?,
            predictors: Vec::new(),
            predictor_bytes: one * c.n_layers as u64,
            meta,
        }))
    }

    /// Writes this calibration into the image at `path` (replacing an earlier one).
    pub fn save(&self, path: &std::path::Path) -> Result<(), CalibrationError> {
        let flat = |v: &[Vec<f32>]| -> Vec<u8> {
            v.iter().flatten().flat_map(|f| f.to_le_bytes()).collect()
        };
        let freq = flat(&self.frequencies);
        let predicted = flat(&self.predicted_frequencies);
        let predictors: Vec<(String, Vec<u8>)> = self
            .predictors
            .iter()
            .enumerate()
            .map(|(l, p)| (format!("predictor.{l}"), p.to_bytes()))
            .collect();
        let mut blobs: Vec<(&str, &[u8])> = vec![
            ("frequencies", &freq),
            ("predicted_frequencies", &predicted),
        ];
        blobs.extend(predictors.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        let json = serde_json::to_value(&self.meta).map_err(|e| CalibrationError::Damaged {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        append_extra(path, EXTRA_KEY, json, &blobs)?;
        Ok(())
    }

    /// Resident bytes of the predictors (loaded or not).
    pub fn predictor_bytes(&self) -> u64 {
        self.predictor_bytes
    }

    /// Per-neuron frequencies of `sets`, per layer.
    fn frequencies_of(&self, sets: Sets) -> &[Vec<f32>] {
        match sets {
            Sets::Predicted => &self.predicted_frequencies,
            Sets::True => &self.frequencies,
        }
    }

    /// Per layer, up to `slots[l]` neurons in at least half of the tokens' `sets`, most
    /// frequent first: worth a slot that is never evicted. When a token's set is larger than
    /// the window, least-recently-used eviction would evict each neuron just before it is
    /// needed again; pinned ones stay. They are a prefix of [`Self::hot_order`], so on an
    /// image reordered by the predicted order they are a prefix of each section.
    pub fn hot_neurons(&self, sets: Sets, slots: &[usize]) -> Vec<Vec<u32>> {
        (0..self.frequencies_of(sets).len())
            .zip(slots)
            .map(|(layer, &s)| {
                let f = &self.frequencies_of(sets)[layer];
                let mut ids = self.hot_order(sets, layer);
                ids.truncate(s.min(ids.partition_point(|&i| f[i as usize] >= 0.5)));
                ids
            })
            .collect()
    }

    /// Every neuron of `layer`, the most frequent in `sets` first (ties: lower id first). The
    /// predicted order is the disk order `llmflash reorder` writes.
    pub fn hot_order(&self, sets: Sets, layer: usize) -> Vec<u32> {
        let f = &self.frequencies_of(sets)[layer];
        let mut ids: Vec<u32> = (0..f.len() as u32).collect();
        ids.sort_by(|&a, &b| f[b as usize].total_cmp(&f[a as usize]));
        ids
    }

    /// Expected neurons per token of `layer` in `sets` outside a window of `slots` holding
    /// the most frequent ones.
    pub fn expected_misses(&self, sets: Sets, layer: usize, slots: usize) -> f64 {
        let f = &self.frequencies_of(sets)[layer];
        let order = self.hot_order(sets, layer);
        order
            .iter()
            .skip(slots)
            .map(|&i| f[i as usize] as f64)
            .sum()
    }

    /// Expected neurons per token in `sets`, per layer (for the budget planner): the
    /// predictor's held-out density, or the true sets' mean size on the calibration text.
    pub fn expected_active(&self, sets: Sets) -> Vec<f64> {
        let f = self.frequencies_of(sets);
        match sets {
            Sets::Predicted => (self.meta.layers.iter().zip(f))
                .map(|(l, f)| l.accuracy.predicted_density * f.len() as f64)
                .collect(),
            Sets::True => f
                .iter()
                .map(|f| f.iter().map(|&x| x as f64).sum())
                .collect(),
        }
    }
}

/// Whose active sets a window sees: the predictor's (flash runs), or the true ones (oracle
/// runs, which plan and pin by the true frequencies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sets {
    Predicted,
    True,
}

impl Sparsity for Calibration {
    fn predict(&self, layer: usize, h: &[f32], active: &mut Vec<u32>) {
        self.predictors[layer].predict(h, active);
    }

    fn threshold(&self, layer: usize) -> f32 {
        self.meta.layers[layer].threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_frequencies(predicted: Vec<Vec<f32>>, truth: Vec<Vec<f32>>) -> Calibration {
        Calibration {
            meta: CalibrationMeta {
                format: FORMAT,
                sparsity: 0.5,
                form: Form::Linear,
                rank: 1,
                recall_target: 0.99,
                tokens: 0,
                held_out_tokens: 0,
                sources: Vec::new(),
                layers: Vec::new(),
                quality: Vec::new(),
                evaluation: None,
            },
            frequencies: truth,
            predicted_frequencies: predicted,
            predictors: Vec::new(),
            predictor_bytes: 0,
        }
    }

    #[test]
    fn hot_order_pins_and_misses_agree() {
        let p = Sets::Predicted;
        let cal = with_frequencies(vec![vec![0.2, 0.9, 0.6, 0.9, 0.1]], vec![vec![0.0; 5]]);
        // Most frequent first, ties by id.
        assert_eq!(cal.hot_order(p, 0), vec![1, 3, 2, 0, 4]);
        // Pins: a prefix of that order, only neurons picked on at least half of the tokens.
        assert_eq!(cal.hot_neurons(p, &[2]), vec![vec![1, 3]]);
        assert_eq!(cal.hot_neurons(p, &[5]), vec![vec![1, 3, 2]]);
        // Expected misses: the frequencies of the neurons left outside.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(cal.expected_misses(p, 0, 0), 2.7));
        assert!(close(cal.expected_misses(p, 0, 2), 0.9));
        assert!(close(cal.expected_misses(p, 0, 5), 0.0));
    }

    /// Oracle runs rank by the true frequencies, not the predictor's.
    #[test]
    fn the_true_sets_rank_by_their_own_frequencies() {
        let cal = with_frequencies(
            vec![vec![0.9, 0.9, 0.9, 0.9]],
            vec![vec![0.1, 0.7, 0.2, 0.6]],
        );
        let t = Sets::True;
        assert_eq!(cal.hot_order(t, 0), vec![1, 3, 2, 0]);
        assert_eq!(cal.hot_neurons(t, &[4]), vec![vec![1, 3]]);
        assert_eq!(
            cal.hot_neurons(Sets::Predicted, &[4]),
            vec![vec![0, 1, 2, 3]]
        );
        assert!((cal.expected_misses(t, 0, 2) - 0.3).abs() < 1e-6);
        assert!((cal.expected_active(t)[0] - 1.6).abs() < 1e-6);
    }
}
