//! The embedding API ([`llmflash::api::Engine`]): it generates what the command line
//! generates, ends at stop strings without showing them, stops when the reader says so, and
//! under a memory budget converts a GGUF file into the cache once and reuses it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use llmflash::api::{Engine, FinishReason, GenerateOptions, Prompt, RunOptions};

const PROMPT: &str = "The three primary colors are";

fn smollm2() -> Option<PathBuf> {
    common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model")
}

/// `llmflash generate ARGS --json`'s text and tokens, and its stderr.
fn cli_generate(args: &[&str], cache: Option<&Path>) -> (String, Vec<u32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmflash"));
    cmd.arg("generate").args(args).arg("--json");
    if let Some(dir) = cache {
        cmd.env("LLMFLASH_CACHE", dir);
    }
    let out = cmd.output().expect("running llmflash");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "llmflash generate {args:?}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let text = v["text"].as_str().expect("text").to_string();
    (text, common::u32s(&v["tokens"]), err)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ..GenerateOptions::default()
    }
}

#[test]
fn the_engine_generates_what_the_command_line_generates() {
    let Some(model) = smollm2() else { return };
    let path = model.to_str().expect("a UTF-8 path");
    let (text, tokens, _) = cli_generate(&["-m", path, "-p", PROMPT, "-n", "24", "--greedy"], None);
    let engine = Engine::builder(&model).build().expect("opening the model");
    let mut streamed = String::new();
    let done = engine
        .generate(&Prompt::Text(PROMPT), &greedy(24), |piece| {
            streamed.push_str(piece);
            true
        })
        .expect("generating");
    assert_eq!(done.tokens, tokens);
    assert_eq!(done.text, text);
    assert_eq!(streamed, text, "the callback saw the whole text, once");
    assert_eq!(
        done.prompt_tokens,
        engine.encode(&Prompt::Text(PROMPT)).unwrap().len()
    );
    let expected = match tokens.len() {
        24 => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    assert_eq!(done.finish_reason, expected);
}

#[test]
fn a_stop_string_ends_the_text_before_it_and_the_reader_can_stop() {
    let Some(model) = smollm2() else { return };
    let engine = Engine::builder(&model).build().expect("opening the model");
    let full = engine
        .generate(&Prompt::Text(PROMPT), &greedy(32), |_| true)
        .expect("generating");
    // A stop string from the middle of the greedy text: the text ends just before it.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() > 4, "too short a text to cut: {:?}", full.text);
    let stop = format!(" {}", words[3]);
    let at = full
        .text
        .find(&stop)
        .expect("the stop string is in the text");
    let opts = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(32)
    };
    let mut streamed = String::new();
    let cut = engine
        .generate(&Prompt::Text(PROMPT), &opts, |p| {
            streamed.push_str(p);
            true
        })
        .expect("generating");
    assert_eq!(cut.text, full.text[..at], "stop string {stop:?}");
    assert_eq!(streamed, cut.text, "no part of the stop string was shown");
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert!(cut.tokens.len() < full.tokens.len());
    // The reader stops after the first piece: one more token at most is decoded.
    let mut pieces = 0;
    let stopped = engine
        .generate(&Prompt::Text(PROMPT), &greedy(32), |_| {
            pieces += 1;
            false
        })
        .expect("generating");
    assert_eq!(pieces, 1);
    assert_eq!(stopped.finish_reason, FinishReason::Cancelled);
    assert!(stopped.tokens.len() <= 2, "{:?}", stopped.tokens);
}

