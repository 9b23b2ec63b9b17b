//! [`Folder`]: asset files in a local folder, as the server has always kept
//! them (`ROOT/ab/<hash>.<ext>`, written with `easel_core::write_atomic`:
//! temporary file `.easel-*.tmp` beside it, fsync, rename), so existing
//! data dirs keep working unchanged.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use super::{Backend, Entry};

/// A local folder of asset files. Blocking file work runs on tokio's
/// blocking pool.
#[derive(Debug, Clone)]
pub struct Folder {
    root: PathBuf,
}

impl Folder {
    /// The folder `root` (created if missing).
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Folder> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Folder { root })
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Write `bytes` to `key` atomically, replacing what is there.
    ///
    /// # Errors
    /// Writing fails (disk full, permissions).
    pub(super) async fn write(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let path = self.root.join(key);
        blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            easel_core::write_atomic(&path, &bytes)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[async_trait::async_trait]
impl Backend for Folder {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let present = tokio::fs::metadata(self.root.join(key))
            .await
            .is_ok_and(|m| m.len() == bytes.len() as u64);
        if present {
            return Ok(());
        }
        self.write(key, bytes).await
    }

    async fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        match tokio::fs::read(self.root.join(key)).await {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn size(&self, key: &str) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(self.root.join(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        match tokio::fs::remove_file(self.root.join(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The files one folder down (`ab/…`); anything else under the root
    /// is not the store's and is left alone.
    async fn list(&self) -> io::Result<Vec<Entry>> {
        let root = self.root.clone();
        blocking(move || {
            let mut out = Vec::new();
            for dir in read_dir_paths(&root) {
                if !dir.is_dir() {
                    continue;
                }
                for file in read_dir_paths(&dir) {
                    let Ok(meta) = std::fs::metadata(&file) else {
                        continue;
                    };
                    let Ok(rel) = file.strip_prefix(&root) else {
                        continue;
                    };
                    if !meta.is_file() {
                        continue;
                    }
                    let Some(key) = rel.to_str() else { continue };
                    out.push(Entry {
                        key: key.replace(std::path::MAIN_SEPARATOR, "/"),
                        modified: meta.modified().ok(),
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.root.join(key))
    }

    /// Zero: one server owns a folder (as it owns its data dir).
    fn sweep_grace(&self) -> Duration {
        Duration::ZERO
    }
}
