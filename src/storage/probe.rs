//! Measuring the disk: random aligned direct reads per (chunk size, concurrency).

use super::{AlignedBuf, FlashFile, StorageError, ALIGN};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Chunk sizes of the default probe grid: 4, 16, 32, 128 KiB and 1 MiB.
pub const DEFAULT_CHUNKS: [usize; 5] = [4 << 10, 16 << 10, 32 << 10, 128 << 10, 1 << 20];
/// Concurrencies (readers in flight) of the default probe grid.
pub const DEFAULT_CONCURRENCIES: [usize; 4] = [1, 4, 8, 32];
/// Size of the temporary file the probe writes when not given an existing one: 1 GiB.
pub const DEFAULT_PROBE_FILE_SIZE: u64 = 1 << 30;

/// One measured point of the curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Bytes per read.
    pub chunk: usize,
    /// Reads in flight (reader threads).
    pub concurrency: usize,
    /// Throughput in MB/s (10^6 bytes per second).
    pub mb_per_s: f64,
    /// Mean latency of one read, microseconds.
    pub mean_latency_us: f64,
    /// Reads done for this point.
    pub reads: u64,
}

/// A measured read-throughput curve of one disk, as the planner uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskCurve {
    /// Whether the probe bypassed the page cache (if not, the numbers measure memory).
    pub direct: bool,
    /// Bytes of the file read at random.
    pub file_size: u64,
    pub points: Vec<CurvePoint>,
}

impl DiskCurve {
    /// Writes the curve as JSON (through a temporary file: see [`super::AtomicOutput`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), StorageError> {
        let path = path.as_ref();
        let err = |message: String| StorageError::Curve {
            path: path.to_path_buf(),
            message,
        };
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| err(format!("cannot encode the curve as JSON: {e}")))?;
        super::write_atomically(path, json.as_bytes(), &[]).map_err(|e| err(e.to_string()))
    }

    /// Reads a curve written by [`DiskCurve::save`], checking that its numbers make sense.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let err = |message: String| StorageError::Curve {
            path: path.to_path_buf(),
            message,
        };
        let text = super::input::read_text(path, super::input::MAX_TEXT_BYTES).map_err(|e| {
            err(format!(
                "cannot read it: {e}; run the disk probe to create it"
            ))
        })?;
        let curve: DiskCurve = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "expected a JSON disk curve ({{direct, file_size, points}}), found invalid data: \
                 {e}; run the disk probe again"
            ))
        })?;
        for p in &curve.points {
            if p.chunk == 0
                || p.concurrency == 0
                || !p.mb_per_s.is_finite()
                || p.mb_per_s < 0.0
                || !p.mean_latency_us.is_finite()
            {
                return Err(err(format!(
                    "expected points with chunk > 0, concurrency > 0 and finite, non-negative \
                     throughput, found {p:?}; run the disk probe again"
                )));
            }
        }
        if !curve.direct {
            log::warn!(
                "disk curve `{}` was measured without bypassing the page cache; \
                 its throughputs are memory speeds, not the disk's",
                path.display()
            );
        }
        Ok(curve)
    }

    /// Expected throughput in MB/s of reads of `chunk` bytes with `concurrency` in flight.
    ///
    /// Interpolates linearly in log(chunk) and log(concurrency) between measured points. Outside
    /// the grid: chunks larger than the largest keep its throughput (the plateau); chunks
    /// smaller than the smallest keep its reads per second (throughput proportional to chunk);
    /// concurrency is clamped to the measured range. Returns 0.0 for an empty curve or a zero
    /// chunk.
    pub fn throughput(&self, chunk: usize, concurrency: usize) -> f64 {
        if chunk == 0 {
            return 0.0;
        }
        let mut concs: Vec<usize> = self.points.iter().map(|p| p.concurrency).collect();
        concs.sort_unstable();
        concs.dedup();
        let per_conc: Vec<(f64, f64)> = concs
            .iter()
            .map(|&c| {
                let mut pts: Vec<(f64, f64)> = self
                    .points
                    .iter()
                    .filter(|p| p.concurrency == c)
                    .map(|p| (p.chunk as f64, p.mb_per_s))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (c as f64, along_chunk(&pts, chunk as f64))
            })
            .collect();
        interp_log_clamped(&per_conc, concurrency.max(1) as f64)
    }
}

