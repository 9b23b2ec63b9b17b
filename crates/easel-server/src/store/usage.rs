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

impl Store {
    /// A key's charges, refunds and images.
    pub async fn usage(&self, key_id: &str) -> StoreResult<Usage> {
        let row = sqlx::query(
            "SELECT
                COALESCE(SUM(CASE WHEN kind = 'charge' THEN inferences END), 0) AS ic,
                COALESCE(SUM(CASE WHEN kind = 'refund' THEN inferences END), 0) AS ir,
                COALESCE(SUM(CASE WHEN kind = 'charge' THEN amount_micros END), 0) AS mc,
                COALESCE(SUM(CASE WHEN kind = 'refund' THEN amount_micros END), 0) AS mr
             FROM ledger WHERE key_id = ?",
        )
        .bind(key_id)
        .fetch_one(&self.pool)
        .await?;
        let images: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM assets WHERE key_id = ? AND kind = 'output'")
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
