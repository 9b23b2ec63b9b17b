//! Stages 2 and 3 for image-to-image and inpainting, shared by the Stable
//! Diffusion and SDXL pipelines: the schedule shortened by `strength`, the
//! init image encoded by the VAE and noised to the start timestep, and the
//! mask and masked-image latents of inpainting.
//!
//! They follow diffusers' `StableDiffusionImg2ImgPipeline`,
//! `StableDiffusionInpaintPipeline` and their SDXL counterparts
//! (`get_timesteps`, `prepare_latents`, `prepare_mask_latents`), including
//! the order of the Gaussian draws, which decides which recorded or seeded
//! noise goes where:
//!
//! | task | draws, in order |
//! | --- | --- |
//! | image-to-image | VAE posterior sample of the init image; the noise for `add_noise` |
//! | inpaint, 9-channel UNet, strength 1 | initial latents; VAE posterior sample of the masked image |
//! | inpaint, 9-channel UNet, strength < 1 | posterior sample of the init image; the noise; posterior sample of the masked image |
//! | inpaint, 4-channel UNet | posterior sample of the init image; the noise; posterior sample of the masked image (drawn, unused) |
//!
//! Every draw has the batch's shape, so with one generator per image (the
//! CLI's and the server's [`crate::noise::PerImageGenerators`]) image `i`
//! depends on its own seed only. For a batch of one this is exactly
//! diffusers; for larger batches it is diffusers with a list of generators
//! for image-to-image, while diffusers' inpaint pipelines draw the posterior
//! samples of their single init image from the first generator only.

use candle_core::{Device, Tensor};

use super::offload::Held;
use super::{GenerationRequest, RunContext};
use crate::error::{Error, Result};
use crate::image_processor::{interpolate_nearest, preprocess_image, preprocess_mask};
use crate::loader::ModelFamily;
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::schedulers::Scheduler;

/// The task of a request (moved to `pipelines/task.rs`, beside the rule
/// that decides it; kept here for its old path).
pub use super::task::Task;

/// The inpainting inputs the denoising loop uses at every step.
pub struct InpaintConditioning {
    /// `(batch, 1, h, w)`: 1 repaints, 0 keeps, at latent resolution.
    pub mask: Tensor,
    /// 9-channel UNets: `(batch, 4, h, w)` scaled latents of the init image
    /// with the repainted region set to 0 (grey), concatenated to the input.
    pub masked_image_latents: Option<Tensor>,
    /// 4-channel UNets: the scaled init-image latents and the noise, used to
    /// re-impose the kept region after every step.
    pub known: Option<(Tensor, Tensor)>,
}

/// The output of stages 2 and 3.
pub struct PreparedLatents {
    /// The scheduler, set to the full schedule and, for image tasks, to its
    /// begin index.
    pub scheduler: Box<dyn Scheduler>,
    /// `(batch, 4, h, w)` latents to start denoising from.
    pub latents: Tensor,
    /// Index into `scheduler.timesteps()` of the first step that runs.
    pub begin: usize,
    /// Inpainting inputs, when the task is inpainting.
    pub inpaint: Option<InpaintConditioning>,
}

/// diffusers' `get_timesteps`: with `steps` steps and `strength` s, the
/// steps `rule` leaves run (Stable Diffusion: the last
/// `min(floor(steps · s), steps)`); the scheduler starts at
/// `t_start · order`. Returns that begin index.
///
/// Errors when no step would run (`floor(steps · s) = 0`), naming the
/// smallest strength that runs one step, as diffusers' inpaint pipeline
/// refuses it (its image-to-image pipeline would fail later).
pub fn strength_begin_index(
    scheduler: &mut dyn Scheduler,
    rule: StrengthRule,
    steps: usize,
    strength: f64,
) -> Result<usize> {
    let t_start = strength_start_step(rule, steps, strength)?;
    let begin = t_start * scheduler.order();
    if begin >= scheduler.timesteps().len() {
        return Err(Error::invalid(
            "strength",
            format!("strength {strength} leaves no denoising step"),
        ));
    }
    scheduler.set_begin_index(begin);
    Ok(begin)
}

