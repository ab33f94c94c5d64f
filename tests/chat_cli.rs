//! `llmflash chat` in a terminal's place: turns read from stdin, replies streamed to stdout,
//! `/reset` and `/exit`, and Ctrl-C (SIGINT) stopping a reply but not the program.

mod common;

use std::io::{BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ctrl_c_stops_a_reply_and_the_chat_goes_on() {
    let Some(model) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["chat", "-m"])
        .arg(&model)
        .args(["-n", "2000", "--ignore-eos"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running llmflash chat");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(stdin, "Write a very long story about a dragon.").unwrap();
    // Wait for the reply to start streaming, then interrupt it.
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).expect("the reply streams");
    let pid = child.id() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGINT) };
    // The chat reads the next line: the reply stopped well short of 2000 tokens.
    let t = Instant::now();
    writeln!(stdin, "/reset").unwrap();
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().expect("waiting for llmflash chat");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "chat exited with {status}: {err}");
    assert!(err.contains("[stopped]"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the reply was not stopped"
    );
    assert!(err.contains("[the conversation is forgotten]"), "{err}");
    let words = rest.split_whitespace().count();
    assert!(words < 1500, "the reply ran on for {words} words");
}
