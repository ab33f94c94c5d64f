//! Batched prefill and scoring against feeding the tokens one at a time: the logits after the
//! prompt, after further decode steps, and after every scored token must be the same to the
//! bit, for every architecture and weight format (batches of 64, so long prompts span several).

mod common;

use llmflash::backend::cpu::forward::{forward, CpuState, DenseFfn};
use llmflash::backend::cpu::prefill::{forward_columns, BatchState, Logits};
use llmflash::backend::kv_cache::{KvCache, KvType};
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

/// Three sequences (prompts of 5, 2 and 9 tokens fed one at a time) whose next tokens run
/// interleaved as the columns of one batch, one sequence with two consecutive tokens: each
/// column's logits are those of `forward` on its own cache, to the bit.
fn check_columns(w: &ModelWeights, name: &str) {
    let vocab = w.config.vocab_size;
    let prompts: Vec<Vec<u32>> = [5, 2, 9].map(|n| common::tokens(n, vocab)).to_vec();
    let fresh = || -> Vec<KvCache> {
        let cache = |_| KvCache::new(&w.config, 16, KvType::F16);
        (0..prompts.len()).map(cache).collect()
    };
    let mut s = CpuState::new(&w.config, w.activations);
    let mut ffn = DenseFfn::new(w);
    let mut feed = |caches: &mut [KvCache], cols: &[(usize, u32)]| -> Vec<Vec<f32>> {
        let step = |&(c, t): &(usize, u32)| {
            forward(w, &mut caches[c], &mut s, t, true, &mut ffn, None).expect("forward");
            s.logits.clone()
        };
        cols.iter().map(step).collect()
    };
    let prompt_cols: Vec<(usize, u32)> = (prompts.iter().enumerate())
        .flat_map(|(c, p)| p.iter().map(move |&t| (c, t)))
        .collect();
    let cols = [(2, 7), (0, 3), (2, 11), (1, 1)];
    let mut alone = fresh();
    feed(&mut alone, &prompt_cols);
    let want = feed(&mut alone, &cols);
    let mut caches = fresh();
    feed(&mut caches, &prompt_cols);
    let mut b = BatchState::default();
    let mut ffn = DenseFfn::new(w);
    forward_columns(
        w,
        &mut caches,
        &cols,
        &mut s,
        &mut b,
        Logits::All,
        &mut ffn,
        None,
    )
    .expect("forward_columns");
    let got: Vec<Vec<f32>> = (b.logits().chunks_exact(vocab))
        .map(<[f32]>::to_vec)
        .collect();
    assert!(
        got == want,
        "{name}: columns of several sequences change the logits"
    );
    let lens: Vec<usize> = caches.iter().map(KvCache::len).collect();
    assert_eq!(
        lens,
        [6, 3, 11],
        "{name}: each cache advances by its columns"
    );
}

#[test]
fn hf_models_run_columns_of_several_sequences_exactly() {
    for name in ["llama", "llama-tied", "qwen2", "opt", "opt-proj"] {
        let model = load(&common::fixture(&format!("hf/{name}"))).expect("loading");
        check_columns(&model.weights, name);
    }
}

#[test]
fn smollm2_runs_columns_of_several_sequences_exactly() {
    let Some(path) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let model = load(&path).expect("loading SmolLM2");
    check_columns(&model.weights, "SmolLM2");
}
