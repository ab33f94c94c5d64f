//! A pool of reader threads that executes one batch of coalesced reads at a time.

use super::{plan_reads, AlignedBuf, CoalesceOptions, FlashFile, ReadOp, StorageError, ALIGN};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Ops longer than this (or than `max_read`, whichever is larger) are issued as several reads
/// of this size into consecutive parts of the op's staging region, so that one long op (a run
/// of bundles that share pages) still uses all readers. 128 KiB is where the measured disk
/// reaches its plateau.
const MIN_PIECE: usize = 128 << 10;

/// What one [`ReadPool::read_ranges`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Coalesced ops planned by [`plan_reads`].
    pub ops: usize,
    /// Read calls issued (ops longer than the piece size are split into several).
    pub reads: usize,
    /// Bytes read from the file, including alignment and merged gaps.
    pub bytes_read: u64,
    /// Bytes of the requested ranges.
    pub bytes_useful: u64,
    /// Time from the call until every read finished (planning and reads, not `deliver`).
    pub wall: Duration,
}

/// Reader threads plus a reusable, 4 KiB-aligned staging area.
///
/// `threads` is the number of reads in flight: the calling thread reads too, alongside
/// `threads - 1` workers, so `threads = 1` is plain synchronous reading with no hand-off.
/// Concurrent `read_ranges` calls on one pool are serialised (the staging area is shared).
pub struct ReadPool {
    file: Arc<FlashFile>,
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    batch: Mutex<BatchState>,
}

struct BatchState {
    staging: AlignedBuf,
    ops: Vec<ReadOp>,
    /// Staging offset of each op.
    op_stage: Vec<usize>,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
}

struct Slot {
    generation: u64,
    job: Option<Arc<Job>>,
    shutdown: bool,
}

#[derive(Clone, Copy)]
struct Item {
    offset: u64,
    len: usize,
    stage: usize,
}

impl Item {
    /// The reads of `len` bytes at `offset`, `piece` bytes at most each, landing from `stage`
    /// on in the staging region.
    fn pieces(offset: u64, len: usize, stage: usize, piece: usize) -> impl Iterator<Item = Item> {
        (0..len).step_by(piece.max(1)).map(move |at| Item {
            offset: offset + at as u64,
            len: piece.min(len - at),
            stage: stage + at,
        })
    }
}

/// The largest single read: `max_read`, but at least [`MIN_PIECE`], in whole aligned blocks.
fn piece_len(opts: &CoalesceOptions) -> usize {
    opts.max_read
        .max(MIN_PIECE)
        .next_multiple_of(opts.align.max(1))
}

struct StagingPtr(*mut u8);
// SAFETY: the pointer is only dereferenced for disjoint regions (one per item), while the
// owning `read_ranges` call keeps the staging buffer alive and borrowed exclusively.
unsafe impl Send for StagingPtr {}
unsafe impl Sync for StagingPtr {}

struct Job {
    file: Arc<FlashFile>,
    items: Vec<Item>,
    staging: StagingPtr,
    staging_len: usize,
    next: AtomicUsize,
    failed: AtomicBool,
    done: Mutex<(usize, Option<StorageError>)>,
    done_cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another reader panicked; the data (counters) stay usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Job {
    /// Claims and executes items until none are left.
    fn run(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&item) = self.items.get(i) else {
                return;
            };
            let result = if self.failed.load(Ordering::Relaxed) {
                Ok(())
            } else {
                catch_unwind(AssertUnwindSafe(|| self.read(item))).unwrap_or_else(|_| {
                    Err(StorageError::WorkerPanic {
                        path: self.file.path().to_path_buf(),
                    })
                })
            };
            let mut done = lock(&self.done);
            done.0 += 1;
            if let Err(e) = result {
                self.failed.store(true, Ordering::Relaxed);
                done.1.get_or_insert(e);
            }
            if done.0 == self.items.len() {
                self.done_cv.notify_all();
            }
        }
    }

    fn read(&self, item: Item) -> Result<(), StorageError> {
        if item
            .stage
            .checked_add(item.len)
            .is_none_or(|e| e > self.staging_len)
        {
            return Err(StorageError::InvalidRequest(format!(
                "internal: staging region {}+{} outside {} bytes; this is a bug in llmflash",
                item.stage, item.len, self.staging_len
            )));
        }
        // SAFETY: in bounds (checked above); items have disjoint staging regions and each is
        // claimed by exactly one thread; the buffer outlives the job's use (the caller waits).
        let buf =
            unsafe { std::slice::from_raw_parts_mut(self.staging.0.add(item.stage), item.len) };
        let n = self.file.read_at_most(item.offset, buf)?;
        // Short only at the end of the file, and ranges were checked to end before it.
        let needed = (self.file.len().saturating_sub(item.offset)).min(item.len as u64);
        if (n as u64) < needed {
            return Err(StorageError::PastEnd {
                path: self.file.path().to_path_buf(),
                offset: item.offset,
                len: item.len,
                file_len: item.offset + n as u64,
            });
        }
        Ok(())
    }
}

