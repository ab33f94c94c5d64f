//! A read-only file whose reads bypass the page cache.

use super::{StorageError, ALIGN};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A file opened for positional reads with the page cache bypassed.
///
/// * Linux: `O_DIRECT`. Every read's **offset, length and buffer address must be multiples of
///   4096** ([`ALIGN`]); use [`AlignedBuf`](super::AlignedBuf) and
///   [`plan_reads`](super::plan_reads), which work in these units. Misaligned requests are
///   refused with [`StorageError::Misaligned`] before they reach the kernel.
/// * macOS: `fcntl(F_NOCACHE, 1)` (no alignment rule, but the same one is enforced so that code
///   behaves alike on both).
/// * `direct = false`, other systems, or a filesystem that refuses `O_DIRECT` (`EINVAL`, e.g. an
///   old tmpfs): ordinary buffered reads with no alignment rule. The fallback logs a warning,
///   because the page cache then holds the data and the memory budget is not honest.
///
/// `&FlashFile` is shareable between threads: reads are positional (`pread`), no shared cursor.
#[derive(Debug)]
pub struct FlashFile {
    file: File,
    path: PathBuf,
    len: u64,
    direct: bool,
}

impl FlashFile {
    /// Opens `path` read-only; `direct` asks for the page cache to be bypassed (see the type's
    /// documentation for the fallback).
    pub fn open(path: impl AsRef<Path>, direct: bool) -> Result<Self, StorageError> {
        Self::open_with(path.as_ref(), direct, open_direct)
    }

    /// `open`, with the direct opener injectable so that the fallback can be tested anywhere.
    pub(crate) fn open_with(
        path: &Path,
        direct: bool,
        opener: impl FnOnce(&Path) -> io::Result<File>,
    ) -> Result<Self, StorageError> {
        let open_err = |source| StorageError::Open {
            path: path.to_path_buf(),
            error: source,
        };
        if direct {
            match opener(path) {
                Ok(file) => {
                    let len = file.metadata().map_err(open_err)?.len();
                    let f = Self {
                        file,
                        path: path.to_path_buf(),
                        len,
                        direct: true,
                    };
                    // Some filesystems accept O_DIRECT at open and refuse it at read: try one page.
                    match f.check_direct_read() {
                        Ok(()) => return Ok(f),
                        Err(e) if is_direct_refusal(&e) => warn_fallback(path, &e),
                        Err(e) => {
                            return Err(StorageError::Read {
                                path: path.to_path_buf(),
                                offset: 0,
                                len: ALIGN,
                                error: e,
                            })
                        }
                    }
                }
                Err(e) if is_direct_refusal(&e) => warn_fallback(path, &e),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => warn_fallback(path, &e),
                Err(e) => return Err(open_err(e)),
            }
        }
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            direct: false,
        })
    }

    fn check_direct_read(&self) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let mut buf = super::AlignedBuf::new(ALIGN);
        pread(&self.file, &mut buf, 0).map(|_| ())
    }

    /// Whether reads bypass the page cache (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// File length in bytes, as of opening.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at `offset`. With direct I/O, `offset`, `buf.len()` and
    /// the address of `buf` must be multiples of 4096; a range reaching past the end of the
    /// file is an error ([`StorageError::PastEnd`]), see [`FlashFile::read_at_most`] for reads
    /// of an aligned block that holds the file's end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let n = self.read_at_most(offset, buf)?;
        if n < buf.len() {
            return Err(StorageError::PastEnd {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                file_len: self.len,
            });
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at `offset`, stopping early only at the end of the file;
    /// returns the number of bytes read. Same alignment rules as [`FlashFile::read_at`].
    pub fn read_at_most(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StorageError> {
        if self.direct {
            self.check_aligned("the offset", offset)?;
            self.check_aligned("the length", buf.len() as u64)?;
            self.check_aligned("the buffer address", buf.as_ptr() as usize as u64)?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.saturating_add(done as u64);
            match pread(&self.file, &mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StorageError::Read {
                        path: self.path.clone(),
                        offset,
                        len: buf.len(),
                        error: source,
                    })
                }
            }
        }
        Ok(done)
    }

    fn check_aligned(&self, what: &'static str, value: u64) -> Result<(), StorageError> {
        if !value.is_multiple_of(ALIGN as u64) {
            return Err(StorageError::Misaligned {
                path: self.path.clone(),
                what,
                value,
                align: ALIGN,
            });
        }
        Ok(())
    }
}

