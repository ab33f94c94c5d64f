//! Reads started now and collected later, so the SSD works while the CPU computes.
//!
//! A [`Prefetcher`] owns one background thread that takes byte ranges in order, reads each
//! through a [`ReadPool`] (concurrent, direct) straight into an aligned buffer the caller lent
//! it, and hands the buffer back. The flash path uses it where the next reads are known before
//! the current layer finishes: with every neuron computed and each window a fixed prefix of its
//! layer, every token reads the same tails. Requests queue: while the caller works on one
//! buffer, the thread can go from one read to the next with no hand-off in between.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{AlignedBuf, CoalesceOptions, ReadPool, ReadStats, StorageError, ALIGN};

/// A finished prefetch.
pub struct Fetched {
    /// The caller's tag for what was read.
    pub tag: usize,
    /// The lent buffer (or a larger one that replaced it), holding the range's bytes at
    /// [`Fetched::bytes`] on success.
    pub buf: AlignedBuf,
    /// Where the range starts in `buf` (reads cover whole aligned blocks).
    skip: usize,
    len: usize,
    /// What was read; its `wall` is the time the background thread spent reading.
    pub result: Result<ReadStats, StorageError>,
}

impl Fetched {
    /// The range's bytes (empty if the read failed).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.skip..self.skip + self.len]
    }
}

/// Bytes of a buffer that holds a `len`-byte range at any offset: the range rounded out to
/// whole aligned blocks at both ends. What the planner counts per prefetch buffer.
pub const fn buffer_bytes(len: usize) -> usize {
    len.next_multiple_of(ALIGN) + ALIGN
}

struct Request {
    tag: usize,
    offset: u64,
    len: usize,
    buf: AlignedBuf,
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

    /// Starts reading `len` bytes at `offset` into `buf` (replaced by a larger buffer if it
    /// cannot hold them); reads started earlier finish first.
    pub fn start(&mut self, tag: usize, offset: u64, len: usize, buf: AlignedBuf) {
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
    let Request {
        tag,
        offset,
        len,
        mut buf,
    } = r;
    let (result, skip, len) = match pool.read_span(offset, len, opts, &mut buf) {
        Ok((stats, skip)) => (Ok(stats), skip, len),
        Err(e) => (Err(e), 0, 0),
    };
    Fetched {
        tag,
        buf,
        skip,
        len,
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::test_util::TempFile;
    use crate::storage::FlashFile;

    #[test]
    fn prefetches_come_back_in_order_with_the_file_bytes() {
        let len = (9 << 20) + 12345;
        let f = TempFile::random("prefetch", len, 7);
        let bytes = std::fs::read(&f.path).unwrap();
        let file = Arc::new(FlashFile::open(&f.path, true).unwrap());
        let pool = Arc::new(ReadPool::new(file, 3));
        let mut p = Prefetcher::new(pool, CoalesceOptions::default()).unwrap();
        // Unaligned ranges, one longer than a chunk, one empty; buffers of any prior size.
        let ranges = [(100u64, (8 << 20) + 5), (4097, 3000), (0, 0), (len - 7, 7)];
        for (tag, &(off, n)) in ranges.iter().enumerate() {
            p.start(tag, off, n, AlignedBuf::new(17));
        }
        assert_eq!(p.in_flight(), 4);
        for (tag, &(off, n)) in ranges.iter().enumerate() {
            let got = p.wait();
            assert_eq!(got.tag, tag);
            let stats = *got.result.as_ref().unwrap();
            assert_eq!(stats.bytes_useful, n as u64);
            assert!(
                got.bytes() == &bytes[off as usize..off as usize + n],
                "range {tag}"
            );
            assert!(got.buf.len() <= buffer_bytes(n).max(4096), "range {tag}");
        }
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_read_past_the_end_is_an_error_not_a_hang() {
        let f = TempFile::random("prefetch-end", 10_000, 8);
        let file = Arc::new(FlashFile::open(&f.path, true).unwrap());
        let mut p =
            Prefetcher::new(Arc::new(ReadPool::new(file, 2)), CoalesceOptions::default()).unwrap();
        p.start(0, 8000, 5000, AlignedBuf::new(0));
        let failed = p.wait();
        assert!(failed.result.is_err());
        assert!(failed.bytes().is_empty());
        // The thread is still serving.
        p.start(1, 0, 100, AlignedBuf::new(0));
        assert!(p.wait().result.is_ok());
    }
}
