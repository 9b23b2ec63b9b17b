//! Copying one store into another (`easel migrate`, issue 18): every table,
//! every row, in an order that satisfies the foreign keys, in batches.
//! Idempotent and resumable: a row already in the target (same primary key
//! or unique key) is left as it is (`ON CONFLICT DO NOTHING`), so a copy
//! that stopped half-way is finished by running it again. Both schemas have
//! the same columns (`migrations/sqlite`, `migrations/postgres`); the
//! copy names them, so a column added to one dialect and not the other
//! fails here loudly.

use sqlx::Row;

use super::{Backend, Store, StoreResult};

/// A column's kind: every column of the schema is an integer or text.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
}
use Kind::{Int, Text};

/// The tables, parents first, with their columns and their primary key
/// (the copy's order). Identity columns (`seq`) are copied as they are and
/// the target's sequence moved past them.
const TABLES: &[(&str, &str, &[(&str, Kind)])] = &[
    (
        "api_keys",
        "id",
        &[
            ("id", Text),
            ("name", Text),
            ("prefix", Text),
            ("secret_hash", Text),
            ("credit_limit_micros", Int),
            ("created_at", Int),
            ("revoked_at", Int),
        ],
    ),
    (
        "generations",
        "seq",
        &[
            ("seq", Int),
            ("id", Text),
            ("key_id", Text),
            ("source", Text),
            ("status", Text),
            ("request_json", Text),
            ("primary_model", Text),
            ("inferences", Int),
            ("images_total", Int),
            ("price_micros", Int),
            ("attempts", Int),
            ("cancel_requested", Int),
            ("progress_json", Text),
            ("error_json", Text),
            ("idempotency_key", Text),
            ("request_hash", Text),
            ("webhook_url", Text),
            ("webhook_events", Text),
            ("created_at", Int),
            ("started_at", Int),
            ("finished_at", Int),
            ("lease_owner", Text),
            ("lease_expires_at", Int),
        ],
    ),
    (
        "generation_items",
        "generation_id, idx",
        &[
            ("generation_id", Text),
            ("idx", Int),
            ("spec_json", Text),
            ("status", Text),
            ("result_json", Text),
            ("error_json", Text),
        ],
    ),
    (
        "assets",
        "id",
        &[
            ("id", Text),
            ("key_id", Text),
            ("kind", Text),
            ("hash", Text),
            ("extension", Text),
            ("file_name", Text),
            ("file_size", Int),
            ("file_type", Text),
            ("width", Int),
            ("height", Int),
            ("seed", Text),
            ("generation_id", Text),
            ("item_idx", Int),
            ("image_idx", Int),
            ("created_at", Int),
        ],
    ),
    (
        "trainings",
        "id",
        &[
            ("id", Text),
            ("key_id", Text),
            ("name", Text),
            ("base_model", Text),
            ("hash", Text),
            ("file_size", Int),
            ("created_at", Int),
        ],
    ),
    (
        "inference_packs",
        "id",
        &[
            ("id", Text),
            ("key_id", Text),
            ("name", Text),
            ("body_json", Text),
            ("image_count", Int),
            ("created_at", Int),
        ],
    ),
    (
        "ledger",
        "seq",
        &[
            ("seq", Int),
            ("key_id", Text),
            ("generation_id", Text),
            ("kind", Text),
            ("inferences", Int),
            ("amount_micros", Int),
            ("created_at", Int),
        ],
    ),
    (
        "webhook_deliveries",
        "seq",
        &[
            ("seq", Int),
            ("id", Text),
            ("generation_id", Text),
            ("url", Text),
            ("event", Text),
            ("payload", Text),
            ("status", Text),
            ("attempts", Int),
            ("max_attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("created_at", Int),
        ],
    ),
    (
        "flows",
        "id",
        &[
            ("id", Text),
            ("key_id", Text),
            ("name", Text),
            ("document", Text),
            ("step_count", Int),
            ("created_at", Int),
        ],
    ),
    (
        "flow_runs",
        "id",
        &[
            ("id", Text),
            ("flow_id", Text),
            ("key_id", Text),
            ("status", Text),
            ("document", Text),
            ("record_json", Text),
            ("cancel_requested", Int),
            ("created_at", Int),
            ("updated_at", Int),
        ],
    ),
];

/// Rows per read and per target transaction.
const BATCH: i64 = 500;

/// What [`Store::copy_into`] did for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    /// The table.
    pub table: &'static str,
    /// Rows in the source.
    pub source_rows: u64,
    /// Rows the target did not have and now has.
    pub inserted: u64,
}

impl Store {
    /// Copy every row of this store into `target` (see the module docs);
    /// `progress` hears each table as it is done.
    ///
    /// # Errors
    /// Either store fails (what was copied stays copied; run it again).
    pub async fn copy_into(
        &self,
        target: &Store,
        mut progress: impl FnMut(&TableCopy),
    ) -> StoreResult<Vec<TableCopy>> {
        let mut done = Vec::new();
        for &(table, key, columns) in TABLES {
            let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
            let list = names.join(", ");
            let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
            let insert = format!(
                "INSERT INTO {table} ({list}) VALUES ({}) ON CONFLICT DO NOTHING",
                params.join(", ")
            );
            let mut copy = TableCopy {
                table,
                source_rows: 0,
                inserted: 0,
            };
            let mut offset = 0;
            loop {
                let select =
                    format!("SELECT {list} FROM {table} ORDER BY {key} LIMIT $1 OFFSET $2");
                let rows = sqlx::query(&select)
                    .bind(BATCH)
                    .bind(offset)
                    .fetch_all(&self.pool)
                    .await?;
                if rows.is_empty() {
                    break;
                }
                offset += rows.len() as i64;
                copy.source_rows += rows.len() as u64;
                let mut tx = target.write_tx().await?;
                for row in &rows {
                    let mut query = sqlx::query(&insert);
                    for (i, (_, kind)) in columns.iter().enumerate() {
                        query = match kind {
                            Int => query.bind(row.try_get::<Option<i64>, _>(i)?),
                            Text => query.bind(row.try_get::<Option<String>, _>(i)?),
                        };
                    }
                    copy.inserted += query.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
            }
            if target.backend == Backend::Postgres && names.first() == Some(&"seq") {
                // Rows copied with their `seq`: new rows continue after them.
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'seq'),
                                   COALESCE((SELECT MAX(seq) FROM {table}), 0) + 1, false)"
                );
                sqlx::query(&sql).execute(&target.pool).await?;
            }
            progress(&copy);
            done.push(copy);
        }
        Ok(done)
    }
}