/// How a pipeline shortens its schedule for `strength` (kept with the
/// model family's facts in the loader; re-exported here for its old path).
pub use crate::loader::StrengthRule;

/// The index of the first of `steps` steps that runs for `strength` under
/// `rule` (`t_start`; the scheduler's begin index is `t_start · order`).
/// The pipelines call this when they run, and the server before it accepts
/// a job, so both refuse the same requests.
///
/// # Errors
/// An invalid `strength` when it is outside 0..=1 or leaves no denoising
/// step, naming the smallest strength that runs one.
pub fn strength_start_step(rule: StrengthRule, steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let no_step = || {
        Error::invalid(
            "strength",
            match rule {
                StrengthRule::Floor => format!(
                    "strength {strength} with {steps} steps leaves no denoising step \
                     (floor(steps x strength) = 0); use a strength of at least {:.4} or more steps",
                    1.0 / steps.max(1) as f64
                ),
                StrengthRule::Fractional => {
                    format!("strength {strength} leaves no denoising step; use a strength above 0")
                }
            },
        )
    };
    let t_start = match rule {
        StrengthRule::Floor => {
            let init = ((steps as f64 * strength) as usize).min(steps);
            if init == 0 {
                return Err(no_step());
            }
            steps - init
        }
        StrengthRule::Fractional => {
            let init = (steps as f64 * strength).min(steps as f64);
            (steps as f64 - init).max(0.0) as usize
        }
    };
    if t_start >= steps {
        return Err(no_step());
    }
    Ok(t_start)
}

/// Check `strength` is a number in 0..=1.
pub fn check_strength(strength: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(
            "strength",
            format!("strength must be between 0 and 1, but is {strength}"),
        ));
    }
    Ok(())
}

/// Encode `image` (`(1, 3, H, W)` in [-1, 1]) and draw its posterior sample
/// for `batch` images: `scaling_factor · (mean + std · ε)` with ε of shape
/// `(batch, 4, H/8, W/8)` from the job's noise (one draw).
fn encode_sample(
    vae: &Held<AutoencoderKL>,
    image: &Tensor,
    batch: usize,
    ctx: &mut RunContext<'_>,
) -> Result<Tensor> {
    // Under `model` offload the VAE is built on the device for this encode.
    let dist = vae.get()?.encode(image)?;
    let (_, c, h, w) = dist.mean.dims4()?;
    let shape = (batch, c, h, w);
    let dist = crate::models::autoencoder_kl::DiagonalGaussian {
        mean: dist.mean.broadcast_as(shape)?.contiguous()?,
        std: dist.std.broadcast_as(shape)?.contiguous()?,
    };
    Ok((dist.sample(ctx.noise)? * vae.config().scaling_factor)?)
}

