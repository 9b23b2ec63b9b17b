//! The job store: SQLite (the single-machine default, `DATA_DIR/easel.db`,
//! WAL, `synchronous = FULL` so an accepted job survives a crash) or
//! PostgreSQL (several API nodes and workers on one database), chosen by
//! `database_url`, with embedded migrations per dialect
//! (`migrations/sqlite`, `migrations/postgres`: the same tables and columns).
//!
//! Tables: `api_keys`, `generations` (one row per job, with the lease of the
//! worker running it), `generation_items` (one row per image definition:
//! its resolved spec, status, result), `assets` (output and input images,
//! stored by content hash), `trainings`, `inference_packs`, `ledger`
//! (charges and refunds per key), `webhook_deliveries` (an outbox the
//! dispatchers drain), `flows` and `flow_runs`.
//!
//! Both databases go through sqlx's `Any` driver with one text of each
//! query: numbered parameters (`$1`, which SQLite also reads), standard SQL,
//! integers read as i64; the few places the dialects differ ask
//! [`Backend`] (a JSON field, how a write transaction takes its locks).
//! No `sqlx` type leaves this module: errors are [`StoreError`].
//!
//! One submodule per table (or group of tables that change together); each
//! adds its methods to [`Store`] and its row type is re-exported here:
//! `keys`, `jobs` (generations, items, ledger charges and refunds,
//! admission, idempotency keys), `leases` (claiming, renewing and
//! reclaiming running jobs), `assets`, `trainings`, `packs`, `flows`,
//! `usage` (sums of the ledger), `webhooks` (the delivery outbox), and
//! `copy` (every table into another store, for `easel migrate`). This file
//! opens the database and runs the migrations.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Executor, Transaction};

mod assets;
mod copy;
mod flows;
mod jobs;
mod keys;
mod leases;
mod packs;
mod trainings;
mod usage;
mod webhooks;

pub use assets::{AssetFilter, AssetRow};
pub use copy::TableCopy;
pub use flows::{FlowRow, FlowRunRow};
pub use jobs::{Admission, Admitted, GenerationRow, ItemRow, NewGeneration};
pub use keys::KeyRow;
pub use leases::{Claim, Reclaimed};
pub use packs::PackRow;
pub use trainings::TrainingRow;
pub use usage::{LedgerRow, Usage};
pub use webhooks::DeliveryRow;

/// The database file inside the data dir (the default `database_url`).
pub const DB_FILE: &str = "easel.db";

/// Which database a [`Store`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file: one machine.
    Sqlite,
    /// A PostgreSQL server: any number of API nodes and workers.
    Postgres,
}

impl Backend {
    /// The backend a `database_url` names: `sqlite:` / `sqlite://PATH`, or
    /// `postgres://` / `postgresql://`.
    ///
    /// # Errors
    /// Any other scheme, named with the allowed ones.
    pub fn of_url(url: &str) -> Result<Backend, StoreError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(StoreError::Config(format!(
                "database_url: unsupported `{}`; allowed: sqlite://PATH, postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                redact_url(url)
            ))),
        }
    }

    /// `TEXT` of the JSON field at `path` (dot-separated keys) of the JSON
    /// text column `column`, NULL when absent.
    fn json_text(self, column: &str, path: &[&str]) -> String {
        match self {
            Backend::Sqlite => format!("json_extract({column}, '$.{}')", path.join(".")),
            Backend::Postgres => format!("(({column})::jsonb #>> '{{{}}}')", path.join(",")),
        }
    }
}

