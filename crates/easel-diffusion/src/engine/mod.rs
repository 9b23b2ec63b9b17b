//! The engine's front door: every caller (the CLI's `generate`, `bench` and
//! `flow run`, the server's worker) generates through an [`Engine`].
//!
//! An [`Engine`] resolves a model reference ([`crate::loader::resolve_model`]),
//! loads it through its own cache ([`cache::ModelCache`]: least recently used
//! first out, within a memory budget spent by
//! [`memory::estimate_model_bytes`]), merges the job's LoRA adapters, runs a
//! fully resolved [`Job`] with progress and cancel, and returns 8-bit RGB
//! images with the parameters that ran ([`JobOutput`]). [`JobRequest::build`]
//! is the one builder that turns a validated request (easel-core's
//! `GenerationParams` plus decoded inputs) into a [`Job`], against the
//! loaded model's [`ModelDefaults`].

pub mod cache;
pub mod job;
pub mod memory;
pub mod precision;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

pub use crate::pipelines::TaskKind;
pub use cache::{CachedModel, ModelCache};
pub use job::{init_image_size, Job, JobOutput, JobRequest, ResolvedLora, ResolvedParams};
pub use memory::estimate_model_bytes;
pub use precision::{compute_precision, ComputePrecision};

use crate::device::Offload;
use crate::error::{Error, Result};
use crate::loader::{
    resolve_model, ComponentFiles, ComponentOverrides, ModelDir, ModelFamily, ResolveOptions,
};
use crate::models::quantize::Quantization;
use crate::models::vae_tiling::VaeTiling;
use crate::noise::PerImageGenerators;
use crate::output::images_to_rgb8;
use crate::pipelines::{
    load_pipeline, CancelToken, DiffusionPipeline, GenerationRequest, Pipeline, Progress,
    RunContext,
};

/// How an [`Engine`] finds and keeps models.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where model references resolve (hub cache, model roots, offline).
    pub resolve: ResolveOptions,
    /// The model cache's budget in bytes (estimated as
    /// [`estimate_model_bytes`]); the least recently used models are
    /// unloaded to fit a new one, and a model larger than the budget still
    /// loads, alone. `u64::MAX`: never unload.
    pub cache_budget_bytes: u64,
    /// Synthesise every weight instead of reading weight files
    /// (`easel bench --random-weights`).
    pub random_weights: bool,
    /// Quantize each model's large components as they load
    /// (`--quantize`), unless its reference set one
    /// ([`ModelDir::with_quantization`]).
    pub quantization: Option<Quantization>,
    /// Load FLUX's T5 encoder per prompt encoding and free it after
    /// (`--offload-t5`; [`ModelDir::with_offloaded_t5`]).
    pub offload_t5: bool,
    /// Where the models compute: `Device::Cpu` (default) or a CUDA device
    /// (`--device`). Noise
    /// is always drawn on the CPU and moved here, as diffusers does with a
    /// CPU generator.
    pub device: Device,
    /// Honour `fp16` / `bf16` requests exactly on any CPU (`easel bench
    /// --precision`): layers without bf16 kernels widen their
    /// half-precision input, compute in f32 and round their output, the
    /// numbers of a half-precision run without its speed. Default false:
    /// `bf16` (and `fp16`, as bf16) computes bf16 where the CPU has
    /// AVX512-BF16 and f32 elsewhere, the job's warnings saying what ran
    /// ([`precision::compute_precision`]).
    pub half_precision_on_cpu: bool,
    /// When the VAE decode is tiled (`--vae-tiling`): a job's request that
    /// leaves it at [`VaeTiling::Auto`] runs with this one; a request that
    /// says `on` or `off` keeps its own.
    pub vae_tiling: VaeTiling,
    /// Where the models' weights live between uses (`--offload
    /// none|model|sequential`, diffusers' CPU offload modes; see
    /// [`crate::pipelines::offload`]). Default `none`.
    pub offload: Offload,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            resolve: ResolveOptions::default(),
            cache_budget_bytes: u64::MAX,
            random_weights: false,
            quantization: None,
            offload_t5: false,
            device: Device::Cpu,
            half_precision_on_cpu: false,
            vae_tiling: VaeTiling::Auto,
            offload: Offload::None,
        }
    }
}

