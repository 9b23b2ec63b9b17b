//! Heun: the second-order (trapezoidal) solver of the probability-flow ODE in
//! σ space (Karras et al., arXiv:2206.00364, Algorithm 1), following
//! diffusers' `HeunDiscreteScheduler`.
//!
//! Every step but the last takes two model calls, so the timestep list is
//! doubled as in diffusers: `[t₀, t₁, t₁, t₂, t₂, …]`, σ likewise; the call at
//! an even index is the Euler predictor, the one after it the corrector.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, StepIndex};
use super::config::{BetaConfig, BetaSchedule, ConfigReader, PredictionType, TimestepSpacing};
use super::lms::{scale_by_sigma, sigma_add_noise, sigma_x0};
use super::sigma_schedule::{self as ss, SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::Result;
use crate::noise::NoiseSource;

const CLASS: &str = "HeunDiscreteScheduler";

/// The settings of [`HeunDiscreteScheduler`] (diffusers
/// `HeunDiscreteScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct HeunConfig {
    /// The training noise schedule (default: 1000 steps, linear 0.00085 .. 0.012).
    pub betas: BetaConfig,
    /// epsilon, v_prediction or sample (default epsilon).
    pub prediction_type: PredictionType,
    /// Which σ ramp to use (`use_karras_sigmas` / `use_exponential_sigmas`, default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds of the ramp.
    pub sigma_bounds: SigmaBounds,
    /// Clamp the predicted x₀ to ±`clip_sample_range` (default false).
    pub clip_sample: bool,
    /// The clamp bound (default 1.0).
    pub clip_sample_range: f64,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
}

impl Default for HeunConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::Linear,
                ..BetaConfig::ddpm_default()
            },
            prediction_type: PredictionType::Epsilon,
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl HeunConfig {
    /// Read a diffusers scheduler config as `HeunDiscreteScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, true, false)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::VPrediction,
                    PredictionType::Sample,
                ],
            )?,
            sigma_ramp: SigmaRamp::read(&r, true)?,
            sigma_bounds: SigmaBounds::read(&r)?,
            clip_sample: r.bool("clip_sample", d.clip_sample)?,
            clip_sample_range: r.f64("clip_sample_range", d.clip_sample_range)?,
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

/// Heun's method in σ space, as diffusers' `HeunDiscreteScheduler`: 2n − 1
/// model calls for n steps ([`Scheduler::order`] is 2).
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: HeunConfig,
    tables: TrainTables,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    /// Predictor state: derivative, dt and sample of the pending first-order half.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl HeunDiscreteScheduler {
    /// A scheduler for `config`.
    pub fn new(config: HeunConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, false);
        Ok(Self {
            config,
            tables,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            pending: None,
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`HeunConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(HeunConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &HeunConfig {
        &self.config
    }
}

impl Scheduler for HeunDiscreteScheduler {
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
            self.config.sigma_ramp,
            &self.config.sigma_bounds,
            n,
        );
        sigmas.push(0.0);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        let last = sigmas.len() - 1;
        let mut doubled = vec![sigmas[0]];
        for &s in &sigmas[1..last] {
            doubled.push(s);
            doubled.push(s);
        }
        doubled.push(sigmas[last]);
        let mut tdoubled = vec![ts[0]];
        for &t in &ts[1..] {
            tdoubled.push(t);
            tdoubled.push(t);
        }
        self.sigmas = doubled;
        self.timesteps = tdoubled;
        self.index.reset();
        self.pending = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(common::not_ready(CLASS));
        }
        let dtype = sample.dtype();
        let i = self.index.get(CLASS, &self.timesteps, timestep, false)?;
        if i + 1 >= self.sigmas.len() || (self.pending.is_some() && i == 0) {
            return Err(common::past_end(CLASS, i));
        }
        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let pending = self.pending.take();
        let (sigma, sigma_next) = match pending {
            None => (self.sigmas[i], self.sigmas[i + 1]),
            Some(_) => (self.sigmas[i - 1], self.sigmas[i]),
        };
        let sigma_input = if pending.is_none() { sigma } else { sigma_next };
        let mut x0 = sigma_x0(self.config.prediction_type, &mo, &x, sigma_input)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let prev = match pending {
            None => {
                // Predictor: an Euler step, remembered for the corrector.
                let derivative = common::div(&(&x - &x0)?, sigma)?;
                let dt = (sigma_next as f32 - sigma as f32) as f64;
                let prev = (&x + common::mul(&derivative, dt)?)?;
                self.pending = Some((derivative, dt, x));
                prev
            }
            Some((prev_derivative, dt, start)) => {
                // Corrector: average the two slopes, restart from the predictor's sample.
                let derivative = common::div(&(&x - &x0)?, sigma_next)?;
                let derivative = common::mul(&(prev_derivative + derivative)?, 0.5)?;
                (start + common::mul(&derivative, dt)?)?
            }
        };
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

    fn sigma_schedule(&self) -> Option<&'static str> {
        self.config.sigma_ramp.metadata_name()
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin_index = Some(begin_index);
    }
}
