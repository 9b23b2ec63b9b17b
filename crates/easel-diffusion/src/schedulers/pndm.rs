//! PNDM: pseudo numerical methods for diffusion models (Liu et al.,
//! arXiv:2202.09778), following diffusers' `PNDMScheduler`.
//!
//! With `skip_prk_steps` (Stable Diffusion's setting) this is the PLMS
//! sampler: a linear multistep (Adams–Bashforth up to 4th order) method on
//! the noise predictions, applied through the pseudo-numerical transfer of
//! eq. (9). Without it, the first three steps are Runge–Kutta (PRK) steps of
//! four model calls each, as F-PNDM.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, discrete_timestep, lin2, mul};
use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::ddim::ddpm_add_noise;
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "PNDMScheduler";

/// The settings of [`PndmScheduler`] (diffusers `PNDMScheduler` config keys,
/// with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct PndmConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// Skip the Runge–Kutta warm-up and run PLMS only (default false; SD uses true).
    pub skip_prk_steps: bool,
    /// Use ᾱ = 1 after the last step instead of ᾱ₀ (default false).
    pub set_alpha_to_one: bool,
    /// epsilon or v_prediction (default epsilon).
    pub prediction_type: PredictionType,
    /// How the inference timesteps are spaced (default leading).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
}

impl Default for PndmConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

impl PndmConfig {
    /// Read a diffusers scheduler config as `PNDMScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, false)?,
            skip_prk_steps: r.bool("skip_prk_steps", d.skip_prk_steps)?,
            set_alpha_to_one: r.bool("set_alpha_to_one", d.set_alpha_to_one)?,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
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
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
        })
    }
}

/// PNDM / PLMS sampling (arXiv:2202.09778), as diffusers' `PNDMScheduler`.
/// Timesteps are integers; the last PLMS timestep before the final one is
/// repeated (the second model call of the 2nd-order warm-up).
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    config: PndmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// A scheduler for `config`.
    pub fn new(config: PndmConfig) -> Result<Self> {
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
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`PndmConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(PndmConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    fn ratio(&self) -> i64 {
        (self.config.betas.num_train_timesteps / self.num_inference_steps) as i64
    }

    fn alpha(&self, t: i64) -> Result<f64> {
        let n = self.config.betas.num_train_timesteps as i64;
        if t >= n {
            return Err(Error::invalid(
                "timestep",
                format!("{CLASS}: timestep {t} is outside 0..{n}"),
            ));
        }
        Ok(if t >= 0 {
            self.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        })
    }

    /// Eq. (9): the transfer from `sample` at `t` to `prev_t` given the noise estimate.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha(t.max(0))?;
        let a_prev = self.alpha(prev_t)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => lin2(model_output, a_t.sqrt(), sample, b_t.sqrt())?,
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let term = common::div(&mul(&eps, a_prev - a_t)?, denom)?;
        Ok((mul(sample, sample_coeff)? - term)?)
    }

    fn step_prk(&mut self, mo: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let half = self.ratio() / 2;
        let diff = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let acc = |cur: &Option<Tensor>, add: Tensor| -> Result<Tensor> {
            Ok(match cur {
                Some(c) => (c + add)?,
                None => add,
            })
        };
        let mut model_output = mo.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, mul(mo, 1.0 / 6.0)?)?);
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, mul(mo, 1.0 / 3.0)?)?);
            }
            _ => {
                model_output = acc(&self.cur_model_output, mul(mo, 1.0 / 6.0)?)?;
                self.cur_model_output = None;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, mo: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(
                "scheduler",
                format!("{CLASS}: PLMS steps need the PRK warm-up to have run first"),
            ));
        }
        let ratio = self.ratio();
        let mut t = timestep;
        let mut prev_t = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(mo.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut x = sample.clone();
        let model_output = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            mo.clone()
        } else if k == 1 && self.counter == 1 {
            x = self.cur_sample.take().ok_or_else(|| {
                Error::invalid("scheduler", format!("{CLASS}: missing the warm-up sample"))
            })?;
            mul(&(mo + &e[0])?, 0.5)?
        } else if k == 2 {
            mul(&lin2(&e[1], 3.0, &e[0], -1.0)?, 0.5)?
        } else if k == 3 {
            let s = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
            common::div(&s, 12.0)?
        } else {
            let s = (((mul(&e[k - 1], 55.0)? - mul(&e[k - 2], 59.0)?)? + mul(&e[k - 3], 37.0)?)?
                - mul(&e[k - 4], 9.0)?)?;
            mul(&s, 1.0 / 24.0)?
        };
        let prev = self.prev_sample(&x, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        let tt = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        common::check_steps(CLASS, n, tt)?;
        // Ascending base timesteps.
        let mut base: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => common::linspace_rounded(tt, n),
            TimestepSpacing::Leading => common::leading(tt, n, self.config.steps_offset),
            TimestepSpacing::Trailing => common::trailing(tt, n),
        };
        base.reverse();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                return Err(Error::invalid(
                    "num_inference_steps",
                    format!(
                        "{CLASS} with skip_prk_steps = false needs at least 4 steps (got {n}); \
                         diffusers fails the same way. Use skip_prk_steps = true (PLMS) for fewer steps"
                    ),
                ));
            }
            let half = (tt / n / 2) as i64;
            let tail = &base[n - 4..];
            let mut prk: Vec<i64> = Vec::with_capacity(8);
            for &t in tail {
                prk.push(t);
                prk.push(t + half);
            }
            let mut rep: Vec<i64> = prk[..prk.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            rep.remove(0);
            rep.pop();
            rep.reverse();
            let mut plms: Vec<i64> = base[..n - 3].to_vec();
            plms.reverse();
            (rep, plms)
        };
        if let Some(bad) = prk
            .iter()
            .chain(plms.iter())
            .find(|&&x| x < 0 || x >= tt as i64)
        {
            return Err(Error::config(
                CLASS,
                format!("timestep {bad} falls outside 0..{tt} (check `steps_offset`)"),
            ));
        }
        self.num_inference_steps = n;
        self.timesteps = prk.iter().chain(plms.iter()).map(|&x| x as f64).collect();
        self.prk_timesteps = prk;
        self.counter = 0;
        self.ets.clear();
        self.cur_model_output = None;
        self.cur_sample = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.num_inference_steps == 0 {
            return Err(common::not_ready(CLASS));
        }
        let dtype = sample.dtype();
        let t = discrete_timestep(CLASS, timestep, self.config.betas.num_train_timesteps)? as i64;
        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let prev = if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(&mo, t, &x)?
        } else {
            self.step_plms(&mo, t, &x)?
        };
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
        // diffusers' PNDMScheduler has no begin index: its multistep history
        // starts afresh wherever the (sliced) schedule starts.
    }
}
