//! Speculative decoding: whatever the draft proposes, greedy output is plain greedy output,
//! token for token, on every architecture and FFN path; rejected drafts leave nothing behind
//! in the cache.

mod common;

use llmflash::backend::gpu::{GpuDecoder, GpuFlashDecoder, GpuFlashOptions};
use llmflash::backend::kv_cache::KvType;
use llmflash::draft::{
    self, Draft, DraftError, DraftOptions, ModelDraft, NgramDraft, Proposal, SelfDraft, Target,
};
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::engine::sampler::{argmax, Sampler, Sampling};
use llmflash::engine::Session;
use llmflash::image::BundleDtype;
use llmflash::model::load;
use llmflash::rng::Rng;

/// A draft that proposes `max` pseudo-random tokens, mostly wrong: every pass rolls back.
struct Noise(Rng, usize);

impl<T: Target + ?Sized> Draft<T> for Noise {
    fn propose(
        &mut self,
        _target: &mut T,
        history: &[u32],
        max: usize,
        _sampler: &mut Sampler,
        out: &mut Proposal,
    ) -> Result<(), DraftError> {
        for _ in 0..max {
            out.tokens.push(self.0.below(self.1) as u32);
        }
        // Sometimes the truth: the last token again, as a repetitive model would say.
        if let (Some(&t), Some(first)) = (history.last(), out.tokens.first_mut()) {
            if self.0.below(3) == 0 {
                *first = t;
            }
        }
        Ok(())
    }
}

fn greedy() -> Sampler {
    Sampler::new(Sampling::Greedy)
}

/// Greedy decoding one step at a time, written out here as the reference the loop must match.
fn plain(session: &mut Session, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut next = argmax(session.prefill(prompt).expect("prefill"));
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(session.step(next, true).expect("step"));
        out.push(next);
    }
    out
}

fn drafted<T: Target + ?Sized>(
    session: &mut T,
    d: &mut dyn Draft<T>,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    let opts = DraftOptions {
        max: 5,
        ..DraftOptions::default()
    };
    let g = draft::generate(
        session,
        Some((d, "test")),
        &opts,
        prompt,
        n,
        &mut greedy(),
        |_| false,
        |_| {},
    )
    .expect("speculative generate");
    let stats = g.stats.draft.expect("draft stats");
    assert!(stats.passes > 0, "{stats:?}");
    g.tokens
}

/// The HF fixtures (llama, tied, sharded, qwen2, OPT with and without projections): n-gram,
/// noise and the model itself as its own draft all give the plain greedy tokens.
#[test]
fn every_draft_keeps_greedy_tokens_on_the_hf_fixtures() {
    for name in ["llama", "llama-tied", "qwen2", "opt", "opt-proj"] {
        let m = load(&common::fixture(&format!("hf/{name}"))).expect("load fixture");
        let w = &m.weights;
        let vocab = w.config.vocab_size;
        // A repetitive prompt, so the n-gram lookup has something to propose.
        let mut prompt = common::tokens(12, vocab);
        prompt.extend_from_within(..);
        let n = 24;
        let ctx = prompt.len() + n + 1;
        let want = plain(&mut Session::new(w, ctx), &prompt, n);
        let mut s = Session::new(w, ctx);
        let got = drafted(&mut s, &mut NgramDraft::new(), &prompt, n);
        assert_eq!(got, want, "{name}: ngram");
        let mut s = Session::new(w, ctx);
        let got = drafted(&mut s, &mut Noise(Rng::new(7), vocab), &prompt, n);
        assert_eq!(got, want, "{name}: noise");
        let mut s = Session::new(w, ctx);
        let mut same = ModelDraft::new(Session::new(w, ctx), 0.0, 0);
        let got = drafted(&mut s, &mut same, &prompt, n);
        assert_eq!(got, want, "{name}: itself as the draft");
    }
}

