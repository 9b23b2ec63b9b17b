//! The engine's job: a fully resolved generation (every default filled in
//! from the loaded model), the one builder that makes it from a validated
//! request, and what a run hands back.

use std::path::PathBuf;

use easel_core::GenerationParams;

use crate::error::{Error, Result};
use crate::lora::LoraSpec;
use crate::pipelines::{
    check_inputs_for_family, GenerationRequest, ImageInput, MaskInput, StageTimings, TaskKind,
};

use super::ModelDefaults;

/// The largest width or height a job may have, in pixels (easel-core's
/// `SIZE_MAX`).
const SIZE_MAX: usize = easel_core::params::SIZE_MAX as usize;

/// A validated request on its way to the engine: easel-core's
/// [`GenerationParams`] (checked by `GenerationParams::validate_with` or
/// `ImageDefinition::validate` before it gets here) with the inputs already
/// decoded and the LoRA files resolved.
///
/// [`JobRequest::build`] is the one place a request becomes a [`Job`]: the
/// CLI's `generate`, `bench` and `flow run` go through it (the server's
/// worker resolves its batched definitions against the same
/// [`ModelDefaults`]).
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    /// The model reference (local folder, repo id, registry name): the
    /// engine's cache key.
    pub model: String,
    /// Prompt, negative prompt, steps, guidance, size, seed, batch size and
    /// scheduler; `None` fields take the model's defaults.
    pub params: GenerationParams,
    /// Image-to-image / inpainting: the decoded init image.
    pub image: Option<ImageInput>,
    /// Inpainting: the decoded mask (needs `image`).
    pub mask: Option<MaskInput>,
    /// How much of the init image is replaced, 0..=1 (needs `image`);
    /// default the family's ([`crate::loader::ModelFamily::default_strength`]).
    pub strength: Option<f64>,
    /// LoRA adapters (resolved files), stacked in order.
    pub loras: Vec<LoraSpec>,
    /// FLUX: the T5 prompt length in tokens, 1..=512 (default per model).
    pub max_sequence_length: Option<usize>,
    /// Seamless tiling (circular padding), default off.
    pub tiling: bool,
}

/// A fully resolved job: nothing left to a default. Built by
/// [`JobRequest::build`] (and joined into batches with [`Job::append`]).
#[derive(Debug, Clone)]
pub struct Job {
    /// The model reference, the engine's cache key.
    pub model: String,
    /// What the pipeline runs: prompts, images per prompt, steps,
    /// guidance, size, scheduler, inputs, strength, sequence length,
    /// tiling, every default resolved.
    pub request: GenerationRequest,
    /// One seed per image, prompt-major
    /// (`request.prompts.len() * request.num_images_per_prompt`).
    pub seeds: Vec<u64>,
    /// LoRA adapters merged for this job (`[]`: the base model).
    pub loras: Vec<LoraSpec>,
    /// The requested compute precision (`precision`; `None`: the device's
    /// default, see [`super::precision::compute_precision`]).
    pub precision: Option<easel_core::params::Precision>,
}

impl Job {
    /// What the job does, by its inputs.
    pub fn task(&self) -> TaskKind {
        TaskKind::from_inputs(self.request.image.is_some(), self.request.mask.is_some())
    }

    /// Whether `other` can run in the same engine call as this job: equal
    /// in everything but its prompts, negative prompts and seeds (model,
    /// images per prompt, steps, guidance, size, scheduler, inputs,
    /// strength, LoRAs, sequence length, tiling, precision), and both without negative
    /// prompts or both with one per prompt.
    pub fn batches_with(&self, other: &Job) -> bool {
        let per_prompt = |j: &Job| {
            j.request.negative_prompts.is_empty()
                || j.request.negative_prompts.len() == j.request.prompts.len()
        };
        let (a, b) = (&self.request, &other.request);
        per_prompt(self)
            && per_prompt(other)
            && a.negative_prompts.is_empty() == b.negative_prompts.is_empty()
            && self.model == other.model
            && a.num_images_per_prompt == b.num_images_per_prompt
            && a.num_inference_steps == b.num_inference_steps
            && a.guidance_scale.to_bits() == b.guidance_scale.to_bits()
            && (a.width, a.height) == (b.width, b.height)
            && a.scheduler == b.scheduler
            && a.strength.to_bits() == b.strength.to_bits()
            && self.loras == other.loras
            && a.max_sequence_length == b.max_sequence_length
            && a.tiling == b.tiling
            && self.precision == other.precision
            && a.image == b.image
            && a.mask == b.mask
    }

