//! DPM-Solver / DPM-Solver++ multistep (Lu et al., arXiv:2206.00927 and
//! arXiv:2211.01095), following diffusers' `DPMSolverMultistepScheduler`.
//!
//! The diffusion ODE is solved in log-SNR time λ = ln(α/σ) with an
//! exponential integrator; the multistep variants reuse the previous model
//! outputs for the 2nd / 3rd-order terms. `dpmsolver++` with `solver_order` 2
//! and the `midpoint` update is "DPM++ 2M"; with `use_karras_sigmas` it is
//! "DPM++ 2M Karras". The SDE variants draw one Gaussian tensor per step.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, lin2, mul, StepIndex};
use super::config::{
    AlgorithmType, BetaConfig, BetaSchedule, ConfigEnum, ConfigReader, DpmSolverType,
    FinalSigmasType, PredictionType, TimestepSpacing, VarianceType,
};
use super::sigma_schedule::{SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "DPMSolverMultistepScheduler";

/// The settings of [`DpmSolverMultistepScheduler`] (diffusers
/// `DPMSolverMultistepScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// Order of the multistep solver, 1 to 3 (default 2).
    pub solver_order: usize,
    /// epsilon, sample or v_prediction (default epsilon).
    pub prediction_type: PredictionType,
    /// dpmsolver++ (default), sde-dpmsolver++, dpmsolver or sde-dpmsolver.
    pub algorithm_type: AlgorithmType,
    /// The 2nd-order update: midpoint (default) or heun.
    pub solver_type: DpmSolverType,
    /// Use lower-order updates for the last steps when there are fewer than 15 (default true).
    pub lower_order_final: bool,
    /// Use a first-order (Euler) update for the last step (default false).
    pub euler_at_final: bool,
    /// Which σ ramp to use (`use_karras_sigmas` / `use_exponential_sigmas`, default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds of the ramp.
    pub sigma_bounds: SigmaBounds,
    /// Steps uniform in log σ (`use_lu_lambdas`, Lu et al.; default false).
    pub use_lu_lambdas: bool,
    /// The σ after the last step (default zero).
    pub final_sigmas_type: FinalSigmasType,
    /// Timesteps whose λ is below this are not used (default −∞).
    pub lambda_min_clipped: f64,
    /// Learned-variance models: keep only the first 3 output channels (default none).
    pub variance_type: Option<VarianceType>,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: DpmSolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            use_lu_lambdas: false,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl DpmSolverConfig {
    /// Read a diffusers scheduler config as `DPMSolverMultistepScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        r.reject_true("thresholding", "dynamic thresholding is not implemented")?;
        r.reject_true(
            "use_flow_sigmas",
            "flow-matching sigmas are not implemented for this scheduler; use FlowMatchEulerDiscreteScheduler",
        )?;
        let solver_order = r.usize("solver_order", d.solver_order)?;
        if !(1..=3).contains(&solver_order) {
            return Err(r.error(
                "solver_order",
                format!("= {solver_order}; allowed values: 1, 2, 3"),
            ));
        }
        let algorithm_type = match r.enum_in(
            "algorithm_type",
            d.algorithm_type,
            &[
                AlgorithmType::DpmSolverPlusPlus,
                AlgorithmType::SdeDpmSolverPlusPlus,
                AlgorithmType::DpmSolver,
                AlgorithmType::SdeDpmSolver,
                AlgorithmType::Deis,
            ],
        )? {
            AlgorithmType::Deis => AlgorithmType::DpmSolverPlusPlus,
            a => a,
        };
        let solver_type = match r.enum_in(
            "solver_type",
            d.solver_type,
            &[
                DpmSolverType::Midpoint,
                DpmSolverType::Heun,
                DpmSolverType::Logrho,
                DpmSolverType::Bh1,
                DpmSolverType::Bh2,
            ],
        )? {
            DpmSolverType::Heun => DpmSolverType::Heun,
            _ => DpmSolverType::Midpoint,
        };
        let final_sigmas_type = r.enum_in(
            "final_sigmas_type",
            d.final_sigmas_type,
            &[FinalSigmasType::Zero, FinalSigmasType::SigmaMin],
        )?;
        if matches!(
            algorithm_type,
            AlgorithmType::DpmSolver | AlgorithmType::SdeDpmSolver
        ) && final_sigmas_type == FinalSigmasType::Zero
        {
            return Err(r.error(
                "final_sigmas_type",
                format!(
                    "= \"zero\" is not supported with algorithm_type \"{}\"; use \"sigma_min\"",
                    algorithm_type.as_str()
                ),
            ));
        }
        Ok(Self {
            betas: BetaConfig::read(&r, &d.betas, false, true)?,
            solver_order,
            prediction_type: r.enum_in(
                "prediction_type",
                d.prediction_type,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
            algorithm_type,
            solver_type,
            lower_order_final: r.bool("lower_order_final", d.lower_order_final)?,
            euler_at_final: r.bool("euler_at_final", d.euler_at_final)?,
            sigma_ramp: SigmaRamp::read(&r, true)?,
            sigma_bounds: SigmaBounds::read(&r)?,
            use_lu_lambdas: r.bool("use_lu_lambdas", d.use_lu_lambdas)?,
            final_sigmas_type,
            lambda_min_clipped: r.f64("lambda_min_clipped", d.lambda_min_clipped)?,
            variance_type: r.opt_enum_in(
                "variance_type",
                &[VarianceType::Learned, VarianceType::LearnedRange],
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

/// DPM-Solver(++) multistep sampling, as diffusers'
/// `DPMSolverMultistepScheduler`. Timesteps are integers; σ include the final one.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverConfig,
    tables: TrainTables,
    /// λ_t = ln √ᾱ − ln √(1 − ᾱ) of the training timesteps (float32).
    lambda_t: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// α_t and σ_t of the variance-preserving process at noise level σ:
/// `α = 1 / sqrt(σ² + 1)`, `σ_t = σ α`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ (log-SNR / 2).
pub(crate) fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistepScheduler {
    /// A scheduler for `config`.
    pub fn new(config: DpmSolverConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, true);
        let lambda_t = tables
            .alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect();
        let order = config.solver_order;
        Ok(Self {
            config,
            tables,
            lambda_t,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`DpmSolverConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(DpmSolverConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    fn is_data_prediction(&self) -> bool {
        matches!(
            self.config.algorithm_type,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        )
    }

    fn is_sde(&self) -> bool {
        matches!(
            self.config.algorithm_type,
            AlgorithmType::SdeDpmSolverPlusPlus | AlgorithmType::SdeDpmSolver
        )
    }

    /// The model output as x₀ (DPM-Solver++) or ε (DPM-Solver).
    fn convert_model_output(&self, mo: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let learned = self.config.variance_type.is_some();
        let sigma = self.sigmas[i];
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let eps_part = |mo: &Tensor| -> Result<Tensor> {
            if learned {
                Ok(mo.narrow(1, 0, 3)?)
            } else {
                Ok(mo.clone())
            }
        };
        if self.is_data_prediction() {
            match self.config.prediction_type {
                PredictionType::Epsilon => {
                    let eps = eps_part(mo)?;
                    common::div(&lin2(sample, 1.0, &eps, -sigma_t)?, alpha_t)
                }
                PredictionType::VPrediction => lin2(sample, alpha_t, mo, -sigma_t),
                _ => Ok(mo.clone()),
            }
        } else {
            match self.config.prediction_type {
                PredictionType::Epsilon => eps_part(mo),
                PredictionType::VPrediction => lin2(mo, alpha_t, sample, sigma_t),
                _ => common::div(&lin2(sample, 1.0, mo, -alpha_t)?, sigma_t),
            }
        }
    }

    fn first_order(
        &self,
        m0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.config.algorithm_type {
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let z = noise_or_err(noise)?;
                let e2 = (-2.0 * h).exp();
                let a = lin2(
                    sample,
                    sigma_t / sigma_s * (-h).exp(),
                    m0,
                    alpha_t * (1.0 - e2),
                )?;
                Ok((a + mul(z, sigma_t * (1.0 - e2).sqrt())?)?)
            }
            AlgorithmType::SdeDpmSolver => {
                let z = noise_or_err(noise)?;
                let a = lin2(
                    sample,
                    alpha_t / alpha_s,
                    m0,
                    -2.0 * (sigma_t * (h.exp() - 1.0)),
                )?;
                Ok((a + mul(z, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?)
            }
            AlgorithmType::DpmSolver => {
                lin2(sample, alpha_t / alpha_s, m0, -(sigma_t * (h.exp() - 1.0)))
            }
            _ => lin2(
                sample,
                sigma_t / sigma_s,
                m0,
                -(alpha_t * ((-h).exp() - 1.0)),
            ),
        }
    }

    fn second_order(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let (m0, m1) = match (&self.model_outputs[k - 1], &self.model_outputs[k - 2]) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(missing_history()),
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lt, ls0, ls1) = (
            lambda(alpha_t, sigma_t),
            lambda(alpha_s0, sigma_s0),
            lambda(alpha_s1, sigma_s1),
        );
        let h = lt - ls0;
        let h0 = ls0 - ls1;
        let r0 = h0 / h;
        let d0 = m0;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let midpoint = self.config.solver_type == DpmSolverType::Midpoint;
        match self.config.algorithm_type {
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let z = noise_or_err(noise)?;
                let e2 = 1.0 - (-2.0 * h).exp();
                let c1 = if midpoint {
                    0.5 * (alpha_t * e2)
                } else {
                    alpha_t * (e2 / (-2.0 * h) + 1.0)
                };
                let x = lin2(sample, sigma_t / sigma_s0 * (-h).exp(), d0, alpha_t * e2)?;
                let x = (x + mul(&d1, c1)?)?;
                Ok((x + mul(z, sigma_t * e2.sqrt())?)?)
            }
            AlgorithmType::SdeDpmSolver => {
                let z = noise_or_err(noise)?;
                let eh = h.exp() - 1.0;
                let c1 = if midpoint {
                    sigma_t * eh
                } else {
                    2.0 * (sigma_t * (eh / h - 1.0))
                };
                let x = lin2(sample, alpha_t / alpha_s0, d0, -2.0 * (sigma_t * eh))?;
                let x = (x - mul(&d1, c1)?)?;
                Ok((x + mul(z, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?)
            }
            AlgorithmType::DpmSolver => {
                let eh = h.exp() - 1.0;
                let c1 = if midpoint {
                    0.5 * (sigma_t * eh)
                } else {
                    sigma_t * (eh / h - 1.0)
                };
                let x = lin2(sample, alpha_t / alpha_s0, d0, -(sigma_t * eh))?;
                Ok((x - mul(&d1, c1)?)?)
            }
            _ => {
                let emh = (-h).exp() - 1.0;
                let x = lin2(sample, sigma_t / sigma_s0, d0, -(alpha_t * emh))?;
                if midpoint {
                    Ok((x - mul(&d1, 0.5 * (alpha_t * emh))?)?)
                } else {
                    Ok((x + mul(&d1, alpha_t * (emh / h + 1.0))?)?)
                }
            }
        }
    }

    fn third_order(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let (m0, m1, m2) = match (
            &self.model_outputs[k - 1],
            &self.model_outputs[k - 2],
            &self.model_outputs[k - 3],
        ) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(missing_history()),
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (a1, s1) = alpha_sigma(self.sigmas[i - 1]);
        let (a2, s2) = alpha_sigma(self.sigmas[i - 2]);
        let (lt, ls0, ls1, ls2) = (
            lambda(alpha_t, sigma_t),
            lambda(alpha_s0, sigma_s0),
            lambda(a1, s1),
            lambda(a2, s2),
        );
        let h = lt - ls0;
        let (h0, h1) = (ls0 - ls1, ls1 - ls2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d0 = m0;
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        match self.config.algorithm_type {
            AlgorithmType::SdeDpmSolverPlusPlus => {
                let z = noise_or_err(noise)?;
                let e2 = 1.0 - (-2.0 * h).exp();
                let x = lin2(sample, sigma_t / sigma_s0 * (-h).exp(), d0, alpha_t * e2)?;
                let x = (x + mul(&d1, alpha_t * (e2 / (-2.0 * h) + 1.0))?)?;
                let x = (x + mul(&d2, alpha_t * ((e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5))?)?;
                Ok((x + mul(z, sigma_t * e2.sqrt())?)?)
            }
            AlgorithmType::SdeDpmSolver => Err(Error::config(
                CLASS,
                "`solver_order` = 3 is not available with algorithm_type \"sde-dpmsolver\" (as in diffusers)",
            )),
            AlgorithmType::DpmSolver => {
                let eh = h.exp() - 1.0;
                let x = lin2(sample, alpha_t / alpha_s0, d0, -(sigma_t * eh))?;
                let x = (x - mul(&d1, sigma_t * (eh / h - 1.0))?)?;
                Ok((x - mul(&d2, sigma_t * ((eh - h) / (h * h) - 0.5))?)?)
            }
            _ => {
                let emh = (-h).exp() - 1.0;
                let x = lin2(sample, sigma_t / sigma_s0, d0, -(alpha_t * emh))?;
                let x = (x + mul(&d1, alpha_t * (emh / h + 1.0))?)?;
                Ok((x - mul(&d2, alpha_t * ((emh + h) / (h * h) - 0.5))?)?)
            }
        }
    }
}

fn noise_or_err(noise: Option<&Tensor>) -> Result<&Tensor> {
    noise.ok_or_else(|| Error::invalid("noise", format!("{CLASS}: the SDE solver needs noise")))
}

fn missing_history() -> Error {
    Error::invalid(
        "scheduler",
        format!("{CLASS}: multistep history is missing; call set_timesteps before stepping"),
    )
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        let tt = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        common::check_steps(CLASS, n, tt)?;
        // Clip the schedule where λ drops below lambda_min_clipped.
        let clipped_idx = self
            .lambda_t
            .iter()
            .rev()
            .position(|&l| (l as f64) >= self.config.lambda_min_clipped)
            .unwrap_or(self.lambda_t.len());
        let last_timestep = tt - clipped_idx;
        if last_timestep == 0 {
            return Err(Error::config(
                CLASS,
                "`lambda_min_clipped` clips away every timestep",
            ));
        }
        let mut ts: Vec<f64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = common::np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .map(common::np_round)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (last_timestep / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = tt as f64 / n as f64;
                common::np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|x| common::np_round(x) - 1.0)
                    .collect()
            }
        };
        let train = &self.tables.sigmas;
        let log_sigmas = &self.tables.log_sigmas;
        let round_ts = self.config.betas.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let sigmas: Vec<f64> = if self.config.sigma_ramp != SigmaRamp::Interpolated {
            // The training σ reversed: in_sigmas[-1] is the smallest, [0] the largest.
            let in_min = train[0] as f64;
            let in_max = train[train.len() - 1] as f64;
            let s = self
                .config
                .sigma_bounds
                .ramp(self.config.sigma_ramp, in_min, in_max, n);
            ts = s
                .iter()
                .map(|&x| common::sigma_to_t(x, log_sigmas))
                .collect();
            if self.config.sigma_ramp == SigmaRamp::Karras && round_ts {
                ts = ts.into_iter().map(common::np_round).collect();
            }
            s
        } else if self.config.use_lu_lambdas {
            let lambda_min = log_sigmas[0] as f64;
            let lambda_max = log_sigmas[log_sigmas.len() - 1] as f64;
            let s: Vec<f64> = common::np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (lambda_max + r * (lambda_min - lambda_max)).exp())
                .collect();
            ts = s
                .iter()
                .map(|&x| common::sigma_to_t(x, log_sigmas))
                .collect();
            if round_ts {
                ts = ts.into_iter().map(common::np_round).collect();
            }
            s
        } else {
            ts.iter().map(|&t| common::interp_index(t, train)).collect()
        };
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.tables.sigma_min(),
        });
        // diffusers stores the timesteps as int64 (truncating fractional ones).
        self.timesteps = ts.into_iter().map(f64::trunc).collect();
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
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
        let i = self.index.get(CLASS, &self.timesteps, timestep, true)?;
        let n = self.timesteps.len();
        if i >= n {
            return Err(common::past_end(CLASS, i));
        }
        let lower_order_final = i == n - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && n < 15)
                || self.config.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == n && self.config.lower_order_final && n < 15;

        let mo = common::f32_tensor(model_output)?;
        let x = common::f32_tensor(sample)?;
        let converted = self.convert_model_output(&mo, &x, i)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted.clone()));

        let z = if self.is_sde() {
            Some(common::f32_tensor(
                &noise.randn(model_output.dims(), model_output.device())?,
            )?)
        } else {
            None
        };
        let order = self.config.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted, &x, z.as_ref(), i)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&x, z.as_ref(), i)?
        } else {
            self.third_order(&x, z.as_ref(), i)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        common::as_dtype(prev, dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .index
            .noise_index(CLASS, &self.timesteps, timestep, true)?;
        vp_add_noise(&self.sigmas, i, original, noise)
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

/// `α_t x₀ + σ_t ε` at the schedule's σ number `i` (multistep solvers' `add_noise`).
pub(crate) fn vp_add_noise(
    sigmas: &[f64],
    i: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let sigma = *sigmas
        .get(i)
        .ok_or_else(|| common::past_end("scheduler", i))?;
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let x = common::f32_tensor(original)?;
    let z = common::f32_tensor(noise)?;
    common::as_dtype(lin2(&x, alpha_t, &z, sigma_t)?, original.dtype())
}
