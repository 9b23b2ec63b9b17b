//! The engine behind the worker: load a model (kept in an LRU cache within a
//! memory budget), run a batch, hand back RGB8 pixels.
//!
//! The server never sees a tensor: [`DiffusionEngine`] wraps
//! `easel-diffusion` and returns bytes. [`FakeEngine`] draws deterministic
//! patterns from the seed and prompt, for load tests of the service itself.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use easel_diffusion::loader::{resolve_model, ResolveOptions};
use easel_diffusion::noise::PerImageGenerators;
pub use easel_diffusion::pipelines::CancelToken;
use easel_diffusion::pipelines::{
    load_pipeline, GenerationRequest, ImageInput, MaskInput, Pipeline, Progress as EngineProgress,
    RunContext,
};

use crate::config::{Config, EngineKind};
use crate::job::{LoraSpec, ModelSpec};

/// What a loaded model uses when a request leaves a field out.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDefaults {
    /// The pipeline class (`StableDiffusionPipeline`, ...).
    pub pipeline: String,
    /// Native width in pixels.
    pub width: u32,
    /// Native height in pixels.
    pub height: u32,
    /// Default denoising steps.
    pub steps: u32,
    /// Default guidance scale.
    pub guidance_scale: f64,
    /// The model's own scheduler class.
    pub scheduler: String,
}

/// An RGB8 input image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbInput {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

/// An 8-bit mask: 255 repaints, 0 keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskInputBytes {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// `width * height` bytes.
    pub luma: Vec<u8>,
}

/// One engine call: image definitions with the same settings, run as one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    /// One prompt per image definition.
    pub prompts: Vec<String>,
    /// Empty (no negative prompt), or one per prompt.
    pub negative_prompts: Vec<String>,
    /// Images per prompt.
    pub images_per_prompt: usize,
    /// One seed per image, prompt-major.
    pub seeds: Vec<u64>,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// Scheduler name, or the model's.
    pub scheduler: Option<String>,
    /// Init image (image-to-image, inpainting).
    pub image: Option<RgbInput>,
    /// Inpainting mask.
    pub mask: Option<MaskInputBytes>,
    /// Image-to-image strength.
    pub strength: f64,
    /// LoRA adapters.
    pub loras: Vec<LoraSpec>,
}

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
    /// Load `model` (or find it in the cache) and return its defaults.
    ///
    /// # Errors
    /// [`EngineError::ModelLoad`] when it cannot be found or loaded.
    fn prepare(&mut self, model: &ModelSpec) -> Result<ModelDefaults, EngineError>;

    /// Run `batch` on `model` (prepared before), calling `progress(step,
    /// total)` after each denoising step and stopping when `cancel` fires.
    ///
    /// # Errors
    /// [`EngineError::Canceled`], or why the batch could not run.
    fn run(
        &mut self,
        model: &ModelSpec,
        batch: &BatchRequest,
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

/// The engine `config` selects.
pub fn build(config: &Config) -> Box<dyn Engine> {
    match config.engine {
        EngineKind::Diffusion => Box::new(DiffusionEngine::new(config)),
        EngineKind::Fake => Box::new(FakeEngine::new(config.fake_step_ms)),
    }
}

/// A least-recently-used cache of loaded models within a byte budget.
pub struct ModelCache<T> {
    budget: u64,
    /// Most recently used last.
    entries: Vec<(String, T, u64)>,
}

impl<T> ModelCache<T> {
    /// An empty cache holding at most `budget` bytes (estimated).
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            entries: Vec::new(),
        }
    }

    /// The entry for `key`, marked most recently used.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        let pos = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(pos);
        self.entries.push(entry);
        self.entries.last_mut().map(|(_, v, _)| v)
    }

    /// The value under `key`, marked most recently used.
    pub fn get(&mut self, key: &str) -> Option<&T> {
        self.get_mut(key).map(|v| &*v)
    }

    /// Unload least recently used entries until `bytes` more fit the budget
    /// (all of them when it never fits). Returns the keys unloaded.
    pub fn make_room(&mut self, bytes: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while !self.entries.is_empty() && self.used() + bytes > self.budget {
            let (key, _, _) = self.entries.remove(0);
            evicted.push(key);
        }
        evicted
    }

    /// Insert `value` for `key` as most recently used.
    pub fn insert(&mut self, key: String, value: T, bytes: u64) {
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push((key, value, bytes));
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.entries.iter().map(|(_, _, b)| b).sum()
    }

    /// `(key, bytes)`, most recently used first.
    pub fn list(&self) -> Vec<LoadedModel> {
        self.entries
            .iter()
            .rev()
            .map(|(k, _, b)| LoadedModel {
                load: k.clone(),
                bytes: *b,
            })
            .collect()
    }
}

