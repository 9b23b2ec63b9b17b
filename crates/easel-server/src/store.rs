//! The job store: a SQLite file (`DATA_DIR/easel.db`, WAL, `synchronous =
//! FULL` so an accepted job survives a crash) with embedded migrations.
//!
//! Tables: `api_keys`, `generations` (one row per job), `generation_items`
//! (one row per image definition: its resolved spec, status, result),
//! `assets` (output and input images, stored by content hash),
//! `trainings`, `inference_packs`, `ledger` (charges and refunds per key),
//! `webhook_deliveries` (an outbox the dispatcher drains).

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::job::{ItemResult, ItemSpec, ItemStatus, JobError, JobStatus, Progress};
use crate::util::now_ms;

/// The database file inside the data dir.
pub const DB_FILE: &str = "easel.db";

/// The migrations, embedded in the binary (`migrations/*.sql`).
fn migrator() -> Migrator {
    let migrations = vec![
        Migration::new(
            1,
            Cow::Borrowed("init"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/0001_init.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("flows"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/0002_flows.sql")),
            false,
        ),
    ];
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

/// Errors of the store.
pub type StoreResult<T> = Result<T, sqlx::Error>;

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

/// A stored flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRow {
    /// UUID.
    pub id: String,
    /// Owner.
    pub key_id: String,
    /// A label (the document's `name`), if any.
    pub name: Option<String>,
    /// The document as sent (JSON or JSON5).
    pub document: String,
    /// Its steps.
    pub step_count: i64,
    /// Creation time (ms).
    pub created_at: i64,
}

/// A run of a stored flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRunRow {
    /// The run's id (UUID).
    pub id: String,
    /// The flow it runs.
    pub flow_id: String,
    /// Owner (the key that started it; its image jobs are this key's).
    pub key_id: String,
    /// The flow's document when the run was created.
    pub document: String,
    /// The run record (`easel_flow::FlowRun` JSON) at its last checkpoint.
    pub record_json: String,
    /// A cancel was asked.
    pub cancel_requested: bool,
    /// Creation time (ms).
    pub created_at: i64,
}

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// UUID (sent as `Easel-Delivery`).
    pub id: String,
    /// The job.
    pub generation_id: String,
    /// Target URL.
    pub url: String,
    /// `generation.started`, `generation.progress`, `generation.completed`.
    pub event: String,
    /// The JSON body.
    pub payload: String,
    /// Attempts so far.
    pub attempts: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
}

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

/// Counts of what [`Store::recover`] did at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Running jobs put back in the queue.
    pub requeued: u64,
    /// Running jobs failed after too many attempts.
    pub failed: u64,
    /// Running jobs whose cancel had been asked, now canceled.
    pub canceled: u64,
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

/// The job store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    text: Option<String>,
    what: &str,
) -> StoreResult<Option<T>> {
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| sqlx::Error::Decode(format!("{what}: {e}").into())),
    }
}

fn decode_err(what: &str, value: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("{what}: unexpected value `{value}`").into())
}

