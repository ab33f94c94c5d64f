//! Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, qwen2 architecture: qkv bias, NEOX RoPE, Q4_K and
//! Q6_K blocks) against llama.cpp. Opt-in: the model is 1.1 GB, fetched with
//! `tools/fetch-model --qwen`; the test is skipped when it is absent, also in CI.

mod common;

use llmflash::engine::sampler::{Sampler, Sampling};
use llmflash::engine::{generate, Session};
use llmflash::model::load;

#[test]
fn greedy_continuations_match_llamacpp() {
    let Some(path) = common::model(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "tools/fetch-model --qwen (opt-in)",
    ) else {
        return;
    };
    let model = load(&path).expect("loading Qwen2.5-Coder");
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let fx = common::read_json(&common::fixture("llamacpp/qwen2.5-coder-1.5b-greedy.json"));
    let cases = fx["cases"].as_array().expect("cases");
    let mut matched = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let tokens = tok.encode(prompt, true, false);
        assert_eq!(
            tokens,
            common::u32s(&case["prompt_tokens"]),
            "prompt {prompt:?}"
        );
        let want = common::u32s(&case["tokens"]);
        let mut session = Session::new(&model.weights, 256);
        let mut sampler = Sampler::new(Sampling::Greedy);
        let is_end = |t| tok.is_end_of_generation(t);
        let gen = generate(
            &mut session,
            &tokens,
            want.len(),
            &mut sampler,
            is_end,
            |_| {},
        )
        .expect("generate");
        let same = gen
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("{prompt:?}: {same}/{} tokens as llama.cpp", want.len());
        if gen.tokens == want {
            matched += 1;
        }
    }
    assert_eq!(
        matched,
        cases.len(),
        "every Qwen continuation should match llama.cpp"
    );
}