/// Verify then truncate leaves the cache as if the rejected positions had never run: the
/// logits after any accepted prefix equal those of plain steps.
/// The GPU decoder as the target: its verify passes (every drafted position in one pass) and
/// truncations keep greedy tokens plain, with drafts mostly rejected (noise) or mostly
/// accepted (the model itself as its own draft), on every family of the HF fixtures.
#[test]
fn gpu_verify_passes_keep_greedy_tokens() {
    let Some(ctx) = common::gpu() else { return };
    for name in ["llama", "qwen2", "opt"] {
        let model = Model::open(&common::fixture(&format!("hf/{name}"))).expect("open");
        let vocab = model.weights.config.vocab_size;
        let prompt = common::tokens(12, vocab);
        let gpu = |width| GpuDecoder::with_verify(ctx, &model.weights, 64, KvType::F32, width);
        let mut dec = gpu(1).expect("decoder");
        let want = drafted(&mut dec, &mut draft::NoDraft, &prompt, 30);
        let mut dec = gpu(6).expect("decoder");
        let got = drafted(&mut dec, &mut Noise(Rng::new(7), vocab), &prompt, 30);
        assert_eq!(got, want, "{name}: noise drafts on the GPU");
        let own = model.session(64, None, None).expect("draft session");
        let mut own = ModelDraft::new(own, 0.0, 0);
        let mut dec = gpu(6).expect("decoder");
        let got = drafted(&mut dec, &mut own, &prompt, 30);
        assert_eq!(got, want, "{name}: the model as its own draft on the GPU");
    }
}

/// The GPU flash decoder as the target, with the predictor (the union of a pass's active sets
/// read once) and with every neuron, through a window of a quarter of each layer: noise,
/// prompt-lookup and model drafts keep its single steps' greedy tokens.
#[test]
fn gpu_flash_verify_passes_keep_greedy_tokens() {
    let Some(ctx) = common::gpu() else { return };
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "spec-gpu-flash",
        BundleDtype::F16,
    );
    let model = Model::open(&path).expect("open image");
    // The draft: the source model on the CPU (the same weights, dense).
    let source = Model::open(&common::fixture("hf/llama")).expect("open fixture");
    let vocab = model.weights.config.vocab_size;
    let layers = model.weights.config.n_layers;
    let slots = model.weights.config.intermediate_size / 4;
    let cal = common::calibrate(&model, &common::tokens(300, vocab), 0.5, 8);
    let mut prompt = common::tokens(8, vocab);
    prompt.extend_from_within(..);
    let image = model.image.as_ref().expect("an image");
    for predictors in [Some(cal.predictors.as_slice()), None] {
        let gpu = |verify_width| {
            let opts = GpuFlashOptions {
                window_slots: Some(vec![slots; layers]),
                pinned: Some(common::prefix_pins(&model, slots / 2)),
                overflow_slots: 7,
                io_threads: 2,
                verify_width,
                ..GpuFlashOptions::default()
            };
            GpuFlashDecoder::new(ctx, image, &model.weights, predictors, 64, opts).expect("decoder")
        };
        let what = if predictors.is_some() {
            "predictor"
        } else {
            "dense"
        };
        let want = drafted(&mut gpu(1), &mut draft::NoDraft, &prompt, 20);
        let got = drafted(&mut gpu(6), &mut Noise(Rng::new(5), vocab), &prompt, 20);
        assert_eq!(got, want, "{what}: noise drafts on the GPU flash path");
        let got = drafted(&mut gpu(6), &mut NgramDraft::new(), &prompt, 20);
        assert_eq!(got, want, "{what}: n-gram drafts on the GPU flash path");
        let own = source.session(64, None, None).expect("draft session");
        let got = drafted(&mut gpu(6), &mut ModelDraft::new(own, 0.0, 0), &prompt, 20);
        assert_eq!(
            got, want,
            "{what}: the model as its own draft on the GPU flash path"
        );
    }
    std::fs::remove_file(path).ok();
}

