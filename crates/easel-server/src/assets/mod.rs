//! The asset store: files named by their content hash (blake3), kept by a
//! [`Backend`]: a local folder ([`Folder`], the default) or an
//! S3-compatible bucket ([`S3`]). Every file is complete where it is kept
//! before any record points to it, and only [`AssetStore`] knows where that
//! is: the rest of the server names files by `(hash, extension)` and reads
//! and writes bytes through it.
//!
//! Layout, the same under either backend: `ROOT/ab/abcdef….ext`, the first
//! two hex digits of the hash as a sub-folder (a key prefix on S3). ROOT is
//! `STORE/assets` for images and `STORE/trainings` for uploaded LoRA files,
//! where STORE is the `asset_store` setting ([`AssetStoreSpec`]): a folder
//! (default: the data dir, so `DATA_DIR/assets/ab/…` as always) or
//! `s3://BUCKET/PREFIX` (`PREFIX/assets/ab/…` in BUCKET).
//!
//! The same bytes are stored once however many records name them, and a
//! put of bytes already there writes nothing. At startup,
//! [`AssetStore::sweep`] removes temporary files and files no record names
//! (left by a process that died between writing a file and committing its
//! record).
//!
//! The engine reads a LoRA from a local file: [`AssetStore::local_file`] is
//! the folder's own file, or, for S3, a copy downloaded into a cache folder
//! under the data dir (`DATA_DIR/asset-cache/trainings/ab/…`).
//!
//! The API is async (object_store's S3 client is); the engine workers,
//! which are plain threads, call it through the runtime handle they already
//! use for the job store (`Handle::block_on`), so there is one API and no
//! sync copy of it to keep in step.

mod folder;
mod s3;

pub use folder::Folder;
pub use s3::{is_s3_option, S3, S3_SWEEP_GRACE};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

/// Whether `s` is a 64-digit lowercase hex hash.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// blake3 of `bytes` as 64 lowercase hex digits.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Whether `extension` is one a stored file may have: 1 to 16 ASCII
/// letters and digits (so no name can leave the store).
pub fn is_extension(extension: &str) -> bool {
    !extension.is_empty()
        && extension.len() <= 16
        && extension.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The key of the file `hash`.`extension` under a store's root
/// (`ab/<hash>.<ext>`); `None` when either is malformed.
fn key_of(hash: &str, extension: &str) -> Option<String> {
    (is_hash(hash) && is_extension(extension)).then(|| format!("{}/{hash}.{extension}", &hash[..2]))
}

/// `(hash, extension)` of a well-formed key (`ab/<hash>.<ext>` with `ab`
/// the hash's first two digits); `None` for anything else (temporary
/// files, strays).
fn parse_key(key: &str) -> Option<(String, String)> {
    let (dir, file) = key.split_once('/')?;
    let (hash, extension) = file.split_once('.')?;
    (key_of(hash, extension)? == key && dir == &hash[..2])
        .then(|| (hash.to_string(), extension.to_string()))
}

fn bad_name(hash: &str, extension: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "`{hash}.{extension}` is not a stored file name (64 lowercase hex digits, a dot, \
             1 to 16 letters or digits)"
        ),
    )
}

/// The forms `asset_store` takes, for error messages.
pub const ASSET_STORE_FORMS: &str =
    "a folder path, `s3://BUCKET` or `s3://BUCKET/PREFIX` (BUCKET: 3 to 63 of a-z, 0-9, `.`, `-`)";

/// Where the server keeps its asset files: the `asset_store` setting
/// (config key, `EASEL_ASSET_STORE`, `easel serve --asset-store`). Images
/// go under `assets/` and uploaded LoRA files under `trainings/` of it.
/// Written and read as text: a folder path or `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssetStoreSpec {
    /// A local folder (the default is the data dir).
    Folder(PathBuf),
    /// An S3-compatible bucket; endpoint, region and credentials come from
    /// the standard `AWS_*` variables and the `s3` config table (see
    /// [`S3::open`]).
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix, without leading or trailing `/`; empty for the
        /// bucket's root.
        prefix: String,
    },
}

impl FromStr for AssetStoreSpec {
    type Err = String;

