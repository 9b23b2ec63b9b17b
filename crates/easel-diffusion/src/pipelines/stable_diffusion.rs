//! `StableDiffusionPipeline` (SD 1.x and 2.x; epsilon or v prediction, as
//! the scheduler config says), following diffusers'
//! `pipeline_stable_diffusion.py`.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::DiffusionPipeline;
use super::{
    decode_to_images, denoise_from, held_text_encoder, held_unet, held_vae,
    init_image::prepare_latents, prepare_scheduler, repeat_interleave_batch, tokenize_clip,
    GenerationOutput, GenerationRequest, Progress, RunContext, StageTimings,
};
use crate::error::Result;
use crate::loader::{ModelDir, ModelFamily};
use crate::lora::{LoraSpec, LoraState};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::tokenizer::ClipTokenizer;

use super::offload::{Held, Offload};

/// A loaded Stable Diffusion 1.x / 2.x pipeline (also the inpainting
/// models of `StableDiffusionInpaintPipeline`, whose UNet takes 9 channels).
pub struct StableDiffusionPipeline {
    class_name: &'static str,
    tokenizer: ClipTokenizer,
    text_encoder: Held<ClipTextModel>,
    unet: Held<UNet2DConditionModel>,
    vae: Held<AutoencoderKL>,
    lora: LoraState,
    /// The model's `scheduler/scheduler_config.json`.
    scheduler_config: serde_json::Value,
    device: Device,
}

impl StableDiffusionPipeline {
    /// Load every component from `model` onto `device`. `class_name` is the
    /// model's `_class_name` (text-to-image, image-to-image and inpainting
    /// models share this pipeline).
    pub fn load(model: &ModelDir, device: &Device, class_name: &'static str) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(&model.component_dir("tokenizer")?)?;
        let text_encoder_config: ClipTextConfig =
            crate::models::read_config(&model.component_dir("text_encoder")?.join("config.json"))?;
        let unet_config: UNet2DConditionConfig =
            crate::models::read_config(&model.component_dir("unet")?.join("config.json"))?;
        let lora = LoraState::new(
            super::lora_sources(model, ModelFamily::StableDiffusion)?,
            unet_config.uniform_layers_per_block(),
            model.compute_dtype(),
            device,
            model.offload(),
        );
        let offloaded = model.offload() == Offload::Model;
        let text_encoder = held_text_encoder(
            offloaded,
            lora.base_weights("text_encoder")?,
            text_encoder_config,
        )?;
        let unet = held_unet(offloaded, lora.base_weights("unet")?, unet_config)?;
        let vae = held_vae(model, device, true, false)?;
        let scheduler_config = model.component_config("scheduler")?;
        Ok(Self {
            class_name,
            tokenizer,
            text_encoder,
            unet,
            vae,
            lora,
            scheduler_config,
            device: device.clone(),
        })
    }

    /// Stage 1: `(prompt_embeds, negative_prompt_embeds)`, each
    /// `(batch * num_images_per_prompt, 77, hidden)`; the negative half only
    /// with guidance (an absent negative prompt encodes `""`).
    fn encode_prompt(
        &self,
        request: &GenerationRequest,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut ids = request
            .prompts
            .iter()
            .map(|p| tokenize_clip(&self.tokenizer, p, warnings))
            .collect::<Result<Vec<_>>>()?;
        let prompts = ids.len();
        if request.do_classifier_free_guidance() {
            for i in 0..prompts {
                ids.push(tokenize_clip(
                    &self.tokenizer,
                    request.negative_for(i).unwrap_or(""),
                    warnings,
                )?);
            }
        }
        // Prompts and negative prompts in one call: every sequence is
        // padded to 77 tokens and CLIP masks nothing but the causal
        // future, and the encoder runs each row on its own, so each row is
        // what its own call gives.
        let all = self
            .text_encoder
            .get()?
            .forward(&ids, &self.device)?
            .last_hidden_state;
        let embeds =
            repeat_interleave_batch(&all.narrow(0, 0, prompts)?, request.num_images_per_prompt)?;
        if !request.do_classifier_free_guidance() {
            return Ok((embeds, None));
        }
        let neg = repeat_interleave_batch(
            &all.narrow(0, prompts, prompts)?.contiguous()?,
            request.num_images_per_prompt,
        )?;
        Ok((embeds, Some(neg)))
    }
}