    /// Append `other`'s prompts, negative prompts and seeds to this job, so
    /// that one engine call runs both (prompt `i` with its own seeds, in
    /// order), when it [batches with](Self::batches_with) this job.
    /// Returns whether it did; this job is unchanged when not.
    pub fn append(&mut self, other: &Job) -> bool {
        if !self.batches_with(other) {
            return false;
        }
        let (a, b) = (&mut self.request, &other.request);
        a.prompts.extend(b.prompts.iter().cloned());
        a.negative_prompts
            .extend(b.negative_prompts.iter().cloned());
        self.seeds.extend(other.seeds.iter().copied());
        true
    }
}

/// A seed from the standard library's per-process random hasher keys and
/// the clock (a fresh `RandomState` is randomly keyed), for requests that
/// give none; the seed used is always reported.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// The size an init image of `image` (width, height) pixels sets where the
/// request gives none (`given` width / height): each side rounded down to
/// the model's size `multiple` (16 for FLUX), as diffusers' image processor
/// does; a given side is returned as given (its range is checked with the
/// request). The one rule for `easel generate`, `easel flow run` and the
/// server's submit step.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `width` or `height` when a side that
/// is not given rounds down outside `multiple..=2048`.
pub fn init_image_size(
    image: (usize, usize),
    given: (Option<u32>, Option<u32>),
    multiple: usize,
) -> Result<(usize, usize)> {
    let f = multiple.max(1);
    let mut size = [0usize; 2];
    for (slot, (field, pixels, given)) in size
        .iter_mut()
        .zip([("width", image.0, given.0), ("height", image.1, given.1)])
    {
        *slot = match given {
            Some(v) => v as usize,
            None => {
                let v = pixels / f * f;
                if !(f..=SIZE_MAX).contains(&v) {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "{v} (the init image is {}x{}, rounded down to a multiple of {f}) \
                             is out of range (allowed: {f} to {SIZE_MAX}); give {field} to resize it",
                            image.0, image.1
                        ),
                    ));
                }
                v
            }
        };
    }
    Ok((size[0], size[1]))
}

impl JobRequest {
    /// A request for `model` with `params` and nothing else.
    pub fn new(model: impl Into<String>, params: GenerationParams) -> Self {
        Self {
            model: model.into(),
            params,
            ..Self::default()
        }
    }

    /// Resolve this request against the loaded model's `defaults` into a
    /// [`Job`], as `easel generate` always has:
    /// - size: `width` / `height` as given; else the init image's size
    ///   rounded down to the model's size multiple (diffusers' behaviour),
    ///   which must then lie in `multiple..=2048`; else the model's native
    ///   size;
    /// - steps, guidance scale, strength: as given, else the model's;
    /// - seeds: `seed + i` (wrapping) for image `i`, the seed random when
    ///   not given.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field: `strength` without an
    /// image, out of 0..=1, or so small that `floor(steps x strength)` runs
    /// no denoising step; an `image` / `mask` the model's family does not
    /// take ([`check_inputs_for_family`]: a mask without an image, a mask
    /// for FLUX.1 schnell / dev, FLUX.1 Fill without both); a `width` / `height`
    /// taken from the init image outside the allowed range; a batch size
    /// of 0.
    pub fn build(&self, defaults: &ModelDefaults) -> Result<Job> {
        let p = &self.params;
        check_inputs_for_family(
            Some(defaults.family),
            self.image.is_some(),
            self.mask.is_some(),
        )?;
        if self.image.is_none() && self.strength.is_some() {
            return Err(Error::invalid(
                "strength",
                "applies to image-to-image and inpainting; give an image too",
            ));
        }
        let strength = self.strength.unwrap_or(defaults.strength);
        if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid(
                "strength",
                format!("{strength} is out of range (allowed: 0 to 1)"),
            ));
        }
        let (native_w, native_h) = match &self.image {
            Some(image) => init_image_size(
                (image.width, image.height),
                (p.width, p.height),
                defaults.size_multiple,
            )?,
            None => (defaults.width, defaults.height),
        };
        let width = p.width.map_or(native_w, |w| w as usize);
        let height = p.height.map_or(native_h, |h| h as usize);
        let steps = p.steps.map_or(defaults.steps, |s| s as usize);
        if self.image.is_some() && (steps as f64 * strength) as usize == 0 {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{strength} with {steps} steps runs no denoising step (floor(steps x strength) = 0); \
                     raise strength to at least {:.4} or use more steps",
                    1.0 / steps as f64
                ),
            ));
        }
        let batch = p.batch_size_or_default() as u64;
        if batch == 0 {
            return Err(Error::invalid("batchSize", "must be at least 1"));
        }
        let seed = p.seed.unwrap_or_else(random_seed);
        Ok(Job {
            model: self.model.clone(),
            request: GenerationRequest {
                prompts: vec![p.prompt.clone()],
                negative_prompts: p.negative_prompt.iter().cloned().collect(),
                num_images_per_prompt: batch as usize,
                num_inference_steps: steps,
                guidance_scale: p.guidance_scale.unwrap_or(defaults.guidance_scale),
                width,
                height,
                scheduler: p.scheduler.clone(),
                image: self.image.clone(),
                mask: self.mask.clone(),
                strength,
                max_sequence_length: self.max_sequence_length,
                tiling: self.tiling,
                vae_tiling: crate::models::vae_tiling::VaeTiling::Auto,
            },
            seeds: (0..batch).map(|i| seed.wrapping_add(i)).collect(),
            loras: self.loras.clone(),
            precision: p.precision,
        })
    }
}

