//! Faults while decoding from a flash image: a read that fails (here the image truncated while
//! a session decodes from it) ends the step with an error that names what was read. It never
//! panics, never yields a token, and commits no position.

mod common;

use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::engine::EngineError;
use llmflash::image::BundleDtype;

#[test]
fn an_image_truncated_mid_run_is_an_error_not_tokens() {
    let source = common::to_image(&common::fixture("hf/llama"), "faults", BundleDtype::F16);
    for (name, strategy, lookahead) in [
        ("flash", Strategy::Flash, false),
        ("flash-lookahead", Strategy::Flash, true),
        ("naive", Strategy::Naive, false),
    ] {
        let path = common::scratch(&format!("faults-{name}"));
        std::fs::copy(&source, &path).expect("copy the image");
        let model = Model::open(&path).expect("open image");
        let c = &model.weights.config;
        let (layers, vocab) = (c.n_layers, c.vocab_size);
        // A window far smaller than a layer: every step reads bundles.
        let opts = FlashOptions {
            strategy,
            selection: Selection::All,
            window_slots: Some(vec![4; layers]),
            lookahead,
            io_threads: 2,
            ..FlashOptions::default()
        };
        let mut s = model.session(64, Some(opts), None).expect("session");
        s.prefill(&common::tokens(6, vocab))
            .expect("prefill before the fault");
        let image = model.image.as_ref().expect("a flash image");
        // Keep the resident tensors (they come first), cut every FFN section off.
        let cut = image.ffn_section(0).offset;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(cut).expect("truncate the image");
        let at = s.position();
        for attempt in 0..2 {
            match s.step(1, true) {
                Err(EngineError::Read(e)) => {
                    let text = format!("{e}: {}", e.source);
                    assert!(text.contains("layer"), "{name}: {text}");
                }
                Err(e) => panic!("{name}: expected a read error, got {e}"),
                Ok(_) => panic!("{name}: step {attempt} after the truncation gave logits"),
            }
            assert_eq!(
                s.position(),
                at,
                "{name}: a failed step committed its position"
            );
        }
        match s.verify(&[1, 2, 3]) {
            Err(EngineError::Read(_)) => {}
            Err(e) => panic!("{name}: expected a read error from verify, got {e}"),
            Ok(_) => panic!("{name}: a verify pass after the truncation gave logits"),
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// A copy of `source` at a scratch path with one byte of layer 1's bundle in disk slot 3
/// flipped; returns the path and the damaged bundle's file offset.
fn damaged_copy(source: &std::path::Path, name: &str) -> (std::path::PathBuf, u64) {
    let path = common::scratch(name);
    std::fs::copy(source, &path).expect("copy the image");
    let image = llmflash::image::FlashImage::open(&path).expect("open image");
    let at = image.ffn_section(1).offset + 3 * image.bundle().stride as u64;
    drop(image);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[at as usize + 5] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    (path, at)
}

/// One flipped byte in a bundle: every strategy that reads bundles stops with a checksum
/// error naming the layer and the bundle's offset, instead of computing with it; with checks
/// off (`verify: false`) the same image decodes, which is what makes the check's cost
/// measurable. Reordering refuses the damaged image rather than giving it fresh checksums.
#[test]
fn a_damaged_bundle_stops_the_decode_with_its_offset() {
    let source = common::to_image(&common::fixture("hf/llama"), "damage", BundleDtype::F16);
    let (path, at) = damaged_copy(&source, "damaged");
    let model = Model::open(&path).expect("open image");
    let c = &model.weights.config;
    let (layers, vocab) = (c.n_layers, c.vocab_size);
    let prompt = common::tokens(8, vocab);
    for (name, strategy, lookahead) in [
        ("flash", Strategy::Flash, false),
        ("flash-lookahead", Strategy::Flash, true),
        ("naive", Strategy::Naive, false),
        ("resident", Strategy::Resident, false),
    ] {
        let opts = |verify| FlashOptions {
            strategy,
            selection: Selection::All,
            window_slots: Some(vec![4; layers]),
            lookahead,
            io_threads: 2,
            verify,
            ..FlashOptions::default()
        };
        let text = match model.session(64, Some(opts(true)), None) {
            // The resident strategy reads every bundle when the session is made.
            Err(e) => e.to_string(),
            Ok(mut s) => match s.prefill(&prompt) {
                Err(EngineError::Read(e)) => format!("{e}: {}", e.source),
                Err(e) => panic!("{name}: expected a read error, got {e}"),
                Ok(_) => panic!("{name}: the damaged bundle was used"),
            },
        };
        assert!(
            text.contains("layer 1") && text.contains(&format!("offset {at}")),
            "{name}: {text}"
        );
        let mut s = model.session(64, Some(opts(false)), None).expect("session");
        s.prefill(&prompt).expect("unchecked reads decode");
    }
    let orders: Vec<Vec<u32>> = (0..layers)
        .map(|_| (0..c.intermediate_size as u32).rev().collect())
        .collect();
    let err = llmflash::image::reorder_neurons(&path, &orders, |_| {})
        .expect_err("reordering a damaged image");
    assert!(err.to_string().contains("layer 1"), "{err}");
    let _ = std::fs::remove_file(&path);
}

/// A damaged row of a streamed table (the embedding, read row by row; the head, read in
/// batches of rows for each token) is an error naming its offset, as a damaged bundle is.
#[test]
fn a_damaged_streamed_row_is_an_error() {
    use llmflash::backend::streamed::RowSource;
    use llmflash::quant::ActivationBuffer;
    let source = common::to_image(
        &common::fixture("hf/llama"),
        "damage-rows",
        BundleDtype::F16,
    );
    let path = common::scratch("damaged-rows");
    std::fs::copy(&source, &path).expect("copy the image");
    let image = llmflash::image::FlashImage::open(&path).expect("open image");
    let table = image
        .meta
        .tensor("token_embd.weight")
        .expect("embedding")
        .clone();
    let row_bytes = (table.len / table.rows as u64) as usize;
    let at = table.offset + 5 * row_bytes as u64;
    drop(image);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[at as usize + 1] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write");
    // As a session that streams the table opens it: the table is left to the stream.
    let image = llmflash::image::FlashImage::open_loaded(&path, false, &["token_embd.weight"])
        .expect("open damaged image");
    let mut rows = RowSource::streamed(&image, "token_embd.weight", false, 2).expect("stream");
    let mut out = vec![0f32; table.cols];
    rows.row(4, &mut out).expect("an intact row");
    let e = rows.row(5, &mut out).expect_err("the damaged row");
    let text = format!("{e}: {}", e.source);
    assert!(text.contains(&format!("offset {at}")), "{text}");
    let mut act = ActivationBuffer::default();
    act.quantize_for(rows.dtype(), &vec![0.5; table.cols])
        .expect("quantise");
    let mut logits = vec![0f32; table.rows];
    let e = rows
        .matvec(&act, &mut logits)
        .expect_err("a head pass over the damaged row");
    assert!(
        format!("{}", e.source).contains(&format!("offset {at}")),
        "{e}"
    );
    // The reads in flight were drained: the table streams again (and fails again) cleanly.
    assert!(rows.matvec(&act, &mut logits).is_err());
    let _ = std::fs::remove_file(&path);
}

/// The GPU flash path checks each bundle before uploading it: the damaged bundle stops the
/// decode there too (lavapipe in CI).
#[test]
fn a_damaged_bundle_stops_the_gpu_flash_decode() {
    use llmflash::backend::gpu::{GpuFlashDecoder, GpuFlashOptions};
    let Some(ctx) = common::gpu() else { return };
    let source = common::to_image(&common::fixture("hf/llama"), "damage-gpu", BundleDtype::F16);
    let (path, at) = damaged_copy(&source, "damaged-gpu");
    let model = Model::open(&path).expect("open image");
    let c = &model.weights.config;
    let (layers, vocab) = (c.n_layers, c.vocab_size);
    let image = model.image.as_ref().expect("a flash image");
    let opts = GpuFlashOptions {
        window_slots: Some(vec![4; layers]),
        overflow_slots: 5,
        io_threads: 2,
        ..GpuFlashOptions::default()
    };
    let mut gpu = GpuFlashDecoder::new(ctx, image, &model.weights, None, 64, opts)
        .expect("GPU flash decoder");
    let err = match gpu.prefill(&common::tokens(8, vocab)) {
        Err(llmflash::backend::gpu::GpuError::Read(e)) => format!("{e}: {}", e.source),
        Err(e) => panic!("expected a read error, got {e}"),
        Ok(_) => panic!("the damaged bundle was uploaded"),
    };
    assert!(
        err.contains("layer 1") && err.contains(&format!("offset {at}")),
        "{err}"
    );
    let _ = std::fs::remove_file(&path);
}
