//! Bad numbers on the command line and damaged weights end in a message and a non-zero exit,
//! never a panic, a hang or a silent wrong token.

mod common;

use llmflash::engine::model::Model;
use llmflash::image::BundleDtype;

/// Runs `llmflash ARGS`; returns whether it succeeded and its stderr.
fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .output()
        .expect("running llmflash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused<S: AsRef<str>>(args: &[S], says: &str) {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    let args = args.as_slice();
    let (ok, err) = cli(args);
    assert!(!ok, "llmflash {args:?} succeeded");
    assert!(err.contains(says), "llmflash {args:?}: {err}");
    assert!(
        !err.contains("panicked"),
        "llmflash {args:?} panicked: {err}"
    );
}

#[test]
fn numeric_flags_out_of_range_are_refused() {
    let m = common::fixture("hf/llama");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&'static str]| -> Vec<String> {
        let mut a = vec!["generate", "-m", m, "--token-ids", "1,2,3"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    };
    refused(&gen(&["-n", "18446744073709551615"]), "out of range");
    refused(&gen(&["-n", "0"]), "out of range");
    refused(&gen(&["--temp", "nan"]), "out of range");
    refused(&gen(&["--temp", "-0.5"]), "out of range");
    refused(&gen(&["--temp", "0.7", "--top-p", "0"]), "keeps no token");
    refused(&gen(&["--temp", "0.7", "--top-p", "1.5"]), "out of range");
    refused(&gen(&["--io-threads", "100000"]), "out of range");
    refused(&gen(&["--draft-max", "0"]), "draft length");
    refused(&gen(&["--draft-p-min", "2"]), "probability");
    let text = common::fixture("text/python-doc-eval.txt");
    let p = [
        "perplexity",
        "-m",
        m,
        "-f",
        text.to_str().unwrap(),
        "--chunks",
        "0",
    ];
    refused(&p, "out of range");
}

/// NaN weights in an FFN section give NaN logits: an error naming the position, not token 0.
/// (With the bundles' checksums on, as by default, the damage is caught at the read first.)
#[test]
fn non_finite_logits_are_an_error() {
    let path = common::to_image(&common::fixture("hf/llama"), "nan-ffn", BundleDtype::F16);
    let section = {
        let model = Model::open(&path).expect("open");
        let s = model.image.as_ref().expect("image").ffn_section(0);
        (s.offset, s.len)
    };
    let mut bytes = std::fs::read(&path).expect("read image");
    let (start, len) = (section.0 as usize, section.1 as usize);
    // f16 0xFFFF is NaN.
    bytes[start..start + len].fill(0xFF);
    std::fs::write(&path, bytes).expect("write image");
    let image = path.to_str().unwrap();
    for draft in ["none", "ngram"] {
        let args = [
            "generate",
            "-m",
            image,
            "--token-ids",
            "1,2,3,1,2",
            "-n",
            "4",
            "--draft",
            draft,
            "--strategy",
            "resident",
        ];
        refused(&args, "the file is damaged");
        refused(&[&args[..], &["--no-checksums"]].concat(), "not finite");
    }
    std::fs::remove_file(path).ok();
}

/// Runs `llmflash ARGS`, killed after a minute (a hang fails the test); it must fail with a
/// message containing `says`.
fn refused_within_a_minute(args: &[&str], says: &str) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running llmflash");
    let start = Instant::now();
    while child.try_wait().expect("waiting").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("llmflash {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "llmflash {args:?} succeeded");
    assert!(err.contains(says), "llmflash {args:?}: {err}");
    assert!(!err.contains("panicked"), "llmflash {args:?}: {err}");
}