    /// A folder path, or `s3://BUCKET` / `s3://BUCKET/PREFIX`.
    ///
    /// # Errors
    /// An empty value, another URL scheme, a malformed bucket name or
    /// prefix; the message names the allowed forms.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let refuse = |why: String| Err(format!("{why}; allowed: {ASSET_STORE_FORMS}"));
        if s.is_empty() {
            return refuse("empty".into());
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(AssetStoreSpec::Folder(PathBuf::from(s)));
        };
        if !scheme.eq_ignore_ascii_case("s3") {
            return refuse(format!("`{s}`: `{scheme}://` is not a supported store"));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !bucket_ok {
            return refuse(format!("`{s}`: `{bucket}` is not a bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix.is_empty()
            || (object_store::path::Path::parse(prefix).is_ok()
                && prefix
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != ".."));
        if !prefix_ok {
            return refuse(format!("`{s}`: `{prefix}` is not a key prefix"));
        }
        Ok(AssetStoreSpec::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl fmt::Display for AssetStoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssetStoreSpec::Folder(path) => write!(f, "{}", path.display()),
            AssetStoreSpec::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            AssetStoreSpec::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl serde::Serialize for AssetStoreSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AssetStoreSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One stored object as [`Backend::list`] reports it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key under the store's root (`ab/<hash>.<ext>`, or whatever else
    /// is there: temporary files, strays).
    pub key: String,
    /// When it was last written, if known.
    pub modified: Option<SystemTime>,
}

/// Where asset files are kept: a folder or a bucket. Keys are relative to
/// the backend's root and are checked by [`AssetStore`] before they get
/// here (`ab/<hash>.<ext>`), except in [`Backend::delete`] during a sweep,
/// which gets keys [`Backend::list`] returned.
///
/// Errors are `io::Error`s: `NotFound` only where a method says so,
/// anything else (unreachable endpoint, refused credentials, full disk) as
/// another kind, with the location in the message.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The root for messages and logs (`/data/assets`,
    /// `s3://bucket/prefix/assets`).
    fn location(&self) -> String;

    /// Store `bytes` under `key`, complete and at once: a reader never sees
    /// part of it (folder: temporary file, fsync, rename; S3: one PUT). When
    /// an object of the same size is already there (same key: same
    /// content), writes nothing.
    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()>;

    /// The bytes under `key`, `None` when there is nothing there.
    async fn get(&self, key: &str) -> io::Result<Option<Bytes>>;

    /// The size of the object under `key`, `None` when there is nothing there.
    async fn size(&self, key: &str) -> io::Result<Option<u64>>;

    /// Remove the object under `key`; nothing there is not an error.
    async fn delete(&self, key: &str) -> io::Result<()>;

    /// Every object under the root, whatever its name.
    async fn list(&self) -> io::Result<Vec<Entry>>;

    /// The local file holding `key`, for a backend on the local disk;
    /// `None` for a remote one.
    fn local_path(&self, key: &str) -> Option<PathBuf>;

    /// How old an unrecorded object must be before a sweep removes it: zero
    /// for a folder only this server writes; longer for a store other
    /// servers share (one may have written a file whose record it has not
    /// committed yet).
    fn sweep_grace(&self) -> Duration;
}

/// A file stored by [`AssetStore::put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// blake3 of the bytes, 64 hex digits.
    pub hash: String,
    /// The extension it was stored with.
    pub extension: String,
    /// Bytes.
    pub size: u64,
}

/// A content-addressed store of files on a [`Backend`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AssetStore {
    backend: Arc<dyn Backend>,
    /// Local copies of a remote backend's files (see [`Self::local_file`]).
    cache: Option<Folder>,
    /// Local copies whose bytes were checked against their hash, with the
    /// size and modification time they had then: unchanged, a copy is not
    /// read and hashed again for every job and submission that uses it.
    verified: Arc<Mutex<HashMap<PathBuf, (u64, SystemTime)>>>,
}

/// Size and modification time of the file at `path`.
fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Hashing more than this many bytes runs on the blocking pool.
const HASH_INLINE_MAX: usize = 1 << 20;

async fn hash_of(bytes: &Bytes) -> io::Result<String> {
    if bytes.len() <= HASH_INLINE_MAX {
        return Ok(hash_bytes(bytes));
    }
    let b = bytes.clone();
    tokio::task::spawn_blocking(move || hash_bytes(&b))
        .await
        .map_err(io::Error::other)
}

impl AssetStore {
    /// A store on `backend`; `cache` is the folder local copies of its
    /// files go to (needed only for a remote backend's
    /// [`Self::local_file`]).
    pub fn new(backend: Arc<dyn Backend>, cache: Option<Folder>) -> AssetStore {
        AssetStore {
            backend,
            cache,
            verified: Arc::default(),
        }
    }

    /// A store in the folder `root` (created if missing).
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn folder(root: impl Into<PathBuf>) -> io::Result<AssetStore> {
        Ok(Self::new(Arc::new(Folder::open(root)?), None))
    }