/// The diffusion engine (`easel-diffusion` on the CPU).
pub struct DiffusionEngine {
    options: ResolveOptions,
    cache: ModelCache<Pipeline>,
}

impl DiffusionEngine {
    /// An engine resolving models as `config` says (hub cache, model roots,
    /// offline), with its model-cache budget.
    pub fn new(config: &Config) -> Self {
        Self {
            options: resolve_options(config, config.offline),
            cache: ModelCache::new(config.model_cache_bytes),
        }
    }

    fn pipeline(&mut self, model: &ModelSpec) -> Result<&mut Pipeline, EngineError> {
        if self.cache.get(&model.load).is_none() {
            let started = Instant::now();
            let dir = resolve_model(&model.load, &self.options)
                .map_err(|e| EngineError::ModelLoad(e.to_string()))?;
            let bytes = estimate_model_bytes(dir.path());
            for key in self.cache.make_room(bytes) {
                tracing::info!("model cache: unloaded {key} to fit {bytes} bytes");
            }
            let pipeline = load_pipeline(&dir, &Device::Cpu)
                .map_err(|e| EngineError::ModelLoad(format!("loading {}: {e}", model.reference)))?;
            tracing::info!(
                "loaded {} ({}) in {:.2}s, ~{} MiB",
                model.reference,
                pipeline.class_name(),
                started.elapsed().as_secs_f64(),
                bytes >> 20
            );
            self.cache.insert(model.load.clone(), pipeline, bytes);
        }
        self.cache
            .get_mut(&model.load)
            .ok_or_else(|| EngineError::Failed("model cache lost an entry".into()))
    }
}

/// Resolve options for the server: the configured hub cache, the model
/// roots as registry folders, and downloads only when not `offline`.
pub fn resolve_options(config: &Config, offline: bool) -> ResolveOptions {
    ResolveOptions {
        cache_dir: config.hf_cache.clone(),
        offline,
        model_dirs: config.model_roots(),
        ..ResolveOptions::default()
    }
}

fn engine_error(e: easel_diffusion::Error) -> EngineError {
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
        let pipeline = self.pipeline(model)?;
        let (width, height) = pipeline.default_size();
        Ok(ModelDefaults {
            pipeline: pipeline.class_name().to_string(),
            width: width as u32,
            height: height as u32,
            steps: pipeline.default_steps() as u32,
            guidance_scale: pipeline.default_guidance_scale(),
            scheduler: pipeline.default_scheduler(),
        })
    }

    fn run(
        &mut self,
        model: &ModelSpec,
        batch: &BatchRequest,
        progress: &mut dyn FnMut(u32, u32),
        cancel: &CancelToken,
    ) -> Result<BatchOutput, EngineError> {
        let loras: Vec<easel_diffusion::lora::LoraSpec> = batch
            .loras
            .iter()
            .map(|l| easel_diffusion::lora::LoraSpec::new(&l.path, l.scale))
            .collect();
        // Switching LoRA sets rebuilds the affected components from weights
        // kept in memory (never from disk); an unchanged set is a no-op.
        let pipeline = self.pipeline(model)?;
        pipeline.set_loras(&loras).map_err(engine_error)?;
        let pipeline = &*pipeline;
        let request = GenerationRequest {
            prompts: batch.prompts.clone(),
            negative_prompts: batch.negative_prompts.clone(),
            num_images_per_prompt: batch.images_per_prompt,
            num_inference_steps: batch.steps as usize,
            guidance_scale: batch.guidance_scale,
            width: batch.width as usize,
            height: batch.height as usize,
            scheduler: batch.scheduler.clone(),
            image: batch.image.as_ref().map(|i| ImageInput {
                width: i.width as usize,
                height: i.height as usize,
                rgb: i.rgb.clone(),
            }),
            mask: batch.mask.as_ref().map(|m| MaskInput {
                width: m.width as usize,
                height: m.height as usize,
                luma: m.luma.clone(),
            }),
            strength: batch.strength,
            ..GenerationRequest::default()
        };
        let mut noise = PerImageGenerators::new(&batch.seeds);
        let mut on_progress = |p: EngineProgress| {
            if let EngineProgress::Step { step, total } = p {
                progress(step as u32, total as u32);
            }
        };
        let mut ctx = RunContext {
            noise: &mut noise,
            progress: &mut on_progress,
            cancel: cancel.clone(),
        };
        let output = pipeline
            .run_rgb8(&request, &mut ctx)
            .map_err(engine_error)?;
        Ok(BatchOutput {
            images: output.images,
            scheduler: output.scheduler,
            sigma_schedule: output.sigma_schedule,
            warnings: output.warnings,
        })
    }

    fn loaded(&self) -> Vec<LoadedModel> {
        self.cache.list()
    }
}