/// Throughput at chunk `x` from points sorted by chunk.
fn along_chunk(pts: &[(f64, f64)], x: f64) -> f64 {
    match (pts.first(), pts.last()) {
        (Some(&(c0, t0)), _) if x < c0 => t0 * x / c0,
        (Some(_), _) => interp_log_clamped(pts, x),
        _ => 0.0,
    }
}

/// Linear interpolation in log(x) between points sorted by x; clamped outside.
fn interp_log_clamped(pts: &[(f64, f64)], x: f64) -> f64 {
    let (Some(&(x0, y0)), Some(&(xn, yn))) = (pts.first(), pts.last()) else {
        return 0.0;
    };
    if x <= x0 {
        return y0;
    }
    if x >= xn {
        return yn;
    }
    for w in pts.windows(2) {
        let ((xa, ya), (xb, yb)) = (w[0], w[1]);
        if x >= xa && x <= xb {
            if xb <= xa {
                return ya;
            }
            let t = (x.ln() - xa.ln()) / (xb.ln() - xa.ln());
            return ya + t * (yb - ya);
        }
    }
    yn
}

/// Removes the probe file it created when dropped (also on error paths).
struct TempGuard(PathBuf);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            log::warn!(
                "could not remove the probe file `{}`: {e}; delete it by hand",
                self.0.display()
            );
        }
    }
}

/// Measures random aligned direct reads of the disk holding the directory `dir`.
///
/// `dir` must be an existing directory: the probe creates its own file of `file_size` bytes
/// inside it (`.llmflash-probe-<pid>[-<k>].tmp`, created exclusively so nothing there is
/// touched) and removes only that file afterwards. Any other path (a regular file, a device,
/// a FIFO) is refused before anything is written.
/// For each chunk size and concurrency, `concurrency` threads read `chunk` bytes at random
/// 4 KiB-aligned offsets for `duration_per_point`. Chunk sizes must be multiples of 4096.
///
/// The page cache must be bypassed or the results are meaningless: the probe opens the file
/// with direct I/O and warns (and records `direct: false`) where that is refused. Use a file
/// larger than RAM's spare page cache if direct I/O is unavailable.
pub fn probe(
    dir: &Path,
    file_size: u64,
    chunk_sizes: &[usize],
    concurrencies: &[usize],
    duration_per_point: Duration,
) -> Result<DiskCurve, StorageError> {
    let max_chunk = chunk_sizes.iter().copied().max().unwrap_or(0);
    if chunk_sizes.is_empty()
        || chunk_sizes
            .iter()
            .any(|&c| c == 0 || !c.is_multiple_of(ALIGN))
    {
        return Err(StorageError::Probe(format!(
            "expected chunk sizes that are non-zero multiples of {ALIGN}, found {chunk_sizes:?}"
        )));
    }
    if concurrencies.is_empty() || concurrencies.contains(&0) {
        return Err(StorageError::Probe(format!(
            "expected concurrencies >= 1, found {concurrencies:?}"
        )));
    }
    let size = file_size / ALIGN as u64 * ALIGN as u64;
    if size < max_chunk as u64 {
        return Err(StorageError::Probe(format!(
            "expected a probe file size of at least the largest chunk ({max_chunk} bytes), \
             found {file_size}; ask for a larger file"
        )));
    }
    match std::fs::metadata(dir) {
        Ok(md) if md.is_dir() => {}
        Ok(md) => {
            return Err(StorageError::Probe(format!(
                "expected a directory on the disk to measure, found {} at `{}`; give a \
                 directory: the probe writes its own file there and removes it afterwards",
                super::input::describe(&md.file_type()),
                dir.display()
            )))
        }
        Err(e) => {
            return Err(StorageError::Probe(format!(
                "expected a directory on the disk to measure at `{}`, found none ({e}); give an \
                 existing directory",
                dir.display()
            )))
        }
    }
    log::info!(
        "disk probe: random direct reads; the page cache must be bypassed or the results are \
         meaningless"
    );

    let (target, file) = create_probe_file(dir)?;
    let _guard = TempGuard(target.clone());
    write_probe_file(file, &target, size)?;

    let file = FlashFile::open(&target, true)?;
    if !file.is_direct() {
        log::warn!(
            "disk probe of `{}` could not bypass the page cache: its numbers measure memory, \
             not the disk",
            target.display()
        );
    }
    if file.len() < max_chunk as u64 {
        return Err(StorageError::Probe(format!(
            "the probe file `{}` has {} bytes, expected at least the largest chunk \
             ({max_chunk}); was it truncated while measuring? Run the probe again",
            target.display(),
            file.len()
        )));
    }

    let mut points = Vec::with_capacity(chunk_sizes.len() * concurrencies.len());
    for &chunk in chunk_sizes {
        for &conc in concurrencies {
            let p = measure_point(&file, chunk, conc, duration_per_point)?;
            log::info!(
                "probe chunk {chunk:>8} x {conc:>3} readers: {:8.1} MB/s, {:8.1} us/read",
                p.mb_per_s,
                p.mean_latency_us
            );
            points.push(p);
        }
    }
    Ok(DiskCurve {
        direct: file.is_direct(),
        file_size: file.len(),
        points,
    })
}

