//! Noise schedulers (samplers), following diffusers' small contract:
//! `set_timesteps`, `scale_model_input`, `step`.
//!
//! Each algorithm lives in its own file and is configured from a diffusers
//! `scheduler_config.json`. Any scheduler can be built from any model's
//! config, as `NewScheduler.from_config(pipe.scheduler.config)` does in
//! diffusers: keys the class knows are taken, the rest are ignored, and
//! missing keys get the class's defaults.

use candle_core::Tensor;

use crate::error::Result;
use crate::noise::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod flow_match;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod sigma_schedule;
pub mod unipc;

pub use config::{load_config_file, parse_config_json};
pub use ddim::{DdimConfig, DdimScheduler};
pub use dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler};
pub use euler::{EulerConfig, EulerDiscreteScheduler};
pub use euler_ancestral::{EulerAncestralConfig, EulerAncestralDiscreteScheduler};
pub use flow_match::{FlowMatchConfig, FlowMatchEulerDiscreteScheduler};
pub use heun::{HeunConfig, HeunDiscreteScheduler};
pub use lcm::{LcmConfig, LcmScheduler};
pub use lms::{LmsConfig, LmsDiscreteScheduler};
pub use pndm::{PndmConfig, PndmScheduler};
pub use unipc::{UniPcConfig, UniPcMultistepScheduler};

/// What `set_timesteps` is asked for.
#[derive(Debug, Clone, Default)]
pub struct TimestepsRequest {
    /// Number of denoising steps (1..=1000).
    pub num_inference_steps: usize,
    /// Explicit sigmas (flow matching: FluxPipeline passes `linspace(1, 1/n, n)`,
    /// one per step; EulerDiscreteScheduler also takes them, with the final
    /// σ included, as diffusers' `set_timesteps(sigmas=...)`). Other
    /// schedulers refuse them. With sigmas, `num_inference_steps` may be 0.
    pub sigmas: Option<Vec<f64>>,
    /// The dynamic-shifting `mu` (flow matching with `use_dynamic_shifting`).
    pub mu: Option<f64>,
    /// Image-to-image strength, for the schedulers whose timesteps depend on
    /// it (LCM: `set_timesteps(..., strength=)`, as
    /// LatentConsistencyModelImg2ImgPipeline passes it). `None` = 1.0.
    pub strength: Option<f64>,
    /// LCM's `original_inference_steps` override (`None` = the config's).
    pub original_inference_steps: Option<usize>,
}

impl TimestepsRequest {
    /// A request for `num_inference_steps` with the scheduler's own spacing.
    pub fn steps(num_inference_steps: usize) -> Self {
        Self {
            num_inference_steps,
            ..Default::default()
        }
    }
}

/// Which model family a scheduler drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerFamily {
    /// Discrete-time DDPM-trained models (Stable Diffusion 1.x / 2.x / XL):
    /// epsilon, v or sample prediction.
    Ddpm,
    /// Flow-matching models (FLUX.1): velocity prediction, sigmas in [0, 1].
    FlowMatch,
}

/// A noise scheduler: turns model outputs into the next latents.
///
/// All tensors are `(batch, channels, height, width)` float32 latents (or
/// FLUX's packed `(batch, seq, channels)`); the scheduler only does
/// element-wise arithmetic with per-step scalars.
pub trait Scheduler: Send {
    /// Compute the timesteps (and sigmas) for a run. Must be called before
    /// the first `scale_model_input` / `step`; resets any multistep state.
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()>;

    /// The timesteps to feed the denoiser, in order (one model call each).
    fn timesteps(&self) -> &[f64];

    /// The noise levels of the schedule (σ, with the final entry), where the
    /// algorithm has them; `None` for DDIM / PNDM / LCM.
    fn sigmas(&self) -> Option<&[f64]>;

    /// The standard deviation the initial noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;

    /// Scale the denoiser input for `timestep` (σ-space schedulers divide by
    /// `sqrt(σ² + 1)`; others return the sample unchanged).
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One step: from `model_output` at `timestep` and the current `sample`,
    /// the previous (less noisy) sample. Stochastic schedulers draw their
    /// per-step noise from `noise`, in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Noise `original` to the level of `timestep` (image-to-image start).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// The model family this scheduler can drive.
    fn family(&self) -> SchedulerFamily;

    /// The diffusers class name (`EulerDiscreteScheduler`).
    fn class_name(&self) -> &'static str;

    /// Model calls per step of the underlying solver (Heun: 2).
    fn order(&self) -> usize {
        1
    }

    /// Start the schedule at `begin_index` (image-to-image skips the first steps).
    fn set_begin_index(&mut self, begin_index: usize);
}
