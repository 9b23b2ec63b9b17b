//! Flows over HTTP (issue 7): stored flow documents, durable runs, their
//! events, and the step types that need the server.
//!
//! - `POST /v1/flows` stores a document (JSON object, or JSON / JSON5 text
//!   in `document`) after validating it (every error at once, each naming
//!   the step and parameter); `GET /v1/flows`, `GET /v1/flows/{id}`,
//!   `DELETE /v1/flows/{id}`.
//! - `POST /v1/flows/{id}/runs` `{ "input": {...} }` validates the input's
//!   references, stores the run record (`pending`) and starts it on its own
//!   thread; `GET /v1/flow-runs/{id}` is the record (per step: status,
//!   times, result or error, job id), `GET /v1/flows/{id}/runs` the flow's
//!   runs, `GET /v1/flow-runs/{id}/events` Server-Sent Events (the
//!   `easel_flow::FlowEvent`s by name, then the final record as `status`),
//!   `POST /v1/flow-runs/{id}/cancel`.
//! - Durable: the record is stored at every checkpoint (run start, step
//!   start and finish, end: [`easel_flow::RunOptions::checkpoint`]); a run
//!   the process left `pending` or `running` is resumed when the server
//!   starts, keeping its finished steps. A step that was running runs
//!   again, but an image step finds the job it had submitted (its
//!   idempotency key is `flow-run:<run>:step:<index>`) and waits for it. A run keeps the document it started
//!   with, so deleting the flow does not break it. While the server stops,
//!   records are no longer written, so a run cut off by a graceful stop
//!   resumes too.
//! - Steps: `ImageGenerator` submits its request as ONE job of the run's
//!   key ([`ServerImageBackend`]: same validation, queue, credit and worker
//!   as `POST /v1/generations`, `source: flow`), waits for it, reports its
//!   progress, cancels it when the run is canceled, and returns the job's
//!   asset records; `RegisterTraining` stores a LoRA file as a training
//!   ([`RegisterTraining`]); `ObjectGenerator` uses the configured
//!   chat-completions server (`llm_url`); `Constant`, `List`, `Template`;
//!   `ImageGeneration`, the workflow builder's Image Generation step
//!   translated into an `ImageGenerator` request on the same backend
//!   ([`image_generation`], its `{{ }}` prompt variables in [`variables`]).
//!
//! Layout: this file holds what the runs of a server share; [`steps`] the
//! server's step types and their registry, [`runs`] executing, storing
//! and resuming runs; the HTTP handlers are [`crate::routes::flows`].

use std::collections::HashMap;
use std::sync::Mutex;

use easel_flow::{CancelToken, FlowEvent};
use tokio::sync::broadcast;

pub mod image_generation;
pub mod runs;
pub mod steps;
pub mod variables;

pub use runs::resume_unfinished;
pub use steps::{step_registry, RegisterTraining, ServerImageBackend};

/// What the flow runs of a server share: their events (for SSE) and the
/// cancel tokens of the runs executing now.
pub struct FlowsShared {
    events: broadcast::Sender<FlowEvent>,
    running: Mutex<HashMap<String, CancelToken>>,
}

impl Default for FlowsShared {
    fn default() -> Self {
        Self {
            events: broadcast::channel(4096).0,
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl FlowsShared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancelToken>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follow the events of every run (Server-Sent Events filter by run).
    pub fn subscribe(&self) -> broadcast::Receiver<FlowEvent> {
        self.events.subscribe()
    }

    /// The cancel token of run `id` if it executes in this process now.
    pub fn cancel_token(&self, id: &str) -> Option<CancelToken> {
        self.running().get(id).cloned()
    }
}
