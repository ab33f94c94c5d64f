//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF): llama.cpp writes its 896-wide rows (attention,
//! FFN gate and up, the embeddings) in Q5_0, so this is the Q5_0 kernels on a real model.
//! Opt-in: fetched with `tools/fetch-model --qwen-0.5b`; skipped when absent, also under
//! `LLMFLASH_REQUIRE_MODELS=1` (CI fetches only the default model).
//!
//! Against llama.cpp run with `--no-repack` (`tools/record-llamacpp-fixtures.sh`; its Q4_K/Q6_K
//! down matrices otherwise go through repacked tiles that sum in another order): greedy tokens
//! and log-probabilities, and perplexity. Also our own greedy output pinned, and a perplexity
//! bound.

mod common;

use llmflash::backend::cpu::ops::log_softmax_at;
use llmflash::draft::{generate, DraftOptions};
use llmflash::engine::perplexity::perplexity;
use llmflash::engine::sampler::{Sampler, Sampling};
use llmflash::engine::Session;
use llmflash::model::{load, LoadedModel};

const MODEL: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// llama.cpp with `--no-repack`: greedy continuations with their top-5 log-probabilities.
const LLAMACPP: &str = "llamacpp/qwen2.5-coder-0.5b-greedy-norepack.json";
/// `llama-perplexity --no-repack` over tests/fixtures/text/python-doc-eval.txt at ctx 512.
const LLAMACPP_PPL: &str = "llamacpp/qwen2.5-coder-0.5b-perplexity.json";

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
            None,
            &DraftOptions::default(),
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

/// llama.cpp prefills a batch of 8 or more tokens through K-quant GEMM tiles that sum in another
/// order than its row kernels (which we reproduce); shorter prompts are exact references.
const TILED_MIN_BATCH: usize = 8;

#[test]
fn greedy_continuations_match_llamacpp() {
    let Some(model) = qwen05() else { return };
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let fx = common::read_json(&common::fixture(LLAMACPP));
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let tokens = tok.encode(prompt, true, false);
        assert_eq!(tokens, common::u32s(&case["prompt_tokens"]), "{prompt:?}");
        let want = common::u32s(&case["tokens"]);
        let mut session = Session::new(&model.weights, 256);
        let mut sampler = Sampler::new(Sampling::Greedy);
        let gen = generate(
            &mut session,
            None,
            &DraftOptions::default(),
            &tokens,
            want.len(),
            &mut sampler,
            |t| tok.is_end_of_generation(t),
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
        assert_eq!(gen.tokens, want, "{prompt:?}: not llama.cpp's continuation");
    }
}

/// Teacher-forced along llama.cpp's tokens after its short prompts, our log-probabilities of
/// its top-5 are its own: what remains is llama-server's f32 log-softmax over 151936 logits.
#[test]
fn logprobs_equal_llamacpp_after_short_prompts() {
    let Some(model) = qwen05() else { return };
    let fx = common::read_json(&common::fixture(LLAMACPP));
    let mut gaps = Vec::new();
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = common::u32s(&case["prompt_tokens"]);
        if prompt.len() >= TILED_MIN_BATCH {
            continue;
        }
        let mut session = Session::new(&model.weights, 256);
        let mut logits = session.prefill(&prompt).expect("prefill").to_vec();
        let steps = case["top"].as_array().expect("top");
        for (five, &token) in steps.iter().zip(&common::u32s(&case["tokens"])) {
            for t in five.as_array().expect("top-5") {
                let id = t["id"].as_u64().expect("id") as usize;
                let want = t["logprob"].as_f64().expect("logprob");
                gaps.push((log_softmax_at(&logits, id) - want).abs());
            }
            logits = session.step(token, true).expect("step").to_vec();
        }
    }
    assert!(!gaps.is_empty());
    gaps.sort_by(f64::total_cmp);
    let (median, p90) = (gaps[gaps.len() / 2], gaps[gaps.len() * 9 / 10]);
    eprintln!("Qwen 0.5B log-prob gap to llama.cpp: median {median:.1e}, p90 {p90:.1e}");
    assert!(median <= 1e-3 && p90 <= 1e-2, "median {median}, p90 {p90}");
}

/// The first two windows' perplexity within 1% of llama-perplexity's running estimate after
/// two chunks (its 512-token batches go through GEMM tiles, ours through the row kernels).
#[test]
fn perplexity_matches_llamacpp() {
    let Some(model) = qwen05() else { return };
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let fx = common::read_json(&common::fixture(LLAMACPP_PPL));
    let want = fx["running"][1]
        .as_f64()
        .expect("running ppl after 2 chunks");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let tokens = tok.encode(&text, true, false);
    assert_eq!(
        tokens.len() as u64,
        fx["text_tokens"].as_u64().expect("text_tokens")
    );
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let mut session = Session::new(&model.weights, 512);
    let got = perplexity(&mut session, &tokens, 512, bos, Some(2), |_, _| {}).expect("ppl");
    let rel = (got.ppl - want).abs() / want;
    eprintln!(
        "ppl (2 chunks) ours {:.4}, llama.cpp {want:.4} ({:.3}% apart)",
        got.ppl,
        rel * 100.0
    );
    assert!(
        rel < 0.01,
        "perplexity {:.4} vs llama.cpp {want:.4}",
        got.ppl
    );
}
