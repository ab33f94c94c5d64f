//! Checking input paths before opening them: a FIFO blocks `open` until a writer appears and a
//! device such as `/dev/zero` never ends, so every model, image and text input is checked to be
//! a regular file (or, for HF checkpoints, a directory) first, and text is read with a limit.

use std::fs::{FileType, Metadata};
use std::io::{self, Read};
use std::path::Path;

/// Largest text file read whole (prompts, perplexity and calibration text): 64 MiB.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// What a file type is, in words (`a FIFO (named pipe)`).
pub fn describe(ft: &FileType) -> &'static str {
    if ft.is_file() {
        return "a regular file";
    }
    if ft.is_dir() {
        return "a directory";
    }
    if ft.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// The metadata of `path` (links followed) if it is a regular file; otherwise an
/// `InvalidInput` error saying what it is. Never opens the path, so it cannot block.
pub fn regular_file(path: &Path) -> io::Result<Metadata> {
    let md = std::fs::metadata(path)?;
    if md.is_file() {
        return Ok(md);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "expected a regular file, found {}; give the path of a file",
            describe(&md.file_type())
        ),
    ))
}

/// The metadata of `path` (links followed) if it is a regular file or a directory.
pub fn file_or_dir(path: &Path) -> io::Result<Metadata> {
    let md = std::fs::metadata(path)?;
    if md.is_file() || md.is_dir() {
        return Ok(md);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "expected a regular file or a directory, found {}; give the path of a model file or \
             directory",
            describe(&md.file_type())
        ),
    ))
}

/// Reads the regular file `path` as UTF-8 text of at most `limit` bytes; a larger file is an
/// `InvalidInput` error naming the limit (checked before reading, and again while reading in
/// case the file grows).
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    let too_large = |len: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the file has {len} bytes, more than the limit of {} ({limit} bytes) for a text \
                 input; give a smaller file (or split it)",
                crate::budget::Bytes(limit)
            ),
        )
    };
    let md = regular_file(path)?;
    if md.len() > limit {
        return Err(too_large(md.len().to_string()));
    }
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(format!("more than {limit}")));
    }
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected UTF-8 text, found invalid bytes at offset {}; give a text file",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/storage-test-tmp");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn text_is_read_with_a_limit() {
        let p = dir().join(format!("text-limit-{}", std::process::id()));
        std::fs::write(&p, "hello world").unwrap();
        assert_eq!(read_text(&p, 64).unwrap(), "hello world");
        let e = read_text(&p, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("(5 bytes)"), "{e}");
        std::fs::write(&p, [0xffu8, 0xfe]).unwrap();
        assert!(read_text(&p, 64).unwrap_err().to_string().contains("UTF-8"));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn special_files_are_refused_without_opening() {
        let e = regular_file(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_text(Path::new("/dev/zero"), MAX_TEXT_BYTES).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = regular_file(&dir()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(file_or_dir(&dir()).is_ok());
        assert!(file_or_dir(Path::new("/dev/null")).is_err());
    }
}
