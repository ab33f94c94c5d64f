//! Gemma 3 270M on the flash path: converted to an image, its GELU-gated FFN computed from
//! bundles (dense and through a fitted predictor) must not depend on where the bundles live or
//! how small the window is, and the sliding-window layers must attend alike in the batched and
//! the token-by-token paths past the window. Opt-in like `tests/gemma3_llamacpp.rs`
//! (`tools/fetch-model --gemma-270m`).

mod common;

use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::engine::Session;
use llmflash::image::BundleDtype;
use llmflash::model::load;
use llmflash::sparsity::Sparsity;

const MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

fn gguf() -> Option<std::path::PathBuf> {
    common::model(MODEL, "tools/fetch-model --gemma-270m (opt-in)")
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b }) as u32
}

/// Greedy tokens and the logits of every step.
fn decode(
    model: &Model,
    cal: Option<&dyn Sparsity>,
    opts: FlashOptions,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>, u64) {
    let mut s = model
        .session(prompt.len() + n + 1, Some(opts), cal)
        .expect("session");
    let mut logits = vec![s.prefill(prompt).expect("prefill").to_vec()];
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(logits.last().unwrap());
        out.push(next);
        logits.push(s.step(next, true).expect("step").to_vec());
    }
    let needed = s.ffn().flash_stats().map_or(0, |st| st.neurons_needed);
    (out, logits, needed)
}

fn options(strategy: Strategy, selection: Selection, slots: Option<usize>) -> FlashOptions {
    FlashOptions {
        strategy,
        selection,
        window_slots: slots.map(|s| vec![s; 18]),
        io_threads: 2,
        ..FlashOptions::default()
    }
}

#[test]
fn flash_image_runs_gemma_dense_and_sparse() {
    let Some(path) = gguf() else { return };
    let resident = load(&path).expect("load GGUF");
    let tok = resident.tokenizer.as_ref().expect("tokenizer");
    let prompt = tok.encode("The capital of France is", true, false);
    let image = common::to_image(&path, "gemma3-flash", BundleDtype::Source);
    let model = Model::open(&image).expect("open image");
    assert_eq!(model.weights.config, resident.weights.config);

    // Dense from bundles: the resident model's continuation (the bundles' down matrices are
    // requantised to Q8_0, so only the first tokens are asked to agree), whatever the window.
    let mut session = Session::new(&resident.weights, 64);
    let mut logits = session.prefill(&prompt).expect("prefill").to_vec();
    let mut want = Vec::new();
    for _ in 0..6 {
        want.push(argmax(&logits));
        logits = session
            .step(*want.last().unwrap(), true)
            .expect("step")
            .to_vec();
    }
    let (dense, dense_logits, _) = decode(
        &model,
        None,
        options(Strategy::Mmap, Selection::All, None),
        &prompt,
        6,
    );
    assert_eq!(dense, want, "dense flash path vs the resident GGUF");
    for (strategy, slots) in [(Strategy::Flash, Some(64)), (Strategy::Resident, None)] {
        let (got, got_logits, _) = decode(
            &model,
            None,
            options(strategy, Selection::All, slots),
            &prompt,
            6,
        );
        assert_eq!(got, dense, "{strategy:?} {slots:?}");
        assert!(
            got_logits == dense_logits,
            "{strategy:?} {slots:?}: logits differ"
        );
    }

    // A quick calibration (GeGLU activity, predictors fitted on it): the predicted path is
    // sparse, and the same through a small window as through the mapped image.
    let c = &model.weights.config;
    let cal = common::calibrate(&model, &common::tokens(256, c.vocab_size), 0.5, 16);
    let (want, want_logits, needed) = decode(
        &model,
        Some(&cal),
        options(Strategy::Mmap, Selection::Predictor, None),
        &prompt,
        6,
    );
    let total = (c.n_layers * c.intermediate_size * (prompt.len() + 6)) as u64;
    assert!(needed < total, "the predictor used every neuron");
    let (got, got_logits, _) = decode(
        &model,
        Some(&cal),
        options(Strategy::Flash, Selection::Predictor, Some(128)),
        &prompt,
        6,
    );
    assert_eq!(got, want, "predictor: window vs mapped image");
    assert!(got_logits == want_logits, "predictor: logits differ");
    let text = tok.decode(&want);
    eprintln!("predictor at 50% sparsity: {text:?} ({needed} of {total} neuron uses)");
    let _ = std::fs::remove_file(&image);
}

/// Past the 512-position window, the batched prefill and single steps must mask the same
/// positions in the sliding layers: the logits after 520 tokens, prefilled in one go or with
/// the last 8 stepped one at a time, are equal to the bit.
#[test]
fn sliding_window_is_the_same_batched_and_stepped() {
    let Some(path) = gguf() else { return };
    let model = load(&path).expect("load GGUF");
    let c = &model.weights.config;
    assert_eq!(c.sliding_window, Some(512));
    let tokens = common::tokens(520, c.vocab_size);
    let mut batched = Session::new(&model.weights, 520);
    let want = batched.prefill(&tokens).expect("prefill").to_vec();
    let mut stepped = Session::new(&model.weights, 520);
    stepped.prefill(&tokens[..512]).expect("prefill");
    let mut got = Vec::new();
    for &t in &tokens[512..] {
        got = stepped.step(t, true).expect("step").to_vec();
    }
    assert!(
        got == want,
        "sliding layers attend differently batched and stepped"
    );

    // And the window does mask: with a window wider than the context (the sliding layers
    // keeping their own RoPE base) the same 520 tokens give other logits, while at 512 tokens
    // (the last query still sees position 0) they are the same.
    let mut global = model.weights.clone();
    global.config.sliding_window = Some(1 << 20);
    let mut all = Session::new(&global, 520);
    assert!(all.prefill(&tokens).expect("prefill") != &want[..]);
    let mut windowed = Session::new(&model.weights, 512);
    let mut all = Session::new(&global, 512);
    assert!(
        windowed.prefill(&tokens[..512]).expect("prefill")
            == all.prefill(&tokens[..512]).expect("prefill")
    );
}
