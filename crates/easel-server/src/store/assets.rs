//! The `assets` table: output and input images by content hash.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};

use super::{Store, StoreResult};

/// An asset row: a stored image file and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct AssetRow {
    /// UUID.
    pub id: String,
    /// Owner.
    pub key_id: String,
    /// `output` (generated) or `input` (an image given to a job).
    pub kind: String,
    /// blake3 of the file, hex.
    pub hash: String,
    /// File extension (`png`, `jpg`, `webp`).
    pub extension: String,
    /// The file name shown to clients.
    pub file_name: String,
    /// Bytes.
    pub file_size: i64,
    /// MIME type.
    pub file_type: String,
    /// Pixels.
    pub width: Option<i64>,
    /// Pixels.
    pub height: Option<i64>,
    /// The image's own seed (outputs).
    pub seed: Option<u64>,
    /// The job.
    pub generation_id: Option<String>,
    /// The image definition's index.
    pub item_idx: Option<i64>,
    /// The image's index within its definition's batch.
    pub image_idx: Option<i64>,
    /// Creation time (ms).
    pub created_at: i64,
}

impl Store {
    pub(super) fn asset_row(row: &SqliteRow) -> AssetRow {
        let seed: Option<String> = row.get("seed");
        AssetRow {
            id: row.get("id"),
            key_id: row.get("key_id"),
            kind: row.get("kind"),
            hash: row.get("hash"),
            extension: row.get("extension"),
            file_name: row.get("file_name"),
            file_size: row.get("file_size"),
            file_type: row.get("file_type"),
            width: row.get("width"),
            height: row.get("height"),
            seed: seed.and_then(|s| s.parse().ok()),
            generation_id: row.get("generation_id"),
            item_idx: row.get("item_idx"),
            image_idx: row.get("image_idx"),
            created_at: row.get("created_at"),
        }
    }

    pub(super) async fn insert_asset_tx(
        tx: &mut Transaction<'_, Sqlite>,
        a: &AssetRow,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO assets (id, key_id, kind, hash, extension, file_name, file_size, file_type,
                                 width, height, seed, generation_id, item_idx, image_idx, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(&a.key_id)
        .bind(&a.kind)
        .bind(&a.hash)
        .bind(&a.extension)
        .bind(&a.file_name)
        .bind(a.file_size)
        .bind(&a.file_type)
        .bind(a.width)
        .bind(a.height)
        .bind(a.seed.map(|s| s.to_string()))
        .bind(&a.generation_id)
        .bind(a.item_idx)
        .bind(a.image_idx)
        .bind(a.created_at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// An asset by id.
    pub async fn asset(&self, id: &str) -> StoreResult<Option<AssetRow>> {
        let row = sqlx::query("SELECT * FROM assets WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::asset_row))
    }

    /// Any asset whose file has `hash` (for serving files by hash).
    pub async fn asset_by_hash(&self, hash: &str) -> StoreResult<Option<AssetRow>> {
        let row = sqlx::query("SELECT * FROM assets WHERE hash = ? LIMIT 1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::asset_row))
    }

    /// The output assets of a job, in image order.
    pub async fn assets_of(&self, generation_id: &str) -> StoreResult<Vec<AssetRow>> {
        let rows = sqlx::query(
            "SELECT * FROM assets WHERE generation_id = ? AND kind = 'output'
             ORDER BY item_idx, image_idx",
        )
        .bind(generation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::asset_row).collect())
    }

    /// A key's assets, newest first.
    pub async fn assets_of_key(&self, key_id: &str, limit: i64) -> StoreResult<Vec<AssetRow>> {
        let rows = sqlx::query(
            "SELECT * FROM assets WHERE key_id = ? AND kind = 'output'
             ORDER BY created_at DESC, id LIMIT ?",
        )
        .bind(key_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::asset_row).collect())
    }

    /// Every stored content hash: of assets and of trainings.
    pub async fn known_hashes(&self) -> StoreResult<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT hash FROM assets UNION SELECT hash FROM trainings")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("hash")).collect())
    }
}
