//! The model family: which kind of diffusers pipeline a model is, decided
//! once from `model_index.json`'s `_class_name`, and the facts that follow
//! from it. Callers outside the loader ask the family; they never test class
//! names themselves.

use crate::schedulers::SchedulerFamily;

/// The pipeline classes the engine loads (`model_index.json`'s
/// `_class_name`). The image-to-image and inpainting classes of Stable
/// Diffusion load into the same pipelines as text-to-image: every SD pipeline
/// runs all three tasks (an inpainting model, with a 9-channel UNet, runs
/// inpainting only). `FluxPipeline` runs text-to-image and image-to-image,
/// `FluxFillPipeline` inpainting.
pub const SUPPORTED_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "FluxPipeline",
    "FluxFillPipeline",
];

/// `class` as the `'static` entry of [`SUPPORTED_PIPELINES`] (the name a
/// loaded pipeline reports); `None` for a class the engine does not load.
pub(crate) fn supported_class(class: &str) -> Option<&'static str> {
    SUPPORTED_PIPELINES.iter().copied().find(|c| *c == class)
}

/// A family of models that share one pipeline and its facts (size multiple,
/// defaults, negative prompt, scheduler family, mask rule, LoRA targets).
///
/// Decided once, by the loader, from `model_index.json`'s `_class_name`
/// ([`ModelFamily::from_class_name`]). Facts that differ between models of
/// one family stay with the loaded model: FLUX.1 schnell vs dev is the
/// transformer config's `guidance_embeds` (see [`Self::default_steps_for`]),
/// and whether an SD / SDXL model inpaints is its UNet's `in_channels`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x / 2.x: diffusers' `StableDiffusionPipeline`,
    /// `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`.
    StableDiffusion,
    /// Stable Diffusion XL: diffusers' `StableDiffusionXLPipeline`,
    /// `StableDiffusionXLImg2ImgPipeline`, `StableDiffusionXLInpaintPipeline`.
    StableDiffusionXl,
    /// FLUX.1 schnell / dev: diffusers' `FluxPipeline` (text-to-image and
    /// image-to-image).
    Flux,
    /// FLUX.1 Fill: diffusers' `FluxFillPipeline` (inpainting only).
    FluxFill,
}

/// The default image-to-image strength (the share of the schedule re-run)
/// of every family but FLUX.1 Fill (see [`ModelFamily::default_strength`]);
/// also `pipelines::DEFAULT_STRENGTH`. The request schema's default
/// (`easel_core::request::DEFAULT_STRENGTH`), kept in one place.
pub const DEFAULT_STRENGTH: f64 = easel_core::request::DEFAULT_STRENGTH;

/// How a pipeline shortens its `steps`-step schedule for image-to-image
/// `strength` s (both follow diffusers' `get_timesteps`);
/// [`ModelFamily::strength_rule`] says which. Applied by
/// `pipelines::init_image::strength_start_step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrengthRule {
    /// Stable Diffusion (1.x, 2.x, XL): `init = min(floor(steps · s), steps)`
    /// steps run, so `floor(steps · s) = 0` runs none.
    Floor,
    /// FLUX.1: `init = min(steps · s, steps)` keeps its fractional part and
    /// the run starts at `floor(steps − init)`; only `s = 0` runs no step.
    Fractional,
}

/// Whether a family's pipeline takes a mask (inpainting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    /// Never: `FluxPipeline` cannot inpaint.
    Refused,
    /// Always, with an init image: `FluxFillPipeline` only inpaints.
    Required,
    /// Optional: any SD / SDXL model inpaints with a mask (a 9-channel
    /// inpainting UNet only inpaints, which the loaded pipeline checks).
    Optional,
}

impl ModelFamily {
    /// The family of a `model_index.json` `_class_name`; `None` for a class
    /// the engine does not load (not one of [`SUPPORTED_PIPELINES`]). Only
    /// the loader decides families from class names
    /// ([`ModelDir::family`](crate::loader::ModelDir::family)); everything
    /// else asks the family.
    pub fn from_class_name(class: &str) -> Option<ModelFamily> {
        match class {
            "StableDiffusionPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline" => Some(ModelFamily::StableDiffusion),
            "StableDiffusionXLPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
            | "StableDiffusionXLInpaintPipeline" => Some(ModelFamily::StableDiffusionXl),
            "FluxPipeline" => Some(ModelFamily::Flux),
            "FluxFillPipeline" => Some(ModelFamily::FluxFill),
            _ => None,
        }
    }

