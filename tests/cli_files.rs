//! Outputs never harm what the user did not ask to change: every file is written to a
//! temporary file beside its destination and renamed over it when complete; special files,
//! directories and the inputs themselves are refused as outputs; the disk probe writes only
//! its own file inside a directory.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `llmflash ARGS` (killed after `limit`: a hang fails the test); returns whether it
/// succeeded and its stderr.
fn cli_within(args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running llmflash");
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("waiting for llmflash") {
            let out = child
                .wait_with_output()
                .expect("collecting llmflash's output");
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("llmflash {args:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(args: &[&str]) -> (bool, String) {
    cli_within(args, Duration::from_secs(300))
}

fn refused(args: &[&str], says: &str) {
    let (ok, err) = cli_within(args, Duration::from_secs(60));
    assert!(!ok, "llmflash {args:?} succeeded");
    assert!(err.contains(says), "llmflash {args:?}: {err}");
    assert!(!err.contains("panicked"), "llmflash {args:?}: {err}");
}

/// An empty scratch directory under target/, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = common::root()
            .join("target/test-files")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// The names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

fn is_char_device(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// A copy of the tiny HF llama fixture, as a source model that may be damaged.
fn hf_copy(scratch: &Scratch) -> PathBuf {
    let src = common::fixture("hf/llama");
    let dir = scratch.path("llama");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

#[test]
fn convert_refuses_special_files_and_directories_as_output() {
    let s = Scratch::new("convert-special");
    let model = hf_copy(&s);
    let m = model.to_str().unwrap();
    // Run as root, this replaced the device node with a regular file.
    refused(&["convert", m, "-o", "/dev/null"], "character device");
    assert!(is_char_device("/dev/null"), "/dev/null is still a device");
    assert!(!std::fs::read_dir("/dev").unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("null.")));
    let fifo = s.path("fifo");
    mkfifo(&fifo);
    refused(&["convert", m, "-o", fifo.to_str().unwrap()], "FIFO");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    let dir = s.path("out-dir");
    std::fs::create_dir(&dir).unwrap();
    refused(&["convert", m, "-o", dir.to_str().unwrap()], "a directory");
    assert!(dir.is_dir());
    assert_eq!(
        s.names(),
        ["fifo", "llama", "out-dir"],
        "nothing else written"
    );
}

#[test]
fn convert_refuses_its_own_input_as_output() {
    let s = Scratch::new("convert-input");
    let model = hf_copy(&s);
    let m = model.to_str().unwrap();
    let weights = model.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let hard = s.path("hard.safetensors");
    std::fs::hard_link(&weights, &hard).unwrap();
    let soft = s.path("soft.safetensors");
    std::os::unix::fs::symlink(&weights, &soft).unwrap();
    for out in [&weights, &hard, &soft] {
        refused(
            &["convert", m, "-o", out.to_str().unwrap()],
            "(the same file)",
        );
    }
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the input is intact"
    );
    assert!(std::fs::symlink_metadata(&soft)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(inode(&hard), inode(&weights));
}

#[test]
fn convert_replaces_a_regular_file_and_follows_a_symlink() {
    let s = Scratch::new("convert-replace");
    let model = hf_copy(&s);
    let m = model.to_str().unwrap();
    let out = s.path("out.flash");
    std::fs::write(&out, b"an old file").unwrap();
    let (ok, err) = cli(&["convert", m, "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(llmflash::image::is_flash_image(&out));
    let link = s.path("link.flash");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    let before = inode(&out);
    let (ok, err) = cli(&["convert", m, "-o", link.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(inode(&out), before, "the link's target was replaced");
    assert!(llmflash::image::is_flash_image(&out));
    assert_eq!(
        s.names(),
        ["link.flash", "llama", "out.flash"],
        "no temporary left"
    );
}

/// A killed convert leaves its temporary file, never a file at the destination.
#[test]
fn a_killed_convert_leaves_only_its_temporary_file() {
    let s = Scratch::new("convert-killed");
    let out = s.path("big.flash");
    // About 7 GB to write: it is killed long before it could finish.
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["convert", "--synthetic", "llama7b", "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running llmflash");
    let tmp = s.path(&format!("big.flash.{}.tmp", child.id()));
    let start = Instant::now();
    while !std::fs::metadata(&tmp).is_ok_and(|m| m.len() > 0) {
        if start.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no temporary file {} appeared", tmp.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed convert left {}", out.display());
    assert!(tmp.exists());
    assert!(
        !llmflash::image::is_flash_image(&tmp),
        "the header comes last"
    );
}

/// calibrate and reorder rewrite an image through a copy renamed over it: the image gets a
/// new inode, a symbolic link to it stays a link, and no temporary file is left.
#[test]
fn calibrate_and_reorder_replace_the_image_by_rename() {
    let Some(model) = common::model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "tools/fetch-model smollm2",
    ) else {
        return;
    };
    let s = Scratch::new("calibrate-rename");
    let image = s.path("smol.flash");
    let loaded = llmflash::model::load(&model).expect("load");
    let opts = llmflash::image::ConvertOptions {
        bundle_dtype: llmflash::image::BundleDtype::Source,
        progress: false,
    };
    llmflash::image::convert(&loaded, &image, &opts).expect("convert");
    drop(loaded);
    let link = s.path("link.flash");
    std::os::unix::fs::symlink(&image, &link).unwrap();
    let text = common::fixture("text/python-doc-eval.txt");
    let before = inode(&image);
    let (ok, err) = cli(&[
        "calibrate",
        link.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--tokens",
        "256",
        "--ctx",
        "128",
        "--levels",
        "0.5",
        "--rank",
        "8",
        "--epochs",
        "1",
        "--no-reorder",
    ]);
    assert!(ok, "{err}");
    let calibrated = inode(&image);
    assert_ne!(calibrated, before, "calibrate wrote the image in place");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(s.names(), ["link.flash", "smol.flash"]);
    let (ok, err) = cli(&["reorder", link.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_ne!(
        inode(&image),
        calibrated,
        "reorder wrote the image in place"
    );
    assert_eq!(s.names(), ["link.flash", "smol.flash"]);
    let (ok, err) = cli(&["inspect", &s.s("smol.flash"), "--verify"]);
    assert!(ok, "{err}");
}

#[test]
fn probe_disk_needs_a_directory_and_touches_nothing_else() {
    let s = Scratch::new("probe");
    refused(&["bench", "--probe-disk", "/dev/null"], "give a directory");
    assert!(is_char_device("/dev/null"), "/dev/null is still a device");
    let file = s.path("data.bin");
    std::fs::write(&file, vec![5u8; 1 << 20]).unwrap();
    refused(
        &["bench", "--probe-disk", file.to_str().unwrap()],
        "found a regular file",
    );
    assert_eq!(std::fs::read(&file).unwrap(), vec![5u8; 1 << 20]);
    let fifo = s.path("fifo");
    mkfifo(&fifo);
    refused(&["bench", "--probe-disk", fifo.to_str().unwrap()], "FIFO");
    refused(
        &["bench", "--probe-disk", &s.s("missing")],
        "existing directory",
    );
    // The curve's path is checked before the probe writes its 1 GiB.
    refused(
        &[
            "bench",
            "--probe-disk",
            s.0.to_str().unwrap(),
            "--curve",
            "/dev/null",
        ],
        "character device",
    );
    assert!(is_char_device("/dev/null"));
    assert_eq!(s.names(), ["data.bin", "fifo"], "nothing else written");
}

/// Messages say what the file is and print the OS's reason once (regressions: a damaged image
/// was reported as "not a GGUF file"; OS errors appeared twice, in the message and again as
/// its cause).
#[test]
fn messages_name_a_damaged_image_and_print_the_os_error_once() {
    let scratch = Scratch::new("messages");
    let zeros = scratch.path("zeros.flash");
    std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
    let zeros = zeros.to_str().unwrap();
    for cmd in [
        &["inspect", zeros][..],
        &["generate", "-m", zeros, "-p", "hi"][..],
    ] {
        let (ok, err) = cli(cmd);
        assert!(!ok, "{cmd:?}");
        assert!(err.contains("is not a flash image"), "{cmd:?}: {err}");
        assert!(err.contains("convert the model again"), "{cmd:?}: {err}");
        assert!(!err.contains("GGUF"), "{cmd:?}: {err}");
    }
    let Some(model) = common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model") else {
        return;
    };
    let out = scratch.path("no-such-dir/out.flash");
    let (ok, err) = cli(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}
