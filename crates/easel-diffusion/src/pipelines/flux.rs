//! FLUX.1 pipelines (Black Forest Labs 2024): `FluxPipeline` (schnell and
//! dev: text-to-image and image-to-image), following diffusers'
//! `pipeline_flux.py` and `pipeline_flux_img2img.py`, and the components and
//! stages every FLUX.1 pipeline shares (`FluxComponents`, latent packing),
//! which `FluxFillPipeline` ([`super::flux_fill`]) builds on.
//!
//! The stages: (1) encode the prompt with CLIP (pooled output) and T5 (the
//! token sequence, `max_sequence_length` tokens); (2) prepare the
//! flow-matching timesteps, σ = `linspace(1, 1/n, n)` shifted statically or
//! by `mu` from the image token count, as the model's scheduler config says;
//! (3) prepare the latents, `(batch, 16, H/8, W/8)` noise (or the noised
//! image latents) packed into `(batch, H/16 · W/16, 64)` tokens of 2x2
//! patches; (4) denoise with the transformer (no classifier-free guidance:
//! dev and Fill embed the guidance scale instead); (5) unpack, undo the VAE
//! scaling and shift, decode; (6) post-process to [0, 1].
//!
//! Randomness: text-to-image draws the initial noise; image-to-image first
//! draws the VAE posterior sample of the init image, then the noise; Fill
//! draws those two and then the posterior sample of the masked image. Each
//! draw has the full batch shape, so with per-image generators every image is
//! its own reproducible run (for one image this is exactly diffusers' order).

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::offload::{Held, Offload};
use super::{
    component_weights, decode_to_images, repeat_interleave_batch, tokenize_clip, GenerationOutput,
    GenerationRequest, Progress, RunContext, StageTimings,
};
use super::{held_text_encoder, DiffusionPipeline, Task};
use crate::error::{Error, Result};
use crate::image_processor;
use crate::loader::{ModelDir, ModelFamily};
use crate::lora::{LoraSpec, LoraState};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::flux_transformer::{
    FluxTransformer2DConfig, FluxTransformer2DModel, FluxTransformerInput,
};
use crate::models::t5::{T5Config, T5EncoderModel};
use crate::schedulers::common::np_linspace;
use crate::schedulers::{build_scheduler, FlowMatchConfig, Scheduler, TimestepsRequest};
use crate::tokenizer::{ClipTokenizer, T5Tokenizer};

/// The largest `max_sequence_length` FLUX accepts (diffusers' check).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Pack latents `(batch, channels, h, w)` into tokens of 2x2 patches,
/// `(batch, h/2 · w/2, channels · 4)` (diffusers' `_pack_latents`).
///
/// Errors: `h` or `w` odd.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::invalid(
            "latents",
            format!("latent size {h}x{w} cannot be packed into 2x2 patches"),
        ));
    }
    Ok(latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// Unpack tokens `(batch, h/2 · w/2, channels · 4)` back to latents
/// `(batch, channels, h, w)` (diffusers' `_unpack_latents`; `h`, `w` are
/// latent sizes, the image size / 8).
///
/// Errors: a token count or width that does not fit `h`, `w`.
pub fn unpack_latents(packed: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c4) = packed.dims3()?;
    if h % 2 != 0 || w % 2 != 0 || n != (h / 2) * (w / 2) || c4 % 4 != 0 {
        return Err(Error::invalid(
            "latents",
            format!("{n} tokens of {c4} channels do not unpack to {h}x{w} latents"),
        ));
    }
    Ok(packed
        .reshape((b, h / 2, w / 2, c4 / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c4 / 4, h, w))?)
}

/// The position ids of the packed image tokens, `(rows · cols, 3)` f32 with
/// `(0, row, col)` per token (diffusers' `_prepare_latent_image_ids`).
pub fn latent_image_ids(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Ok(Tensor::from_vec(data, (rows * cols, 3), device)?)
}

/// FLUX's T5 encoder: loaded once and kept, or, for a model opened with
/// [`ModelDir::with_offloaded_t5`], loaded for each prompt encoding and
/// freed after it (as diffusers' model CPU offload releases the text
/// encoders once the prompt is encoded), so it takes no memory while the
/// transformer and the VAE run.
// One per loaded pipeline: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum T5Encoder {
    /// Resident, or built for each use from host memory (`--offload model`).
    Held(Held<T5EncoderModel>),
    /// `offload_t5`: read from the weight files for each use.
    Offloaded { model: ModelDir, config: T5Config },
}

