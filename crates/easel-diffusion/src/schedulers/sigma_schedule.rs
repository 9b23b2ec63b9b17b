//! The σ-space discrete schedule shared by the k-diffusion style schedulers
//! (Euler, Euler ancestral, Heun, LMS; Karras et al., arXiv:2206.00364): the
//! training σ table, inference timesteps from the spacing, σ by interpolation
//! and the optional Karras / exponential ramps.

use super::common::{self, f32r};
use super::config::{BetaConfig, ConfigReader, TimestepSpacing};
use crate::error::Result;

/// Which σ ramp replaces the interpolated σ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaRamp {
    /// σ interpolated at the spaced timesteps.
    Interpolated,
    /// The Karras ρ = 7 ramp (`use_karras_sigmas`).
    Karras,
    /// Log-uniform σ (`use_exponential_sigmas`).
    Exponential,
}

impl SigmaRamp {
    /// The name metadata uses (see `Scheduler::sigma_schedule`): `None` for
    /// [`SigmaRamp::Interpolated`], else `karras` / `exponential`.
    pub fn metadata_name(self) -> Option<&'static str> {
        match self {
            SigmaRamp::Interpolated => None,
            SigmaRamp::Karras => Some("karras"),
            SigmaRamp::Exponential => Some("exponential"),
        }
    }

    /// Read `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`
    /// (at most one may be set; beta sigmas are not implemented).
    pub fn read(r: &ConfigReader, has_exponential: bool) -> Result<Self> {
        let karras = r.bool("use_karras_sigmas", false)?;
        let exponential = has_exponential && r.bool("use_exponential_sigmas", false)?;
        let beta = has_exponential && r.bool("use_beta_sigmas", false)?;
        if [karras, exponential, beta].iter().filter(|&&b| b).count() > 1 {
            return Err(r.error(
                "use_karras_sigmas",
                "/ `use_exponential_sigmas` / `use_beta_sigmas`: only one of them can be true",
            ));
        }
        if beta {
            r.reject_true(
                "use_beta_sigmas",
                "beta-distribution sigmas are not implemented; use use_karras_sigmas or use_exponential_sigmas",
            )?;
        }
        Ok(if karras {
            SigmaRamp::Karras
        } else if exponential {
            SigmaRamp::Exponential
        } else {
            SigmaRamp::Interpolated
        })
    }
}

/// Optional `sigma_min` / `sigma_max` bounds for the Karras / exponential
/// ramps. diffusers reads them from the scheduler's config when it has those
/// keys, including keys carried over from another class's config.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SigmaBounds {
    /// Lower bound of the ramp (`sigma_min`), default: the smallest σ of the schedule.
    pub sigma_min: Option<f64>,
    /// Upper bound of the ramp (`sigma_max`), default: the largest σ of the schedule.
    pub sigma_max: Option<f64>,
}

impl SigmaBounds {
    /// Read `sigma_min` / `sigma_max` if the config holds them.
    pub fn read(r: &ConfigReader) -> Result<Self> {
        Ok(Self {
            sigma_min: r.opt_f64("sigma_min")?,
            sigma_max: r.opt_f64("sigma_max")?,
        })
    }

    /// Apply a ramp between the bounds (defaulting to `in_min` / `in_max`).
    pub fn ramp(&self, ramp: SigmaRamp, in_min: f64, in_max: f64, n: usize) -> Vec<f64> {
        let lo = self.sigma_min.unwrap_or(in_min);
        let hi = self.sigma_max.unwrap_or(in_max);
        match ramp {
            SigmaRamp::Karras => common::karras_sigmas(lo, hi, n),
            SigmaRamp::Exponential => common::exponential_sigmas(lo, hi, n),
            SigmaRamp::Interpolated => Vec::new(),
        }
    }
}

/// The training tables of a discrete σ-space scheduler.
#[derive(Debug, Clone)]
pub struct TrainTables {
    /// ᾱ_t, float32.
    pub alphas_cumprod: Vec<f32>,
    /// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), float32, ascending in t.
    pub sigmas: Vec<f32>,
    /// ln σ_t, float32.
    pub log_sigmas: Vec<f32>,
}

impl TrainTables {
    /// The tables of `betas` (`zero_snr_floor`: see [`common::alphas_cumprod`]).
    pub fn new(betas: &BetaConfig, zero_snr_floor: bool) -> Self {
        let alphas_cumprod = common::alphas_cumprod(betas, zero_snr_floor);
        let sigmas = common::train_sigmas(&alphas_cumprod);
        let log_sigmas = common::log_sigmas(&sigmas);
        Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        }
    }

    /// σ at the smallest training timestep, `sqrt((1 − ᾱ₀) / ᾱ₀)` (float32).
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0] as f64
    }
}

/// The fractional (float32) inference timesteps of the σ-space schedulers:
/// "linspace" is not rounded, "leading" gets `steps_offset`.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => common::linspace_f32(num_train_timesteps, n)
            .into_iter()
            .map(|x| x as f64)
            .collect(),
        TimestepSpacing::Leading => common::leading(num_train_timesteps, n, 0)
            .into_iter()
            .map(|x| f32r(x as f64) + steps_offset as f64)
            .map(f32r)
            .collect(),
        TimestepSpacing::Trailing => common::trailing(num_train_timesteps, n)
            .into_iter()
            .map(|x| x as f64)
            .collect(),
    }
}

/// σ and timesteps for `n` steps (without the final σ): interpolated at the
/// spaced timesteps, or replaced by a ramp whose timesteps are found back by
/// [`common::sigma_to_t`]. Timesteps come back rounded through float32.
pub fn sigmas_and_timesteps(
    tables: &TrainTables,
    timesteps: Vec<f64>,
    ramp: SigmaRamp,
    bounds: &SigmaBounds,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let interp: Vec<f64> = timesteps
        .iter()
        .map(|&t| common::interp_index(t, &tables.sigmas))
        .collect();
    match ramp {
        SigmaRamp::Interpolated => (interp, timesteps),
        _ => {
            let sigmas = bounds.ramp(ramp, interp[interp.len() - 1], interp[0], n);
            let ts = sigmas
                .iter()
                .map(|&s| f32r(common::sigma_to_t(s, &tables.log_sigmas)))
                .collect();
            (sigmas, ts)
        }
    }
}

/// The initial noise scale of a σ schedule: the largest σ, or
/// `sqrt(σ_max² + 1)` for "leading" spacing (as diffusers computes it, in float32).
pub fn init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().cloned().fold(f64::NEG_INFINITY, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}
