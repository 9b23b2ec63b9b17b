//! What a caller asks a pipeline for: the resolved [`GenerationRequest`]
//! and the checks every pipeline makes on it before any work.

use crate::error::{Error, Result};
use crate::image_processor::{ImageInput, MaskInput};
use crate::models::vae_tiling::VaeTiling;

/// The default image-to-image strength (the share of the schedule re-run):
/// 0.8, the loader's [`crate::loader::DEFAULT_STRENGTH`].
pub use crate::loader::DEFAULT_STRENGTH;

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
    /// When the VAE decode runs in overlapping tiles, as diffusers'
    /// `enable_vae_tiling` ([`VaeTiling`]; `on` and seamless `tiling` are
    /// refused together). The engine fills an `Auto` here with its own
    /// setting ([`crate::engine::EngineOptions::vae_tiling`]).
    pub vae_tiling: VaeTiling,
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
            vae_tiling: VaeTiling::Auto,
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
    pub(super) fn negative_for(&self, i: usize) -> Option<&str> {
        match self.negative_prompts.len() {
            0 => None,
            1 => Some(self.negative_prompts[0].as_str()),
            _ => self.negative_prompts.get(i).map(String::as_str),
        }
    }

    pub(super) fn check(&self, vae_scale_factor: usize) -> Result<()> {
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
        if self.tiling && self.vae_tiling == VaeTiling::On {
            return Err(crate::models::vae_tiling::seamless_conflict());
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
