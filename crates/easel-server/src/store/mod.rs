//! The job store: a SQLite file (`DATA_DIR/easel.db`, WAL, `synchronous =
//! FULL` so an accepted job survives a crash) with embedded migrations.
//!
//! Tables: `api_keys`, `generations` (one row per job), `generation_items`
//! (one row per image definition: its resolved spec, status, result),
//! `assets` (output and input images, stored by content hash),
//! `trainings`, `inference_packs`, `ledger` (charges and refunds per key),
//! `webhook_deliveries` (an outbox the dispatcher drains), `flows` and
//! `flow_runs`.
//!
//! One submodule per table (or group of tables that change together); each
//! adds its methods to [`Store`] and its row type is re-exported here:
//! `keys`, `jobs` (generations, items, ledger charges and refunds,
//! idempotency keys, recovery), `assets`, `trainings`, `packs`, `flows`,
//! `usage` (sums of the ledger), `webhooks` (the delivery outbox). This file
//! opens the database and runs the migrations.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

mod assets;
mod flows;
mod jobs;
mod keys;
mod packs;
mod trainings;
mod usage;
mod webhooks;

pub use assets::{AssetFilter, AssetRow};
pub use flows::{FlowRow, FlowRunRow};
pub use jobs::{GenerationRow, ItemRow, NewGeneration, Recovery};
pub use keys::KeyRow;
pub use packs::PackRow;
pub use trainings::TrainingRow;
pub use usage::{LedgerRow, Usage};
pub use webhooks::DeliveryRow;

/// The database file inside the data dir.
pub const DB_FILE: &str = "easel.db";

/// The migrations, embedded in the binary (`migrations/*.sql`).
fn migrator() -> Migrator {
    let migrations = vec![
        Migration::new(
            1,
            Cow::Borrowed("init"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/0001_init.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("flows"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/0002_flows.sql")),
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

    /// A transaction that writes: `BEGIN IMMEDIATE` takes the write lock
    /// at its start, waiting for another writer within the busy timeout.
    /// A deferred `BEGIN` that reads and then writes fails at once with
    /// `database is locked` (SQLITE_BUSY_SNAPSHOT) when another connection
    /// wrote since its read, without waiting: the fuzzer found that as a
    /// 500 on `DELETE /v1/assets/{id}` beside a running job.
    pub(crate) async fn write_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    /// Two transactions that each read and then write, overlapping: with
    /// [`Store::write_tx`] the second waits for the first and both commit
    /// (a deferred `BEGIN` fails the first with `database is locked`,
    /// SQLITE_BUSY_SNAPSHOT, as soon as the second has committed a write).
    #[tokio::test]
    async fn overlapping_read_then_write_transactions_both_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        sqlx::query("CREATE TABLE counter (v INTEGER NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO counter (v) VALUES (0)")
            .execute(store.pool())
            .await
            .unwrap();
        let increment = |store: Store, pause_ms: u64| async move {
            let mut tx = store.write_tx().await?;
            let v: i64 = sqlx::query("SELECT v FROM counter")
                .fetch_one(&mut *tx)
                .await?
                .get("v");
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            sqlx::query("UPDATE counter SET v = ?")
                .bind(v + 1)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        let slow = tokio::spawn(increment(store.clone(), 300));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fast = tokio::spawn(increment(store.clone(), 0));
        slow.await.unwrap().expect("the first transaction commits");
        fast.await.unwrap().expect("the second transaction commits");
        let v: i64 = sqlx::query("SELECT v FROM counter")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get("v");
        assert_eq!(v, 2, "an increment was lost");
    }
}
