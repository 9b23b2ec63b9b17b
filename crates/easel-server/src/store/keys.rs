//! The `api_keys` table: keys by the SHA-256 of their secret, revocation.

use sqlx::Row;

use super::{Store, StoreResult};
use crate::util::now_ms;

/// An API key as stored (never the secret itself, only its SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    /// `key_` + 16 hex digits.
    pub id: String,
    /// A label.
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// Credit limit in micro-USD, if any.
    pub credit_limit_micros: Option<i64>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Revocation time (ms), if revoked.
    pub revoked_at: Option<i64>,
}

impl Store {
    /// Insert a key with the SHA-256 (hex) of its secret.
    pub async fn insert_key(&self, key: &KeyRow, secret_hash: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_hash, credit_limit_micros, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(secret_hash)
        .bind(key.credit_limit_micros)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn key_row(row: &super::Row) -> KeyRow {
        KeyRow {
            id: row.get("id"),
            name: row.get("name"),
            prefix: row.get("prefix"),
            credit_limit_micros: row.get("credit_limit_micros"),
            created_at: row.get("created_at"),
            revoked_at: row.get("revoked_at"),
        }
    }

    /// The unrevoked key whose secret hashes to `secret_hash`.
    pub async fn key_by_hash(&self, secret_hash: &str) -> StoreResult<Option<KeyRow>> {
        let row =
            sqlx::query("SELECT * FROM api_keys WHERE secret_hash = $1 AND revoked_at IS NULL")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(Self::key_row))
    }

    /// A key by id.
    pub async fn key(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::key_row))
    }

    /// Every key, oldest first.
    pub async fn keys(&self) -> StoreResult<Vec<KeyRow>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::key_row).collect())
    }

    /// Revoke a key; false when there is no such unrevoked key.
    pub async fn revoke_key(&self, id: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}
