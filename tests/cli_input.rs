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
        refused(&args, "not finite");
    }
    std::fs::remove_file(path).ok();
}
