//! `ImageGenerator`: the native generation request as one job on an
//! [`ImageBackend`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{expect_string, finish, object};
use crate::error::{ParamError, ParamPath};
use crate::path::type_name;
use crate::resolve::map_pair;
use crate::step::{is_dynamic, Step, StepContext, StepError, StepOutput};

/// An uploaded image, as a generation job records it.
///
/// Backends may add fields (`width`, `height`, `seed`, `job_id`, ...);
/// they are kept in `extra` and appear in the step's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetRecord {
    /// The asset's id.
    pub id: String,
    /// Where to fetch the file (`file://` for the CLI's local store, `http(s)://` for the server).
    pub file_url: String,
    /// The file's name (`easel-1234-0.webp`).
    pub file_name: String,
    /// The file's size in bytes.
    pub file_size: u64,
    /// The file's MIME type (`image/webp`).
    pub file_type: String,
    /// Anything else the backend records.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a backend returns for one generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageJobResult {
    /// The job that ran the request.
    pub job_id: String,
    /// Every image the job produced, in request order (image definition
    /// order, then batch order).
    pub assets: Vec<AssetRecord>,
}

/// Runs generation requests: the server's job queue, or the CLI's local engine.
pub trait ImageBackend: Send + Sync {
    /// Checks the backend can take requests at all (called before a run starts).
    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    /// Runs one native generation request (`{ images: [...], baseModel, trainingId, ... }`,
    /// references resolved, `@Map` expanded) as ONE job, so the model loads
    /// once, and returns its asset records. It should check
    /// `ctx.cancel_token()` while waiting and report progress through
    /// `ctx.progress(...)`. Invalid requests fail with the field path
    /// (`parameters.images[2].width: 1001 is not a multiple of 8`).
    fn generate(&self, request: Value, ctx: &StepContext<'_>) -> Result<ImageJobResult, StepError>;

    /// Checks the static parts of a request when a flow document is
    /// created, with the rules `generate` would apply (ranges, the model's
    /// size multiple, path roots, scheduler family, LoRA files, ...).
    /// Values that are references or `@Map` expressions (see
    /// [`crate::is_dynamic`]) are only known at run time and are skipped.
    /// Called only when the parameters' shape is valid. The default checks
    /// nothing.
    fn check_static(&self, _parameters: &Value) -> Vec<ParamError> {
        Vec::new()
    }
}

/// A backend for runners that cannot generate images: every request fails
/// with a message saying so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoImageBackend;

impl ImageBackend for NoImageBackend {
    fn available(&self) -> Result<(), String> {
        Err(
            "this runner has no image backend: ImageGenerator steps need the easel server or \
             the CLI's local engine"
                .to_string(),
        )
    }

    fn generate(
        &self,
        _request: Value,
        _ctx: &StepContext<'_>,
    ) -> Result<ImageJobResult, StepError> {
        Err(StepError::failed(
            self.available().err().unwrap_or_default(),
        ))
    }
}

/// `ImageGenerator`: parameters are the native generation request; all of
/// its image definitions go to the backend as one job.
///
/// The result is the array of asset records (so `$.results.gen[0].file_url`
/// is the first image's URL), each with the `job_id` of the job that made
/// it; the job id is also on the step's record (`jobId`). When `images`
/// resolves to an empty array (a `@Map` over nothing) and there is no
/// `inferencePackId`, no job is submitted and the result is `[]`.
#[derive(Clone)]
pub struct ImageGenerator {
    backend: Arc<dyn ImageBackend>,
}

impl ImageGenerator {
    /// An `ImageGenerator` on `backend`.
    pub fn new(backend: Arc<dyn ImageBackend>) -> Self {
        Self { backend }
    }
}

impl std::fmt::Debug for ImageGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageGenerator").finish_non_exhaustive()
    }
}

const STRING_FIELDS: [&str; 6] = [
    "prompt",
    "baseModel",
    "trainingId",
    "negativePrompt",
    "scheduler",
    "inferencePackId",
];

