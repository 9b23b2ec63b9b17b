//! What a pipeline run produces: the images as float tensors, the latents
//! handed to the VAE, the scheduler that ran, warnings and stage timings.

use std::time::Duration;

use candle_core::Tensor;

/// Wall-clock time spent in each stage of a run.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    /// Stage 1: tokenizing and running the text encoder(s).
    pub text_encoding: Duration,
    /// Stage 4: the whole denoising loop.
    pub denoising: Duration,
    /// Each denoising step (model calls + scheduler step).
    pub steps: Vec<Duration>,
    /// Each denoiser call (one per step; a guided step's call runs the
    /// doubled batch).
    pub model_calls: Vec<Duration>,
    /// Floating-point operations of all denoiser calls (multiply-adds count
    /// two), from the layers' own counts (see `models::layers::flops`).
    pub model_flops: u64,
    /// Stage 5: VAE decode.
    pub vae_decode: Duration,
    /// The whole run.
    pub total: Duration,
}

/// What a run produces.
pub struct GenerationOutput {
    /// `(batch, height, width, 3)` float32 in [0, 1], before 8-bit quantisation.
    pub images: Tensor,
    /// `(batch, latent_channels, h, w)`: what was passed to `vae.decode`
    /// (already divided by the scaling factor).
    pub latents_to_vae: Tensor,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Its σ ramp when not the class default (`karras`, `exponential`).
    pub sigma_schedule: Option<String>,
    /// Per-stage timings.
    pub timings: StageTimings,
    /// Things the user should know (a prompt truncated to the encoder's
    /// 77 tokens, as diffusers warns).
    pub warnings: Vec<String>,
}
