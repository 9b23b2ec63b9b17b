//! LoRA files named by URL (`loras[].url`): where a URL or Hugging Face repo
//! id points, the on-disk cache of downloaded files, and the check that a
//! file is a LoRA.
//!
//! Layout under `DATA_DIR/models/lora-cache/`:
//! - `blobs/<blake3 of the content>.safetensors`: each distinct file once;
//! - `urls/<blake3 of the URL>.safetensors`: a hard link (a copy where links
//!   are not possible) to the blob that URL gave, so a URL is downloaded once.
//!
//! Every file is written to a temporary file in the cache folder and renamed
//! into place, so a reader never sees a partial file. Only files that pass
//! [`check_lora`] enter the cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fetch::{FetchError, Fetcher};

/// Where Hugging Face repo ids are downloaded from.
pub const HF_ENDPOINT: &str = "https://huggingface.co";

/// The file read from a repo id given without a file name (the name
/// diffusers' `save_lora_weights` writes).
pub const DEFAULT_LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The http(s) URL a `loras[].url` value points at: an `http(s)` URL whose
/// path ends in `.safetensors`, or a Hugging Face repo id `org/name`
/// (reads [`DEFAULT_LORA_FILE`] from its `main` revision) or
/// `org/name/path/file.safetensors`.
///
/// # Errors
/// A message saying which forms are accepted.
pub fn resolve_url(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        let parsed = url::Url::parse(value).map_err(|e| format!("`{value}` is not a URL: {e}"))?;
        if !parsed.path().ends_with(".safetensors") {
            return Err(format!(
                "`{value}` does not name a .safetensors file (only safetensors LoRAs are loaded)"
            ));
        }
        return Ok(parsed.to_string());
    }
    let segments: Vec<&str> = value.split('/').collect();
    let ok_segment = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.len() <= 96
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if segments.len() < 2 || !segments.iter().all(|s| ok_segment(s)) {
        return Err(format!(
            "`{value}` is neither an http(s) URL of a .safetensors file nor a Hugging Face \
             repo id (`org/name` or `org/name/file.safetensors`)"
        ));
    }
    let (repo, file) = if segments.len() == 2 {
        (value.to_string(), DEFAULT_LORA_FILE.to_string())
    } else {
        let file = segments[2..].join("/");
        if !file.ends_with(".safetensors") {
            return Err(format!(
                "`{value}`: the file in the repo must be a .safetensors file"
            ));
        }
        (segments[..2].join("/"), file)
    };
    Ok(format!("{HF_ENDPOINT}/{repo}/resolve/main/{file}"))
}

/// The LoRA cache folder of a data dir.
pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models").join("lora-cache")
}

/// The cache path of the file `url` (a resolved URL) gives, whether or not
/// it is there yet.
pub fn url_path(data_dir: &Path, url: &str) -> PathBuf {
    let hash = blake3::hash(url.as_bytes()).to_hex();
    cache_dir(data_dir)
        .join("urls")
        .join(format!("{hash}.safetensors"))
}

/// Check that `path` is a LoRA file the engine can read: the engine's own
/// header-only check ([`easel_diffusion::lora::check_lora_file`]: safetensors
/// header, keys of a known LoRA layout, each module with its down and up
/// matrix), so a file accepted here is one the worker will load.
///
/// # Errors
/// A message saying what is wrong with the file.
pub fn check_lora(path: &Path) -> Result<(), String> {
    easel_diffusion::lora::check_lora_file(path).map_err(|e| crate::checks::engine_message(&e))
}

/// Why a download did not give a usable LoRA.
#[derive(Debug)]
pub enum DownloadError {
    /// The fetch was refused or failed.
    Fetch(FetchError),
    /// The file came but is not a LoRA (the message says why).
    NotLora(String),
    /// The cache folder could not be written.
    Io(std::io::Error),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Fetch(e) => write!(f, "{e}"),
            DownloadError::NotLora(m) => write!(f, "the downloaded file is {m}"),
            DownloadError::Io(e) => write!(f, "the LoRA cache could not be written: {e}"),
        }
    }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Name prefix of the files a download writes before it renames them into
/// place; any left in the cache folder are from a process that died mid-download.
const PARTIAL_PREFIX: &str = ".partial-";

