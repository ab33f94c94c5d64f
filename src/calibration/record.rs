//! Recording what calibration learns from: per layer, the FFN inputs `h` and every neuron's
//! activation magnitude `|a_i|`, while the dense model runs over calibration text.

use std::cell::RefCell;
use std::rc::Rc;

use half::f16;

use crate::backend::cpu::forward::FfnCompute;
use crate::engine::flash::{FlashFfn, FlashOptions, Selection, Strategy};
use crate::engine::model::Model;
use crate::engine::model::ModelError;
use crate::engine::{EngineError, Session};
use crate::sparsity::Sparsity;

/// What one layer saw: `inputs` (tokens x d, f32) and `magnitudes` (tokens x n, f16: the
/// quantiles and labels calibration derives from them need no more precision, and halving
/// them lets a larger model record enough tokens).
#[derive(Default)]
pub struct LayerRecord {
    pub inputs: Vec<f32>,
    pub magnitudes: Vec<f16>,
}

/// Everything recorded, per layer.
pub struct Records {
    pub d: usize,
    pub n: usize,
    pub layers: Vec<LayerRecord>,
}

impl Records {
    pub fn tokens(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs.len() / self.d)
    }
}

/// Oracle selection with a threshold of zero keeps every neuron: the dense FFN, computed
/// from the image's bundles, with each neuron's activation left behind for the recorder.
struct Everything;

impl Sparsity for Everything {
    fn predict(&self, _: usize, _: &[f32], _: &mut Vec<u32>) {}
    fn threshold(&self, _: usize) -> f32 {
        0.0
    }
}

static EVERYTHING: Everything = Everything;

/// The dense FFN of a flash image, recording its inputs and activations.
struct Recorder<'a> {
    ffn: FlashFfn<'a>,
    records: Rc<RefCell<Records>>,
}

impl FfnCompute for Recorder<'_> {
    fn ffn(
        &mut self,
        layer: usize,
        h: &[f32],
        out: &mut [f32],
    ) -> Result<(), crate::storage::ReadError> {
        self.ffn.ffn(layer, h, out)?;
        let mut r = self.records.borrow_mut();
        let rec = &mut r.layers[layer];
        rec.inputs.extend_from_slice(h);
        rec.magnitudes.extend(
            self.ffn
                .last_activations()
                .iter()
                .map(|a| f16::from_f32(a.abs())),
        );
        Ok(())
    }
}

/// Runs the dense model of `model` (a flash image) over `tokens`, cut into segments of `ctx`
/// positions (each starting with `bos` when the tokenizer adds one), recording at most
/// `max_tokens` positions. `progress(done, total)` is called after each segment.
pub fn record(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Records, RecordError> {
    let image = model.image.as_ref().ok_or(RecordError::NotAnImage)?;
    let c = &model.weights.config;
    let records = Rc::new(RefCell::new(Records {
        d: c.hidden_size,
        n: c.intermediate_size,
        layers: (0..c.n_layers).map(|_| LayerRecord::default()).collect(),
    }));
    let opts = FlashOptions {
        strategy: Strategy::Mmap,
        selection: Selection::Oracle,
        ..FlashOptions::default()
    };
    let ffn = FlashFfn::new(image, &model.weights, Some(&EVERYTHING), opts)
        .map_err(|e| RecordError::Model(e.into()))?;
    let recorder = Recorder {
        ffn,
        records: records.clone(),
    };
    let mut session = Session::with_ffn(&model.weights, ctx, Box::new(recorder));
    let ctx = ctx.max(2);
    let total = tokens.len().min(max_tokens);
    let mut done = 0;
    for segment in tokens[..total].chunks(ctx) {
        session.reset();
        for (j, &t) in segment.iter().enumerate() {
            let t = match (j, bos) {
                (0, Some(b)) => b,
                _ => t,
            };
            session.step(t, false)?;
        }
        done += segment.len();
        progress(done, total);
    }
    drop(session);
    Rc::try_unwrap(records)
        .map(RefCell::into_inner)
        .map_err(|_| RecordError::StillShared)
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("calibration runs on a flash image; convert the model first: llmflash convert MODEL -o MODEL.flash")]
    NotAnImage,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("internal error: the recorder outlived its session")]
    StillShared,
}
