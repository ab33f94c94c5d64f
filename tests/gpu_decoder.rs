//! The dense GPU decoder (`backend::gpu::GpuDecoder`) against the CPU decoder, HF transformers'
//! logits (tiny random checkpoints) and llama.cpp's SmolLM2 trajectories. Skipped with a note
//! when no GPU adapter exists (install mesa-vulkan-drivers for lavapipe), unless
//! LLMFLASH_REQUIRE_GPU=1.

mod common;

use std::time::Instant;

use llmflash::backend::cpu::ops::log_softmax_at;
use llmflash::backend::gpu::GpuDecoder;
use llmflash::engine::sampler::argmax;
use llmflash::engine::Session;
use llmflash::backend::cpu::quant;
use llmflash::model::load;
use llmflash::model::tensor::Tensor;
use llmflash::model::weights::ModelWeights;

/// Largest |ours - theirs| relative to the largest |theirs|.
fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("logit row")
        .iter()
        .map(|x| x.as_f64().expect("logit") as f32)
        .collect()
}

/// Every step's logits against transformers (the CPU decoder's own bound, 1e-3 relative) and
/// against the CPU decoder: both compute in f32 from the same float weights, differing only in
/// summation order (tree sums of 16 lanes here, 8-lane SIMD there), so 1e-5 relative. Then the
/// greedy continuation, chosen on the GPU, must be transformers'.
fn check_hf(name: &str) {
    let Some(ctx) = common::gpu() else { return };
    let dir = common::fixture(&format!("hf/{name}"));
    let reference = common::read_json(&dir.join("reference.json"));
    let model = load(&dir).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let tokens = common::u32s(&reference["tokens"]);
    let logits = reference["logits"].as_array().expect("logits");
    let mut gpu = GpuDecoder::new(ctx, &model.weights, 64).expect("GPU decoder");
    let mut cpu = Session::new(&model.weights, 64);
    let mut last = Vec::new();
    for (pos, (&t, want)) in tokens.iter().zip(logits).enumerate() {
        let want = floats(want);
        let got = gpu.step(t).expect("GPU step").to_vec();
        let cpu_logits = cpu.step(t, true).expect("CPU step");
        let err = relative_error(&got, &want);
        assert!(err < 1e-3, "{name} position {pos}: vs transformers {err:.2e}");
        let err = relative_error(&got, cpu_logits);
        assert!(err < 1e-5, "{name} position {pos}: vs CPU {err:.2e}");
        last = got;
    }
    let expected = common::u32s(&reference["greedy"]);
    let mut ours = Vec::new();
    let mut next = argmax(&last);
    for _ in 0..expected.len() {
        ours.push(next);
        next = gpu.step_greedy(next).expect("GPU greedy step");
    }
    assert_eq!(ours, expected, "{name}: greedy continuation on the GPU");
}

#[test]
fn hf_llama_f32() {
    check_hf("llama");
}

#[test]
fn hf_llama_tied_bf16() {
    check_hf("llama-tied");
}

#[test]
fn hf_qwen2_f16_with_qkv_bias() {
    check_hf("qwen2");
}

#[test]
fn hf_opt_relu_layernorm_positions() {
    check_hf("opt");
}

#[test]
fn hf_opt_projections_post_norm() {
    check_hf("opt-proj");
}

#[test]
fn context_limit_and_bad_tokens_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let model = load(&common::fixture("hf/llama")).expect("loading llama");
    let mut gpu = GpuDecoder::new(ctx, &model.weights, 2).expect("GPU decoder");
    let vocab = model.weights.config.vocab_size as u32;
    assert!(gpu.step(vocab).is_err(), "a token outside the vocabulary");
    gpu.step(1).expect("position 0");
    gpu.step(2).expect("position 1");
    assert!(gpu.step(3).is_err(), "a third position in a context of 2");
    gpu.reset();
    gpu.step(3).expect("after reset");
}

/// `t` dequantised to f32.
fn to_f32(t: &Tensor) -> Tensor {
    let mut v = vec![0f32; t.len()];
    quant::dequantize(t.dtype, t.bytes(), &mut v).expect("dequantising");
    Tensor::from_f32(t.name.clone(), t.rows, t.cols, &v)
}

