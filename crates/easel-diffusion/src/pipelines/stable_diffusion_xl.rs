//! `StableDiffusionXLPipeline`, following diffusers'
//! `pipeline_stable_diffusion_xl.py` (Podell et al. 2023, arXiv:2307.01952):
//! two CLIP text encoders whose penultimate hidden states are concatenated,
//! the pooled projection of the second as `text_embeds`, the `text_time`
//! micro-conditioning on (original size, crop, target size), and zero
//! negative embeddings for an absent negative prompt when the model's
//! `force_zeros_for_empty_prompt` is set.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::DiffusionPipeline;
use super::{
    decode_to_images, denoise_from, held_text_encoder, held_unet, held_vae,
    init_image::prepare_latents, prepare_scheduler, repeat_interleave_batch, tokenize_clip,
    GenerationOutput, GenerationRequest, Progress, RunContext, StageTimings,
};
use crate::error::{Error, Result};
use crate::loader::{ModelDir, ModelFamily};
use crate::lora::{LoraSpec, LoraState};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{
    TextTimeConditioning, UNet2DConditionConfig, UNet2DConditionModel,
};
use crate::tokenizer::ClipTokenizer;

use super::offload::{Held, Offload};

/// A loaded SDXL pipeline (also SDXL inpainting models, whose UNet takes
/// 9 channels).
pub struct StableDiffusionXLPipeline {
    class_name: &'static str,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: Held<ClipTextModel>,
    text_encoder_2: Held<ClipTextModel>,
    unet: Held<UNet2DConditionModel>,
    vae: Held<AutoencoderKL>,
    lora: LoraState,
    force_zeros_for_empty_prompt: bool,
    /// The model's `scheduler/scheduler_config.json`.
    scheduler_config: serde_json::Value,
    device: Device,
}

/// Encoded text for one side of guidance.
struct Encoded {
    /// `(batch, 77, dim_1 + dim_2)`.
    embeds: Tensor,
    /// `(batch, projection_dim)`.
    pooled: Tensor,
}

impl StableDiffusionXLPipeline {
    /// Load every component from `model` onto `device`. `class_name` is the
    /// model's `_class_name`.
    pub fn load(model: &ModelDir, device: &Device, class_name: &'static str) -> Result<Self> {
        let te_config = |name: &str| -> Result<ClipTextConfig> {
            crate::models::read_config(&model.component_dir(name)?.join("config.json"))
        };
        let [te_config_1, te_config_2] = [te_config("text_encoder")?, te_config("text_encoder_2")?];
        let unet_config: UNet2DConditionConfig =
            crate::models::read_config(&model.component_dir("unet")?.join("config.json"))?;
        if !unet_config.uses_text_time() {
            return Err(Error::config(
                "unet",
                "an SDXL UNet needs `addition_embed_type: text_time`",
            ));
        }
        let lora = LoraState::new(
            super::lora_sources(model, ModelFamily::StableDiffusionXl)?,
            unet_config.uniform_layers_per_block(),
            model.compute_dtype(),
            device,
            model.offload(),
        );
        let offloaded = model.offload() == Offload::Model;
        let text_encoder =
            held_text_encoder(offloaded, lora.base_weights("text_encoder")?, te_config_1)?;
        let text_encoder_2 =
            held_text_encoder(offloaded, lora.base_weights("text_encoder_2")?, te_config_2)?;
        let unet = held_unet(offloaded, lora.base_weights("unet")?, unet_config)?;
        let force_zeros_for_empty_prompt = model
            .options()
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        Ok(Self {
            class_name,
            tokenizer: ClipTokenizer::from_dir(&model.component_dir("tokenizer")?)?,
            tokenizer_2: ClipTokenizer::from_dir(&model.component_dir("tokenizer_2")?)?,
            text_encoder,
            text_encoder_2,
            unet,
            vae: held_vae(model, device, true, true)?,
            lora,
            force_zeros_for_empty_prompt,
            scheduler_config: model.component_config("scheduler")?,
            device: device.clone(),
        })
    }

