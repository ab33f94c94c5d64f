//! Several sequences decoded together (`BatchDecoder`): whatever joins or leaves when, each
//! sequence's greedy tokens and logits are those of decoding it alone in a `Session`, to the
//! bit, with the weights resident and on the flash path (every neuron, or the predictor's);
//! batching reads each layer's bundles once for all the sequences of a step; bad input is
//! refused with an error, never a panic.

mod common;

use llmflash::engine::batch::{BatchDecoder, SeqId};
use llmflash::engine::flash::{FlashOptions, Selection, Strategy};
use llmflash::engine::model::Model;
use llmflash::engine::sampler::{Sampler, Sampling};
use llmflash::engine::{EngineError, Session};
use llmflash::image::BundleDtype;

/// Tokens each sequence generates (one leaves early).
const NEW: usize = 16;
const CTX: usize = 64;

fn greedy(logits: &[f32]) -> u32 {
    Sampler::new(Sampling::Greedy).sample(logits)
}

/// Greedy tokens after `prompt` decoded alone, and the logits each was chosen from.
fn alone(mut s: Session, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![s.prefill(prompt).expect("prefill").to_vec()];
    let mut tokens = vec![greedy(&logits[0])];
    while tokens.len() < n {
        let l = s
            .step(*tokens.last().expect("a token"), true)
            .expect("step");
        tokens.push(greedy(l));
        logits.push(l.to_vec());
    }
    (tokens, logits)
}

/// A request of the batched run: when it joins (after how many steps), how many tokens it
/// wants, and what it got.
struct Request {
    prompt: Vec<u32>,
    joins: usize,
    wants: usize,
    id: Option<SeqId>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

impl Request {
    fn new(prompt: Vec<u32>, joins: usize, wants: usize) -> Request {
        let (id, tokens, logits) = (None, Vec::new(), Vec::new());
        Request {
            prompt,
            joins,
            wants,
            id,
            tokens,
            logits,
        }
    }

    fn take(&mut self, logits: &[f32]) {
        self.tokens.push(greedy(logits));
        self.logits.push(logits.to_vec());
    }

    fn running(&self) -> bool {
        self.id.is_some() && self.tokens.len() < self.wants
    }
}

/// Five requests through a batch of four slots: two from the start, one joining after 3
/// steps, one after 5; the second leaves after 6 tokens and a fifth request takes its slot.
fn requests(vocab: usize) -> Vec<Request> {
    let prompt = |n: usize, salt: u32| -> Vec<u32> {
        let t = common::tokens(n + salt as usize, vocab);
        t[salt as usize..].to_vec()
    };
    vec![
        Request::new(prompt(5, 0), 0, NEW),
        Request::new(prompt(9, 3), 0, 6),
        Request::new(prompt(3, 7), 3, NEW),
        Request::new(prompt(12, 1), 5, NEW),
        Request::new(prompt(4, 11), 7, NEW),
    ]
}

/// Adds the requests due at `step` whose slot is free, prefilling each.
fn join(batch: &mut BatchDecoder, reqs: &mut [Request], step: usize) {
    for r in reqs.iter_mut() {
        if r.id.is_some() || !r.tokens.is_empty() || r.joins > step {
            continue;
        }
        let Some(id) = batch.add() else { continue };
        let logits = batch.prefill(id, &r.prompt).expect("prefill");
        r.take(logits);
        r.id = Some(id);
    }
}

/// Removes the requests that have all their tokens; the stale id is refused afterwards.
fn leave(batch: &mut BatchDecoder, reqs: &mut [Request]) {
    for r in reqs.iter_mut().filter(|r| r.id.is_some() && !r.running()) {
        let id = r.id.take().expect("an id");
        batch.remove(id).expect("remove");
        let err = batch.position(id).expect_err("a removed sequence");
        assert!(matches!(err, EngineError::UnknownSequence(_)), "{err}");
    }
}

/// Runs the requests' schedule through `batch`; returns how many steps it took.
fn run(batch: &mut BatchDecoder, reqs: &mut [Request]) -> usize {
    let mut step = 0;
    loop {
        join(batch, reqs, step);
        leave(batch, reqs);
        let inputs: Vec<(SeqId, u32)> = (reqs.iter())
            .filter(|r| r.running())
            .map(|r| (r.id.expect("running"), *r.tokens.last().expect("prefilled")))
            .collect();
        if inputs.is_empty() && reqs.iter().all(|r| !r.tokens.is_empty()) {
            return step;
        }
        let vocab = batch.weights().config.vocab_size;
        let rows = batch.step(&inputs).expect("step").to_vec();
        assert_eq!(rows.len(), inputs.len() * vocab);
        let mut rows = rows.chunks_exact(vocab);
        for r in reqs.iter_mut().filter(|r| r.running()) {
            r.take(rows.next().expect("one row per input"));
        }
        step += 1;
    }
}

/// The batched schedule against each request decoded alone in a session from `session`.
fn check<'m>(what: &str, session: impl Fn() -> Session<'m>) {
    let vocab = session().weights().config.vocab_size;
    let mut reqs = requests(vocab);
    let mut batch = session().into_batch(4);
    let steps = run(&mut batch, &mut reqs);
    assert!(steps >= NEW, "{what}: {steps} steps");
    assert_eq!(batch.active().count(), 0, "{what}: every request left");
    for (i, r) in reqs.iter().enumerate() {
        let (tokens, logits) = alone(session(), &r.prompt, r.wants);
        assert_eq!(r.tokens, tokens, "{what}: request {i}'s tokens");
        assert!(r.logits == logits, "{what}: request {i}'s logits");
    }
}

