//! Flow-matching Euler: the Euler solver of the rectified-flow ODE
//! `dx/dσ = v` with `x_σ = (1 − σ) x₀ + σ ε` (Esser et al., SD3,
//! arXiv:2403.03206), following diffusers' `FlowMatchEulerDiscreteScheduler`.
//!
//! σ runs from 1 (pure noise) to 0 and the model is fed `t = 1000 σ`. The
//! schedule is shifted toward high noise, by a fixed `shift`
//! (`σ' = s σ / (1 + (s − 1) σ)`) or, with `use_dynamic_shifting`, by the
//! resolution-dependent `mu` the pipeline computes (FLUX.1).

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, lin2, StepIndex};
use super::config::{ConfigReader, TimeShiftType};
use super::sigma_schedule::{SigmaBounds, SigmaRamp};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// The settings of [`FlowMatchEulerDiscreteScheduler`] (diffusers
/// `FlowMatchEulerDiscreteScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchConfig {
    /// Number of training timesteps; the model sees `t = σ · num_train_timesteps` (default 1000).
    pub num_train_timesteps: usize,
    /// The static time shift s (default 1.0; SD3 uses 3.0).
    pub shift: f64,
    /// Shift by the `mu` given to `set_timesteps` instead of `shift` (default false; FLUX.1-dev true).
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens (default 0.5).
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len` tokens (default 1.15).
    pub max_shift: f64,
    /// Token count of `base_shift` (default 256).
    pub base_image_seq_len: usize,
    /// Token count of `max_shift` (default 4096).
    pub max_image_seq_len: usize,
    /// Use `1 − σ` (default false).
    pub invert_sigmas: bool,
    /// Stretch the shifted σ so the last one is `1 − shift_terminal` (default none).
    pub shift_terminal: Option<f64>,
    /// Which σ ramp to apply after shifting (default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds of the ramp.
    pub sigma_bounds: SigmaBounds,
    /// The dynamic shift formula (default exponential).
    pub time_shift_type: TimeShiftType,
    /// Re-noise to σ_next with a fresh draw instead of the Euler update (default false).
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchConfig {
    /// Read a diffusers scheduler config as `FlowMatchEulerDiscreteScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        let num_train_timesteps = r.usize("num_train_timesteps", d.num_train_timesteps)?;
        if num_train_timesteps < 2 {
            return Err(r.error("num_train_timesteps", "must be at least 2"));
        }
        let shift = r.f64("shift", d.shift)?;
        if !(shift > 0.0 && shift.is_finite()) {
            return Err(r.error("shift", format!("= {shift} must be a positive number")));
        }
        let shift_terminal = r.opt_f64("shift_terminal")?.filter(|&x| x != 0.0);
        if let Some(st) = shift_terminal {
            if st >= 1.0 {
                return Err(r.error("shift_terminal", format!("= {st} must be below 1")));
            }
        }
        Ok(Self {
            num_train_timesteps,
            shift,
            use_dynamic_shifting: r.bool("use_dynamic_shifting", d.use_dynamic_shifting)?,
            base_shift: r.f64("base_shift", d.base_shift)?,
            max_shift: r.f64("max_shift", d.max_shift)?,
            base_image_seq_len: r.usize("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: r.usize("max_image_seq_len", d.max_image_seq_len)?,
            invert_sigmas: r.bool("invert_sigmas", d.invert_sigmas)?,
            shift_terminal,
            sigma_ramp: SigmaRamp::read(&r, true)?,
            sigma_bounds: SigmaBounds::read(&r)?,
            time_shift_type: r.enum_in(
                "time_shift_type",
                d.time_shift_type,
                &[TimeShiftType::Exponential, TimeShiftType::Linear],
            )?,
            stochastic_sampling: r.bool("stochastic_sampling", d.stochastic_sampling)?,
        })
    }

    /// The dynamic-shift `mu` for an image of `image_seq_len` latent tokens:
    /// linear from `base_shift` at `base_image_seq_len` to `max_shift` at
    /// `max_image_seq_len` (diffusers' `calculate_shift`, used by FluxPipeline).
    pub fn calculate_shift(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// Euler sampling of a rectified flow, as diffusers'
/// `FlowMatchEulerDiscreteScheduler`. Timesteps are `1000 σ` (fractional);
/// σ include the final 0 (or 1 with `invert_sigmas`).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: FlowMatchConfig,
    /// σ of the training schedule's first and last entries (after the static shift).
    sigma_max: f64,
    sigma_min: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
}

