//! The embedding table and output head, resident or streamed from the flash image.
//!
//! In a small model they are a large share of what must stay in memory (SmolLM2's tied
//! 49152 x 576 table is 29 MiB of its 45 MiB of non-FFN weights). Under a budget that cannot
//! hold them, the planner streams them: a token's embedding is one row read, and the output
//! head is read through in chunks of whole rows with direct, concurrent reads, each chunk
//! multiplied while the next two are read. That costs one pass over the table per token, which
//! the statistics count as I/O like the FFN's reads.

use crate::storage::{ReadError, StorageError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::image::{FlashImage, TensorEntry};
use crate::quant::DType;
use crate::quant::{self, ActivationBuffer};
use crate::storage::{
    buffer_bytes, AlignedBuf, CoalesceOptions, FlashFile, Prefetcher, ReadPool, ALIGN,
};

/// Bytes of rows read per batch when streaming: 1 MiB reads are on this disk's throughput
/// plateau, split into four concurrent pieces.
const STREAM_CHUNK: usize = 1 << 20;

/// Batches read ahead of the one being multiplied: with two queued, the reader goes from one
/// read to the next without waiting for the compute thread.
const STREAM_AHEAD: usize = 2;

/// Memory one streamed table needs: the batch being multiplied and the batches being read
/// (each in its own aligned buffer, which the reads land in directly), plus the read pool's
/// staging for a single row (an embedding lookup).
pub const STREAM_STAGING: usize = (STREAM_AHEAD + 1) * buffer_bytes(STREAM_CHUNK) + 2 * ALIGN;

/// The image tensors that may be streamed: the token embedding and the (untied) output head.
pub use crate::image::STREAMED_TABLES as TABLES;

/// Setting up a table failed: the image lacks it, its file cannot be opened or read, or its
/// bytes fail their checksum. The message names the table and the file.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Setup(String),
}

/// One matrix of the image with `rows` rows, either read into memory or streamed.
pub struct RowSource {
    name: String,
    dtype: DType,
    rows: usize,
    row_bytes: usize,
    offset: u64,
    /// Each row's CRC-32C, checked on every streamed read (see [`RowSource::check_rows`]).
    row_crc32c: Vec<u32>,
    /// The image file, for error messages.
    path: std::path::PathBuf,
    where_: Where,
    /// Cumulative streaming costs.
    pub bytes_read: u64,
    pub io: Duration,
}

enum Where {
    /// The table, at `skip..skip + len` of the buffer it was read into.
    Resident {
        buf: AlignedBuf,
        skip: usize,
        len: usize,
    },
    Streamed {
        pool: Arc<ReadPool>,
        opts: CoalesceOptions,
        /// Reads the next batches of rows while the current one is multiplied.
        prefetch: Prefetcher,
        /// Batch buffers not in flight (`STREAM_AHEAD + 1` in all).
        spare: Vec<AlignedBuf>,
    },
}

impl RowSource {
    /// Reads tensor `name` of `image` into memory (direct reads when `direct`).
    pub fn resident(
        image: &FlashImage,
        name: &str,
        direct: bool,
    ) -> Result<RowSource, StreamError> {
        let e = entry(image, name)?;
        let pool = open_pool(image, direct, 4)?;
        // Straight into the table's own buffer: no staging, no copy.
        let mut buf = AlignedBuf::new(0);
        let len = e.len as usize;
        let (_, skip) = pool
            .read_span(e.offset, len, &CoalesceOptions::default(), &mut buf)
            .map_err(|err| read_error(image, name, err))?;
        if crate::image::crc32(&buf[skip..skip + len]) != e.crc32 {
            return Err(StreamError::Setup(format!(
                "tensor {name} of {} fails its checksum: the image is damaged; convert it again",
                image.file().display()
            )));
        }
        Ok(RowSource::new(e, Where::Resident { buf, skip, len }))
    }