/// Estimated memory of a loaded model: the sizes of its `.safetensors`
/// files, doubled for half-precision files (the CPU upcasts to f32).
pub fn estimate_model_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: usize, total: &mut u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && depth < 2 {
                walk(&path, depth + 1, total);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                *total += size * upcast_factor(&path);
            }
        }
    }
    let mut total = 0;
    walk(dir, 0, &mut total);
    total
}

/// 2 when the first tensor of a safetensors file is 16-bit, else 1.
fn upcast_factor(path: &Path) -> u64 {
    use std::io::Read;
    let read = || -> Option<u64> {
        let mut f = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len).min(100 << 20) as usize;
        let mut header = vec![0u8; n];
        f.read_exact(&mut header).ok()?;
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).ok()?;
        let dtype = map
            .iter()
            .find(|(k, _)| *k != "__metadata__")
            .and_then(|(_, v)| v.get("dtype")?.as_str().map(str::to_string))?;
        Some(if matches!(dtype.as_str(), "F16" | "BF16") {
            2
        } else {
            1
        })
    };
    read().unwrap_or(1)
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
    fn prepare(&mut self, model: &ModelSpec) -> Result<ModelDefaults, EngineError> {
        if model.load.contains("missing") {
            return Err(EngineError::ModelLoad(format!(
                "model `{}` not found",
                model.reference
            )));
        }
        self.loaded.retain(|m| *m != model.load);
        self.loaded.insert(0, model.load.clone());
        Ok(ModelDefaults {
            pipeline: FAKE_PIPELINE.into(),
            width: 64,
            height: 64,
            steps: 4,
            guidance_scale: 7.5,
            scheduler: "FakeScheduler".into(),
        })
    }

    fn run(
        &mut self,
        _model: &ModelSpec,
        batch: &BatchRequest,
        progress: &mut dyn FnMut(u32, u32),
        cancel: &CancelToken,
    ) -> Result<BatchOutput, EngineError> {
        for step in 1..=batch.steps {
            if cancel.is_canceled() {
                return Err(EngineError::Canceled);
            }
            std::thread::sleep(self.step);
            progress(step, batch.steps);
        }
        let (w, h) = (batch.width as usize, batch.height as usize);
        let mut images = Vec::new();
        for (i, seed) in batch.seeds.iter().enumerate() {
            let prompt = &batch.prompts[i / batch.images_per_prompt.max(1)];
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
            if let Some(init) = &batch.image {
                if init.width == batch.width && init.height == batch.height {
                    let s = batch.strength;
                    for (o, i) in rgb.iter_mut().zip(&init.rgb) {
                        *o = (f64::from(*o) * s + f64::from(*i) * (1.0 - s)).round() as u8;
                    }
                }
            }
            images.push(rgb);
        }
        let mut warnings = Vec::new();
        if !batch.loras.is_empty() {
            warnings.push("fake engine: LoRA adapters are not applied".to_string());
        }
        Ok(BatchOutput {
            images,
            scheduler: batch
                .scheduler
                .clone()
                .unwrap_or_else(|| "FakeScheduler".into()),
            sigma_schedule: None,
            warnings,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_cache_evicts_least_recently_used_within_budget() {
        let mut cache = ModelCache::new(100);
        cache.insert("a".into(), 1, 40);
        cache.insert("b".into(), 2, 40);
        assert_eq!(cache.get("a"), Some(&1));
        // c needs 40: b (least recently used) goes, a stays.
        assert_eq!(cache.make_room(40), ["b"]);
        cache.insert("c".into(), 3, 40);
        let keys: Vec<String> = cache.list().into_iter().map(|m| m.load).collect();
        assert_eq!(keys, ["c", "a"]);
        // Something larger than the budget empties the cache.
        assert_eq!(cache.make_room(500), ["a", "c"]);
        assert_eq!(cache.used(), 0);
    }
}
