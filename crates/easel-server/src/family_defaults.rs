//! What a client needs to fill a form for a model before it is loaded: the
//! facts of the model's family (`GET /v1/models` entries' `defaults`), read
//! from the engine's [`ModelFamily`] and scheduler table, never restated.

use easel_diffusion::loader::{MaskRule, ModelFamily};
use easel_diffusion::schedulers::scheduler_names;

/// The request defaults and rules of a model's family, as `GET /v1/models`
/// reports them (`defaults`), so a form can prefill and hide fields without
/// loading the model. Values that differ between models of one family are
/// `null` (the job's `parameters` report what ran).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct FamilyDefaults {
    /// `stable_diffusion` (1.x / 2.x), `stable_diffusion_xl`, `flux`
    /// (FLUX.1 schnell / dev) or `flux_fill`.
    pub family: String,
    /// Default denoising steps; `null` for FLUX.1 (schnell 4, dev 28: the
    /// transformer config decides).
    pub steps: Option<u32>,
    /// Default guidance scale; `null` for FLUX.1 (schnell 0, dev 3.5).
    pub guidance_scale: Option<f64>,
    /// Default image-to-image strength (0..1).
    pub strength: f64,
    /// Width and height must be multiples of this (8, FLUX 16).
    pub size_multiple: u32,
    /// Whether `negativePrompt` applies (false for FLUX.1).
    pub negative_prompt: bool,
    /// `optional` (SD / SDXL inpaint with a mask), `refused` (FLUX.1
    /// schnell / dev) or `required` (FLUX.1 Fill needs image and mask).
    pub mask: String,
    /// The short names of the schedulers of the family (`euler`,
    /// `dpmpp_2m`, ...; `easel schedulers`); the model's own when left out.
    pub schedulers: Vec<String>,
}

impl FamilyDefaults {
    /// The defaults of the family of a pipeline class
    /// (`model_index.json`'s `_class_name`); `None` for a class the engine
    /// does not load, or an unknown class.
    pub fn of_class(pipeline_class: Option<&str>) -> Option<Self> {
        ModelFamily::from_class_name(pipeline_class?).map(Self::of)
    }

    /// The defaults of `family`.
    pub fn of(family: ModelFamily) -> Self {
        let name = match family {
            ModelFamily::StableDiffusion => "stable_diffusion",
            ModelFamily::StableDiffusionXl => "stable_diffusion_xl",
            ModelFamily::Flux => "flux",
            _ => "flux_fill",
        };
        let mask = match family.mask_rule() {
            MaskRule::Refused => "refused",
            MaskRule::Required => "required",
            MaskRule::Optional => "optional",
        };
        let schedulers = scheduler_names()
            .into_iter()
            .filter(|s| s.family == family.scheduler_family())
            .map(|s| s.name.to_string())
            .collect();
        FamilyDefaults {
            family: name.into(),
            steps: family.default_steps().and_then(|s| u32::try_from(s).ok()),
            guidance_scale: family.default_guidance_scale(),
            strength: family.default_strength(),
            size_multiple: family.size_multiple(),
            negative_prompt: family.takes_negative_prompt(),
            mask: mask.into(),
            schedulers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_report_their_own_facts() {
        let sd = FamilyDefaults::of_class(Some("StableDiffusionPipeline")).unwrap();
        assert_eq!(sd.family, "stable_diffusion");
        assert_eq!((sd.steps, sd.guidance_scale), (Some(25), Some(7.5)));
        assert!(sd.negative_prompt);
        assert_eq!(sd.mask, "optional");
        assert_eq!(sd.size_multiple, 8);
        assert!(sd.schedulers.iter().any(|s| s == "euler"));
        assert!(!sd.schedulers.iter().any(|s| s.contains("flow_match")));

        let flux = FamilyDefaults::of_class(Some("FluxPipeline")).unwrap();
        assert_eq!((flux.steps, flux.guidance_scale), (None, None));
        assert!(!flux.negative_prompt);
        assert_eq!(flux.mask, "refused");
        assert_eq!(flux.size_multiple, 16);
        assert!(!flux.schedulers.iter().any(|s| s == "euler"));
        assert!(!flux.schedulers.is_empty());

        let fill = FamilyDefaults::of_class(Some("FluxFillPipeline")).unwrap();
        assert_eq!((fill.mask.as_str(), fill.strength), ("required", 1.0));
        assert_eq!(FamilyDefaults::of_class(Some("NoSuchPipeline")), None);
        assert_eq!(FamilyDefaults::of_class(None), None);
    }
}
