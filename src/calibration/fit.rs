//! Turning recorded activations into a calibration for one target sparsity.

use rayon::prelude::*;

use super::record::Records;
use crate::image::{FlashImage, PartRole};
use crate::model::config::FfnKind;
use crate::quant;
use crate::sparsity::predictor::{
    fit, fit_mlp, fit_product, predicted_frequencies, set_tau, Accuracy, Examples, FitOptions, Form,
};
use crate::sparsity::thresholds::{frequencies, labels, threshold};
use crate::sparsity::{Calibration, CalibrationError, CalibrationMeta, LayerMeta, FORMAT};

/// How to fit one calibration.
#[derive(Clone, Debug)]
pub struct LevelOptions {
    pub fit: FitOptions,
    /// Recall the predictors' decision thresholds are set for, on held-out tokens.
    pub recall: f64,
    /// Fraction of the recorded tokens (the last ones) held out from fitting.
    pub held_out: f64,
    /// The predictor's form; `None` picks by FFN kind: mlp for SwiGLU (measured best on
    /// SmolLM2, docs/calibration.md), linear for ReLU (exact in kind there).
    pub form: Option<Form>,
}

impl Default for LevelOptions {
    fn default() -> Self {
        LevelOptions {
            fit: FitOptions::default(),
            recall: 0.99,
            held_out: 0.15,
            form: None,
        }
    }
}

/// Thresholds, frequencies and predictors for `sparsity`, from `records`.
pub fn fit_level(
    image: &FlashImage,
    records: &Records,
    sparsity: f64,
    opts: &LevelOptions,
    sources: Vec<String>,
) -> Result<Calibration, CalibrationError> {
    let c = &image.meta.config;
    let kind = c.ffn_kind();
    let (d, n) = (records.d, records.n);
    let tokens = records.tokens();
    let held = ((tokens as f64 * opts.held_out) as usize).clamp(1.min(tokens), tokens);
    let train = tokens - held;
    let form = opts.form.unwrap_or(match kind {
        FfnKind::SwiGlu | FfnKind::GeGlu => Form::Mlp,
        FfnKind::Relu => Form::Linear,
    });
    if form == Form::Product && kind == FfnKind::GeGlu {
        return Err(CalibrationError::ProductNeedsSilu);
    }
    let fitted: Vec<_> = (0..c.n_layers)
        .into_par_iter()
        .map(|l| {
            let rec = &records.layers[l];
            let t = threshold(&rec.magnitudes[..train * n], sparsity, kind);
            let y = labels(&rec.magnitudes, t);
            let freq = frequencies(&y, n);
            let roles: &[PartRole] = match form {
                Form::Product => &[PartRole::Gate, PartRole::Up],
                Form::Linear | Form::Mlp if kind.gated() => &[PartRole::Gate],
                Form::Linear | Form::Mlp => &[PartRole::Up],
            };
            let w = projection_rows(image, l, roles)?;
            let train_ex = Examples {
                inputs: &rec.inputs[..train * d],
                labels: &y[..train * n],
                magnitudes: &rec.magnitudes[..train * n],
                threshold: t,
                d,
                n,
            };
            let held_ex = Examples {
                inputs: &rec.inputs[train * d..],
                labels: &y[train * n..],
                magnitudes: &rec.magnitudes[train * n..],
                threshold: t,
                d,
                n,
            };
            let mut p = match form {
                Form::Linear => fit(&w, &train_ex, &opts.fit)?,
                Form::Mlp => fit_mlp(&w, &train_ex, &opts.fit)?,
                Form::Product => fit_product(&w, &train_ex, &opts.fit)?,
            };
            let accuracy = set_tau(&mut p, &held_ex, opts.recall);
            let predicted = predicted_frequencies(&p, &rec.inputs);
            let meta = LayerMeta {
                threshold: t,
                tau: p.tau,
                accuracy,
            };
            Ok((meta, freq, predicted, p))
        })
        .collect::<Result<_, CalibrationError>>()?;
    let mut layers = Vec::with_capacity(fitted.len());
    let mut freqs = Vec::with_capacity(fitted.len());
    let mut predicted = Vec::with_capacity(fitted.len());
    let mut predictors = Vec::with_capacity(fitted.len());
    for (m, f, pf, p) in fitted {
        layers.push(m);
        freqs.push(f);
        predicted.push(pf);
        predictors.push(p);
    }
    let rank = predictors.first().map_or(opts.fit.rank, |p| p.rank);
    Ok(Calibration {
        meta: CalibrationMeta {
            format: FORMAT,
            sparsity,
            form,
            rank,
            recall_target: opts.recall,
            tokens,
            held_out_tokens: held,
            sources,
            layers,
            quality: Vec::new(),
            evaluation: None,
        },
        frequencies: freqs,
        predicted_frequencies: predicted,
        predictor_bytes: predictors.iter().map(|p| p.bytes() as u64).sum(),
        predictors,
    })
}

/// The rows of the given parts (gate, up) for every neuron, dequantised from the image's
/// bundles into model order and stacked part after part (`roles.len() * n` x d).
fn projection_rows(
    image: &FlashImage,
    layer: usize,
    roles: &[PartRole],
) -> Result<Vec<f32>, CalibrationError> {
    let damaged = |detail: String| CalibrationError::Damaged {
        path: image.file().display().to_string(),
        detail,
    };
    let d = image.meta.config.hidden_size;
    let section = image.ffn_section(layer);
    let n = section.n_neurons;
    let mut w = vec![0.0f32; roles.len() * n * d];
    for (k, &role) in roles.iter().enumerate() {
        let part = image
            .bundle()
            .part(role)
            .ok_or_else(|| damaged(format!("bundles have no {} part", role.name())))?;
        for slot in 0..n {
            let neuron = section
                .permutation
                .as_ref()
                .map_or(slot, |p| p[slot] as usize);
            let row = k * n + neuron;
            let bytes = &image.bundle_bytes(layer, slot)[part.offset..part.offset + part.len];
            quant::dequantize(part.dtype, bytes, &mut w[row * d..(row + 1) * d])
                .map_err(|e| damaged(format!("layer {layer} {}: {e}", role.name())))?;
        }
    }
    Ok(w)
}

/// Mean over layers of the held-out accuracy.
pub fn mean_accuracy(cal: &Calibration) -> Accuracy {
    let k = cal.meta.layers.len().max(1) as f64;
    let mut a = Accuracy::default();
    for l in &cal.meta.layers {
        a.recall += l.accuracy.recall / k;
        a.precision += l.accuracy.precision / k;
        a.predicted_density += l.accuracy.predicted_density / k;
        a.true_density += l.accuracy.true_density / k;
        a.mass_recall += l.accuracy.mass_recall / k;
    }
    a
}
