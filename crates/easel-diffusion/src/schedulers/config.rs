//! Reading a diffusers `scheduler_config.json` into typed settings.
//!
//! diffusers builds a scheduler with `Class.from_config(config)`: the keys the
//! class's constructor knows are taken, every other key is ignored, and the
//! missing ones get the class's own defaults. [`ConfigReader`] gives each
//! scheduler that behaviour: it reads one key at a time with the class's
//! default, and turns strings into enums (an unsupported value is an error
//! that names the field and lists the allowed values).
//!
//! Two details of diffusers' `ConfigMixin` are kept:
//! * keys listed in `_use_default_values` are dropped before reading (they
//!   were defaults of the class that saved the file, not choices);
//! * a JSON `null` means Python's `None`: for an optional value it is `None`,
//!   for a boolean it is `False` (diffusers tests these by truthiness), and
//!   for other values the class default is used.
//!
//! Python's `json` writes `-Infinity`, `Infinity` and `NaN` (DPM-Solver's
//! `lambda_min_clipped` defaults to `-inf`), which strict JSON parsers reject:
//! [`parse_config_json`] accepts them.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Parse the text of a diffusers config file. Bare `Infinity`, `-Infinity`
/// and `NaN` tokens (as Python's `json.dumps` writes them) are accepted and
/// stored as the strings `"Infinity"`, `"-Infinity"`, `"NaN"`, which the
/// number readers of [`ConfigReader`] understand.
pub fn parse_config_json(text: &str) -> Result<Value> {
    crate::json::parse_lenient(text)
        .map_err(|e| Error::config("scheduler", format!("invalid JSON: {e}")))
}

/// Read and parse a `scheduler_config.json` file (see [`parse_config_json`]).
pub fn load_config_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config_json(&text).map_err(|e| match e {
        Error::Config { message, .. } => Error::config(path.display().to_string(), message),
        other => other,
    })
}

/// A config string value that maps onto an enum.
pub trait ConfigEnum: Sized + Copy + PartialEq + 'static {
    /// Every accepted spelling with its value; the first spelling of a value
    /// is its canonical (diffusers) name.
    const VALUES: &'static [(&'static str, Self)];

    /// The diffusers spelling of this value.
    fn as_str(self) -> &'static str {
        Self::VALUES
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(s, _)| *s)
            .unwrap_or("?")
    }
}

macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl ConfigEnum for $name {
            const VALUES: &'static [(&'static str, Self)] = &[$(($text, $name::$variant)),+];
        }
    };
}

config_enum!(
    /// How the training betas are laid out over `num_train_timesteps` (`beta_schedule`).
    BetaSchedule {
        /// `linspace(beta_start, beta_end)`.
        Linear = "linear",
        /// `linspace(sqrt(beta_start), sqrt(beta_end))²`, Stable Diffusion's schedule.
        ScaledLinear = "scaled_linear",
        /// The cosine schedule of Nichol & Dhariwal (GLIDE), capped at 0.999.
        SquaredcosCapV2 = "squaredcos_cap_v2",
        /// `alpha_bar(t) = exp(-12 t)` (HeunDiscreteScheduler only).
        Exp = "exp",
    }
);

config_enum!(
    /// How inference timesteps are picked from the training range (`timestep_spacing`,
    /// Table 2 of arXiv:2305.08891).
    TimestepSpacing {
        /// Evenly spaced from 0 to `num_train_timesteps - 1`, both ends included.
        Linspace = "linspace",
        /// Multiples of `num_train_timesteps / n` from 0, plus `steps_offset`.
        Leading = "leading",
        /// Multiples of `num_train_timesteps / n` down from `num_train_timesteps`, minus 1.
        Trailing = "trailing",
    }
);

config_enum!(
    /// What the denoiser predicts (`prediction_type`).
    PredictionType {
        /// The added noise ε.
        Epsilon = "epsilon",
        /// The velocity v = α ε − σ x₀ (Imagen Video, arXiv:2210.02303).
        VPrediction = "v_prediction",
        /// The clean sample x₀.
        Sample = "sample",
        /// The flow-matching velocity (noise − x₀).
        FlowPrediction = "flow_prediction",
    }
);

config_enum!(
    /// The noise level after the last step (`final_sigmas_type`).
    FinalSigmasType {
        /// σ = 0: the last step lands on the clean sample.
        Zero = "zero",
        /// The smallest training σ.
        SigmaMin = "sigma_min",
    }
);

