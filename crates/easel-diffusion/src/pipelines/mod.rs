//! Pipelines: the numbered stages that turn a request into images.
//!
//! The stages: (1) encode the prompt, (2) prepare the timesteps, (3) prepare
//! the latents, (4) denoise, (5) decode, (6) post-process. They mirror
//! diffusers' `StableDiffusionPipeline.__call__` and
//! `StableDiffusionXLPipeline.__call__`; the denoising loop ([`denoise`]) is
//! shared by every pipeline.
//!
//! A pipeline is chosen from `model_index.json`'s `_class_name` by
//! [`load_pipeline`]; the caller (CLI, server worker) gives it a
//! [`GenerationRequest`] and a [`RunContext`] carrying the job's noise source,
//! progress callback and cancel token.

pub mod stable_diffusion;
pub mod stable_diffusion_xl;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::loader::ModelDir;
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::weights::{RandomSource, SafetensorsSource, TensorSource, Weights};
use crate::noise::NoiseSource;
use crate::schedulers::{build_scheduler, Scheduler, TimestepsRequest};
use crate::tokenizer::ClipTokenizer;

/// An 8-bit RGB image handed to the engine (decoded by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}

/// An 8-bit single-channel mask: 255 (white) repaints, 0 (black) keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskInput {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` bytes, row-major.
    pub luma: Vec<u8>,
}

/// The default image-to-image strength (the share of the schedule re-run).
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// What to generate, already validated and resolved against the model's
/// defaults (the request schema and its ranges live in `easel-core`).
/// `Default` gives one empty prompt, 25 steps, guidance 7.5, 512², no
/// init image; callers set what they need with struct-update syntax.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// One prompt per image definition (diffusers' `prompt` list).
    pub prompts: Vec<String>,
    /// Negative prompts: none, one for all prompts, or one per prompt.
    pub negative_prompts: Vec<String>,
    /// Images per prompt (`num_images_per_prompt`).
    pub num_images_per_prompt: usize,
    /// Denoising steps (1..=60 through the public surfaces).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; guidance runs when it is above 1.
    pub guidance_scale: f64,
    /// Image width in pixels (a multiple of the VAE scale factor).
    pub width: usize,
    /// Image height in pixels (a multiple of the VAE scale factor).
    pub height: usize,
    /// Scheduler name (any alias of `schedulers::scheduler_names`), or the
    /// model's own scheduler when `None`.
    pub scheduler: Option<String>,
    /// Image-to-image / inpainting: the init image.
    pub image: Option<ImageInput>,
    /// Inpainting: the mask (white repaints), resized to the image.
    pub mask: Option<MaskInput>,
    /// Image-to-image: how much of the init image is replaced, 0..=1.
    pub strength: f64,
    /// FLUX: the T5 prompt length in tokens (default per model).
    pub max_sequence_length: Option<usize>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative_prompts: Vec::new(),
            num_images_per_prompt: 1,
            num_inference_steps: 25,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            scheduler: None,
            image: None,
            mask: None,
            strength: DEFAULT_STRENGTH,
            max_sequence_length: None,
        }
    }
}

impl GenerationRequest {
    /// Total images: prompts × images per prompt.
    pub fn batch_size(&self) -> usize {
        self.prompts.len() * self.num_images_per_prompt
    }

    /// Whether classifier-free guidance runs (two UNet passes per step).
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The negative prompt for prompt `i`, if any was given.
    fn negative_for(&self, i: usize) -> Option<&str> {
        match self.negative_prompts.len() {
            0 => None,
            1 => Some(self.negative_prompts[0].as_str()),
            _ => self.negative_prompts.get(i).map(String::as_str),
        }
    }

    fn check(&self, vae_scale_factor: usize) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(Error::invalid("prompt", "at least one prompt is required"));
        }
        if self.negative_prompts.len() > 1 && self.negative_prompts.len() != self.prompts.len() {
            return Err(Error::invalid(
                "negative_prompt",
                format!(
                    "{} negative prompts for {} prompts (give one, or one per prompt)",
                    self.negative_prompts.len(),
                    self.prompts.len()
                ),
            ));
        }
        if self.num_images_per_prompt == 0 {
            return Err(Error::invalid(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        if self.num_inference_steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::invalid("guidance_scale", "must be a finite number"));
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % vae_scale_factor != 0 {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{field} has to be a positive multiple of {vae_scale_factor} but is {v}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A progress report from a running pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The prompt has been encoded.
    PromptEncoded,
    /// Denoising step `step` (1-based) of `total` finished.
    Step { step: usize, total: usize },
    /// The latents have been decoded to images.
    Decoded,
}

/// A cancel token: cheap to clone, checked before every denoising step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not canceled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the job to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<()> {
        if self.is_canceled() {
            Err(Error::Canceled)
        } else {
            Ok(())
        }
    }
}