impl FlowMatchEulerDiscreteScheduler {
    /// A scheduler for `config`.
    pub fn new(config: FlowMatchConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        // The training σ are t / n for t = n .. 1 (float32), statically shifted.
        let edge = |t: f64| -> f64 {
            let s = (t as f32) / (n as f32);
            if config.use_dynamic_shifting {
                s as f64
            } else {
                let sh = config.shift as f32;
                let sh1 = (config.shift - 1.0) as f32;
                (sh * s / (1.0 + sh1 * s)) as f64
            }
        };
        let sigma_max = edge(n as f64);
        let sigma_min = edge(1.0);
        Ok(Self {
            config,
            sigma_max,
            sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`FlowMatchConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(FlowMatchConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    fn time_shift(&self, mu: f64, t: f64) -> f64 {
        match self.config.time_shift_type {
            TimeShiftType::Exponential => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
            TimeShiftType::Linear => mu / (mu + (1.0 / t - 1.0)),
        }
    }

    /// The float32 form of [`Self::time_shift`] (numpy float32 arrays with Python scalars).
    fn time_shift_f32(&self, mu: f64, t: f32) -> f32 {
        match self.config.time_shift_type {
            TimeShiftType::Exponential => {
                let e = mu.exp() as f32;
                e / (e + (1.0 / t - 1.0))
            }
            TimeShiftType::Linear => {
                let m = mu as f32;
                m / (m + (1.0 / t - 1.0))
            }
        }
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        let mu = match (self.config.use_dynamic_shifting, request.mu) {
            (true, None) => {
                return Err(Error::invalid(
                    "mu",
                    format!("{CLASS}: `mu` must be given when use_dynamic_shifting is true"),
                ))
            }
            (_, mu) => mu,
        };
        let tt = self.config.num_train_timesteps as f64;
        let mut sigmas: Vec<f64> = match &request.sigmas {
            Some(custom) => {
                if custom.is_empty() {
                    return Err(Error::invalid(
                        "sigmas",
                        format!("{CLASS}: no sigmas given"),
                    ));
                }
                if request.num_inference_steps != 0 && request.num_inference_steps != custom.len() {
                    return Err(Error::invalid(
                        "sigmas",
                        format!(
                            "{CLASS}: {} sigmas given for {} steps; they must match",
                            custom.len(),
                            request.num_inference_steps
                        ),
                    ));
                }
                if custom.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(Error::invalid(
                        "sigmas",
                        format!("{CLASS}: sigmas must be positive"),
                    ));
                }
                // numpy float32 arithmetic, as diffusers does with given sigmas.
                custom
                    .iter()
                    .map(|&s| {
                        let s = s as f32;
                        let shifted = if self.config.use_dynamic_shifting {
                            self.time_shift_f32(mu.unwrap_or(0.0), s)
                        } else {
                            let sh = self.config.shift as f32;
                            let sh1 = (self.config.shift - 1.0) as f32;
                            sh * s / (1.0 + sh1 * s)
                        };
                        shifted as f64
                    })
                    .collect()
            }
            None => {
                let n = request.num_inference_steps;
                common::check_steps(CLASS, n, self.config.num_train_timesteps)?;
                common::np_linspace(self.sigma_max * tt, self.sigma_min * tt, n)
                    .into_iter()
                    .map(|t| {
                        let s = t / tt;
                        if self.config.use_dynamic_shifting {
                            self.time_shift(mu.unwrap_or(0.0), s)
                        } else {
                            let sh = self.config.shift;
                            sh * s / (1.0 + (sh - 1.0) * s)
                        }
                    })
                    .collect()
            }
        };
        if let Some(st) = self.config.shift_terminal {
            let last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = last / (1.0 - st);
            sigmas = sigmas
                .into_iter()
                .map(|s| 1.0 - (1.0 - s) / scale)
                .collect();
        }
        let n = sigmas.len();
        if self.config.sigma_ramp != SigmaRamp::Interpolated {
            sigmas =
                self.config
                    .sigma_bounds
                    .ramp(self.config.sigma_ramp, sigmas[n - 1], sigmas[0], n);
        }
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        if self.config.invert_sigmas {
            sigmas = sigmas
                .into_iter()
                .map(|s| (1.0f32 - s as f32) as f64)
                .collect();
        }
        let ntt = self.config.num_train_timesteps as f32;
        self.timesteps = sigmas.iter().map(|&s| (s as f32 * ntt) as f64).collect();
        sigmas.push(if self.config.invert_sigmas { 1.0 } else { 0.0 });
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
        let sigma = self.sigmas[i] as f32;
        let sigma_next = self.sigmas[i + 1] as f32;
        let prev = if self.config.stochastic_sampling {
            let x0 = lin2(&x, 1.0, &mo, -(sigma as f64))?;
            let z = common::f32_tensor(&noise.randn(sample.dims(), sample.device())?)?;
            lin2(&x0, (1.0 - sigma_next) as f64, &z, sigma_next as f64)?
        } else {
            (&x + common::mul(&mo, (sigma_next - sigma) as f64)?)?
        };
        self.index.advance();
        common::as_dtype(prev, dtype)
    }

    /// diffusers' `scale_noise`: `σ ε + (1 − σ) x₀` at the σ of `timestep`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .noise_index(CLASS, &self.timesteps, timestep, false)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| common::past_end(CLASS, i))?;
        let x = common::f32_tensor(original)?;
        let z = common::f32_tensor(noise)?;
        let out = lin2(&z, sigma, &x, (1.0f32 - sigma as f32) as f64)?;
        common::as_dtype(out, original.dtype())
    }

    fn family(&self) -> SchedulerFamily {
        SchedulerFamily::FlowMatch
    }

    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin_index = Some(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calculate_shift_matches_flux_pipeline() {
        // diffusers.pipelines.flux.pipeline_flux.calculate_shift(seq, 256, 4096, 0.5, 1.15)
        let c = FlowMatchConfig::default();
        for (seq, mu) in [(20, 0.4600520833333333), (4096, 1.15), (1024, 0.63)] {
            assert!((c.calculate_shift(seq) - mu).abs() < 1e-12, "{seq}");
        }
    }

    #[test]
    fn dynamic_shifting_needs_mu() {
        let mut s = FlowMatchEulerDiscreteScheduler::from_config(
            &serde_json::json!({"use_dynamic_shifting": true}),
        )
        .unwrap();
        let err = s
            .set_timesteps(&TimestepsRequest::steps(4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mu"), "{err}");
        let req = TimestepsRequest {
            num_inference_steps: 4,
            mu: Some(0.5),
            ..Default::default()
        };
        s.set_timesteps(&req).unwrap();
        assert_eq!(s.timesteps().len(), 4);
        assert_eq!(s.sigmas().unwrap()[4], 0.0);
    }
}