fn is_direct_refusal(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::EINVAL)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

fn warn_fallback(path: &Path, e: &io::Error) {
    log::warn!(
        "`{}`: the filesystem refuses direct I/O ({e}); falling back to buffered reads. \
         The page cache will hold what is read, so the memory budget will not be honest and \
         I/O timings will be optimistic; put the file on a filesystem that supports O_DIRECT \
         (ext4, xfs, btrfs, apfs) for real measurements",
        path.display()
    );
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(target_os = "macos")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::io::AsRawFd;
    let file = File::open(path)?;
    // SAFETY: fcntl on a valid, owned descriptor.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "direct I/O is only implemented for Linux and macOS",
    ))
}

#[cfg(unix)]
fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::TempFile;
    use super::super::AlignedBuf;
    use super::*;

    #[test]
    fn read_at_direct_and_buffered() {
        let tf = TempFile::random("file-rw", 3 * ALIGN as u64 + 100, 1);
        let data = std::fs::read(&tf.path).unwrap();
        for direct in [true, false] {
            let f = FlashFile::open(&tf.path, direct).unwrap();
            assert_eq!(f.len(), data.len() as u64);
            let mut buf = AlignedBuf::new(2 * ALIGN);
            f.read_at(ALIGN as u64, &mut buf).unwrap();
            assert_eq!(&buf[..], &data[ALIGN..3 * ALIGN]);
            // The last, partial page.
            let n = f.read_at_most(3 * ALIGN as u64, &mut buf[..ALIGN]).unwrap();
            assert_eq!(n, 100);
            assert_eq!(&buf[..100], &data[3 * ALIGN..]);
            assert!(matches!(
                f.read_at(3 * ALIGN as u64, &mut buf[..ALIGN]),
                Err(StorageError::PastEnd { .. })
            ));
            if f.is_direct() {
                let e = f.read_at(1, &mut buf[..ALIGN]).unwrap_err();
                assert!(matches!(e, StorageError::Misaligned { .. }), "{e}");
                let e = f.read_at(0, &mut buf[1..ALIGN + 1]).unwrap_err();
                assert!(matches!(e, StorageError::Misaligned { .. }), "{e}");
            } else {
                let mut v = vec![0u8; 10];
                f.read_at(5, &mut v).unwrap();
                assert_eq!(&v[..], &data[5..15]);
            }
        }
        #[cfg(target_os = "linux")]
        assert!(FlashFile::open(&tf.path, true).unwrap().is_direct());
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let e = FlashFile::open("/nonexistent/llmflash-storage", true).unwrap_err();
        assert!(matches!(e, StorageError::Open { .. }));
        assert!(e.to_string().contains("exists"));
    }

    #[test]
    fn falls_back_to_buffered_on_einval() {
        let tf = TempFile::random("file-fallback", 10_000, 2);
        let f = FlashFile::open_with(&tf.path, true, |_| {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        })
        .unwrap();
        assert!(!f.is_direct());
        let mut v = vec![0u8; 7];
        f.read_at(3, &mut v).unwrap();
        assert_eq!(&v[..], &std::fs::read(&tf.path).unwrap()[3..10]);
        // Other errors are not swallowed.
        let e = FlashFile::open_with(&tf.path, true, |_| {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        })
        .unwrap_err();
        assert!(matches!(e, StorageError::Open { .. }));
    }

    /// /dev/shm is tmpfs on Linux; whether tmpfs takes O_DIRECT depends on the kernel (>= 6.6
    /// does). Either way opening must work and reads must be right.
    #[cfg(target_os = "linux")]
    #[test]
    fn tmpfs_opens_either_way() {
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            return;
        }
        let path = dir.join(format!("llmflash-storage-test-{}", std::process::id()));
        let data: Vec<u8> = (0..3 * ALIGN).map(|i| (i * 7 % 251) as u8).collect();
        if std::fs::write(&path, &data).is_err() {
            return;
        }
        let f = FlashFile::open(&path, true);
        let _ = std::fs::remove_file(&path);
        let f = f.unwrap();
        let mut buf = AlignedBuf::new(ALIGN);
        f.read_at(ALIGN as u64, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[ALIGN..2 * ALIGN]);
    }
}
