//! Flows for easel: steps that run in order, each reading the run input and
//! earlier steps' results through JSONPath references, with `@Map` turning
//! an array from an earlier step into one image definition per item.
//!
//! This crate is engine- and server-agnostic: image generation goes through
//! the [`ImageBackend`] trait (the server's job queue, the CLI's local
//! engine), step types through the [`StepRegistry`].
//!
//! # The document
//!
//! JSON or JSON5 (unquoted keys, single quotes, trailing commas, comments):
//!
//! ```json5
//! {
//!   name: 'genre pictures',            // optional, for people
//!   steps: [
//!     {
//!       id: 'promptsGenerator',        // unique; letters, digits, `_`, `-`
//!       type: 'ObjectGenerator',       // a registered step type
//!       onFailure: 'terminate',        // or 'continue'; default 'terminate'
//!       parameters: {
//!         amount: 40,
//!         input: '$.input.promptType', // a reference: replaced by the value
//!         description: 'Generate a list of prompts ...',
//!         schema: { type: 'object', properties: { prompts: { type: 'array', items: { type: 'string' } } } },
//!       },
//!     },
//!     {
//!       id: 'dynamicImageGenerator',
//!       type: 'ImageGenerator',
//!       parameters: {
//!         baseModel: 'stable-diffusion-v1-5/stable-diffusion-v1-5',
//!         images: [
//!           [ '@Map($.results.promptsGenerator.prompts)',       // one item per prompt
//!             { prompt: '$$', negativePrompt: 'ugly, blurry', steps: 30 } ],
//!         ],
//!       },
//!     },
//!   ],
//! }
//! ```
//!
//! A bare array of steps is accepted too. Fields other than these are errors.
//!
//! # References, templates, `@Map`
//!
//! A step sees the scope `{ "input": <run input>, "results": { <step id>: <result> } }`.
//!
//! - A string that is a JSONPath query (RFC 9535, via `serde_json_path`)
//!   starting with `$.` or `$[` (or just `$`) is replaced by what it
//!   selects: `'$.input.promptType'`, `'$.results.myTrainingStep.id'`,
//!   `'$.results.gen[0].file_url'`. A *singular* query (names and indexes
//!   only) gives the one value, and selecting nothing fails the step with
//!   `parameters.<path>: `$.input.x` selects nothing: the input has no `x` (it has: ...)`.
//!   Any other query (`[*]`, `..`, slices, filters) gives the array of
//!   what it selects, possibly empty.
//! - `{{ $... }}` inside a longer string inserts the value: strings raw,
//!   other values as compact JSON (`'a {{ $.input.style }} photo'`).
//! - `['@Map(<query>)', template]` inside an array becomes one item per
//!   element of the array the query selects; in the template `$$` is the
//!   element and `$$.field`, `$$[0]` select in it. Empty arrays give no
//!   items; plain items and several `@Map` items mix in one array; `@Map`
//!   nests (`$$` is then the innermost element). The query must select an array.
//! - `\$...` at the start of a string is a literal `$...`; other strings are
//!   literals.
//!
//! See [`resolve`] and [`path`] for the exact rules.
//!
//! # Validation
//!
//! Before anything runs ([`FlowRunner::validate`], [`FlowRunner::prepare`]):
//! document shape and duplicate ids ([`FlowDocument::parse`]), unknown step
//! types, each type's own parameter checks ([`Step::validate`]), malformed
//! JSONPath, `$$` outside `@Map`, references to steps that do not exist,
//! run later or are the step itself, references that start at something
//! other than `input` / `results`; with the input known, `$.input`
//! references that select nothing and `@Map` over input values that are not
//! arrays. Every error names the step and the parameter:
//! `steps[1] (dynamicImageGenerator).parameters.images[0]: @Map path is malformed: ...`.
//!
//! # Running
//!
//! [`FlowRunner::run`] executes the steps in order on the calling thread
//! and returns the [`FlowRun`] record: per step status, times, result or
//! error, the job id of image steps; the run's status. A failing step with
//! `onFailure: terminate` fails the run and skips the rest; with
//! `continue` its result is `{ "error": { "message": ... } }` and the run
//! goes on. A [`CancelToken`] is checked between steps and handed to steps;
//! [`FlowEvent`]s report progress.
//!
//! # Step types
//!
//! Built in (see [`steps`]): `ImageGenerator`, `ObjectGenerator`,
//! `Constant`, `List`, `Template`. Others (the server's `RegisterTraining`)
//! are added with [`StepRegistry::register`].

pub mod document;
pub mod error;
pub mod event;
pub mod path;
pub mod resolve;
pub mod run;
pub mod schema;
pub mod status;
pub mod step;
pub mod steps;
pub mod validate;

pub use document::{FlowDocument, OnFailure, StepSpec};
pub use error::{FlowError, ParamError, ParamPath, ValidationError, ValidationErrors};
pub use event::{EventSink, FlowEvent};
pub use run::{Checkpoint, ErrorRecord, FlowRun, FlowRunner, RunError, RunOptions, StepRun};
pub use status::{RunStatus, StepStatus};
pub use step::{is_dynamic, CancelToken, Step, StepContext, StepError, StepOutput, StepRegistry};
pub use steps::{
    AssetRecord, ChatConfig, Constant, ImageBackend, ImageGenerator, ImageJobResult, List,
    NoImageBackend, ObjectGenerator, ResponseFormat, Template,
};