    /// Encode texts with both encoders: penultimate hidden states
    /// concatenated on the feature axis, and the second encoder's projected
    /// pooled output.
    fn encode(&self, texts: &[&str], warnings: &mut Vec<String>) -> Result<Encoded> {
        let ids_1 = texts
            .iter()
            .map(|t| tokenize_clip(&self.tokenizer, t, warnings))
            .collect::<Result<Vec<_>>>()?;
        let ids_2 = texts
            .iter()
            .map(|t| tokenize_clip(&self.tokenizer_2, t, warnings))
            .collect::<Result<Vec<_>>>()?;
        // Under `model` offload each encoder is built for its own call.
        let o1 = self.text_encoder.get()?.forward(&ids_1, &self.device)?;
        let o2 = self.text_encoder_2.get()?.forward(&ids_2, &self.device)?;
        let penultimate = |hs: &[Tensor]| -> Result<Tensor> {
            hs.len()
                .checked_sub(2)
                .map(|i| hs[i].clone())
                .ok_or_else(|| Error::config("text_encoder", "needs at least one layer"))
        };
        let embeds = Tensor::cat(
            &[
                penultimate(&o1.hidden_states)?,
                penultimate(&o2.hidden_states)?,
            ],
            2,
        )?;
        let pooled = o2.text_embeds.ok_or_else(|| {
            Error::config(
                "text_encoder_2",
                "SDXL needs a CLIPTextModelWithProjection (text_projection.weight)",
            )
        })?;
        Ok(Encoded { embeds, pooled })
    }
}

impl DiffusionPipeline for StableDiffusionXLPipeline {
    /// The diffusers pipeline class the model declares.
    fn class_name(&self) -> &'static str {
        self.class_name
    }

    /// Merge `loras` (stacked, each with its scale) into both text encoders
    /// and the UNet, replacing the adapters merged before; `[]` restores
    /// the base model. The base weights come from memory, not from disk.
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
        let text_encoder_2 = self
            .lora
            .rebuilt("text_encoder_2", &deltas, &rebuild, |w| {
                held_text_encoder(
                    self.text_encoder_2.offloaded(),
                    w.clone(),
                    self.text_encoder_2.config().clone(),
                )
            })?;
        let unet = self.lora.rebuilt("unet", &deltas, &rebuild, |w| {
            held_unet(self.unet.offloaded(), w.clone(), self.unet.config().clone())
        })?;
        if let Some(t) = text_encoder {
            self.text_encoder = t;
        }
        if let Some(t) = text_encoder_2 {
            self.text_encoder_2 = t;
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

    /// Tensors of the text encoders and UNet read from the weight files so
    /// far (switching LoRAs reads none).
    fn base_tensor_reads(&self) -> usize {
        self.lora.base_reads()
    }

    /// The VAE scale factor (8).
    fn vae_scale_factor(&self) -> usize {
        self.vae.config().vae_scale_factor()
    }

    /// Native `(width, height)`: UNet `sample_size` × VAE scale factor (1024² for SDXL base).
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
        let n = request.num_images_per_prompt;

        // 1. Encode the prompt (and the negative prompt for guidance).
        let t0 = Instant::now();
        let prompts: Vec<&str> = request.prompts.iter().map(String::as_str).collect();
        let mut warnings = Vec::new();
        let pos = self.encode(&prompts, &mut warnings)?;
        let cfg = request.do_classifier_free_guidance();
        let neg = if !cfg {
            None
        } else if request.negative_prompts.is_empty() && self.force_zeros_for_empty_prompt {
            Some(Encoded {
                embeds: pos.embeds.zeros_like()?,
                pooled: pos.pooled.zeros_like()?,
            })
        } else {
            let texts: Vec<&str> = (0..prompts.len())
                .map(|i| request.negative_for(i).unwrap_or(""))
                .collect();
            Some(self.encode(&texts, &mut warnings)?)
        };
        let expand = |e: Encoded| -> Result<Encoded> {
            Ok(Encoded {
                embeds: repeat_interleave_batch(&e.embeds, n)?,
                pooled: repeat_interleave_batch(&e.pooled, n)?,
            })
        };
        let pos = expand(pos)?;
        let (context, text_embeds) = match neg {
            Some(neg) => {
                let neg = expand(neg)?;
                (
                    Tensor::cat(&[&neg.embeds, &pos.embeds], 0)?,
                    Tensor::cat(&[&neg.pooled, &pos.pooled], 0)?,
                )
            }
            None => (pos.embeds, pos.pooled),
        };
        // original_size = target_size = (height, width), crops (0, 0).
        let (h, w) = (request.height as f64, request.width as f64);
        let time_ids = vec![[h, w, 0.0, 0.0, h, w]; context.dim(0)?];
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
        let guidance = cfg.then_some(request.guidance_scale);
        let unet = self.unet.get()?;
        let latents = denoise_from(
            scheduler.as_mut(),
            prepared.latents,
            prepared.begin,
            prepared.inpaint.as_ref(),
            guidance,
            |x, t| {
                let tt = TextTimeConditioning {
                    text_embeds: &text_embeds,
                    time_ids: &time_ids,
                };
                unet.forward(x, t, &context, Some(tt))
            },
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
        ModelFamily::StableDiffusionXl
    }

    fn scheduler_config(&self) -> &serde_json::Value {
        &self.scheduler_config
    }
}
