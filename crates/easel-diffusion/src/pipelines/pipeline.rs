//! The pipeline trait: what every loaded pipeline does, the Rust form of
//! diffusers' `DiffusionPipeline` base class.
//!
//! Each supported class implements [`DiffusionPipeline`]
//! ([`StableDiffusionPipeline`](super::stable_diffusion::StableDiffusionPipeline),
//! [`StableDiffusionXLPipeline`](super::stable_diffusion_xl::StableDiffusionXLPipeline),
//! [`FluxPipeline`](super::flux::FluxPipeline),
//! [`FluxFillPipeline`](super::flux_fill::FluxFillPipeline));
//! [`load_pipeline`](super::load_pipeline) returns one as a
//! [`Pipeline`](super::Pipeline) (`Box<dyn DiffusionPipeline>`).
//!
//! What follows from the model's family alone (size multiple for a given
//! VAE, default strength, negative prompt, scheduler family, mask rule, LoRA
//! targets, the denoiser's name) is asked of [`DiffusionPipeline::family`]
//! ([`ModelFamily`]); the trait carries what a loaded model decides itself
//! (its configs: native size, VAE scale factor, scheduler config, whether
//! the denoiser embeds the guidance scale) and the defaults that combine the
//! two.

use super::{GenerationOutput, GenerationRequest, RunContext};
use crate::error::Result;
use crate::loader::ModelFamily;
use crate::lora::LoraSpec;

/// A loaded diffusion pipeline of any supported class.
///
/// `Send + Sync`: a loaded pipeline moves between threads (the server's
/// worker) and is only read while it runs; [`DiffusionPipeline::set_loras`]
/// takes `&mut self`.
pub trait DiffusionPipeline: Send + Sync {
    /// Run a request: stages 1 to 6 (encode the prompt, prepare the
    /// timesteps and latents, denoise, decode, post-process).
    ///
    /// # Errors
    /// A request this model cannot run (the error names the field: sizes
    /// that are not multiples of [`DiffusionPipeline::size_multiple`], a
    /// mask or image the family refuses or needs, a strength that leaves no
    /// step, ...), cancellation ([`crate::Error::Canceled`]), or a tensor
    /// error.
    fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput>;

    /// The model's family (decided by the loader from `model_index.json`).
    fn family(&self) -> ModelFamily;

    /// The diffusers pipeline class name the model declares (one of
    /// [`SUPPORTED_PIPELINES`](crate::loader::SUPPORTED_PIPELINES)).
    fn class_name(&self) -> &'static str;

    /// Merge LoRA adapters (stacked, each with its scale) into the cached
    /// weights of the components the family names
    /// ([`ModelFamily::lora_components`]), replacing the set merged before
    /// (`[]` restores the base model). Switching sets rebuilds the affected
    /// components from the weights in memory, never from disk, and gives the
    /// same results as a fresh load with the new set; an unchanged set is a
    /// no-op.
    ///
    /// # Errors
    /// The pipeline is left as it was: an unreadable or unknown LoRA file, a
    /// LoRA for a component or module this model lacks (the message names
    /// the first such module), or shapes that do not fit (see
    /// [`crate::lora::merge_deltas`]).
    fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()>;

    /// The LoRA adapters merged now.
    fn loras(&self) -> &[LoraSpec];

    /// How many tensors of the LoRA-targetable components (text encoders,
    /// UNet or transformer) were read from the weight files since loading;
    /// it does not grow when LoRA sets are switched.
    fn base_tensor_reads(&self) -> usize;

    /// The VAE scale factor, `2^(len(block_out_channels) − 1)` of the VAE
    /// config (8 for every released model).
    fn vae_scale_factor(&self) -> usize;

    /// The model's `scheduler/scheduler_config.json`.
    fn scheduler_config(&self) -> &serde_json::Value;

    /// The model's native `(width, height)` in pixels: UNet `sample_size`
    /// times the VAE scale factor (Stable Diffusion), diffusers'
    /// `default_sample_size` 128 times the VAE scale factor (FLUX: 1024²).
    fn default_size(&self) -> (usize, usize);

    /// Whether the denoiser embeds the guidance scale instead of running
    /// classifier-free guidance (the FLUX transformer config's
    /// `guidance_embeds`: FLUX.1 dev and Fill yes, schnell no); `false` for
    /// UNet pipelines.
    fn guidance_embeds(&self) -> bool {
        false
    }

    /// The model's own scheduler class (`_class_name` of its scheduler
    /// config; `unknown` when the config has none).
    fn default_scheduler(&self) -> String {
        self.scheduler_config()
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
            .to_string()
    }

    /// The default number of denoising steps for this model
    /// ([`ModelFamily::default_steps_for`]: Stable Diffusion 25, FLUX.1
    /// schnell 4, dev 28, Fill 50).
    fn default_steps(&self) -> usize {
        self.family().default_steps_for(self.guidance_embeds())
    }

    /// The default guidance scale for this model
    /// ([`ModelFamily::default_guidance_scale_for`]: Stable Diffusion 7.5,
    /// FLUX.1 schnell 0 (it has no guidance), dev 3.5, Fill 30).
    fn default_guidance_scale(&self) -> f64 {
        self.family()
            .default_guidance_scale_for(self.guidance_embeds())
    }

    /// Width and height must be multiples of this: the VAE scale factor
    /// times the family's latent packing ([`ModelFamily::latent_packing`]:
    /// 8 for Stable Diffusion, 16 for FLUX's 2x2 packing).
    fn size_multiple(&self) -> usize {
        self.family().latent_packing() * self.vae_scale_factor()
    }
}