/// The URL with its password replaced by `***` (for messages and logs).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The default `database_url`: the SQLite file `DATA_DIR/easel.db`.
pub fn sqlite_url(data_dir: &Path) -> String {
    // sqlx percent-decodes the path, so `%`, `?` and `#` in a folder name
    // are encoded.
    let path = data_dir.join(DB_FILE).to_string_lossy().into_owned();
    let path = path
        .replace('%', "%25")
        .replace('?', "%3F")
        .replace('#', "%23");
    format!("sqlite://{path}")
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement, or cannot be reached.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored value could not be read back.
    #[error("stored {what}: {detail}")]
    Decode {
        /// The column or value.
        what: String,
        /// Why.
        detail: String,
    },
    /// A bad `database_url`.
    #[error("{0}")]
    Config(String),
    /// The database cannot be reached or refused the connection.
    #[error("{0}")]
    Connect(String),
    /// The folder of a SQLite database cannot be created.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The migrations could not be applied.
    #[error("migrating the job store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The worker no longer holds the job's lease (it expired and the job
    /// was reclaimed, or it finished meanwhile): nothing was written.
    #[error("job {0}: this worker no longer holds its lease")]
    LeaseLost(String),
    /// A row that must exist does not (the database changed under us).
    #[error("{0} not found")]
    NotFound(&'static str),
}

impl StoreError {
    /// Whether the database could not be reached (a connection refused,
    /// reset or timed out): the caller may retry later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
            ) => true,
            // PostgreSQL's connection exceptions (08...) and "the server is
            // shutting down / restarting" (57P01-57P03).
            StoreError::Database(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }
}