/// A LoRA adapter as it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedLora {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Its scale.
    pub scale: f64,
}

/// The parameters a job ran with, every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedParams {
    /// The pipeline class (`StableDiffusionPipeline`, ...).
    pub pipeline: String,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Its σ ramp when not the class default (`karras`, `exponential`).
    pub sigma_schedule: Option<String>,
    /// One seed per image, in image order.
    pub seeds: Vec<u64>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Image-to-image strength; `None` without an init image.
    pub strength: Option<f64>,
    /// What the job did.
    pub task: TaskKind,
    /// The LoRA adapters merged.
    pub loras: Vec<ResolvedLora>,
    /// Seamless tiling.
    pub tiling: bool,
    /// The precision the models computed in (what ran, whatever was
    /// requested; see [`super::precision::compute_precision`]).
    pub compute_precision: easel_core::params::Precision,
    /// Things the user should know (a prompt truncated to the encoder's
    /// 77 tokens, ...).
    pub warnings: Vec<String>,
}

/// What a job produced.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// One 8-bit RGB buffer (`width * height * 3` bytes, row-major) per
    /// image, in seed order.
    pub images: Vec<Vec<u8>>,
    /// The parameters it ran with.
    pub params: ResolvedParams,
    /// Wall-clock time of each stage.
    pub timings: StageTimings,
    /// How many values of the final latents (what the VAE decoded) are not
    /// finite (NaN or ±infinity): 0 for a sound run. Anything else means
    /// the denoiser overflowed and the images are not meaningful; the run
    /// then also carries a warning saying so.
    pub non_finite_latents: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::ModelFamily;

    fn sd15() -> ModelDefaults {
        ModelDefaults {
            pipeline: "StableDiffusionPipeline".into(),
            family: ModelFamily::StableDiffusion,
            width: 512,
            height: 512,
            steps: 25,
            guidance_scale: 7.5,
            strength: 0.8,
            scheduler: "PNDMScheduler".into(),
            size_multiple: 8,
        }
    }

    fn image(width: usize, height: usize) -> ImageInput {
        ImageInput {
            width,
            height,
            rgb: vec![0; width * height * 3],
        }
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let params = GenerationParams {
            seed: Some(u64::MAX),
            batch_size: Some(2),
            ..GenerationParams::new("a fox")
        };
        let job = JobRequest::new("m", params).build(&sd15()).unwrap();
        assert_eq!(
            (
                job.request.width,
                job.request.height,
                job.request.num_inference_steps
            ),
            (512, 512, 25)
        );
        assert_eq!(job.request.guidance_scale, 7.5);
        // Seeds wrap, image i uses seed + i.
        assert_eq!(job.seeds, [u64::MAX, 0]);
        assert_eq!(job.request.num_images_per_prompt, 2);
        assert_eq!(job.task(), TaskKind::TextToImage);
        assert!(!job.request.tiling);
    }

    #[test]
    fn the_init_image_sets_the_size_rounded_down_to_the_multiple() {
        let request = JobRequest {
            image: Some(image(70, 41)),
            tiling: true,
            ..JobRequest::new("m", GenerationParams::new("x"))
        };
        let job = request.build(&sd15()).unwrap();
        assert_eq!((job.request.width, job.request.height), (64, 40));
        assert_eq!(job.request.strength, 0.8);
        assert_eq!(job.task(), TaskKind::ImageToImage);
        assert!(job.request.tiling);
        // Too small once rounded down: named, with the fix.
        let request = JobRequest {
            image: Some(image(64, 7)),
            ..JobRequest::new("m", GenerationParams::new("x"))
        };
        let e = request.build(&sd15()).unwrap_err().to_string();
        assert!(
            e.contains("height") && e.contains("allowed: 8 to 2048"),
            "{e}"
        );
    }

    #[test]
    fn the_family_decides_which_inputs_a_job_takes() {
        let mask = || MaskInput {
            width: 64,
            height: 64,
            luma: vec![255; 64 * 64],
        };
        let field_of = |defaults: &ModelDefaults, image: bool, mask_too: bool| {
            let request = JobRequest {
                image: image.then(image_64),
                mask: mask_too.then(mask),
                ..JobRequest::new("m", GenerationParams::new("x"))
            };
            match request.build(defaults) {
                Ok(job) => job.task().as_str().to_string(),
                Err(Error::InvalidArgument { field, .. }) => format!("refused {field}"),
                Err(e) => panic!("unexpected error {e}"),
            }
        };
        let flux_fill = ModelDefaults {
            family: ModelFamily::FluxFill,
            strength: 1.0,
            size_multiple: 16,
            ..sd15()
        };
        let flux = ModelDefaults {
            family: ModelFamily::Flux,
            ..flux_fill.clone()
        };
        assert_eq!(field_of(&sd15(), false, true), "refused mask");
        assert_eq!(field_of(&sd15(), true, true), "inpainting");
        assert_eq!(field_of(&flux, true, true), "refused mask");
        assert_eq!(field_of(&flux_fill, true, false), "refused mask");
        assert_eq!(field_of(&flux_fill, false, false), "refused image");
        assert_eq!(field_of(&flux_fill, true, true), "inpainting");
        // FLUX.1 Fill's default strength is the family's 1.0.
        let job = JobRequest {
            image: Some(image_64()),
            mask: Some(mask()),
            ..JobRequest::new("m", GenerationParams::new("x"))
        }
        .build(&flux_fill)
        .unwrap();
        assert_eq!(job.request.strength, 1.0);
    }

    fn image_64() -> ImageInput {
        image(64, 64)
    }

    #[test]
    fn jobs_with_equal_settings_append_into_one_call() {
        let build = |prompt: &str, seed: u64, negative: Option<&str>, steps: u32| {
            JobRequest::new(
                "m",
                GenerationParams {
                    seed: Some(seed),
                    batch_size: Some(2),
                    steps: Some(steps),
                    negative_prompt: negative.map(str::to_string),
                    ..GenerationParams::new(prompt)
                },
            )
            .build(&sd15())
            .unwrap()
        };
        let mut job = build("a", 10, Some("blur"), 5);
        assert!(job.append(&build("b", 20, Some("dark"), 5)));
        assert_eq!(job.request.prompts, ["a", "b"]);
        assert_eq!(job.request.negative_prompts, ["blur", "dark"]);
        assert_eq!(job.seeds, [10, 11, 20, 21]);
        assert_eq!(job.request.num_images_per_prompt, 2);
        // Other settings, or one with a negative prompt and one without:
        // refused, the job unchanged.
        assert!(!job.append(&build("c", 30, Some("x"), 6)));
        assert!(!job.append(&build("c", 30, None, 5)));
        assert_eq!(job.seeds.len(), 4);
        let mut plain = build("a", 1, None, 5);
        assert!(plain.append(&build("b", 2, None, 5)));
        assert!(plain.request.negative_prompts.is_empty());
    }

    #[test]
    fn strength_is_checked_against_the_image_and_the_steps() {
        let no_image = JobRequest {
            strength: Some(0.5),
            ..JobRequest::new("m", GenerationParams::new("x"))
        };
        let e = no_image.build(&sd15()).unwrap_err().to_string();
        assert!(e.contains("strength") && e.contains("image"), "{e}");
        let no_step = JobRequest {
            image: Some(image(64, 64)),
            strength: Some(0.1),
            ..JobRequest::new(
                "m",
                GenerationParams {
                    steps: Some(5),
                    ..GenerationParams::new("x")
                },
            )
        };
        let e = no_step.build(&sd15()).unwrap_err().to_string();
        assert!(
            e.contains("no denoising step") && e.contains("0.2000"),
            "{e}"
        );
    }
}
