//! Leases on running jobs (issue 18): how a worker claims a job, keeps it
//! while it runs, and how a job whose worker died is claimed again.
//!
//! A worker (any process: `easel serve` with its workers, or `easel
//! worker`) names itself with an owner id and claims a queued job in one
//! transaction: the queue head is read (on PostgreSQL with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on or take
//! the same rows; on SQLite under the one write lock), the caller's rule
//! picks one (model affinity, see `worker/schedule.rs`), and it is marked
//! `running` with `lease_owner` and `lease_expires_at`. The worker renews
//! the lease while the job runs (`renew_lease`, which also tells it whether
//! a cancel was asked, from any API node); every write it makes for the job
//! re-checks the lease (`complete_item`, `fail_items`, `finish_held`).
//! [`Store::reclaim_expired`] turns every running job whose lease expired
//! back into a queued one (or a canceled / failed one), keeping the images
//! its definitions already made.

use std::time::Duration;

use sqlx::Row;

use super::jobs::Guard;
use super::{Backend, Store, StoreResult};
use crate::job::{JobError, JobStatus};
use crate::util::now_ms;

/// A job a worker claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The job's id.
    pub id: String,
    /// Times it has been started, this one included.
    pub attempt: i64,
}

/// Counts of what [`Store::reclaim_expired`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reclaimed {
    /// The jobs it finished (canceled or failed), to announce.
    pub finished: Vec<(String, JobStatus)>,
    /// Jobs put back in the queue.
    pub requeued: u64,
    /// Jobs failed after `max_attempts` starts.
    pub failed: u64,
    /// Jobs whose cancel had been asked, now canceled.
    pub canceled: u64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Claim one queued job for `owner`: `choose` gets up to `window`
    /// queued jobs, oldest first, as `(id, primary_model)` (on PostgreSQL
    /// those no other claimer holds) and returns the id to run, or `None`.
    /// The chosen job is marked running (attempts + 1) under a lease of
    /// `lease` from now.
    ///
    /// # Errors
    /// A store failure (nothing is claimed).
    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        window: i64,
        choose: impl FnOnce(&[(String, String)]) -> Option<String>,
    ) -> StoreResult<Option<Claim>> {
        let mut tx = self.write_tx().await?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT id, primary_model FROM generations WHERE status = 'queued'
             ORDER BY seq LIMIT $1{lock}"
        );
        let rows = sqlx::query(&sql).bind(window).fetch_all(&mut *tx).await?;
        let queue: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.get("id"), r.get("primary_model")))
            .collect();
        let Some(id) = choose(&queue) else {
            return Ok(None);
        };
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE generations SET status = 'running', attempts = attempts + 1, started_at = $1,
                 progress_json = NULL, lease_owner = $2, lease_expires_at = $3
             WHERE id = $4 AND status = 'queued' RETURNING attempts",
        )
        .bind(now)
        .bind(owner)
        .bind(now.saturating_add(millis(lease)))
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|r| Claim {
            id,
            attempt: r.get("attempts"),
        }))
    }

    /// Extend `owner`'s lease on running job `id` to `lease` from now.
    /// `Some(cancel_requested)` while it holds the job, `None` once it does
    /// not (the lease expired and the job was reclaimed, or it finished).
    ///
    /// # Errors
    /// A store failure (the lease is unchanged).
    pub async fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> StoreResult<Option<bool>> {
        let row = sqlx::query(
            "UPDATE generations SET lease_expires_at = $1
             WHERE id = $2 AND status = 'running' AND lease_owner = $3
             RETURNING cancel_requested",
        )
        .bind(now_ms().saturating_add(millis(lease)))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get::<i64, _>("cancel_requested") != 0))
    }

    /// Put running job `id` back in the queue without counting the attempt
    /// (its worker is shutting down), if `owner` holds it.
    ///
    /// # Errors
    /// A store failure.
    pub async fn release(&self, id: &str, owner: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE generations SET status = 'queued',
                 attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                 progress_json = NULL, lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND status = 'running' AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every running job whose lease expired (its worker died, hung or lost
    /// the database for longer than the lease; rows from before leases
    /// existed have none and count as expired) is canceled (a cancel was
    /// asked), failed (it has been started `max_attempts` times, refunded
    /// like any failure) or queued again. Definitions it finished keep their
    /// images. Safe to run from any number of processes at once: each
    /// change re-checks the expiry in its own statement.
    ///
    /// # Errors
    /// A store failure (what was done so far stays done).
    pub async fn reclaim_expired(&self, max_attempts: u32) -> StoreResult<Reclaimed> {
        let mut reclaimed = Reclaimed::default();
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT id, attempts, cancel_requested FROM generations
             WHERE status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < $1)",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let id: String = row.get("id");
            let attempts: i64 = row.get("attempts");
            let finish = if row.get::<i64, _>("cancel_requested") != 0 {
                Some((
                    JobStatus::Canceled,
                    JobError::new("canceled", "canceled by the client"),
                ))
            } else if attempts >= i64::from(max_attempts) {
                Some((
                    JobStatus::Failed,
                    JobError::new(
                        "interrupted",
                        format!(
                            "the worker running this job stopped {attempts} times \
                             (max_attempts = {max_attempts}); images finished before are kept"
                        ),
                    ),
                ))
            } else {
                None
            };
            if let Some((status, error)) = finish {
                let guard = Guard::ExpiredBefore(now);
                if self.finish_from(&id, status, Some(&error), guard).await? {
                    match status {
                        JobStatus::Canceled => reclaimed.canceled += 1,
                        _ => reclaimed.failed += 1,
                    }
                    reclaimed.finished.push((id, status));
                }
            } else {
                let done = sqlx::query(
                    "UPDATE generations SET status = 'queued', progress_json = NULL,
                         lease_owner = NULL, lease_expires_at = NULL
                     WHERE id = $1 AND status = 'running'
                       AND (lease_expires_at IS NULL OR lease_expires_at < $2)",
                )
                .bind(&id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                if done.rows_affected() > 0 {
                    reclaimed.requeued += 1;
                }
            }
        }
        Ok(reclaimed)
    }
}