fn worker(shared: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut slot = lock(&shared.slot);
            while slot.generation == seen && !slot.shutdown {
                slot = shared.wake.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
            if slot.shutdown {
                return;
            }
            seen = slot.generation;
            slot.job.clone()
        };
        if let Some(job) = job {
            job.run();
        }
    }
}

impl ReadPool {
    /// A pool reading `file` with up to `threads` reads in flight (0 is taken as 1).
    pub fn new(file: Arc<FlashFile>, threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                generation: 0,
                job: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("llmflash-read-{i}"))
                .spawn(move || worker(s))
            {
                Ok(h) => workers.push(h),
                Err(e) => {
                    log::warn!(
                        "could not start reader thread {i} of {threads} ({e}); \
                         reading with {} threads",
                        workers.len() + 1
                    );
                    break;
                }
            }
        }
        let threads = workers.len() + 1;
        Self {
            file,
            threads,
            shared,
            workers,
            batch: Mutex::new(BatchState {
                staging: AlignedBuf::new(0),
                ops: Vec::new(),
                op_stage: Vec::new(),
            }),
        }
    }

    /// The file read.
    pub fn file(&self) -> &Arc<FlashFile> {
        &self.file
    }

    /// Reads in flight at most (the calling thread included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Bytes held by the staging area now (it grows to the largest batch's coalesced size).
    pub fn staging_bytes(&self) -> usize {
        lock(&self.batch).staging.len()
    }

    /// Reads `ranges` (`(offset, len)`, sorted by offset, inside the file) coalesced per
    /// `opts`, then calls `deliver(i, bytes)` once per range `i`, in index order, on the calling
    /// thread, with exactly that range's bytes. Delivery happens **after all reads of the batch
    /// have finished** (the slices point into the pool's staging area and are valid only during
    /// the call). On error nothing is delivered.
    ///
    /// The same code path serves files opened without direct I/O. With direct I/O,
    /// `opts.align` must be a multiple of 4096.
    pub fn read_ranges(
        &self,
        ranges: &[(u64, usize)],
        opts: &CoalesceOptions,
        deliver: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<ReadStats, StorageError> {
        let start = Instant::now();
        self.validate(ranges, opts)?;
        let mut guard = lock(&self.batch);
        let state = &mut *guard;

        state.ops.clear();
        state.ops.extend(plan_reads(ranges, opts));
        state.op_stage.clear();
        let mut total = 0usize;
        for op in &state.ops {
            state.op_stage.push(total);
            total = total.checked_add(op.len).ok_or_else(|| {
                StorageError::InvalidRequest("the batch is larger than the address space".into())
            })?;
        }
        if total > state.staging.len() {
            let grown = total.max(state.staging.len().saturating_mul(3) / 2);
            state.staging = AlignedBuf::new(0); // free the old one first
            state.staging = AlignedBuf::try_new(grown)?;
        }

        let piece = piece_len(opts);
        let items: Vec<Item> = (state.ops.iter().zip(&state.op_stage))
            .flat_map(|(op, &stage)| Item::pieces(op.offset, op.len, stage, piece))
            .collect();
        let stats_base = ReadStats {
            ops: state.ops.len(),
            reads: items.len(),
            bytes_read: state.ops.iter().map(|o| o.len as u64).sum(),
            bytes_useful: ranges.iter().map(|r| r.1 as u64).sum(),
            wall: Duration::ZERO,
        };

        self.execute(items, state.staging.as_mut_ptr(), state.staging.len())?;
        let stats = ReadStats {
            wall: start.elapsed(),
            ..stats_base
        };

        // Every range's bytes, in index order.
        let staging: &[u8] = &state.staging;
        let mut next = 0usize;
        for (op, &stage) in state.ops.iter().zip(&state.op_stage) {
            let covered = ranges.get(op.first..=op.last).unwrap_or_default();
            for (i, &(off, len)) in (op.first..).zip(covered) {
                if len == 0 {
                    deliver(i, &[]);
                    continue;
                }
                let bytes = off
                    .checked_sub(op.offset)
                    .and_then(|d| stage.checked_add(usize::try_from(d).ok()?))
                    .and_then(|from| staging.get(from..from.checked_add(len)?));
                let bytes = bytes.ok_or_else(|| {
                    StorageError::InvalidRequest(format!(
                        "internal: range {i} is not inside its read; this is a bug in llmflash"
                    ))
                })?;
                deliver(i, bytes);
            }
            next = op.last + 1;
        }
        // Empty ranges that no op covers (all ranges empty).
        for i in next..ranges.len() {
            deliver(i, &[]);
        }
        Ok(stats)
    }

    /// Reads the `len` bytes at `offset` straight into `dst`, with no staging copy: the read
    /// covers the aligned blocks around the range, `dst` is replaced by a larger buffer only
    /// if it cannot hold them, and the range's bytes are `dst[skip..skip + len]` for the
    /// returned `skip`. The span is read in pieces of `opts.max_read` by every reader at once.
    /// This is what a caller that owns the destination wants (a prefetched tail, a streamed
    /// table): the copy out of the staging area cost a fifth of the read time of 1 MiB reads.
    pub fn read_span(
        &self,
        offset: u64,
        len: usize,
        opts: &CoalesceOptions,
        dst: &mut AlignedBuf,
    ) -> Result<(ReadStats, usize), StorageError> {
        let start = Instant::now();
        self.validate(&[(offset, len)], opts)?;
        if len == 0 {
            return Ok((ReadStats::default(), 0));
        }
        let align = opts.align.max(1) as u64;
        let first = offset - offset % align;
        let end = (offset + len as u64).next_multiple_of(align);
        let span = usize::try_from(end - first).map_err(|_| {
            StorageError::InvalidRequest("the span is larger than the address space".into())
        })?;
        if dst.len() < span {
            *dst = AlignedBuf::new(0); // free the old one first
            *dst = AlignedBuf::try_new(span)?;
        }
        let items: Vec<Item> = Item::pieces(first, span, 0, piece_len(opts)).collect();
        let reads = items.len();
        // One job at a time on the shared workers, as in `read_ranges`.
        let _batch = lock(&self.batch);
        self.execute(items, dst.as_mut_ptr(), dst.len())?;
        let stats = ReadStats {
            ops: 1,
            reads,
            bytes_read: (span as u64).min(self.file.len() - first),
            bytes_useful: len as u64,
            wall: start.elapsed(),
        };
        Ok((stats, (offset - first) as usize))
    }

    /// Runs `items` on the calling thread and the workers, each read landing at its `stage`
    /// offset of the `staging_len` bytes at `staging`; returns when all have finished.
    fn execute(
        &self,
        items: Vec<Item>,
        staging: *mut u8,
        staging_len: usize,
    ) -> Result<(), StorageError> {
        let n_items = items.len();
        let job = Arc::new(Job {
            file: self.file.clone(),
            items,
            staging: StagingPtr(staging),
            staging_len,
            next: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            done: Mutex::new((0, None)),
            done_cv: Condvar::new(),
        });
        let helpers = self.workers.len().min(n_items.saturating_sub(1));
        if helpers > 0 {
            let mut slot = lock(&self.shared.slot);
            slot.generation += 1;
            slot.job = Some(job.clone());
            drop(slot);
            for _ in 0..helpers {
                self.shared.wake.notify_one();
            }
        }
        job.run();
        let error = {
            let mut done = lock(&job.done);
            while done.0 < n_items {
                done = job.done_cv.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            done.1.take()
        };
        if helpers > 0 {
            lock(&self.shared.slot).job = None;
        }
        error.map_or(Ok(()), Err)
    }

    fn validate(
        &self,
        ranges: &[(u64, usize)],
        opts: &CoalesceOptions,
    ) -> Result<(), StorageError> {
        if self.file.is_direct() && (opts.align == 0 || !opts.align.is_multiple_of(ALIGN)) {
            return Err(StorageError::InvalidRequest(format!(
                "direct I/O needs CoalesceOptions::align to be a multiple of {ALIGN}, found {}; \
                 use CoalesceOptions::default()",
                opts.align
            )));
        }
        let mut prev = 0u64;
        for (i, &(off, len)) in ranges.iter().enumerate() {
            if off < prev {
                return Err(StorageError::InvalidRequest(format!(
                    "ranges must be sorted by offset, but range {i} starts at {off}, before \
                     range {} at {prev}; sort them (and keep the permutation) before reading",
                    i - 1
                )));
            }
            prev = off;
            let end = off.checked_add(len as u64);
            if end.is_none_or(|e| e > self.file.len()) {
                return Err(StorageError::PastEnd {
                    path: self.file.path().to_path_buf(),
                    offset: off,
                    len,
                    file_len: self.file.len(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        lock(&self.shared.slot).shutdown = true;
        self.shared.wake.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool")
            .field("file", &self.file.path())
            .field("threads", &self.threads)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::TempFile;
    use super::*;
    use crate::rng::Rng;

    fn random_sorted_ranges(rng: &mut Rng, file_len: u64, n: usize) -> Vec<(u64, usize)> {
        let mut r: Vec<(u64, usize)> = (0..n)
            .map(|_| {
                let len = match rng.below_u64(4) {
                    0 => 1332,
                    1 => rng.below_u64(300_000) as usize,
                    _ => rng.below_u64(20_000) as usize,
                };
                let len = len.min(file_len as usize);
                (rng.below_u64(file_len - len as u64 + 1), len)
            })
            .collect();
        r.sort();
        r
    }

    #[test]
    fn read_ranges_matches_std_reads() {
        let len = 8 * 1024 * 1024 + 1234; // not a page multiple: the last page is partial
        let tf = TempFile::random("pool", len, 3);
        let data = std::fs::read(&tf.path).unwrap();
        let mut rng = Rng::new(11);
        for direct in [true, false] {
            let file = Arc::new(FlashFile::open(&tf.path, direct).unwrap());
            for threads in [1, 3, 8] {
                let pool = ReadPool::new(file.clone(), threads);
                assert_eq!(pool.threads(), threads);
                for case in 0..25 {
                    let n = [0, 1, 5, 40, 300][case % 5];
                    let mut ranges = random_sorted_ranges(&mut rng, len, n);
                    if case % 7 == 0 {
                        ranges.push((len - 10, 10)); // the file's last bytes
                    }
                    let opts = [
                        CoalesceOptions::default(),
                        CoalesceOptions::uncoalesced(),
                        CoalesceOptions {
                            align: 4096,
                            max_gap: 1 << 20,
                            max_read: 1 << 20,
                        },
                    ][case % 3];
                    let mut seen = vec![0usize; ranges.len()];
                    let stats = pool
                        .read_ranges(&ranges, &opts, &mut |i, bytes| {
                            let (o, l) = ranges[i];
                            assert_eq!(bytes, &data[o as usize..o as usize + l], "range {i}");
                            seen[i] += 1;
                        })
                        .unwrap();
                    assert!(seen.iter().all(|&c| c == 1));
                    let useful: u64 = ranges.iter().map(|r| r.1 as u64).sum();
                    assert_eq!(stats.bytes_useful, useful);
                    assert!(stats.bytes_read >= useful.min(stats.bytes_read));
                    assert!(stats.reads >= stats.ops);
                }
            }
        }
    }

    #[test]
    fn read_span_lands_the_range_in_the_callers_buffer() {
        let len = 3 * 1024 * 1024 + 777; // the last page is partial
        let tf = TempFile::random("pool-span", len, 4);
        let data = std::fs::read(&tf.path).unwrap();
        let mut rng = Rng::new(17);
        for direct in [true, false] {
            let file = Arc::new(FlashFile::open(&tf.path, direct).unwrap());
            for threads in [1, 3, 8] {
                let pool = ReadPool::new(file.clone(), threads);
                let mut buf = AlignedBuf::new(0);
                for case in 0..40 {
                    let n = match case % 4 {
                        0 => 0,
                        1 => rng.below_u64(5000) as usize,
                        _ => rng.below_u64(2 << 20) as usize,
                    };
                    let off = match case % 5 {
                        0 => len - n as u64, // ends with the file
                        _ => rng.below_u64(len - n as u64 + 1),
                    };
                    let opts = CoalesceOptions {
                        max_read: [128 << 10, 1 << 20][case % 2],
                        ..CoalesceOptions::default()
                    };
                    let (stats, skip) = pool.read_span(off, n, &opts, &mut buf).unwrap();
                    let want = &data[off as usize..off as usize + n];
                    assert!(
                        &buf[skip..skip + n] == want,
                        "{direct} {threads} case {case}"
                    );
                    assert_eq!(stats.bytes_useful, n as u64);
                    assert!(stats.bytes_read >= n as u64);
                    assert!(skip < ALIGN);
                }
                // No staging: the pool's own area was never used.
                assert_eq!(pool.staging_bytes(), 0);
            }
        }
        let pool = ReadPool::new(Arc::new(FlashFile::open(&tf.path, true).unwrap()), 2);
        let e = pool
            .read_span(
                len - 5,
                10,
                &CoalesceOptions::default(),
                &mut AlignedBuf::new(0),
            )
            .unwrap_err();
        assert!(matches!(e, StorageError::PastEnd { .. }), "{e}");
    }

    #[test]
    fn long_ops_are_split_into_pieces() {
        let tf = TempFile::random("pool-pieces", 4 << 20, 5);
        let data = std::fs::read(&tf.path).unwrap();
        let pool = ReadPool::new(Arc::new(FlashFile::open(&tf.path, true).unwrap()), 4);
        // 2000 back-to-back 1332-byte bundles: pages are shared at every boundary except at
        // bundle 1024 (1024 * 1332 is a page multiple), so two long ops, read in pieces.
        let ranges: Vec<(u64, usize)> = (0..2000).map(|i| (i * 1332, 1332)).collect();
        let quarter_mib = CoalesceOptions {
            max_read: 256 << 10,
            ..CoalesceOptions::default()
        };
        let mut count = 0;
        let stats = pool
            .read_ranges(&ranges, &quarter_mib, &mut |i, b| {
                assert_eq!(b, &data[i * 1332..(i + 1) * 1332]);
                count += 1;
            })
            .unwrap();
        assert_eq!(count, 2000);
        assert_eq!(stats.ops, 2);
        assert!(stats.reads >= 10, "{stats:?}");
        assert!(pool.staging_bytes() >= 2000 * 1332);
    }

    #[test]
    fn bad_requests_are_errors() {
        let tf = TempFile::random("pool-bad", 100_000, 6);
        let pool = ReadPool::new(Arc::new(FlashFile::open(&tf.path, true).unwrap()), 2);
        let o = CoalesceOptions::default();
        let e = pool
            .read_ranges(&[(5000, 1), (0, 1)], &o, &mut |_, _| {})
            .unwrap_err();
        assert!(e.to_string().contains("sorted"), "{e}");
        let e = pool
            .read_ranges(&[(99_990, 20)], &o, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(e, StorageError::PastEnd { .. }), "{e}");
        let e = pool
            .read_ranges(&[(u64::MAX, 20)], &o, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(e, StorageError::PastEnd { .. }), "{e}");
        if pool.file().is_direct() {
            let bad = CoalesceOptions { align: 512, ..o };
            let e = pool
                .read_ranges(&[(0, 20)], &bad, &mut |_, _| {})
                .unwrap_err();
            assert!(e.to_string().contains("multiple of 4096"), "{e}");
        }
        // Still usable afterwards; all-empty ranges are delivered empty.
        let mut n = 0;
        pool.read_ranges(&[(3, 0), (7, 0)], &o, &mut |_, b| {
            assert!(b.is_empty());
            n += 1;
        })
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn fallback_file_uses_the_same_path() {
        let tf = TempFile::random("pool-fallback", 50_000, 7);
        let data = std::fs::read(&tf.path).unwrap();
        let file = FlashFile::open_with(&tf.path, true, |_| {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        })
        .unwrap();
        assert!(!file.is_direct());
        let pool = ReadPool::new(Arc::new(file), 3);
        // Unaligned options are fine without direct I/O.
        let o = CoalesceOptions {
            align: 1,
            max_gap: 0,
            max_read: 100,
        };
        let ranges = [(1u64, 10usize), (5, 3), (40_000, 9_000)];
        pool.read_ranges(&ranges, &o, &mut |i, b| {
            let (off, l) = ranges[i];
            assert_eq!(b, &data[off as usize..off as usize + l]);
        })
        .unwrap();
    }
}
