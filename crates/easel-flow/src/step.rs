//! Step types: the [`Step`] trait, the [`StepRegistry`] and what a step
//! gets while it runs ([`StepContext`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::error::ParamError;
use crate::event::{EventSink, FlowEvent};

/// A step type: checks its parameters when a flow is loaded and runs with
/// resolved parameters.
///
/// Implementations must not panic on bad input: parameters come from
/// users. A step that waits (on a backend, a server) should check
/// [`StepContext::is_canceled`] and return [`StepError::canceled`].
///
/// The server adds its own types through [`StepRegistry::register`] (for
/// example a `RegisterTraining` step that stores a LoRA file as a training
/// and returns `{ "id": ... }`, the `myTrainingStep` of the seed's
/// trained-model flow).
pub trait Step: Send + Sync {
    /// Checks the parameters as written, before anything runs. Any value
    /// may still be a reference, a template or a `@Map` item (see
    /// [`is_dynamic`]); check only what is written literally. Paths start
    /// at [`crate::ParamPath::root`].
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let _ = parameters;
        Ok(())
    }

    /// Rewrites parameters written in this step type's own reference syntax
    /// into the engine's, before they are validated and resolved: the
    /// server's `ImageGeneration` step turns the seed's prompt variables
    /// (`{{ subject }}`, `{{ gen.output[0].file_url }}`) into engine
    /// templates (`{{ $.input.subject }}`, `{{ $.results.gen[0].file_url }}`),
    /// so the engine's checks (a step that exists and runs earlier, an
    /// input that has the member) and its resolution apply unchanged.
    /// `None` (the default) keeps the parameters as written. Must not fail:
    /// text it cannot rewrite is left as is, for [`Self::validate`] (which
    /// sees the parameters as written) to report.
    fn translate(&self, parameters: &Value) -> Option<Value> {
        let _ = parameters;
        None
    }

    /// Checks, before a run starts, that the step can run here (a backend
    /// or server configured). The error is a full sentence.
    fn preflight(&self, parameters: &Value) -> Result<(), String> {
        let _ = parameters;
        Ok(())
    }

    /// Runs with parameters resolved against the input and earlier results.
    fn run(&self, parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError>;
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The result later steps read as `$.results.<id>`.
    pub result: Value,
    /// The generation job the step ran, when it ran one (kept on the step's record).
    pub job_id: Option<String>,
}

impl From<Value> for StepOutput {
    fn from(result: Value) -> Self {
        Self {
            result,
            job_id: None,
        }
    }
}

/// Why a step did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// True when the step stopped because the run was canceled.
    pub canceled: bool,
    /// What went wrong, naming the parameter when one is at fault
    /// (`parameters.images[0].prompt: ...`).
    pub message: String,
}

impl StepError {
    /// The step failed.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            canceled: false,
            message: message.into(),
        }
    }

    /// The step stopped because the run was canceled.
    pub fn canceled() -> Self {
        Self {
            canceled: true,
            message: "canceled".to_string(),
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// A shared flag that asks a run to stop. Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet canceled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run (and the step running now) to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`Self::cancel`] was called on any clone.
    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a running step can see and do besides its parameters.
pub struct StepContext<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) step_id: &'a str,
    pub(crate) step_index: usize,
    pub(crate) input: &'a Value,
    pub(crate) cancel: &'a CancelToken,
    pub(crate) events: Option<&'a EventSink>,
}

impl<'a> StepContext<'a> {
    /// A context for running a step outside a [`crate::FlowRunner`] (tests,
    /// previews of a single step).
    pub fn detached(step_id: &'a str, input: &'a Value, cancel: &'a CancelToken) -> Self {
        Self {
            run_id: "",
            step_id,
            step_index: 0,
            input,
            cancel,
            events: None,
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        self.run_id
    }

    /// This step's id.
    pub fn step_id(&self) -> &str {
        self.step_id
    }

    /// This step's position in the flow.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// The run's input.
    pub fn input(&self) -> &Value {
        self.input
    }

    /// The run's cancel token (pass it on to backends).
    pub fn cancel_token(&self) -> &CancelToken {
        self.cancel
    }

    /// True when the run was asked to stop.
    pub fn is_canceled(&self) -> bool {
        self.cancel.is_canceled()
    }

    /// Reports progress of this step (`done` of `total` units, e.g.
    /// denoising steps or images) as a [`FlowEvent::StepProgress`].
    pub fn progress(&self, done: u64, total: u64, message: Option<&str>) {
        self.emit(FlowEvent::StepProgress {
            run_id: self.run_id.to_string(),
            step_id: self.step_id.to_string(),
            done,
            total,
            message: message.map(str::to_string),
        });
    }

    /// Reports a note about this step (a retry, a fallback) as a [`FlowEvent::StepLog`].
    pub fn log(&self, message: impl Into<String>) {
        self.emit(FlowEvent::StepLog {
            run_id: self.run_id.to_string(),
            step_id: self.step_id.to_string(),
            message: message.into(),
        });
    }

    fn emit(&self, event: FlowEvent) {
        if let Some(sink) = self.events {
            sink(&event);
        }
    }
}

/// The step types a runner knows, by name.
#[derive(Clone, Default)]
pub struct StepRegistry {
    types: BTreeMap<String, Arc<dyn Step>>,
}

impl StepRegistry {
    /// A registry with no step types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the step type `name`.
    pub fn register(&mut self, name: impl Into<String>, step: impl Step + 'static) -> &mut Self {
        self.types.insert(name.into(), Arc::new(step));
        self
    }

    /// Adds (or replaces) the step type `name`, shared.
    pub fn register_arc(&mut self, name: impl Into<String>, step: Arc<dyn Step>) -> &mut Self {
        self.types.insert(name.into(), step);
        self
    }

    /// The step type `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Step>> {
        self.types.get(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

impl fmt::Debug for StepRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepRegistry")
            .field("types", &self.types.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// True when `value` is not literal: a reference, a template, or a `@Map`
/// item, resolved only when the step runs. Use it in
/// [`Step::validate`] to skip type checks on such values.
pub fn is_dynamic(value: &Value) -> bool {
    match value {
        Value::String(s) => !matches!(crate::path::classify(s), Ok(crate::path::Text::Literal(_))),
        Value::Array(items) => crate::resolve::map_pair(items).is_some(),
        _ => false,
    }
}