/// The GPU flash decoder's self draft (each FFN over the neurons its windows pin, a quarter
/// of each layer in a window of half), with the predictor and with every neuron: greedy tokens
/// are the plain ones, and it drafts. A decoder that pins nothing refuses to self-draft.
#[test]
fn gpu_flash_self_draft_keeps_greedy_tokens() {
    let Some(ctx) = common::gpu() else { return };
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "spec-gpu-self",
        BundleDtype::F16,
    );
    let model = Model::open(&path).expect("open image");
    let vocab = model.weights.config.vocab_size;
    let layers = model.weights.config.n_layers;
    let slots = model.weights.config.intermediate_size / 2;
    let cal = common::calibrate(&model, &common::tokens(300, vocab), 0.5, 8);
    let mut prompt = common::tokens(8, vocab);
    prompt.extend_from_within(..);
    let image = model.image.as_ref().expect("an image");
    for predictors in [Some(cal.predictors.as_slice()), None] {
        let gpu = |verify_width, pins| {
            let opts = GpuFlashOptions {
                window_slots: Some(vec![slots; layers]),
                pinned: pins,
                overflow_slots: 7,
                io_threads: 2,
                verify_width,
                ..GpuFlashOptions::default()
            };
            GpuFlashDecoder::new(ctx, image, &model.weights, predictors, 64, opts).expect("decoder")
        };
        let pins = || Some(common::prefix_pins(&model, slots / 2));
        let what = if predictors.is_some() {
            "predictor"
        } else {
            "dense"
        };
        let want = drafted(&mut gpu(1, pins()), &mut draft::NoDraft, &prompt, 16);
        let mut target = gpu(6, pins());
        let mut d = SelfDraft::new(&target, 0.0).expect("a self draft over the pins");
        let opts = DraftOptions {
            max: 5,
            min: 5,
            ..DraftOptions::default()
        };
        let g = draft::generate(
            &mut target,
            Some((&mut d, "self")),
            &opts,
            &prompt,
            16,
            &mut greedy(),
            |_| false,
            |_| {},
        )
        .expect("self-drafted generate");
        assert_eq!(g.tokens, want, "{what}: self drafts on the GPU flash path");
        let stats = g.stats.draft.expect("draft stats");
        assert!(
            stats.drafted > 0 && stats.verify_passes > 0,
            "{what}: {stats:?}"
        );
        assert!(target.draft_tokens() >= stats.drafted, "{what}: {stats:?}");
        let unpinned = gpu(6, None);
        assert!(!unpinned.can_self_draft());
        let err = SelfDraft::new(&unpinned, 0.0)
            .err()
            .expect("no pins refused");
        assert!(err.to_string().contains("pins none"), "{err}");
        assert!(unpinned.draft_neurons().iter().all(|&n| n == 0));
    }
    std::fs::remove_file(path).ok();
}

/// With every neuron pinned, a GPU draft step is the full model: its logits are a step's to
/// the bit (the same window pass over the same ids in the same order). It reads nothing,
/// counts in no flash counter, and after a truncate the next step is as if it never ran.
#[test]
fn gpu_flash_draft_step_over_every_neuron_is_a_step() {
    let Some(ctx) = common::gpu() else { return };
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "spec-gpu-draft-step",
        BundleDtype::F16,
    );
    let model = Model::open(&path).expect("open image");
    let vocab = model.weights.config.vocab_size;
    let n = model.weights.config.intermediate_size;
    let image = model.image.as_ref().expect("an image");
    let gpu = || {
        let opts = GpuFlashOptions {
            pinned: Some(common::prefix_pins(&model, n)),
            io_threads: 2,
            ..GpuFlashOptions::default()
        };
        GpuFlashDecoder::new(ctx, image, &model.weights, None, 64, opts).expect("decoder")
    };
    let prompt = common::tokens(6, vocab);
    let (mut a, mut b) = (gpu(), gpu());
    a.prefill(&prompt).expect("prefill");
    b.prefill(&prompt).expect("prefill");
    let before = a.flash_stats();
    let uploaded = a.uploaded();
    let drafted: Vec<f32> = a.draft_step(3).expect("draft step").to_vec();
    let next = a.draft_step_greedy(5).expect("greedy draft step");
    let after = a.flash_stats();
    assert_eq!(
        (
            after.tokens,
            after.bytes_read,
            after.neurons_needed,
            after.window_hits
        ),
        (
            before.tokens,
            before.bytes_read,
            before.neurons_needed,
            before.window_hits
        ),
        "a draft step moved the flash counters"
    );
    assert_eq!((a.uploaded(), a.draft_tokens()), (uploaded, 2));
    assert_eq!(a.position(), prompt.len() + 2);
    let stepped = b.step(3).expect("step").to_vec();
    assert_eq!(
        drafted, stepped,
        "a draft step over every neuron differs from a step"
    );
    assert_eq!(next, b.step_greedy(5).expect("greedy step"));
    a.truncate(prompt.len());
    b.truncate(prompt.len());
    let x = a.step(7).expect("step after the draft").to_vec();
    assert_eq!(x, b.step(7).expect("step"), "the draft left a trace");
    std::fs::remove_file(path).ok();
}