impl DiffusionPipeline for StableDiffusionPipeline {
    /// The diffusers pipeline class the model declares.
    fn class_name(&self) -> &'static str {
        self.class_name
    }

    /// Merge `loras` (stacked, each with its scale) into the text encoder
    /// and UNet, replacing the adapters merged before; `[]` restores the
    /// base model. The base weights come from memory, not from disk.
    ///
    /// Errors (the pipeline is left as it was): see
    /// [`crate::lora::merge_deltas`].
    fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
        if self.lora.active() == loras {
            return Ok(());
        }
        let (deltas, rebuild) = self.lora.plan(loras)?;
        let text_encoder = self.lora.rebuilt("text_encoder", &deltas, &rebuild, |w| {
            held_text_encoder(
                self.text_encoder.offloaded(),
                w.clone(),
                self.text_encoder.config().clone(),
            )
        })?;
        let unet = self.lora.rebuilt("unet", &deltas, &rebuild, |w| {
            held_unet(self.unet.offloaded(), w.clone(), self.unet.config().clone())
        })?;
        if let Some(t) = text_encoder {
            self.text_encoder = t;
        }
        if let Some(u) = unet {
            self.unet = u;
        }
        self.lora.commit(loras, &deltas);
        Ok(())
    }

    /// The adapters merged now.
    fn loras(&self) -> &[LoraSpec] {
        self.lora.active()
    }

    /// Tensors of the text encoder and UNet read from the weight files so
    /// far (switching LoRAs reads none).
    fn base_tensor_reads(&self) -> usize {
        self.lora.base_reads()
    }

    /// The VAE scale factor (8).
    fn vae_scale_factor(&self) -> usize {
        self.vae.config().vae_scale_factor()
    }

    /// Native `(width, height)`: UNet `sample_size` × VAE scale factor.
    fn default_size(&self) -> (usize, usize) {
        super::components::unet_native_size(
            self.unet.config(),
            self.vae_scale_factor(),
            self.family(),
        )
    }

    /// Run the pipeline.
    fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput> {
        // Seamless tiling: circular padding in every convolution of this run.
        let _tiling = crate::models::layers::circular_padding(request.tiling);
        let started = Instant::now();
        let f = self.vae_scale_factor();
        request.check(f)?;
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
        ctx.report(Progress::PromptEncoded);

        // 2. Prepare the timesteps (shortened by `strength` for image tasks),
        // 3. prepare the latents (noise, or the init image encoded and noised).
        let scheduler = prepare_scheduler(
            &self.scheduler_config,
            request.scheduler.as_deref(),
            request.num_inference_steps,
        )?;
        let prepared = prepare_latents(
            &self.vae,
            self.unet.config().in_channels,
            scheduler,
            request,
            self.family(),
            ctx,
            &self.device,
        )?;
        let mut scheduler = prepared.scheduler;

        // 4. Denoise.
        let t0 = Instant::now();
        let guidance = request
            .do_classifier_free_guidance()
            .then_some(request.guidance_scale);
        let unet = self.unet.get()?;
        let latents = denoise_from(
            scheduler.as_mut(),
            prepared.latents,
            prepared.begin,
            prepared.inpaint.as_ref(),
            guidance,
            |x, t| unet.forward(x, t, &context, None),
            ctx,
            &mut timings,
        )?;
        drop(unet);
        timings.denoising = t0.elapsed();

        // 5. Decode, 6. post-process.
        let t0 = Instant::now();
        let latents_to_vae = (latents / self.vae.config().scaling_factor)?;
        let images = decode_to_images(&*self.vae.get()?, &latents_to_vae, request, &mut warnings)?;
        timings.vae_decode = t0.elapsed();
        ctx.report(Progress::Decoded);
        timings.total = started.elapsed();
        Ok(GenerationOutput {
            images,
            latents_to_vae,
            scheduler: scheduler.class_name().to_string(),
            sigma_schedule: scheduler.sigma_schedule().map(str::to_string),
            timings,
            warnings,
        })
    }

    fn family(&self) -> ModelFamily {
        ModelFamily::StableDiffusion
    }

    fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }
}
