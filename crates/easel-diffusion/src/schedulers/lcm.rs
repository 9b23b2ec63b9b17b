//! LCM: latent consistency model sampling (Luo et al., arXiv:2310.04378),
//! following diffusers' `LCMScheduler`.
//!
//! Each step maps the sample to a denoised estimate with the consistency
//! boundary scalings `c_skip`, `c_out`, then (except on the last step)
//! re-noises it to the next timestep with a fresh Gaussian draw.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, discrete_timestep, lin2, StepIndex};
use super::config::{BetaConfig, BetaSchedule, ConfigReader, PredictionType};
use super::ddim::ddpm_add_noise;
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "LCMScheduler";

/// The settings of [`LcmScheduler`] (diffusers `LCMScheduler` config keys,
/// with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct LcmConfig {
    /// The training noise schedule (default: 1000 steps, scaled_linear 0.00085 .. 0.012).
    pub betas: BetaConfig,
    /// Length of the distillation schedule the timesteps are picked from (default 50).
    pub original_inference_steps: usize,
    /// Clamp the predicted x₀ to ±`clip_sample_range` (default false).
    pub clip_sample: bool,
    /// The clamp bound (default 1.0).
    pub clip_sample_range: f64,
    /// Use ᾱ = 1 after the last step instead of ᾱ₀ (default true).
    pub set_alpha_to_one: bool,
    /// epsilon, sample or v_prediction (default epsilon).
    pub prediction_type: PredictionType,
    /// Multiplier of the timestep in the boundary scalings (default 10).
    pub timestep_scaling: f64,
}

impl Default for LcmConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::ScaledLinear,
                ..BetaConfig::ddpm_default()
            },
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            prediction_type: PredictionType::Epsilon,
            timestep_scaling: 10.0,
        }
    }
}

impl LcmConfig {
    /// Read a diffusers scheduler config as `LCMScheduler.from_config` does
    /// (`steps_offset` and `timestep_spacing` are accepted and, as in
    /// diffusers, unused).
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        r.reject_true("thresholding", "dynamic thresholding is not implemented")?;
        let original_inference_steps =
            r.usize("original_inference_steps", d.original_inference_steps)?;
        if original_inference_steps == 0 {
            return Err(r.error("original_inference_steps", "must be at least 1"));
        }
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, true)?,
            original_inference_steps,
            clip_sample: r.bool("clip_sample", d.clip_sample)?,
            clip_sample_range: r.f64("clip_sample_range", d.clip_sample_range)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", d.set_alpha_to_one)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
            timestep_scaling: r.f64("timestep_scaling", d.timestep_scaling)?,
        })
    }
}

/// Multistep latent consistency sampling, as diffusers' `LCMScheduler`.
/// Timesteps are integers taken from the `original_inference_steps`-long
/// distillation schedule, so at most that many steps can be asked for.
/// Each step but the last draws one tensor from the [`NoiseSource`].
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl LcmScheduler {
    /// A scheduler for `config`.
    pub fn new(config: LcmConfig) -> Result<Self> {
        let alphas_cumprod = common::alphas_cumprod(&config.betas, false);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`LcmConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(LcmConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// The consistency-model boundary scalings `(c_skip, c_out)` at `timestep`
    /// (σ_data = 0.5).
    pub fn boundary_scalings(&self, timestep: f64) -> (f64, f64) {
        let sigma_data = 0.5f32;
        let t = (timestep * self.config.timestep_scaling) as f32;
        let c_skip = sigma_data * sigma_data / (t * t + sigma_data * sigma_data);
        let c_out = t / (t * t + sigma_data * sigma_data).sqrt();
        (c_skip as f64, c_out as f64)
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        let tt = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        let original = request
            .original_inference_steps
            .unwrap_or(self.config.original_inference_steps);
        let strength = request.strength.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid(
                "strength",
                format!("{strength} must be in [0, 1]"),
            ));
        }
        if original == 0 || original > tt {
            return Err(Error::invalid(
                "original_inference_steps",
                format!("{CLASS}: {original} must be between 1 and num_train_timesteps = {tt}"),
            ));
        }
        common::check_steps(CLASS, n, tt)?;
        let k = tt / original;
        let count = (original as f64 * strength) as usize;
        if count / n < 1 {
            return Err(Error::invalid(
                "num_inference_steps",
                format!(
                    "{CLASS}: {n} steps asked but the distillation schedule has only {count} \
                     (original_inference_steps {original} x strength {strength}); ask for at most {count}"
                ),
            ));
        }
        if n > original {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("{CLASS}: {n} steps asked; at most original_inference_steps = {original}"),
            ));
        }
        let origin: Vec<usize> = (1..=count).rev().map(|i| i * k - 1).collect();
        self.timesteps = common::np_linspace_open(0.0, count as f64, n)
            .into_iter()
            .map(|x| origin[x.floor() as usize] as f64)
            .collect();
        self.num_inference_steps = n;
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.num_inference_steps == 0 {
            return Err(common::not_ready(CLASS));
        }
        let dtype = sample.dtype();
        let tt = self.config.betas.num_train_timesteps;
        let t = discrete_timestep(CLASS, timestep, tt)?;
        let i = self.index.get(CLASS, &self.timesteps, timestep, false)?;
        let prev_t = match self.timesteps.get(i + 1) {
            Some(&p) => p,
            None => timestep,
        };
        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = if prev_t >= 0.0 {
            self.alphas_cumprod[discrete_timestep(CLASS, prev_t, tt)?] as f64
        } else {
            self.final_alpha_cumprod as f64
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let mut x0 = match self.config.prediction_type {
            PredictionType::Epsilon => common::div(&lin2(&x, 1.0, &mo, -b_t.sqrt())?, a_t.sqrt())?,
            PredictionType::VPrediction => lin2(&x, a_t.sqrt(), &mo, -b_t.sqrt())?,
            _ => mo.clone(),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = lin2(&x0, c_out, &x, c_skip)?;
        let prev = if i + 1 != self.num_inference_steps {
            let z = common::f32_tensor(&noise.randn(model_output.dims(), model_output.device())?)?;
            lin2(&denoised, a_prev.sqrt(), &z, b_prev.sqrt())?
        } else {
            denoised
        };
        self.index.advance();
        common::as_dtype(prev, dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let t = discrete_timestep(CLASS, timestep, self.config.betas.num_train_timesteps)?;
        ddpm_add_noise(&self.alphas_cumprod, original, noise, t)
    }

    fn family(&self) -> SchedulerFamily {
        SchedulerFamily::Ddpm
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin_index = Some(begin_index);
    }
}