#[test]
fn truncated_verify_passes_leave_no_trace() {
    let m = load(&common::fixture("hf/llama")).expect("load fixture");
    let w = &m.weights;
    let vocab = w.config.vocab_size;
    let seq = common::tokens(40, vocab);
    let mut plain = Session::new(w, 64).with_kv_type(KvType::F32);
    let want: Vec<Vec<f32>> = seq
        .iter()
        .map(|&t| plain.step(t, true).expect("step").to_vec())
        .collect();
    let mut s = Session::new(w, 64).with_kv_type(KvType::F32);
    let mut rng = Rng::new(12345);
    let mut pos = 0;
    while pos < seq.len() {
        let n = 1 + rng.below(6);
        let keep = 1 + rng.below(n);
        let end = (pos + n).min(seq.len());
        // Verify real tokens up to `keep`, junk after: the junk is cut off.
        let mut batch = seq[pos..end].to_vec();
        let keep = keep.min(batch.len());
        for t in &mut batch[keep..] {
            *t = (*t + 1) % vocab as u32;
        }
        let rows = s.verify(&batch).expect("verify").to_vec();
        for k in 0..keep {
            assert_eq!(
                &rows[k * vocab..(k + 1) * vocab],
                &want[pos + k][..],
                "position {}",
                pos + k
            );
        }
        s.truncate(pos + keep);
        assert_eq!(s.position(), pos + keep);
        pos += keep;
    }
}

fn flash_options(
    strategy: Strategy,
    selection: Selection,
    model: &Model,
    slots: usize,
) -> FlashOptions {
    let layers = model.weights.config.n_layers;
    FlashOptions {
        strategy,
        selection,
        window_slots: Some(vec![slots; layers]),
        pinned: (strategy == Strategy::Flash).then(|| common::prefix_pins(model, slots)),
        io_threads: 3,
        ..FlashOptions::default()
    }
}

/// On a flash image, every strategy with the self draft (its pinned neurons), n-gram and noise
/// drafts: the plain tokens, with and without lookahead.
#[test]
fn flash_image_drafts_keep_greedy_tokens() {
    let path = common::to_image(&common::fixture("hf/llama"), "spec-llama", BundleDtype::F16);
    let model = Model::open(&path).expect("open image");
    let vocab = model.weights.config.vocab_size;
    let n_ffn = model.weights.config.intermediate_size;
    let mut prompt = common::tokens(10, vocab);
    prompt.extend_from_within(..);
    let n = 20;
    let ctx = prompt.len() + n + 1;
    let session = |opts: FlashOptions| {
        model
            .session(ctx, Some(opts), None)
            .expect("session")
            .with_kv_type(KvType::F32)
    };
    let reference = FlashOptions {
        strategy: Strategy::Resident,
        selection: Selection::All,
        ..FlashOptions::default()
    };
    let want = plain(&mut session(reference), &prompt, n);
    for (strategy, lookahead) in [
        (Strategy::Flash, true),
        (Strategy::Flash, false),
        (Strategy::Naive, false),
        (Strategy::Mmap, false),
    ] {
        let opts = FlashOptions {
            lookahead,
            ..flash_options(strategy, Selection::All, &model, n_ffn / 4)
        };
        let label = format!("{strategy:?}, lookahead {lookahead}");
        let mut s = session(opts.clone());
        assert_eq!(plain(&mut s, &prompt, n), want, "{label}: plain");
        let mut s = session(opts.clone());
        let got = drafted(&mut s, &mut NgramDraft::new(), &prompt, n);
        assert_eq!(got, want, "{label}: ngram");
        let mut s = session(opts.clone());
        let got = drafted(&mut s, &mut Noise(Rng::new(3), vocab), &prompt, n);
        assert_eq!(got, want, "{label}: noise");
        if strategy == Strategy::Flash {
            let mut s = session(opts);
            let mut d = draft::SelfDraft::new(&s, 0.0).expect("pinned neurons to draft from");
            let got = drafted(&mut s, &mut d, &prompt, n);
            assert_eq!(got, want, "{label}: self");
        }
    }
    std::fs::remove_file(path).ok();
}

