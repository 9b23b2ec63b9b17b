//! What the worker runs for each image definition: the engine's job, built
//! by the one builder ([`JobRequest::build`]) against the loaded model's
//! defaults, and the resolved parameters recorded from it.

use easel_core::GenerationParams;
use easel_diffusion::engine::JobRequest;
use easel_diffusion::pipelines::{ImageInput, MaskInput};

use crate::engine::{EngineError, Job, ModelDefaults};
use crate::job::{ItemSpec, ResolvedLora, ResolvedParameters};

/// The engine's job for one image definition: its stored spec (size
/// already fixed by the submit step, seed drawn, LoRA files resolved) with
/// its decoded inputs, built by the one builder ([`JobRequest::build`])
/// against the loaded model's `defaults`: steps, guidance, native size and
/// strength default as in `easel generate` and `easel flow run` (strength:
/// the family's, 1.0 for FLUX.1 Fill).
///
/// # Errors
/// [`EngineError::Invalid`] naming the builder's field (`strength`, `mask`,
/// `image`, `width`, ...) when the definition does not fit the model.
pub(super) fn plan(
    spec: &ItemSpec,
    image: Option<ImageInput>,
    mask: Option<MaskInput>,
    defaults: &ModelDefaults,
) -> Result<Job, EngineError> {
    let d = &spec.definition;
    let params = GenerationParams {
        prompt: d.prompt.clone().unwrap_or_default(),
        negative_prompt: d.negative_prompt.clone(),
        base_model: Some(spec.model.reference.clone()),
        steps: d.steps,
        guidance_scale: d.guidance_scale,
        width: spec.width,
        height: spec.height,
        seed: Some(spec.seed),
        batch_size: Some(spec.batch_size),
        scheduler: d.scheduler.clone(),
        precision: d.precision,
        ..GenerationParams::default()
    };
    JobRequest {
        model: spec.model.load.clone(),
        params,
        image,
        mask,
        strength: d.strength,
        loras: spec
            .loras
            .iter()
            .map(|l| easel_diffusion::lora::LoraSpec::new(&l.path, l.scale))
            .collect(),
        max_sequence_length: None,
        tiling: d.tiling.unwrap_or(false),
    }
    .build(defaults)
    .map_err(crate::engine::engine_error)
}

/// The parameters a definition ran with: its job's (`job`, built by
/// [`plan`]) with the scheduler and the compute precision that ran and
/// the worker's `device`.
pub(super) fn resolved(
    spec: &ItemSpec,
    job: &Job,
    defaults: &ModelDefaults,
    scheduler: &str,
    compute_precision: easel_core::params::Precision,
    device: &str,
) -> ResolvedParameters {
    let d = &spec.definition;
    ResolvedParameters {
        prompt: d.prompt.clone().unwrap_or_default(),
        negative_prompt: d.negative_prompt.clone(),
        base_model: spec.model.reference.clone(),
        pipeline: defaults.pipeline.clone(),
        steps: job.request.num_inference_steps as u32,
        guidance_scale: job.request.guidance_scale,
        width: job.request.width as u32,
        height: job.request.height as u32,
        scheduler: scheduler.to_string(),
        seed: spec.seed,
        seeds: job.seeds.clone(),
        batch_size: job.request.num_images_per_prompt as u32,
        strength: job.request.image.is_some().then_some(job.request.strength),
        loras: spec
            .loras
            .iter()
            .map(|l| ResolvedLora {
                source: l.source.clone(),
                scale: l.scale,
            })
            .collect(),
        tiling: job.request.tiling,
        output_format: spec.output_format(),
        output_quality: spec.output_quality(),
        precision: d.precision.unwrap_or(easel_core::params::DEFAULT_PRECISION),
        compute_precision: compute_precision.as_str().into(),
        device: device.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use easel_core::ImageDefinition;
    use easel_diffusion::loader::ModelFamily;

    use super::*;
    use crate::job::{InputRef, ModelSpec};

    fn defaults(family: ModelFamily) -> ModelDefaults {
        ModelDefaults {
            pipeline: "SomePipeline".into(),
            family,
            width: 1024,
            height: 1024,
            steps: 50,
            guidance_scale: 30.0,
            strength: family.default_strength(),
            scheduler: "FlowMatchEulerDiscreteScheduler".into(),
            size_multiple: family.size_multiple() as usize,
        }
    }

    fn input() -> InputRef {
        InputRef {
            asset_id: "a".into(),
            hash: "h".into(),
            extension: "png".into(),
        }
    }

    /// A definition of 2 images at 64x48 (the size the submit step fixed
    /// from its init image) with an image and a mask, `tiling` on.
    fn spec(strength: Option<f64>) -> ItemSpec {
        ItemSpec {
            field: "images[0]".into(),
            definition: ImageDefinition {
                prompt: Some("a cat".into()),
                strength,
                tiling: Some(true),
                ..ImageDefinition::default()
            },
            model: ModelSpec {
                reference: "fill".into(),
                load: "/models/fill".into(),
                pipeline_class: None,
            },
            loras: Vec::new(),
            seed: 7,
            batch_size: 2,
            width: Some(64),
            height: Some(48),
            image: Some(input()),
            mask: Some(input()),
        }
    }

    fn pixels() -> (Option<ImageInput>, Option<MaskInput>) {
        (
            Some(ImageInput {
                width: 64,
                height: 48,
                rgb: vec![0; 64 * 48 * 3],
            }),
            Some(MaskInput {
                width: 64,
                height: 48,
                luma: vec![255; 64 * 48],
            }),
        )
    }

    #[test]
    fn flux_fill_definitions_default_to_the_family_strength() {
        let (image, mask) = pixels();
        let fill = defaults(ModelFamily::FluxFill);
        let job = plan(&spec(None), image.clone(), mask.clone(), &fill).unwrap();
        assert_eq!(job.request.strength, 1.0);
        assert_eq!(
            (job.request.num_inference_steps, job.request.guidance_scale),
            (50, 30.0)
        );
        assert_eq!((job.request.width, job.request.height), (64, 48));
        assert_eq!(job.seeds, [7, 8]);
        assert_eq!(job.model, "/models/fill");
        let p = resolved(
            &spec(None),
            &job,
            &fill,
            "FlowMatchEulerDiscreteScheduler",
            easel_core::params::Precision::Fp32,
            "cuda:1",
        );
        assert_eq!(p.device, "cuda:1");
        assert_eq!(p.strength, Some(1.0));
        assert!(p.tiling);
        assert_eq!((p.steps, p.width, p.height), (50, 64, 48));
        assert_eq!(p.seeds, [7, 8]);
        assert_eq!(p.pipeline, "SomePipeline");

        // Stable Diffusion keeps easel-core's 0.8; a given strength wins.
        let sd = defaults(ModelFamily::StableDiffusion);
        let job = plan(&spec(None), image.clone(), mask.clone(), &sd).unwrap();
        assert_eq!(job.request.strength, 0.8);
        let job = plan(&spec(Some(0.5)), image, mask, &fill).unwrap();
        assert_eq!(job.request.strength, 0.5);
    }

    #[test]
    fn a_definition_the_family_refuses_names_the_field() {
        let (image, _) = pixels();
        let mut no_mask = spec(None);
        no_mask.mask = None;
        let e = plan(&no_mask, image, None, &defaults(ModelFamily::FluxFill)).unwrap_err();
        assert!(
            matches!(&e, EngineError::Invalid { field, .. } if field == "mask"),
            "{e:?}"
        );
    }
}