config_enum!(
    /// Whether the model is fed discrete timesteps or EDM-style continuous
    /// `0.25 ln σ` (`timestep_type`, EulerDiscreteScheduler).
    TimestepType {
        /// The (fractional) training timestep.
        Discrete = "discrete",
        /// `0.25 ln σ` (only with v-prediction, as diffusers).
        Continuous = "continuous",
    }
);

config_enum!(
    /// How σ is interpolated between training timesteps (`interpolation_type`,
    /// EulerDiscreteScheduler).
    InterpolationType {
        /// σ interpolated linearly in t at the spaced timesteps.
        Linear = "linear",
        /// σ evenly spaced in ln σ from σ_max to σ_min (n + 1 values, as diffusers).
        LogLinear = "log_linear",
    }
);

config_enum!(
    /// The flow-matching resolution shift formula (`time_shift_type`).
    TimeShiftType {
        /// `e^μ / (e^μ + (1/t − 1))`.
        Exponential = "exponential",
        /// `μ / (μ + (1/t − 1))`.
        Linear = "linear",
    }
);

config_enum!(
    /// DPM-Solver's formulation (`algorithm_type`).
    AlgorithmType {
        /// DPM-Solver++ (data prediction, arXiv:2211.01095).
        DpmSolverPlusPlus = "dpmsolver++",
        /// Stochastic DPM-Solver++ (draws noise every step).
        SdeDpmSolverPlusPlus = "sde-dpmsolver++",
        /// The original DPM-Solver (noise prediction, arXiv:2206.00927).
        DpmSolver = "dpmsolver",
        /// Stochastic DPM-Solver (draws noise every step).
        SdeDpmSolver = "sde-dpmsolver",
        /// Accepted as in diffusers, which maps `deis` to `dpmsolver++`.
        Deis = "deis",
    }
);

config_enum!(
    /// DPM-Solver's second-order update (`solver_type`).
    DpmSolverType {
        /// The midpoint 2nd-order update (the "2M" of DPM++ 2M).
        Midpoint = "midpoint",
        /// Heun's 2nd-order update.
        Heun = "heun",
        /// A DEIS name, mapped to `midpoint` as diffusers does.
        Logrho = "logrho",
        /// A UniPC name, mapped to `midpoint` as diffusers does.
        Bh1 = "bh1",
        /// A UniPC name, mapped to `midpoint` as diffusers does.
        Bh2 = "bh2",
    }
);

config_enum!(
    /// UniPC's `B(h)` choice (`solver_type`).
    UniPcSolverType {
        /// `B(h) = h`.
        Bh1 = "bh1",
        /// `B(h) = e^h − 1`.
        Bh2 = "bh2",
        /// A DPM-Solver name, mapped to `bh2` as diffusers does.
        Midpoint = "midpoint",
        /// A DPM-Solver name, mapped to `bh2` as diffusers does.
        Heun = "heun",
        /// A DEIS name, mapped to `bh2` as diffusers does.
        Logrho = "logrho",
    }
);

config_enum!(
    /// Learned-variance models output extra channels (`variance_type`, DPM-Solver).
    VarianceType {
        /// The output holds a learned variance after the 3 prediction channels.
        Learned = "learned",
        /// As `learned`, interpolating between β bounds.
        LearnedRange = "learned_range",
    }
);

/// Reads the keys of one scheduler config for one diffusers class, with that
/// class's defaults (see the module documentation for the rules).
pub struct ConfigReader {
    class: &'static str,
    map: Map<String, Value>,
}

