//! The `flows` and `flow_runs` tables: stored flow documents and durable
//! run records.

use sqlx::Row;

use super::{Store, StoreResult};
use crate::util::now_ms;

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

impl Store {
    fn flow_row(row: &super::Row) -> FlowRow {
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
             VALUES ($1, $2, $3, $4, $5, $6)",
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
        let row = sqlx::query("SELECT * FROM flows WHERE id = $1 AND key_id = $2")
            .bind(id)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::flow_row))
    }

    /// A key's flows, newest first.
    pub async fn flows(&self, key_id: &str) -> StoreResult<Vec<FlowRow>> {
        let rows = sqlx::query("SELECT * FROM flows WHERE key_id = $1 ORDER BY created_at DESC")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::flow_row).collect())
    }

    /// Delete a key's flow (its runs stay readable); false when there is none.
    pub async fn delete_flow(&self, key_id: &str, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM flows WHERE id = $1 AND key_id = $2")
            .bind(id)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    fn flow_run_row(row: &super::Row) -> FlowRunRow {
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        let row = sqlx::query("SELECT * FROM flow_runs WHERE id = $1")
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
            "SELECT * FROM flow_runs WHERE key_id = $1 AND ($2 IS NULL OR flow_id = $3)
             ORDER BY created_at DESC, id LIMIT $4",
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
            "UPDATE flow_runs SET status = $1, record_json = $2, updated_at = $3 WHERE id = $4",
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
        sqlx::query("UPDATE flow_runs SET cancel_requested = 1 WHERE id = $1")
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
}
