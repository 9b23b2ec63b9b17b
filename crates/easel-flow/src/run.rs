//! Running flows: [`FlowRunner`] and the run record ([`FlowRun`],
//! [`StepRun`]). The statuses ([`RunStatus`], [`StepStatus`]) live in
//! [`crate::status`], which the events use too; they are re-exported here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::document::{FlowDocument, OnFailure};
use crate::error::{FlowError, ValidationError, ValidationErrors};
use crate::event::{EventSink, FlowEvent};
use crate::resolve::{resolve_parameters, scope};
pub use crate::status::{RunStatus, StepStatus};
use crate::step::{CancelToken, StepContext, StepError, StepOutput, StepRegistry};
use crate::validate::validate_flow;

/// An error message, as recorded (`{ "message": ... }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// What went wrong, naming the parameter when one is at fault.
    pub message: String,
}

/// Why a run failed or was canceled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunError {
    /// The step that failed (or was running when the run was canceled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// What went wrong.
    pub message: String,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRun {
    /// The step's id.
    pub id: String,
    /// The step's type.
    #[serde(rename = "type")]
    pub step_type: String,
    /// Where it is.
    pub status: StepStatus,
    /// What its failure does to the run.
    pub on_failure: OnFailure,
    /// When it started (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How long it ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The generation job it ran (ImageGenerator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// What later steps read as `$.results.<id>`: the step's result, or for
    /// a failed step with `onFailure: continue`, `{ "error": { "message": ... } }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
}

/// The record of one run of a flow: what the CLI prints with `--json` and
/// the server stores and returns (`GET /v1/flow-runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRun {
    /// The run's id.
    pub id: String,
    /// The stored flow it runs, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    /// Where it is.
    pub status: RunStatus,
    /// The input (`$.input`).
    pub input: Value,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
    /// When it started executing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How long it executed, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Every step of the flow, in order.
    pub steps: Vec<StepRun>,
    /// Why it failed or was canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
}

impl FlowRun {
    /// The step record with this id.
    pub fn step(&self, id: &str) -> Option<&StepRun> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The results so far, by step id (what `$.results` holds).
    pub fn results(&self) -> Map<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| s.result.clone().map(|r| (s.id.clone(), r)))
            .collect()
    }
}

/// How to run: ids, cancellation, events.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// The run's id (default: generated, `run-<time>-<n>`).
    pub run_id: Option<String>,
    /// The stored flow's id, recorded on the run.
    pub flow_id: Option<String>,
    /// Checked between steps and passed to steps (and backends).
    pub cancel: CancelToken,
    /// Receives progress events.
    pub events: Option<Arc<EventSink>>,
    /// Receives the whole record whenever it changes durably: the run
    /// started, a step started or finished, the run finished. A server
    /// stores it, so a restarted process resumes from the last finished
    /// step ([`FlowRunner::execute`]).
    pub checkpoint: Option<Arc<Checkpoint>>,
}

/// A receiver of run records (see [`RunOptions::checkpoint`]).
pub type Checkpoint = dyn Fn(&FlowRun) + Send + Sync;

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("run_id", &self.run_id)
            .field("flow_id", &self.flow_id)
            .field("cancel", &self.cancel)
            .field("events", &self.events.is_some())
            .field("checkpoint", &self.checkpoint.is_some())
            .finish()
    }
}

/// Loads, validates and runs flows with the step types of a registry.
///
/// ```
/// use easel_flow::{FlowRunner, RunOptions, RunStatus, StepRegistry};
/// use serde_json::json;
///
/// let runner = FlowRunner::new(StepRegistry::with_basic_steps());
/// let flow = runner
///     .load("{ steps: [ { id: 'subjects', type: 'List', parameters: { value: ['a fox', 'an owl'] } },
///                       { id: 'titles', type: 'Template', parameters: { template: [[ '@Map($.results.subjects)', 'A portrait of {{ $$ }} by {{ $.input.artist }}' ]] } } ] }")
///     .unwrap();
/// let run = runner.run(&flow, json!({ "artist": "Vermeer" }), &RunOptions::default()).unwrap();
/// assert_eq!(run.status, RunStatus::Succeeded);
/// assert_eq!(run.results()["titles"], json!(["A portrait of a fox by Vermeer", "A portrait of an owl by Vermeer"]));
/// ```
#[derive(Debug, Clone)]
pub struct FlowRunner {
    registry: Arc<StepRegistry>,
}

impl FlowRunner {
    /// A runner with these step types.
    pub fn new(registry: StepRegistry) -> Self {
        Self {
            registry: Arc::new(registry),
        }
    }

    /// A runner sharing a registry.
    pub fn with_registry(registry: Arc<StepRegistry>) -> Self {
        Self { registry }
    }

    /// The step types.
    pub fn registry(&self) -> &StepRegistry {
        &self.registry
    }