/// Prompts of several lengths, one longer than a prefill batch (64 columns) so that the
/// shared passes cut through prompts.
fn mixed_prompts(vocab: usize) -> Vec<Vec<u32>> {
    let all = common::tokens(120, vocab);
    vec![
        all[..70].to_vec(),
        all[70..75].to_vec(),
        all[75..76].to_vec(),
        all[76..109].to_vec(),
    ]
}

/// Prompts prefilled together (`prefill_many`) give each one's logits as prefilled alone, to
/// the bit, and leave each cache as alone (the next step's logits agree too); returns the
/// flash bytes read together and one after another.
fn check_prefill_many<'m>(what: &str, session: impl Fn() -> Session<'m>) -> (u64, u64) {
    let vocab = session().weights().config.vocab_size;
    let prompts = mixed_prompts(vocab);
    let mut batch = session().into_batch(prompts.len());
    let ids: Vec<SeqId> = prompts.iter().map(|_| batch.add().expect("slot")).collect();
    let together: Vec<(SeqId, &[u32])> = (ids.iter().copied())
        .zip(prompts.iter().map(Vec::as_slice))
        .collect();
    let read = |b: &BatchDecoder| b.flash_stats().map_or(0, |s| s.bytes_read);
    let before = read(&batch);
    let rows = batch
        .prefill_many(&together)
        .expect("prefill_many")
        .to_vec();
    let shared = read(&batch) - before;
    assert_eq!(
        rows.len(),
        prompts.len() * vocab,
        "{what}: one row per prompt"
    );
    let firsts: Vec<(SeqId, u32)> = (ids.iter().copied())
        .zip(rows.chunks_exact(vocab).map(greedy))
        .collect();
    let next = batch.step(&firsts).expect("step").to_vec();
    let mut apart = session().into_batch(1);
    let mut separate = 0;
    for (i, p) in prompts.iter().enumerate() {
        let (tokens, logits) = alone(session(), p, 2);
        assert!(
            rows[i * vocab..(i + 1) * vocab] == logits[0][..],
            "{what}: prompt {i}'s logits prefilled together"
        );
        assert_eq!(firsts[i].1, tokens[0], "{what}: prompt {i}'s first token");
        assert!(
            next[i * vocab..(i + 1) * vocab] == logits[1][..],
            "{what}: prompt {i}'s next step after prefilling together"
        );
        let id = apart.add().expect("slot");
        let before = read(&apart);
        apart.prefill(id, p).expect("prefill");
        separate += read(&apart) - before;
        apart.remove(id).expect("remove");
    }
    eprintln!("{what}: prefilled together read {shared} B, one after another {separate} B");
    (shared, separate)
}

