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

mod components;
pub mod flux;
pub mod flux_fill;
mod generation_output;
pub mod init_image;
mod request;
mod run_context;
pub mod stable_diffusion;
pub mod stable_diffusion_xl;
mod stages;
mod task;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::loader::{ModelDir, ModelFamily};

pub use crate::image_processor::{ImageInput, MaskInput};
pub(crate) use components::lora_sources;
pub use components::{component_source, component_weights, load_vae};
pub use generation_output::{GenerationOutput, StageTimings};
pub use request::{GenerationRequest, DEFAULT_STRENGTH};
pub use run_context::{CancelToken, Progress, RunContext};
pub use stages::{
    decode_to_images, denoise, denoise_from, prepare_scheduler, repeat_interleave_batch,
    tokenize_clip,
};
pub use task::check_inputs_for_family;

/// A loaded pipeline of any supported class.
pub enum Pipeline {
    /// `StableDiffusionPipeline` (SD 1.x / 2.x).
    StableDiffusion(Box<stable_diffusion::StableDiffusionPipeline>),
    /// `StableDiffusionXLPipeline`.
    StableDiffusionXL(Box<stable_diffusion_xl::StableDiffusionXLPipeline>),
    /// `FluxPipeline` (FLUX.1 schnell / dev; text-to-image and image-to-image).
    Flux(Box<flux::FluxPipeline>),
    /// `FluxFillPipeline` (FLUX.1 Fill; inpainting).
    FluxFill(Box<flux_fill::FluxFillPipeline>),
}

/// The pipeline classes [`load_pipeline`] accepts (kept with the model
/// families in the loader).
pub use crate::loader::SUPPORTED_PIPELINES;

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
            flux_fill::FluxFillPipeline::load(model, device)?,
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