/// With the predictor and the oracle (no lookahead: the verify pass reads the union of its
/// positions' active sets through a small window), every draft keeps the plain tokens.
#[test]
fn sparse_selections_verify_through_the_union_of_active_sets() {
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "spec-llama-sparse",
        BundleDtype::F16,
    );
    let model = Model::open(&path).expect("open image");
    let vocab = model.weights.config.vocab_size;
    let n_ffn = model.weights.config.intermediate_size;
    let cal = common::calibrate(&model, &common::tokens(256, vocab), 0.5, 8);
    let mut prompt = common::tokens(10, vocab);
    prompt.extend_from_within(..);
    let n = 20;
    let ctx = prompt.len() + n + 1;
    for selection in [Selection::Predictor, Selection::Oracle] {
        let session = |slots: usize| {
            let opts = FlashOptions {
                lookahead: false,
                ..flash_options(Strategy::Flash, selection, &model, slots)
            };
            model
                .session(ctx, Some(opts), Some(&cal))
                .expect("session")
                .with_kv_type(KvType::F32)
        };
        let want = plain(&mut session(n_ffn), &prompt, n);
        for slots in [n_ffn / 8, n_ffn / 2] {
            let label = format!("{selection:?}, {slots} slots");
            let mut s = session(slots);
            assert_eq!(plain(&mut s, &prompt, n), want, "{label}: plain");
            let mut s = session(slots);
            let got = drafted(&mut s, &mut Noise(Rng::new(5), vocab), &prompt, n);
            assert_eq!(got, want, "{label}: noise");
            let mut s = session(slots);
            let mut d = draft::SelfDraft::from_prompt(0.0, n_ffn / 4);
            let got = drafted(&mut s, &mut d, &prompt, n);
            assert_eq!(got, want, "{label}: self from the prompt");
            // The selection ran: fewer neurons than every neuron of every layer and position.
            let st = s.ffn().flash_stats().expect("flash");
            let layers = model.weights.config.n_layers as u64;
            let all = st.tokens * layers * n_ffn as u64;
            assert!(st.neurons_needed < all, "{label}: {st:?}");
        }
    }
    std::fs::remove_file(path).ok();
}

/// A session that pins nothing has nothing to self-draft from, and says so.
#[test]
fn self_draft_needs_pinned_neurons() {
    let m = load(&common::fixture("hf/llama")).expect("load fixture");
    let s = Session::new(&m.weights, 16);
    let err = draft::SelfDraft::new(&s, 0.0).err().expect("refused");
    assert!(err.to_string().contains("pins"), "{err}");
}

/// Runs `llmflash ARGS`; returns its status, stdout and stderr.
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .output()
        .expect("running llmflash");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Greedy tokens and stats of `llmflash generate --json` on `model` with `extra`.
fn cli_tokens(model: &str, prompt: &str, extra: &[&str]) -> (Vec<u32>, serde_json::Value) {
    let mut args = vec!["generate", "-m", model, "-p", prompt, "-n", "24"];
    args.extend(["--json", "--greedy", "--ignore-eos"]);
    args.extend(extra);
    let (ok, out, err) = cli(&args);
    assert!(ok, "llmflash {args:?} failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    (common::u32s(&v["tokens"]), v["stats"].clone())
}

const CODE_PROMPT: &str =
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n";

/// SmolLM2 from its GGUF with n-gram drafts and itself as a draft model, and from its flash
/// image under a tight budget with self and n-gram drafts, computing every neuron: the
/// tokens of `--draft none`, with the drafts counted in the stats.
#[test]
fn smollm2_drafts_keep_greedy_tokens_from_the_command_line() {
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let g = gguf.to_str().expect("utf-8 path");
    let (want, _) = cli_tokens(g, CODE_PROMPT, &[]);
    for d in ["ngram", g] {
        let (got, stats) = cli_tokens(g, CODE_PROMPT, &["--draft", d]);
        assert_eq!(got, want, "--draft {d}");
        let ds = &stats["draft"];
        assert!(ds["passes"].as_u64().unwrap() > 0, "{stats}");
    }
    // Itself as its draft agrees everywhere: several tokens per pass.
    let (_, stats) = cli_tokens(g, CODE_PROMPT, &["--draft", g, "--draft-p-min", "0"]);
    assert!(stats["draft"]["accepted"].as_u64().unwrap() > 0, "{stats}");

    let path = common::to_image(&gguf, "spec-smollm2", BundleDtype::Source);
    let image = path.to_str().expect("utf-8 path");
    let budget = ["--memory-budget", "64MiB", "--dense"];
    let (want, _) = cli_tokens(image, CODE_PROMPT, &budget);
    for d in ["self", "ngram"] {
        let mut args = budget.to_vec();
        args.extend(["--draft", d, "--draft-p-min", "0"]);
        let (got, stats) = cli_tokens(image, CODE_PROMPT, &args);
        assert_eq!(got, want, "{args:?}");
        assert!(
            stats["draft"]["verify_passes"].as_u64().unwrap() > 0,
            "{stats}"
        );
    }
    // Calibrated, with the predictor and the oracle: verify passes read the union of their
    // positions' active sets.
    let model = Model::open(&path).expect("open image");
    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let cal = common::calibrate(&model, &tok.encode(&text, false, false)[..384], 0.5, 16);
    drop(model);
    cal.save(&path).expect("save the calibration");
    for selection in ["--predictor", "--oracle"] {
        let args = ["--memory-budget", "78MiB", selection];
        let (want, stats) = cli_tokens(image, CODE_PROMPT, &args);
        let name = if selection == "--oracle" {
            "oracle"
        } else {
            "predictor"
        };
        assert_eq!(stats["flash"]["selection"], name, "{stats}");
        for d in ["self", "ngram"] {
            let mut with = args.to_vec();
            with.extend(["--draft", d, "--draft-p-min", "0"]);
            let (got, stats) = cli_tokens(image, CODE_PROMPT, &with);
            assert_eq!(got, want, "{with:?}");
            assert!(stats["draft"]["drafted"].as_u64().unwrap() > 0, "{stats}");
        }
    }
    std::fs::remove_file(path).ok();
}

/// A draft model must share the target's vocabulary.
#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let Some(gguf) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let other = common::fixture("hf/llama");
    let args = [
        "generate",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "Hi",
        "--draft",
        other.to_str().unwrap(),
    ];
    let (ok, _, err) = cli(&args);
    assert!(
        !ok,
        "a 256-token draft was accepted for a 49152-token model"
    );
    assert!(err.contains("vocabular"), "{err}");
}

