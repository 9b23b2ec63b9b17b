//! Pipelines: the numbered stages that turn a request into images.
//!
//! The stages: (1) encode the prompt, (2) prepare the timesteps, (3) prepare
//! the latents, (4) denoise, (5) decode, (6) post-process. They mirror
//! diffusers' `StableDiffusionPipeline.__call__`,
//! `StableDiffusionXLPipeline.__call__` and the FLUX pipelines; the
//! classifier-free-guidance denoising loop ([`denoise`]) is shared by the
//! Stable Diffusion pipelines, FLUX (no CFG, extra transformer inputs) runs
//! its own in [`flux`].
//!
//! A pipeline is chosen from `model_index.json`'s `_class_name` by
//! [`load_pipeline`]; the caller (CLI, server worker) gives it a
//! [`GenerationRequest`] and a [`RunContext`] carrying the job's noise source,
//! progress callback and cancel token.

pub mod flux;
pub mod init_image;
pub mod stable_diffusion;
pub mod stable_diffusion_xl;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::loader::{MaskRule, ModelDir, ModelFamily};
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

impl MaskInput {
    /// A mask from RGB8 pixels (`width * height * 3` bytes), converted to
    /// luma as PIL's `convert("L")` does (ITU-R 601-2:
    /// `(19595 R + 38470 G + 7471 B + 32768) >> 16`), so a grayscale file
    /// expanded to RGB keeps its values.
    ///
    /// Errors: a byte count that does not match the size.
    pub fn from_rgb8(width: usize, height: usize, rgb: &[u8]) -> Result<Self> {
        if rgb.len() != width * height * 3 {
            return Err(Error::invalid(
                "mask",
                format!("{} bytes for a {width}x{height} RGB image", rgb.len()),
            ));
        }
        let luma = rgb
            .chunks_exact(3)
            .map(|p| {
                let l = 19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000;
                (l >> 16) as u8
            })
            .collect();
        Ok(Self {
            width,
            height,
            luma,
        })
    }
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
    /// Seamless tiling: circular padding in the UNet and VAE convolutions (A1111's and
    /// stable-diffusion.cpp's `tiling`), so the image repeats without seams.
    pub tiling: bool,
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
            tiling: false,
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
    /// Its σ ramp when not the class default (`karras`, `exponential`).
    pub sigma_schedule: Option<String>,
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
    latents: Tensor,
    guidance_scale: Option<f64>,
    model: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    ctx: &mut RunContext<'_>,
    timings: &mut StageTimings,
) -> Result<Tensor> {
    denoise_from(
        scheduler,
        latents,
        0,
        None,
        guidance_scale,
        model,
        ctx,
        timings,
    )
}

