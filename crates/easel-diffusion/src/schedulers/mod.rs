//! Noise schedulers (samplers), following diffusers' small contract:
//! `set_timesteps`, `scale_model_input`, `step`.
//!
//! Each algorithm lives in its own file and is configured from a diffusers
//! `scheduler_config.json`. Any scheduler can be built from any model's
//! config, as `NewScheduler.from_config(pipe.scheduler.config)` does in
//! diffusers: keys the class knows are taken, the rest are ignored, and
//! missing keys get the class's defaults.
//!
//! [`build_scheduler`] turns a name (short name, alias, diffusers class name
//! or hosted-API enum, see [`scheduler_names`]) and the model's scheduler
//! config into a boxed [`Scheduler`]; it also refuses a scheduler of the
//! wrong family for the model ([`check_family`]: flow matching vs DDPM).
//! Shared pieces live in [`common`] (beta schedules, spacing, σ helpers),
//! [`sigma_schedule`] (the σ-space schedule) and [`config`] (config reading).

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::noise::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod flow_match;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod sigma_schedule;
pub mod unipc;

pub use config::{load_config_file, parse_config_json};
pub use ddim::{DdimConfig, DdimScheduler};
pub use dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler};
pub use euler::{EulerConfig, EulerDiscreteScheduler};
pub use euler_ancestral::{EulerAncestralConfig, EulerAncestralDiscreteScheduler};
pub use flow_match::{FlowMatchConfig, FlowMatchEulerDiscreteScheduler};
pub use heun::{HeunConfig, HeunDiscreteScheduler};
pub use lcm::{LcmConfig, LcmScheduler};
pub use lms::{LmsConfig, LmsDiscreteScheduler};
pub use pndm::{PndmConfig, PndmScheduler};
pub use unipc::{UniPcConfig, UniPcMultistepScheduler};

/// What `set_timesteps` is asked for.
#[derive(Debug, Clone, Default)]
pub struct TimestepsRequest {
    /// Number of denoising steps (1..=1000).
    pub num_inference_steps: usize,
    /// Explicit sigmas (flow matching: FluxPipeline passes `linspace(1, 1/n, n)`,
    /// one per step; EulerDiscreteScheduler also takes them, with the final
    /// σ included, as diffusers' `set_timesteps(sigmas=...)`). Other
    /// schedulers refuse them. With sigmas, `num_inference_steps` may be 0.
    pub sigmas: Option<Vec<f64>>,
    /// The dynamic-shifting `mu` (flow matching with `use_dynamic_shifting`).
    pub mu: Option<f64>,
    /// Image-to-image strength, for the schedulers whose timesteps depend on
    /// it (LCM: `set_timesteps(..., strength=)`, as
    /// LatentConsistencyModelImg2ImgPipeline passes it). `None` = 1.0.
    pub strength: Option<f64>,
    /// LCM's `original_inference_steps` override (`None` = the config's).
    pub original_inference_steps: Option<usize>,
}

impl TimestepsRequest {
    /// A request for `num_inference_steps` with the scheduler's own spacing.
    pub fn steps(num_inference_steps: usize) -> Self {
        Self {
            num_inference_steps,
            ..Default::default()
        }
    }
}

/// Which model family a scheduler drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerFamily {
    /// Discrete-time DDPM-trained models (Stable Diffusion 1.x / 2.x / XL):
    /// epsilon, v or sample prediction.
    Ddpm,
    /// Flow-matching models (FLUX.1): velocity prediction, sigmas in [0, 1].
    FlowMatch,
}

/// A noise scheduler: turns model outputs into the next latents.
///
/// All tensors are `(batch, channels, height, width)` float32 latents (or
/// FLUX's packed `(batch, seq, channels)`); the scheduler only does
/// element-wise arithmetic with per-step scalars.
pub trait Scheduler: Send {
    /// Compute the timesteps (and sigmas) for a run. Must be called before
    /// the first `scale_model_input` / `step`; resets any multistep state.
    fn set_timesteps(&mut self, request: &TimestepsRequest) -> Result<()>;

    /// The timesteps to feed the denoiser, in order (one model call each).
    fn timesteps(&self) -> &[f64];

    /// The noise levels of the schedule (σ, with the final entry), where the
    /// algorithm has them; `None` for DDIM / PNDM / LCM.
    fn sigmas(&self) -> Option<&[f64]>;

