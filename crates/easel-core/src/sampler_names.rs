//! Sampler names as AUTOMATIC1111's web UI (and Forge, Civitai, ...) spell
//! them in the `parameters` text, from the diffusers scheduler class that
//! ran and its sigma schedule.
//!
//! The JSON record (the PNG `easel` chunk, the job record) keeps the
//! diffusers class name; only the human-readable `parameters` line uses
//! these names. The table (diffusers class, sigma schedule -> `Sampler`,
//! `Schedule type`):
//!
//! | diffusers class                   | schedule  | Sampler           | Schedule type |
//! |-----------------------------------|-----------|-------------------|---------------|
//! | `EulerDiscreteScheduler`          | default   | `Euler`           | -             |
//! | `EulerAncestralDiscreteScheduler` | default   | `Euler a`         | -             |
//! | `DDIMScheduler`                   | -         | `DDIM`            | -             |
//! | `PNDMScheduler`                   | -         | `PLMS`            | -             |
//! | `LMSDiscreteScheduler`            | default   | `LMS`             | -             |
//! | `LMSDiscreteScheduler`            | karras    | `LMS Karras`      | -             |
//! | `HeunDiscreteScheduler`           | default   | `Heun`            | -             |
//! | `DPMSolverMultistepScheduler`     | default   | `DPM++ 2M`        | -             |
//! | `DPMSolverMultistepScheduler`     | karras    | `DPM++ 2M Karras` | -             |
//! | `UniPCMultistepScheduler`         | default   | `UniPC`           | -             |
//! | `LCMScheduler`                    | -         | `LCM`             | -             |
//! | `FlowMatchEulerDiscreteScheduler` | -         | `Euler`           | `Simple`      |
//!
//! `LMS Karras` and `DPM++ 2M Karras` are the web UI's historical combined
//! names, which every reader of the text knows (newer web UI versions split
//! them into `Sampler` + `Schedule type: Karras` when reading). Any other
//! class with a Karras or exponential schedule gets its base name and
//! `Schedule type: Karras` / `Exponential` (the web UI 1.9+ labels). The
//! FLUX row follows what Forge writes for FLUX.1 (`Sampler: Euler, Schedule
//! type: Simple`). An unknown class is written as its class name.

/// The web UI's spelling of a sampler: the `Sampler` value and, where the
/// schedule is not part of that name, the `Schedule type` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct A1111Sampler {
    /// The `Sampler:` value, e.g. `DPM++ 2M Karras`.
    pub sampler: String,
    /// The `Schedule type:` value, e.g. `Simple`, or `None` to leave the
    /// field out.
    pub schedule_type: Option<&'static str>,
}

/// Map a diffusers scheduler class (e.g. `DPMSolverMultistepScheduler`) and
/// its sigma schedule (`None` for the class default, or `karras` /
/// `exponential`, case-insensitive, as the diffusers flags
/// `use_karras_sigmas` / `use_exponential_sigmas` name them) to the web
/// UI's spelling (see the module table). Never fails: unknown classes and
/// schedules are written as given.
pub fn a1111_sampler(class: &str, sigma_schedule: Option<&str>) -> A1111Sampler {
    let schedule = sigma_schedule.map(str::to_ascii_lowercase);
    let karras = schedule.as_deref() == Some("karras");
    let base = match class {
        "EulerDiscreteScheduler" => "Euler",
        "EulerAncestralDiscreteScheduler" => "Euler a",
        "DDIMScheduler" => "DDIM",
        "PNDMScheduler" => "PLMS",
        "LMSDiscreteScheduler" if karras => {
            return combined("LMS Karras");
        }
        "LMSDiscreteScheduler" => "LMS",
        "HeunDiscreteScheduler" => "Heun",
        "DPMSolverMultistepScheduler" if karras => {
            return combined("DPM++ 2M Karras");
        }
        "DPMSolverMultistepScheduler" => "DPM++ 2M",
        "UniPCMultistepScheduler" => "UniPC",
        "LCMScheduler" => "LCM",
        "FlowMatchEulerDiscreteScheduler" => {
            return A1111Sampler {
                sampler: "Euler".into(),
                schedule_type: Some("Simple"),
            }
        }
        other => other,
    };
    let schedule_type = match schedule.as_deref() {
        None | Some("") => None,
        Some("karras") => Some("Karras"),
        Some("exponential") => Some("Exponential"),
        // Not a schedule the engine has; keep the sampler name alone.
        Some(_) => None,
    };
    A1111Sampler {
        sampler: base.into(),
        schedule_type,
    }
}

fn combined(name: &str) -> A1111Sampler {
    A1111Sampler {
        sampler: name.into(),
        schedule_type: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(class: &str, schedule: Option<&str>) -> (String, Option<&'static str>) {
        let s = a1111_sampler(class, schedule);
        (s.sampler, s.schedule_type)
    }

    #[test]
    fn the_table() {
        for (class, schedule, sampler, schedule_type) in [
            ("EulerDiscreteScheduler", None, "Euler", None),
            ("EulerAncestralDiscreteScheduler", None, "Euler a", None),
            ("DDIMScheduler", None, "DDIM", None),
            ("PNDMScheduler", None, "PLMS", None),
            ("LMSDiscreteScheduler", None, "LMS", None),
            ("LMSDiscreteScheduler", Some("karras"), "LMS Karras", None),
            ("HeunDiscreteScheduler", None, "Heun", None),
            ("DPMSolverMultistepScheduler", None, "DPM++ 2M", None),
            (
                "DPMSolverMultistepScheduler",
                Some("Karras"),
                "DPM++ 2M Karras",
                None,
            ),
            ("UniPCMultistepScheduler", None, "UniPC", None),
            ("LCMScheduler", None, "LCM", None),
            (
                "FlowMatchEulerDiscreteScheduler",
                None,
                "Euler",
                Some("Simple"),
            ),
            (
                "EulerDiscreteScheduler",
                Some("karras"),
                "Euler",
                Some("Karras"),
            ),
            (
                "UniPCMultistepScheduler",
                Some("exponential"),
                "UniPC",
                Some("Exponential"),
            ),
            ("SomeNewScheduler", None, "SomeNewScheduler", None),
        ] {
            assert_eq!(
                name(class, schedule),
                (sampler.to_string(), schedule_type),
                "{class} {schedule:?}"
            );
        }
    }
}