/// [`denoise`] from timestep index `begin` (image-to-image and inpainting
/// skip the first steps), with inpainting's per-step work as diffusers'
/// inpaint pipelines do it:
/// - a 9-channel UNet gets `[latents, mask, masked_image_latents]`
///   concatenated on the channel axis after `scale_model_input`;
/// - for a 4-channel UNet, after every step the kept region is replaced by
///   the init-image latents noised to the next timestep (not noised after
///   the last step): `latents = (1 − mask) · known + mask · latents`.
#[allow(clippy::too_many_arguments)]
pub fn denoise_from(
    scheduler: &mut dyn Scheduler,
    mut latents: Tensor,
    begin: usize,
    inpaint: Option<&init_image::InpaintConditioning>,
    guidance_scale: Option<f64>,
    mut model: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    ctx: &mut RunContext<'_>,
    timings: &mut StageTimings,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().get(begin..).unwrap_or(&[]).to_vec();
    let total = timesteps.len();
    // The 9-channel extra inputs, doubled for guidance like the latents.
    let extra = match inpaint.and_then(|c| c.masked_image_latents.as_ref().map(|m| (&c.mask, m))) {
        Some((mask, masked)) => {
            let x = Tensor::cat(&[mask, masked], 1)?;
            Some(match guidance_scale {
                Some(_) => Tensor::cat(&[&x, &x], 0)?,
                None => x,
            })
        }
        None => None,
    };
    for (i, &t) in timesteps.iter().enumerate() {
        ctx.cancel.check()?;
        let start = Instant::now();
        let input = match guidance_scale {
            Some(_) => Tensor::cat(&[&latents, &latents], 0)?,
            None => latents.clone(),
        };
        let mut input = scheduler.scale_model_input(&input, t)?;
        if let Some(extra) = &extra {
            input = Tensor::cat(&[&input, extra], 1)?;
        }
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
        if let Some((c, (image_latents, noise))) =
            inpaint.and_then(|c| c.known.as_ref().map(|k| (c, k)))
        {
            let known = match timesteps.get(i + 1) {
                Some(&next) => scheduler.add_noise(image_latents, noise, next)?,
                None => image_latents.clone(),
            };
            let keep = (1.0 - &c.mask)?;
            latents = (known.broadcast_mul(&keep)? + latents.broadcast_mul(&c.mask)?)?;
        }
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

/// Open a component's weights in their stored dtype: its safetensors files
/// (memory-mapped), or synthesised f16 weights for a
/// [`ModelDir::with_random_weights`] model.
pub fn component_source(model: &ModelDir, component: &str) -> Result<Arc<dyn TensorSource>> {
    Ok(if model.random_weights() {
        Arc::new(RandomSource::new(DType::F16))
    } else {
        Arc::new(SafetensorsSource::open(&model.weight_files(component)?)?)
    })
}

/// The weights of the components LoRA adapters can target in a model of
/// `family` ([`ModelFamily::lora_components`]), by name, for `LoraState`.
pub(crate) fn lora_sources(
    model: &ModelDir,
    family: ModelFamily,
) -> Result<Vec<(String, Arc<dyn TensorSource>)>> {
    family
        .lora_components()
        .iter()
        .map(|c| Ok((c.to_string(), component_source(model, c)?)))
        .collect()
}

/// Open a component's weights (see [`component_source`]) as f32 on `device`.
pub fn component_weights(model: &ModelDir, component: &str, device: &Device) -> Result<Weights> {
    Ok(Weights::new(
        component_source(model, component)?,
        component,
        DType::F32,
        device,
    ))
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
    /// `FluxPipeline` (FLUX.1 schnell / dev; text-to-image and image-to-image).
    Flux(Box<flux::FluxPipeline>),
    /// `FluxFillPipeline` (FLUX.1 Fill; inpainting).
    FluxFill(Box<flux::FluxFillPipeline>),
}

/// The pipeline classes [`load_pipeline`] accepts (kept with the model
/// families in the loader).
pub use crate::loader::SUPPORTED_PIPELINES;

/// Check, before loading, that a model of `family` (`None`: a class the
/// engine does not know, as the server's fake engine) can run a request with
/// (`has_image`) an init image and (`has_mask`) a mask, by the family's
/// [`MaskRule`]: FLUX.1 schnell / dev cannot inpaint, FLUX.1 Fill only
/// inpaints (image and mask), and no pipeline takes a mask without an
/// image. The pipelines refuse the same when they run.
///
/// # Errors
/// An invalid `mask` or `image`.
pub fn check_inputs_for_family(
    family: Option<ModelFamily>,
    has_image: bool,
    has_mask: bool,
) -> Result<()> {
    if has_mask && !has_image {
        return Err(Error::invalid(
            "mask",
            "a mask needs an init image to repaint: give `image` too",
        ));
    }
    match family.map(ModelFamily::mask_rule) {
        Some(MaskRule::Refused) if has_mask => Err(Error::invalid(
            "mask",
            "FLUX.1 schnell / dev cannot inpaint; use a FLUX.1 Fill model (FluxFillPipeline)",
        )),
        Some(MaskRule::Required) if !has_image => Err(Error::invalid(
            "image",
            "FLUX.1 Fill needs an image to inpaint (and a mask)",
        )),
        Some(MaskRule::Required) if !has_mask => Err(Error::invalid(
            "mask",
            "FLUX.1 Fill needs a mask (white repaints, black keeps)",
        )),
        _ => Ok(()),
    }
}

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
            Pipeline::Flux(p) => p.run(request, ctx),
            Pipeline::FluxFill(p) => p.run(request, ctx),
        }
    }

    /// The diffusers pipeline class name the model declares.
    pub fn class_name(&self) -> &'static str {
        match self {
            Pipeline::StableDiffusion(p) => p.class_name(),
            Pipeline::StableDiffusionXL(p) => p.class_name(),
            Pipeline::Flux(_) => "FluxPipeline",
            Pipeline::FluxFill(_) => "FluxFillPipeline",
        }
    }

    /// The model's family (decided by the loader from `model_index.json`).
    pub fn family(&self) -> ModelFamily {
        match self {
            Pipeline::StableDiffusion(_) => ModelFamily::StableDiffusion,
            Pipeline::StableDiffusionXL(_) => ModelFamily::StableDiffusionXl,
            Pipeline::Flux(_) => ModelFamily::Flux,
            Pipeline::FluxFill(_) => ModelFamily::FluxFill,
        }
    }

    /// Merge LoRA adapters (stacked, each with its scale) into the cached
    /// weights, replacing the set merged before (`[]` restores the base
    /// model). Switching sets rebuilds the affected components from the
    /// weights in memory, never from disk, and gives the same results as
    /// a fresh load with the new set; an unchanged set is a no-op.
    ///
    /// Errors (the pipeline is left as it was): an unreadable or unknown
    /// LoRA file, a LoRA for a component or module this model lacks (the
    /// message names the first such module), or shapes that do not fit.
    pub fn set_loras(&mut self, loras: &[crate::lora::LoraSpec]) -> Result<()> {
        match self {
            Pipeline::StableDiffusion(p) => p.set_loras(loras),
            Pipeline::StableDiffusionXL(p) => p.set_loras(loras),
            Pipeline::Flux(p) => p.set_loras(loras),
            Pipeline::FluxFill(p) => p.set_loras(loras),
        }
    }

    /// The LoRA adapters merged now.
    pub fn loras(&self) -> &[crate::lora::LoraSpec] {
        match self {
            Pipeline::StableDiffusion(p) => p.loras(),
            Pipeline::StableDiffusionXL(p) => p.loras(),
            Pipeline::Flux(p) => p.loras(),
            Pipeline::FluxFill(p) => p.loras(),
        }
    }

    /// How many tensors of the LoRA-targetable components (text encoders,
    /// UNet or transformer) were read from the weight files since loading;
    /// it does not grow when LoRA sets are switched.
    pub fn base_tensor_reads(&self) -> usize {
        match self {
            Pipeline::StableDiffusion(p) => p.base_tensor_reads(),
            Pipeline::StableDiffusionXL(p) => p.base_tensor_reads(),
            Pipeline::Flux(p) => p.base_tensor_reads(),
            Pipeline::FluxFill(p) => p.base_tensor_reads(),
        }
    }

    /// The model's native `(width, height)` in pixels: UNet `sample_size`
    /// times the VAE scale factor (Stable Diffusion), diffusers'
    /// `default_sample_size` 128 times the VAE scale factor (FLUX: 1024²).
    pub fn default_size(&self) -> (usize, usize) {
        match self {
            Pipeline::StableDiffusion(p) => p.default_size(),
            Pipeline::StableDiffusionXL(p) => p.default_size(),
            Pipeline::Flux(p) => p.default_size(),
            Pipeline::FluxFill(p) => p.default_size(),
        }
    }

    /// The denoiser's name in reports (`UNet`, or `transformer` for FLUX).
    pub fn denoiser_name(&self) -> &'static str {
        self.family().denoiser_name()
    }

    /// The default number of denoising steps for this model: the family's
    /// ([`ModelFamily::default_steps`]: Stable Diffusion 25, FLUX.1 Fill 50);
    /// for `FluxPipeline` it depends on the model: schnell (the transformer
    /// without guidance embedding) 4, dev 28.
    pub fn default_steps(&self) -> usize {
        match self {
            Pipeline::Flux(p) if !p.guidance_embeds() => 4,
            Pipeline::Flux(_) => 28,
            _ => self.family().default_steps().unwrap_or(25),
        }
    }

    /// The default guidance scale for this model: the family's
    /// ([`ModelFamily::default_guidance_scale`]: Stable Diffusion 7.5,
    /// FLUX.1 Fill 30); for `FluxPipeline` it depends on the model: schnell
    /// 0 (it has no guidance), dev 3.5.
    pub fn default_guidance_scale(&self) -> f64 {
        match self {
            Pipeline::Flux(p) if !p.guidance_embeds() => 0.0,
            Pipeline::Flux(_) => 3.5,
            _ => self.family().default_guidance_scale().unwrap_or(7.5),
        }
    }

    /// The default image-to-image / inpainting strength: [`DEFAULT_STRENGTH`]
    /// (0.8), and 1.0 (the whole schedule) for FLUX.1 Fill, as diffusers
    /// ([`ModelFamily::default_strength`]).
    pub fn default_strength(&self) -> f64 {
        self.family().default_strength()
    }

    /// The VAE scale factor (8).
    pub fn vae_scale_factor(&self) -> usize {
        match self {
            Pipeline::StableDiffusion(p) => p.vae_scale_factor(),
            Pipeline::StableDiffusionXL(p) => p.vae_scale_factor(),
            Pipeline::Flux(p) => p.vae_scale_factor(),
            Pipeline::FluxFill(p) => p.vae_scale_factor(),
        }
    }

    /// Width and height must be multiples of this: the VAE scale factor (8)
    /// times the family's latent packing ([`ModelFamily::latent_packing`]:
    /// doubled for FLUX's 2x2 latent packing, 16).
    pub fn size_multiple(&self) -> usize {
        self.family().latent_packing() * self.vae_scale_factor()
    }

    /// The model's own scheduler class (`_class_name` of its scheduler config).
    pub fn default_scheduler(&self) -> String {
        let cfg = match self {
            Pipeline::StableDiffusion(p) => &p.scheduler_config,
            Pipeline::StableDiffusionXL(p) => &p.scheduler_config,
            Pipeline::Flux(p) => p.scheduler_config(),
            Pipeline::FluxFill(p) => p.scheduler_config(),
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
    let class = model.pipeline_class();
    let supported = crate::loader::supported_class(class);
    match supported.zip(model.family()) {
        Some((class, ModelFamily::StableDiffusion)) => Ok(Pipeline::StableDiffusion(Box::new(
            stable_diffusion::StableDiffusionPipeline::load(model, device, class)?,
        ))),
        Some((class, ModelFamily::StableDiffusionXl)) => Ok(Pipeline::StableDiffusionXL(Box::new(
            stable_diffusion_xl::StableDiffusionXLPipeline::load(model, device, class)?,
        ))),
        Some((_, ModelFamily::Flux)) => Ok(Pipeline::Flux(Box::new(flux::FluxPipeline::load(
            model, device,
        )?))),
        Some((_, ModelFamily::FluxFill)) => Ok(Pipeline::FluxFill(Box::new(
            flux::FluxFillPipeline::load(model, device)?,
        ))),
        None => Err(Error::config(
            "model_index.json",
            format!(
                "pipeline `{class}` is not supported yet (supported: {})",
                SUPPORTED_PIPELINES.join(", ")
            ),
        )),
    }
}
