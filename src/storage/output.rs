//! Writing output files without harming what the caller did not ask to change.
//!
//! Every file llmflash writes goes through [`AtomicOutput`]: the bytes go to a temporary file
//! beside the destination (`<name>.<pid>.tmp`, created exclusively, so it never follows or
//! clobbers anything already there), which is synced and renamed over the destination only
//! when complete. So:
//!
//! * an interrupted or killed writer leaves at most the `*.tmp` file, never a file at the
//!   destination that looks finished; on an error the temporary file is removed;
//! * the destination must be missing or a regular file: a device node, FIFO, socket or
//!   directory is refused before anything is written (renaming over `/dev/null` would
//!   replace the device with a regular file);
//! * a destination that is one of the inputs (the same file by device and inode, also through
//!   symbolic or hard links) is refused, so that a conversion cannot replace its own source;
//! * a symbolic link at the destination is followed: the file it points to is replaced and
//!   the link stays.
//!
//! Rewriting a file in place ([`AtomicOutput::rewrite`]) copies it to the temporary file
//! first, so it needs the file's size in free space meanwhile. Replacing a file by rename
//! gives it a new inode: other hard links to the old file keep the old contents.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::input::describe;

/// Why an output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "will not write to `{}`: it is {found}; expected a regular file or a name that does not \
         exist yet: give a file path (directories and special files are never replaced)",
        path.display()
    )]
    NotRegular { path: PathBuf, found: &'static str },
    #[error(
        "will not write to `{}`: it is the input `{}` (the same file); give a different output path",
        path.display(),
        input.display()
    )]
    IsInput { path: PathBuf, input: PathBuf },
    #[error(
        "`{}`: {action}: {error}; check that the directory exists, is writable and has space",
        path.display()
    )]
    Io {
        path: PathBuf,
        action: &'static str,
        // Shown in the message, so not also a `source` (a report would print it twice).
        error: io::Error,
    },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> OutputError {
    let path = path.to_path_buf();
    move |source| OutputError::Io {
        path,
        action,
        error: source,
    }
}

#[cfg(unix)]
fn same_file(a: &Metadata, b: &Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &Metadata, _: &Metadata) -> bool {
    false
}

