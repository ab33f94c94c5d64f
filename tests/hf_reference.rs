//! Tiny random checkpoints written by HF transformers (tools/make-hf-fixtures.sh): our logits
//! for a fixed token sequence must match transformers' to 1e-3 relative, and greedy decoding
//! with the KV cache must continue the sequence exactly as `generate()` did.

mod common;

use llmflash::backend::kv_cache::KvType;
use llmflash::engine::sampler::argmax;
use llmflash::engine::Session;
use llmflash::model::load;

/// Largest |ours - theirs| over a position's logits, relative to that position's largest |logit|.
fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn check(name: &str) {
    let dir = common::fixture(&format!("hf/{name}"));
    let reference = common::read_json(&dir.join("reference.json"));
    let model = load(&dir).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let tokens = common::u32s(&reference["tokens"]);
    let logits = reference["logits"].as_array().expect("logits");
    // transformers computes in f32 throughout, the cache included.
    let mut session = Session::new(&model.weights, 64).with_kv_type(KvType::F32);
    let mut last = Vec::new();
    for (pos, (&t, want)) in tokens.iter().zip(logits).enumerate() {
        let want: Vec<f32> = want
            .as_array()
            .expect("logit row")
            .iter()
            .map(|v| v.as_f64().expect("logit") as f32)
            .collect();
        let got = session.step(t, true).expect("step");
        let err = relative_error(got, &want);
        assert!(
            err < 1e-3,
            "{name}: position {pos}: relative error {err:.2e} >= 1e-3"
        );
        last = got.to_vec();
    }
    // Continue greedily, feeding our own choices back through the KV cache, as generate() did.
    let expected = common::u32s(&reference["greedy"]);
    let mut ours = Vec::new();
    let mut next = argmax(&last);
    for _ in 0..expected.len() {
        ours.push(next);
        next = argmax(session.step(next, true).expect("step"));
    }
    assert_eq!(
        ours, expected,
        "{name}: greedy continuation differs from transformers"
    );
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn llama_tied_bf16() {
    check("llama-tied");
}

#[test]
fn llama_sharded() {
    check("llama-sharded");
}

#[test]
fn qwen2_f16() {
    check("qwen2");
}

/// Qwen3: RMSNorm on each q and k head before RoPE, no biases, heads 24 wide in a hidden size
/// of 64 (4 heads), tied embeddings, bf16 weights.
#[test]
fn qwen3_bf16() {
    check("qwen3");
    // The head norms are what makes it qwen3: without them the logits are far off.
    let dir = common::fixture("hf/qwen3");
    let reference = common::read_json(&dir.join("reference.json"));
    let mut weights = load(&dir).expect("load").weights;
    assert_ne!(
        weights.config.n_heads * weights.config.head_dim,
        weights.config.hidden_size
    );
    for layer in &mut weights.layers {
        assert!(layer.extra_norms.q.is_some() && layer.extra_norms.k.is_some());
        layer.extra_norms.q = None;
        layer.extra_norms.k = None;
    }
    let tokens = common::u32s(&reference["tokens"]);
    let want: Vec<f32> = reference["logits"][tokens.len() - 1]
        .as_array()
        .expect("logit row")
        .iter()
        .map(|v| v.as_f64().expect("logit") as f32)
        .collect();
    let mut session = Session::new(&weights, 64).with_kv_type(KvType::F32);
    let got = session.prefill(&tokens).expect("prefill");
    let err = relative_error(got, &want);
    assert!(
        err > 1e-2,
        "without q/k norms: relative error only {err:.2e}"
    );
}

#[test]
fn opt() {
    check("opt");
}

#[test]
fn opt_with_projections_and_post_norm() {
    check("opt-proj");
}
