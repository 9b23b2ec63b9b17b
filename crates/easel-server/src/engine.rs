//! The engine behind the worker: load a model, run a batch, hand back RGB8
//! pixels.
//!
//! The server never sees a tensor: [`DiffusionEngine`] is a thin adapter over
//! `easel-diffusion`'s front door ([`easel_diffusion::engine::Engine`], which
//! owns the model cache with its memory budget) and returns bytes. The worker
//! hands every engine the front door's own [`Job`], built by
//! [`easel_diffusion::engine::JobRequest::build`] against the model's
//! [`ModelDefaults`] (what [`Engine::prepare`] returns).
//! [`FakeEngine`] draws deterministic patterns from the seed and prompt, for
//! load tests of the service itself.

use std::time::Duration;

use easel_diffusion::engine::{Engine as FrontDoor, EngineOptions};
pub use easel_diffusion::engine::{Job, ModelDefaults};
use easel_diffusion::loader::{ModelFamily, ResolveOptions};
pub use easel_diffusion::pipelines::CancelToken;
use easel_diffusion::pipelines::Progress as EngineProgress;

use crate::config::{Config, ConfigError, EngineKind};
use crate::job::ModelSpec;

/// What a batch produced.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// One RGB8 buffer per image, in seed order.
    pub images: Vec<Vec<u8>>,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Its σ ramp when not the class default (`karras`, `exponential`).
    pub sigma_schedule: Option<String>,
    /// Things the user should know.
    pub warnings: Vec<String>,
    /// The precision the models computed in (what ran).
    pub compute_precision: easel_core::params::Precision,
}

/// Why the engine could not run a batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The cancel token fired.
    #[error("canceled")]
    Canceled,
    /// The model could not be found or loaded.
    #[error("{0}")]
    ModelLoad(String),
    /// A request value the model cannot take (`field` is the engine's name).
    #[error("{field}: {message}")]
    Invalid {
        /// The engine's field name (`scheduler`, `image`, `width`, ...).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A feature this engine build or this pipeline does not support.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// A model in the cache, for `GET /v1/models` and the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadedModel {
    /// What was loaded (`ModelSpec::load`).
    pub load: String,
    /// Estimated memory, bytes.
    pub bytes: u64,
}

/// What an engine can do, known before any model loads (checked when a job
/// is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// LoRA adapters (`trainingId`, `loras[]`).
    pub lora: bool,
}

/// An engine the worker drives. Runs on the worker's own thread.
pub trait Engine: Send {
    /// Load `model` (or find it in the cache) and return its defaults, the
    /// ones the worker builds its jobs against.
    ///
    /// # Errors
    /// [`EngineError::ModelLoad`] when it cannot be found or loaded.
    fn prepare(&mut self, model: &ModelSpec) -> Result<ModelDefaults, EngineError>;

    /// Run `job` (its model, `job.model`, prepared before), calling
    /// `progress(step, total)` after each denoising step and stopping when
    /// `cancel` fires.
    ///
    /// # Errors
    /// [`EngineError::Canceled`], or why the job could not run.
    fn run(
        &mut self,
        job: &Job,
        progress: &mut dyn FnMut(u32, u32),
        cancel: &CancelToken,
    ) -> Result<BatchOutput, EngineError>;

    /// The models in the cache, most recently used first.
    fn loaded(&self) -> Vec<LoadedModel>;
}

/// The capabilities of the engine `config` selects.
pub fn capabilities(config: &Config) -> Capabilities {
    match config.engine {
        // LoRAs merge into the cached pipeline (Pipeline::set_loras), SD and
        // FLUX alike; a LoRA that does not fit the model fails the job.
        EngineKind::Diffusion => Capabilities { lora: true },
        EngineKind::Fake => Capabilities { lora: true },
    }
}

/// An engine worker to start: its device's name (`cpu`, `cuda:0`, for
/// logs, `/readyz` and the records) and its engine.
pub struct WorkerEngine {
    /// The device's name.
    pub device: String,
    /// The engine, built for that device.
    pub engine: Box<dyn Engine>,
}

