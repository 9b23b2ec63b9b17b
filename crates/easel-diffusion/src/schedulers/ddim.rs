//! DDIM: denoising diffusion implicit models (Song, Meng & Ermon,
//! arXiv:2010.02502), following diffusers' `DDIMScheduler`.
//!
//! Each step predicts x₀ from the model output, then moves to the previous
//! timestep along the deterministic (η = 0) path of eq. (12); η > 0 adds the
//! eq. (16) noise, drawn from the [`NoiseSource`].

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, discrete_timestep, lin2, mul};
use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "DDIMScheduler";

/// The settings of [`DdimScheduler`] (diffusers `DDIMScheduler` config keys,
/// with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// Clamp the predicted x₀ to ±`clip_sample_range` (default true).
    pub clip_sample: bool,
    /// The clamp bound for `clip_sample` (default 1.0).
    pub clip_sample_range: f64,
    /// Use ᾱ = 1 after the last step instead of ᾱ₀ (default true).
    pub set_alpha_to_one: bool,
    /// Added to "leading" timesteps (default 0; Stable Diffusion uses 1).
    pub steps_offset: i64,
    /// What the model predicts: epsilon, sample or v_prediction (default epsilon).
    pub prediction_type: PredictionType,
    /// How the inference timesteps are spaced (default leading).
    pub timestep_spacing: TimestepSpacing,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }
}

impl DdimConfig {
    /// Read a diffusers scheduler config as `DDIMScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        r.reject_true("thresholding", "dynamic thresholding is not implemented")?;
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, true)?,
            clip_sample: r.bool("clip_sample", d.clip_sample)?,
            clip_sample_range: r.f64("clip_sample_range", d.clip_sample_range)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", d.set_alpha_to_one)?,
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
            timestep_spacing: r.enum_in(
                "timestep_spacing",
                d.timestep_spacing,
                &[
                    TimestepSpacing::Leading,
                    TimestepSpacing::Linspace,
                    TimestepSpacing::Trailing,
                ],
            )?,
        })
    }
}

/// DDIM sampling (arXiv:2010.02502), as diffusers' `DDIMScheduler`.
/// Timesteps are integers in `0..num_train_timesteps`; there are no σ.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    eta: f64,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// A scheduler for `config`.
    pub fn new(config: DdimConfig) -> Result<Self> {
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
            eta: 0.0,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`DdimConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(DdimConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// Set η, the weight of the eq. (16) noise (0 = DDIM, 1 = DDPM-like).
    /// diffusers pipelines pass it as `eta` to `step`; default 0.
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::invalid(
                "eta",
                format!("{eta} must be a finite number >= 0"),
            ));
        }
        self.eta = eta;
        Ok(())
    }

    /// The builder form of [`Self::set_eta`].
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        self.set_eta(eta)?;
        Ok(self)
    }

    fn alpha_prev(&self, prev_timestep: i64) -> f64 {
        if prev_timestep >= 0 {
            self.alphas_cumprod[prev_timestep as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        }
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        let t = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        common::check_steps(CLASS, n, t)?;
        let ts: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => common::linspace_rounded(t, n),
            TimestepSpacing::Leading => common::leading(t, n, self.config.steps_offset),
            TimestepSpacing::Trailing => common::trailing(t, n),
        };
        if let Some(bad) = ts.iter().find(|&&x| x < 0 || x >= t as i64) {
            return Err(Error::config(
                CLASS,
                format!("timestep {bad} falls outside 0..{t} (check `steps_offset`)"),
            ));
        }
        self.num_inference_steps = n;
        self.timesteps = ts.into_iter().map(|x| x as f64).collect();
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
        let t = discrete_timestep(CLASS, timestep, self.config.betas.num_train_timesteps)?;
        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let prev_t =
            t as i64 - (self.config.betas.num_train_timesteps / self.num_inference_steps) as i64;

        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = self.alpha_prev(prev_t);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;

        let (mut x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                common::div(&lin2(&x, 1.0, &mo, -b_t.sqrt())?, a_t.sqrt())?,
                mo.clone(),
            ),
            PredictionType::Sample => {
                let eps = common::div(&lin2(&x, 1.0, &mo, -a_t.sqrt())?, b_t.sqrt())?;
                (mo.clone(), eps)
            }
            PredictionType::VPrediction => (
                lin2(&x, a_t.sqrt(), &mo, -b_t.sqrt())?,
                lin2(&mo, a_t.sqrt(), &x, b_t.sqrt())?,
            ),
            PredictionType::FlowPrediction => unsupported_prediction()?,
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir = mul(&eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&x0, a_prev.sqrt())? + dir)?;
        if self.eta > 0.0 {
            let z = common::f32_tensor(&noise.randn(model_output.dims(), model_output.device())?)?;
            prev = (prev + mul(&z, std_dev)?)?;
        }
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

    fn set_begin_index(&mut self, _begin_index: usize) {
        // DDIM's step does not depend on its position in the schedule.
    }
}

fn unsupported_prediction<T>() -> Result<T> {
    Err(Error::config(
        CLASS,
        "`prediction_type` = \"flow_prediction\" is not supported",
    ))
}

/// The forward process `sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε` (diffusers
/// `DDPMScheduler.add_noise`), shared by the discrete-timestep schedulers.
pub(crate) fn ddpm_add_noise(
    alphas_cumprod: &[f32],
    original: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<Tensor> {
    let a = alphas_cumprod[t];
    let x = common::f32_tensor(original)?;
    let z = common::f32_tensor(noise)?;
    let out = lin2(&x, a.sqrt() as f64, &z, (1.0 - a).sqrt() as f64)?;
    common::as_dtype(out, original.dtype())
}
