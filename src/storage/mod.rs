//! Direct-I/O storage: the FFN bundles stay on flash and each token reads only what it needs.
//!
//! * [`AlignedBuf`]: 4 KiB-aligned, zeroed heap buffers (what `O_DIRECT` needs).
//! * [`FlashFile`]: a read-only file with the page cache bypassed (`O_DIRECT` on Linux,
//!   `F_NOCACHE` on macOS), falling back to buffered reads where the filesystem refuses.
//! * [`plan_reads`]: read coalescing, a pure function: byte ranges -> aligned read operations.
//! * [`ReadPool`]: a small pool of reader threads that executes one batch of coalesced reads
//!   concurrently into a reusable staging area and hands each range's bytes to the caller.
//! * [`Prefetcher`]: reads started now and collected later, on a background thread, straight
//!   into the caller's aligned buffers, so that reads known in advance overlap compute.
//! * [`probe`] / [`DiskCurve`]: the measured read-throughput curve (chunk size x concurrency)
//!   that the memory planner uses to price reads.
//! * [`input`]: inputs checked to be regular files before they are opened (a FIFO would block),
//!   and text read with a size limit.
//! * [`output`] / [`AtomicOutput`]: every output written to a temporary file and renamed over
//!   its destination when complete; special files and the inputs themselves are refused.
//!
//! The page cache must be bypassed for any of this to mean something: a buffered read of a
//! cached page runs at DRAM speed and hides the cost the paper is about, and the cache itself
//! spends memory that the budget does not see.

mod aligned;
mod coalesce;
mod file;
pub mod input;
pub mod output;
mod pool;
mod prefetch;
mod probe;

pub use aligned::AlignedBuf;
pub use coalesce::{plan_reads, CoalesceOptions, ReadOp};
pub use file::FlashFile;
pub use output::{check_output, write_atomically, AtomicOutput, OutputError};
pub use pool::{ReadPool, ReadStats};
pub use prefetch::{buffer_bytes, Fetched, Prefetcher};
pub use probe::{
    probe, CurvePoint, DiskCurve, DEFAULT_CHUNKS, DEFAULT_CONCURRENCIES, DEFAULT_PROBE_FILE_SIZE,
};

use std::path::PathBuf;

/// The alignment, in bytes, of every direct read: offset, length and buffer address.
pub const ALIGN: usize = 4096;

/// Errors of the storage module. Each message says what was expected, what was found and what
/// to do about it.
/// A read of model weights from flash that failed while decoding: what was being read (a
/// layer's FFN bundles, a row of a streamed table), and the storage error. The decode step
/// stops with it; nothing computed from a failed read is used.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} failed")]
pub struct ReadError {
    pub what: String,
    #[source]
    pub source: StorageError,
}

impl ReadError {
    pub fn new(what: impl Into<String>, source: StorageError) -> ReadError {
        ReadError {
            what: what.into(),
            source,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "cannot open `{path}` for reading: {error}; check that the file exists and is readable"
    )]
    // The OS errors are in the messages, so they are not also `source`s (printed twice).
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "reading {len} bytes at offset {offset} of `{path}` failed: {error}; \
         the file may be truncated or the device failing"
    )]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        error: std::io::Error,
    },
    #[error(
        "reading {len} bytes at offset {offset} of `{path}`: the file ends at {file_len} bytes; \
         expected the whole range inside the file (is the file truncated or the wrong one?)"
    )]
    PastEnd {
        path: PathBuf,
        offset: u64,
        len: usize,
        file_len: u64,
    },
    #[error(
        "direct read of `{path}` needs {what} to be a multiple of {align}, found {value}; \
         use AlignedBuf and aligned offsets/lengths (plan_reads does this), or open with direct = false"
    )]
    Misaligned {
        path: PathBuf,
        what: &'static str,
        value: u64,
        align: usize,
    },
    #[error(
        "the bundle of {len} bytes at offset {offset} of `{path}` has checksum {computed:#010x}, \
         the image records {stored:#010x}: the file is damaged (or changed while in use); \
         convert the model again"
    )]
    Checksum {
        path: PathBuf,
        offset: u64,
        len: usize,
        stored: u32,
        computed: u32,
    },
    #[error("invalid read request: {0}")]
    InvalidRequest(String),
    #[error("cannot allocate an aligned buffer of {bytes} bytes; expected a size the allocator can serve, lower the batch size or memory use")]
    Alloc { bytes: usize },
    #[error("disk probe: {0}")]
    Probe(String),
    #[error("disk curve file `{path}`: {message}")]
    Curve { path: PathBuf, message: String },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("a reader thread panicked while reading `{path}`; this is a bug in llmflash, please report it")]
    WorkerPanic { path: PathBuf },
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::io::Write;
    use std::path::PathBuf;

    use crate::rng::Rng;

    /// A file of random bytes under `target/` (not /tmp, which may be tmpfs), removed on drop.
    pub struct TempFile {
        pub path: PathBuf,
    }
    impl TempFile {
        pub fn random(name: &str, len: u64, seed: u64) -> Self {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/storage-test-tmp");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{name}-{}-{seed}", std::process::id()));
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            let mut rng = Rng::new(seed);
            let mut block = vec![0u8; 1 << 16];
            let mut left = len;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                rng.fill_bytes(&mut block[..n]);
                f.write_all(&block[..n]).unwrap();
                left -= n as u64;
            }
            f.flush().unwrap();
            Self { path }
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
