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