    /// Streams tensor `name` of `image` with `io_threads` concurrent reads.
    pub fn streamed(
        image: &FlashImage,
        name: &str,
        direct: bool,
        io_threads: usize,
    ) -> Result<RowSource, StreamError> {
        let e = entry(image, name)?;
        let pool = Arc::new(open_pool(image, direct, io_threads.max(1))?);
        let opts = CoalesceOptions::default();
        let prefetch = Prefetcher::new(pool.clone(), opts).map_err(|err| {
            StreamError::Setup(format!("cannot start the reader thread for {name}: {err}"))
        })?;
        let where_ = Where::Streamed {
            pool,
            opts,
            prefetch,
            spare: (0..=STREAM_AHEAD).map(|_| AlignedBuf::new(0)).collect(),
        };
        let mut source = RowSource::new(e, where_);
        source.path = image.file().to_path_buf();
        Ok(source)
    }

    /// Reads the first `rows` rows of tensor `name` into memory: a draft's output head over
    /// the lowest token ids. A byte-level BPE vocabulary numbers its tokens in merge order,
    /// and the earliest merges are the most frequent pairs, so a prefix of the ids is a
    /// frequency-ranked head (FR-Spec's idea) that needs no corpus counts.
    pub fn resident_prefix(
        image: &FlashImage,
        name: &str,
        direct: bool,
        rows: usize,
    ) -> Result<RowSource, StreamError> {
        let e = entry(image, name)?;
        let rows = rows.min(e.rows);
        let row_bytes = (e.len as usize) / e.rows.max(1);
        let pool = open_pool(image, direct, 4)?;
        let mut buf = AlignedBuf::new(0);
        let len = rows * row_bytes;
        let (_, skip) = pool
            .read_span(e.offset, len, &CoalesceOptions::default(), &mut buf)
            .map_err(|err| read_error(image, name, err))?;
        let at = |i: usize| e.offset + (i * row_bytes) as u64;
        check_rows(
            &e.row_crc32c,
            image.file(),
            at,
            row_bytes,
            0,
            &buf[skip..skip + len],
        )
        .map_err(|err| read_error(image, name, err))?;
        let mut source = RowSource::new(e, Where::Resident { buf, skip, len });
        source.rows = rows;
        Ok(source)
    }