/// The engine workers `config` asks for: one per `device` entry, each
/// opened (`auto` becomes `cuda:0` or `cpu`) and given its own engine and
/// model cache. The fake engine computes nowhere: its workers are named by
/// the devices as configured, none is opened.
///
/// # Errors
/// A device that cannot be opened (not compiled in, absent: the message
/// names it and says why), or two entries that open the same device
/// (`auto` and `cpu` on a machine without a GPU).
pub fn build_workers(config: &Config) -> Result<Vec<WorkerEngine>, ConfigError> {
    let many = config.device.len() > 1;
    let mut workers: Vec<WorkerEngine> = Vec::with_capacity(config.device.len());
    for (i, spec) in config.device.iter().enumerate() {
        let worker = match config.engine {
            EngineKind::Fake => WorkerEngine {
                device: spec.to_string(),
                engine: Box::new(FakeEngine::new(config.fake_step_ms)),
            },
            EngineKind::Diffusion => {
                let device = spec.resolve().map_err(|e| {
                    let message = e.to_string();
                    ConfigError(match message.strip_prefix("device: ") {
                        Some(rest) if many => format!("device[{i}]: {rest}"),
                        _ => message,
                    })
                })?;
                WorkerEngine {
                    device: easel_diffusion::device::device_name(&device),
                    engine: Box::new(DiffusionEngine::new(config, device)),
                }
            }
        };
        if let Some(j) = workers.iter().position(|w| w.device == worker.device) {
            return Err(ConfigError(format!(
                "device: `{}` and `{spec}` both open {}; list each device once",
                config.device[j], worker.device
            )));
        }
        tracing::info!("engine worker {i}: {}", worker.device);
        workers.push(worker);
    }
    Ok(workers)
}

/// The diffusion engine (`easel-diffusion`, on one device): an adapter
/// from the worker's [`Engine`] calls to the engine's front door.
pub struct DiffusionEngine {
    engine: FrontDoor,
}

impl DiffusionEngine {
    /// An engine resolving models as `config` says (hub cache, model roots,
    /// offline), with its own model cache of `model_cache_bytes`, computing
    /// on `device`.
    pub fn new(config: &Config, device: easel_diffusion::device::Device) -> Self {
        Self {
            engine: FrontDoor::new(EngineOptions {
                resolve: resolve_options(config, config.offline),
                cache_budget_bytes: config.model_cache_bytes,
                device,
                offload: config.offload,
                ..EngineOptions::default()
            }),
        }
    }

    /// Load the model `load` names (`ModelSpec::load`, the cache key)
    /// into the front door's cache (a no-op when it is there): a reference
    /// that does not resolve, or a model that does not load, is
    /// [`EngineError::ModelLoad`], naming `reference` (as requested).
    fn load(
        &mut self,
        load: &str,
        reference: &str,
    ) -> Result<&easel_diffusion::engine::LoadedModel, EngineError> {
        if !self.engine.is_loaded(load) {
            let dir = self
                .engine
                .resolve(load)
                .map_err(|e| EngineError::ModelLoad(e.to_string()))?;
            self.engine
                .load_resolved(load, dir)
                .map_err(|e| EngineError::ModelLoad(format!("loading {reference}: {e}")))?;
        }
        self.engine
            .load(load)
            .map_err(|e| EngineError::ModelLoad(format!("loading {reference}: {e}")))
    }
}

/// Resolve options for the server: the configured hub cache, the model
/// roots as registry folders, downloads only when not `offline`, the
/// `config` / `prediction_type` of registry entries for single files, and
/// their component files (`vae`, ...) under the keys the registry gives
/// their models ([`Config::entry_overrides`]).
pub fn resolve_options(config: &Config, offline: bool) -> ResolveOptions {
    ResolveOptions {
        cache_dir: config.hf_cache.clone(),
        offline,
        model_dirs: config.model_roots(),
        single_files: config.single_file_settings(),
        component_files: config.component_overrides(),
        ..ResolveOptions::default()
    }
}

/// The worker's error for an engine error: cancellation, a field the
/// request got wrong (named), an unsupported feature, or a failure.
pub fn engine_error(e: easel_diffusion::Error) -> EngineError {
    use easel_diffusion::Error as E;
    match e {
        E::Canceled => EngineError::Canceled,
        E::InvalidArgument { field, message } if message.contains("not supported") => {
            EngineError::Unsupported(format!("{field}: {message}"))
        }
        E::InvalidArgument { field, message } => EngineError::Invalid { field, message },
        E::UnknownScheduler { .. } => EngineError::Invalid {
            field: "scheduler".into(),
            message: e.to_string(),
        },
        E::Config { .. } if e.to_string().contains("scheduler") => EngineError::Invalid {
            field: "scheduler".into(),
            message: e.to_string(),
        },
        other => EngineError::Failed(other.to_string()),
    }
}

impl Engine for DiffusionEngine {
    fn prepare(&mut self, model: &ModelSpec) -> Result<ModelDefaults, EngineError> {
        Ok(self.load(&model.load, &model.reference)?.defaults().clone())
    }

