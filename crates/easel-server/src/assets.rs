//! The asset store: files named by their content hash (blake3) under a
//! folder, written atomically (temporary file, fsync, rename) before any
//! record points to them.
//!
//! Layout: `ROOT/ab/abcdef….ext` (the first two hex digits of the hash as a
//! sub-folder). The same bytes are stored once however many records name
//! them. At startup, [`FileStore::sweep`] removes temporary files and files
//! no record names (left by a process that died between writing a file and
//! committing its record), so the folder never holds orphans.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

/// A content-addressed folder of files.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

/// A file stored by [`FileStore::put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// blake3 of the bytes, 64 hex digits.
    pub hash: String,
    /// The extension it was stored with.
    pub extension: String,
    /// Bytes.
    pub size: u64,
    /// Where it is.
    pub path: PathBuf,
}

/// Whether `s` is a 64-digit lowercase hex hash.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// blake3 of `bytes` as 64 lowercase hex digits.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

impl FileStore {
    /// A store rooted at `root` (created if missing).
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<FileStore> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(FileStore { root })
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the file with `hash` and `extension` lives (whether or not it exists).
    /// `None` when `hash` is not a hash or `extension` is not a plain word,
    /// so no caller can name a path outside the store.
    pub fn path(&self, hash: &str, extension: &str) -> Option<PathBuf> {
        let ext_ok = !extension.is_empty()
            && extension.len() <= 16
            && extension.bytes().all(|b| b.is_ascii_alphanumeric());
        if !is_hash(hash) || !ext_ok {
            return None;
        }
        Some(
            self.root
                .join(&hash[..2])
                .join(format!("{hash}.{extension}")),
        )
    }

    /// Store `bytes` with `extension`; writes nothing when the same bytes
    /// are already stored. The file is complete on disk when this returns.
    ///
    /// # Errors
    /// Writing fails (disk full, permissions).
    pub fn put(&self, bytes: &[u8], extension: &str) -> io::Result<StoredFile> {
        let hash = hash_bytes(bytes);
        let path = self.path(&hash, extension).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad extension `{extension}`"),
            )
        })?;
        let present = std::fs::metadata(&path)
            .map(|m| m.len() == bytes.len() as u64)
            .unwrap_or(false);
        if !present {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            easel_core::write_atomic(&path, bytes)?;
        }
        Ok(StoredFile {
            hash,
            extension: extension.to_string(),
            size: bytes.len() as u64,
            path,
        })
    }

    /// Delete the file with `hash` and `extension`, if present.
    pub fn remove(&self, hash: &str, extension: &str) {
        if let Some(path) = self.path(hash, extension) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Every stored file: `(hash, path)`.
    pub fn files(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for dir in read_dir_paths(&self.root) {
            if !dir.is_dir() {
                continue;
            }
            for file in read_dir_paths(&dir) {
                let hash = file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                out.push((hash, file));
            }
        }
        out
    }

    /// Remove temporary files and every file whose hash is not in `known`.
    /// Returns how many files were removed.
    pub fn sweep(&self, known: &HashSet<String>) -> usize {
        let mut removed = 0;
        for (hash, path) in self.files() {
            let temp = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(easel_core::fs::TEMP_FILE_PREFIX));
            if temp || !is_hash(&hash) || !known.contains(&hash) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!("removed orphan file {}", path.display());
                        removed += 1;
                    }
                    Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
        removed
    }
}

fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_sweep_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("assets")).unwrap();
        let a = store.put(b"hello", "png").unwrap();
        let b = store.put(b"hello", "png").unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a.path).unwrap(), b"hello");
        let orphan = store.put(b"orphan", "webp").unwrap();
        let temp = a.path.parent().unwrap().join(".easel-abc.tmp");
        std::fs::write(&temp, b"partial").unwrap();
        let known: HashSet<String> = [a.hash.clone()].into();
        assert_eq!(store.sweep(&known), 2);
        assert!(a.path.exists());
        assert!(!orphan.path.exists());
        assert!(!temp.exists());
    }

    #[test]
    fn paths_stay_inside_the_store() {
        let store = FileStore::open(tempfile::tempdir().unwrap().path().join("a")).unwrap();
        assert!(store.path("../../etc/passwd", "png").is_none());
        let h = hash_bytes(b"x");
        assert!(store.path(&h, "png/../x").is_none());
        assert!(store.path(&h, "png").unwrap().starts_with(store.root()));
    }
}
