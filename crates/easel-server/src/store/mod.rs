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
}