#[test]
fn a_budget_converts_a_gguf_into_the_cache_once_and_reuses_it() {
    let Some(model) = smollm2() else { return };
    let cache = common::root()
        .join("target/test-files")
        .join(format!("api-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let path = model.to_str().expect("a UTF-8 path");
    let args = [
        "-m",
        path,
        "-p",
        PROMPT,
        "-n",
        "12",
        "--greedy",
        "--memory-budget",
        "96MiB",
    ];
    let (_, first, err) = cli_generate(&args, Some(&cache));
    assert!(err.contains("converted into a flash image"), "{err}");
    let (_, again, err) = cli_generate(&args, Some(&cache));
    assert!(err.contains("converted before"), "{err}");
    assert_eq!(first, again);
    let images: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(images.len(), 1, "one image in the cache: {images:?}");
    // Every neuron computed from the image gives the resident model's tokens.
    let (_, resident, _) = cli_generate(&args[..7], None);
    assert_eq!(first, resident);
    // The engine finds the same image through its options. (Its budget is for the whole
    // process, which here holds the other tests' models too: a generous one.)
    let opts = RunOptions {
        memory_budget: Some(1 << 30),
        cache_dir: Some(cache.clone()),
        ..RunOptions::default()
    };
    let engine = Engine::builder(&model)
        .options(opts)
        .build()
        .expect("opening");
    assert!(engine.model().image.is_some(), "the engine runs the image");
    let done = engine
        .generate(&Prompt::Text(PROMPT), &greedy(12), |_| true)
        .expect("generating");
    assert_eq!(done.tokens, first);
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn a_conversation_reuses_its_cache_and_replies_as_a_fresh_chat_would() {
    use llmflash::api::Conversation;
    use llmflash::model::chat::ChatMessage;
    let Some(model) = smollm2() else { return };
    let engine = Engine::builder(&model)
        .context(1024)
        .build()
        .expect("opening");
    let mut chat = Conversation::new(&engine, Some("You are brief.")).expect("a conversation");
    let first = chat
        .reply("What is the capital of France?", &greedy(24), |_| true)
        .expect("first reply");
    let second = chat
        .reply("And of Italy?", &greedy(24), |_| true)
        .expect("second reply");
    assert_eq!(second.dropped, 0);
    // The second turn prefilled only what the first left out of the cache.
    let history = [
        ChatMessage::new("system", "You are brief."),
        ChatMessage::new("user", "What is the capital of France?"),
        ChatMessage::new("assistant", first.completion.text.clone()),
        ChatMessage::new("user", "And of Italy?"),
    ];
    let whole = engine.encode(&Prompt::Chat(&history)).unwrap().len();
    assert!(
        second.completion.prompt_tokens < whole / 2,
        "{} of {whole} prompt tokens run again",
        second.completion.prompt_tokens
    );
    let fresh = engine
        .generate(&Prompt::Chat(&history), &greedy(24), |_| true)
        .expect("a fresh chat");
    assert_eq!(second.completion.tokens, fresh.tokens);
    assert_eq!(second.completion.text, fresh.text);
    assert_eq!(chat.messages().len(), 5);
    chat.reset();
    assert_eq!(chat.messages().len(), 1, "the system message stays");
}

#[test]
fn a_conversation_longer_than_the_context_drops_its_oldest_exchanges() {
    use llmflash::api::Conversation;
    let Some(model) = smollm2() else { return };
    let engine = Engine::builder(&model)
        .context(160)
        .build()
        .expect("opening");
    let mut chat = Conversation::new(&engine, None).expect("a conversation");
    let long = "Tell me about the history of the printing press in Europe.";
    let mut dropped = 0;
    for _ in 0..4 {
        let r = chat.reply(long, &greedy(40), |_| true).expect("a reply");
        dropped += r.dropped;
        assert!(chat.messages().len() <= 8);
    }
    assert!(dropped > 0, "four long exchanges fit in 160 positions");
    // A message that cannot fit at all is refused and leaves the history as it was.
    let before = chat.messages();
    let huge = "word ".repeat(400);
    let err = chat
        .reply(&huge, &greedy(8), |_| true)
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("context"), "{err:#}");
    assert_eq!(chat.messages(), before);
}

/// An engine given a GPU (here the test's context, as a host would hand over its own device)
/// generates on it what `generate --backend gpu` does: the dense GGUF, and its flash image
/// under a VRAM budget; `gpu_decoder` steps the same decoder for a host's own loop; a host
/// memory budget on the GPU is refused before anything loads.
#[test]
fn an_engine_on_a_host_gpu_generates_what_the_gpu_command_line_does() {
    let Some(model) = smollm2() else { return };
    let Some(gpu) = common::gpu() else { return };
    let image = common::to_image(&model, "api-gpu", llmflash::image::BundleDtype::Source);
    for (file, vram) in [(&model, None), (&image, Some("64MiB"))] {
        let path = file.to_str().expect("a UTF-8 path");
        let mut args = vec!["-m", path, "-p", PROMPT, "-n", "8", "--greedy"];
        args.extend(["--backend", "gpu"]);
        if let Some(v) = vram {
            args.extend(["--vram-budget", v]);
        }
        let (text, tokens, _) = cli_generate(&args, None);
        let mut builder = Engine::builder(file).gpu(gpu.clone());
        if vram.is_some() {
            builder = builder.vram_budget(64 << 20);
        }
        let engine = builder.build().expect("opening the model on the GPU");
        let done = engine
            .generate(&Prompt::Text(PROMPT), &greedy(8), |_| true)
            .expect("generating on the GPU");
        assert_eq!((&done.tokens, &done.text), (&tokens, &text), "{path}");
        let ids = engine.encode(&Prompt::Text(PROMPT)).unwrap();
        let mut target = engine.gpu_decoder(ids.len() + 9).expect("a GPU decoder");
        let dec = target.model();
        for &t in &ids[..ids.len() - 1] {
            dec.feed(t).expect("feed");
        }
        let mut next = dec.step_greedy(*ids.last().unwrap()).expect("step");
        let mut stepped = vec![next];
        while stepped.len() < tokens.len() {
            next = dec.step_greedy(next).expect("step");
            stepped.push(next);
        }
        assert_eq!(stepped, tokens, "{path}: stepped by hand");
    }
    let err = Engine::builder(&model)
        .gpu(gpu.clone())
        .memory_budget(64 << 20)
        .build()
        .err()
        .expect("a host budget on the GPU is refused");
    assert!(format!("{err:#}").contains("vram_budget"), "{err:#}");
    std::fs::remove_file(image).ok();
}