    /// Whether this is a FLUX.1 family (`FluxPipeline`, `FluxFillPipeline`);
    /// callers ask for the fact they need instead.
    fn is_flux(self) -> bool {
        matches!(self, ModelFamily::Flux | ModelFamily::FluxFill)
    }

    /// The precision a GPU computes this family in when a request names
    /// none: bf16 for FLUX.1 (its published weights and diffusers' examples
    /// are bf16; T5 overflows in f16), f16 for Stable Diffusion 1.x / 2.x
    /// and XL (diffusers' `torch_dtype=torch.float16` examples).
    pub fn default_gpu_precision(self) -> easel_core::params::Precision {
        if self.is_flux() {
            easel_core::params::Precision::Bf16
        } else {
            easel_core::params::Precision::Fp16
        }
    }

    /// How many VAE pixels per latent step a width or height must be a
    /// multiple of, over the VAE scale factor: 2 for FLUX, which packs
    /// 2x2 latent patches into its sequence (diffusers' `_pack_latents`),
    /// else 1.
    pub fn latent_packing(self) -> usize {
        if self.is_flux() {
            2
        } else {
            1
        }
    }

    /// Width and height must be multiples of this, for a model with the
    /// usual VAE scale factor of 8: 16 for FLUX (2x2 latent packing), else 8
    /// (easel-core's `FLUX_SIZE_MULTIPLE` / `DEFAULT_SIZE_MULTIPLE`).
    /// Used before a model is loaded; a loaded pipeline gives its own
    /// (`DiffusionPipeline::size_multiple`: its VAE scale factor times
    /// [`Self::latent_packing`]).
    pub fn size_multiple(self) -> u32 {
        if self.is_flux() {
            easel_core::params::FLUX_SIZE_MULTIPLE
        } else {
            easel_core::params::DEFAULT_SIZE_MULTIPLE
        }
    }

    /// Whether a width or height that is not a multiple of
    /// [`Self::size_multiple`] is rounded to the nearest one (with a notice)
    /// instead of refused: FLUX rounds, as hosted FLUX APIs do (diffusers
    /// rounds down with a warning); Stable Diffusion refuses, and the
    /// request's validation names the allowed multiple.
    pub fn rounds_sizes(self) -> bool {
        self.is_flux()
    }

    /// A width or height rounded to the nearest multiple of
    /// [`Self::size_multiple`] (at least one multiple) for a family that
    /// [rounds sizes](Self::rounds_sizes); `None` when `value` already is a
    /// multiple, or the family refuses other sizes.
    pub fn round_size(self, value: u32) -> Option<u32> {
        let m = self.size_multiple();
        if !self.rounds_sizes() || (value % m == 0 && value > 0) {
            return None;
        }
        Some(((value + m / 2) / m * m).max(m))
    }

    /// The default number of denoising steps of the family: 25 for Stable
    /// Diffusion (1.x, 2.x, XL), 50 for FLUX.1 Fill (diffusers' default);
    /// `None` for `FluxPipeline`, where it depends on the model (see
    /// [`Self::default_steps_for`]).
    pub fn default_steps(self) -> Option<usize> {
        match self {
            ModelFamily::Flux => None,
            _ => Some(self.default_steps_for(false)),
        }
    }

    /// The default number of denoising steps for a model of this family
    /// whose denoiser does or does not embed the guidance scale
    /// (`guidance_embeds`, the FLUX transformer config's flag, which tells
    /// FLUX.1 dev from schnell): `FluxPipeline` 28 (dev) or 4 (schnell, a
    /// timestep-distilled model), as Black Forest Labs use them; the other
    /// families ignore the flag (Stable Diffusion 25, FLUX.1 Fill 50).
    pub fn default_steps_for(self, guidance_embeds: bool) -> usize {
        match self {
            ModelFamily::StableDiffusion | ModelFamily::StableDiffusionXl => 25,
            ModelFamily::FluxFill => 50,
            ModelFamily::Flux if guidance_embeds => 28,
            ModelFamily::Flux => 4,
        }
    }

    /// The default guidance scale of the family: 7.5 for Stable Diffusion,
    /// 30 for FLUX.1 Fill (diffusers' defaults); `None` for `FluxPipeline`,
    /// where it depends on the model (see
    /// [`Self::default_guidance_scale_for`]).
    pub fn default_guidance_scale(self) -> Option<f64> {
        match self {
            ModelFamily::Flux => None,
            _ => Some(self.default_guidance_scale_for(false)),
        }
    }

