//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF): llama.cpp writes its 896-wide rows (attention,
//! FFN gate and up, the embeddings) in Q5_0, so this is the Q5_0 kernels on a real model.
//! Opt-in: fetched with `tools/fetch-model --qwen-0.5b`; skipped when absent, also under
//! `LLMFLASH_REQUIRE_MODELS=1` (CI fetches only the default model).
//!
//! No llama.cpp reference is recorded for it: the tests pin our own greedy output (a change
//! in the arithmetic shows up as a change of tokens) and bound the perplexity.

mod common;

use llmflash::engine::perplexity::perplexity;
use llmflash::engine::sampler::{Sampler, Sampling};
use llmflash::engine::{generate, Session};
use llmflash::model::{load, LoadedModel};

const MODEL: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

fn qwen05() -> Option<LoadedModel> {
    let path = common::model(MODEL, "tools/fetch-model --qwen-0.5b (opt-in)")?;
    Some(load(&path).expect("loading Qwen2.5-Coder-0.5B"))
}

/// Prompt, then the first greedy tokens and their text, recorded from this engine (and read
/// to be sensible code). The second prompt is long enough for the batched prefill kernels.
const CASES: &[(&str, &[u32], &str)] = &[
    (
        "def fibonacci(n):",
        &[
            198, 262, 421, 308, 2651, 220, 15, 510, 286, 470, 330, 7928, 1946, 698, 262, 4409,
            308, 621, 220, 16, 510, 286, 470, 220, 15, 198, 262, 4409, 308, 621, 220, 17,
        ],
        "\n    if n <= 0:\n        return \"Invalid input\"\n    elif n == 1:\n        return 0\n    elif n == 2",
    ),
    (
        "# Return the sum of the squares of a list of integers.\ndef sum_of_squares(xs):",
        &[
            715, 262, 470, 2629, 2075, 334, 17, 369, 856, 304, 11943, 8, 4710, 2, 3393, 279, 729,
            198, 1350, 19713, 3575, 643, 40856, 2561, 16, 11, 220, 17, 11, 220, 18, 11,
        ],
        " \n    return sum(x**2 for x in xs) \n\n# Test the function\nprint(sum_of_squares([1, 2, 3,",
    ),
];

#[test]
fn greedy_continuations_are_stable() {
    let Some(model) = qwen05() else { return };
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    for &(prompt, want, text) in CASES {
        let tokens = tok.encode(prompt, true, false);
        let mut session = Session::new(&model.weights, 256);
        let mut sampler = Sampler::new(Sampling::Greedy);
        let gen = generate(
            &mut session,
            &tokens,
            32,
            &mut sampler,
            |t| tok.is_end_of_generation(t),
            |_| {},
        )
        .expect("generate");
        let got = tok.decode(&gen.tokens);
        eprintln!("{prompt:?} -> {:?}\n{got:?}", gen.tokens);
        assert_eq!(gen.tokens, want, "{prompt:?}: greedy tokens changed");
        assert_eq!(got, text);
    }
}

/// Perplexity of the first windows of the python-doc excerpt (the whole text takes minutes on
/// two cores). Measured 5.8969 with these settings (the whole text, 11 windows: 5.6147); the
/// bound leaves room for a change of summation order (`--activations f32` is within 1%), not
/// for a broken kernel (a wrong fifth bit, say, costs far more).
#[test]
fn perplexity_is_low() {
    let Some(model) = qwen05() else { return };
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let tokens = tok.encode(&text, true, false);
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let ctx = 512;
    let mut session = Session::new(&model.weights, ctx);
    let got = perplexity(&mut session, &tokens, ctx, bos, Some(2), |_, _| {}).expect("ppl");
    eprintln!(
        "Qwen2.5-Coder-0.5B ppl over {} chunks: {:.4}",
        got.chunks, got.ppl
    );
    assert_eq!(got.chunks, 2);
    assert!(got.ppl < 6.0, "perplexity {:.4}", got.ppl);
}