/// Creates a probe file in `dir` that did not exist before (never an existing file).
fn create_probe_file(dir: &Path) -> Result<(PathBuf, std::fs::File), StorageError> {
    let pid = std::process::id();
    for k in 0..100 {
        let name = match k {
            0 => format!(".llmflash-probe-{pid}.tmp"),
            _ => format!(".llmflash-probe-{pid}-{k}.tmp"),
        };
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(StorageError::Probe(format!(
                    "cannot create the probe file `{}`: {e}; check the directory is writable",
                    path.display()
                )))
            }
        }
    }
    Err(StorageError::Probe(format!(
        "cannot create a probe file in `{}`: 100 names .llmflash-probe-{pid}*.tmp exist \
         already; delete them",
        dir.display()
    )))
}

fn write_probe_file(mut f: std::fs::File, path: &Path, size: u64) -> Result<(), StorageError> {
    let err = |e: std::io::Error| {
        StorageError::Probe(format!(
            "cannot write the probe file `{}` ({size} bytes): {e}; \
             check the directory is writable and has space",
            path.display()
        ))
    };
    // Non-zero data: holes in a sparse file would be read without touching the disk.
    let mut block = vec![0u8; 4 << 20];
    Rng::new(0x243F_6A88_85A3_08D3 ^ size).fill_bytes(&mut block);
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        block[0] = block[0].wrapping_add(1);
        f.write_all(&block[..n]).map_err(err)?;
        left -= n as u64;
    }
    f.sync_all().map_err(err)
}

