//! Reads started now and collected later, so the SSD works while the CPU computes.
//!
//! A [`Prefetcher`] owns one background thread that takes byte ranges in order, reads each
//! through a [`ReadPool`] (coalesced, concurrent, direct) into a buffer the caller lent it, and
//! hands the buffer back. The flash path uses it where the next reads are known before the
//! current layer finishes: with every neuron computed and each window a fixed prefix of its
//! layer, every token reads the same tails.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::{CoalesceOptions, ReadPool, ReadStats, StorageError};

/// Largest single `read_ranges` call of a prefetch: a longer range is read in pieces of this
/// size, so the pool's staging area (counted by the planner) stays this small.
pub const PREFETCH_CHUNK: usize = 4 << 20;

/// A finished prefetch.
pub struct Fetched {
    /// The caller's tag for what was read.
    pub tag: usize,
    /// The lent buffer, holding exactly the range's bytes (on success).
    pub buf: Vec<u8>,
    /// What was read; its `wall` is the time the background thread spent (reads and copies).
    pub result: Result<ReadStats, StorageError>,
}

struct Request {
    tag: usize,
    offset: u64,
    len: usize,
    buf: Vec<u8>,
}

/// One background reader (see the module docs).
pub struct Prefetcher {
    requests: Option<Sender<Request>>,
    done: Receiver<Fetched>,
    in_flight: usize,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// A prefetcher reading through `pool` with `opts`. Fails only if the thread cannot start.
    pub fn new(pool: Arc<ReadPool>, opts: CoalesceOptions) -> std::io::Result<Prefetcher> {
        let (requests, rx) = channel::<Request>();
        let (tx, done) = channel();
        let worker = std::thread::Builder::new()
            .name("llmflash-prefetch".into())
            .spawn(move || {
                for r in rx {
                    if tx.send(fetch(&pool, &opts, r)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Prefetcher {
            requests: Some(requests),
            done,
            in_flight: 0,
            worker: Some(worker),
        })
    }

    /// Starts reading `len` bytes at `offset` into `buf` (resized to `len`).
    pub fn start(&mut self, tag: usize, offset: u64, len: usize, buf: Vec<u8>) {
        let sender = self.requests.as_ref().expect("open until drop");
        sender
            .send(Request {
                tag,
                offset,
                len,
                buf,
            })
            .expect("the prefetch thread runs until the prefetcher is dropped");
        self.in_flight += 1;
    }

    /// Reads started and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The oldest started read, once it has finished. Panics if none is in flight.
    pub fn wait(&mut self) -> Fetched {
        assert!(self.in_flight > 0, "no prefetch in flight");
        self.in_flight -= 1;
        self.done
            .recv()
            .expect("the prefetch thread answers every request")
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn fetch(pool: &ReadPool, opts: &CoalesceOptions, r: Request) -> Fetched {
    let t = Instant::now();
    let Request {
        tag,
        offset,
        len,
        mut buf,
    } = r;
    buf.resize(len, 0);
    let mut total = ReadStats::default();
    let mut result = Ok(());
    for at in (0..len).step_by(PREFETCH_CHUNK) {
        let n = PREFETCH_CHUNK.min(len - at);
        let piece = &mut buf[at..at + n];
        match pool.read_ranges(&[(offset + at as u64, n)], opts, &mut |_, b| {
            piece.copy_from_slice(b)
        }) {
            Ok(s) => {
                total.ops += s.ops;
                total.reads += s.reads;
                total.bytes_read += s.bytes_read;
                total.bytes_useful += s.bytes_useful;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    total.wall = t.elapsed();
    Fetched {
        tag,
        buf,
        result: result.map(|()| total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::test_util::TempFile;
    use crate::storage::FlashFile;

    #[test]
    fn prefetches_come_back_in_order_with_the_file_bytes() {
        let len = (2 * PREFETCH_CHUNK + 12345) as u64;
        let f = TempFile::random("prefetch", len, 7);
        let bytes = std::fs::read(&f.path).unwrap();
        let file = Arc::new(FlashFile::open(&f.path, true).unwrap());
        let pool = Arc::new(ReadPool::new(file, 3));
        let mut p = Prefetcher::new(pool, CoalesceOptions::default()).unwrap();
        // Unaligned ranges, one longer than a chunk, one empty; buffers of any prior size.
        let ranges = [(100u64, 2 * PREFETCH_CHUNK + 5), (4097, 3000), (0, 0)];
        for (tag, &(off, n)) in ranges.iter().enumerate() {
            p.start(tag, off, n, vec![9u8; 17]);
        }
        assert_eq!(p.in_flight(), 3);
        for (tag, &(off, n)) in ranges.iter().enumerate() {
            let got = p.wait();
            assert_eq!(got.tag, tag);
            let stats = got.result.unwrap();
            assert_eq!(stats.bytes_useful, n as u64);
            assert!(
                got.buf == bytes[off as usize..off as usize + n],
                "range {tag}"
            );
        }
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_read_past_the_end_is_an_error_not_a_hang() {
        let f = TempFile::random("prefetch-end", 10_000, 8);
        let file = Arc::new(FlashFile::open(&f.path, true).unwrap());
        let mut p =
            Prefetcher::new(Arc::new(ReadPool::new(file, 2)), CoalesceOptions::default()).unwrap();
        p.start(0, 8000, 5000, Vec::new());
        assert!(p.wait().result.is_err());
        // The thread is still serving.
        p.start(1, 0, 100, Vec::new());
        assert!(p.wait().result.is_ok());
    }
}
