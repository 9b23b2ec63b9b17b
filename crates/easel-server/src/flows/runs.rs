//! Executing a stored run on its own thread, storing its record at every
//! checkpoint, and resuming the runs a previous process left unfinished.

use std::sync::Arc;

use easel_flow::{CancelToken, FlowDocument, FlowEvent, FlowRun, FlowRunner, RunOptions};

use crate::auth::{Principal, LOCAL_KEY_ID};
use crate::error::ApiError;
use crate::flows::step_registry;
use crate::AppState;

/// The principal a stored run acts as (its key; `local` without auth).
async fn principal_of(state: &AppState, key_id: &str) -> Result<Principal, ApiError> {
    if key_id == LOCAL_KEY_ID {
        return Ok(Principal {
            key_id: key_id.to_string(),
            credit_limit_micros: None,
        });
    }
    let key = state.store().key(key_id).await?;
    Ok(Principal {
        key_id: key_id.to_string(),
        credit_limit_micros: key.and_then(|k| k.credit_limit_micros),
    })
}

/// Execute a stored run on its own thread, storing its record at every
/// checkpoint. Must be called inside the tokio runtime.
pub(crate) fn spawn_run(
    state: AppState,
    principal: Principal,
    flow: FlowDocument,
    mut run: FlowRun,
    cancel_requested: bool,
) {
    let runtime = tokio::runtime::Handle::current();
    let registry = step_registry(&state, &principal);
    let cancel = CancelToken::new();
    if cancel_requested {
        cancel.cancel();
    }
    state
        .flows()
        .running()
        .insert(run.id.clone(), cancel.clone());
    let store_state = state.clone();
    let store_runtime = runtime.clone();
    let checkpoint = move |record: &FlowRun| {
        // While stopping, keep the last stored record (`running`), so the
        // next start resumes the run instead of seeing it failed.
        if store_state.is_shutting_down() {
            return;
        }
        let text = serde_json::to_string(record).unwrap_or_else(|_| "{}".into());
        let status = status_name(record);
        let stored = store_runtime.block_on(
            store_state
                .store()
                .update_flow_run(&record.id, &status, &text),
        );
        if let Err(e) = stored {
            tracing::error!("flow run {}: storing the record failed: {e}", record.id);
        }
    };
    let events = state.flows().events.clone();
    let options = RunOptions {
        run_id: Some(run.id.clone()),
        flow_id: run.flow_id.clone(),
        cancel,
        events: Some(Arc::new(move |e: &FlowEvent| {
            let _ = events.send(e.clone());
        })),
        checkpoint: Some(Arc::new(checkpoint)),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("flow-{}", run.id))
        .spawn(move || {
            FlowRunner::new(registry).execute(&flow, &mut run, &options);
            state.flows().running().remove(&run.id);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a flow run thread: {e}");
    }
}

/// The record's status as stored (`pending`, `running`, ...).
pub(crate) fn status_name(run: &FlowRun) -> String {
    serde_json::to_value(run.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "running".into())
}

/// Resume the runs a previous process left `pending` or `running` (see the
/// module docs). Called once when the server starts.
pub async fn resume_unfinished(state: &AppState) {
    let rows = match state.store().unfinished_flow_runs().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!("cannot list unfinished flow runs: {e}");
            return;
        }
    };
    for row in rows {
        let parsed = serde_json::from_str::<FlowRun>(&row.record_json)
            .map_err(|e| e.to_string())
            .and_then(|run| {
                FlowDocument::parse(&row.document)
                    .map(|flow| (flow, run))
                    .map_err(|e| e.to_string())
            });
        let principal = principal_of(state, &row.key_id).await;
        match (parsed, principal) {
            (Ok((flow, run)), Ok(principal)) => {
                tracing::warn!("resuming flow run {} after a restart", row.id);
                spawn_run(state.clone(), principal, flow, run, row.cancel_requested);
            }
            (Err(e), _) => tracing::error!("flow run {} cannot resume: {e}", row.id),
            (_, Err(e)) => tracing::error!("flow run {} cannot resume: {}", row.id, e.message),
        }
    }
}