    /// The standard deviation the initial noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;

    /// Scale the denoiser input for `timestep` (σ-space schedulers divide by
    /// `sqrt(σ² + 1)`; others return the sample unchanged).
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One step: from `model_output` at `timestep` and the current `sample`,
    /// the previous (less noisy) sample. Stochastic schedulers draw their
    /// per-step noise from `noise`, in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Noise `original` to the level of `timestep` (image-to-image start).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// The model family this scheduler can drive.
    fn family(&self) -> SchedulerFamily;

    /// The diffusers class name (`EulerDiscreteScheduler`).
    fn class_name(&self) -> &'static str;

    /// The σ ramp when it is not the class default: `Some("karras")`
    /// (`use_karras_sigmas`) or `Some("exponential")`
    /// (`use_exponential_sigmas`); `None` otherwise and for classes without
    /// such a choice. Written to image metadata, where e.g. DPM-Solver++ 2M
    /// with Karras σ is named `DPM++ 2M Karras`.
    fn sigma_schedule(&self) -> Option<&'static str> {
        None
    }

    /// Model calls per step of the underlying solver (Heun: 2).
    fn order(&self) -> usize {
        1
    }

    /// Start the schedule at `begin_index` (image-to-image skips the first steps).
    fn set_begin_index(&mut self, begin_index: usize);
}

impl std::fmt::Debug for dyn Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("class", &self.class_name())
            .field("timesteps", &self.timesteps().len())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// The name table
// ---------------------------------------------------------------------------

/// One row of the scheduler table (`easel schedulers`; serialises to JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SchedulerInfo {
    /// The short name (`euler`, `dpmpp_2m_karras`, ...).
    pub name: &'static str,
    /// Other accepted names: the diffusers class name, the hosted-API enum
    /// value, common spellings. Matching is case-insensitive.
    pub aliases: &'static [&'static str],
    /// The diffusers class it builds.
    pub class_name: &'static str,
    /// The model family it drives.
    pub family: SchedulerFamily,
    /// Whether it draws fresh noise during sampling.
    pub stochastic: bool,
    /// One line about it.
    pub description: &'static str,
}