    /// Parses a flow (JSON or JSON5) and validates it without an input:
    /// what the server does when a flow is stored.
    pub fn load(&self, text: &str) -> Result<FlowDocument, FlowError> {
        let flow = FlowDocument::parse(text)?;
        self.validate(&flow, None)?;
        Ok(flow)
    }

    /// Checks `flow` (see [`crate::validate`]); with `input`, also the
    /// references into the input.
    pub fn validate(
        &self,
        flow: &FlowDocument,
        input: Option<&Value>,
    ) -> Result<(), ValidationErrors> {
        validate_flow(flow, &self.registry, input)
    }

    /// Validates `flow` with `input`, checks every step can run here
    /// ([`crate::Step::preflight`]) and returns the run record, `pending`,
    /// to be stored before [`Self::execute`]. A `null` input counts as `{}`.
    pub fn prepare(
        &self,
        flow: &FlowDocument,
        input: Value,
        options: &RunOptions,
    ) -> Result<FlowRun, ValidationErrors> {
        let input = if input.is_null() { json!({}) } else { input };
        self.validate(flow, Some(&input))?;
        let mut errors = Vec::new();
        for (index, step) in flow.steps.iter().enumerate() {
            if let Some(kind) = self.registry.get(&step.step_type) {
                if let Err(message) = kind.preflight(&step.parameters) {
                    errors.push(ValidationError::in_step(index, Some(&step.id), "", message));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        Ok(FlowRun {
            id: options.run_id.clone().unwrap_or_else(new_run_id),
            flow_id: options.flow_id.clone(),
            status: RunStatus::Pending,
            input,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            steps: flow
                .steps
                .iter()
                .map(|s| StepRun {
                    id: s.id.clone(),
                    step_type: s.step_type.clone(),
                    status: StepStatus::Pending,
                    on_failure: s.on_failure,
                    started_at: None,
                    finished_at: None,
                    duration_ms: None,
                    job_id: None,
                    result: None,
                    error: None,
                })
                .collect(),
            error: None,
        })
    }

    /// Validates and executes: [`Self::prepare`] then [`Self::execute`].
    /// Only validation errors are returned as `Err`; everything that goes
    /// wrong while running is in the record.
    pub fn run(
        &self,
        flow: &FlowDocument,
        input: Value,
        options: &RunOptions,
    ) -> Result<FlowRun, ValidationErrors> {
        let mut run = self.prepare(flow, input, options)?;
        self.execute(flow, &mut run, options);
        Ok(run)
    }

    /// Executes a prepared run to its end, step by step, on this thread.
    ///
    /// A record that already has finished steps (a run resumed after a
    /// restart) keeps them and their results, and runs the rest; a step
    /// found `running` runs again. A record that is already finished is
    /// left as it is.
    pub fn execute(&self, flow: &FlowDocument, run: &mut FlowRun, options: &RunOptions) {
        if run.status.is_terminal() {
            return;
        }
        let sink = options.events.as_deref();
        let emit = |event: FlowEvent| {
            if let Some(sink) = sink {
                sink(&event);
            }
        };
        let save = |run: &FlowRun| {
            if let Some(checkpoint) = options.checkpoint.as_deref() {
                checkpoint(run);
            }
        };
        let clock = Instant::now();
        let previous_ms = run.duration_ms.unwrap_or(0);
        run.status = RunStatus::Running;
        if run.started_at.is_none() {
            run.started_at = Some(now_rfc3339());
        }
        save(run);
        emit(FlowEvent::RunStarted {
            run_id: run.id.clone(),
            steps: run.steps.len(),
        });
        let mismatch = run.steps.len() != flow.steps.len()
            || run
                .steps
                .iter()
                .zip(&flow.steps)
                .any(|(r, s)| r.id != s.id || r.step_type != s.step_type);
        if mismatch {
            run.status = RunStatus::Failed;
            run.error = Some(RunError {
                step_id: None,
                message: "the run record does not match the flow's steps (was the flow changed?)"
                    .to_string(),
            });
        }
        let mut results = run.results();
        let mut stop: Option<StepStatus> = None;
        let count = if mismatch { 0 } else { run.steps.len() };
        for index in 0..count {
            if let Some(status) = stop {
                let step = &mut run.steps[index];
                step.status = status;
                emit(finished_event(&run.id, index, step));
                continue;
            }
            if run.steps[index].status.is_terminal() {
                continue;
            }
            if options.cancel.is_canceled() {
                cancel_run(run, index, None);
                let step = &mut run.steps[index];
                step.status = StepStatus::Canceled;
                emit(finished_event(&run.id, index, step));
                stop = Some(StepStatus::Canceled);
                continue;
            }
            let spec = &flow.steps[index];
            {
                let step = &mut run.steps[index];
                step.status = StepStatus::Running;
                step.started_at = Some(now_rfc3339());
                step.finished_at = None;
                step.error = None;
                step.result = None;
            }
            save(run);
            emit(FlowEvent::StepStarted {
                run_id: run.id.clone(),
                step_id: spec.id.clone(),
                index,
                step_type: spec.step_type.clone(),
            });
            let step_clock = Instant::now();
            let ctx = StepContext {
                run_id: &run.id,
                step_id: &spec.id,
                step_index: index,
                input: &run.input,
                cancel: &options.cancel,
                events: sink,
            };
            let outcome = self.run_step(spec, &run.input, &results, &ctx);
            let step = &mut run.steps[index];
            step.finished_at = Some(now_rfc3339());
            step.duration_ms = Some(millis(step_clock));
            match outcome {
                Ok(output) => {
                    step.status = StepStatus::Succeeded;
                    step.job_id = output.job_id;
                    results.insert(spec.id.clone(), output.result.clone());
                    step.result = Some(output.result);
                    emit(finished_event(&run.id, index, step));
                }
                Err(e) if e.canceled || options.cancel.is_canceled() => {
                    step.status = StepStatus::Canceled;
                    step.error = Some(ErrorRecord { message: e.message });
                    emit(finished_event(&run.id, index, step));
                    cancel_run(run, index, Some(spec.id.clone()));
                    stop = Some(StepStatus::Canceled);
                }
                Err(e) => {
                    step.status = StepStatus::Failed;
                    step.error = Some(ErrorRecord {
                        message: e.message.clone(),
                    });
                    if spec.on_failure == OnFailure::Continue {
                        let record = json!({ "error": { "message": e.message } });
                        results.insert(spec.id.clone(), record.clone());
                        step.result = Some(record);
                        emit(finished_event(&run.id, index, step));
                    } else {
                        emit(finished_event(&run.id, index, step));
                        run.status = RunStatus::Failed;
                        run.error = Some(RunError {
                            step_id: Some(spec.id.clone()),
                            message: format!("steps[{index}] ({}): {}", spec.id, e.message),
                        });
                        stop = Some(StepStatus::Skipped);
                    }
                }
            }
            save(run);
        }
        if run.status == RunStatus::Running {
            run.status = RunStatus::Succeeded;
        }
        run.finished_at = Some(now_rfc3339());
        run.duration_ms = Some(previous_ms + millis(clock));
        save(run);
        emit(FlowEvent::RunFinished {
            run_id: run.id.clone(),
            status: run.status,
            duration_ms: run.duration_ms,
            error: run.error.as_ref().map(|e| e.message.clone()),
        });
    }

    fn run_step(
        &self,
        spec: &crate::document::StepSpec,
        input: &Value,
        results: &Map<String, Value>,
        ctx: &StepContext<'_>,
    ) -> Result<StepOutput, StepError> {
        let Some(kind) = self.registry.get(&spec.step_type) else {
            return Err(StepError::failed(format!(
                "unknown step type `{}`",
                spec.step_type
            )));
        };
        let scope = scope(input, results.clone());
        let translated = kind.translate(&spec.parameters);
        let parameters =
            resolve_parameters(translated.as_ref().unwrap_or(&spec.parameters), &scope)
                .map_err(|e| StepError::failed(e.to_string()))?;
        match catch_unwind(AssertUnwindSafe(|| kind.run(parameters, ctx))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(StepError::failed(format!(
                    "the `{}` step panicked (a bug in the step type): {detail}",
                    spec.step_type
                )))
            }
        }
    }
}

fn cancel_run(run: &mut FlowRun, index: usize, step_id: Option<String>) {
    run.status = RunStatus::Canceled;
    run.error = Some(RunError {
        step_id: step_id.or_else(|| run.steps.get(index).map(|s| s.id.clone())),
        message: "the run was canceled".to_string(),
    });
}

fn finished_event(run_id: &str, index: usize, step: &StepRun) -> FlowEvent {
    FlowEvent::StepFinished {
        run_id: run_id.to_string(),
        step_id: step.id.clone(),
        index,
        status: step.status,
        duration_ms: step.duration_ms,
        result: step.result.clone(),
        error: step.error.as_ref().map(|e| e.message.clone()),
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn new_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default();
    format!("run-{now:x}-{n}")
}

/// The current time as RFC 3339 in UTC with milliseconds
/// (`2026-05-01T12:30:00.250Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `secs` + `millis` after the Unix epoch as RFC 3339 (see [`now_rfc3339`]).
#[cfg(test)]
fn rfc3339(secs: u64, millis: u32) -> String {
    let t = UNIX_EPOCH
        + std::time::Duration::from_secs(secs)
        + std::time::Duration::from_millis(millis.into());
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_767_225_599, 999), "2025-12-31T23:59:59.999Z");
    }
}