    fn run(
        &mut self,
        job: &Job,
        progress: &mut dyn FnMut(u32, u32),
        cancel: &CancelToken,
    ) -> Result<BatchOutput, EngineError> {
        self.load(&job.model, &job.model)?;
        let mut on_progress = |p: EngineProgress| {
            if let EngineProgress::Step { step, total } = p {
                progress(step as u32, total as u32);
            }
        };
        let output = self
            .engine
            .run(job, &mut on_progress, cancel)
            .map_err(engine_error)?;
        Ok(BatchOutput {
            images: output.images,
            scheduler: output.params.scheduler,
            sigma_schedule: output.params.sigma_schedule,
            warnings: output.params.warnings,
            compute_precision: output.params.compute_precision,
        })
    }

    fn loaded(&self) -> Vec<LoadedModel> {
        self.engine
            .loaded()
            .into_iter()
            .map(|m| LoadedModel {
                load: m.key,
                bytes: m.bytes,
            })
            .collect()
    }
}

/// A stand-in engine that draws a deterministic pattern from each image's
/// seed and prompt, sleeping `step_ms` per step. For load tests of the
/// service (queue, store, API), not of the engine.
pub struct FakeEngine {
    step: Duration,
    loaded: Vec<String>,
}

impl FakeEngine {
    /// A fake engine taking `step_ms` per denoising step.
    pub fn new(step_ms: u64) -> Self {
        Self {
            step: Duration::from_millis(step_ms),
            loaded: Vec::new(),
        }
    }
}

/// The model class the fake engine reports.
pub const FAKE_PIPELINE: &str = "FakePipeline";

impl Engine for FakeEngine {
    /// The fake model's defaults: 64x64, 4 steps, guidance 7.5; the family
    /// the model's `pipelineClass` names (for its default strength and size
    /// multiple), Stable Diffusion when it names none the engine knows (the
    /// fake registry's [`FAKE_PIPELINE`]).
    fn prepare(&mut self, model: &ModelSpec) -> Result<ModelDefaults, EngineError> {
        if model.load.contains("missing") {
            return Err(EngineError::ModelLoad(format!(
                "model `{}` not found",
                model.reference
            )));
        }
        self.loaded.retain(|m| *m != model.load);
        self.loaded.insert(0, model.load.clone());
        let family = model.family().unwrap_or(ModelFamily::StableDiffusion);
        Ok(ModelDefaults {
            pipeline: FAKE_PIPELINE.into(),
            family,
            width: 64,
            height: 64,
            steps: 4,
            guidance_scale: 7.5,
            strength: family.default_strength(),
            scheduler: "FakeScheduler".into(),
            size_multiple: family.size_multiple() as usize,
        })
    }

    fn run(
        &mut self,
        job: &Job,
        progress: &mut dyn FnMut(u32, u32),
        cancel: &CancelToken,
    ) -> Result<BatchOutput, EngineError> {
        let steps = job.request.num_inference_steps as u32;
        for step in 1..=steps {
            if cancel.is_canceled() {
                return Err(EngineError::Canceled);
            }
            std::thread::sleep(self.step);
            progress(step, steps);
        }
        let (w, h) = (job.request.width, job.request.height);
        let mut images = Vec::new();
        for (i, seed) in job.seeds.iter().enumerate() {
            let prompt = &job.request.prompts[i / job.request.num_images_per_prompt.max(1)];
            let key = blake3::hash(format!("{seed}:{prompt}").as_bytes());
            let k = key.as_bytes();
            let mut rgb = vec![0u8; w * h * 3];
            for y in 0..h {
                for x in 0..w {
                    let p = (y * w + x) * 3;
                    rgb[p] = k[0].wrapping_add((x * 255 / w.max(1)) as u8);
                    rgb[p + 1] = k[1].wrapping_add((y * 255 / h.max(1)) as u8);
                    rgb[p + 2] = k[2] ^ ((x + y) as u8);
                }
            }
            if let Some(init) = &job.request.image {
                if init.width == job.request.width && init.height == job.request.height {
                    let s = job.request.strength;
                    for (o, i) in rgb.iter_mut().zip(&init.rgb) {
                        *o = (f64::from(*o) * s + f64::from(*i) * (1.0 - s)).round() as u8;
                    }
                }
            }
            images.push(rgb);
        }
        let mut warnings = Vec::new();
        if !job.loras.is_empty() {
            warnings.push("fake engine: LoRA adapters are not applied".to_string());
        }
        Ok(BatchOutput {
            images,
            scheduler: job
                .request
                .scheduler
                .clone()
                .unwrap_or_else(|| "FakeScheduler".into()),
            sigma_schedule: None,
            warnings,
            compute_precision: easel_core::params::Precision::Fp32,
        })
    }

    fn loaded(&self) -> Vec<LoadedModel> {
        self.loaded
            .iter()
            .map(|m| LoadedModel {
                load: m.clone(),
                bytes: 0,
            })
            .collect()
    }
}