/// A sequence named twice gets its prompts back to back; a bad prompt anywhere is refused
/// before anything runs.
#[test]
fn prefill_many_checks_everything_first_and_chains_a_repeated_sequence() {
    let model = Model::open(&common::fixture("hf/llama")).expect("open fixture");
    let vocab = model.weights.config.vocab_size;
    let session = || model.session(16, None, None).expect("session");
    let mut batch = session().into_batch(2);
    let (a, b) = (batch.add().expect("slot"), batch.add().expect("slot"));
    let rows = (batch.prefill_many(&[(a, &[1, 2, 3]), (b, &[4]), (a, &[5, 6])]))
        .expect("prefill_many")
        .to_vec();
    assert_eq!(rows.len(), 3 * vocab);
    assert_eq!(
        (batch.position(a).unwrap(), batch.position(b).unwrap()),
        (5, 1)
    );
    let (_, chained) = alone(session(), &[1, 2, 3, 5, 6], 1);
    assert!(
        rows[2 * vocab..] == chained[0][..],
        "a's two prompts in a row"
    );
    let (_, first) = alone(session(), &[1, 2, 3], 1);
    assert!(rows[..vocab] == first[0][..], "a's first prompt");
    for (prompts, what) in [
        (vec![(b, &[7u32][..]), (a, &[][..])], "an empty prompt"),
        (vec![(b, &[7][..]), (a, &[vocab as u32][..])], "a bad token"),
        (vec![(b, &[7][..]), (a, &[1; 12][..])], "a full context"),
    ] {
        let err = batch.prefill_many(&prompts).expect_err(what);
        assert!(
            matches!(
                err,
                EngineError::EmptyPrompt
                    | EngineError::BadToken { .. }
                    | EngineError::ContextFull { .. }
            ),
            "{what}: {err}"
        );
        assert_eq!(batch.position(b).unwrap(), 1, "{what}: nothing ran");
    }
}

fn smollm2() -> Option<std::path::PathBuf> {
    common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model")
}

#[test]
fn smollm2_resident_batch_decodes_each_sequence_as_alone() {
    let Some(gguf) = smollm2() else { return };
    let model = Model::open(&gguf).expect("open SmolLM2");
    check("resident", || {
        model.session(CTX, None, None).expect("session")
    });
    let ctx = 2 * CTX;
    check_prefill_many("resident", || {
        model.session(ctx, None, None).expect("session")
    });
}

/// The flash strategy: every neuron through a window of a quarter of each layer (its pinned
/// prefix in memory, the rest read each step, with lookahead), or the predictor's neurons
/// through a window of half of each layer, an eighth pinned (the rest follows the tokens).
fn flash_options(model: &Model, selection: Selection) -> FlashOptions {
    let layers = model.weights.config.n_layers;
    let n = model.weights.config.intermediate_size;
    let (slots, pinned) = match selection {
        Selection::All => (n / 4, n / 4),
        _ => (n / 2, n / 8),
    };
    FlashOptions {
        strategy: Strategy::Flash,
        selection,
        window_slots: Some(vec![slots; layers]),
        pinned: Some(common::prefix_pins(model, pinned)),
        io_threads: 2,
        ..FlashOptions::default()
    }
}