/// The input among `inputs` (a file, or a directory's files) that is the same file as `md`.
fn matching_input(md: &Metadata, inputs: &[&Path]) -> Option<PathBuf> {
    for input in inputs {
        let Ok(imd) = std::fs::metadata(input) else {
            continue;
        };
        if same_file(md, &imd) {
            return Some(input.to_path_buf());
        }
        if imd.is_dir() {
            let Ok(entries) = std::fs::read_dir(input) else {
                continue;
            };
            for entry in entries.flatten() {
                let p = entry.path();
                if std::fs::metadata(&p).is_ok_and(|emd| same_file(md, &emd)) {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// Checks that `dest` may be written as an output read from `inputs` (files or directories),
/// and returns the path that will be replaced: `dest`, or the file a symbolic link at `dest`
/// points to. Nothing is opened or written.
pub fn check_output(dest: &Path, inputs: &[&Path]) -> Result<PathBuf, OutputError> {
    let target = match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(dest.to_path_buf()),
        Err(e) => return Err(io_err(dest, "cannot inspect")(e)),
        Ok(md) if md.file_type().is_symlink() => match std::fs::canonicalize(dest) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OutputError::NotRegular {
                    path: dest.to_path_buf(),
                    found: "a symbolic link to a file that does not exist",
                })
            }
            Err(e) => return Err(io_err(dest, "cannot follow the symbolic link")(e)),
        },
        Ok(_) => dest.to_path_buf(),
    };
    let md = match std::fs::metadata(&target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(target),
        Err(e) => return Err(io_err(&target, "cannot inspect")(e)),
        Ok(md) => md,
    };
    if !md.is_file() {
        return Err(OutputError::NotRegular {
            path: dest.to_path_buf(),
            found: describe(&md.file_type()),
        });
    }
    if let Some(input) = matching_input(&md, inputs) {
        return Err(OutputError::IsInput {
            path: dest.to_path_buf(),
            input,
        });
    }
    Ok(target)
}

/// An output file being written: a temporary file beside the destination, renamed over it by
/// [`AtomicOutput::commit`] and removed if dropped uncommitted. Writes and seeks go to the
/// temporary file.
#[derive(Debug)]
pub struct AtomicOutput {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl AtomicOutput {
    /// Starts writing `dest` (checked by [`check_output`] against `inputs`) into a new, empty
    /// temporary file.
    pub fn create(dest: &Path, inputs: &[&Path]) -> Result<AtomicOutput, OutputError> {
        let dest = check_output(dest, inputs)?;
        let (tmp, file) = create_tmp(&dest)?;
        let out = AtomicOutput {
            dest,
            tmp,
            file,
            committed: false,
        };
        out.keep_permissions()?;
        Ok(out)
    }

    /// Starts rewriting the existing regular file `path`: the temporary file starts as a copy
    /// of it, positioned at its end.
    pub fn rewrite(path: &Path) -> Result<AtomicOutput, OutputError> {
        let dest = check_output(path, &[])?;
        let mut src = File::open(&dest).map_err(io_err(&dest, "cannot open"))?;
        let md = src.metadata().map_err(io_err(&dest, "cannot inspect"))?;
        if !md.is_file() {
            return Err(OutputError::NotRegular {
                path: path.to_path_buf(),
                found: describe(&md.file_type()),
            });
        }
        let (tmp, file) = create_tmp(&dest)?;
        let mut out = AtomicOutput {
            dest,
            tmp,
            file,
            committed: false,
        };
        out.keep_permissions()?;
        io::copy(&mut src, &mut out.file).map_err(io_err(&out.tmp, "cannot copy into"))?;
        Ok(out)
    }

    /// The temporary file being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// The file that [`AtomicOutput::commit`] replaces.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temporary file, for positional work (`set_len`, reads).
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// An existing destination's permissions carry over to its replacement.
    fn keep_permissions(&self) -> Result<(), OutputError> {
        if let Ok(md) = std::fs::metadata(&self.dest) {
            self.file
                .set_permissions(md.permissions())
                .map_err(io_err(&self.tmp, "cannot set the permissions of"))?;
        }
        Ok(())
    }

    /// Syncs the temporary file and renames it over the destination (checked again to be
    /// missing or a regular file), then syncs the directory.
    pub fn commit(mut self) -> Result<(), OutputError> {
        self.file
            .flush()
            .and_then(|_| self.file.sync_all())
            .map_err(io_err(&self.tmp, "cannot write"))?;
        if let Ok(md) = std::fs::symlink_metadata(&self.dest) {
            if !md.is_file() {
                return Err(OutputError::NotRegular {
                    path: self.dest.clone(),
                    found: describe(&md.file_type()),
                });
            }
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(
            &self.dest,
            "cannot rename the finished temporary file to",
        ))?;
        self.committed = true;
        #[cfg(unix)]
        if let Some(dir) = parent(&self.dest) {
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                log::warn!(
                    "could not sync the directory `{}` after writing `{}`: {e}",
                    dir.display(),
                    self.dest.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_file(&self.tmp) {
                log::warn!(
                    "could not remove the temporary file `{}`: {e}; delete it by hand",
                    self.tmp.display()
                );
            }
        }
    }
}

impl Write for AtomicOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for AtomicOutput {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        p => p,
    }
}

/// Creates `<dest>.<pid>.tmp` (or `<dest>.<pid>-<k>.tmp` if that exists) exclusively.
fn create_tmp(dest: &Path) -> Result<(PathBuf, File), OutputError> {
    let name = dest.file_name().ok_or_else(|| OutputError::NotRegular {
        path: dest.to_path_buf(),
        found: "a path without a file name",
    })?;
    let pid = std::process::id();
    let mut last = None;
    for k in 0..100 {
        let mut tmp_name = name.to_os_string();
        match k {
            0 => tmp_name.push(format!(".{pid}.tmp")),
            _ => tmp_name.push(format!(".{pid}-{k}.tmp")),
        }
        let tmp = dest.with_file_name(tmp_name);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(io_err(&tmp, "cannot create the temporary file")(e)),
        }
    }
    let (tmp, e) = last.expect("the loop ran");
    Err(io_err(&tmp, "cannot create the temporary file")(e))
}

/// Writes `bytes` to `dest` through a temporary file (see [`AtomicOutput`]).
pub fn write_atomically(dest: &Path, bytes: &[u8], inputs: &[&Path]) -> Result<(), OutputError> {
    let mut out = AtomicOutput::create(dest, inputs)?;
    out.write_all(bytes)
        .map_err(io_err(out.tmp_path(), "cannot write"))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/storage-test-tmp")
            .join(format!("output-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_replace_regular_files_and_leave_no_temporary() {
        let d = dir("replace");
        let p = d.join("out.json");
        write_atomically(&p, b"one", &[]).unwrap();
        write_atomically(&p, b"two", &[]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d), ["out.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_uncommitted_output_is_removed_and_the_destination_untouched() {
        let d = dir("drop");
        let p = d.join("out.bin");
        std::fs::write(&p, b"old").unwrap();
        {
            let mut out = AtomicOutput::create(&p, &[]).unwrap();
            out.write_all(b"half").unwrap();
            let tmp = out.tmp_path().to_path_buf();
            assert!(tmp.to_string_lossy().ends_with(".tmp"), "{}", tmp.display());
            assert!(tmp.exists());
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(&d), ["out.bin"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn special_files_and_directories_are_refused() {
        let d = dir("special");
        let e = write_atomically(&d, b"x", &[]).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = write_atomically(Path::new("/dev/null"), b"x", &[]).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        assert!(!Path::new(&format!("/dev/null.{}.tmp", std::process::id())).exists());
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("missing"), &dangling).unwrap();
        let e = write_atomically(&dangling, b"x", &[]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_input_is_refused_as_output_through_any_name() {
        let d = dir("input");
        let src = d.join("model.gguf");
        std::fs::write(&src, b"weights").unwrap();
        let hard = d.join("hard.gguf");
        std::fs::hard_link(&src, &hard).unwrap();
        let soft = d.join("soft.gguf");
        std::os::unix::fs::symlink(&src, &soft).unwrap();
        for out in [&src, &hard, &soft] {
            let e = write_atomically(out, b"image", &[&src]).unwrap_err();
            assert!(matches!(e, OutputError::IsInput { .. }), "{e}");
        }
        // A file inside an input directory counts as the input.
        let e = write_atomically(&src, b"image", &[&d]).unwrap_err();
        assert!(matches!(e, OutputError::IsInput { .. }), "{e}");
        assert_eq!(std::fs::read(&src).unwrap(), b"weights");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_destination_keeps_the_link_and_replaces_its_target() {
        let d = dir("link");
        let target = d.join("real.flash");
        std::fs::write(&target, b"old").unwrap();
        let link = d.join("link.flash");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomically(&link, b"new", &[]).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rewrite_starts_from_a_copy() {
        let d = dir("rewrite");
        let p = d.join("image.flash");
        std::fs::write(&p, b"abc").unwrap();
        let mut out = AtomicOutput::rewrite(&p).unwrap();
        out.write_all(b"def").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc", "untouched until commit");
        out.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abcdef");
        assert_eq!(names(&d), ["image.flash"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
