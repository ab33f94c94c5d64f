//! What the process itself holds: the part of a memory budget no plan can move.
//!
//! A user's `--memory-budget` means the whole process (what a cgroup cap or the OOM killer
//! counts), not only the engine's buffers. Beside the weights, cache and scratch the planner
//! counts, a process carries its code and libraries, the tokenizer's tables, the image's
//! metadata, thread stacks and the allocator's slack. The first three are measured once the
//! model is open (the resident set then, less the weights just read); the last two appear
//! later, as threads start and buffers come and go, so they get an allowance measured on
//! SmolLM2 and Qwen2.5 (docs/benchmarks.md, "A budget for the whole process").

/// Memory a worker thread adds once it has run: its stack's touched pages and glibc's
/// per-thread arena (each thread that allocates gets one, and keeps what it touched).
pub const PER_THREAD: u64 = 256 << 10;

/// Allocator slack while decoding: freed buffers glibc keeps for reuse, and fragmentation
/// between the planned buffers.
pub const SLACK: u64 = 4 << 20;

/// Hands memory the allocator holds freed back to the system. Opening a model builds and
/// drops large temporary structures (the tokenizer's source tables, parsed metadata); glibc
/// keeps their pages, ~4.5 MiB on SmolLM2, which would otherwise count against the budget
/// for the whole run.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's resident set now, in bytes (anonymous memory and mapped file pages), or
/// `None` where the system does not say.
pub fn resident_bytes() -> Option<u64> {
    resident_now()
}

#[cfg(target_os = "linux")]
fn resident_now() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    statm_resident(&statm, u64::try_from(page).ok()?)
}

/// The resident bytes in a `/proc/PID/statm` line (size resident shared text lib data dt,
/// in pages of `page` bytes).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn statm_resident(statm: &str, page: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page)
}

#[cfg(not(target_os = "linux"))]
fn resident_now() -> Option<u64> {
    // The peak so far: never below the resident set now, so the plan errs on the safe side.
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    // macOS reports bytes; the BSDs report KiB.
    let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
    u64::try_from(usage.ru_maxrss).ok().map(|r| r * scale)
}

/// The fixed overhead a plan must leave to the process: what is resident now beyond the
/// `loaded` bytes of weights (the planner counts those itself), plus [`PER_THREAD`] for
/// each of `threads` workers and [`SLACK`]. Zero-cost to call; `None` where the resident
/// set cannot be read (the caller then plans without it and should say so).
pub fn overhead(loaded: u64, threads: usize) -> Option<u64> {
    resident_bytes().map(|now| overhead_from(now, loaded, threads))
}

fn overhead_from(resident: u64, loaded: u64, threads: usize) -> u64 {
    resident.saturating_sub(loaded) + threads as u64 * PER_THREAD + SLACK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_gives_resident_pages() {
        assert_eq!(
            statm_resident("5000 1200 300 10 0 900 0\n", 4096),
            Some(1200 * 4096)
        );
        assert_eq!(statm_resident("5000", 4096), None);
        assert_eq!(statm_resident("5000 lots 1", 4096), None);
        assert_eq!(statm_resident(&format!("1 {}", u64::MAX), 4096), None);
    }

    #[test]
    fn this_process_has_a_plausible_resident_set() {
        // A test binary maps at least its code; no machine here has a petabyte.
        let r = resident_bytes().expect("the resident set is readable on this system");
        assert!(r > 1 << 20 && r < 1 << 50, "{r}");
    }

    #[test]
    fn overhead_is_what_the_weights_do_not_explain_plus_threads_and_slack() {
        assert_eq!(overhead_from(100 << 20, 60 << 20, 0), (40 << 20) + SLACK);
        assert_eq!(
            overhead_from(100 << 20, 60 << 20, 4),
            (40 << 20) + 4 * PER_THREAD + SLACK
        );
        // Weights counted but not yet resident (a lazily touched map) leave no negative.
        assert_eq!(overhead_from(10 << 20, 60 << 20, 0), SLACK);
    }
}