/// Speculative sampling end to end: a tiny llama drafted by another tiny llama (same
/// vocabulary, other weights), temperature 1. The second token's distribution over many
/// seeded draws must match the target's exact marginal `sum_t0 p(t0) p(t1 | t0)` by a
/// chi-square test (bins with fewer than 5 expected draws merged).
#[test]
fn speculative_sampling_keeps_the_target_distribution_end_to_end() {
    let target = load(&common::fixture("hf/llama")).expect("target");
    let other = load(&common::fixture("hf/llama-tied")).expect("draft");
    let (tw, dw) = (&target.weights, &other.weights);
    let vocab = tw.config.vocab_size;
    let prompt = common::tokens(6, vocab);
    let sampling = |seed| Sampling::Random {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed,
    };
    let probe = Sampler::new(sampling(0));
    // The exact marginal of the second token.
    let mut s = Session::new(tw, 16).with_kv_type(KvType::F32);
    let first = probe.distribution(s.prefill(&prompt).expect("prefill"));
    let mut expected = vec![0.0f64; vocab];
    for (&t0, &p0) in first.ids.iter().zip(&first.probs) {
        s.truncate(prompt.len());
        let second = probe.distribution(s.step(t0, true).expect("step"));
        for (&t1, &p1) in second.ids.iter().zip(&second.probs) {
            expected[t1 as usize] += p0 * p1;
        }
    }
    let draws = 6000u64;
    let mut counts = vec![0u64; vocab];
    let opts = DraftOptions {
        max: 1,
        min: 1,
        p_min: 0.0,
    };
    let mut accepted = 0;
    for seed in 0..draws {
        let mut session = Session::new(tw, 16).with_kv_type(KvType::F32);
        let mut d = ModelDraft::new(Session::new(dw, 16).with_kv_type(KvType::F32), 0.0, 0);
        let mut sampler = Sampler::new(sampling(seed + 1));
        let g = draft::generate(
            &mut session,
            Some((&mut d, "tied")),
            &opts,
            &prompt,
            2,
            &mut sampler,
            |_| false,
            |_| {},
        )
        .expect("generate");
        accepted += g.stats.draft.expect("stats").accepted;
        counts[g.tokens[1] as usize] += 1;
    }
    // Both outcomes occur, so the test exercises acceptance and the residual.
    assert!(
        accepted > draws / 20 && accepted < draws * 19 / 20,
        "{accepted}"
    );
    let (mut chi, mut bins, mut rest_e, mut rest_c) = (0.0, 0usize, 0.0, 0u64);
    for (&p, &c) in expected.iter().zip(&counts) {
        let e = p * draws as f64;
        if e < 5.0 {
            rest_e += e;
            rest_c += c;
            continue;
        }
        chi += (c as f64 - e).powi(2) / e;
        bins += 1;
    }
    if rest_e > 0.0 {
        chi += (rest_c as f64 - rest_e).powi(2) / rest_e;
        bins += 1;
    }
    // Wilson-Hilferty: the chi-square quantile at 0.999 for `bins - 1` degrees of freedom.
    let k = (bins - 1) as f64;
    let z = 3.09;
    let limit = k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3);
    assert!(
        chi < limit,
        "chi2 {chi:.1} over {bins} bins, limit {limit:.1}"
    );
}
