//! The `webhook_deliveries` table: the outbox the dispatcher drains.

use sqlx::Row;

use super::{Store, StoreResult};
use crate::util::now_ms;

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// UUID (sent as `Easel-Delivery`).
    pub id: String,
    /// The job.
    pub generation_id: String,
    /// Target URL.
    pub url: String,
    /// `generation.started`, `generation.progress`, `generation.completed`,
    /// or a Replicate prediction's `prediction.start`, `prediction.progress`,
    /// `prediction.completed`.
    pub event: String,
    /// The JSON body.
    pub payload: String,
    /// Attempts so far.
    pub attempts: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
}

impl Store {
    /// Put a webhook delivery in the outbox.
    pub async fn enqueue_delivery(
        &self,
        generation_id: &str,
        url: &str,
        event: &str,
        payload: &str,
        max_attempts: u32,
    ) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, generation_id, url, event, payload, status,
                 max_attempts, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8)",
        )
        .bind(crate::util::new_id())
        .bind(generation_id)
        .bind(url)
        .bind(event)
        .bind(payload)
        .bind(i64::from(max_attempts))
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claim the deliveries due now, oldest first, for `hold` (their next
    /// attempt moves to now + `hold`, so no other dispatcher, in this
    /// process or on another API node, sends them meanwhile; one that dies
    /// mid-send leaves them to be retried after `hold`), and the time of the
    /// next one not due yet.
    pub async fn claim_due_deliveries(
        &self,
        limit: i64,
        hold: std::time::Duration,
    ) -> StoreResult<(Vec<DeliveryRow>, Option<i64>)> {
        let now = now_ms();
        let lock = match self.backend {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let mut tx = self.write_tx().await?;
        let sql = format!(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $1
             ORDER BY next_attempt_at, seq LIMIT $2{lock}"
        );
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let held_until = now.saturating_add(i64::try_from(hold.as_millis()).unwrap_or(i64::MAX));
        for r in &rows {
            sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id = $2")
                .bind(held_until)
                .bind(r.get::<String, _>("id"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let next: Option<i64> = sqlx::query(
            "SELECT MIN(next_attempt_at) AS t FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at > $1",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?
        .get("t");
        let rows = rows
            .iter()
            .map(|r| DeliveryRow {
                id: r.get("id"),
                generation_id: r.get("generation_id"),
                url: r.get("url"),
                event: r.get("event"),
                payload: r.get("payload"),
                attempts: r.get("attempts"),
                max_attempts: r.get("max_attempts"),
            })
            .collect();
        Ok((rows, next))
    }

    /// Record a delivery attempt: delivered, retry at `retry_at`, or given up
    /// (`retry_at` `None` after a failure).
    pub async fn record_delivery(
        &self,
        id: &str,
        delivered: bool,
        error: Option<&str>,
        retry_at: Option<i64>,
    ) -> StoreResult<()> {
        let status = match (delivered, retry_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, last_error = $2,
                 next_attempt_at = COALESCE($3, next_attempt_at)
             WHERE id = $4",
        )
        .bind(status)
        .bind(error)
        .bind(retry_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Delivery statuses of a job's webhooks: `(event, status, attempts)`.
    pub async fn deliveries_of(
        &self,
        generation_id: &str,
    ) -> StoreResult<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT event, status, attempts FROM webhook_deliveries WHERE generation_id = $1 ORDER BY seq",
        )
        .bind(generation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("event"), r.get("status"), r.get("attempts")))
            .collect())
    }
}