impl T5Encoder {
    /// `(batch, L, d_model)` embeddings of `ids`.
    fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        match self {
            T5Encoder::Held(t5) => t5.get()?.forward(ids, device),
            T5Encoder::Offloaded { model, config } => {
                let t5 = T5EncoderModel::load(
                    &component_weights(model, "text_encoder_2", device)?,
                    config,
                )?;
                let embeds = t5.forward(ids, device);
                drop(t5);
                crate::os_memory::release_freed_memory();
                embeds
            }
        }
    }
}

/// The components every FLUX.1 pipeline has, and the stages they share.
pub(super) struct FluxComponents {
    tokenizer: ClipTokenizer,
    text_encoder: Held<ClipTextModel>,
    tokenizer_2: T5Tokenizer,
    text_encoder_2: T5Encoder,
    pub(super) transformer: Held<FluxTransformer2DModel>,
    vae: Held<AutoencoderKL>,
    /// The LoRA-targetable weights (CLIP text encoder, transformer), as
    /// diffusers' `FluxLoraLoaderMixin`: T5 takes no adapters.
    pub(super) lora: LoraState,
    pub(super) scheduler_config: serde_json::Value,
    flow_config: FlowMatchConfig,
    pub(super) device: Device,
    /// The model's family, whose facts (strength rule, LoRA targets) the
    /// shared stages follow.
    pub(super) family: ModelFamily,
}

/// What stage 3 produced.
pub(super) struct PreparedLatents {
    /// Packed latents `(batch, n_img, 64)`.
    pub(super) latents: Tensor,
    /// Fill: packed masked-image latents and mask, `(batch, n_img, 320)`.
    pub(super) condition: Option<Tensor>,
    /// Latent height and width (image / 8).
    pub(super) h: usize,
    pub(super) w: usize,
}

