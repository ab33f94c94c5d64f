//! Model files converted once into flash images and kept for reuse, as a user of ollama
//! expects: give a GGUF file (or an HF directory) and a memory budget, and the first run
//! converts it into the cache directory; later runs find the image there.
//!
//! An image is named after its source and a key of the source's path, size and modification
//! time, so that a changed source is converted again rather than served stale. The writer
//! writes a temporary file and renames it, so an interrupted conversion leaves nothing that
//! a later run would take for an image.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Context;

use crate::image::{convert, BundleDtype, ConvertOptions, FlashImage};
use crate::model::load;

/// The variable that names the cache directory, overriding the default.
pub const CACHE_VAR: &str = "LLMFLASH_CACHE";

/// Where converted images are kept: `$LLMFLASH_CACHE`, else `$XDG_CACHE_HOME/llmflash`, else
/// `~/.cache/llmflash`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_VAR) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("llmflash"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("llmflash")),
        None => anyhow::bail!(
            "no cache directory for converted images: neither {CACHE_VAR}, XDG_CACHE_HOME nor \
             HOME is set; set {CACHE_VAR} to a directory"
        ),
    }
}

/// The cached image of `source` in `dir`: the path it has or will have.
pub fn image_path(source: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let stem = source
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    Ok(dir.join(format!("{stem}-{:08x}.flash", source_key(source)?)))
}

/// A flash image of `source` from the cache in `dir`, converted now if it is not there
/// (with a progress bar when `progress`). Returns its path and whether it was there.
pub fn image_for(source: &Path, dir: &Path, progress: bool) -> anyhow::Result<(PathBuf, bool)> {
    let path = image_path(source, dir)?;
    if path.is_file() && FlashImage::open(&path).is_ok() {
        return Ok((path, true));
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the cache directory {}", dir.display()))?;
    let model = load(source).with_context(|| format!("loading {}", source.display()))?;
    let opts = ConvertOptions {
        bundle_dtype: BundleDtype::Source,
        progress,
    };
    convert(&model, &path, &opts).with_context(|| {
        format!(
            "converting {} into the cache ({})",
            source.display(),
            path.display()
        )
    })?;
    Ok((path, false))
}

/// A key of what identifies `source`'s contents without reading them: its absolute path and,
/// for it or (a directory) each file in it, the name, size and modification time.
fn source_key(source: &Path) -> anyhow::Result<u32> {
    let abs =
        std::fs::canonicalize(source).with_context(|| format!("finding {}", source.display()))?;
    let mut key = crc32c::crc32c(abs.to_string_lossy().as_bytes());
    let mut files = vec![abs.clone()];
    if abs.is_dir() {
        files = std::fs::read_dir(&abs)
            .with_context(|| format!("listing {}", abs.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
    }
    for file in files {
        let meta =
            std::fs::metadata(&file).with_context(|| format!("reading {}", file.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        key = crc32c::crc32c_append(key, name.unwrap_or_default().as_bytes());
        key = crc32c::crc32c_append(key, &meta.len().to_le_bytes());
        key = crc32c::crc32c_append(key, &modified.to_le_bytes());
    }
    Ok(key)
}