/// A config value a table entry forces on top of the model's config (as
/// `Class.from_config(config, key=value)` in diffusers).
#[derive(Debug, Clone, Copy)]
enum Override {
    Bool(&'static str, bool),
    Str(&'static str, &'static str),
    Int(&'static str, i64),
}

struct Entry {
    info: SchedulerInfo,
    overrides: &'static [Override],
}

const DPMPP_2M: &[Override] = &[
    Override::Str("algorithm_type", "dpmsolver++"),
    Override::Int("solver_order", 2),
    Override::Bool("use_karras_sigmas", false),
];
const DPMPP_2M_KARRAS: &[Override] = &[
    Override::Str("algorithm_type", "dpmsolver++"),
    Override::Int("solver_order", 2),
    Override::Bool("use_karras_sigmas", true),
];

const TABLE: &[Entry] = &[
    Entry {
        info: SchedulerInfo {
            name: "euler",
            aliases: &[
                "EulerDiscreteScheduler",
                "EULER_DISCRETE",
                "euler_discrete",
                "k_euler",
            ],
            class_name: "EulerDiscreteScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "Euler method in sigma space (Karras et al. 2022); fast, deterministic",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "euler_a",
            aliases: &[
                "EulerAncestralDiscreteScheduler",
                "EULER_ANCESTRAL_DISCRETE",
                "euler_ancestral",
                "k_euler_a",
            ],
            class_name: "EulerAncestralDiscreteScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: true,
            description:
                "Euler ancestral: Euler step plus fresh noise each step; varied, does not converge",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "ddim",
            aliases: &["DDIMScheduler", "DDIM"],
            class_name: "DDIMScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "DDIM (Song et al. 2020); deterministic, good for image-to-image",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "pndm",
            aliases: &["PNDMScheduler", "PNDM", "plms"],
            class_name: "PNDMScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description:
                "PNDM / PLMS linear multistep (Liu et al. 2022); Stable Diffusion 1.x's default",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "lms",
            aliases: &["LMSDiscreteScheduler", "KLMS", "lms_discrete", "k_lms"],
            class_name: "LMSDiscreteScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "Linear multistep (order 4) in sigma space, k-diffusion's LMS",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "heun",
            aliases: &["HeunDiscreteScheduler", "k_heun"],
            class_name: "HeunDiscreteScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "Heun's 2nd-order method (Karras et al. 2022); two model calls per step",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "dpmpp_2m",
            aliases: &[
                "DPMSolverMultistepScheduler",
                "DPM_SOLVER",
                "dpm_solver",
                "dpmpp2m",
            ],
            class_name: "DPMSolverMultistepScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "DPM-Solver++ 2M (Lu et al. 2022); high quality in 20-30 steps",
        },
        overrides: DPMPP_2M,
    },
    Entry {
        info: SchedulerInfo {
            name: "dpmpp_2m_karras",
            aliases: &["dpmpp_2m_k", "dpmpp2m_karras"],
            class_name: "DPMSolverMultistepScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "DPM-Solver++ 2M with Karras sigmas; the usual 'DPM++ 2M Karras'",
        },
        overrides: DPMPP_2M_KARRAS,
    },
    Entry {
        info: SchedulerInfo {
            name: "unipc",
            aliases: &["UniPCMultistepScheduler", "uni_pc"],
            class_name: "UniPCMultistepScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: false,
            description: "UniPC predictor-corrector (Zhao et al. 2023); good in 10-20 steps",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "lcm",
            aliases: &["LCMScheduler"],
            class_name: "LCMScheduler",
            family: SchedulerFamily::Ddpm,
            stochastic: true,
            description:
                "Latent consistency sampling (Luo et al. 2023); for LCM-distilled models, 2-8 steps",
        },
        overrides: &[],
    },
    Entry {
        info: SchedulerInfo {
            name: "flow_match_euler",
            aliases: &[
                "FlowMatchEulerDiscreteScheduler",
                "flow_euler",
                "flowmatch_euler",
            ],
            class_name: "FlowMatchEulerDiscreteScheduler",
            family: SchedulerFamily::FlowMatch,
            stochastic: false,
            description:
                "Euler for rectified-flow models (SD3 / FLUX.1); the only choice for flow models",
        },
        overrides: &[],
    },
];

/// The diffusers classes this engine implements, with their families.
const CLASSES: &[(&str, SchedulerFamily)] = &[
    ("DDIMScheduler", SchedulerFamily::Ddpm),
    ("PNDMScheduler", SchedulerFamily::Ddpm),
    ("LMSDiscreteScheduler", SchedulerFamily::Ddpm),
    ("EulerDiscreteScheduler", SchedulerFamily::Ddpm),
    ("EulerAncestralDiscreteScheduler", SchedulerFamily::Ddpm),
    ("HeunDiscreteScheduler", SchedulerFamily::Ddpm),
    ("DPMSolverMultistepScheduler", SchedulerFamily::Ddpm),
    ("UniPCMultistepScheduler", SchedulerFamily::Ddpm),
    ("LCMScheduler", SchedulerFamily::Ddpm),
    (
        "FlowMatchEulerDiscreteScheduler",
        SchedulerFamily::FlowMatch,
    ),
];

/// Every scheduler of the table, in display order.
pub fn scheduler_names() -> Vec<SchedulerInfo> {
    TABLE.iter().map(|e| e.info.clone()).collect()
}

fn normalize(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('-', "_")
}

fn valid_names() -> String {
    TABLE
        .iter()
        .map(|e| format!("{} ({})", e.info.name, e.info.aliases.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn unknown(name: &str) -> Error {
    Error::UnknownScheduler {
        name: name.to_string(),
        valid: valid_names(),
    }
}

/// What a scheduler name resolves to: a diffusers class and the config
/// values forced on top of the model's config.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedScheduler {
    /// The diffusers class name.
    pub class: &'static str,
    /// Config overrides, applied as `Class.from_config(config, **overrides)`.
    pub overrides: Vec<(&'static str, Value)>,
}

/// Resolve a scheduler name (case-insensitive). A diffusers class name means
/// `Class.from_config(model_config)` unchanged; a short name or API name may
/// also force settings (`dpmpp_2m`: `algorithm_type = "dpmsolver++"`,
/// `solver_order = 2`, `use_karras_sigmas = false`; `dpmpp_2m_karras`: the
/// same with Karras sigmas). An unknown name is [`Error::UnknownScheduler`].
pub fn resolve_scheduler_name(name: &str) -> Result<ResolvedScheduler> {
    let key = normalize(name);
    if let Some((class, _)) = CLASSES.iter().find(|(c, _)| normalize(c) == key) {
        return Ok(ResolvedScheduler {
            class,
            overrides: Vec::new(),
        });
    }
    let entry = TABLE
        .iter()
        .find(|e| {
            normalize(e.info.name) == key || e.info.aliases.iter().any(|a| normalize(a) == key)
        })
        .ok_or_else(|| unknown(name))?;
    let overrides = entry
        .overrides
        .iter()
        .map(|o| match *o {
            Override::Bool(k, v) => (k, Value::from(v)),
            Override::Str(k, v) => (k, Value::from(v)),
            Override::Int(k, v) => (k, Value::from(v)),
        })
        .collect();
    Ok(ResolvedScheduler {
        class: entry.info.class_name,
        overrides,
    })
}

/// The family of the model a scheduler config belongs to, decided by its
/// `_class_name`: `FlowMatch*` classes are [`SchedulerFamily::FlowMatch`],
/// any other class [`SchedulerFamily::Ddpm`]. Without `_class_name`, a config
/// with flow-matching keys (`shift`, `use_dynamic_shifting`,
/// `base_image_seq_len`) and no beta keys counts as flow matching.
pub fn config_family(model_scheduler_config: &Value) -> SchedulerFamily {
    match model_scheduler_config
        .get("_class_name")
        .and_then(Value::as_str)
    {
        Some(class) if class.starts_with("FlowMatch") => SchedulerFamily::FlowMatch,
        Some(_) => SchedulerFamily::Ddpm,
        None => {
            let has = |k: &str| model_scheduler_config.get(k).is_some();
            let flow_keys =
                has("shift") || has("use_dynamic_shifting") || has("base_image_seq_len");
            let beta_keys = has("beta_start") || has("beta_schedule") || has("trained_betas");
            if flow_keys && !beta_keys {
                SchedulerFamily::FlowMatch
            } else {
                SchedulerFamily::Ddpm
            }
        }
    }
}

fn class_family(class: &str) -> Option<SchedulerFamily> {
    CLASSES.iter().find(|(c, _)| *c == class).map(|(_, f)| *f)
}

fn family_name(f: SchedulerFamily) -> &'static str {
    match f {
        SchedulerFamily::Ddpm => "a DDPM-style (epsilon / v-prediction) model",
        SchedulerFamily::FlowMatch => "a flow-matching model",
    }
}

/// Check that diffusers class `class` can drive the model whose scheduler
/// config is `model_scheduler_config` (see [`config_family`]): a
/// flow-matching scheduler cannot sample a DDPM model, nor the reverse.
pub fn check_family(class: &str, model_scheduler_config: &Value) -> Result<()> {
    let model_class = model_scheduler_config
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("(no _class_name)");
    check_class_family(class, config_family(model_scheduler_config), model_class)
}

/// Check, before any model is loaded, that scheduler `name` (a short name,
/// alias or diffusers class, see [`resolve_scheduler_name`]) can drive a
/// model of `family`; `model_label` names the model's scheduler (or
/// pipeline) in the message. This is the same rule [`build_scheduler`]
/// applies when the job runs, so a request that passes here does not fail
/// there for its scheduler.
///
/// # Errors
/// [`Error::UnknownScheduler`] for an unknown name, or an invalid
/// `scheduler` value listing the schedulers of the model's family.
pub fn check_scheduler_for(name: &str, family: SchedulerFamily, model_label: &str) -> Result<()> {
    let resolved = resolve_scheduler_name(name)?;
    check_class_family(resolved.class, family, model_label)
}

fn check_class_family(class: &str, model: SchedulerFamily, model_class: &str) -> Result<()> {
    let wanted = class_family(class).ok_or_else(|| unknown(class))?;
    if wanted != model {
        let choices: Vec<&str> = TABLE
            .iter()
            .filter(|e| e.info.family == model)
            .map(|e| e.info.name)
            .collect();
        return Err(Error::invalid(
            "scheduler",
            format!(
                "{class} is made for {}, but this model's scheduler ({model_class}) is for {}; \
                 choose one of: {}",
                family_name(wanted),
                family_name(model),
                choices.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Build diffusers class `class` from `config` (as `Class.from_config`),
/// without the family check.
pub fn build_scheduler_class(class: &str, config: &Value) -> Result<Box<dyn Scheduler>> {
    Ok(match class {
        "DDIMScheduler" => Box::new(DdimScheduler::from_config(config)?),
        "PNDMScheduler" => Box::new(PndmScheduler::from_config(config)?),
        "LMSDiscreteScheduler" => Box::new(LmsDiscreteScheduler::from_config(config)?),
        "EulerDiscreteScheduler" => Box::new(EulerDiscreteScheduler::from_config(config)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(EulerAncestralDiscreteScheduler::from_config(config)?)
        }
        "HeunDiscreteScheduler" => Box::new(HeunDiscreteScheduler::from_config(config)?),
        "DPMSolverMultistepScheduler" => {
            Box::new(DpmSolverMultistepScheduler::from_config(config)?)
        }
        "UniPCMultistepScheduler" => Box::new(UniPcMultistepScheduler::from_config(config)?),
        "LCMScheduler" => Box::new(LcmScheduler::from_config(config)?),
        "FlowMatchEulerDiscreteScheduler" => {
            Box::new(FlowMatchEulerDiscreteScheduler::from_config(config)?)
        }
        other => return Err(unknown(other)),
    })
}

/// Build the scheduler `name` for a model whose `scheduler_config.json` is
/// `model_scheduler_config`, as diffusers' `Class.from_config(config)`.
///
/// `name` is a short name, alias or diffusers class name (see
/// [`resolve_scheduler_name`]); `None` builds the config's own `_class_name`.
/// The family check of [`check_family`] is applied here: asking for a
/// flow-matching scheduler on a DDPM model (or the reverse) is an error.
pub fn build_scheduler(
    name: Option<&str>,
    model_scheduler_config: &Value,
) -> Result<Box<dyn Scheduler>> {
    let resolved = match name {
        Some(n) => resolve_scheduler_name(n)?,
        None => {
            let class = model_scheduler_config
                .get("_class_name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::config(
                        "scheduler",
                        "the scheduler config has no `_class_name`; name a scheduler explicitly",
                    )
                })?;
            resolve_scheduler_name(class).map_err(|_| unknown(class))?
        }
    };
    check_family(resolved.class, model_scheduler_config)?;
    let mut config = model_scheduler_config.clone();
    if !resolved.overrides.is_empty() {
        let obj = config.as_object_mut().ok_or_else(|| {
            Error::config(resolved.class, "the scheduler config is not a JSON object")
        })?;
        for (k, v) in &resolved.overrides {
            obj.insert((*k).to_string(), v.clone());
            // An override is a choice, not a saved default.
            if let Some(Value::Array(defaults)) = obj.get_mut("_use_default_values") {
                defaults.retain(|d| d.as_str() != Some(k));
            }
        }
    }
    build_scheduler_class(resolved.class, &config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sd15() -> Value {
        json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null
        })
    }

    fn flux() -> Value {
        json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "max_image_seq_len": 4096,
            "max_shift": 1.15,
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": true
        })
    }

    #[test]
    fn aliases_resolve_to_the_same_class() {
        for info in scheduler_names() {
            let by_name = resolve_scheduler_name(info.name).unwrap();
            assert_eq!(by_name.class, info.class_name);
            for alias in info.aliases {
                assert_eq!(
                    resolve_scheduler_name(alias).unwrap().class,
                    info.class_name,
                    "{alias}"
                );
                let upper = resolve_scheduler_name(&alias.to_uppercase()).unwrap();
                assert_eq!(upper.class, info.class_name, "{alias} upper-case");
            }
            let config = if info.family == SchedulerFamily::FlowMatch {
                flux()
            } else {
                sd15()
            };
            let s = build_scheduler(Some(info.name), &config).unwrap();
            assert_eq!(s.class_name(), info.class_name);
            assert_eq!(s.family(), info.family);
        }
        for (api, class) in [
            ("EULER_DISCRETE", "EulerDiscreteScheduler"),
            (
                "EULER_ANCESTRAL_DISCRETE",
                "EulerAncestralDiscreteScheduler",
            ),
            ("DDIM", "DDIMScheduler"),
            ("KLMS", "LMSDiscreteScheduler"),
            ("DPM_SOLVER", "DPMSolverMultistepScheduler"),
            ("PNDM", "PNDMScheduler"),
            ("euler-a", "EulerAncestralDiscreteScheduler"),
        ] {
            assert_eq!(resolve_scheduler_name(api).unwrap().class, class);
        }
    }

    #[test]
    fn none_builds_the_configs_own_class() {
        assert_eq!(
            build_scheduler(None, &sd15()).unwrap().class_name(),
            "PNDMScheduler"
        );
        assert_eq!(
            build_scheduler(None, &flux()).unwrap().class_name(),
            "FlowMatchEulerDiscreteScheduler"
        );
        let err = build_scheduler(None, &json!({"beta_start": 0.1})).unwrap_err();
        assert!(err.to_string().contains("_class_name"), "{err}");
        let err = build_scheduler(None, &json!({"_class_name": "DDPMScheduler"})).unwrap_err();
        assert!(matches!(err, Error::UnknownScheduler { .. }), "{err}");
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = build_scheduler(Some("k_dpm_fancy"), &sd15()).unwrap_err();
        match &err {
            Error::UnknownScheduler { name, valid } => {
                assert_eq!(name, "k_dpm_fancy");
                for info in scheduler_names() {
                    assert!(valid.contains(info.name), "{valid}");
                }
                assert!(valid.contains("EULER_DISCRETE"));
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn family_mismatch_is_an_error() {
        let err = build_scheduler(Some("flow_match_euler"), &sd15())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flow-matching") && err.contains("euler"),
            "{err}"
        );
        for name in ["euler", "ddim", "dpmpp_2m_karras", "lcm"] {
            let err = build_scheduler(Some(name), &flux())
                .unwrap_err()
                .to_string();
            assert!(err.contains("flow_match_euler"), "{err}");
        }
        assert!(check_family("DDIMScheduler", &sd15()).is_ok());
        assert_eq!(
            config_family(&json!({"shift": 3.0})),
            SchedulerFamily::FlowMatch
        );
        assert_eq!(
            config_family(&json!({"beta_start": 0.1})),
            SchedulerFamily::Ddpm
        );
    }

    #[test]
    fn sigma_schedule_reports_the_ramp_for_metadata() {
        let schedule =
            |name: &str, cfg: &Value| build_scheduler(Some(name), cfg).unwrap().sigma_schedule();
        assert_eq!(schedule("dpmpp_2m_karras", &sd15()), Some("karras"));
        assert_eq!(schedule("dpmpp_2m", &sd15()), None);
        assert_eq!(schedule("euler_a", &sd15()), None);
        let mut cfg = sd15();
        cfg["use_karras_sigmas"] = json!(true);
        for name in ["euler", "heun", "lms", "unipc"] {
            assert_eq!(schedule(name, &cfg), Some("karras"), "{name}");
        }
        let mut cfg = sd15();
        cfg["use_exponential_sigmas"] = json!(true);
        assert_eq!(schedule("euler", &cfg), Some("exponential"));
        assert_eq!(schedule("flow_match_euler", &flux()), None);
    }

    #[test]
    fn dpmpp_2m_karras_forces_karras_sigmas() {
        let mut s = build_scheduler(Some("dpmpp_2m_karras"), &sd15()).unwrap();
        let mut plain = build_scheduler(Some("dpmpp_2m"), &sd15()).unwrap();
        s.set_timesteps(&TimestepsRequest::steps(10)).unwrap();
        plain.set_timesteps(&TimestepsRequest::steps(10)).unwrap();
        assert_ne!(s.sigmas().unwrap(), plain.sigmas().unwrap());
        let mut cfg = sd15();
        cfg["_class_name"] = json!("DPMSolverMultistepScheduler");
        cfg["use_karras_sigmas"] = json!(true);
        // The class name keeps the model's own settings; dpmpp_2m turns Karras off.
        let mut own = build_scheduler(Some("DPMSolverMultistepScheduler"), &cfg).unwrap();
        own.set_timesteps(&TimestepsRequest::steps(10)).unwrap();
        assert_eq!(own.sigmas().unwrap(), s.sigmas().unwrap());
        let mut off = build_scheduler(Some("dpmpp_2m"), &cfg).unwrap();
        off.set_timesteps(&TimestepsRequest::steps(10)).unwrap();
        assert_eq!(off.sigmas().unwrap(), plain.sigmas().unwrap());
    }
}
