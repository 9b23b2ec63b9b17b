//! LMS: the linear multistep sampler of k-diffusion (Karras et al.,
//! arXiv:2206.00364 setting; Crowson's `sample_lms`), following diffusers'
//! `LMSDiscreteScheduler`.
//!
//! The probability-flow ODE `dx/dσ = (x − x₀)/σ` is integrated with an
//! Adams–Bashforth method of up to 4th order: the coefficients are integrals
//! of Lagrange basis polynomials over the σ steps.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, lin2, StepIndex};
use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::sigma_schedule::{self as ss, SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::Result;
use crate::noise::NoiseSource;

const CLASS: &str = "LMSDiscreteScheduler";
const MAX_ORDER: usize = 4;

/// The settings of [`LmsDiscreteScheduler`] (diffusers `LMSDiscreteScheduler`
/// config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct LmsConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// Which σ ramp to use (`use_karras_sigmas` / `use_exponential_sigmas`, default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds for the exponential ramp.
    pub sigma_bounds: SigmaBounds,
    /// epsilon, v_prediction or sample (default epsilon).
    pub prediction_type: PredictionType,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
}

impl Default for LmsConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl LmsConfig {
    /// Read a diffusers scheduler config as `LMSDiscreteScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, false)?,
            sigma_ramp: SigmaRamp::read(&r, true)?,
            sigma_bounds: SigmaBounds::read(&r)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::VPrediction,
                    PredictionType::Sample,
                ],
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

/// Linear multistep sampling in σ space, as diffusers' `LMSDiscreteScheduler`
/// (order 4, the default of its `step`). Timesteps are fractional.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler {
    config: LmsConfig,
    tables: TrainTables,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    derivatives: Vec<Tensor>,
}

/// 4-point Gauss–Legendre nodes and weights on [-1, 1]: exact for the
/// polynomials (degree ≤ 3) being integrated.
const GL_NODES: [f64; 4] = [
    -0.861_136_311_594_052_6,
    -0.339_981_043_584_856_3,
    0.339_981_043_584_856_3,
    0.861_136_311_594_052_6,
];
const GL_WEIGHTS: [f64; 4] = [
    0.347_854_845_137_453_9,
    0.652_145_154_862_546_1,
    0.652_145_154_862_546_1,
    0.347_854_845_137_453_9,
];

impl LmsDiscreteScheduler {
    /// A scheduler for `config`.
    pub fn new(config: LmsConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, false);
        Ok(Self {
            config,
            tables,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            derivatives: Vec::new(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`LmsConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(LmsConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &LmsConfig {
        &self.config
    }

    /// ∫ from σ_t to σ_{t+1} of the Lagrange basis polynomial of
    /// `current_order` over the last `order` σ (diffusers `get_lms_coefficient`).
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = &self.sigmas;
        let basis = |tau: f64| -> f64 {
            let mut prod = 1.0;
            for k in 0..order {
                if k == current_order {
                    continue;
                }
                prod *= (tau - s[t - k]) / (s[t - current_order] - s[t - k]);
            }
            prod
        };
        let (a, b) = (s[t], s[t + 1]);
        let half = (b - a) / 2.0;
        let mid = (a + b) / 2.0;
        GL_NODES
            .iter()
            .zip(GL_WEIGHTS.iter())
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Scheduler for LmsDiscreteScheduler {
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
        // LMS's own Karras ramp ignores any sigma_min / sigma_max keys.
        let bounds = match self.config.sigma_ramp {
            SigmaRamp::Karras => SigmaBounds::default(),
            _ => self.config.sigma_bounds,
        };
        let (mut sigmas, ts) =
            ss::sigmas_and_timesteps(&self.tables, ts, self.config.sigma_ramp, &bounds, n);
        sigmas.push(0.0);
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = ts;
        self.index.reset();
        self.derivatives.clear();
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
        self.derivatives.push(derivative);
        if self.derivatives.len() > MAX_ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(MAX_ORDER);
        let mut acc: Option<Tensor> = None;
        for (k, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = common::mul(d, self.lms_coefficient(order, i, k))?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let prev = match acc {
            Some(a) => (x + a)?,
            None => x,
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

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin_index = Some(begin_index);
    }
}

/// `sample / sqrt(σ² + 1)`, the input scaling of the σ-space schedulers.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let s = sigma as f32;
    let denom = (s * s + 1.0).sqrt();
    let x = common::f32_tensor(sample)?;
    common::as_dtype(common::div(&x, denom as f64)?, sample.dtype())
}

/// x₀ from the model output at noise level σ (σ-space parameterisation):
/// epsilon `x − σ ε`, v-prediction `−σ/sqrt(σ²+1) v + x/(σ²+1)`, sample as is.
pub(crate) fn sigma_x0(
    prediction: PredictionType,
    mo: &Tensor,
    x: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => lin2(x, 1.0, mo, -sigma)?,
        PredictionType::VPrediction => {
            let s = sigma as f32;
            let s2 = s * s + 1.0;
            let c_out = -s / s2.sqrt();
            (common::mul(mo, c_out as f64)? + common::div(x, s2 as f64)?)?
        }
        _ => mo.clone(),
    })
}

/// `x₀ + σ ε`, the forward process in σ space (diffusers' Euler-family `add_noise`).
pub(crate) fn sigma_add_noise(
    sigmas: &[f64],
    i: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let sigma = *sigmas
        .get(i)
        .ok_or_else(|| common::past_end("scheduler", i))?;
    let x = common::f32_tensor(original)?;
    let z = common::f32_tensor(noise)?;
    common::as_dtype((x + common::mul(&z, sigma)?)?, original.dtype())
}