    fn new(e: &TensorEntry, where_: Where) -> RowSource {
        RowSource {
            name: e.name.clone(),
            dtype: e.dtype,
            rows: e.rows,
            row_bytes: (e.len as usize) / e.rows.max(1),
            offset: e.offset,
            row_crc32c: e.row_crc32c.clone(),
            path: std::path::PathBuf::new(),
            where_,
            bytes_read: 0,
            io: Duration::ZERO,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Checks `bytes`, rows `first..` just streamed, against their recorded checksums.
    fn check_rows(&self, first: usize, bytes: &[u8]) -> Result<(), StorageError> {
        let at = |i: usize| self.offset + (i * self.row_bytes) as u64;
        check_rows(
            &self.row_crc32c,
            &self.path,
            at,
            self.row_bytes,
            first,
            bytes,
        )
    }

    /// Rows this source multiplies (all of the tensor's, or a resident prefix's).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether every row is read from the image on each pass.
    pub fn is_streamed(&self) -> bool {
        matches!(self.where_, Where::Streamed { .. })
    }

    /// Bytes held in memory: the table, or the read staging of one chunk.
    pub fn memory_bytes(&self) -> usize {
        match &self.where_ {
            Where::Resident { buf, .. } => buf.len(),
            Where::Streamed { .. } => STREAM_STAGING,
        }
    }

    /// Row `i`, dequantised into `out` (`cols` values).
    pub fn row(&mut self, i: usize, out: &mut [f32]) -> Result<(), ReadError> {
        let (rb, dtype) = (self.row_bytes, self.dtype);
        let done = |bytes: &[u8], out: &mut [f32]| {
            quant::dequantize(dtype, bytes, out).expect("rows are whole blocks (checked at load)")
        };
        match &self.where_ {
            Where::Resident { buf, skip, .. } => done(&buf[skip + i * rb..][..rb], out),
            Where::Streamed { pool, opts, .. } => {
                let t = Instant::now();
                let mut checked = Ok(());
                let stats = pool
                    .read_ranges(&[(self.offset + (i * rb) as u64, rb)], opts, &mut |_, b| {
                        checked = self.check_rows(i, b);
                        done(b, out)
                    })
                    .map_err(|e| ReadError::new(format!("row {i} of {}", self.name), e))?;
                checked.map_err(|e| ReadError::new(format!("row {i} of {}", self.name), e))?;
                self.bytes_read += stats.bytes_read;
                self.io += t.elapsed();
            }
        }
        Ok(())
    }

    /// `out = M act` over all rows.
    pub fn matvec(&mut self, act: &ActivationBuffer, out: &mut [f32]) -> Result<(), ReadError> {
        self.matvecs(std::slice::from_ref(act), out)
    }

    /// `outs[k] = M acts[k]` for every activation (`outs` holds `acts.len()` rows of `rows`
    /// values); a streamed table is read once for all of them, each batch of rows multiplied
    /// while the next is read, and every product is the same as for one activation alone.
    /// A failed read ends the call with an error once the reads already started have come back
    /// (so the prefetcher holds none for a later call).
    pub fn matvecs(
        &mut self,
        acts: &[ActivationBuffer],
        outs: &mut [f32],
    ) -> Result<(), ReadError> {
        debug_assert_eq!(outs.len(), acts.len() * self.rows);
        let (rb, dtype, rows) = (self.row_bytes, self.dtype, self.rows);
        let (prefetch, spare) = match &mut self.where_ {
            Where::Resident { buf, skip, len } => {
                let table = &buf[*skip..*skip + *len];
                for (act, out) in acts.iter().zip(outs.chunks_exact_mut(rows)) {
                    par_matvec(dtype, table, rb, act, out);
                }
                return Ok(());
            }
            Where::Streamed {
                prefetch, spare, ..
            } => (prefetch, spare),
        };
        let per_chunk = (STREAM_CHUNK / rb).max(1);
        let n_chunks = rows.div_ceil(per_chunk);
        if n_chunks == 0 || acts.is_empty() {
            return Ok(());
        }
        let span = |k: usize| {
            let first = k * per_chunk;
            (first, per_chunk.min(rows - first))
        };
        let t = Instant::now();
        let mut compute = Duration::ZERO;
        let start = |prefetch: &mut Prefetcher, spare: &mut Vec<AlignedBuf>, k: usize| {
            let (first, n) = span(k);
            let at = self.offset + (first * rb) as u64;
            let buf = spare.pop().unwrap_or_else(|| AlignedBuf::new(0));
            prefetch.start(k, at, n * rb, buf);
        };
        for k in 0..STREAM_AHEAD.min(n_chunks) {
            start(prefetch, spare, k);
        }
        let mut failed = None;
        for k in 0..n_chunks {
            let mut fetched = prefetch.wait();
            debug_assert_eq!(fetched.tag, k, "batches arrive in order");
            let result = std::mem::replace(&mut fetched.result, Ok(Default::default()));
            let stats = match result {
                Ok(stats) => stats,
                Err(e) => {
                    failed = Some(ReadError::new(format!("rows of {}", self.name), e));
                    spare.push(fetched.buf);
                    while prefetch.in_flight() > 0 {
                        spare.push(prefetch.wait().buf);
                    }
                    break;
                }
            };
            self.bytes_read += stats.bytes_read;
            let (first, _) = span(k);
            let at = |i: usize| self.offset + (i * rb) as u64;
            if let Err(e) = check_rows(&self.row_crc32c, &self.path, at, rb, first, fetched.bytes())
            {
                failed = Some(ReadError::new(format!("rows of {}", self.name), e));
                spare.push(fetched.buf);
                while prefetch.in_flight() > 0 {
                    spare.push(prefetch.wait().buf);
                }
                break;
            }
            if k + STREAM_AHEAD < n_chunks {
                start(prefetch, spare, k + STREAM_AHEAD);
            }
            let tc = Instant::now();
            let (first, n) = span(k);
            for (act, out) in acts.iter().zip(outs.chunks_exact_mut(rows)) {
                par_matvec(dtype, fetched.bytes(), rb, act, &mut out[first..first + n]);
            }
            compute += tc.elapsed();
            spare.push(fetched.buf);
        }
        self.io += t.elapsed().saturating_sub(compute);
        failed.map_or(Ok(()), Err)
    }
}

/// Checks `bytes`, rows `first..` of `row_bytes` each (row `i` at file offset `at(i)`),
/// against `crcs`; a mismatch names the row's offset.
fn check_rows(
    crcs: &[u32],
    path: &std::path::Path,
    at: impl Fn(usize) -> u64,
    row_bytes: usize,
    first: usize,
    bytes: &[u8],
) -> Result<(), StorageError> {
    for (k, row) in bytes.chunks_exact(row_bytes.max(1)).enumerate() {
        let i = first + k;
        let stored = crcs.get(i).copied().unwrap_or(!0);
        let computed = crate::image::bundle_checksum(row);
        if computed != stored {
            return Err(StorageError::Checksum {
                path: path.to_path_buf(),
                offset: at(i),
                len: row_bytes,
                stored,
                computed,
            });
        }
    }
    Ok(())
}

/// Rows of `weights` (each `row_bytes`) times `act`, split across the worker threads.
fn par_matvec(
    dtype: DType,
    weights: &[u8],
    row_bytes: usize,
    act: &ActivationBuffer,
    out: &mut [f32],
) {
    const ROWS_PER_TASK: usize = 256;
    out.par_chunks_mut(ROWS_PER_TASK)
        .zip(weights.par_chunks(ROWS_PER_TASK * row_bytes))
        .for_each(|(o, w)| quant::matvec(dtype, w, act, o));
}

fn entry<'i>(image: &'i FlashImage, name: &str) -> Result<&'i TensorEntry, StreamError> {
    image.meta.tensor(name).ok_or_else(|| {
        StreamError::Setup(format!("{} has no tensor {name}", image.file().display()))
    })
}