fn check_image(item: &Value, path: &ParamPath, errors: &mut Vec<ParamError>) {
    match item {
        Value::Object(map) => {
            if !map.contains_key("prompt") {
                errors.push(ParamError::new(
                    path.key("prompt"),
                    "missing: every image definition has a `prompt`",
                ));
            }
            for key in STRING_FIELDS {
                if let Some(v) = map.get(key) {
                    if !v.is_string() && !is_dynamic(v) {
                        errors.push(ParamError::new(
                            path.key(key),
                            format!("must be a string, not {}", type_name(v)),
                        ));
                    }
                }
            }
        }
        v if is_dynamic(v) => {}
        other => errors.push(ParamError::new(
            path.clone(),
            format!(
                "an image definition is an object with a `prompt`, not {}",
                type_name(other)
            ),
        )),
    }
}

impl Step for ImageGenerator {
    fn validate(&self, parameters: &Value) -> Result<(), Vec<ParamError>> {
        let map = object(parameters).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        for key in [
            "baseModel",
            "trainingId",
            "inferencePackId",
            "negativePrompt",
            "scheduler",
        ] {
            expect_string(map, key, &mut errors);
        }
        let images_path = ParamPath::root().key("images");
        match map.get("images") {
            None if map.contains_key("inferencePackId") => {}
            None => errors.push(ParamError::new(
                images_path,
                "missing: `ImageGenerator` needs `images` (an array of image definitions, \
                 each with a `prompt`) or an `inferencePackId`",
            )),
            Some(Value::Array(items)) if map_pair(items).is_some() => {
                if let Some(template) = items.get(1) {
                    check_image(template, &images_path.index(1), &mut errors);
                }
            }
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = images_path.index(i);
                    match item {
                        Value::Array(inner) if map_pair(inner).is_some() => {
                            if let Some(template) = inner.get(1) {
                                check_image(template, &path.index(1), &mut errors);
                            }
                        }
                        _ => check_image(item, &path, &mut errors),
                    }
                }
            }
            Some(v) if is_dynamic(v) => {}
            Some(other) => errors.push(ParamError::new(
                images_path,
                format!(
                    "must be an array of image definitions, not {}",
                    type_name(other)
                ),
            )),
        }
        if errors.is_empty() {
            errors = self.backend.check_static(parameters);
        }
        finish(errors)
    }

    fn preflight(&self, _parameters: &Value) -> Result<(), String> {
        self.backend.available()
    }

    fn run(&self, parameters: Value, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let map = object(&parameters).map_err(|e| StepError::failed(e.to_string()))?;
        let images_path = ParamPath::root().key("images");
        let count = match map.get("images") {
            None => 0,
            Some(Value::Array(images)) => {
                for (i, image) in images.iter().enumerate() {
                    let path = images_path.index(i);
                    let Value::Object(image) = image else {
                        return Err(StepError::failed(format!(
                            "{path}: an image definition is an object with a `prompt`, not {}",
                            type_name(image)
                        )));
                    };
                    match image.get("prompt") {
                        Some(Value::String(_)) => {}
                        Some(other) => {
                            return Err(StepError::failed(format!(
                                "{}: must be a string, not {}",
                                path.key("prompt"),
                                type_name(other)
                            )))
                        }
                        None => {
                            return Err(StepError::failed(format!(
                                "{}: missing: every image definition has a `prompt`",
                                path.key("prompt")
                            )))
                        }
                    }
                }
                images.len()
            }
            Some(other) => {
                return Err(StepError::failed(format!(
                    "{images_path}: must be an array of image definitions, not {}",
                    type_name(other)
                )))
            }
        };
        if count == 0 && !map.contains_key("inferencePackId") {
            ctx.log("no image definitions (a @Map over an empty array?): no job submitted");
            return Ok(Value::Array(Vec::new()).into());
        }
        if ctx.is_canceled() {
            return Err(StepError::canceled());
        }
        let job = self.backend.generate(parameters, ctx)?;
        let assets = job
            .assets
            .into_iter()
            .map(|asset| {
                let mut value = serde_json::to_value(asset).unwrap_or(Value::Null);
                if let Value::Object(record) = &mut value {
                    record
                        .entry("job_id")
                        .or_insert_with(|| Value::String(job.job_id.clone()));
                }
                value
            })
            .collect();
        Ok(StepOutput {
            result: Value::Array(assets),
            job_id: Some(job.job_id),
        })
    }
}
