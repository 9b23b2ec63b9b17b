//! The `generations` and `generation_items` tables: jobs, their image
//! definitions, the queue, state transitions, idempotency keys, the
//! charges and refunds of the `ledger` that go with them, and recovery at
//! startup.

use sqlx::Row;

use super::{decode_err, json, parse_json, AssetRow, Store, StoreResult};
use crate::job::{ItemResult, ItemSpec, ItemStatus, JobError, JobStatus, Progress};
use crate::util::now_ms;

/// A job row.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRow {
    /// Insertion order.
    pub seq: i64,
    /// UUID.
    pub id: String,
    /// The API key that created it.
    pub key_id: String,
    /// `native` or `openai`.
    pub source: String,
    /// Status.
    pub status: JobStatus,
    /// The request body as received (after inputs were replaced by asset ids).
    pub request_json: String,
    /// The model of the first definition (the worker prefers loaded models).
    pub primary_model: String,
    /// Image definitions (billed inferences).
    pub inferences: i64,
    /// Images (sum of batch sizes).
    pub images_total: i64,
    /// Price per inference when accepted, micro-USD.
    pub price_micros: i64,
    /// Times the worker started it.
    pub attempts: i64,
    /// A cancel was asked while it ran.
    pub cancel_requested: bool,
    /// Progress of a running job.
    pub progress: Option<Progress>,
    /// The job's error, if it failed or was canceled.
    pub error: Option<JobError>,
    /// The `Idempotency-Key` it was created with.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request body, to detect a reused idempotency key.
    pub request_hash: Option<String>,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// Webhook events subscribed to.
    pub webhook_events: Vec<String>,
    /// Times (ms).
    pub created_at: i64,
    /// When it (last) started running.
    pub started_at: Option<i64>,
    /// When it finished.
    pub finished_at: Option<i64>,
}

/// An image definition row.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    /// Its job.
    pub generation_id: String,
    /// Its index in the job (pack definitions first).
    pub idx: i64,
    /// The resolved spec.
    pub spec: ItemSpec,
    /// Status.
    pub status: ItemStatus,
    /// What running it resolved.
    pub result: Option<ItemResult>,
    /// Its error.
    pub error: Option<JobError>,
}

/// The limits a new job is admitted under, checked inside the insert's
/// transaction (so two API nodes cannot both pass on the same room).
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Jobs allowed to wait (`max_queue`).
    pub max_queue: i64,
    /// The key's credit limit, micro-USD; `None`: unlimited.
    pub credit_limit_micros: Option<i64>,
}

/// What [`Store::insert_generation`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    /// The job was stored.
    Created(GenerationRow),
    /// The key already has a job with this `Idempotency-Key` (the caller
    /// compares its `request_hash`); nothing was stored.
    Existing(GenerationRow),
    /// `max_queue` jobs are waiting; nothing was stored.
    QueueFull {
        /// Jobs waiting.
        queued: i64,
    },
    /// The job would take the key past its credit limit; nothing was stored.
    InsufficientCredit {
        /// Charges minus refunds so far, micro-USD.
        used_micros: i64,
    },
}