impl Store {
    /// Open (creating it and the data dir if needed) `DATA_DIR/easel.db` and
    /// run the migrations.
    ///
    /// # Errors
    /// The folder cannot be created, the database cannot be opened, or a
    /// migration fails.
    pub async fn open(data_dir: &Path) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir).map_err(sqlx::Error::Io)?;
        let path = data_dir.join(DB_FILE);
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    /// The connection pool (for readiness checks).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    // ---- API keys -------------------------------------------------------

    /// Insert a key with the SHA-256 (hex) of its secret.
    pub async fn insert_key(&self, key: &KeyRow, secret_hash: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_hash, credit_limit_micros, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
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

    fn key_row(row: &SqliteRow) -> KeyRow {
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
            sqlx::query("SELECT * FROM api_keys WHERE secret_hash = ? AND revoked_at IS NULL")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(Self::key_row))
    }

    /// A key by id.
    pub async fn key(&self, id: &str) -> StoreResult<Option<KeyRow>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = ?")
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
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    // ---- generations ------------------------------------------------------

    fn generation_row(row: &SqliteRow) -> StoreResult<GenerationRow> {
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

    fn item_row(row: &SqliteRow) -> StoreResult<ItemRow> {
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

    fn asset_row(row: &SqliteRow) -> AssetRow {
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

    async fn insert_asset_tx(tx: &mut Transaction<'_, Sqlite>, a: &AssetRow) -> StoreResult<()> {
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

    /// The job created with `idempotency_key` by `key_id`, if any.
    pub async fn generation_by_idempotency_key(
        &self,
        key_id: &str,
        idempotency_key: &str,
    ) -> StoreResult<Option<GenerationRow>> {
        let row = sqlx::query("SELECT * FROM generations WHERE key_id = ? AND idempotency_key = ?")
            .bind(key_id)
            .bind(idempotency_key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::generation_row).transpose()
    }

    /// Insert a job, its image definitions, its input assets and its charge,
    /// in one transaction.
    pub async fn insert_generation(&self, g: &NewGeneration) -> StoreResult<GenerationRow> {
        let now = now_ms();
        let inferences = g.items.len() as i64;
        let images_total: i64 = g.items.iter().map(|i| i64::from(i.batch_size)).sum();
        let primary_model = g
            .items
            .first()
            .map(|i| i.model.load.clone())
            .unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO generations (id, key_id, source, status, request_json, primary_model,
                 inferences, images_total, price_micros, idempotency_key, request_hash,
                 webhook_url, webhook_events, created_at)
             VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                 VALUES (?, ?, ?, 'pending')",
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
             VALUES (?, ?, 'charge', ?, ?, ?)",
        )
        .bind(&g.key_id)
        .bind(&g.id)
        .bind(inferences)
        .bind(inferences * g.price_micros)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.generation(&g.id)
            .await?
            .ok_or_else(|| sqlx::Error::RowNotFound)
    }

    /// A job by id (any owner).
    pub async fn generation(&self, id: &str) -> StoreResult<Option<GenerationRow>> {
        let row = sqlx::query("SELECT * FROM generations WHERE id = ?")
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
             WHERE key_id = ? AND (? IS NULL OR status = ?) AND (? IS NULL OR seq < ?)
             ORDER BY seq DESC LIMIT ?",
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
            sqlx::query("SELECT * FROM generation_items WHERE generation_id = ? ORDER BY idx")
                .bind(generation_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(Self::item_row).collect()
    }

    /// Jobs waiting, oldest first: `(id, primary_model)`.
    pub async fn queued(&self, limit: i64) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, primary_model FROM generations WHERE status = 'queued' ORDER BY seq LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("id"), r.get("primary_model")))
            .collect())
    }

    /// How many jobs are queued and running.
    pub async fn counts(&self) -> StoreResult<(i64, i64)> {
        let row = sqlx::query(
            "SELECT SUM(status = 'queued') AS q, SUM(status = 'running') AS r
             FROM generations WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            row.get::<Option<i64>, _>("q").unwrap_or(0),
            row.get::<Option<i64>, _>("r").unwrap_or(0),
        ))
    }

    /// Mark a queued job running (attempts + 1). `None` when it is no
    /// longer queued (canceled meanwhile).
    pub async fn start(&self, id: &str) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "UPDATE generations SET status = 'running', attempts = attempts + 1, started_at = ?,
                 progress_json = NULL
             WHERE id = ? AND status = 'queued' RETURNING attempts",
        )
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get("attempts")))
    }

    /// Put a running job back in the queue without counting the attempt
    /// (the server is shutting down).
    pub async fn requeue(&self, id: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE generations SET status = 'queued', attempts = MAX(attempts - 1, 0),
                 progress_json = NULL
             WHERE id = ? AND status = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record the progress of a running job.
    pub async fn set_progress(&self, id: &str, progress: &Progress) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET progress_json = ? WHERE id = ? AND status = 'running'")
            .bind(json(progress))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Store the images of an image definition (files already written) and
    /// mark it succeeded, in one transaction.
    pub async fn complete_item(
        &self,
        generation_id: &str,
        idx: i64,
        assets: &[AssetRow],
        result: &ItemResult,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for a in assets {
            Self::insert_asset_tx(&mut tx, a).await?;
        }
        sqlx::query(
            "UPDATE generation_items SET status = 'succeeded', result_json = ?, error_json = NULL
             WHERE generation_id = ? AND idx = ?",
        )
        .bind(json(result))
        .bind(generation_id)
        .bind(idx)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Mark image definitions failed with `error`.
    pub async fn fail_items(
        &self,
        generation_id: &str,
        idxs: &[i64],
        error: &JobError,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for idx in idxs {
            sqlx::query(
                "UPDATE generation_items SET status = 'failed', error_json = ?
                 WHERE generation_id = ? AND idx = ? AND status = 'pending'",
            )
            .bind(json(error))
            .bind(generation_id)
            .bind(idx)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Finish a job: `status`, its error, pending definitions marked
    /// canceled (for a cancel) or failed, and a refund of every definition
    /// that did not succeed. Returns false when the job was already finished.
    pub async fn finish(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobError>,
    ) -> StoreResult<bool> {
        self.finish_from(id, status, error, "('queued', 'running')")
            .await
    }

    /// Cancel a job only if it is still queued (not yet picked by the
    /// worker), refunding it. False when it is not queued.
    pub async fn cancel_queued(&self, id: &str, error: &JobError) -> StoreResult<bool> {
        self.finish_from(id, JobStatus::Canceled, Some(error), "('queued')")
            .await
    }

    async fn finish_from(
        &self,
        id: &str,
        status: JobStatus,
        error: Option<&JobError>,
        from: &str,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE generations SET status = ?, error_json = ?, finished_at = ?
             WHERE id = ? AND status IN {from}"
        );
        let done = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(error.map(json))
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let item_status = if status == JobStatus::Canceled {
            ItemStatus::Canceled
        } else {
            ItemStatus::Failed
        };
        sqlx::query(
            "UPDATE generation_items SET status = ?, error_json = COALESCE(error_json, ?)
             WHERE generation_id = ? AND status = 'pending'",
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
             FROM generations g WHERE g.id = ?",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let unbilled: i64 = row.get("unbilled");
        if unbilled > 0 {
            let price: i64 = row.get("price_micros");
            sqlx::query(
                "INSERT INTO ledger (key_id, generation_id, kind, inferences, amount_micros, created_at)
                 VALUES (?, ?, 'refund', ?, ?, ?)",
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

    /// Ask a running job to stop (the worker finishes it as canceled).
    pub async fn request_cancel(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE generations SET cancel_requested = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// At startup, before the worker runs: every job left `running` by a
    /// process that died is canceled (a cancel was asked), failed (it has
    /// been started `max_attempts` times) or queued again. Its finished
    /// image definitions keep their images.
    pub async fn recover(&self, max_attempts: u32) -> StoreResult<Recovery> {
        let mut recovery = Recovery::default();
        let rows = sqlx::query(
            "SELECT id, attempts, cancel_requested FROM generations WHERE status = 'running'",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let id: String = row.get("id");
            let attempts: i64 = row.get("attempts");
            if row.get::<i64, _>("cancel_requested") != 0 {
                let error = JobError::new("canceled", "canceled by the client");
                self.finish(&id, JobStatus::Canceled, Some(&error)).await?;
                recovery.canceled += 1;
            } else if attempts >= i64::from(max_attempts) {
                let error = JobError::new(
                    "interrupted",
                    format!(
                        "the server stopped while running this job {attempts} times \
                         (max_attempts = {max_attempts}); images finished before are kept"
                    ),
                );
                self.finish(&id, JobStatus::Failed, Some(&error)).await?;
                recovery.failed += 1;
            } else {
                sqlx::query(
                    "UPDATE generations SET status = 'queued', progress_json = NULL WHERE id = ?",
                )
                .bind(&id)
                .execute(&self.pool)
                .await?;
                recovery.requeued += 1;
            }
        }
        Ok(recovery)
    }

    // ---- assets -----------------------------------------------------------

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

    // ---- trainings ----------------------------------------------------------

    fn training_row(row: &SqliteRow) -> TrainingRow {
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

    /// Insert a training (its file already stored).
    pub async fn insert_training(&self, t: &TrainingRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO trainings (id, key_id, name, base_model, hash, file_size, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM trainings WHERE id = ? AND key_id = ?")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::training_row))
    }

    /// A key's trainings, newest first.
    pub async fn trainings(&self, key_id: &str) -> StoreResult<Vec<TrainingRow>> {
        let rows = sqlx::query("SELECT * FROM trainings WHERE key_id = ? ORDER BY created_at DESC")
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
        sqlx::query("DELETE FROM trainings WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        let shared: i64 = sqlx::query("SELECT COUNT(*) AS n FROM trainings WHERE hash = ?")
            .bind(&t.hash)
            .fetch_one(&self.pool)
            .await?
            .get("n");
        Ok(Some((t, shared > 0)))
    }

    // ---- inference packs ----------------------------------------------------

    fn pack_row(row: &SqliteRow) -> PackRow {
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
             VALUES (?, ?, ?, ?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM inference_packs WHERE id = ? AND key_id = ?")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::pack_row))
    }

    /// A key's packs, newest first.
    pub async fn packs(&self, key_id: &str) -> StoreResult<Vec<PackRow>> {
        let rows =
            sqlx::query("SELECT * FROM inference_packs WHERE key_id = ? ORDER BY created_at DESC")
                .bind(key_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(Self::pack_row).collect())
    }

    /// Delete a key's pack; false when there is none.
    pub async fn delete_pack(&self, key_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM inference_packs WHERE id = ? AND key_id = ?")
            .bind(id)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    // ---- flows --------------------------------------------------------------

    fn flow_row(row: &SqliteRow) -> FlowRow {
        FlowRow {
            id: row.get("id"),
            key_id: row.get("key_id"),
            name: row.get("name"),
            document: row.get("document"),
            step_count: row.get("step_count"),
            created_at: row.get("created_at"),
        }
    }

    /// Insert a flow.
    pub async fn insert_flow(&self, f: &FlowRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO flows (id, key_id, name, document, step_count, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&f.id)
        .bind(&f.key_id)
        .bind(&f.name)
        .bind(&f.document)
        .bind(f.step_count)
        .bind(f.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A key's flow by id.
    pub async fn flow(&self, key_id: &str, id: &str) -> StoreResult<Option<FlowRow>> {
        let row = sqlx::query("SELECT * FROM flows WHERE id = ? AND key_id = ?")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::flow_row))
    }

    /// A key's flows, newest first.
    pub async fn flows(&self, key_id: &str) -> StoreResult<Vec<FlowRow>> {
        let rows = sqlx::query("SELECT * FROM flows WHERE key_id = ? ORDER BY created_at DESC")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::flow_row).collect())
    }

    /// Delete a key's flow (its runs stay readable); false when there is none.
    pub async fn delete_flow(&self, key_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM flows WHERE id = ? AND key_id = ?")
            .bind(id)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    fn flow_run_row(row: &SqliteRow) -> FlowRunRow {
        FlowRunRow {
            id: row.get("id"),
            flow_id: row.get("flow_id"),
            key_id: row.get("key_id"),
            document: row.get("document"),
            record_json: row.get("record_json"),
            cancel_requested: row.get::<i64, _>("cancel_requested") != 0,
            created_at: row.get("created_at"),
        }
    }

    /// Insert a run (its record `pending`).
    pub async fn insert_flow_run(&self, r: &FlowRunRow, status: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO flow_runs (id, flow_id, key_id, status, document, record_json,
                                    cancel_requested, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.flow_id)
        .bind(&r.key_id)
        .bind(status)
        .bind(&r.document)
        .bind(&r.record_json)
        .bind(i64::from(r.cancel_requested))
        .bind(r.created_at)
        .bind(r.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A run by id (any owner).
    pub async fn flow_run(&self, id: &str) -> StoreResult<Option<FlowRunRow>> {
        let row = sqlx::query("SELECT * FROM flow_runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::flow_run_row))
    }

    /// A key's runs of a flow (or of all flows), newest first.
    pub async fn flow_runs(
        &self,
        key_id: &str,
        flow_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<FlowRunRow>> {
        let rows = sqlx::query(
            "SELECT * FROM flow_runs WHERE key_id = ? AND (? IS NULL OR flow_id = ?)
             ORDER BY created_at DESC, id LIMIT ?",
        )
        .bind(key_id)
        .bind(flow_id)
        .bind(flow_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::flow_run_row).collect())
    }

    /// Store a run's record at a checkpoint.
    pub async fn update_flow_run(
        &self,
        id: &str,
        status: &str,
        record_json: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE flow_runs SET status = ?, record_json = ?, updated_at = ? WHERE id = ?",
        )
        .bind(status)
        .bind(record_json)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Mark a run's cancel as asked (it survives a restart).
    pub async fn request_flow_cancel(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE flow_runs SET cancel_requested = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Runs not finished (`pending` or `running`), oldest first: what a
    /// starting server resumes.
    pub async fn unfinished_flow_runs(&self) -> StoreResult<Vec<FlowRunRow>> {
        let rows = sqlx::query(
            "SELECT * FROM flow_runs WHERE status IN ('pending', 'running') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Self::flow_run_row).collect())
    }

    // ---- billing ------------------------------------------------------------

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

    // ---- webhooks -----------------------------------------------------------

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
             VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
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

    /// Deliveries due now, oldest first, and the time of the next one not due yet.
    pub async fn due_deliveries(&self, limit: i64) -> StoreResult<(Vec<DeliveryRow>, Option<i64>)> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?
             ORDER BY next_attempt_at, seq LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let next: Option<i64> = sqlx::query(
            "SELECT MIN(next_attempt_at) AS t FROM webhook_deliveries
             WHERE status = 'pending' AND next_attempt_at > ?",
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
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, last_error = ?,
                 next_attempt_at = COALESCE(?, next_attempt_at)
             WHERE id = ?",
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
            "SELECT event, status, attempts FROM webhook_deliveries WHERE generation_id = ? ORDER BY seq",
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
