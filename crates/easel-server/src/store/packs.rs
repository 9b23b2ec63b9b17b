//! The `inference_packs` table: saved image definitions.

use sqlx::Row;

use super::{Store, StoreResult};

/// A saved inference pack.
#[derive(Debug, Clone, PartialEq)]
pub struct PackRow {
    /// UUID (`inferencePackId`).
    pub id: String,
    /// Owner.
    pub key_id: String,
    /// A label.
    pub name: String,
    /// The pack body (image definitions and defaults), JSON.
    pub body_json: String,
    /// Its image definitions.
    pub image_count: i64,
    /// Creation time (ms).
    pub created_at: i64,
}

impl Store {
    fn pack_row(row: &super::Row) -> PackRow {
        PackRow {
            id: row.get("id"),
            key_id: row.get("key_id"),
            name: row.get("name"),
            body_json: row.get("body_json"),
            image_count: row.get("image_count"),
            created_at: row.get("created_at"),
        }
    }

    /// Insert a pack.
    pub async fn insert_pack(&self, p: &PackRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO inference_packs (id, key_id, name, body_json, image_count, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&p.id)
        .bind(&p.key_id)
        .bind(&p.name)
        .bind(&p.body_json)
        .bind(p.image_count)
        .bind(p.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A key's pack by id.
    pub async fn pack(&self, key_id: &str, id: &str) -> StoreResult<Option<PackRow>> {
        let row = sqlx::query("SELECT * FROM inference_packs WHERE id = $1 AND key_id = $2")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::pack_row))
    }

    /// A key's packs, newest first.
    pub async fn packs(&self, key_id: &str) -> StoreResult<Vec<PackRow>> {
        let rows =
            sqlx::query("SELECT * FROM inference_packs WHERE key_id = $1 ORDER BY created_at DESC")
                .bind(key_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(Self::pack_row).collect())
    }

    /// Delete a key's pack; false when there is none.
    pub async fn delete_pack(&self, key_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM inference_packs WHERE id = $1 AND key_id = $2")
            .bind(id)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