/// What a loaded model uses when a request leaves a field out, and the
/// facts a request is resolved with.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDefaults {
    /// The pipeline class (`StableDiffusionPipeline`, ...).
    pub pipeline: String,
    /// The model family.
    pub family: ModelFamily,
    /// Native width in pixels.
    pub width: usize,
    /// Native height in pixels.
    pub height: usize,
    /// Default denoising steps.
    pub steps: usize,
    /// Default guidance scale.
    pub guidance_scale: f64,
    /// Default image-to-image strength (the family's).
    pub strength: f64,
    /// The model's own scheduler class.
    pub scheduler: String,
    /// Width and height must be multiples of this (pixels): the VAE scale
    /// factor times the family's latent packing (8; 16 for FLUX).
    pub size_multiple: usize,
}

impl ModelDefaults {
    /// The defaults of a loaded pipeline, as the pipeline answers them
    /// ([`DiffusionPipeline::default_size`], `default_steps`,
    /// `default_guidance_scale`, `size_multiple`, `default_scheduler`) and
    /// its family's default strength
    /// ([`ModelFamily::default_strength`]): one source for each default.
    pub fn of(pipeline: &dyn DiffusionPipeline) -> Self {
        let family = pipeline.family();
        let (width, height) = pipeline.default_size();
        Self {
            pipeline: pipeline.class_name().to_string(),
            family,
            width,
            height,
            steps: pipeline.default_steps(),
            guidance_scale: pipeline.default_guidance_scale(),
            strength: family.default_strength(),
            scheduler: pipeline.default_scheduler(),
            size_multiple: pipeline.size_multiple(),
        }
    }
}

/// A model in the engine's cache.
pub struct LoadedModel {
    dir: ModelDir,
    pipeline: Pipeline,
    defaults: ModelDefaults,
    bytes: u64,
    load_time: Duration,
    dtype: DType,
}

impl LoadedModel {
    /// The dtype it computes in ([`ModelDir::with_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// The resolved model folder.
    pub fn dir(&self) -> &ModelDir {
        &self.dir
    }

    /// The loaded pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Its defaults.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// Estimated bytes its weights hold ([`estimate_model_bytes`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How long resolving and loading took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }
}

/// The engine: a model cache and the way to run jobs on it, on the CPU.
pub struct Engine {
    options: EngineOptions,
    device: Device,
    cache: ModelCache<LoadedModel>,
}

impl Engine {
    /// An engine with an empty cache.
    pub fn new(options: EngineOptions) -> Self {
        Self {
            cache: ModelCache::new(options.cache_budget_bytes),
            device: options.device.clone(),
            options,
        }
    }

    /// Set when the VAE decode is tiled for jobs that leave it to the
    /// engine ([`EngineOptions::vae_tiling`]).
    pub fn set_vae_tiling(&mut self, vae_tiling: VaeTiling) {
        self.options.vae_tiling = vae_tiling;
    }

    /// Set the memory mode of the models loaded from now on
    /// ([`EngineOptions::offload`]); models already loaded keep theirs.
    pub fn set_offload(&mut self, offload: Offload) {
        self.options.offload = offload;
    }

    /// Registers `files` as component files of model `reference` (`--vae
    /// FILE`, ...) and returns the reference that names the model with them
    /// ([`ComponentFiles::model_key`]; `reference` itself when `files` is
    /// empty): resolve, load and build jobs with it. It is its own model
    /// cache entry, so the same model with other files is loaded apart.
    /// The files are opened and checked when it is resolved
    /// ([`crate::loader::open_component_file`]).
    pub fn register_component_files(&mut self, reference: &str, files: ComponentFiles) -> String {
        let overrides = ComponentOverrides {
            model: reference.to_string(),
            files,
            quantization: None,
            offload_t5: false,
        };
        let key = overrides.key();
        if !overrides.files.is_empty() {
            let list = &mut self.options.resolve.component_files;
            list.retain(|o| o.key() != key);
            list.push(overrides);
        }
        key
    }