impl FluxComponents {
    /// Load the components of a model of `family` (FLUX.1 or FLUX.1 Fill).
    pub(super) fn load(model: &ModelDir, device: &Device, family: ModelFamily) -> Result<Self> {
        let cfg = |component: &str| -> Result<std::path::PathBuf> {
            Ok(model.component_dir(component)?.join("config.json"))
        };
        let tokenizer = ClipTokenizer::from_dir(model.component_dir("tokenizer")?)?;
        let te_cfg: ClipTextConfig = crate::models::read_config(&cfg("text_encoder")?)?;
        let lora = LoraState::new(
            super::lora_sources(model, family)?,
            None,
            model.compute_dtype(),
            device,
            model.offload(),
        );
        let offloaded = model.offload() == Offload::Model;
        let text_encoder = held_text_encoder(
            offloaded,
            lora.base_weights("text_encoder")?,
            te_cfg.clone(),
        )?;
        let tokenizer_2 = T5Tokenizer::from_dir(model.component_dir("tokenizer_2")?)?;
        let t5_cfg: T5Config = crate::models::read_config(&cfg("text_encoder_2")?)?;
        let text_encoder_2 = if model.offloaded_t5() {
            T5Encoder::Offloaded {
                model: model.clone(),
                config: t5_cfg.clone(),
            }
        } else {
            let weights = component_weights(model, "text_encoder_2", device)?;
            let config = t5_cfg.clone();
            T5Encoder::Held(Held::load(offloaded, move || {
                T5EncoderModel::load(&weights, &config)
            })?)
        };
        let tr_cfg: FluxTransformer2DConfig = crate::models::read_config(&cfg("transformer")?)?;
        let transformer =
            held_transformer(offloaded, lora.base_weights("transformer")?, tr_cfg.clone())?;
        let vae_cfg: AutoencoderKLConfig = crate::models::read_config(&cfg("vae")?)?;
        let vae = {
            let (weights, config) = (component_weights(model, "vae", device)?, vae_cfg.clone());
            Held::load(offloaded, move || {
                AutoencoderKL::load(&weights, &config, true)
            })?
        };
        let scheduler_config = model.component_config("scheduler")?;
        let flow_config = FlowMatchConfig::from_json(&scheduler_config)?;

        // The pieces must fit together.
        let lc = vae_cfg.latent_channels;
        if tr_cfg.out_channels() != lc * 4 {
            return Err(Error::config(
                "transformer",
                format!(
                    "out_channels {} does not match the VAE's {lc} latent channels packed 2x2 ({})",
                    tr_cfg.out_channels(),
                    lc * 4
                ),
            ));
        }
        if tr_cfg.joint_attention_dim != t5_cfg.d_model {
            return Err(Error::config(
                "transformer",
                format!(
                    "joint_attention_dim {} does not match text_encoder_2's d_model {}",
                    tr_cfg.joint_attention_dim, t5_cfg.d_model
                ),
            ));
        }
        if tr_cfg.pooled_projection_dim != te_cfg.hidden_size {
            return Err(Error::config(
                "transformer",
                format!(
                    "pooled_projection_dim {} does not match text_encoder's hidden_size {}",
                    tr_cfg.pooled_projection_dim, te_cfg.hidden_size
                ),
            ));
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            transformer,
            vae,
            lora,
            scheduler_config,
            flow_config,
            device: device.clone(),
            family,
        })
    }

    pub(super) fn vae_scale_factor(&self) -> usize {
        self.vae.config().vae_scale_factor()
    }

    /// See [`FluxPipeline::set_loras`].
    pub(super) fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
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
        let transformer = self.lora.rebuilt("transformer", &deltas, &rebuild, |w| {
            held_transformer(
                self.transformer.offloaded(),
                w.clone(),
                self.transformer.config().clone(),
            )
        })?;
        if let Some(t) = text_encoder {
            self.text_encoder = t;
        }
        if let Some(t) = transformer {
            self.transformer = t;
        }
        self.lora.commit(loras, &deltas);
        Ok(())
    }

    pub(super) fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    pub(super) fn default_size(&self) -> (usize, usize) {
        let s = self.family.default_sample_size() * self.vae_scale_factor();
        (s, s)
    }

    pub(super) fn guidance_embeds(&self) -> bool {
        self.transformer.config().guidance_embeds
    }

    /// The checks every FLUX run makes before any work, and the T5 length.
    fn check(&self, request: &GenerationRequest, warnings: &mut Vec<String>) -> Result<usize> {
        request.check(self.vae_scale_factor() * 2)?;
        let max_sequence_length = request
            .max_sequence_length
            .unwrap_or_else(|| default_max_sequence_length(self.guidance_embeds()));
        if max_sequence_length == 0 || max_sequence_length > MAX_SEQUENCE_LENGTH {
            return Err(Error::invalid(
                "max_sequence_length",
                format!(
                    "{max_sequence_length} is out of range (allowed: 1 to {MAX_SEQUENCE_LENGTH})"
                ),
            ));
        }
        if !request.negative_prompts.is_empty() {
            warnings.push(
                "FLUX.1 has no classifier-free guidance: the negative prompt is ignored".into(),
            );
        }
        if !self.guidance_embeds() && request.guidance_scale != 0.0 {
            warnings.push(format!(
                "this model has no guidance embedding (FLUX.1 schnell): guidance scale {} is ignored",
                request.guidance_scale
            ));
        }
        Ok(max_sequence_length)
    }

    /// Stage 1: `(prompt_embeds (batch, L, d_t5), pooled (batch, d_clip),
    /// text_ids (L, 3))`, repeated for `num_images_per_prompt`.
    fn encode_prompt(
        &self,
        request: &GenerationRequest,
        max_sequence_length: usize,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let clip_ids = request
            .prompts
            .iter()
            .map(|p| tokenize_clip(&self.tokenizer, p, warnings))
            .collect::<Result<Vec<_>>>()?;
        let pooled = self
            .text_encoder
            .get()?
            .forward(&clip_ids, &self.device)?
            .pooled_output;
        let t5_ids = request
            .prompts
            .iter()
            .map(|p| {
                let t = self.tokenizer_2.encode_detailed(p, max_sequence_length)?;
                if let Some(cut) = &t.truncated_text {
                    let w = format!(
                        "prompt truncated to {max_sequence_length} T5 tokens (max_sequence_length); this part was dropped: \"{cut}\""
                    );
                    if !warnings.contains(&w) {
                        warnings.push(w);
                    }
                }
                Ok(t.ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let embeds = self.text_encoder_2.forward(&t5_ids, &self.device)?;
        let n = request.num_images_per_prompt;
        let text_ids = Tensor::zeros((max_sequence_length, 3), embeds.dtype(), &self.device)?;
        Ok((
            repeat_interleave_batch(&embeds, n)?,
            repeat_interleave_batch(&pooled, n)?,
            text_ids,
        ))
    }

    /// Stage 2: the scheduler set to `linspace(1, 1/n, n)` with `mu` for
    /// `image_seq_len` tokens, started at the step image-to-image `strength`
    /// leaves (`None`: text-to-image). Returns it and the first step's index.
    fn prepare_timesteps(
        &self,
        request: &GenerationRequest,
        image_seq_len: usize,
        strength: Option<f64>,
    ) -> Result<(Box<dyn Scheduler>, usize)> {
        let n = request.num_inference_steps;
        let mut scheduler = build_scheduler(request.scheduler.as_deref(), &self.scheduler_config)?;
        scheduler.set_timesteps(&TimestepsRequest {
            num_inference_steps: n,
            sigmas: Some(np_linspace(1.0, 1.0 / n as f64, n)),
            mu: Some(self.flow_config.calculate_shift(image_seq_len)),
            ..Default::default()
        })?;
        let t_start = match strength {
            None => 0,
            Some(s) => super::init_image::strength_start_step(self.family.strength_rule(), n, s)?,
        };
        scheduler.set_begin_index(t_start * scheduler.order());
        Ok((scheduler, t_start))
    }

    /// `(x − shift_factor) · scaling_factor` of the VAE posterior sample of
    /// `image` `(1, 3, H, W)`, drawn once per batch row.
    pub(super) fn encode_image(
        &self,
        image: &Tensor,
        batch: usize,
        ctx: &mut RunContext<'_>,
    ) -> Result<Tensor> {
        let dist = self.vae.get()?.encode(image)?;
        let dist = DiagonalGaussian {
            mean: dist.mean.repeat((batch, 1, 1, 1))?,
            std: dist.std.repeat((batch, 1, 1, 1))?,
        };
        let sample = dist.sample(ctx.noise)?;
        let cfg = self.vae.config();
        Ok(((sample - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
    }

    /// Stage 3 for text-to-image (`image` `None`) or image-to-image: the
    /// packed initial latents.
    pub(super) fn prepare_latents(
        &self,
        request: &GenerationRequest,
        image: Option<&Tensor>,
        scheduler: &dyn Scheduler,
        t_start: usize,
        ctx: &mut RunContext<'_>,
    ) -> Result<PreparedLatents> {
        let f = self.vae_scale_factor();
        let (h, w) = (
            2 * (request.height / (f * 2)),
            2 * (request.width / (f * 2)),
        );
        let batch = request.batch_size();
        let shape = [batch, self.latent_channels(), h, w];
        let latents = match image {
            None => ctx.noise.randn(&shape, &self.device)?,
            Some(image) => {
                let image_latents = self.encode_image(image, batch, ctx)?;
                let noise = ctx.noise.randn(&shape, &self.device)?;
                let t = scheduler.timesteps()[t_start];
                scheduler.add_noise(&image_latents, &noise, t)?
            }
        };
        Ok(PreparedLatents {
            latents: pack_latents(&latents)?,
            condition: None,
            h,
            w,
        })
    }

    /// Stage 4: the denoising loop from step `t_start`.
    // The stages' outputs are passed as they are, like the shared loop's.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        request: &GenerationRequest,
        scheduler: &mut dyn Scheduler,
        t_start: usize,
        prepared: &PreparedLatents,
        encoded: &(Tensor, Tensor, Tensor),
        ctx: &mut RunContext<'_>,
        timings: &mut StageTimings,
    ) -> Result<Tensor> {
        let (prompt_embeds, pooled, text_ids) = encoded;
        let mut latents = prepared.latents.clone();
        let batch = latents.dim(0)?;
        let img_ids = latent_image_ids(prepared.h / 2, prepared.w / 2, &self.device)?;
        let guidance = vec![request.guidance_scale as f32; batch];
        let timesteps = scheduler.timesteps()[t_start..].to_vec();
        let total = timesteps.len();
        let transformer = self.transformer.get()?;
        for (i, &t) in timesteps.iter().enumerate() {
            ctx.cancel.check()?;
            let start = Instant::now();
            // `t.expand(batch).to(dtype) / 1000`, in f32.
            let timestep = vec![t as f32 / 1000f32; batch];
            let hidden = match &prepared.condition {
                Some(c) => Tensor::cat(&[&latents, c], 2)?,
                None => latents.clone(),
            };
            let call = Instant::now();
            let flops_before = crate::models::layers::flops();
            let noise_pred = transformer.forward(&FluxTransformerInput {
                hidden_states: &hidden,
                encoder_hidden_states: prompt_embeds,
                pooled_projections: pooled,
                timestep: &timestep,
                img_ids: &img_ids,
                txt_ids: text_ids,
                guidance: self.guidance_embeds().then_some(guidance.as_slice()),
            })?;
            timings.model_flops += crate::models::layers::flops() - flops_before;
            timings.model_calls.push(call.elapsed());
            latents = scheduler.step(&noise_pred, t, &latents, ctx.noise)?;
            timings.steps.push(start.elapsed());
            ctx.report(Progress::Step { step: i + 1, total });
        }
        Ok(latents)
    }

    /// Stages 5 and 6: unpack, `latents / scaling_factor + shift_factor`,
    /// decode (tiled as `request.vae_tiling` says). Returns `(latents_to_vae, images)`.
    fn decode(
        &self,
        latents: &Tensor,
        h: usize,
        w: usize,
        request: &GenerationRequest,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = self.vae.config();
        let latents = unpack_latents(latents, h, w)?;
        let latents_to_vae = ((latents / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
        let images = decode_to_images(&*self.vae.get()?, &latents_to_vae, request, warnings)?;
        Ok((latents_to_vae, images))
    }

    /// Stages 1 to 6 around `prepare` (stage 3).
    pub(super) fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
        strength: Option<f64>,
        prepare: impl FnOnce(
            &Self,
            &dyn Scheduler,
            usize,
            &mut RunContext<'_>,
        ) -> Result<PreparedLatents>,
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        let mut warnings = Vec::new();
        let max_sequence_length = self.check(request, &mut warnings)?;
        let mut timings = StageTimings::default();

        // 1. Encode the prompt.
        let t0 = Instant::now();
        let encoded = self.encode_prompt(request, max_sequence_length, &mut warnings)?;
        timings.text_encoding = t0.elapsed();
        ctx.report(Progress::PromptEncoded);

        // 2. Prepare the timesteps.
        let f = self.vae_scale_factor() * 2;
        let image_seq_len = (request.height / f) * (request.width / f);
        let (mut scheduler, t_start) = self.prepare_timesteps(request, image_seq_len, strength)?;

        // 3. Prepare the latents.
        let prepared = prepare(self, scheduler.as_ref(), t_start, ctx)?;

        // 4. Denoise.
        let t0 = Instant::now();
        let latents = self.denoise(
            request,
            scheduler.as_mut(),
            t_start,
            &prepared,
            &encoded,
            ctx,
            &mut timings,
        )?;
        timings.denoising = t0.elapsed();

        // 5. Decode, 6. post-process.
        let t0 = Instant::now();
        let (latents_to_vae, images) =
            self.decode(&latents, prepared.h, prepared.w, request, &mut warnings)?;
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
}

/// The default T5 prompt length: 256 for models without guidance embedding
/// (FLUX.1 schnell), 512 otherwise (dev, Fill), as Black Forest Labs use them.
pub fn default_max_sequence_length(guidance_embeds: bool) -> usize {
    if guidance_embeds {
        512
    } else {
        256
    }
}

/// A loaded `FluxPipeline` (FLUX.1 schnell or dev): text-to-image, and
/// image-to-image when the request has an `image` (`strength` of the
/// schedule re-run, as `FluxImg2ImgPipeline`).
pub struct FluxPipeline {
    components: FluxComponents,
}

impl FluxPipeline {
    /// Load every component from `model` onto `device` (the VAE with its
    /// encoder, for image-to-image).
    ///
    /// Errors: a missing component, an unsupported config, weights that
    /// don't fit the configs, or components that don't fit each other.
    pub fn load(model: &ModelDir, device: &Device) -> Result<Self> {
        let components = FluxComponents::load(model, device, ModelFamily::Flux)?;
        let (t, v) = (
            components.transformer.config().in_channels,
            components.latent_channels() * 4,
        );
        if t != v {
            return Err(Error::config(
                "transformer",
                format!(
                    "in_channels {t} is not the VAE's latent channels packed 2x2 ({v}); \
                     a FLUX.1 Fill transformer needs `_class_name: FluxFillPipeline`"
                ),
            ));
        }
        Ok(Self { components })
    }
}

/// The [`DiffusionPipeline`] methods every FLUX.1 pipeline answers from
/// its [`FluxComponents`] (`self.components`), written once for
/// `FluxPipeline` and `FluxFillPipeline` (expanded inside their trait impls).
macro_rules! flux_component_methods {
    () => {
        /// Merge `loras` (stacked, each with its scale) into the CLIP text
        /// encoder and the transformer, replacing the adapters merged before;
        /// `[]` restores the base model. The base weights come from memory, not
        /// from disk. Layouts: see [`crate::lora`] (PEFT / ai-toolkit, kohya
        /// with the original FLUX names, ComfyUI).
        ///
        /// Errors (the pipeline is left as it was): see
        /// [`crate::lora::merge_deltas`].
        fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
            self.components.set_loras(loras)
        }

        /// The adapters merged now.
        fn loras(&self) -> &[LoraSpec] {
            self.components.lora.active()
        }

        /// Tensors of the text encoder and transformer read from the weight
        /// files so far (switching LoRAs reads none).
        fn base_tensor_reads(&self) -> usize {
            self.components.lora.base_reads()
        }

        /// The model's `scheduler/scheduler_config.json`.
        fn scheduler_config(&self) -> &serde_json::Value {
            &self.components.scheduler_config
        }

        /// The VAE scale factor (8).
        fn vae_scale_factor(&self) -> usize {
            self.components.vae_scale_factor()
        }

        /// diffusers' default `(width, height)`: 128 × the VAE scale factor (1024²).
        fn default_size(&self) -> (usize, usize) {
            self.components.default_size()
        }

        /// Whether the transformer embeds the guidance scale (dev and Fill:
        /// yes, schnell: no).
        fn guidance_embeds(&self) -> bool {
            self.components.guidance_embeds()
        }

        /// The family the pipeline was loaded as (FLUX.1 or FLUX.1 Fill).
        fn family(&self) -> ModelFamily {
            self.components.family
        }
    };
}
pub(super) use flux_component_methods;

impl DiffusionPipeline for FluxPipeline {
    flux_component_methods!();

    /// Run the pipeline: text-to-image, or image-to-image with `request.image`
    /// and `request.strength`.
    ///
    /// The init image is resized (Pillow-exact Lanczos) to the request's size
    /// when it differs, as diffusers' image processor does.
    ///
    /// Errors: a bad request (sizes not multiples of 16, a mask: inpainting
    /// needs a Fill model, a
    /// strength that leaves no step), cancellation, or a tensor error.
    fn run(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<GenerationOutput> {
        // Seamless tiling: circular padding in the VAE's convolutions (the
        // transformer has no spatial convolutions).
        let _tiling = crate::models::layers::circular_padding(request.tiling);
        // The family's mask rule refuses a mask (MaskRule::Refused).
        let image = match Task::of(self.family(), request)? {
            Task::TextToImage => None,
            Task::ImageToImage(image) | Task::Inpaint(image, _) => Some(image),
        };
        let device = self.components.device.clone();
        let image = match image {
            Some(i) => Some(image_processor::preprocess_image(
                i,
                request.width,
                request.height,
                &device,
            )?),
            None => None,
        };
        let strength = image.as_ref().map(|_| request.strength);
        self.components
            .run(request, ctx, strength, |c, scheduler, t_start, ctx| {
                c.prepare_latents(request, image.as_ref(), scheduler, t_start, ctx)
            })
    }

    fn class_name(&self) -> &'static str {
        "FluxPipeline"
    }
}

/// A FLUX transformer held by a pipeline (built from `weights` for each
/// use when `offloaded`).
fn held_transformer(
    offloaded: bool,
    weights: crate::models::weights::Weights,
    config: FluxTransformer2DConfig,
) -> Result<Held<FluxTransformer2DModel>> {
    Held::load(offloaded, move || {
        FluxTransformer2DModel::load(&weights, &config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse_and_match_diffusers_layout() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2. * 3. * 4. * 6., &dev)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let p = pack_latents(&x).unwrap();
        assert_eq!(p.dims(), &[2, 6, 12]);
        // Token 0 of image 0 holds channel 0's 2x2 patch first: x[0,0,0,0], x[0,0,0,1], x[0,0,1,0], x[0,0,1,1].
        let first: Vec<f32> = p.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&first[..4], &[0., 1., 6., 7.]);
        let back = unpack_latents(&p, 4, 6).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(
            pack_latents(&Tensor::zeros((1, 1, 3, 4), candle_core::DType::F32, &dev).unwrap())
                .is_err()
        );
        assert!(unpack_latents(&p, 4, 8).is_err());
    }

    #[test]
    fn image_ids_are_row_and_column() {
        let ids: Vec<Vec<f32>> = latent_image_ids(2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(ids[0], vec![0., 0., 0.]);
        assert_eq!(ids[4], vec![0., 1., 1.]);
        assert_eq!(ids.len(), 6);
    }
}