impl ConfigReader {
    /// A reader of `config` (a JSON object) for diffusers class `class`.
    pub fn new(class: &'static str, config: &Value) -> Result<Self> {
        let obj = config
            .as_object()
            .ok_or_else(|| Error::config(class, "the scheduler config is not a JSON object"))?;
        let mut map = obj.clone();
        if let Some(Value::Array(defaults)) = obj.get("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                map.remove(key);
            }
        }
        map.remove("_use_default_values");
        Ok(Self { class, map })
    }

    /// The diffusers class this reader reads for.
    pub fn class(&self) -> &'static str {
        self.class
    }

    fn err(&self, key: &str, message: impl std::fmt::Display) -> Error {
        Error::config(self.class, format!("`{key}` {message}"))
    }

    /// The raw value of `key`, `None` when absent or `null`.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is present at all (even as `null`).
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn number(&self, key: &str, v: &Value) -> Result<f64> {
        match v {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| self.err(key, format!("= {n} is not a number"))),
            Value::String(s) => match s.as_str() {
                "Infinity" | "inf" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" | "nan" => Ok(f64::NAN),
                _ => Err(self.err(key, format!("= {s:?} is not a number"))),
            },
            other => Err(self.err(key, format!("= {other} is not a number"))),
        }
    }

    /// A float, or `default` when absent / `null`.
    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// An optional float (`None` when absent / `null`).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.raw(key).map(|v| self.number(key, v)).transpose()
    }

    /// A non-negative integer, or `default` when absent / `null`.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => {
                let x = self.number(key, v)?;
                if x.fract() != 0.0 || x < 0.0 || !x.is_finite() || x > 1e12 {
                    Err(self.err(key, format!("= {v} must be a non-negative integer")))
                } else {
                    Ok(x as usize)
                }
            }
        }
    }

    /// An integer, or `default` when absent / `null`.
    pub fn i64(&self, key: &str, default: i64) -> Result<i64> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => {
                let x = self.number(key, v)?;
                if x.fract() != 0.0 || !x.is_finite() || x.abs() > 1e12 {
                    Err(self.err(key, format!("= {v} must be an integer")))
                } else {
                    Ok(x as i64)
                }
            }
        }
    }

    /// A boolean; absent gives `default`, `null` gives `false` (Python's `None`
    /// is falsy, which is how diffusers tests these flags).
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(key, format!("= {other} must be true or false"))),
        }
    }

    /// An enum value from `allowed`, or `default` when absent / `null`.
    pub fn enum_in<T: ConfigEnum>(&self, key: &str, default: T, allowed: &[T]) -> Result<T> {
        Ok(self.opt_enum_in(key, allowed)?.unwrap_or(default))
    }

    /// An optional enum value from `allowed`.
    pub fn opt_enum_in<T: ConfigEnum>(&self, key: &str, allowed: &[T]) -> Result<Option<T>> {
        let Some(v) = self.raw(key) else {
            return Ok(None);
        };
        let names = || {
            allowed
                .iter()
                .map(|a| format!("\"{}\"", a.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let s = v
            .as_str()
            .ok_or_else(|| self.err(key, format!("= {v} must be a string, one of {}", names())))?;
        T::VALUES
            .iter()
            .find(|(name, value)| *name == s && allowed.contains(value))
            .map(|(_, value)| Some(*value))
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("= \"{s}\" is not supported; allowed values: {}", names()),
                )
            })
    }

    /// An optional list of floats.
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.raw(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, "must be a list of numbers"))?;
        arr.iter()
            .map(|x| self.number(key, x))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A list of non-negative integers (empty when absent / `null`).
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let Some(v) = self.raw(key) else {
            return Ok(Vec::new());
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, "must be a list of integers"))?;
        arr.iter()
            .map(|x| {
                let f = self.number(key, x)?;
                if f.fract() != 0.0 || f < 0.0 || !f.is_finite() {
                    Err(self.err(key, format!("holds {x}, not a non-negative integer")))
                } else {
                    Ok(f as usize)
                }
            })
            .collect()
    }

    /// Reject `key` when it is set to `true` (a feature this engine lacks).
    pub fn reject_true(&self, key: &str, why: &str) -> Result<()> {
        if self.bool(key, false)? {
            Err(self.err(key, format!("= true is not supported: {why}")))
        } else {
            Ok(())
        }
    }

    /// Reject `key` when it is present and not `null`.
    pub fn reject_set(&self, key: &str, why: &str) -> Result<()> {
        match self.raw(key) {
            Some(v) => Err(self.err(key, format!("= {v} is not supported: {why}"))),
            None => Ok(()),
        }
    }

    /// An error for this class about `key`.
    pub fn error(&self, key: &str, message: impl std::fmt::Display) -> Error {
        self.err(key, message)
    }
}

