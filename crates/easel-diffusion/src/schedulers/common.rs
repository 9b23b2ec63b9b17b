//! Pieces shared by the schedulers: the training noise schedule (betas,
//! `alphas_cumprod`, σ), inference timestep spacing, σ ↔ timestep
//! interpolation, the Karras / exponential σ ramps, step-index bookkeeping and
//! small tensor helpers.
//!
//! diffusers computes these with a mix of float32 torch tensors and float64
//! numpy arrays; the functions here follow the same precision at each stage
//! (noted per function) so that timesteps and σ agree to float32 rounding.

use candle_core::{DType, Tensor};

use super::config::{BetaConfig, BetaSchedule};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------
// Training schedule
// ---------------------------------------------------------------------------

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU, bit for bit:
/// the step is `(end - start) / (n - 1)` in float32 and element `i` is
/// `start + step·i` (first half) or `end − step·(n−1−i)` (second half), each
/// a fused multiply-add, as ATen's kernel compiles.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match n {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `numpy.linspace(start, stop, n)` (endpoint included), in float64.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (n - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut y: Vec<f64> = if step == 0.0 {
                (0..n).map(|i| i as f64 / div * delta + start).collect()
            } else {
                (0..n).map(|i| i as f64 * step + start).collect()
            };
            y[n - 1] = stop;
            y
        }
    }
}

/// `numpy.linspace(start, stop, n, endpoint=False)`, in float64.
pub fn np_linspace_open(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let div = n as f64;
    let delta = stop - start;
    let step = delta / div;
    if step == 0.0 {
        (0..n).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..n).map(|i| i as f64 * step + start).collect()
    }
}

/// `numpy.arange(start, stop, step)` for floats: `ceil((stop − start) / step)`
/// values, filled as numpy does (`start + i·((start + step) − start)`).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len >= 2 {
        let next = start + step;
        out.push(next);
        let delta = next - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// The cosine (`squaredcos_cap_v2`) or `exp` schedule: betas that discretise
