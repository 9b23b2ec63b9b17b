//! The `trainings` table: registered LoRA files.

use sqlx::Row;

use super::{Store, StoreResult};

/// A registered LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRow {
    /// UUID (`trainingId`).
    pub id: String,
    /// Owner.
    pub key_id: String,
    /// A label.
    pub name: String,
    /// The base model it was trained for.
    pub base_model: String,
    /// blake3 of the file.
    pub hash: String,
    /// Bytes.
    pub file_size: i64,
    /// Creation time (ms).
    pub created_at: i64,
}

impl Store {
    fn training_row(row: &super::Row) -> TrainingRow {
        TrainingRow {
            id: row.get("id"),
            key_id: row.get("key_id"),
            name: row.get("name"),
            base_model: row.get("base_model"),
            hash: row.get("hash"),
            file_size: row.get("file_size"),
            created_at: row.get("created_at"),
        }
    }

    /// Every LoRA file the trainings name, `(hash, "safetensors")`, once
    /// each (`easel migrate` copies them).
    pub async fn training_files(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT DISTINCT hash FROM trainings ORDER BY hash")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("hash"), "safetensors".to_string()))
            .collect())
    }

    /// Insert a training (its file already stored).
    pub async fn insert_training(&self, t: &TrainingRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO trainings (id, key_id, name, base_model, hash, file_size, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.id)
        .bind(&t.key_id)
        .bind(&t.name)
        .bind(&t.base_model)
        .bind(&t.hash)
        .bind(t.file_size)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A key's training by id.
    pub async fn training(&self, key_id: &str, id: &str) -> StoreResult<Option<TrainingRow>> {
        let row = sqlx::query("SELECT * FROM trainings WHERE id = $1 AND key_id = $2")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::training_row))
    }

    /// A key's trainings, newest first.
    pub async fn trainings(&self, key_id: &str) -> StoreResult<Vec<TrainingRow>> {
        let rows =
            sqlx::query("SELECT * FROM trainings WHERE key_id = $1 ORDER BY created_at DESC")
                .bind(key_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(Self::training_row).collect())
    }

    /// Delete a key's training; returns it and whether its file is still
    /// used by another training.
    pub async fn delete_training(
        &self,
        key_id: &str,
        id: &str,
    ) -> StoreResult<Option<(TrainingRow, bool)>> {
        let Some(t) = self.training(key_id, id).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM trainings WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        let shared: i64 = sqlx::query("SELECT COUNT(*) AS n FROM trainings WHERE hash = $1")
            .bind(&t.hash)
            .fetch_one(&self.pool)
            .await?
            .get("n");
        Ok(Some((t, shared > 0)))
    }
}
