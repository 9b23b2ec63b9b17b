//! The `assets` table: output and input images by content hash.

use sqlx::{Any, Row, Transaction};

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

/// Which of a key's outputs [`Store::assets_page`] lists.
#[derive(Debug, Clone, Copy, Default)]
pub struct AssetFilter<'a> {
    /// At most this many.
    pub limit: i64,
    /// Skip this many (newest first).
    pub offset: i64,
    /// A substring of the prompt (ASCII case-insensitive).
    pub prompt: Option<&'a str>,
    /// The `baseModel` as requested, exactly.
    pub model: Option<&'a str>,
}

impl Store {
    pub(super) fn asset_row(row: &super::Row) -> AssetRow {
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
        tx: &mut Transaction<'_, Any>,
        a: &AssetRow,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO assets (id, key_id, kind, hash, extension, file_name, file_size, file_type,
                                 width, height, seed, generation_id, item_idx, image_idx, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
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
        let row = sqlx::query("SELECT * FROM assets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::asset_row))
    }

    /// Any asset whose file has `hash` (for serving files by hash).
    pub async fn asset_by_hash(&self, hash: &str) -> StoreResult<Option<AssetRow>> {
        let row = sqlx::query("SELECT * FROM assets WHERE hash = $1 LIMIT 1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::asset_row))
    }

    /// The output assets of a job, in image order.
    pub async fn assets_of(&self, generation_id: &str) -> StoreResult<Vec<AssetRow>> {
        let rows = sqlx::query(
            "SELECT * FROM assets WHERE generation_id = $1 AND kind = 'output'
             ORDER BY item_idx, image_idx",
        )
        .bind(generation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::asset_row).collect())
    }

    /// A page of a key's output assets, newest first: skip `offset`, at
    /// most `limit`, only those whose image definition's prompt contains
    /// `prompt` (ASCII case-insensitive; `%` and `_` match themselves) and
    /// whose `baseModel` is `model`, when given.
    pub async fn assets_page(
        &self,
        key_id: &str,
        filter: &AssetFilter<'_>,
    ) -> StoreResult<Vec<AssetRow>> {
        let pattern = filter.prompt.map(|p| {
            let escaped = p
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        let prompt = self
            .backend
            .json_text("i.spec_json", &["definition", "prompt"]);
        let model = self
            .backend
            .json_text("i.spec_json", &["definition", "baseModel"]);
        // SQLite's LIKE ignores ASCII case; PostgreSQL's ILIKE does too.
        let like = match self.backend {
            super::Backend::Sqlite => "LIKE",
            super::Backend::Postgres => "ILIKE",
        };
        let sql = format!(
            "SELECT a.* FROM assets a
             LEFT JOIN generation_items i
                    ON i.generation_id = a.generation_id AND i.idx = a.item_idx
             WHERE a.key_id = $1 AND a.kind = 'output'
               AND ($2 IS NULL OR {prompt} {like} $3 ESCAPE '\\')
               AND ($4 IS NULL OR {model} = $5)
             ORDER BY a.created_at DESC, a.generation_id, a.item_idx DESC, a.image_idx DESC
             LIMIT $6 OFFSET $7"
        );
        let rows = sqlx::query(&sql)
            .bind(key_id)
            .bind(&pattern)
            .bind(&pattern)
            .bind(filter.model)
            .bind(filter.model)
            .bind(filter.limit)
            .bind(filter.offset)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::asset_row).collect())
    }

    /// Delete output asset `id` of `key_id`: `None` when the key has no
    /// such output; else the row and whether another record (an asset or a
    /// training) still names its content hash (then the file must stay).
    pub async fn delete_output_asset(
        &self,
        key_id: &str,
        id: &str,
    ) -> StoreResult<Option<(AssetRow, bool)>> {
        let mut tx = self.write_tx().await?;
        let row =
            sqlx::query("SELECT * FROM assets WHERE id = $1 AND key_id = $2 AND kind = 'output'")
                .bind(id)
                .bind(key_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(asset) = row.as_ref().map(Self::asset_row) else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM assets WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let shared: i64 = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM assets WHERE hash = $1)
                  + (SELECT COUNT(*) FROM trainings WHERE hash = $2) AS n",
        )
        .bind(&asset.hash)
        .bind(&asset.hash)
        .fetch_one(&mut *tx)
        .await?
        .get("n");
        tx.commit().await?;
        Ok(Some((asset, shared > 0)))
    }

    /// Every file the asset records name, `(hash, extension)`, once each
    /// (`easel migrate` copies them).
    pub async fn asset_files(&self) -> StoreResult<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT DISTINCT hash, extension FROM assets ORDER BY hash, extension")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("hash"), r.get("extension")))
            .collect())
    }

    /// Every stored content hash: of assets and of trainings.
    pub async fn known_hashes(&self) -> StoreResult<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT hash FROM assets UNION SELECT hash FROM trainings")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("hash")).collect())
    }
}