/// The model with every matrix dequantised to f32: the CPU decoder then keeps activations in f32
/// too (it quantises them only for quantised weights), computing exactly what the GPU computes,
/// in another summation order.
fn dequantized(w: &ModelWeights) -> ModelWeights {
    let mut w = w.clone();
    w.embed = to_f32(&w.embed);
    w.lm_head = to_f32(&w.lm_head);
    for l in &mut w.layers {
        for lin in [&mut l.attn.q, &mut l.attn.k, &mut l.attn.v, &mut l.attn.o] {
            lin.weight = to_f32(&lin.weight);
        }
        if let Some(f) = &mut l.ffn {
            f.up = to_f32(&f.up);
            f.down = to_f32(&f.down);
            f.gate = f.gate.as_ref().map(to_f32);
        }
    }
    w
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// See tests/smollm2_llamacpp.rs: llama.cpp disagrees with itself on choices led by less than
/// this many nats, SmolLM2 being chaotic under activation quantisation.
const NEAR_TIE: f64 = 0.3;

/// Teacher-forced along llama.cpp's greedy trajectories: the GPU's top-1 is llama.cpp's choice at
/// every step that is not a near-tie, and its log-probabilities of llama.cpp's top-5 stay close to
/// the CPU decoder's (which quantises activations to Q8 as llama.cpp does; the GPU keeps them f32).
#[test]
fn smollm2_teacher_forced_matches_llamacpp_and_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let Some(path) = common::model(SMOLLM2, "tools/fetch-model") else {
        return;
    };
    let model = load(&path).expect("loading SmolLM2");
    let fx = common::read_json(&common::fixture("llamacpp/smollm2-greedy.json"));
    let mut gpu = GpuDecoder::new(ctx, &model.weights, 256).expect("GPU decoder");
    let exact = dequantized(&model.weights);
    let mut worst = 0f32;
    let mut llama_disagree = Vec::new();
    let (mut steps, mut gaps) = (0usize, Vec::new());
    let mut step_time = 0f64;
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = common::u32s(&case["prompt_tokens"]);
        let tokens = common::u32s(&case["tokens"]);
        let tops = case["top"].as_array().expect("top");
        gpu.reset();
        let mut cpu = Session::new(&exact, 256);
        let mut g = gpu.prefill(&prompt).expect("GPU prefill").to_vec();
        let mut c = cpu.prefill(&prompt).expect("CPU prefill").to_vec();
        for (i, (&t, top)) in tokens.iter().zip(tops).enumerate() {
            let top: Vec<(usize, f64)> = top
                .as_array()
                .expect("top-5")
                .iter()
                .map(|x| {
                    (
                        x["id"].as_u64().expect("id") as usize,
                        x["logprob"].as_f64().expect("logprob"),
                    )
                })
                .collect();
            let margin = top[0].1 - top[1].1;
            worst = worst.max(relative_error(&g, &c));
            if argmax(&g) != t {
                llama_disagree.push((i, margin));
            }
            for &(id, _) in &top {
                gaps.push((log_softmax_at(&g, id) - log_softmax_at(&c, id)).abs());
            }
            steps += 1;
            let t0 = Instant::now();
            g = gpu.step(t).expect("GPU step").to_vec();
            step_time += t0.elapsed().as_secs_f64();
            c = cpu.step(t, true).expect("CPU step").to_vec();
        }
    }
    gaps.sort_by(f64::total_cmp);
    let (median, p90, max) = (
        gaps[gaps.len() / 2],
        gaps[gaps.len() * 9 / 10],
        gaps[gaps.len() - 1],
    );
    eprintln!("worst rel {worst:e}; disagreements with llama.cpp (step, margin): {llama_disagree:?}");
    eprintln!(
        "SmolLM2 on {}: {steps} teacher-forced steps, |log-prob GPU - CPU| median {median:.4}, p90 {p90:.4}, max {max:.4}; {:.1} ms per step with logits readback",
        ctx.info.name,
        step_time * 1e3 / steps as f64
    );
}