/// Which jobs [`Store::finish_from`] may finish.
#[derive(Debug, Clone, Copy)]
pub(super) enum Guard<'a> {
    /// Only a queued one (a cancel before any worker claimed it).
    Queued,
    /// A queued or running one.
    Active,
    /// A running one under this worker's lease.
    HeldBy(&'a str),
    /// A running one whose lease expired before this time (ms).
    ExpiredBefore(i64),
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewGeneration {
    /// UUID.
    pub id: String,
    /// Owner.
    pub key_id: String,
    /// `native` or `openai`.
    pub source: String,
    /// The request as received.
    pub request_json: String,
    /// The image definitions.
    pub items: Vec<ItemSpec>,
    /// Price per inference, micro-USD.
    pub price_micros: i64,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the body.
    pub request_hash: Option<String>,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// Webhook events.
    pub webhook_events: Vec<String>,
    /// Input images stored for it.
    pub inputs: Vec<AssetRow>,
}

impl Store {
    fn generation_row(row: &super::Row) -> StoreResult<GenerationRow> {
        let status: String = row.get("status");
        let events: Option<String> = row.get("webhook_events");
        Ok(GenerationRow {
            seq: row.get("seq"),
            id: row.get("id"),
            key_id: row.get("key_id"),
            source: row.get("source"),
            status: JobStatus::parse(&status).ok_or_else(|| decode_err("status", &status))?,
            request_json: row.get("request_json"),
            primary_model: row.get("primary_model"),
            inferences: row.get("inferences"),
            images_total: row.get("images_total"),
            price_micros: row.get("price_micros"),
            attempts: row.get("attempts"),
            cancel_requested: row.get::<i64, _>("cancel_requested") != 0,
            progress: parse_json(row.get("progress_json"), "progress")?,
            error: parse_json(row.get("error_json"), "error")?,
            idempotency_key: row.get("idempotency_key"),
            request_hash: row.get("request_hash"),
            webhook_url: row.get("webhook_url"),
            webhook_events: parse_json(events, "webhook_events")?.unwrap_or_default(),
            created_at: row.get("created_at"),
            started_at: row.get("started_at"),
            finished_at: row.get("finished_at"),
        })
    }

    fn item_row(row: &super::Row) -> StoreResult<ItemRow> {
        let status: String = row.get("status");
        Ok(ItemRow {
            generation_id: row.get("generation_id"),
            idx: row.get("idx"),
            spec: parse_json(Some(row.get("spec_json")), "spec")?
                .ok_or_else(|| decode_err("spec", "null"))?,
            status: ItemStatus::parse(&status).ok_or_else(|| decode_err("status", &status))?,
            result: parse_json(row.get("result_json"), "result")?,
            error: parse_json(row.get("error_json"), "error")?,
        })
    }

    /// The job created with `idempotency_key` by `key_id`, if any.
    pub async fn generation_by_idempotency_key(
        &self,
        key_id: &str,
        idempotency_key: &str,
    ) -> StoreResult<Option<GenerationRow>> {
        let row =
            sqlx::query("SELECT * FROM generations WHERE key_id = $1 AND idempotency_key = $2")
                .bind(key_id)
                .bind(idempotency_key)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(Self::generation_row).transpose()
    }

    /// Admit and insert a job, its image definitions, its input assets and
    /// its charge, in one transaction: an earlier job with the same
    /// idempotency key, a full queue or an exhausted credit are found
    /// inside it (under [`Store::lock_admissions`]), so concurrent
    /// submissions on any number of API nodes are admitted one at a time.
    ///
    /// # Errors
    /// A store failure (nothing is stored).
    pub async fn insert_generation(
        &self,
        g: &NewGeneration,
        admission: Admission,
    ) -> StoreResult<Admitted> {
        let now = now_ms();
        let inferences = g.items.len() as i64;
        let images_total: i64 = g.items.iter().map(|i| i64::from(i.batch_size)).sum();
        let primary_model = g
            .items
            .first()
            .map(|i| i.model.load.clone())
            .unwrap_or_default();
        let mut tx = self.write_tx().await?;
        self.lock_admissions(&mut tx).await?;
        if let Some(key) = &g.idempotency_key {
            let existing =
                sqlx::query("SELECT * FROM generations WHERE key_id = $1 AND idempotency_key = $2")
                    .bind(&g.key_id)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = existing {
                return Ok(Admitted::Existing(Self::generation_row(&row)?));
            }
        }
        let queued: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM generations WHERE status = 'queued'")
                .fetch_one(&mut *tx)
                .await?
                .get("n");
        if queued >= admission.max_queue {
            return Ok(Admitted::QueueFull { queued });
        }
        if let Some(limit) = admission.credit_limit_micros {
            let used: i64 = sqlx::query(
                "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'charge' THEN amount_micros
                                              ELSE -amount_micros END), 0) AS BIGINT) AS used
                 FROM ledger WHERE key_id = $1",
            )
            .bind(&g.key_id)
            .fetch_one(&mut *tx)
            .await?
            .get("used");
            if used + inferences * g.price_micros > limit {
                return Ok(Admitted::InsufficientCredit { used_micros: used });
            }
        }
        sqlx::query(
            "INSERT INTO generations (id, key_id, source, status, request_json, primary_model,
                 inferences, images_total, price_micros, idempotency_key, request_hash,
                 webhook_url, webhook_events, created_at)
             VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&g.id)
        .bind(&g.key_id)
        .bind(&g.source)
        .bind(&g.request_json)
        .bind(&primary_model)
        .bind(inferences)
        .bind(images_total)
        .bind(g.price_micros)
        .bind(&g.idempotency_key)
        .bind(&g.request_hash)
        .bind(&g.webhook_url)
        .bind(json(&g.webhook_events))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for (i, item) in g.items.iter().enumerate() {
            sqlx::query(
                "INSERT INTO generation_items (generation_id, idx, spec_json, status)
                 VALUES ($1, $2, $3, 'pending')",
            )
            .bind(&g.id)
            .bind(i as i64)
            .bind(json(item))
            .execute(&mut *tx)
            .await?;
        }
        for input in &g.inputs {
            Self::insert_asset_tx(&mut tx, input).await?;
        }
        sqlx::query(
            "INSERT INTO ledger (key_id, generation_id, kind, inferences, amount_micros, created_at)
             VALUES ($1, $2, 'charge', $3, $4, $5)",
        )
        .bind(&g.key_id)
        .bind(&g.id)
        .bind(inferences)
        .bind(inferences * g.price_micros)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if self.backend == super::Backend::Postgres {
            // Sent at commit: idle workers in other processes wake now
            // instead of at their next poll (see `Store::listen`).
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(super::CHANNEL_QUEUED)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.generation(&g.id)
            .await?
            .map(Admitted::Created)
            .ok_or(super::StoreError::NotFound("the job just inserted"))
    }

    /// A job by id (any owner).
    pub async fn generation(&self, id: &str) -> StoreResult<Option<GenerationRow>> {
        let row = sqlx::query("SELECT * FROM generations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::generation_row).transpose()
    }

    /// A key's jobs, newest first, optionally only those with `status`.
    pub async fn generations(
        &self,
        key_id: &str,
        status: Option<JobStatus>,
        limit: i64,
        before_seq: Option<i64>,
    ) -> StoreResult<Vec<GenerationRow>> {
        let rows = sqlx::query(
            "SELECT * FROM generations
             WHERE key_id = $1 AND ($2 IS NULL OR status = $3) AND ($4 IS NULL OR seq < $5)
             ORDER BY seq DESC LIMIT $6",
        )
        .bind(key_id)
        .bind(status.map(JobStatus::as_str))
        .bind(status.map(JobStatus::as_str))
        .bind(before_seq)
        .bind(before_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::generation_row).collect()
    }

    /// A job's image definitions, in order.
    pub async fn items(&self, generation_id: &str) -> StoreResult<Vec<ItemRow>> {
        let rows =
            sqlx::query("SELECT * FROM generation_items WHERE generation_id = $1 ORDER BY idx")
                .bind(generation_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(Self::item_row).collect()
    }

    /// How many jobs are queued and running.
    pub async fn counts(&self) -> StoreResult<(i64, i64)> {
        let row = sqlx::query(
            "SELECT CAST(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END) AS BIGINT) AS q,
                    CAST(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS BIGINT) AS r
             FROM generations WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            row.get::<Option<i64>, _>("q").unwrap_or(0),
            row.get::<Option<i64>, _>("r").unwrap_or(0),
        ))
    }

    /// A queued job's place in the queue: 1 + the jobs of any key queued
    /// before it (by acceptance order; the worker may run a job for an
    /// already loaded model a little earlier, see `fair_skip_limit`).
    pub async fn queue_position(&self, seq: i64) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM generations WHERE status = 'queued' AND seq < $1",
        )
        .bind(seq)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get::<i64, _>("n") + 1)
    }

    /// Record the progress of a running job `owner` holds (nothing when it
    /// lost the lease).
    pub async fn set_progress(
        &self,
        id: &str,
        owner: &str,
        progress: &Progress,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE generations SET progress_json = $1
             WHERE id = $2 AND status = 'running' AND lease_owner = $3",
        )
        .bind(json(progress))
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Store the images of an image definition (files already written) and
    /// mark it succeeded, in one transaction, if `owner` still holds the
    /// job: a worker whose lease expired (and whose job another worker may
    /// have claimed) records nothing, so each image is stored once.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`](super::StoreError::LeaseLost), or a store failure.
    pub async fn complete_item(
        &self,
        generation_id: &str,
        owner: &str,
        idx: i64,
        assets: &[AssetRow],
        result: &ItemResult,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        Self::check_held(&mut tx, generation_id, owner).await?;
        for a in assets {
            Self::insert_asset_tx(&mut tx, a).await?;
        }
        sqlx::query(
            "UPDATE generation_items SET status = 'succeeded', result_json = $1, error_json = NULL
             WHERE generation_id = $2 AND idx = $3",
        )
        .bind(json(result))
        .bind(generation_id)
        .bind(idx)
        .execute(&mut *tx)
        .await?;
        Ok(tx.commit().await?)
    }

    /// Mark image definitions of a job `owner` holds failed with `error`.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`](super::StoreError::LeaseLost), or a store failure.
    pub async fn fail_items(
        &self,
        generation_id: &str,
        owner: &str,
        idxs: &[i64],
        error: &JobError,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        Self::check_held(&mut tx, generation_id, owner).await?;
        for idx in idxs {
            sqlx::query(
                "UPDATE generation_items SET status = 'failed', error_json = $1
                 WHERE generation_id = $2 AND idx = $3 AND status = 'pending'",
            )
            .bind(json(error))
            .bind(generation_id)
            .bind(idx)
            .execute(&mut *tx)
            .await?;
        }
        Ok(tx.commit().await?)
    }

    /// Finish a queued or running job: `status`, its error, pending
    /// definitions marked canceled (for a cancel) or failed, and a refund of
    /// every definition that did not succeed. Returns false when the job was
    /// already finished.
    pub async fn finish(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobError>,
    ) -> StoreResult<bool> {
        self.finish_from(id, status, error, Guard::Active).await
    }

    /// [`Store::finish`] for the worker holding the job: false (nothing
    /// changed) when `owner` no longer holds it.
    pub async fn finish_held(
        &self,
        id: &str,
        owner: &str,
        status: JobStatus,
        error: Option<&JobError>,
    ) -> StoreResult<bool> {
        self.finish_from(id, status, error, Guard::HeldBy(owner))
            .await
    }

    /// Cancel a job only if it is still queued (not yet picked by a
    /// worker), refunding it. False when it is not queued.
    pub async fn cancel_queued(&self, id: &str, error: &JobError) -> StoreResult<bool> {
        self.finish_from(id, JobStatus::Canceled, Some(error), Guard::Queued)
            .await
    }

    pub(super) async fn finish_from(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobError>,
        guard: Guard<'_>,
    ) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let condition = match guard {
            Guard::Queued => "status = 'queued'",
            Guard::Active => "status IN ('queued', 'running')",
            Guard::HeldBy(_) => "status = 'running' AND lease_owner = $5",
            Guard::ExpiredBefore(_) => {
                "status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < $5)"
            }
        };
        let sql = format!(
            "UPDATE generations SET status = $1, error_json = $2, finished_at = $3,
                 lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $4 AND {condition}"
        );
        let query = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(error.map(json))
            .bind(now_ms())
            .bind(id);
        let query = match guard {
            Guard::HeldBy(owner) => query.bind(owner),
            Guard::ExpiredBefore(t) => query.bind(t),
            Guard::Queued | Guard::Active => query,
        };
        let done = query.execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let item_status = if status == JobStatus::Canceled {
            ItemStatus::Canceled
        } else {
            ItemStatus::Failed
        };
        sqlx::query(
            "UPDATE generation_items SET status = $1, error_json = COALESCE(error_json, $2)
             WHERE generation_id = $3 AND status = 'pending'",
        )
        .bind(item_status.as_str())
        .bind(error.map(json))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "SELECT g.key_id, g.price_micros,
                    (SELECT COUNT(*) FROM generation_items i
                     WHERE i.generation_id = g.id AND i.status != 'succeeded') AS unbilled
             FROM generations g WHERE g.id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let unbilled: i64 = row.get("unbilled");
        if unbilled > 0 {
            let price: i64 = row.get("price_micros");
            sqlx::query(
                "INSERT INTO ledger (key_id, generation_id, kind, inferences, amount_micros, created_at)
                 VALUES ($1, $2, 'refund', $3, $4, $5)",
            )
            .bind(row.get::<String, _>("key_id"))
            .bind(id)
            .bind(unbilled)
            .bind(unbilled * price)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Fail with [`StoreError::LeaseLost`](super::StoreError::LeaseLost)
    /// unless job `id` is running under `owner`'s lease; on PostgreSQL the
    /// row stays locked to the end of `tx`, so a reclaim waits for it.
    async fn check_held(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        id: &str,
        owner: &str,
    ) -> StoreResult<()> {
        let held = sqlx::query(
            "UPDATE generations SET lease_owner = lease_owner
             WHERE id = $1 AND status = 'running' AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&mut **tx)
        .await?;
        if held.rows_affected() == 0 {
            return Err(super::StoreError::LeaseLost(id.to_string()));
        }
        Ok(())
    }

    /// Ask a running job to stop (the worker finishes it as canceled).
    pub async fn request_cancel(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET cancel_requested = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if self.backend == super::Backend::Postgres {
            // The worker running it hears at once (see `Store::listen`);
            // its lease renewal would see the flag within a second anyway.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::CHANNEL_CANCEL)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}