#[test]
fn more_numeric_flags_out_of_range_are_refused() {
    let m = common::fixture("hf/llama");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&'static str]| -> Vec<String> {
        let mut a = vec!["generate", "-m", m, "--token-ids", "1,2,3"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    };
    refused(&["--threads", "0", "inspect", m], "out of range");
    refused(&["--threads", "100000", "inspect", m], "out of range");
    refused(
        &gen(&["--temp", "0.7", "--top-k", "-1"]),
        "not a whole number",
    );
    refused(
        &gen(&["--temp", "0.7", "--top-k", "99999999999"]),
        "out of range",
    );
    refused(&gen(&["--max-read", "10"]), "out of range");
    refused(&gen(&["--max-gap", "2GiB"]), "out of range");
    refused(&gen(&["--window", "99999999"]), "out of range");
    refused(&gen(&["--synthetic-activity", "0"]), "activates no neuron");
    refused(&gen(&["--synthetic-activity", "nan"]), "finite number");
    refused(&gen(&["--synthetic-churn", "1.5"]), "out of range");
    refused(&gen(&["--draft-min", "99"]), "out of range");
    refused(&gen(&["--draft-head-rows", "99999999999"]), "out of range");
    refused(&["bench", "-m", m, "--runs", "0"], "out of range");
    refused(&["bench", "-m", m, "-n", "0"], "out of range");
    // calibrate refuses its numbers before it opens anything (the image need not exist).
    let cal = |extra: &[&'static str]| -> Vec<String> {
        let mut a = vec!["calibrate", "missing.flash", "--text", "missing.txt"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    };
    for bad in ["nan", "inf", "-0.5", "0", "1", "1.5"] {
        let levels = format!("0.3,{bad}");
        refused(
            &cal(&[])
                .into_iter()
                .chain(["--levels".into(), levels])
                .collect::<Vec<_>>(),
            "sparsity",
        );
    }
    refused(&cal(&["--sparsity", "1"]), "above 0 and below 1");
    refused(&cal(&["--recall", "0"]), "keeps no neuron");
    refused(&cal(&["--recall", "1.01"]), "out of range");
    refused(&cal(&["--recall", "nan"]), "finite number");
    refused(&cal(&["--tokens", "0"]), "out of range");
    refused(&cal(&["--rank", "0"]), "out of range");
    refused(&cal(&["--epochs", "0"]), "out of range");
    refused(&cal(&["--ctx", "0"]), "out of range");
    refused(&cal(&["--eval-ctx", "0"]), "out of range");
    refused(&cal(&["--eval-chunks", "0"]), "out of range");
    refused(&cal(&["--max-increase", "inf"]), "finite number");
}

/// Special files as inputs are refused before anything opens them (a FIFO blocks `open`
/// until a writer appears, `/dev/zero` never ends), and text has a size limit.
#[test]
fn special_and_oversized_inputs_are_refused_without_hanging() {
    let dir = common::root().join(format!("target/test-files/inputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    let f = fifo.to_str().unwrap();
    let m = common::fixture("hf/llama");
    let m = m.to_str().unwrap();
    let text = common::fixture("text/python-doc-eval.txt");
    let text = text.to_str().unwrap();
    refused_within_a_minute(&["generate", "-m", f, "-p", "hi"], "FIFO");
    refused_within_a_minute(&["inspect", f], "FIFO");
    refused_within_a_minute(&["convert", f, "-o", "/nonexistent/x.flash"], "FIFO");
    refused_within_a_minute(&["perplexity", "-m", f, "-f", text], "FIFO");
    refused_within_a_minute(&["calibrate", f, "--text", text], "FIFO");
    refused_within_a_minute(&["perplexity", "-m", m, "-f", f], "FIFO");
    refused_within_a_minute(
        &["perplexity", "-m", m, "-f", "/dev/zero"],
        "character device",
    );
    refused_within_a_minute(&["calibrate", m, "--text", f], "FIFO");
    refused_within_a_minute(&["calibrate", m, "--text", text, "--eval", f], "FIFO");
    // A (sparse) text file over the 64 MiB limit.
    let big = dir.join("big.txt");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    refused_within_a_minute(
        &["perplexity", "-m", m, "-f", big.to_str().unwrap()],
        "more than the limit of 64.0 MiB",
    );
    // A FIFO inside an HF directory (the tokenizer) is refused too.
    let hf = dir.join("llama");
    std::fs::create_dir_all(&hf).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture("hf/llama").join(name), hf.join(name)).unwrap();
    }
    let st = std::process::Command::new("mkfifo")
        .arg(hf.join("tokenizer.json"))
        .status()
        .expect("mkfifo");
    assert!(st.success());
    refused_within_a_minute(&["inspect", hf.to_str().unwrap()], "FIFO");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config with a non-positive norm epsilon or RoPE base, or zero heads, is refused at load
/// with the key and the value.
#[test]
fn configs_with_bad_parameters_are_refused_naming_the_key() {
    let dir = common::root().join(format!("target/test-files/configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::fixture("hf/llama");
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let cases = [
        (
            "\"rms_norm_eps\": 1e-05",
            "\"rms_norm_eps\": -1e-05",
            "rms_norm_eps",
        ),
        (
            "\"rms_norm_eps\": 1e-05",
            "\"rms_norm_eps\": 0",
            "rms_norm_eps",
        ),
        (
            "\"rope_theta\": 10000.0",
            "\"rope_theta\": 0.0",
            "rope_parameters.rope_theta",
        ),
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 0",
            "num_key_value_heads",
        ),
    ];
    for (i, (from, to, key)) in cases.into_iter().enumerate() {
        assert!(config.contains(from), "{from}");
        let m = dir.join(format!("m{i}"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::copy(src.join("model.safetensors"), m.join("model.safetensors")).unwrap();
        std::fs::write(m.join("config.json"), config.replace(from, to)).unwrap();
        refused(&["inspect", m.to_str().unwrap()], &format!("`{key}`"));
        refused(&["inspect", m.to_str().unwrap()], "above 0");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `inspect` lists the matrices' types and says up front which backend can run the file.
#[test]
fn inspect_says_which_backend_runs_a_file() {
    let stdout = |model: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmflash"))
            .args(["inspect", model])
            .output()
            .expect("running llmflash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let Some(smol) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let text = stdout(smol.to_str().unwrap());
    assert!(
        text.contains("matrix types: 210 x Q4_1, 2 x Q8_0"),
        "{text}"
    );
    assert!(text.contains("backends: cpu, gpu"), "{text}");
    // Qwen2.5-Coder-0.5B has Q5_0 matrices beside its Q4_K and Q6_K ones: the GPU kernels
    // read the K-quants, not Q5_0.
    let Some(qwen) = common::model(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "tools/fetch-model --qwen-0.5b (opt-in)",
    ) else {
        return;
    };
    let text = stdout(qwen.to_str().unwrap());
    assert!(text.contains("do not read Q5_0:"), "{text}");
    assert!(text.contains("--backend gpu refuses this file"), "{text}");
}
