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
//! A pipeline is chosen from the model's family (decided by the loader from
//! `model_index.json`) by [`load_pipeline`], which returns it as a
//! [`Pipeline`] (`Box<dyn DiffusionPipeline>`); the caller (CLI, server
//! worker) gives it a [`GenerationRequest`] and a [`RunContext`] carrying the
//! job's noise source, progress callback and cancel token.
//!
//! Files, one concern each:
//! - `pipeline.rs`: the [`DiffusionPipeline`] trait every pipeline implements;
//! - `stable_diffusion.rs`, `stable_diffusion_xl.rs`, [`flux`],
//!   [`flux_fill`]: the pipelines;
//! - `request.rs`: [`GenerationRequest`] and its checks;
//! - `run_context.rs`: [`RunContext`], [`Progress`], [`CancelToken`];
//! - `generation_output.rs`: [`GenerationOutput`], [`StageTimings`];
//! - `task.rs`: which init image / mask a family takes ([`Task`],
//!   [`check_inputs_for_family`]);
//! - `stages.rs`: stage helpers the pipelines share (tokenizing, the
//!   guided denoising loop, decoding);
//! - `components.rs`: opening a model's component weights;
//! - [`offload`]: `--offload none|model|sequential` and [`offload::Held`],
//!   a component resident on the device or built there for each use;
//! - [`init_image`]: image-to-image and inpainting latents (SD, SDXL).
//!
//! The 8-bit inputs ([`ImageInput`], [`MaskInput`]) live in
//! [`crate::image_processor`], which the pipelines use (never the reverse).

mod components;
pub mod flux;
pub mod flux_fill;
mod generation_output;
pub mod init_image;
pub mod offload;
mod pipeline;
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
pub use components::{component_source, component_weights, load_vae};
pub(crate) use components::{held_text_encoder, held_unet, held_vae, lora_sources};
pub use generation_output::{GenerationOutput, StageTimings};
pub use pipeline::DiffusionPipeline;
pub use request::{GenerationRequest, DEFAULT_STRENGTH};
pub use run_context::{CancelToken, Progress, RunContext};
pub use stages::{
    decode_to_images, denoise, denoise_from, prepare_scheduler, repeat_interleave_batch,
    tokenize_clip,
};
pub use task::{check_inputs_for_family, Task, TaskKind};

/// A loaded pipeline of any supported class, as [`load_pipeline`] returns
/// it: ask it through [`DiffusionPipeline`].
pub type Pipeline = Box<dyn DiffusionPipeline>;

/// The pipeline classes [`load_pipeline`] accepts (kept with the model
/// families in the loader).
pub use crate::loader::SUPPORTED_PIPELINES;

/// Load the pipeline `model_index.json` names, on `device`.
///
/// Errors: an unsupported `_class_name` (naming the supported ones), a
/// missing component, or weights that don't fit the configs.
pub fn load_pipeline(model: &ModelDir, device: &Device) -> Result<Pipeline> {
    let class = model.pipeline_class();
    let supported = crate::loader::supported_class(class);
    match supported.zip(model.family()) {
        Some((class, ModelFamily::StableDiffusion)) => Ok(Box::new(
            stable_diffusion::StableDiffusionPipeline::load(model, device, class)?,
        )),
        Some((class, ModelFamily::StableDiffusionXl)) => Ok(Box::new(
            stable_diffusion_xl::StableDiffusionXLPipeline::load(model, device, class)?,
        )),
        Some((_, ModelFamily::Flux)) => Ok(Box::new(flux::FluxPipeline::load(model, device)?)),
        Some((_, ModelFamily::FluxFill)) => {
            Ok(Box::new(flux_fill::FluxFillPipeline::load(model, device)?))
        }
        None => Err(Error::config(
            "model_index.json",
            format!(
                "pipeline `{class}` is not supported yet (supported: {})",
                SUPPORTED_PIPELINES.join(", ")
            ),
        )),
    }
}
