//! `--memory-budget` is the whole process: a generate under a memory cgroup capped at the
//! budget is not killed, its group's peak (anonymous memory and the page cache it causes)
//! stays under the cap, its own peak RSS under the budget, and it writes the same tokens as
//! an uncapped run. Needs root and a memory cgroup (v1, or v2 with the memory controller
//! delegated); otherwise it is skipped, and the skip is counted (`tests/common`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use llmflash::image::BundleDtype;

const BUDGET: u64 = 64 << 20;

fn smollm2() -> Option<PathBuf> {
    common::model("SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-model")
}

/// `generate --json` on `image` under the budget, inside `group` if given, with its tokens
/// and peak RSS.
fn generate(image: &Path, group: Option<&Group>) -> (Vec<u32>, u64) {
    let bin = env!("CARGO_BIN_EXE_llmflash");
    let args = [
        "generate",
        "-m",
        image.to_str().expect("a UTF-8 path"),
        "--memory-budget",
        "64MiB",
        "-p",
        "The tallest mountain in the world is",
        "-n",
        "24",
        "--greedy",
        "--ignore-eos",
        "--json",
    ];
    let mut cmd = match group {
        // The shell joins the group, then becomes llmflash: everything it allocates, and
        // every page it brings into the cache, is charged to the group.
        Some(g) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(g.dir.join("cgroup.procs"))
                .arg(bin)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
    };
    let out = cmd.output().expect("running llmflash");
    assert!(
        out.status.success(),
        "generate under {:?} failed ({}; killed by the OOM killer if signal 9): {}",
        group.map(|g| &g.dir),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let peak = v["stats"]["peak_rss_bytes"]
        .as_u64()
        .expect("peak RSS on Linux");
    (common::u32s(&v["tokens"]), peak)
}

/// A memory cgroup made for the test, removed on drop.
struct Group {
    dir: PathBuf,
    /// The file holding the group's peak usage.
    peak: &'static str,
}

impl Group {
    /// A child of this process's own memory cgroup, capped at `limit` bytes: Err with why
    /// when this machine does not allow one.
    fn new(limit: u64) -> Result<Group, String> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (base, limit_file, peak) = if v1.is_dir() {
            let own = (cgroups.lines())
                .find_map(|l| {
                    l.split(':')
                        .nth(2)
                        .filter(|_| l.split(':').nth(1) == Some("memory"))
                })
                .ok_or("no memory line in /proc/self/cgroup")?;
            (
                v1.join(own.trim_start_matches('/')),
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        } else {
            let own = (cgroups.lines())
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or("no cgroup v2 line in /proc/self/cgroup")?;
            let dir = Path::new("/sys/fs/cgroup").join(own.trim_start_matches('/'));
            (dir, "memory.max", "memory.peak")
        };
        let dir = base.join(format!("llmflash-test-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let group = Group { dir, peak };
        std::fs::write(group.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("cannot set {limit_file}: {e}"))?;
        if !group.dir.join(peak).exists() {
            return Err(format!(
                "{} has no {peak} (kernel too old)",
                group.dir.display()
            ));
        }
        Ok(group)
    }

    fn peak(&self) -> u64 {
        let text = std::fs::read_to_string(self.dir.join(self.peak)).expect("the peak is readable");
        text.trim().parse().expect("the peak is a number")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_generate_under_a_cap_equal_to_its_budget_runs_and_stays_under_it() {
    let Some(model) = smollm2() else { return };
    let image = common::to_image(&model, "memory-cap", BundleDtype::Q8_0);
    let group = match Group::new(BUDGET) {
        Ok(g) => g,
        Err(why) => {
            common::skipped(&format!("no memory cgroup to cap a generate in: {why}"));
            let _ = std::fs::remove_file(&image);
            return;
        }
    };
    let (free, _) = generate(&image, None);
    let (capped, rss) = generate(&image, Some(&group));
    let peak = group.peak();
    let _ = std::fs::remove_file(&image);
    assert_eq!(capped, free, "the cap changed the tokens");
    assert!(
        rss <= BUDGET,
        "peak RSS {rss} is over the {BUDGET}-byte budget"
    );
    assert!(
        peak <= BUDGET,
        "the group's peak {peak} is over the cap {BUDGET}"
    );
}

#[test]
fn a_budget_below_what_the_process_needs_is_refused_with_the_minimum() {
    let Some(model) = smollm2() else { return };
    let image = common::to_image(&model, "memory-min", BundleDtype::Q8_0);
    let out = Command::new(env!("CARGO_BIN_EXE_llmflash"))
        .args(["generate", "-m"])
        .arg(&image)
        .args(["--memory-budget", "20MiB", "-p", "hi", "-n", "1"])
        .output()
        .expect("running llmflash");
    let _ = std::fs::remove_file(&image);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "20 MiB cannot hold SmolLM2: {err}");
    assert!(err.contains("needs at least"), "{err}");
    assert!(err.contains("for the process itself"), "{err}");
    assert!(
        err.contains("--memory-budget"),
        "the CLI names its flag: {err}"
    );
}