    /// Resolve `reference` (a local folder, a repo id in the hub cache or
    /// downloaded into it, a registry name, a model with component files
    /// registered by [`Self::register_component_files`] or given in
    /// [`ResolveOptions::component_files`]) without loading it, e.g. to
    /// ask its family before loading.
    ///
    /// # Errors
    /// As [`resolve_model`].
    pub fn resolve(&self, reference: &str) -> Result<ModelDir> {
        resolve_model(reference, &self.options.resolve)
    }

    /// The model `reference` names, from the cache or resolved and loaded
    /// into it (unloading least recently used models to fit the budget).
    ///
    /// # Errors
    /// The model cannot be resolved ([`resolve_model`]) or loaded
    /// ([`load_pipeline`]).
    pub fn load(&mut self, reference: &str) -> Result<&LoadedModel> {
        if !self.cache.contains(reference) {
            let started = Instant::now();
            let dir = self.resolve(reference)?;
            let dtype = self.compute_precision(None, dir.family()).dtype;
            self.insert(reference, dir, started, dtype)?;
        }
        self.cached(reference)
    }

    /// [`Engine::load`] in the precision a job asking for `precision` runs
    /// in ([`Engine::compute_precision`]), so that running such a job loads
    /// nothing more; a model cached in another precision is loaded again.
    ///
    /// # Errors
    /// As [`Engine::load`].
    pub fn load_for(
        &mut self,
        reference: &str,
        precision: Option<easel_core::params::Precision>,
    ) -> Result<&LoadedModel> {
        let family = self.family_of(reference)?;
        let dtype = self.compute_precision(precision, family).dtype;
        self.load_in(reference, dtype)?;
        self.cached(reference)
    }

    /// This engine with [`EngineOptions::half_precision_on_cpu`] set to `on`.
    pub fn with_half_precision_on_cpu(mut self, on: bool) -> Self {
        self.options.half_precision_on_cpu = on;
        self
    }

    /// The precision a job asking for `requested` computes in on this
    /// engine's device, for a model of `family`
    /// ([`precision::compute_precision`]).
    pub fn compute_precision(
        &self,
        requested: Option<easel_core::params::Precision>,
        family: Option<ModelFamily>,
    ) -> ComputePrecision {
        compute_precision(
            &self.device,
            requested,
            family,
            self.options.half_precision_on_cpu,
            crate::models::kernels::bf16_compute_available(),
        )
    }

    /// [`Engine::load`] in `dtype`: a model cached in another dtype is
    /// unloaded and loaded again in this one.
    fn load_in(&mut self, reference: &str, dtype: DType) -> Result<()> {
        let cached = self.cache.get(reference).map(|m| m.dtype);
        match cached {
            Some(d) if d == dtype => Ok(()),
            Some(_) => {
                let dir = self.cached(reference)?.dir.clone();
                self.cache.remove(reference);
                crate::os_memory::release_freed_memory();
                self.insert(reference, dir, Instant::now(), dtype)
            }
            None => {
                let started = Instant::now();
                let dir = self.resolve(reference)?;
                self.insert(reference, dir, started, dtype)
            }
        }
    }

    /// The family of the model `reference` names: the cached model's, or
    /// resolved (not loaded).
    fn family_of(&mut self, reference: &str) -> Result<Option<ModelFamily>> {
        match self.cache.get(reference) {
            Some(m) => Ok(m.dir.family()),
            None => Ok(self.resolve(reference)?.family()),
        }
    }

    /// [`Engine::load`] for a model already resolved with
    /// [`Engine::resolve`], cached under `reference`.
    ///
    /// # Errors
    /// As [`load_pipeline`].
    pub fn load_resolved(&mut self, reference: &str, dir: ModelDir) -> Result<&LoadedModel> {
        if !self.cache.contains(reference) {
            let dtype = self.compute_precision(None, dir.family()).dtype;
            self.insert(reference, dir, Instant::now(), dtype)?;
        }
        self.cached(reference)
    }

    fn cached(&mut self, reference: &str) -> Result<&LoadedModel> {
        self.cache
            .get(reference)
            .ok_or_else(|| Error::invalid("model", "the model cache lost an entry"))
    }

