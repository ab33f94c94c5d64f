//! Batched prefill and scoring against feeding the tokens one at a time: the logits after the
//! prompt, after further decode steps, and after every scored token must be the same to the
//! bit, for every architecture and weight format (batches of 64, so long prompts span several).

mod common;

use llmflash::engine::Session;
use llmflash::model::load;
use llmflash::model::weights::ModelWeights;

/// Logits after `prompt` and after each of `follow`, prefilled in batches or stepped.
fn logits(w: &ModelWeights, prompt: &[u32], follow: &[u32], batched: bool) -> Vec<Vec<f32>> {
    let mut s = Session::new(w, prompt.len() + follow.len() + 1);
    let mut out = Vec::new();
    if batched {
        out.push(s.prefill(prompt).expect("prefill").to_vec());
    } else {
        for (i, &t) in prompt.iter().enumerate() {
            let last = i + 1 == prompt.len();
            let l = s.step(t, last).expect("step");
            if last {
                out.push(l.to_vec());
            }
        }
    }
    for &t in follow {
        out.push(s.step(t, true).expect("step").to_vec());
    }
    out
}

/// Every token's logits through `Session::score` (batched) and through `step`.
fn scored(w: &ModelWeights, tokens: &[u32], batched: bool) -> Vec<Vec<f32>> {
    let mut s = Session::new(w, tokens.len() + 1);
    if batched {
        let mut out = Vec::new();
        s.score(tokens, |_, l| out.push(l.to_vec())).expect("score");
        out
    } else {
        let step = |t: &u32| s.step(*t, true).expect("step").to_vec();
        tokens.iter().map(step).collect()
    }
}

fn check(w: &ModelWeights, name: &str) {
    let vocab = w.config.vocab_size;
    let fits = |&len: &usize| len + 4 <= w.config.max_positions;
    let lens: Vec<usize> = [1, 7, 64, 150].into_iter().filter(fits).collect();
    assert!(lens.len() >= 2, "{name}: context too short to test");
    for len in lens {
        let prompt = common::tokens(len, vocab);
        let follow = common::tokens(3, vocab);
        let batched = logits(w, &prompt, &follow, true);
        let stepped = logits(w, &prompt, &follow, false);
        assert!(
            batched == stepped,
            "{name}: a {len}-token prompt prefilled in batches changes the logits"
        );
        assert!(
            scored(w, &prompt, true) == scored(w, &prompt, false),
            "{name}: scoring {len} tokens in batches changes their logits"
        );
    }
}

#[test]
fn hf_models_prefill_in_batches_exactly() {
    for name in ["llama", "llama-tied", "qwen2", "opt", "opt-proj"] {
        let model = load(&common::fixture(&format!("hf/{name}"))).expect("loading");
        check(&model.weights, name);
    }
}

#[test]
fn smollm2_prefills_in_batches_exactly() {
    let Some(path) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let model = load(&path).expect("loading SmolLM2");
    check(&model.weights, "SmolLM2");
}
