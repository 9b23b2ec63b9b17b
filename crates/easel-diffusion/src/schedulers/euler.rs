//! Euler: the first-order solver of the probability-flow ODE in σ space
//! (Karras et al., arXiv:2206.00364, Algorithm 2 without churn), following
//! diffusers' `EulerDiscreteScheduler`.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, StepIndex};
use super::config::{
    BetaConfig, ConfigReader, FinalSigmasType, InterpolationType, PredictionType, TimestepSpacing,
    TimestepType,
};
use super::lms::{scale_by_sigma, sigma_add_noise, sigma_x0};
use super::sigma_schedule::{self as ss, SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "EulerDiscreteScheduler";

/// The settings of [`EulerDiscreteScheduler`] (diffusers
/// `EulerDiscreteScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct EulerConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// epsilon, v_prediction or sample (`original_sample` is read as sample; default epsilon).
    pub prediction_type: PredictionType,
    /// σ between training timesteps: linear in t or log-linear (default linear).
    pub interpolation_type: InterpolationType,
    /// Which σ ramp to use (`use_karras_sigmas` / `use_exponential_sigmas`, default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds of the ramp (default: the schedule's own).
    pub sigma_bounds: SigmaBounds,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// discrete timesteps, or continuous `0.25 ln σ` for v-prediction (default discrete).
    pub timestep_type: TimestepType,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
    /// The σ after the last step (default zero).
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerConfig {
    /// Read a diffusers scheduler config as `EulerDiscreteScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let mut config = config.clone();
        if let Some(obj) = config.as_object_mut() {
            if obj.get("prediction_type").and_then(Value::as_str) == Some("original_sample") {
                obj.insert("prediction_type".into(), Value::from("sample"));
            }
        }
        let r = ConfigReader::new(CLASS, &config)?;
        let d = Self::default();
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, true)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::VPrediction,
                    PredictionType::Sample,
                ],
            )?,
            interpolation_type: r.enum_in(
                "interpolation_type",
                d.interpolation_type,
                &[InterpolationType::Linear, InterpolationType::LogLinear],
            )?,
            sigma_ramp: SigmaRamp::read(&r, true)?,
            sigma_bounds: SigmaBounds::read(&r)?,
            timestep_spacing: r.enum_in(
                "timestep_spacing",
                d.timestep_spacing,
                &[
                    TimestepSpacing::Linspace,
                    TimestepSpacing::Leading,
                    TimestepSpacing::Trailing,
                ],
            )?,
            timestep_type: r.enum_in(
                "timestep_type",
                d.timestep_type,
                &[TimestepType::Discrete, TimestepType::Continuous],
            )?,
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
            final_sigmas_type: r.enum_in(
                "final_sigmas_type",
                d.final_sigmas_type,
                &[FinalSigmasType::Zero, FinalSigmasType::SigmaMin],
            )?,
        })
    }
}

/// Euler sampling in σ space, as diffusers' `EulerDiscreteScheduler`
/// (deterministic: `s_churn` = 0). Timesteps are fractional.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerConfig,
    tables: TrainTables,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
}

impl EulerDiscreteScheduler {
    /// A scheduler for `config`.
    pub fn new(config: EulerConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, true);
        Ok(Self {
            config,
            tables,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`EulerConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(EulerConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &EulerConfig {
        &self.config
    }

    fn continuous_v(&self) -> bool {
        self.config.timestep_type == TimestepType::Continuous
            && self.config.prediction_type == PredictionType::VPrediction
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        let tt = self.config.betas.num_train_timesteps;
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if let Some(custom) = &request.sigmas {
            // Custom σ, final σ included (diffusers `set_timesteps(sigmas=...)`).
            if custom.len() < 2 {
                return Err(Error::invalid(
                    "sigmas",
                    format!("{CLASS}: custom sigmas need at least 2 values (the last is the final sigma)"),
                ));
            }
            if request.num_inference_steps != 0 && request.num_inference_steps != custom.len() - 1 {
                return Err(Error::invalid(
                    "sigmas",
                    format!(
                        "{CLASS}: {} sigmas give {} steps, but {} steps were asked",
                        custom.len(),
                        custom.len() - 1,
                        request.num_inference_steps
                    ),
                ));
            }
            let sigmas: Vec<f64> = custom.iter().map(|&s| f32r(s)).collect();
            let ts = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| f32r(common::sigma_to_t(s, &self.tables.log_sigmas)))
                .collect();
            (sigmas, ts)
        } else {
            let n = request.num_inference_steps;
            common::check_steps(CLASS, n, tt)?;
            let ts = ss::spaced_timesteps(
                self.config.timestep_spacing,
                tt,
                n,
                self.config.steps_offset,
            );
            let (mut sigmas, ts) = match self.config.interpolation_type {
                InterpolationType::Linear => ss::sigmas_and_timesteps(
                    &self.tables,
                    ts,
                    self.config.sigma_ramp,
                    &self.config.sigma_bounds,
                    n,
                ),
                InterpolationType::LogLinear => {
                    let s = &self.tables.sigmas;
                    let lo = s[s.len() - 1].ln();
                    let hi = s[0].ln();
                    let log_linear: Vec<f64> =
                        common::torch_linspace_f32(lo as f64, hi as f64, n + 1)
                            .into_iter()
                            .map(|x| x.exp() as f64)
                            .collect();
                    match self.config.sigma_ramp {
                        SigmaRamp::Interpolated => (log_linear, ts),
                        ramp => {
                            let sig = self.config.sigma_bounds.ramp(
                                ramp,
                                log_linear[log_linear.len() - 1],
                                log_linear[0],
                                n,
                            );
                            let t = sig
                                .iter()
                                .map(|&x| f32r(common::sigma_to_t(x, &self.tables.log_sigmas)))
                                .collect();
                            (sig, t)
                        }
                    }
                }
            };
            sigmas.push(match self.config.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => self.tables.sigma_min(),
            });
            (sigmas.into_iter().map(f32r).collect(), ts)
        };
        self.timesteps = if self.continuous_v() {
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| (0.25f32 * (s as f32).ln()) as f64)
                .collect()
        } else {
            timesteps
        };
        self.sigmas = sigmas;
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
        _noise: &mut dyn NoiseSource,
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
        let derivative = common::div(&(&x - &x0)?, sigma)?;
        let dt = (self.sigmas[i + 1] as f32 - sigma as f32) as f64;
        let prev = (x + common::mul(&derivative, dt)?)?;
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

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin_index = Some(begin_index);
    }
}