fn measure_point(
    file: &FlashFile,
    chunk: usize,
    concurrency: usize,
    duration: Duration,
) -> Result<CurvePoint, StorageError> {
    let slots = (file.len() - chunk as u64) / ALIGN as u64 + 1;
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<Result<(u64, Duration), StorageError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|t| {
                s.spawn(move || {
                    let mut buf = AlignedBuf::try_new(chunk)?;
                    let mut rng = Rng::new(0x1234_5678 ^ ((t as u64) << 32) ^ chunk as u64);
                    let (mut reads, mut busy) = (0u64, Duration::ZERO);
                    loop {
                        let off = rng.below_u64(slots) * ALIGN as u64;
                        let t0 = Instant::now();
                        file.read_at(off, &mut buf)?;
                        let t1 = Instant::now();
                        busy += t1 - t0;
                        reads += 1;
                        if t1 >= deadline {
                            return Ok((reads, busy));
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StorageError::WorkerPanic {
                        path: file.path().to_path_buf(),
                    })
                })
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let (mut reads, mut busy) = (0u64, Duration::ZERO);
    for r in results {
        let (n, b) = r?;
        reads += n;
        busy += b;
    }
    Ok(CurvePoint {
        chunk,
        concurrency,
        mb_per_s: (reads * chunk as u64) as f64 / wall / 1e6,
        mean_latency_us: busy.as_secs_f64() * 1e6 / reads.max(1) as f64,
        reads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/storage-test-tmp");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The names in `d`.
    fn listing(d: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn probe_small_grid() {
        let path = dir().join(format!("probe-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("keep"), b"mine").unwrap();
        let curve = probe(
            &path,
            8 << 20,
            &[4096, 65536],
            &[1, 2],
            Duration::from_millis(40),
        )
        .unwrap();
        assert_eq!(
            listing(&path),
            ["keep"],
            "the probe file is removed, nothing else"
        );
        assert_eq!(std::fs::read(path.join("keep")).unwrap(), b"mine");
        std::fs::remove_dir_all(&path).unwrap();
        assert_eq!(curve.points.len(), 4);
        for p in &curve.points {
            assert!(
                p.mb_per_s > 0.0 && p.mean_latency_us > 0.0 && p.reads > 0,
                "{p:?}"
            );
        }
        assert!(curve.throughput(16384, 2) > 0.0);
        let json = dir().join(format!("curve-{}.json", std::process::id()));
        curve.save(&json).unwrap();
        let back = DiskCurve::load(&json).unwrap();
        let _ = std::fs::remove_file(&json);
        // serde_json's default float parsing may differ in the last bit.
        assert_eq!(back.points.len(), curve.points.len());
        for (a, b) in back.points.iter().zip(&curve.points) {
            assert_eq!(
                (a.chunk, a.concurrency, a.reads),
                (b.chunk, b.concurrency, b.reads)
            );
            assert!((a.mb_per_s - b.mb_per_s).abs() <= 1e-9 * b.mb_per_s);
        }
    }

    #[test]
    fn probe_rejects_bad_grids() {
        let p = dir().join("never-created");
        let d = Duration::from_millis(1);
        assert!(probe(&p, 1 << 20, &[1000], &[1], d).is_err());
        assert!(probe(&p, 1 << 20, &[4096], &[0], d).is_err());
        assert!(probe(&p, 1 << 20, &[], &[1], d).is_err());
        assert!(probe(&p, 4096, &[8192], &[1], d).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn probe_needs_a_directory() {
        let d = Duration::from_millis(1);
        let file = dir().join(format!("probe-file-{}", std::process::id()));
        std::fs::write(&file, vec![7u8; 8192]).unwrap();
        let e = probe(&file, 1 << 20, &[4096], &[1], d).unwrap_err();
        assert!(e.to_string().contains("found a regular file"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), vec![7u8; 8192], "untouched");
        std::fs::remove_file(&file).unwrap();
        let e = probe(Path::new("/dev/null"), 1 << 20, &[4096], &[1], d).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let missing = dir().join("never-created-probe-dir");
        let e = probe(&missing, 1 << 20, &[4096], &[1], d).unwrap_err();
        assert!(e.to_string().contains("existing directory"), "{e}");
        assert!(!missing.exists());
    }

    #[test]
    fn interpolation() {
        let pt = |chunk, concurrency, mb_per_s| CurvePoint {
            chunk,
            concurrency,
            mb_per_s,
            mean_latency_us: 1.0,
            reads: 1,
        };
        let c = DiskCurve {
            direct: true,
            file_size: 1,
            points: vec![
                pt(4096, 1, 50.0),
                pt(16384, 1, 200.0),
                pt(4096, 4, 160.0),
                pt(16384, 4, 520.0),
            ],
        };
        assert_eq!(c.throughput(4096, 1), 50.0);
        assert_eq!(c.throughput(16384, 4), 520.0);
        assert!((c.throughput(8192, 1) - 125.0).abs() < 1e-9); // halfway in log2
        assert!((c.throughput(4096, 2) - 105.0).abs() < 1e-9);
        assert_eq!(c.throughput(1 << 20, 4), 520.0); // plateau
        assert_eq!(c.throughput(2048, 1), 25.0); // IOPS-bound below the grid
        assert_eq!(c.throughput(4096, 64), 160.0); // clamped
        assert_eq!(c.throughput(0, 4), 0.0);
        let empty = DiskCurve {
            direct: true,
            file_size: 0,
            points: vec![],
        };
        assert_eq!(empty.throughput(4096, 1), 0.0);
    }

    #[test]
    fn load_rejects_bad_files() {
        let p = dir().join(format!("bad-curve-{}.json", std::process::id()));
        std::fs::write(&p, "{not json").unwrap();
        let e = DiskCurve::load(&p).unwrap_err();
        assert!(e.to_string().contains("probe"), "{e}");
        std::fs::write(
            &p,
            r#"{"direct":true,"file_size":1,"points":[{"chunk":0,"concurrency":1,"mb_per_s":1,"mean_latency_us":1,"reads":1}]}"#,
        )
        .unwrap();
        assert!(DiskCurve::load(&p).is_err());
        let _ = std::fs::remove_file(&p);
        assert!(DiskCurve::load(&p).is_err());
        // A device is refused without reading it.
        let e = DiskCurve::load("/dev/zero").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }
}
