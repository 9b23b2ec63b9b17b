//! Progress events of a run, for logs, terminals and server-sent events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::status::{RunStatus, StepStatus};

/// Receives events as a run makes progress. Called on the thread that
/// runs the flow; keep it quick (send to a channel, append to a log).
pub type EventSink = dyn Fn(&FlowEvent) + Send + Sync;

/// Something that happened in a run. Serialized with a `type` tag
/// (`run_started`, `step_started`, `step_progress`, `step_log`,
/// `step_finished`, `run_finished`) and camelCase fields, ready to be sent
/// as server-sent events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowEvent {
    /// The run began (or resumed) executing.
    #[serde(rename_all = "camelCase")]
    RunStarted {
        /// The run.
        run_id: String,
        /// How many steps the flow has.
        steps: usize,
    },
    /// A step began.
    #[serde(rename_all = "camelCase")]
    StepStarted {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// Its position in the flow.
        index: usize,
        /// Its type.
        step_type: String,
    },
    /// A step reported progress (`done` of `total`).
    #[serde(rename_all = "camelCase")]
    StepProgress {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
        /// What the units are, or what is happening.
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A step noted something (a retry, a fallback).
    #[serde(rename_all = "camelCase")]
    StepLog {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// The note.
        message: String,
    },
    /// A step ended: succeeded, failed, canceled or skipped.
    #[serde(rename_all = "camelCase")]
    StepFinished {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// Its position in the flow.
        index: usize,
        /// How it ended.
        status: StepStatus,
        /// How long it ran.
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// Its result (for failed steps with `onFailure: continue`, the error record).
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// Why it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The run ended.
    #[serde(rename_all = "camelCase")]
    RunFinished {
        /// The run.
        run_id: String,
        /// How it ended.
        status: RunStatus,
        /// How long it ran.
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// Why it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl FlowEvent {
    /// The event's `type` tag (the SSE `event:` name).
    pub fn name(&self) -> &'static str {
        match self {
            Self::RunStarted { .. } => "run_started",
            Self::StepStarted { .. } => "step_started",
            Self::StepProgress { .. } => "step_progress",
            Self::StepLog { .. } => "step_log",
            Self::StepFinished { .. } => "step_finished",
            Self::RunFinished { .. } => "run_finished",
        }
    }
}