/// Remove what downloads interrupted by a crash left in the LoRA cache
/// (files named `PARTIAL_PREFIX*` directly in [`cache_dir`]); returns how
/// many were removed. Call at start, before any download runs.
pub fn sweep_partial(data_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(cache_dir(data_dir)) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX)
                && e.file_type().is_ok_and(|t| t.is_file())
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Download `url` (resolved) into the cache unless it is there, check it,
/// and return its cache path ([`url_path`]). Blocking: run it off the async
/// runtime.
///
/// # Errors
/// See [`DownloadError`]; nothing is left in the cache on error.
pub fn download(
    fetcher: &Fetcher,
    data_dir: &Path,
    url: &str,
    limit: u64,
    timeout: Duration,
) -> Result<PathBuf, DownloadError> {
    let target = url_path(data_dir, url);
    if target.is_file() {
        return Ok(target);
    }
    let dir = cache_dir(data_dir);
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(DownloadError::Io)?;
    std::fs::create_dir_all(dir.join("urls")).map_err(DownloadError::Io)?;
    let temp = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(&dir)
        .map_err(DownloadError::Io)?;
    let mut writer = Hashing {
        inner: std::io::BufWriter::new(temp.as_file()),
        hasher: blake3::Hasher::new(),
    };
    fetcher
        .get_into(url, limit, timeout, &mut writer)
        .map_err(DownloadError::Fetch)?;
    writer.flush().map_err(DownloadError::Io)?;
    let content = writer.hasher.finalize().to_hex();
    drop(writer);
    temp.as_file().sync_all().map_err(DownloadError::Io)?;
    check_lora(temp.path()).map_err(DownloadError::NotLora)?;
    let blob = blobs.join(format!("{content}.safetensors"));
    if !blob.is_file() {
        temp.persist(&blob)
            .map_err(|e| DownloadError::Io(e.error))?;
    }
    // Link the URL's name to the blob atomically: link (or copy) beside it, then rename.
    let staged = dir.join(format!("{PARTIAL_PREFIX}link-{}", uuid::Uuid::new_v4()));
    if std::fs::hard_link(&blob, &staged).is_err() {
        std::fs::copy(&blob, &staged).map_err(DownloadError::Io)?;
    }
    std::fs::rename(&staged, &target).map_err(|e| {
        let _ = std::fs::remove_file(&staged);
        DownloadError::Io(e)
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_partial_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_dir(dir.path());
        std::fs::create_dir_all(cache.join("blobs")).unwrap();
        std::fs::write(cache.join(".partial-abc"), b"half a file").unwrap();
        std::fs::write(cache.join(".partial-link-1"), b"x").unwrap();
        std::fs::write(cache.join("blobs/keep.safetensors"), b"x").unwrap();
        assert_eq!(sweep_partial(dir.path()), 2);
        assert!(!cache.join(".partial-abc").exists());
        assert!(cache.join("blobs/keep.safetensors").is_file());
        assert_eq!(sweep_partial(dir.path()), 0);
        assert_eq!(sweep_partial(&dir.path().join("none")), 0);
    }

    #[test]
    fn urls_and_repo_ids_resolve() {
        assert_eq!(
            resolve_url("https://x.test/a/b.safetensors").unwrap(),
            "https://x.test/a/b.safetensors"
        );
        assert_eq!(
            resolve_url("org/name").unwrap(),
            "https://huggingface.co/org/name/resolve/main/pytorch_lora_weights.safetensors"
        );
        assert_eq!(
            resolve_url("org/name/sub/w.safetensors").unwrap(),
            "https://huggingface.co/org/name/resolve/main/sub/w.safetensors"
        );
        for bad in [
            "https://x.test/a.bin",
            "org",
            "org/../x",
            "org/name/w.bin",
            "ftp://x/a.safetensors",
            "org/na me",
        ] {
            assert!(resolve_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fixture_loras_pass_and_other_files_fail() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        check_lora(&fixtures.join("loras/tiny-sd15-lora.safetensors")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("x.safetensors");
        std::fs::write(&text, b"hello world, not a tensor file").unwrap();
        assert!(check_lora(&text).is_err());
        let model = std::fs::read_dir(fixtures.join("models/tiny-sd15/unet"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        let e = check_lora(&model).unwrap_err();
        assert!(e.contains("not a LoRA"), "{e}");
    }
}