/// Per-run inputs that are not part of the request: where the randomness
/// comes from, who hears about progress, and how to cancel.
pub struct RunContext<'a> {
    /// Gaussian draws in pipeline order (initial latents first).
    pub noise: &'a mut dyn NoiseSource,
    /// Called after each stage and each denoising step.
    pub progress: &'a mut dyn FnMut(Progress),
    /// Checked before every denoising step.
    pub cancel: CancelToken,
}

/// Wall-clock time spent in each stage of a run.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    /// Stage 1: tokenizing and running the text encoder(s).
    pub text_encoding: Duration,
    /// Stage 4: the whole denoising loop.
    pub denoising: Duration,
    /// Each denoising step (model calls + scheduler step).
    pub steps: Vec<Duration>,
    /// Each denoiser call (one per step; a guided step's call runs the
    /// doubled batch).
    pub model_calls: Vec<Duration>,
    /// Floating-point operations of all denoiser calls (multiply-adds count
    /// two), from the layers' own counts (see `models::layers::flops`).
    pub model_flops: u64,
    /// Stage 5: VAE decode.
    pub vae_decode: Duration,
    /// The whole run.
    pub total: Duration,
}

/// What a run produces.
pub struct GenerationOutput {
    /// `(batch, height, width, 3)` float32 in [0, 1], before 8-bit quantisation.
    pub images: Tensor,
    /// `(batch, latent_channels, h, w)`: what was passed to `vae.decode`
    /// (already divided by the scaling factor).
    pub latents_to_vae: Tensor,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Per-stage timings.
    pub timings: StageTimings,
    /// Things the user should know (a prompt truncated to the encoder's
    /// 77 tokens, as diffusers warns).
    pub warnings: Vec<String>,
}

/// Tokenize `text` for a CLIP encoder (padded to its maximum length),
/// noting in `warnings` when it was truncated, as diffusers warns.
pub fn tokenize_clip(
    tokenizer: &ClipTokenizer,
    text: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<u32>> {
    let t = tokenizer.encode_detailed(text)?;
    if let Some(cut) = &t.truncated_text {
        let w = format!(
            "prompt truncated to {} tokens; this part was dropped: \"{cut}\"",
            tokenizer.max_length()
        );
        if !warnings.contains(&w) {
            warnings.push(w);
        }
    }
    Ok(t.ids)
}

/// Stage 4, shared by all pipelines: run the scheduler's timesteps, calling
/// `model(latent_model_input, t)` once per timestep on the (for guidance,
/// doubled: `[uncond, cond]`) batch and combining
/// `uncond + guidance_scale · (cond − uncond)` as diffusers does.
pub fn denoise(
    scheduler: &mut dyn Scheduler,
    mut latents: Tensor,
    guidance_scale: Option<f64>,
    mut model: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    ctx: &mut RunContext<'_>,
    timings: &mut StageTimings,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        ctx.cancel.check()?;
        let start = Instant::now();
        let input = match guidance_scale {
            Some(_) => Tensor::cat(&[&latents, &latents], 0)?,
            None => latents.clone(),
        };
        let input = scheduler.scale_model_input(&input, t)?;
        let call = Instant::now();
        let flops_before = crate::models::layers::flops();
        let noise_pred = model(&input, t)?;
        timings.model_flops += crate::models::layers::flops() - flops_before;
        timings.model_calls.push(call.elapsed());
        let noise_pred = match guidance_scale {
            Some(g) => {
                let b = latents.dim(0)?;
                let uncond = noise_pred.narrow(0, 0, b)?;
                let cond = noise_pred.narrow(0, b, b)?;
                (&uncond + ((cond - &uncond)? * g)?)?
            }
            None => noise_pred,
        };
        latents = scheduler.step(&noise_pred, t, &latents, ctx.noise)?;
        timings.steps.push(start.elapsed());
        (ctx.progress)(Progress::Step { step: i + 1, total });
    }
    Ok(latents)
}

/// Stage 2: the scheduler for a request, built from the model's scheduler
/// config (with the requested class, as `from_config` does) and set to the
/// request's step count.
pub fn prepare_scheduler(
    scheduler_config: &serde_json::Value,
    name: Option<&str>,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let mut scheduler = build_scheduler(name, scheduler_config)?;
    scheduler.set_timesteps(&TimestepsRequest::steps(num_inference_steps))?;
    Ok(scheduler)
}

