//! A key's usage, summed from the `ledger` table (charges and refunds).

use sqlx::Row;

use super::{Store, StoreResult};

/// A key's usage.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    /// Inferences charged.
    pub inferences_charged: i64,
    /// Inferences refunded (failed or canceled before they ran).
    pub inferences_refunded: i64,
    /// Micro-USD charged.
    pub charged_micros: i64,
    /// Micro-USD refunded.
    pub refunded_micros: i64,
    /// Output images stored.
    pub images_generated: i64,
}

/// One ledger entry: a job's charge or refund.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    /// Its place in the ledger (increasing).
    pub seq: i64,
    /// The job.
    pub generation_id: String,
    /// `charge` or `refund`.
    pub kind: String,
    /// Inferences charged or refunded.
    pub inferences: i64,
    /// Micro-USD charged or refunded.
    pub amount_micros: i64,
    /// When (ms).
    pub created_at: i64,
}

impl Store {
    /// A key's ledger entries, newest first: skip `offset`, at most `limit`.
    pub async fn ledger(
        &self,
        key_id: &str,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<LedgerRow>> {
        let rows = sqlx::query(
            "SELECT seq, generation_id, kind, inferences, amount_micros, created_at
             FROM ledger WHERE key_id = $1 ORDER BY seq DESC LIMIT $2 OFFSET $3",
        )
        .bind(key_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| LedgerRow {
                seq: r.get("seq"),
                generation_id: r.get("generation_id"),
                kind: r.get("kind"),
                inferences: r.get("inferences"),
                amount_micros: r.get("amount_micros"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    /// A key's charges, refunds and images.
    pub async fn usage(&self, key_id: &str) -> StoreResult<Usage> {
        let row = sqlx::query(
            "SELECT
                CAST(COALESCE(SUM(CASE WHEN kind = 'charge' THEN inferences END), 0) AS BIGINT) AS ic,
                CAST(COALESCE(SUM(CASE WHEN kind = 'refund' THEN inferences END), 0) AS BIGINT) AS ir,
                CAST(COALESCE(SUM(CASE WHEN kind = 'charge' THEN amount_micros END), 0) AS BIGINT) AS mc,
                CAST(COALESCE(SUM(CASE WHEN kind = 'refund' THEN amount_micros END), 0) AS BIGINT) AS mr
             FROM ledger WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_one(&self.pool)
        .await?;
        let images: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM assets WHERE key_id = $1 AND kind = 'output'")
                .bind(key_id)
                .fetch_one(&self.pool)
                .await?
                .get("n");
        Ok(Usage {
            inferences_charged: row.get("ic"),
            inferences_refunded: row.get("ir"),
            charged_micros: row.get("mc"),
            refunded_micros: row.get("mr"),
            images_generated: images,
        })
    }
}