/// Flash bytes read per step by `n` sequences decoded together (after their prompts).
fn bytes_per_step(session: Session, prompts: &[Vec<u32>], steps: usize) -> f64 {
    let mut batch = session.into_batch(prompts.len());
    let mut inputs = Vec::new();
    for p in prompts {
        let id = batch.add().expect("a free slot");
        let first = greedy(batch.prefill(id, p).expect("prefill"));
        inputs.push((id, first));
    }
    let before = batch.flash_stats().expect("flash").bytes_read;
    let vocab = batch.weights().config.vocab_size;
    for _ in 0..steps {
        let rows = batch.step(&inputs).expect("step");
        let next: Vec<u32> = rows.chunks_exact(vocab).map(greedy).collect();
        inputs.iter_mut().zip(next).for_each(|(i, t)| i.1 = t);
    }
    let after = batch.flash_stats().expect("flash").bytes_read;
    (after - before) as f64 / steps as f64
}

/// One sequence's and four sequences' flash reads per step: batching reads what the step's
/// sequences share once.
fn check_reads<'m>(what: &str, session: impl Fn() -> Session<'m>) -> f64 {
    let vocab = session().weights().config.vocab_size;
    let prompts: Vec<Vec<u32>> = (requests(vocab).into_iter().take(4))
        .map(|r| r.prompt)
        .collect();
    let one = bytes_per_step(session(), &prompts[..1], 8);
    let four = bytes_per_step(session(), &prompts, 8);
    let ratio = four / one;
    eprintln!("{what}: {one:.0} B/step for one sequence, {four:.0} for four: {ratio:.2}x");
    assert!(one > 0.0, "{what}: the window reads every step");
    assert!(
        ratio < 4.0,
        "{what}: four sequences read {ratio:.2}x one's bytes"
    );
    ratio
}

#[test]
fn smollm2_flash_batch_decodes_each_sequence_as_alone_and_shares_reads() {
    let Some(gguf) = smollm2() else { return };
    let path = common::to_image(&gguf, "batch-smollm2", BundleDtype::Source);
    let model = Model::open(&path).expect("open image");
    let dense = || {
        let opts = flash_options(&model, Selection::All);
        model.session(CTX, Some(opts), None).expect("session")
    };
    check("flash, every neuron", dense);
    let ratio = check_reads("flash, every neuron", dense);
    let long = || {
        let opts = flash_options(&model, Selection::All);
        model.session(2 * CTX, Some(opts), None).expect("session")
    };
    let (shared, separate) = check_prefill_many("flash, every neuron", long);
    // Four prompts (109 tokens) in two shared passes, against five passes one by one.
    assert!(
        (shared as f64) < 0.6 * separate as f64,
        "prefilled together {shared} B, apart {separate} B"
    );
    // Every sequence needs the same bundles: four read what one does.
    assert!(ratio < 1.5, "{ratio}");

    let tok = model.tokenizer.as_ref().expect("tokenizer");
    let text = std::fs::read_to_string(common::fixture("text/python-doc-eval.txt")).unwrap();
    let cal = common::calibrate(&model, &tok.encode(&text, false, false)[..384], 0.5, 16);
    let predictor = || {
        let opts = flash_options(&model, Selection::Predictor);
        model.session(CTX, Some(opts), Some(&cal)).expect("session")
    };
    check("flash, predictor", predictor);
    check_prefill_many("flash, predictor", || {
        let opts = flash_options(&model, Selection::Predictor);
        model
            .session(2 * CTX, Some(opts), Some(&cal))
            .expect("session")
    });
    // SmolLM2's predictor (SwiGLU, a quick calibration) picks most neurons of every token,
    // so four sequences' union is not much more than one's set.
    check_reads("flash, predictor", predictor);
    std::fs::remove_file(path).ok();
}

