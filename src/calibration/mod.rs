//! Calibration: what `llmflash calibrate` runs to produce a [`crate::sparsity::Calibration`].
//! It drives the engine (the dense model over calibration text, perplexities per selection),
//! so it sits above it; what the flash path needs at run time stays in [`crate::sparsity`],
//! below the backends.
//!
//! [`record`] records each layer's FFN inputs and activations, [`fit`] turns them into
//! thresholds and predictors for one sparsity, [`measure`] scores a calibration in
//! perplexity (and samples calibration text from the model), and [`sweep`] fits a list of
//! sparsities and chooses the one to store.

pub mod fit;
pub mod measure;
pub mod record;
pub mod sweep;