    /// The store `name` (`assets` or `trainings`) of the `asset_store`
    /// setting `spec`: the folder `spec/name`, or the bucket's
    /// `PREFIX/name`, with local copies under `data_dir/asset-cache/name`.
    /// `s3_options` are object_store's S3 settings over the `AWS_*`
    /// variables (see [`S3::open`]).
    ///
    /// # Errors
    /// A folder that cannot be created, an unknown S3 option, or S3
    /// settings object_store refuses. Nothing is sent to S3 here.
    pub fn open(
        spec: &AssetStoreSpec,
        name: &str,
        data_dir: &Path,
        s3_options: &BTreeMap<String, String>,
    ) -> io::Result<AssetStore> {
        match spec {
            AssetStoreSpec::Folder(root) => Self::folder(root.join(name)),
            AssetStoreSpec::S3 { bucket, prefix } => {
                let prefix = if prefix.is_empty() {
                    name.to_string()
                } else {
                    format!("{prefix}/{name}")
                };
                let s3 = S3::open(bucket, &prefix, s3_options)?;
                let cache = Folder::open(data_dir.join("asset-cache").join(name))?;
                Ok(Self::new(Arc::new(s3), Some(cache)))
            }
        }
    }

    /// Where the files are, for messages (`/data/assets`,
    /// `s3://bucket/prefix/assets`).
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Store `bytes` with `extension`; writes nothing when the same bytes
    /// are already stored. The file is complete where it is kept when this
    /// returns.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed extension; writing fails (disk full,
    /// permissions, the bucket unreachable or refusing).
    pub async fn put(&self, bytes: impl Into<Bytes>, extension: &str) -> io::Result<StoredFile> {
        let bytes = bytes.into();
        let hash = hash_of(&bytes).await?;
        let key = key_of(&hash, extension).ok_or_else(|| bad_name(&hash, extension))?;
        let size = bytes.len() as u64;
        self.backend.put(&key, bytes).await?;
        Ok(StoredFile {
            hash,
            extension: extension.to_string(),
            size,
        })
    }

    /// The bytes of `hash`.`extension`, `None` when it is not stored.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed name; reading fails.
    pub async fn get(&self, hash: &str, extension: &str) -> io::Result<Option<Bytes>> {
        let key = key_of(hash, extension).ok_or_else(|| bad_name(hash, extension))?;
        self.backend.get(&key).await
    }

    /// Whether `hash`.`extension` is stored.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed name; the backend cannot be asked.
    pub async fn exists(&self, hash: &str, extension: &str) -> io::Result<bool> {
        let key = key_of(hash, extension).ok_or_else(|| bad_name(hash, extension))?;
        Ok(self.backend.size(&key).await?.is_some())
    }

    /// Delete `hash`.`extension` (and its local copy), if present. A
    /// failure is logged, not returned: the next start's sweep removes what
    /// is left.
    pub async fn remove(&self, hash: &str, extension: &str) {
        let Some(key) = key_of(hash, extension) else {
            return;
        };
        if let Err(e) = self.backend.delete(&key).await {
            tracing::warn!("cannot remove {key} from {}: {e}", self.location());
        }
        if let Some(cache) = &self.cache {
            let _ = cache.delete(&key).await;
        }
    }

    /// The keys of every stored object (`ab/<hash>.<ext>`, and any stray
    /// or temporary object), sorted.
    ///
    /// # Errors
    /// The backend cannot be listed.
    pub async fn keys(&self) -> io::Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .backend
            .list()
            .await?
            .into_iter()
            .map(|e| e.key)
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Remove temporary files and every file whose hash is not in `known`
    /// (older than the backend's [`Backend::sweep_grace`]), and the same
    /// from the local cache. Returns how many objects were removed.
    ///
    /// # Errors
    /// The backend cannot be listed (a removal that fails is logged).
    pub async fn sweep(&self, known: &HashSet<String>) -> io::Result<usize> {
        self.sweep_older_than(known, self.backend.sweep_grace())
            .await
    }

    /// [`Self::sweep`] with another grace period: unrecorded objects
    /// younger than `min_age` stay (the local cache is swept whole).
    ///
    /// # Errors
    /// As [`Self::sweep`].
    pub async fn sweep_older_than(
        &self,
        known: &HashSet<String>,
        min_age: Duration,
    ) -> io::Result<usize> {
        let mut removed = sweep_backend(self.backend.as_ref(), known, min_age).await?;
        if let Some(cache) = &self.cache {
            removed += sweep_backend(cache, known, Duration::ZERO)
                .await
                .unwrap_or(0);
        }
        Ok(removed)
    }