/// The training noise schedule shared by the DDPM-family schedulers: how the
/// betas of the forward process are laid out over `num_train_timesteps`.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    /// Number of training timesteps (`num_train_timesteps`, usually 1000).
    pub num_train_timesteps: usize,
    /// First beta (`beta_start`).
    pub beta_start: f64,
    /// Last beta (`beta_end`).
    pub beta_end: f64,
    /// Layout of the betas (`beta_schedule`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the three fields above (`trained_betas`).
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale to zero terminal SNR (`rescale_betas_zero_snr`, arXiv:2305.08891).
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    /// diffusers' most common defaults: 1000 steps, linear 1e-4 .. 0.02.
    pub fn ddpm_default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }

    /// Read the beta keys with `defaults` for the missing ones. `allow_exp`
    /// admits the `exp` schedule (HeunDiscreteScheduler); `read_rescale`
    /// reads `rescale_betas_zero_snr` (classes without it keep `false`).
    pub fn read(
        r: &ConfigReader,
        defaults: &BetaConfig,
        allow_exp: bool,
        read_rescale: bool,
    ) -> Result<Self> {
        let allowed: &[BetaSchedule] = if allow_exp {
            &[
                BetaSchedule::Linear,
                BetaSchedule::ScaledLinear,
                BetaSchedule::SquaredcosCapV2,
                BetaSchedule::Exp,
            ]
        } else {
            &[
                BetaSchedule::Linear,
                BetaSchedule::ScaledLinear,
                BetaSchedule::SquaredcosCapV2,
            ]
        };
        let num_train_timesteps = r.usize("num_train_timesteps", defaults.num_train_timesteps)?;
        if num_train_timesteps < 2 {
            return Err(r.error("num_train_timesteps", "must be at least 2"));
        }
        let trained_betas = r.opt_f64_list("trained_betas")?;
        if let Some(b) = &trained_betas {
            if b.len() < 2 {
                return Err(r.error("trained_betas", "must hold at least 2 betas"));
            }
            if b.iter().any(|x| !(0.0..1.0).contains(x)) {
                return Err(r.error("trained_betas", "must hold betas in [0, 1)"));
            }
        }
        let cfg = Self {
            num_train_timesteps,
            beta_start: r.f64("beta_start", defaults.beta_start)?,
            beta_end: r.f64("beta_end", defaults.beta_end)?,
            beta_schedule: r.enum_in("beta_schedule", defaults.beta_schedule, allowed)?,
            trained_betas,
            rescale_betas_zero_snr: if read_rescale {
                r.bool("rescale_betas_zero_snr", defaults.rescale_betas_zero_snr)?
            } else {
                false
            },
        };
        if cfg.trained_betas.is_none()
            && matches!(
                cfg.beta_schedule,
                BetaSchedule::Linear | BetaSchedule::ScaledLinear
            )
            && !(cfg.beta_start >= 0.0 && cfg.beta_end < 1.0 && cfg.beta_start <= cfg.beta_end)
        {
            return Err(r.error(
                "beta_start",
                format!(
                    "/ `beta_end` = {} / {} must satisfy 0 <= beta_start <= beta_end < 1",
                    cfg.beta_start, cfg.beta_end
                ),
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_is_accepted() {
        let v = parse_config_json(
            r#"{"a": -Infinity, "b": "x -Infinity NaN \" Infinity", "c": [NaN, Infinity]}"#,
        )
        .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "x -Infinity NaN \" Infinity");
        let r = ConfigReader::new("Test", &v).unwrap();
        assert_eq!(r.f64("a", 0.0).unwrap(), f64::NEG_INFINITY);
    }

    #[test]
    fn use_default_values_are_dropped_and_nulls_handled() {
        let v: Value = serde_json::json!({
            "_use_default_values": ["beta_start"],
            "beta_start": 0.5,
            "lower_order_final": null,
            "timestep_spacing": null,
            "beta_schedule": "cosine"
        });
        let r = ConfigReader::new("Test", &v).unwrap();
        assert_eq!(r.f64("beta_start", 0.1).unwrap(), 0.1);
        assert!(!r.bool("lower_order_final", true).unwrap());
        assert!(r.bool("missing", true).unwrap());
        let spacing = r
            .enum_in(
                "timestep_spacing",
                TimestepSpacing::Leading,
                &[TimestepSpacing::Leading],
            )
            .unwrap();
        assert_eq!(spacing, TimestepSpacing::Leading);
        let err = BetaConfig::read(&r, &BetaConfig::ddpm_default(), false, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("beta_schedule") && err.contains("squaredcos_cap_v2"),
            "{err}"
        );
    }
}