    /// The default guidance scale for a model of this family whose denoiser
    /// does or does not embed the guidance scale (see
    /// [`Self::default_steps_for`]): `FluxPipeline` 3.5 (dev) or 0 (schnell
    /// has no guidance); the other families ignore the flag (Stable
    /// Diffusion 7.5, FLUX.1 Fill 30).
    pub fn default_guidance_scale_for(self, guidance_embeds: bool) -> f64 {
        match self {
            ModelFamily::StableDiffusion | ModelFamily::StableDiffusionXl => 7.5,
            ModelFamily::FluxFill => 30.0,
            ModelFamily::Flux if guidance_embeds => 3.5,
            ModelFamily::Flux => 0.0,
        }
    }

    /// The native size in latent pixels (times the VAE scale factor: the
    /// image size) when the model's config does not give one: 64 for SD
    /// 1.x/2.x (512²), 128 for SDXL (1024²) and FLUX (diffusers'
    /// `default_sample_size`; FLUX's transformer has no `sample_size`).
    pub fn default_sample_size(self) -> usize {
        match self {
            ModelFamily::StableDiffusion => 64,
            ModelFamily::StableDiffusionXl | ModelFamily::Flux | ModelFamily::FluxFill => 128,
        }
    }

    /// The default image-to-image / inpainting strength: 1.0 (the whole
    /// schedule) for FLUX.1 Fill, else 0.8 ([`DEFAULT_STRENGTH`]),
    /// as diffusers' pipelines.
    pub fn default_strength(self) -> f64 {
        match self {
            ModelFamily::FluxFill => 1.0,
            _ => DEFAULT_STRENGTH,
        }
    }

    /// Whether the family takes a negative prompt and runs classifier-free
    /// guidance (two denoiser passes per step when guidance > 1): Stable
    /// Diffusion does; FLUX.1 embeds the guidance scale in the transformer
    /// (one pass per step) and has no negative prompt.
    pub fn takes_negative_prompt(self) -> bool {
        !self.is_flux()
    }

    /// The scheduler family the pipeline samples with: flow matching for
    /// FLUX, DDPM-style (epsilon / v-prediction) for Stable Diffusion.
    pub fn scheduler_family(self) -> SchedulerFamily {
        if self.is_flux() {
            SchedulerFamily::FlowMatch
        } else {
            SchedulerFamily::Ddpm
        }
    }

    /// How the pipeline shortens its schedule for image-to-image strength
    /// (diffusers' `get_timesteps`): [`StrengthRule::Fractional`] for FLUX,
    /// [`StrengthRule::Floor`] for Stable Diffusion.
    pub fn strength_rule(self) -> StrengthRule {
        if self.is_flux() {
            StrengthRule::Fractional
        } else {
            StrengthRule::Floor
        }
    }

    /// Whether the family takes a mask; see [`MaskRule`].
    pub fn mask_rule(self) -> MaskRule {
        match self {
            ModelFamily::Flux => MaskRule::Refused,
            ModelFamily::FluxFill => MaskRule::Required,
            ModelFamily::StableDiffusion | ModelFamily::StableDiffusionXl => MaskRule::Optional,
        }
    }

