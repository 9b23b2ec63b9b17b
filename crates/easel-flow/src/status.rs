//! The statuses of a run and of its steps, shared by the run record
//! ([`crate::run`]) and the progress events ([`crate::event`]).

use serde::{Deserialize, Serialize};

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Not started yet.
    Pending,
    /// Running now.
    Running,
    /// Produced a result.
    Succeeded,
    /// Failed; `error` says why (and with `onFailure: continue`, `result`
    /// holds `{ "error": { "message": ... } }`).
    Failed,
    /// Not run because an earlier step failed with `onFailure: terminate`.
    Skipped,
    /// Stopped, or never started, because the run was canceled.
    Canceled,
}

impl StepStatus {
    /// True once the step will not change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Validated, not started.
    Pending,
    /// Executing.
    Running,
    /// Every step ran; some may have failed with `onFailure: continue`.
    Succeeded,
    /// A step with `onFailure: terminate` failed; `error` names it.
    Failed,
    /// Canceled through the [`CancelToken`](crate::step::CancelToken).
    Canceled,
}

impl RunStatus {
    /// True once the run will not change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}