/// Stages 5 and 6: decode `latents_to_vae` and map `[-1, 1]` to `[0, 1]`
/// (`image / 2 + 0.5`, clamped), returning `(batch, H, W, 3)` float32.
pub fn decode_to_images(vae: &AutoencoderKL, latents_to_vae: &Tensor) -> Result<Tensor> {
    let decoded = vae.decode(latents_to_vae)?;
    let images = ((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(images.permute((0, 2, 3, 1))?.contiguous()?)
}

/// Repeat each row of `x` `n` times, consecutively (`[a, a, b, b]`), as
/// diffusers' `repeat(1, n, 1).view(bs * n, ...)`.
pub fn repeat_interleave_batch(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let rows = (0..x.dim(0)?)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .map(|i| x.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Open a component's weights (its safetensors files, or synthesised f16
/// weights for a [`ModelDir::with_random_weights`] model) as f32 on `device`.
pub fn component_weights(model: &ModelDir, component: &str, device: &Device) -> Result<Weights> {
    let source: Arc<dyn TensorSource> = if model.random_weights() {
        Arc::new(RandomSource::new(DType::F16))
    } else {
        Arc::new(SafetensorsSource::open(&model.weight_files(component)?)?)
    };
    Ok(Weights::new(source, component, DType::F32, device))
}

/// Load the VAE (`with_encoder` for image-to-image) and its config.
pub fn load_vae(model: &ModelDir, device: &Device, with_encoder: bool) -> Result<AutoencoderKL> {
    let config: AutoencoderKLConfig =
        crate::models::read_config(&model.component_dir("vae")?.join("config.json"))?;
    AutoencoderKL::load(
        &component_weights(model, "vae", device)?,
        &config,
        with_encoder,
    )
}

/// A loaded pipeline of any supported class.
pub enum Pipeline {
    /// `StableDiffusionPipeline` (SD 1.x / 2.x).
    StableDiffusion(Box<stable_diffusion::StableDiffusionPipeline>),
    /// `StableDiffusionXLPipeline`.
    StableDiffusionXL(Box<stable_diffusion_xl::StableDiffusionXLPipeline>),
}

/// The pipeline classes [`load_pipeline`] accepts.
pub const SUPPORTED_PIPELINES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionXLPipeline"];

impl Pipeline {
    /// Run a request.
    pub fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput> {
        match self {
            Pipeline::StableDiffusion(p) => p.run(request, ctx),
            Pipeline::StableDiffusionXL(p) => p.run(request, ctx),
        }
    }

    /// The diffusers pipeline class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Pipeline::StableDiffusion(_) => "StableDiffusionPipeline",
            Pipeline::StableDiffusionXL(_) => "StableDiffusionXLPipeline",
        }
    }

    /// The model's native `(width, height)` in pixels: UNet `sample_size`
    /// times the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        match self {
            Pipeline::StableDiffusion(p) => p.default_size(),
            Pipeline::StableDiffusionXL(p) => p.default_size(),
        }
    }

    /// The denoiser's name in reports (`UNet`, or `transformer` for FLUX).
    pub fn denoiser_name(&self) -> &'static str {
        "UNet"
    }

    /// The default number of denoising steps for this model family (25 for
    /// Stable Diffusion).
    pub fn default_steps(&self) -> usize {
        25
    }

    /// The default guidance scale for this model family (7.5 for Stable Diffusion).
    pub fn default_guidance_scale(&self) -> f64 {
        7.5
    }

    /// The VAE scale factor (width and height must be multiples of it).
    pub fn vae_scale_factor(&self) -> usize {
        match self {
            Pipeline::StableDiffusion(p) => p.vae_scale_factor(),
            Pipeline::StableDiffusionXL(p) => p.vae_scale_factor(),
        }
    }

    /// The model's own scheduler class (`_class_name` of its scheduler config).
    pub fn default_scheduler(&self) -> String {
        let cfg = match self {
            Pipeline::StableDiffusion(p) => &p.scheduler_config,
            Pipeline::StableDiffusionXL(p) => &p.scheduler_config,
        };
        cfg.get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
            .to_string()
    }
}

/// Load the pipeline `model_index.json` names, on `device`.
///
/// Errors: an unsupported `_class_name` (naming the supported ones), a
/// missing component, or weights that don't fit the configs.
pub fn load_pipeline(model: &ModelDir, device: &Device) -> Result<Pipeline> {
    match model.pipeline_class() {
        "StableDiffusionPipeline" => Ok(Pipeline::StableDiffusion(Box::new(
            stable_diffusion::StableDiffusionPipeline::load(model, device)?,
        ))),
        "StableDiffusionXLPipeline" => Ok(Pipeline::StableDiffusionXL(Box::new(
            stable_diffusion_xl::StableDiffusionXLPipeline::load(model, device)?,
        ))),
        other => Err(Error::config(
            "model_index.json",
            format!(
                "pipeline `{other}` is not supported yet (supported: {})",
                SUPPORTED_PIPELINES.join(", ")
            ),
        )),
    }
}