/// `alpha_bar(t)` over `n` steps, capped at 0.999 (diffusers
/// `betas_for_alpha_bar`, Nichol & Dhariwal arXiv:2102.09672).
fn betas_for_alpha_bar(n: usize, schedule: BetaSchedule) -> Vec<f32> {
    let alpha_bar = |t: f64| -> f64 {
        match schedule {
            BetaSchedule::Exp => (t * -12.0).exp(),
            _ => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                .cos()
                .powi(2),
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of float32 values on the CPU (the running product is kept
/// in float64 and each entry rounded to float32).
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// Rescale betas to zero terminal SNR (Lin et al., arXiv:2305.08891,
/// Algorithm 1), in float32 as diffusers' `rescale_zero_terminal_snr`.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_ab.iter_mut() {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

/// The betas of a [`BetaConfig`], float32 as diffusers stores them.
pub fn betas(cfg: &BetaConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    let betas = if let Some(b) = &cfg.trained_betas {
        b.iter().map(|&x| x as f32).collect()
    } else {
        match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 | BetaSchedule::Exp => {
                betas_for_alpha_bar(n, cfg.beta_schedule)
            }
        }
    };
    if cfg.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// `alphas_cumprod` (ᾱ_t = ∏ (1 − β_s)) of a [`BetaConfig`], float32.
/// `zero_snr_floor` sets the last entry to 2⁻²⁴ when the betas were rescaled
/// to zero terminal SNR, as the σ-space schedulers do (so σ_max stays finite).
pub fn alphas_cumprod(cfg: &BetaConfig, zero_snr_floor: bool) -> Vec<f32> {
    let alphas: Vec<f32> = betas(cfg).iter().map(|b| 1.0 - b).collect();
    let mut ac = cumprod_f32(&alphas);
    if zero_snr_floor && cfg.rescale_betas_zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    ac
}

/// The training σ of each timestep, `sqrt((1 − ᾱ) / ᾱ)`, float32 (ascending in t).
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `ln σ` of the training σ, float32 (numpy's `np.log` of a float32 array).
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

// ---------------------------------------------------------------------------
// Inference timesteps
// ---------------------------------------------------------------------------

/// Check `num_inference_steps` is in `1..=num_train_timesteps`.
pub fn check_steps(class: &str, n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 || n > num_train_timesteps {
        return Err(Error::invalid(
            "num_inference_steps",
            format!("{class}: {n} steps asked; must be between 1 and num_train_timesteps = {num_train_timesteps}"),
        ));
    }
    Ok(())
}

/// `round` as numpy does it (half to even).
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// "leading" spacing, descending: `i · (T // n)` for i in 0..n, reversed, plus `offset`.
pub fn leading(num_train_timesteps: usize, n: usize, offset: i64) -> Vec<i64> {
    let ratio = (num_train_timesteps / n) as i64;
    (0..n as i64).rev().map(|i| i * ratio + offset).collect()
}

/// "trailing" spacing, descending: `round(arange(T, 0, −T/n)) − 1`.
pub fn trailing(num_train_timesteps: usize, n: usize) -> Vec<i64> {
    let t = num_train_timesteps as f64;
    np_arange(t, 0.0, -(t / n as f64))
        .into_iter()
        .map(|x| np_round(x) as i64 - 1)
        .collect()
}

/// "linspace" spacing, descending and fractional: `linspace(0, T − 1, n)` in
/// float32 (the σ-space schedulers).
pub fn linspace_f32(num_train_timesteps: usize, n: usize) -> Vec<f32> {
    np_linspace(0.0, (num_train_timesteps - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|x| x as f32)
        .collect()
}

/// "linspace" spacing, descending and rounded (DDIM).
pub fn linspace_rounded(num_train_timesteps: usize, n: usize) -> Vec<i64> {
    np_linspace(0.0, (num_train_timesteps - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|x| np_round(x) as i64)
        .collect()
}

// ---------------------------------------------------------------------------
// σ helpers
// ---------------------------------------------------------------------------

/// `numpy.interp(x, arange(len(fp)), fp)`, float64.
pub fn interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if x == xj {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - xj) + y0;
    if r.is_nan() {
        slope * (x - (xj + 1.0)) + y1
    } else {
        r
    }
}

/// The fractional training timestep whose σ is `sigma`: linear interpolation
/// of `ln σ` between neighbouring training timesteps (diffusers
/// `_sigma_to_t`, with its mix of float32 and float64).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    let mut low_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = (low as f64 - log_sigma) / ((low - high) as f64);
    let w = if w.is_nan() { w } else { w.clamp(0.0, 1.0) };
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The Karras et al. (arXiv:2206.00364, eq. 5) σ ramp with ρ = 7 from
/// `sigma_max` down to `sigma_min`, `n` values, float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// σ evenly spaced in log space from `sigma_max` to `sigma_min`, `n` values.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Round a float64 through float32 (values diffusers stores as float32 tensors).
pub fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// The position of `timestep` in `schedule`: the second match when it occurs
/// more than once (so a restart mid-schedule does not skip a σ), as
/// diffusers' `index_for_timestep`.
pub fn index_for_timestep(schedule: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = schedule
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// The step-index bookkeeping of diffusers' σ-space and multistep schedulers:
/// the index is found from the first timestep seen (or `begin_index`), then
/// advanced once per `step`.
#[derive(Debug, Clone, Default)]
pub struct StepIndex {
    /// Index of the current step into the timesteps, once known.
    pub step_index: Option<usize>,
    /// Where an image-to-image run starts, set by `set_begin_index`.
    pub begin_index: Option<usize>,
}

impl StepIndex {
    /// Forget both indices (a new `set_timesteps`).
    pub fn reset(&mut self) {
        self.step_index = None;
        self.begin_index = None;
    }

    /// The current index, initialising it from `timestep` if needed.
    /// `fallback_last`: a timestep not in the schedule maps to the last index
    /// (DPM-Solver / UniPC) instead of being an error.
    pub fn get(
        &mut self,
        class: &str,
        timesteps: &[f64],
        timestep: f64,
        fallback_last: bool,
    ) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => lookup(class, timesteps, timestep, fallback_last)?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    /// The index `add_noise` uses: the timestep's own position when no
    /// `begin_index` was set, else the current step (inpainting, after the
    /// first step) or `begin_index` (image-to-image, before it).
    pub fn noise_index(
        &self,
        class: &str,
        timesteps: &[f64],
        timestep: f64,
        fallback_last: bool,
    ) -> Result<usize> {
        match (self.begin_index, self.step_index) {
            (None, _) => lookup(class, timesteps, timestep, fallback_last),
            (Some(_), Some(s)) => Ok(s),
            (Some(b), None) => Ok(b),
        }
    }

    /// Move to the next step.
    pub fn advance(&mut self) {
        if let Some(i) = self.step_index.as_mut() {
            *i += 1;
        }
    }
}

fn lookup(class: &str, timesteps: &[f64], timestep: f64, fallback_last: bool) -> Result<usize> {
    match index_for_timestep(timesteps, timestep) {
        Some(i) => Ok(i),
        None if fallback_last && !timesteps.is_empty() => Ok(timesteps.len() - 1),
        None => Err(Error::invalid(
            "timestep",
            format!("{class}: timestep {timestep} is not one of the scheduler's timesteps"),
        )),
    }
}

/// The error for a step or `scale_model_input` before `set_timesteps`.
pub fn not_ready(class: &str) -> Error {
    Error::invalid(
        "scheduler",
        format!("{class}: set_timesteps must be called before stepping"),
    )
}

/// The error for a step past the end of the schedule.
pub fn past_end(class: &str, index: usize) -> Error {
    Error::invalid(
        "scheduler",
        format!("{class}: step {index} is past the end of the schedule; call set_timesteps again"),
    )
}

/// An integer training timestep from the `f64` the trait passes (DDIM, PNDM, LCM).
pub fn discrete_timestep(class: &str, timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train_timesteps as f64 {
        return Err(Error::invalid(
            "timestep",
            format!("{class}: timestep {timestep} must be an integer in 0..{num_train_timesteps}"),
        ));
    }
    Ok(timestep as usize)
}

/// The error for custom σ passed to a scheduler that takes none.
pub fn no_custom_sigmas(class: &str) -> Error {
    Error::invalid("sigmas", format!("{class} does not take custom sigmas"))
}

// ---------------------------------------------------------------------------
// Tensor helpers (the step math: float32 tensors, per-step scalars)
// ---------------------------------------------------------------------------

/// `t` as float32.
pub fn f32_tensor(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// `t · c` (c rounded to float32, as torch multiplies a float32 tensor by a scalar).
pub fn mul(t: &Tensor, c: f64) -> Result<Tensor> {
    Ok(t.affine(c, 0.0)?)
}

/// `t / c`, a true division as torch does it.
pub fn div(t: &Tensor, c: f64) -> Result<Tensor> {
    let s = Tensor::new(c as f32, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// `ca · a + cb · b`.
pub fn lin2(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

/// Return `t` in `dtype` (the caller's latents dtype).
pub fn as_dtype(t: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t
    } else {
        t.to_dtype(dtype)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_matches_numpy_examples() {
        assert_eq!(leading(1000, 4, 1), vec![751, 501, 251, 1]);
        assert_eq!(trailing(1000, 4), vec![999, 749, 499, 249]);
        assert_eq!(linspace_rounded(1000, 4), vec![999, 666, 333, 0]);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
    }

    #[test]
    fn index_for_timestep_prefers_second_match() {
        assert_eq!(index_for_timestep(&[5.0, 3.0, 3.0, 1.0], 3.0), Some(2));
        assert_eq!(index_for_timestep(&[5.0, 3.0, 1.0], 5.0), Some(0));
        assert_eq!(index_for_timestep(&[5.0], 4.0), None);
    }

    #[test]
    fn interp_and_sigma_to_t_invert() {
        let cfg = BetaConfig::ddpm_default();
        let ac = alphas_cumprod(&cfg, false);
        let s = train_sigmas(&ac);
        let ls = log_sigmas(&s);
        let sigma = interp_index(500.0, &s);
        assert!((sigma_to_t(sigma, &ls) - 500.0).abs() < 1e-3);
    }
}
