//! `FluxFillPipeline` (FLUX.1 Fill, Black Forest Labs 2024): inpainting,
//! following diffusers' `pipeline_flux_fill.py`. It shares every stage but
//! the latents' condition with [`super::flux`] (its `FluxComponents`); the
//! condition is the masked image's latents and the mask folded into 8x8
//! blocks, packed and concatenated to the transformer input.
//!
//! Randomness: the VAE posterior sample of the init image, then the noise,
//! then the posterior sample of the masked image, each of the full batch
//! shape (see [`super::flux`]).

use candle_core::{Device, Tensor};

use super::flux::{flux_component_methods, pack_latents, FluxComponents};
use super::{DiffusionPipeline, Task};
use super::{GenerationOutput, GenerationRequest, RunContext};
use crate::error::{Error, Result};
use crate::image_processor;
use crate::loader::{ModelDir, ModelFamily};
use crate::lora::LoraSpec;

/// A loaded `FluxFillPipeline` (FLUX.1 Fill): inpainting of `request.image`
/// where `request.mask` is white, conditioned on the masked image's latents
/// and the packed 8x8 mask.
pub struct FluxFillPipeline {
    components: FluxComponents,
}

impl FluxFillPipeline {
    /// Load every component from `model` onto `device`.
    ///
    /// Errors: as [`FluxPipeline::load`](super::flux::FluxPipeline::load); the transformer must take the
    /// latents, the masked-image latents and the mask (`in_channels` =
    /// 4 · latent channels · 2 + 4 · 64).
    pub fn load(model: &ModelDir, device: &Device) -> Result<Self> {
        let components = FluxComponents::load(model, device, ModelFamily::FluxFill)?;
        let f = components.vae_scale_factor();
        let want = components.latent_channels() * 4 * 2 + f * f * 4;
        let t = components.transformer.config().in_channels;
        if t != want {
            return Err(Error::config(
                "transformer",
                format!(
                    "in_channels {t} does not fit FluxFillPipeline (packed latents + masked-image latents + mask = {want})"
                ),
            ));
        }
        Ok(Self { components })
    }
}

impl DiffusionPipeline for FluxFillPipeline {
    flux_component_methods!();

    /// Run the pipeline on `request.image` and `request.mask` (both required,
    /// of the request's size), re-running `request.strength` of the schedule
    /// (diffusers' default 1.0: the whole schedule).
    ///
    /// Errors: a missing image or mask, sizes that disagree, a strength that
    /// leaves no step, cancellation, or a tensor error.
    fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput> {
        // Seamless tiling: circular padding in the VAE's convolutions (the
        // transformer has no spatial convolutions).
        let _tiling = crate::models::layers::circular_padding(request.tiling);
        let c = &self.components;
        let device = c.device.clone();
        // The family's mask rule (MaskRule::Required) refuses anything but
        // inpainting, with the messages users see.
        let Task::Inpaint(image, mask) = Task::of(self.family(), request)? else {
            return Err(Error::config(
                "FluxFillPipeline",
                "the FLUX.1 Fill mask rule let a request without image and mask through",
            ));
        };
        let (w, h) = (request.width, request.height);
        let init_image = image_processor::preprocess_image(image, w, h, &device)?;
        let mask =
            image_processor::preprocess_mask(mask, (image.width, image.height), w, h, &device)?;
        c.run(
            request,
            ctx,
            Some(request.strength),
            |c, scheduler, t_start, ctx| {
                let mut prepared =
                    c.prepare_latents(request, Some(&init_image), scheduler, t_start, ctx)?;
                prepared.condition = Some(c.prepare_mask_latents(
                    &init_image,
                    &mask,
                    request.batch_size(),
                    prepared.h,
                    prepared.w,
                    ctx,
                )?);
                Ok(prepared)
            },
        )
    }

    fn class_name(&self) -> &'static str {
        "FluxFillPipeline"
    }
}

impl FluxComponents {
    /// Fill's condition: the packed latents of `image · (1 − mask)` and the
    /// mask folded into 8x8 blocks and packed, concatenated,
    /// `(batch, h/2 · w/2, 4 · latent_channels + 4 · 64)`
    /// (diffusers' `prepare_mask_latents`).
    fn prepare_mask_latents(
        &self,
        image: &Tensor,
        mask: &Tensor,
        batch: usize,
        h: usize,
        w: usize,
        ctx: &mut RunContext<'_>,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let masked_image = image.broadcast_mul(&(1.0 - mask)?)?;
        let masked_latents = pack_latents(&self.encode_image(&masked_image, batch, ctx)?)?;
        let mask = mask
            .repeat((batch, 1, 1, 1))?
            .squeeze(1)?
            .reshape((batch, h, f, w, f))?
            .permute((0, 2, 4, 1, 3))?
            .reshape((batch, f * f, h, w))?;
        let mask = pack_latents(&mask)?;
        Ok(Tensor::cat(&[&masked_latents, &mask], 2)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::MaskInput;

    #[test]
    fn mask_binarizes_at_one_half() {
        let m = MaskInput {
            width: 3,
            height: 1,
            luma: vec![127, 128, 255],
        };
        let t: Vec<f32> = image_processor::preprocess_mask(&m, (3, 1), 3, 1, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(t, vec![0., 1., 1.]);
    }
}