/// Results of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// The migrations of `backend`, embedded in the binary.
fn migrator(backend: Backend) -> Migrator {
    let texts: [(&str, &'static str); 3] = match backend {
        Backend::Sqlite => [
            (
                "init",
                include_str!("../../migrations/sqlite/0001_init.sql"),
            ),
            (
                "flows",
                include_str!("../../migrations/sqlite/0002_flows.sql"),
            ),
            (
                "leases",
                include_str!("../../migrations/sqlite/0003_leases.sql"),
            ),
        ],
        Backend::Postgres => [
            (
                "init",
                include_str!("../../migrations/postgres/0001_init.sql"),
            ),
            (
                "flows",
                include_str!("../../migrations/postgres/0002_flows.sql"),
            ),
            (
                "leases",
                include_str!("../../migrations/postgres/0003_leases.sql"),
            ),
        ],
    };
    let migrations = texts
        .into_iter()
        .enumerate()
        .map(|(i, (name, sql))| {
            Migration::new(
                i as i64 + 1,
                Cow::Borrowed(name),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

/// PostgreSQL notification channel: a job was queued (payload empty).
const CHANNEL_QUEUED: &str = "easel_job_queued";
/// PostgreSQL notification channel: a cancel was asked (payload: job id).
const CHANNEL_CANCEL: &str = "easel_job_cancel";

/// The job store. Cheap to clone (a pool handle).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The URL it was opened with (a PostgreSQL listener opens its own
    /// connection).
    url: std::sync::Arc<str>,
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
            .map_err(|e| StoreError::Decode {
                what: what.into(),
                detail: e.to_string(),
            }),
    }
}

fn decode_err(what: &str, value: &str) -> StoreError {
    StoreError::Decode {
        what: what.into(),
        detail: format!("unexpected value `{value}`"),
    }
}

/// A row as the store reads it.
type Row = AnyRow;

impl Store {
    /// Open (creating it and the data dir if needed) the SQLite file
    /// `DATA_DIR/easel.db` and run the migrations.
    ///
    /// # Errors
    /// As [`Store::connect`].
    pub async fn open(data_dir: &Path) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir)?;
        Self::connect(&sqlite_url(data_dir)).await
    }

    /// Connect to `database_url` (`sqlite://PATH`, created if missing, or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, which must exist) and
    /// run the migrations (several processes may start at once: the
    /// migrator takes a lock).
    ///
    /// # Errors
    /// A bad URL, an unreachable or refusing database, or a failed migration.
    pub async fn connect(database_url: &str) -> StoreResult<Store> {
        let store = Self::connect_unmigrated(database_url).await?;
        migrator(store.backend).run(&store.pool).await?;
        Ok(store)
    }

    /// [`Store::connect`] without the migrations (tests and tools: an
    /// administrative connection, e.g. to create a database).
    ///
    /// # Errors
    /// A bad URL, an unreachable or refusing database.
    #[doc(hidden)]
    pub async fn connect_unmigrated(database_url: &str) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(database_url)?;
        let url = match backend {
            Backend::Sqlite if !database_url.contains('?') => format!("{database_url}?mode=rwc"),
            _ => database_url.to_string(),
        };
        // A request waits at most 5 s for a connection (the database is
        // down or saturated: the API answers 503 and the client retries).
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(5));
        let pool = match backend {
            Backend::Sqlite => {
                options
                    .max_connections(8)
                    .min_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL so readers never wait for the writer;
                            // FULL so a committed job survives a power cut;
                            // writers wait their turn up to 10 s.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;                                  PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => options
                .max_connections(16)
                .connect(&url)
                .await
                .map_err(|e| {
                    StoreError::Connect(format!(
                        "cannot connect to {}: {e} (is the server up, the \
                         database created and the URL right?)",
                        redact_url(database_url)
                    ))
                })?,
        };
        Ok(Store {
            pool,
            backend,
            url: database_url.into(),
        })
    }

    /// The connection pool (this module's tests).
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// PostgreSQL only (`None` on SQLite, where one process runs the
    /// workers and wakes them itself): a task that listens for the
    /// notifications other processes send (LISTEN/NOTIFY) and calls
    /// `on_queued` when a job was queued and `on_cancel(id)` when a cancel
    /// was asked, so idle workers start at once and cancels land at once.
    /// Best effort: a lost connection is re-opened (notifications sent
    /// meanwhile are missed; the workers' polling and lease renewals catch
    /// up within a second).
    pub fn listen(
        &self,
        on_queued: impl Fn() + Send + 'static,
        on_cancel: impl Fn(&str) + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.backend != Backend::Postgres {
            return None;
        }
        let url = self.url.clone();
        Some(tokio::spawn(async move {
            let mut listener = loop {
                match sqlx::postgres::PgListener::connect(&url).await {
                    Ok(mut l) => match l.listen_all([CHANNEL_QUEUED, CHANNEL_CANCEL]).await {
                        Ok(()) => break l,
                        Err(e) => tracing::warn!("job store listener: {e}"),
                    },
                    Err(e) => tracing::warn!("job store listener: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            };
            loop {
                match listener.recv().await {
                    Ok(n) if n.channel() == CHANNEL_CANCEL => on_cancel(n.payload()),
                    Ok(_) => on_queued(),
                    Err(e) => {
                        tracing::warn!("job store listener: {e}; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        }))
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers (for readiness checks).
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Close the pool: running statements finish, new ones fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that writes. SQLite: `BEGIN IMMEDIATE` takes the
    /// write lock at its start, waiting for another writer within the busy
    /// timeout (a deferred `BEGIN` that reads and then writes fails at once
    /// with `database is locked`, SQLITE_BUSY_SNAPSHOT, when another
    /// connection wrote since its read: the fuzzer found that as a 500 on
    /// `DELETE /v1/assets/{id}` beside a running job). PostgreSQL: a plain
    /// `BEGIN` (READ COMMITTED); the statements that must see a stable row
    /// lock it (`FOR UPDATE`, or an `UPDATE ... WHERE` that re-checks its
    /// condition), see each caller.
    pub(crate) async fn write_tx(&self) -> StoreResult<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Serialize admissions across every API node for the rest of `tx`:
    /// SQLite's write transaction already holds the one write lock;
    /// PostgreSQL takes a transaction-scoped advisory lock, so two nodes
    /// checking the queue length or a key's credit cannot both pass on the
    /// same room.
    pub(crate) async fn lock_admissions(
        &self,
        tx: &mut Transaction<'static, Any>,
    ) -> StoreResult<()> {
        if self.backend == Backend::Postgres {
            // An arbitrary constant naming "easel admissions".
            sqlx::query("SELECT pg_advisory_xact_lock(7210461300265017601)")
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Run `sql` as is (tests and tools: counting rows, forcing a state).
    ///
    /// # Errors
    /// The statement fails.
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> StoreResult<u64> {
        Ok(sqlx::query(sql).execute(&self.pool).await?.rows_affected())
    }

    /// The first column (an integer) of the first row of `sql`.
    ///
    /// # Errors
    /// The statement fails or returns no integer.
    #[doc(hidden)]
    pub async fn scalar_raw(&self, sql: &str) -> StoreResult<i64> {
        use sqlx::Row as _;
        let row = sqlx::query(sql).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)?)
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
            let mut tx = store.write_tx().await.map_err(|e| match e {
                StoreError::Database(e) => e,
                other => panic!("{other}"),
            })?;
            let v: i64 = sqlx::query("SELECT v FROM counter")
                .fetch_one(&mut *tx)
                .await?
                .get("v");
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            sqlx::query("UPDATE counter SET v = $1")
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