fn open_pool(image: &FlashImage, direct: bool, threads: usize) -> Result<ReadPool, StreamError> {
    let file = FlashFile::open(image.file(), direct)
        .map_err(|e| StreamError::Setup(format!("opening {}: {e}", image.file().display())))?;
    Ok(ReadPool::new(Arc::new(file), threads))
}

fn read_error(image: &FlashImage, name: &str, e: crate::storage::StorageError) -> StreamError {
    StreamError::Setup(format!(
        "reading {name} from {}: {e}",
        image.file().display()
    ))
}

/// The token embedding and the output head of a session, when they are not taken from the
/// model's weights (see the module docs). `head: None` means tied: the embedding's table.
pub struct OutputRows {
    pub embed: RowSource,
    pub head: Option<RowSource>,
}

impl OutputRows {
    pub fn embed_row(&mut self, token: u32, out: &mut [f32]) -> Result<(), ReadError> {
        self.embed.row(token as usize, out)
    }

    pub fn head(&mut self) -> &mut RowSource {
        self.head.as_mut().unwrap_or(&mut self.embed)
    }

    pub fn head_ref(&self) -> &RowSource {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    pub fn bytes_read(&self) -> u64 {
        self.embed.bytes_read + self.head.as_ref().map_or(0, |h| h.bytes_read)
    }

    pub fn io(&self) -> Duration {
        self.embed.io + self.head.as_ref().map_or(Duration::ZERO, |h| h.io)
    }

    pub fn memory_bytes(&self) -> usize {
        self.embed.memory_bytes() + self.head.as_ref().map_or(0, |h| h.memory_bytes())
    }
}
