//! Euler ancestral: an Euler step down to σ_down followed by fresh noise of
//! size σ_up (k-diffusion's `sample_euler_ancestral`, Karras et al.
//! arXiv:2206.00364 setting), following diffusers'
//! `EulerAncestralDiscreteScheduler`. Stochastic: one Gaussian draw per step.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, StepIndex};
use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::lms::{scale_by_sigma, sigma_add_noise, sigma_x0};
use super::sigma_schedule::{self as ss, SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::Result;
use crate::noise::NoiseSource;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The settings of [`EulerAncestralDiscreteScheduler`] (diffusers
/// `EulerAncestralDiscreteScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct EulerAncestralConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// epsilon or v_prediction (default epsilon; diffusers has no `sample` here).
    pub prediction_type: PredictionType,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
}

impl Default for EulerAncestralConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl EulerAncestralConfig {
    /// Read a diffusers scheduler config as `EulerAncestralDiscreteScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, true)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
            timestep_spacing: r.enum_in(
                "timestep_spacing",
                d.timestep_spacing,
                &[
                    TimestepSpacing::Linspace,
                    TimestepSpacing::Leading,
                    TimestepSpacing::Trailing,
                ],
            )?,
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
        })
    }
}

/// Ancestral Euler sampling in σ space, as diffusers'
/// `EulerAncestralDiscreteScheduler`. Each `step` draws one tensor of the
/// model output's shape from the [`NoiseSource`] (the last step included).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralConfig,
    tables: TrainTables,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    /// A scheduler for `config`.
    pub fn new(config: EulerAncestralConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, true);
        Ok(Self {
            config,
            tables,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`EulerAncestralConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(EulerAncestralConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &EulerAncestralConfig {
        &self.config
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        let tt = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        common::check_steps(CLASS, n, tt)?;
        let ts = ss::spaced_timesteps(
            self.config.timestep_spacing,
            tt,
            n,
            self.config.steps_offset,
        );
        let (mut sigmas, ts) = ss::sigmas_and_timesteps(
            &self.tables,
            ts,
            SigmaRamp::Interpolated,
            &SigmaBounds::default(),
            n,
        );
        sigmas.push(0.0);
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = ts;
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        ss::init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(common::not_ready(CLASS));
        }
        let i = self.index.get(CLASS, &self.timesteps, timestep, false)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| common::past_end(CLASS, i))?;
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(common::not_ready(CLASS));
        }
        let dtype = sample.dtype();
        let i = self.index.get(CLASS, &self.timesteps, timestep, false)?;
        if i + 1 >= self.sigmas.len() {
            return Err(common::past_end(CLASS, i));
        }
        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let sigma = self.sigmas[i];
        let x0 = sigma_x0(self.config.prediction_type, &mo, &x, sigma)?;
        // σ_up / σ_down split of the step (float32, as diffusers' scalar tensors).
        let from = sigma as f32;
        let to = self.sigmas[i + 1] as f32;
        let sigma_up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = common::div(&(&x - &x0)?, sigma)?;
        let dt = (sigma_down - from) as f64;
        let prev = (&x + common::mul(&derivative, dt)?)?;
        let z = common::f32_tensor(&noise.randn(model_output.dims(), model_output.device())?)?;
        let prev = (prev + common::mul(&z, sigma_up as f64)?)?;
        self.index.advance();
        common::as_dtype(prev, dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .noise_index(CLASS, &self.timesteps, timestep, false)?;
        sigma_add_noise(&self.sigmas, i, original, noise)
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