/// An unknown or removed sequence, a token outside the vocabulary, an empty prompt and a full
/// context are errors that run nothing; a full batch has no slot to add.
#[test]
fn bad_input_is_refused() {
    let model = Model::open(&common::fixture("hf/llama")).expect("open fixture");
    let vocab = model.weights.config.vocab_size;
    let mut batch = model.session(8, None, None).expect("session").into_batch(2);
    assert_eq!((batch.slots(), batch.capacity()), (2, 8));
    let (a, b) = (batch.add().expect("slot"), batch.add().expect("slot"));
    assert!(batch.add().is_none(), "two slots hold two sequences");
    batch.prefill(a, &[1, 2, 3, 4, 5, 6, 7]).expect("prefill");
    batch.prefill(b, &[1, 2]).expect("prefill");
    let err = batch
        .step(&[(b, 3), (a, 8), (a, 9)])
        .expect_err("a's context is full");
    assert!(
        matches!(err, EngineError::ContextFull { capacity: 8 }),
        "{err}"
    );
    assert_eq!(
        batch.position(b).expect("b"),
        2,
        "a refused step runs nothing"
    );
    let err = batch.step(&[(b, vocab as u32)]).expect_err("bad token");
    assert!(matches!(err, EngineError::BadToken { .. }), "{err}");
    let err = batch.prefill(b, &[]).expect_err("empty prompt");
    assert!(matches!(err, EngineError::EmptyPrompt), "{err}");
    let err = batch.prefill(b, &[1; 7]).expect_err("too long a prompt");
    assert!(matches!(err, EngineError::ContextFull { .. }), "{err}");
    batch.remove(a).expect("remove");
    let c = batch.add().expect("a's slot is free again");
    assert_eq!(c.slot(), a.slot());
    assert_eq!(
        batch.position(c).expect("c"),
        0,
        "a new sequence starts empty"
    );
    for err in [
        batch.step(&[(c, 1), (a, 1)]).expect_err("a was removed"),
        batch.remove(a).expect_err("a was removed"),
        batch.truncate(a, 0).expect_err("a was removed"),
    ] {
        assert!(
            matches!(err, EngineError::UnknownSequence(id) if id == a),
            "{err}"
        );
    }
    assert_eq!(
        batch.position(c).expect("c"),
        0,
        "a refused step runs nothing"
    );
    let rows = batch.step(&[(c, 1), (b, 3), (c, 2)]).expect("step");
    assert_eq!(rows.len(), 3 * vocab);
    assert_eq!(batch.position(c).expect("c"), 2);
    batch.truncate(c, 1).expect("truncate");
    assert_eq!(batch.position(c).expect("c"), 1);
    assert_eq!(batch.step(&[]).expect("an empty step").len(), 0);
}

/// A read that fails mid-step (the image truncated while the batch decodes) is an error that
/// leaves every sequence where it was; so is a prefill that fails.
#[test]
fn a_failed_read_leaves_every_sequence_where_it_was() {
    let path = common::to_image(
        &common::fixture("hf/llama"),
        "batch-faults",
        BundleDtype::F16,
    );
    let model = Model::open(&path).expect("open image");
    let (layers, vocab) = (
        model.weights.config.n_layers,
        model.weights.config.vocab_size,
    );
    // A window far smaller than a layer: every step reads bundles.
    let opts = FlashOptions {
        selection: Selection::All,
        window_slots: Some(vec![4; layers]),
        lookahead: false,
        io_threads: 2,
        ..FlashOptions::default()
    };
    let mut batch = model
        .session(64, Some(opts), None)
        .expect("session")
        .into_batch(3);
    let (a, b) = (batch.add().expect("slot"), batch.add().expect("slot"));
    batch
        .prefill(a, &common::tokens(5, vocab))
        .expect("prefill");
    batch
        .prefill(b, &common::tokens(3, vocab))
        .expect("prefill");
    let cut = model
        .image
        .as_ref()
        .expect("an image")
        .ffn_section(0)
        .offset;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(cut).expect("truncate the image");
    let err = batch
        .step(&[(a, 1), (b, 2), (a, 3)])
        .expect_err("a failed read");
    assert!(matches!(err, EngineError::Read(_)), "{err}");
    assert_eq!(batch.position(a).expect("a"), 5);
    assert_eq!(batch.position(b).expect("b"), 3);
    let c = batch.add().expect("slot");
    let err = batch.prefill(c, &[1, 2, 3]).expect_err("a failed read");
    assert!(matches!(err, EngineError::Read(_)), "{err}");
    assert_eq!(batch.position(c).expect("c"), 0);
    std::fs::remove_file(path).ok();
}