    fn insert(
        &mut self,
        reference: &str,
        dir: ModelDir,
        started: Instant,
        dtype: DType,
    ) -> Result<()> {
        let quantization = dir.quantization().or(self.options.quantization);
        let offload_t5 = self.options.offload_t5 || dir.offloaded_t5();
        let dir = dir
            .with_random_weights(self.options.random_weights)
            .with_quantization(quantization)
            .with_offloaded_t5(offload_t5)
            .with_offload(self.options.offload)
            .with_compute_dtype(dtype);
        let bytes = estimate_model_bytes(&dir);
        for key in self.cache.make_room(bytes) {
            tracing::info!("model cache: unloaded {key} to fit {bytes} bytes");
        }
        let pipeline = load_pipeline(&dir, &self.device)?;
        let load_time = started.elapsed();
        tracing::info!(
            "loaded {reference} ({}) in {:.2}s, ~{} MiB, computing in {} on {:?}",
            pipeline.class_name(),
            load_time.as_secs_f64(),
            bytes >> 20,
            precision::precision_of(dtype),
            self.device,
        );
        let defaults = ModelDefaults::of(pipeline.as_ref());
        self.cache.insert(
            reference.to_string(),
            LoadedModel {
                dir,
                pipeline,
                defaults,
                bytes,
                load_time,
                dtype,
            },
            bytes,
        );
        Ok(())
    }

    /// Whether the model `reference` names is in the cache.
    pub fn is_loaded(&self, reference: &str) -> bool {
        self.cache.contains(reference)
    }

    /// The models in the cache, most recently used first.
    pub fn loaded(&self) -> Vec<CachedModel> {
        self.cache.list()
    }

    /// Run `job`: load its model (see [`Engine::load`]), merge its LoRA
    /// adapters (an unchanged set is a no-op; a switch rebuilds the
    /// affected components from weights in memory), run the pipeline with
    /// one seeded generator per image, calling `progress` after each stage
    /// and step and stopping at the next step once `cancel` fires, and
    /// quantise the images to 8-bit RGB.
    ///
    /// # Errors
    /// [`Error::Canceled`]; the model cannot be loaded; a LoRA that does not
    /// fit the model; a request the pipeline refuses (naming the field).
    pub fn run(
        &mut self,
        job: &Job,
        progress: &mut dyn FnMut(Progress),
        cancel: &CancelToken,
    ) -> Result<JobOutput> {
        let family = self.family_of(&job.model)?;
        let precision = self.compute_precision(job.precision, family);
        self.load_in(&job.model, precision.dtype)?;
        let model = self
            .cache
            .get_mut(&job.model)
            .ok_or_else(|| Error::invalid("model", "the model cache lost an entry"))?;
        model.pipeline.set_loras(&job.loras)?;
        let mut noise = PerImageGenerators::new(&job.seeds);
        let mut ctx = RunContext {
            noise: &mut noise,
            progress,
            cancel: cancel.clone(),
        };
        // The engine's VAE tiling fills a request's `auto`.
        let request = if job.request.vae_tiling == VaeTiling::Auto
            && self.options.vae_tiling != VaeTiling::Auto
        {
            std::borrow::Cow::Owned(GenerationRequest {
                vae_tiling: self.options.vae_tiling,
                ..job.request.clone()
            })
        } else {
            std::borrow::Cow::Borrowed(&job.request)
        };
        let mut output = model.pipeline.run(&request, &mut ctx)?;
        output.warnings.extend(precision.warning);
        if self.options.offload != Offload::None && self.device.is_cpu() {
            output.warnings.push(format!(
                "offload {} on the CPU saves no memory: the weights and the computation share \
                 the same memory (it is for GPUs)",
                self.options.offload
            ));
        }
        let images = images_to_rgb8(&output.images)?;
        let non_finite_latents = non_finite_count(&output.latents_to_vae)?;
        if non_finite_latents > 0 {
            output.warnings.push(format!(
                "{non_finite_latents} of {} values of the final latents are not finite (NaN or \
                 infinity): the denoiser overflowed and the images are not meaningful",
                output.latents_to_vae.elem_count()
            ));
        }
        Ok(JobOutput {
            images,
            params: ResolvedParams {
                pipeline: model.pipeline.class_name().to_string(),
                scheduler: output.scheduler,
                sigma_schedule: output.sigma_schedule,
                seeds: job.seeds.clone(),
                width: job.request.width,
                height: job.request.height,
                steps: job.request.num_inference_steps,
                guidance_scale: job.request.guidance_scale,
                strength: job.request.image.is_some().then_some(job.request.strength),
                task: job.task(),
                loras: job
                    .loras
                    .iter()
                    .map(|l| ResolvedLora {
                        path: l.path.clone(),
                        scale: l.scale,
                    })
                    .collect(),
                tiling: job.request.tiling,
                compute_precision: precision::precision_of(precision.dtype),
                warnings: output.warnings,
            },
            timings: output.timings,
            non_finite_latents,
        })
    }
}

