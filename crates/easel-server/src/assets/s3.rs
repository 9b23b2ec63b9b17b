//! [`S3`]: asset files in an S3-compatible bucket, through Apache's
//! `object_store` client. Keys are `PREFIX/ab/<hash>.<ext>`; a PUT is
//! atomic on S3 (an object appears whole or not at all), so there are no
//! temporary objects.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::{Backend, Entry};

/// How long an unrecorded object stays before a sweep may remove it: other
/// servers sharing the bucket store a file before they commit its record.
pub const S3_SWEEP_GRACE: Duration = Duration::from_secs(3600);

/// Whether `key` is one of object_store's S3 configuration keys (what the
/// `s3` config table may set).
pub fn is_s3_option(key: &str) -> bool {
    key.to_ascii_lowercase()
        .parse::<AmazonS3ConfigKey>()
        .is_ok()
}

/// A bucket (and key prefix) of asset files.
#[derive(Debug)]
pub struct S3 {
    client: AmazonS3,
    prefix: Path,
    location: String,
}

impl S3 {
    /// The objects under `prefix` (no leading or trailing `/`; empty for
    /// the bucket's root) in `bucket`. Endpoint, region and credentials
    /// come from the standard variables as object_store reads them
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, …),
    /// then from `options`, object_store's S3 configuration keys
    /// (`endpoint`, `region`, `access_key_id`, `secret_access_key`,
    /// `allow_http`, …), which win. A request is retried 3 times within
    /// 30 seconds at most (object_store's default: 10 within 3 minutes)
    /// so that a store that is down fails a request in reasonable time.
    ///
    /// # Errors
    /// An option object_store does not know, or settings it refuses (a
    /// malformed endpoint URL). Nothing is sent to the bucket here.
    pub fn open(bucket: &str, prefix: &str, options: &BTreeMap<String, String>) -> io::Result<S3> {
        let mut builder = AmazonS3Builder::from_env();
        for (key, value) in options {
            let parsed: AmazonS3ConfigKey = key.to_ascii_lowercase().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("s3.{key}: not an S3 option (object_store's AmazonS3ConfigKey)"),
                )
            })?;
            builder = builder.with_config(parsed, value);
        }
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        };
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let client = builder
            .with_bucket_name(bucket)
            .with_retry(retry)
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{location}: {e}")))?;
        let prefix = Path::parse(prefix)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{location}: {e}")))?;
        Ok(S3 {
            client,
            prefix,
            location,
        })
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn error(&self, key: &str, e: object_store::Error) -> io::Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        let at = if key.is_empty() {
            self.location.clone()
        } else {
            format!("{}/{key}", self.location)
        };
        io::Error::new(kind, format!("{at}: {e}"))
    }
}

#[async_trait::async_trait]
impl Backend for S3 {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        if self.size(key).await? == Some(bytes.len() as u64) {
            return Ok(());
        }
        self.client
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        let result = match self.client.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(key, e)),
        };
        result
            .bytes()
            .await
            .map(Some)
            .map_err(|e| self.error(key, e))
    }

    async fn size(&self, key: &str) -> io::Result<Option<u64>> {
        match self.client.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        match self.client.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn list(&self) -> io::Result<Vec<Entry>> {
        let metas: Vec<_> = self
            .client
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| self.error("", e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m
                    .location
                    .prefix_match(&self.prefix)?
                    .map(|p| p.as_ref().to_string());
                Some(Entry {
                    key: key.collect::<Vec<_>>().join("/"),
                    modified: Some(m.last_modified.into()),
                })
            })
            .collect())
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }

    fn sweep_grace(&self) -> Duration {
        S3_SWEEP_GRACE
    }
}