    /// A local file holding `hash`.`extension`, for code that needs a path
    /// (the engine's LoRA loader): the folder's own file, or a copy of the
    /// remote one in the cache folder, downloaded when missing or when its
    /// bytes no longer hash to `hash` (written atomically: temporary file,
    /// rename).
    ///
    /// # Errors
    /// `InvalidInput` for a malformed name, `NotFound` when it is not
    /// stored, a download or write failure, or downloaded bytes that do not
    /// hash to `hash`.
    pub async fn local_file(&self, hash: &str, extension: &str) -> io::Result<PathBuf> {
        let key = key_of(hash, extension).ok_or_else(|| bad_name(hash, extension))?;
        let not_found = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{key} is not in {}", self.location()),
            )
        };
        if let Some(path) = self.backend.local_path(&key) {
            return if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
                Ok(path)
            } else {
                Err(not_found())
            };
        }
        let cache = self.cache.as_ref().ok_or_else(|| {
            io::Error::other(format!("{}: no local cache folder", self.location()))
        })?;
        let path = cache
            .local_path(&key)
            .ok_or_else(|| io::Error::other("the cache folder has no local path"))?;
        let (p, want, verified) = (path.clone(), hash.to_string(), self.verified.clone());
        let cached = tokio::task::spawn_blocking(move || {
            let before = stamp(&p)?;
            let known = verified.lock().unwrap_or_else(|e| e.into_inner()).get(&p) == Some(&before);
            if known {
                return Some(());
            }
            let bytes = std::fs::read(&p).ok()?;
            (hash_bytes(&bytes) == want && stamp(&p) == Some(before)).then(|| {
                verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p, before);
            })
        })
        .await
        .map_err(io::Error::other)?;
        if cached.is_some() {
            return Ok(path);
        }
        let bytes = self.backend.get(&key).await?.ok_or_else(not_found)?;
        if hash_of(&bytes).await? != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{key} in {} does not hash to its name",
                    self.backend.location()
                ),
            ));
        }
        // Not Folder::put: a corrupt copy of the same size must be replaced.
        cache.write(&key, bytes).await?;
        if let Some(now) = stamp(&path) {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path.clone(), now);
        }
        Ok(path)
    }
}

async fn sweep_backend(
    backend: &dyn Backend,
    known: &HashSet<String>,
    grace: Duration,
) -> io::Result<usize> {
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in backend.list().await? {
        let recorded = parse_key(&entry.key).is_some_and(|(hash, _)| known.contains(&hash));
        if recorded {
            continue;
        }
        let young = !grace.is_zero()
            && entry
                .modified
                .is_none_or(|m| now.duration_since(m).unwrap_or_default() < grace);
        if young {
            continue;
        }
        match backend.delete(&entry.key).await {
            Ok(()) => {
                tracing::info!(
                    "removed orphan file {} from {}",
                    entry.key,
                    backend.location()
                );
                removed += 1;
            }
            Err(e) => tracing::warn!(
                "cannot remove {} from {}: {e}",
                entry.key,
                backend.location()
            ),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_the_store() {
        let h = hash_bytes(b"x");
        assert_eq!(key_of(&h, "png"), Some(format!("{}/{h}.png", &h[..2])));
        assert!(key_of("../../etc/passwd", "png").is_none());
        assert!(key_of(&h, "png/../x").is_none());
        assert!(key_of(&h, "").is_none());
        assert!(key_of(&h.to_uppercase(), "png").is_none());
        assert_eq!(
            parse_key(&key_of(&h, "webp").unwrap()),
            Some((h.clone(), "webp".into()))
        );
        assert!(parse_key(&format!("zz/{h}.png")).is_none());
        assert!(parse_key(&format!("{}/.easel-abc.tmp", &h[..2])).is_none());
    }

    #[test]
    fn asset_store_spec_forms() {
        let p = |s: &str| s.parse::<AssetStoreSpec>();
        assert_eq!(
            p("/srv/easel").unwrap(),
            AssetStoreSpec::Folder("/srv/easel".into())
        );
        assert_eq!(
            p("s3://my-bucket").unwrap(),
            AssetStoreSpec::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        let spec = p("s3://my.bucket/easel/prod/").unwrap();
        assert_eq!(
            spec,
            AssetStoreSpec::S3 {
                bucket: "my.bucket".into(),
                prefix: "easel/prod".into()
            }
        );
        assert_eq!(spec.to_string(), "s3://my.bucket/easel/prod");
        for bad in [
            "",
            "gs://bucket/x",
            "s3://",
            "s3://Bucket",
            "s3://b",
            "s3://bucket/a//b",
            "s3://bucket/../x",
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
        }
    }
}