/// Stages 2 and 3 for any task: the scheduler (`scheduler` set to the
/// request's steps), the starting latents and the inpainting inputs.
///
/// `unet_in_channels` decides how inpainting runs: 9 (an inpainting UNet:
/// latents + mask + masked-image latents) or 4 (a regular UNet: the kept
/// region is re-imposed after every step).
///
/// `family` is the model's: its input rule decides the task ([`Task::of`]),
/// its strength rule how the schedule is shortened.
///
/// Errors: a 9-channel UNet without image and mask, a UNet with another
/// channel count for an image task, a strength out of 0..=1 or too small
/// to run a step, a mask whose aspect ratio differs from the image's.
pub fn prepare_latents(
    vae: &Held<AutoencoderKL>,
    unet_in_channels: usize,
    mut scheduler: Box<dyn Scheduler>,
    request: &GenerationRequest,
    family: ModelFamily,
    ctx: &mut RunContext<'_>,
    device: &Device,
) -> Result<PreparedLatents> {
    let task = Task::of(family, request)?;
    let f = vae.config().vae_scale_factor();
    let c = vae.config().latent_channels;
    let batch = request.batch_size();
    let (h, w) = (request.height / f, request.width / f);
    let shape = [batch, c, h, w];
    let inpainting_unet = unet_in_channels == 2 * c + 1;
    if inpainting_unet && !matches!(task, Task::Inpaint(..)) {
        return Err(Error::invalid(
            "mask",
            format!(
                "this is an inpainting model ({unet_in_channels}-channel UNet): \
                 it needs an init image and a mask"
            ),
        ));
    }
    if !inpainting_unet && unet_in_channels != c {
        return Err(Error::config(
            "unet",
            format!("a UNet with {unet_in_channels} input channels is not supported (expected {c}, or {} for inpainting)", 2 * c + 1),
        ));
    }

    let (image, mask) = match task {
        Task::TextToImage => {
            // Pure noise scaled by the initial sigma, the whole schedule.
            let latents = (ctx.noise.randn(&shape, device)? * scheduler.init_noise_sigma())?;
            return Ok(PreparedLatents {
                scheduler,
                latents,
                begin: 0,
                inpaint: None,
            });
        }
        Task::ImageToImage(image) => (image, None),
        Task::Inpaint(image, mask) => (image, Some(mask)),
    };
    // strength_begin_index checks the strength (range, and that a step runs).
    let begin = strength_begin_index(
        scheduler.as_mut(),
        family.strength_rule(),
        request.num_inference_steps,
        request.strength,
    )?;
    let latent_timestep = scheduler.timesteps()[begin];
    let init_image = preprocess_image(image, request.width, request.height, device)?;

    let Some(mask) = mask else {
        // Image-to-image: posterior sample, then noise to the start timestep.
        let init_latents = encode_sample(vae, &init_image, batch, ctx)?;
        let noise = ctx.noise.randn(&shape, device)?;
        let latents = scheduler.add_noise(&init_latents, &noise, latent_timestep)?;
        return Ok(PreparedLatents {
            scheduler,
            latents,
            begin,
            inpaint: None,
        });
    };

    // Inpainting.
    let is_strength_max = request.strength == 1.0;
    let image_latents = if !inpainting_unet || !is_strength_max {
        Some(encode_sample(vae, &init_image, batch, ctx)?)
    } else {
        None
    };
    let noise = ctx.noise.randn(&shape, device)?;
    let latents = match (&image_latents, is_strength_max) {
        (Some(il), false) => scheduler.add_noise(il, &noise, latent_timestep)?,
        _ => (&noise * scheduler.init_noise_sigma())?,
    };
    let mask_condition = preprocess_mask(
        mask,
        (image.width, image.height),
        request.width,
        request.height,
        device,
    )?;
    // The repainted region of the init image becomes 0 (mid grey).
    let keep = mask_condition.lt(0.5)?.to_dtype(init_image.dtype())?;
    let masked_image = init_image.broadcast_mul(&keep)?;
    let mask_latent = interpolate_nearest(&mask_condition, h, w)?
        .broadcast_as((batch, 1, h, w))?
        .contiguous()?;
    let masked_image_latents = encode_masked(vae, &masked_image, batch, inpainting_unet, ctx)?;
    Ok(PreparedLatents {
        scheduler,
        latents,
        begin,
        inpaint: Some(InpaintConditioning {
            mask: mask_latent,
            masked_image_latents,
            known: if inpainting_unet {
                None
            } else {
                image_latents.map(|il| (il, noise))
            },
        }),
    })
}

/// The masked image's latents for a 9-channel UNet. A 4-channel UNet does
/// not use them, but diffusers still encodes them and so draws a posterior
/// sample; the draw is made (and discarded) to keep later draws in step.
fn encode_masked(
    vae: &Held<AutoencoderKL>,
    masked_image: &Tensor,
    batch: usize,
    needed: bool,
    ctx: &mut RunContext<'_>,
) -> Result<Option<Tensor>> {
    if needed {
        return Ok(Some(encode_sample(vae, masked_image, batch, ctx)?));
    }
    let f = vae.config().vae_scale_factor();
    let (_, _, h, w) = masked_image.dims4()?;
    let shape = [batch, vae.config().latent_channels, h / f, w / f];
    ctx.noise.randn(&shape, masked_image.device())?;
    Ok(None)
}
