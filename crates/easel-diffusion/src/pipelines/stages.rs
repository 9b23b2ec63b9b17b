//! Stage helpers shared by the pipelines: CLIP tokenizing with truncation
//! warnings (stage 1), the scheduler for a request (stage 2), the
//! classifier-free-guidance denoising loop (stage 4), decoding to images
//! (stages 5 and 6), and batch repetition.

use std::time::Instant;

use candle_core::Tensor;

use super::{init_image, GenerationRequest, Progress, RunContext, StageTimings};
use crate::error::Result;
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::vae_tiling::{VaeTileLayout, VaeTiling};
use crate::schedulers::{build_scheduler, Scheduler, TimestepsRequest};
use crate::tokenizer::ClipTokenizer;

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
        ctx.report(Progress::Step { step: i + 1, total });
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
/// The decode is tiled as `request.vae_tiling` resolves
/// ([`VaeTiling::resolve`]); when `auto` chose tiling a note goes to
/// `warnings` (the pixels differ from an untiled decode).
///
/// # Errors
/// VAE tiling `on` with seamless tiling; a failed decode.
pub fn decode_to_images(
    vae: &AutoencoderKL,
    latents_to_vae: &Tensor,
    request: &GenerationRequest,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let tiled = request
        .vae_tiling
        .resolve(vae.config(), latents_to_vae, request.tiling)?;
    if tiled && request.vae_tiling == VaeTiling::Auto {
        let layout = VaeTileLayout::from_config(vae.config())?;
        let (_, _, h, w) = latents_to_vae.dims4()?;
        let (rows, cols) = layout.grid(h, w);
        let f = vae.config().vae_scale_factor();
        warnings.push(format!(
            "the VAE decoded the {}x{} image in {} overlapping tiles of {}x{} pixels \
             (VAE tiling auto, as diffusers' enable_vae_tiling), to bound its memory; \
             VAE tiling off decodes it whole",
            w * f,
            h * f,
            rows * cols,
            layout.tile_sample_min_size,
            layout.tile_sample_min_size
        ));
    }
    let decoded = vae.decode_with_tiling(latents_to_vae, tiled)?;
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
