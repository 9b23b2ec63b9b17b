//! UniPC: the unified predictor–corrector multistep solver (Zhao et al.,
//! arXiv:2302.04867), following diffusers' `UniPCMultistepScheduler`.
//!
//! Each step first corrects the current sample with the new model output
//! (UniC, which costs no extra model call), then predicts the next one
//! (UniP) from the model outputs kept from earlier steps. `bh2` (the default)
//! uses `B(h) = e^h − 1`.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{self, f32r, lin2, mul, StepIndex};
use super::config::{
    BetaConfig, ConfigReader, FinalSigmasType, PredictionType, TimestepSpacing, UniPcSolverType,
};
use super::dpm_solver::{alpha_sigma, lambda, vp_add_noise};
use super::sigma_schedule::{SigmaBounds, SigmaRamp, TrainTables};
use super::{Scheduler, SchedulerFamily, TimestepsRequest};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

const CLASS: &str = "UniPCMultistepScheduler";

/// The settings of [`UniPcMultistepScheduler`] (diffusers
/// `UniPCMultistepScheduler` config keys, with its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
    /// The training noise schedule (default: 1000 steps, linear 1e-4 .. 0.02).
    pub betas: BetaConfig,
    /// Order of the predictor, 1 to 4 (default 2).
    pub solver_order: usize,
    /// epsilon, sample or v_prediction (default epsilon).
    pub prediction_type: PredictionType,
    /// Work with x₀ (UniPC with data prediction, default true) or ε.
    pub predict_x0: bool,
    /// bh1 or bh2 (default bh2).
    pub solver_type: UniPcSolverType,
    /// Lower the order for the last steps (default true).
    pub lower_order_final: bool,
    /// Step indices after which the corrector is skipped (default none).
    pub disable_corrector: Vec<usize>,
    /// Which σ ramp to use (`use_karras_sigmas` / `use_exponential_sigmas`, default neither).
    pub sigma_ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` bounds of the ramp.
    pub sigma_bounds: SigmaBounds,
    /// How the inference timesteps are spaced (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps (default 0).
    pub steps_offset: i64,
    /// The σ after the last step (default zero).
    pub final_sigmas_type: FinalSigmasType,
    /// Whether `set_timesteps` must be given `mu` (`use_dynamic_shifting`, default false).
    pub use_dynamic_shifting: bool,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::ddpm_default(),
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            predict_x0: true,
            solver_type: UniPcSolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            sigma_ramp: SigmaRamp::Interpolated,
            sigma_bounds: SigmaBounds::default(),
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            use_dynamic_shifting: false,
        }
    }
}

impl UniPcConfig {
    /// Read a diffusers scheduler config as `UniPCMultistepScheduler.from_config` does.
    pub fn from_json(config: &Value) -> Result<Self> {
        let r = ConfigReader::new(CLASS, config)?;
        let d = Self::default();
        r.reject_true("thresholding", "dynamic thresholding is not implemented")?;
        r.reject_true(
            "use_flow_sigmas",
            "flow-matching sigmas are not implemented for this scheduler; use FlowMatchEulerDiscreteScheduler",
        )?;
        r.reject_set(
            "solver_p",
            "an external predictor scheduler cannot be given in a config file",
        )?;
        r.reject_set(
            "shift_terminal",
            "it needs use_flow_sigmas, which is not implemented",
        )?;
        let solver_order = r.usize("solver_order", d.solver_order)?;
        if !(1..=4).contains(&solver_order) {
            return Err(r.error(
                "solver_order",
                format!("= {solver_order}; allowed values: 1, 2, 3, 4"),
            ));
        }
        let solver_type = match r.enum_in(
            "solver_type",
            d.solver_type,
            &[
                UniPcSolverType::Bh1,
                UniPcSolverType::Bh2,
                UniPcSolverType::Midpoint,
                UniPcSolverType::Heun,
                UniPcSolverType::Logrho,
            ],
        )? {
            UniPcSolverType::Bh1 => UniPcSolverType::Bh1,
            _ => UniPcSolverType::Bh2,
        };
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
            predict_x0: r.bool("predict_x0", d.predict_x0)?,
            solver_type,
            lower_order_final: r.bool("lower_order_final", d.lower_order_final)?,
            disable_corrector: r.usize_list("disable_corrector")?,
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
            steps_offset: r.i64("steps_offset", d.steps_offset)?,
            final_sigmas_type: r.enum_in(
                "final_sigmas_type",
                d.final_sigmas_type,
                &[FinalSigmasType::Zero, FinalSigmasType::SigmaMin],
            )?,
            use_dynamic_shifting: r.bool("use_dynamic_shifting", d.use_dynamic_shifting)?,
        })
    }
}

/// UniPC multistep sampling (arXiv:2302.04867), as diffusers'
/// `UniPCMultistepScheduler`. Timesteps are integers; σ include the final one.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    tables: TrainTables,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: StepIndex,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
}

/// Solve `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[pivot][col] == 0.0 || !a[pivot][col].is_finite() {
            return Err(Error::invalid(
                "scheduler",
                format!("{CLASS}: singular system for the solver coefficients"),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

/// The shared coefficients of UniP / UniC for a step of log-SNR size `h`:
/// `(hh, h φ₁(hh), B(h), R, b)` with R the Vandermonde matrix of `rks`.
struct Coefficients {
    h_phi_1: f64,
    b_h: f64,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl UniPcMultistepScheduler {
    /// A scheduler for `config`.
    pub fn new(config: UniPcConfig) -> Result<Self> {
        let tables = TrainTables::new(&config.betas, true);
        let order = config.solver_order;
        Ok(Self {
            config,
            tables,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
        })
    }

    /// Build from a diffusers scheduler config (any class's; see [`UniPcConfig::from_json`]).
    pub fn from_config(config: &Value) -> Result<Self> {
        Self::new(UniPcConfig::from_json(config)?)
    }

    /// The settings.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    fn convert_model_output(&self, mo: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        if self.config.predict_x0 {
            match self.config.prediction_type {
                PredictionType::Epsilon => common::div(&lin2(sample, 1.0, mo, -sigma_t)?, alpha_t),
                PredictionType::VPrediction => lin2(sample, alpha_t, mo, -sigma_t),
                _ => Ok(mo.clone()),
            }
        } else {
            match self.config.prediction_type {
                PredictionType::Epsilon => Ok(mo.clone()),
                PredictionType::VPrediction => lin2(mo, alpha_t, sample, sigma_t),
                _ => common::div(&lin2(sample, 1.0, mo, -alpha_t)?, sigma_t),
            }
        }
    }

    fn history(&self, back: usize) -> Result<&Tensor> {
        let k = self.model_outputs.len();
        self.model_outputs
            .get(k.wrapping_sub(back + 1))
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::invalid(
                    "scheduler",
                    format!(
                        "{CLASS}: multistep history is missing; call set_timesteps before stepping"
                    ),
                )
            })
    }

    fn coefficients(&self, h: f64, rks: &[f64], order: usize) -> Coefficients {
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let b_h = match self.config.solver_type {
            UniPcSolverType::Bh1 => hh,
            _ => hh.exp_m1(),
        };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for k in 1..=order {
            r.push(rks.iter().map(|&x| x.powi(k as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (k + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { h_phi_1, b_h, r, b }
    }

    /// Σ_k ρ_k D_k.
    fn weighted_sum(rhos: &[f64], ds: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (rho, d) in rhos.iter().zip(ds) {
            let term = mul(d, *rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// UniP: predict the sample at σ_{i+1} from the outputs so far.
    fn predictor(&self, x: &Tensor, order: usize, i: usize) -> Result<Tensor> {
        let m0 = self.history(0)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let mk = self.history(k)?;
            let (a, s) = alpha_sigma(self.sigmas[i - k]);
            let rk = (lambda(a, s) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(common::div(&(mk - m0)?, rk)?);
        }
        rks.push(1.0);
        let c = self.coefficients(h, &rks, order);
        let rhos: Vec<f64> = if d1s.is_empty() {
            Vec::new()
        } else if order == 2 {
            vec![0.5]
        } else {
            let m = order - 1;
            let r: Vec<Vec<f64>> = c.r[..m].iter().map(|row| row[..m].to_vec()).collect();
            solve(r, c.b[..m].to_vec())?
        };
        let pred_res = Self::weighted_sum(&rhos, &d1s)?;
        let (coef, base) = if self.config.predict_x0 {
            (
                alpha_t,
                lin2(x, sigma_t / sigma_s0, m0, -(alpha_t * c.h_phi_1))?,
            )
        } else {
            // σ_t (e^h − 1) = α_t σ_s0 / α_s0 − σ_t; at a final σ of 0 diffusers
            // evaluates it as 0 · ∞ = NaN, the closed form gives its limit.
            let m0_coef = if sigma_t == 0.0 {
                alpha_t * sigma_s0 / alpha_s0
            } else {
                sigma_t * c.h_phi_1
            };
            (sigma_t, lin2(x, alpha_t / alpha_s0, m0, -m0_coef)?)
        };
        Ok(match pred_res {
            Some(p) => (base - mul(&p, coef * c.b_h)?)?,
            None => base,
        })
    }

    /// UniC: correct the sample at σ_i given the new model output `model_t`.
    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
        i: usize,
    ) -> Result<Tensor> {
        let m0 = self.history(0)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let mk = self.history(k)?;
            let (a, s) = alpha_sigma(self.sigmas[i - (k + 1)]);
            let rk = (lambda(a, s) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(common::div(&(mk - m0)?, rk)?);
        }
        rks.push(1.0);
        let c = self.coefficients(h, &rks, order);
        let rhos: Vec<f64> = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())?
        };
        let corr_res = Self::weighted_sum(&rhos[..rhos.len() - 1], &d1s)?;
        let d1_t = (model_t - m0)?;
        let last_rho = rhos[rhos.len() - 1];
        let inner = match corr_res {
            Some(cr) => (cr + mul(&d1_t, last_rho)?)?,
            None => mul(&d1_t, last_rho)?,
        };
        let (coef, base) = if self.config.predict_x0 {
            (
                alpha_t,
                lin2(last_sample, sigma_t / sigma_s0, m0, -(alpha_t * c.h_phi_1))?,
            )
        } else {
            (
                sigma_t,
                lin2(last_sample, alpha_t / alpha_s0, m0, -(sigma_t * c.h_phi_1))?,
            )
        };
        Ok((base - mul(&inner, coef * c.b_h)?)?)
    }
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()> {
        if request.sigmas.is_some() {
            return Err(common::no_custom_sigmas(CLASS));
        }
        if self.config.use_dynamic_shifting && request.mu.is_none() {
            return Err(Error::invalid(
                "mu",
                format!("{CLASS}: `mu` must be given when use_dynamic_shifting is true"),
            ));
        }
        let tt = self.config.betas.num_train_timesteps;
        let n = request.num_inference_steps;
        common::check_steps(CLASS, n, tt)?;
        let ts: Vec<f64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = common::np_linspace(0.0, (tt - 1) as f64, n + 1)
                    .into_iter()
                    .map(common::np_round)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (tt / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => common::trailing(tt, n)
                .into_iter()
                .map(|x| x as f64)
                .collect(),
        };
        let train = &self.tables.sigmas;
        let (sigmas, ts, ramp_last) = if self.config.sigma_ramp != SigmaRamp::Interpolated {
            let in_min = train[0] as f64;
            let in_max = train[train.len() - 1] as f64;
            let s = self
                .config
                .sigma_bounds
                .ramp(self.config.sigma_ramp, in_min, in_max, n);
            let mut t: Vec<f64> = s
                .iter()
                .map(|&x| common::sigma_to_t(x, &self.tables.log_sigmas))
                .collect();
            if self.config.sigma_ramp == SigmaRamp::Karras {
                t = t.into_iter().map(common::np_round).collect();
            }
            let last = s[s.len() - 1];
            (s, t, Some(last))
        } else {
            let s = ts.iter().map(|&t| common::interp_index(t, train)).collect();
            (s, ts, None)
        };
        let mut sigmas: Vec<f64> = sigmas;
        sigmas.push(match (self.config.final_sigmas_type, ramp_last) {
            (FinalSigmasType::Zero, _) => 0.0,
            (FinalSigmasType::SigmaMin, Some(last)) => last,
            (FinalSigmasType::SigmaMin, None) => self.tables.sigma_min(),
        });
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = ts.into_iter().map(f64::trunc).collect();
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
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
        _noise: &mut dyn NoiseSource,
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
        let mo = common::f32_tensor(model_output)?;
        let mut x = common::f32_tensor(sample)?;
        let converted = self.convert_model_output(&mo, &x, i)?;
        let use_corrector = i > 0 && !self.config.disable_corrector.contains(&(i - 1));
        if use_corrector {
            if let Some(last) = self.last_sample.take() {
                x = self.corrector(&converted, &last, self.this_order, i)?;
            }
        }
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final {
            order.min(n - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let prev = self.predictor(&x, self.this_order, i)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::RecordedNoise;

    #[test]
    fn solves_small_systems() {
        let x = solve(vec![vec![2.0, 1.0], vec![1.0, 3.0]], vec![3.0, 5.0]).unwrap();
        assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
    }

    /// diffusers returns NaN on the last step (σ = 0) with `solver_type`
    /// bh1 (B(h) = −∞ times a zero residual) or `predict_x0` = false
    /// (0 · ∞); here both give the finite limit.
    #[test]
    fn final_zero_sigma_stays_finite() {
        for extra in [
            serde_json::json!({"solver_type": "bh1"}),
            serde_json::json!({"predict_x0": false}),
        ] {
            let mut config = serde_json::json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012});
            for (k, v) in extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            let mut s = UniPcMultistepScheduler::from_config(&config).unwrap();
            s.set_timesteps(&TimestepsRequest::steps(3)).unwrap();
            let mut x = Tensor::ones(
                (1, 2, 2, 2),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let mut noise = RecordedNoise::new(Vec::new());
            for t in s.timesteps().to_vec() {
                let mo = (&x * 0.5).unwrap();
                x = s.step(&mo, t, &x, &mut noise).unwrap();
            }
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{extra}: {v:?}");
        }
    }
}