    /// The components LoRA adapters can target (their names in the model
    /// folder and in diffusers / PEFT LoRA keys): SD `text_encoder`, `unet`;
    /// SDXL also `text_encoder_2`; FLUX `text_encoder` (CLIP) and
    /// `transformer`.
    pub fn lora_components(self) -> &'static [&'static str] {
        match self {
            ModelFamily::StableDiffusion => &["text_encoder", "unet"],
            ModelFamily::StableDiffusionXl => &["text_encoder", "text_encoder_2", "unet"],
            ModelFamily::Flux | ModelFamily::FluxFill => &["text_encoder", "transformer"],
        }
    }

    /// The components whose weights the family's pipeline loads (other
    /// model components a repository may ship, such as SD's
    /// `safety_checker`, are never read): SD `text_encoder`, `unet`, `vae`;
    /// SDXL also `text_encoder_2`; FLUX `text_encoder` (CLIP),
    /// `text_encoder_2` (T5), `transformer`, `vae`.
    pub fn weight_components(self) -> &'static [&'static str] {
        match self {
            ModelFamily::StableDiffusion => &["text_encoder", "unet", "vae"],
            ModelFamily::StableDiffusionXl => &["text_encoder", "text_encoder_2", "unet", "vae"],
            ModelFamily::Flux | ModelFamily::FluxFill => {
                &["text_encoder", "text_encoder_2", "transformer", "vae"]
            }
        }
    }

    /// The components `--quantize` converts as they load: the denoiser (SD
    /// `unet`, FLUX.1 `transformer`) and FLUX's T5 encoder
    /// (`text_encoder_2`), the ones that hold nearly all the weights.
    pub fn quantized_components(self) -> &'static [&'static str] {
        match self {
            ModelFamily::StableDiffusion | ModelFamily::StableDiffusionXl => &["unet"],
            ModelFamily::Flux | ModelFamily::FluxFill => &["transformer", "text_encoder_2"],
        }
    }

    /// The denoiser's name in reports: `transformer` for FLUX, else `UNet`.
    pub fn denoiser_name(self) -> &'static str {
        if self.is_flux() {
            "transformer"
        } else {
            "UNet"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_class_has_a_family() {
        for class in SUPPORTED_PIPELINES {
            assert!(ModelFamily::from_class_name(class).is_some(), "{class}");
        }
        assert_eq!(ModelFamily::from_class_name("FluxKontextPipeline"), None);
        assert_eq!(ModelFamily::from_class_name(""), None);
    }

    #[test]
    fn flux_facts() {
        let flux = ModelFamily::from_class_name("FluxPipeline").unwrap();
        assert_eq!(flux.size_multiple(), 16);
        assert_eq!(flux.scheduler_family(), SchedulerFamily::FlowMatch);
        assert!(!flux.takes_negative_prompt());
        assert_eq!(flux.mask_rule(), MaskRule::Refused);
        let sdxl = ModelFamily::from_class_name("StableDiffusionXLInpaintPipeline").unwrap();
        assert_eq!(sdxl, ModelFamily::StableDiffusionXl);
        assert_eq!(sdxl.size_multiple(), 8);
        assert_eq!(sdxl.default_steps(), Some(25));
        assert_eq!(flux.round_size(1024), None);
        assert_eq!(flux.round_size(1001), Some(1008));
        assert_eq!(flux.round_size(999), Some(992));
        assert_eq!(flux.round_size(3), Some(16));
        assert_eq!(sdxl.round_size(1001), None);
        // Per-model defaults: schnell (no guidance embedding) vs dev.
        assert_eq!(flux.default_steps_for(false), 4);
        assert_eq!(flux.default_steps_for(true), 28);
        assert_eq!(flux.default_guidance_scale_for(false), 0.0);
        assert_eq!(flux.default_guidance_scale_for(true), 3.5);
        assert_eq!(ModelFamily::FluxFill.default_steps_for(true), 50);
        assert_eq!(sdxl.default_guidance_scale_for(false), 7.5);
        assert_eq!(ModelFamily::StableDiffusion.default_sample_size(), 64);
        assert_eq!(sdxl.default_sample_size(), 128);
    }

    #[test]
    fn flux_defaults_depend_on_guidance_embedding_only_for_flux() {
        let flux = ModelFamily::Flux;
        assert_eq!(flux.default_steps(), None);
        assert_eq!(flux.default_guidance_scale(), None);
        // schnell (no guidance embedding), dev (guidance embedding).
        assert_eq!(flux.default_steps_for(false), 4);
        assert_eq!(flux.default_guidance_scale_for(false), 0.0);
        assert_eq!(flux.default_steps_for(true), 28);
        assert_eq!(flux.default_guidance_scale_for(true), 3.5);
        for family in [
            ModelFamily::StableDiffusion,
            ModelFamily::StableDiffusionXl,
            ModelFamily::FluxFill,
        ] {
            for embeds in [false, true] {
                assert_eq!(
                    Some(family.default_steps_for(embeds)),
                    family.default_steps()
                );
                assert_eq!(
                    Some(family.default_guidance_scale_for(embeds)),
                    family.default_guidance_scale()
                );
            }
        }
        assert_eq!(ModelFamily::FluxFill.default_steps(), Some(50));
        assert_eq!(
            ModelFamily::StableDiffusion.default_guidance_scale(),
            Some(7.5)
        );
    }
}
