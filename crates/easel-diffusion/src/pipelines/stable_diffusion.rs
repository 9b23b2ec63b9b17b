//! `StableDiffusionPipeline` (SD 1.x and 2.x; epsilon or v prediction, as
//! the scheduler config says), following diffusers'
//! `pipeline_stable_diffusion.py`.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::{
    decode_to_images, denoise, load_vae, prepare_scheduler, repeat_interleave_batch, tokenize_clip,
    GenerationOutput, GenerationRequest, Progress, RunContext, StageTimings,
};
use crate::error::{Error, Result};
use crate::loader::ModelDir;
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::tokenizer::ClipTokenizer;

/// A loaded Stable Diffusion 1.x / 2.x pipeline.
pub struct StableDiffusionPipeline {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    /// The model's `scheduler/scheduler_config.json`.
    pub scheduler_config: serde_json::Value,
    device: Device,
}

impl StableDiffusionPipeline {
    /// Load every component from `model` onto `device`.
    pub fn load(model: &ModelDir, device: &Device) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(&model.component_dir("tokenizer")?)?;
        let te_cfg: ClipTextConfig =
            crate::models::read_config(&model.component_dir("text_encoder")?.join("config.json"))?;
        let text_encoder = ClipTextModel::load(
            &super::component_weights(model, "text_encoder", device)?,
            &te_cfg,
        )?;
        let unet_cfg: UNet2DConditionConfig =
            crate::models::read_config(&model.component_dir("unet")?.join("config.json"))?;
        let unet = UNet2DConditionModel::load(
            &super::component_weights(model, "unet", device)?,
            &unet_cfg,
        )?;
        let vae = load_vae(model, device, false)?;
        let scheduler_config = model.component_config("scheduler")?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
        })
    }

    /// The VAE scale factor (8).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().vae_scale_factor()
    }

    /// Native `(width, height)`: UNet `sample_size` × VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        let (h, w) = self.unet.config().sample_size().unwrap_or((64, 64));
        (w * f, h * f)
    }

    /// Stage 1: `(prompt_embeds, negative_prompt_embeds)`, each
    /// `(batch * num_images_per_prompt, 77, hidden)`; the negative half only
    /// with guidance (an absent negative prompt encodes `""`).
    fn encode_prompt(
        &self,
        request: &GenerationRequest,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ids = request
            .prompts
            .iter()
            .map(|p| tokenize_clip(&self.tokenizer, p, warnings))
            .collect::<Result<Vec<_>>>()?;
        let embeds = self
            .text_encoder
            .forward(&ids, &self.device)?
            .last_hidden_state;
        let embeds = repeat_interleave_batch(&embeds, request.num_images_per_prompt)?;
        if !request.do_classifier_free_guidance() {
            return Ok((embeds, None));
        }
        let neg_ids = (0..request.prompts.len())
            .map(|i| {
                tokenize_clip(
                    &self.tokenizer,
                    request.negative_for(i).unwrap_or(""),
                    warnings,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let neg = self
            .text_encoder
            .forward(&neg_ids, &self.device)?
            .last_hidden_state;
        let neg = repeat_interleave_batch(&neg, request.num_images_per_prompt)?;
        Ok((embeds, Some(neg)))
    }

    /// Run the pipeline.
    pub fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        let f = self.vae_scale_factor();
        request.check(f)?;
        if request.image.is_some() || request.mask.is_some() {
            return Err(Error::invalid(
                "image",
                "image-to-image and inpainting are not supported by this pipeline yet",
            ));
        }
        let mut timings = StageTimings::default();

        // 1. Encode the prompt.
        let t0 = Instant::now();
        let mut warnings = Vec::new();
        let (embeds, negative) = self.encode_prompt(request, &mut warnings)?;
        let context = match &negative {
            Some(neg) => Tensor::cat(&[neg, &embeds], 0)?,
            None => embeds,
        };
        timings.text_encoding = t0.elapsed();
        (ctx.progress)(Progress::PromptEncoded);

        // 2. Prepare the timesteps.
        let mut scheduler = prepare_scheduler(
            &self.scheduler_config,
            request.scheduler.as_deref(),
            request.num_inference_steps,
        )?;

        // 3. Prepare the latents: N(0, 1) noise scaled by the scheduler's initial sigma.
        let shape = [
            request.batch_size(),
            self.unet.config().in_channels,
            request.height / f,
            request.width / f,
        ];
        let latents = (ctx.noise.randn(&shape, &self.device)? * scheduler.init_noise_sigma())?;

        // 4. Denoise.
        let t0 = Instant::now();
        let guidance = request
            .do_classifier_free_guidance()
            .then_some(request.guidance_scale);
        let latents = denoise(
            scheduler.as_mut(),
            latents,
            guidance,
            |x, t| self.unet.forward(x, t, &context, None),
            ctx,
            &mut timings,
        )?;
        timings.denoising = t0.elapsed();

        // 5. Decode, 6. post-process.
        let t0 = Instant::now();
        let latents_to_vae = (latents / self.vae.config().scaling_factor)?;
        let images = decode_to_images(&self.vae, &latents_to_vae)?;
        timings.vae_decode = t0.elapsed();
        (ctx.progress)(Progress::Decoded);
        timings.total = started.elapsed();
        Ok(GenerationOutput {
            images,
            latents_to_vae,
            scheduler: scheduler.class_name().to_string(),
            timings,
            warnings,
        })
    }
}