/// How many values of `t` are NaN or ±infinity (any float dtype; read as
/// f32).
///
/// Errors: `t` cannot be read as f32 values.
pub fn non_finite_count(t: &Tensor) -> Result<usize> {
    let values = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(values.iter().filter(|v| !v.is_finite()).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_core::GenerationParams;

    fn fixture(name: &str) -> String {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
            .display()
            .to_string()
    }

    #[test]
    fn non_finite_values_are_counted() {
        let t = Tensor::new(
            &[1f32, f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(non_finite_count(&t).unwrap(), 3);
        let t = t.to_dtype(candle_core::DType::F16).unwrap();
        assert_eq!(non_finite_count(&t).unwrap(), 3);
        let finite = Tensor::zeros((2, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(non_finite_count(&finite).unwrap(), 0);
    }

    #[test]
    fn runs_a_resolved_job_and_reports_what_ran() {
        let mut engine = Engine::new(EngineOptions::default());
        let sd15 = fixture("tiny-sd15");
        let defaults = engine.load(&sd15).unwrap().defaults().clone();
        assert_eq!(defaults.family, ModelFamily::StableDiffusion);
        assert_eq!((defaults.steps, defaults.guidance_scale), (25, 7.5));
        let job = JobRequest::new(
            sd15.clone(),
            GenerationParams {
                steps: Some(2),
                width: Some(32),
                height: Some(16),
                seed: Some(4),
                batch_size: Some(2),
                scheduler: Some("euler".into()),
                ..GenerationParams::new("a red house")
            },
        )
        .build(&defaults)
        .unwrap();
        let mut steps = Vec::new();
        let out = engine
            .run(
                &job,
                &mut |p| {
                    if let Progress::Step { step, total } = p {
                        steps.push((step, total));
                    }
                },
                &CancelToken::new(),
            )
            .unwrap();
        assert_eq!(steps, [(1, 2), (2, 2)]);
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.non_finite_latents, 0);
        assert!(out.images.iter().all(|i| i.len() == 32 * 16 * 3));
        assert_ne!(out.images[0], out.images[1], "each image has its own seed");
        let p = &out.params;
        assert_eq!(p.seeds, [4, 5]);
        assert_eq!((p.width, p.height, p.steps), (32, 16, 2));
        assert_eq!(p.scheduler, "EulerDiscreteScheduler");
        assert_eq!(p.pipeline, "StableDiffusionPipeline");
        assert_eq!(p.task, TaskKind::TextToImage);

        // A canceled token stops the job before any step.
        let canceled = CancelToken::new();
        canceled.cancel();
        assert!(matches!(
            engine.run(&job, &mut |_| {}, &canceled),
            Err(Error::Canceled)
        ));
    }

    #[test]
    fn the_cache_unloads_the_least_recently_used_model_to_fit_its_budget() {
        let (sd15, sd2) = (fixture("tiny-sd15"), fixture("tiny-sd2-v"));
        let one = estimate_model_bytes(&ModelDir::open(&sd15).unwrap());
        assert!(one > 0);
        // Room for one of the two (they are the same size to within 1 %).
        let mut engine = Engine::new(EngineOptions {
            cache_budget_bytes: one + one / 2,
            ..EngineOptions::default()
        });
        engine.load(&sd15).unwrap();
        assert!(engine.is_loaded(&sd15));
        engine.load(&sd2).unwrap();
        let keys: Vec<String> = engine.loaded().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, [sd2.clone()]);
        assert!(engine.loaded()[0].bytes > 0);
        // A reference that resolves to nothing is an error, not a panic.
        assert!(engine.load("/no/such/model").is_err());
    }
}
