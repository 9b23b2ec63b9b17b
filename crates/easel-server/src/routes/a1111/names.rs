//! The web UI's names in easel's terms: samplers and schedule types
//! ([`SAMPLERS`], [`SCHEDULERS`], [`map_sampler`]), `<lora:NAME:WEIGHT>`
//! prompt tags ([`lora_tags`]) and model titles ([`model_reference`]).

use easel_diffusion::schedulers::SchedulerFamily;

use crate::error::ApiError;

/// A sampler of the web UI that easel has: its name, the aliases the web
/// UI also takes, easel's scheduler, and easel's scheduler with Karras
/// sigmas when there is one.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// The web UI's name (`Euler a`).
    pub name: &'static str,
    /// The web UI's aliases (`k_euler_a`).
    pub aliases: &'static [&'static str],
    /// easel's scheduler name (`euler_a`).
    pub scheduler: &'static str,
    /// easel's scheduler with the `Karras` schedule, if it has one.
    pub karras: Option<&'static str>,
    /// The legacy combined names (`DPM++ 2M Karras`) force Karras.
    pub forces_karras: bool,
}

const fn sampler(
    name: &'static str,
    aliases: &'static [&'static str],
    scheduler: &'static str,
    karras: Option<&'static str>,
) -> Sampler {
    Sampler {
        name,
        aliases,
        scheduler,
        karras,
        forces_karras: false,
    }
}

/// The web UI's samplers that easel runs (for DDPM-style models; flow
/// models such as FLUX.1 take `Euler` only, as `flow_match_euler`).
pub const SAMPLERS: &[Sampler] = &[
    sampler(
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        "euler_a",
        None,
    ),
    sampler("Euler", &["k_euler"], "euler", None),
    sampler("LMS", &["k_lms"], "lms", None),
    sampler("Heun", &["k_heun"], "heun", None),
    sampler(
        "DPM++ 2M",
        &["k_dpmpp_2m"],
        "dpmpp_2m",
        Some("dpmpp_2m_karras"),
    ),
    Sampler {
        name: "DPM++ 2M Karras",
        aliases: &["k_dpmpp_2m_ka"],
        scheduler: "dpmpp_2m_karras",
        karras: Some("dpmpp_2m_karras"),
        forces_karras: true,
    },
    sampler("DDIM", &["ddim"], "ddim", None),
    sampler("PLMS", &["plms"], "pndm", None),
    sampler("UniPC", &["unipc"], "unipc", None),
    sampler("LCM", &["k_lcm", "lcm"], "lcm", None),
];

/// The web UI's schedule types easel accepts: `(name, label)`.
pub const SCHEDULERS: &[(&str, &str)] = &[
    ("automatic", "Automatic"),
    ("karras", "Karras"),
    ("simple", "Simple"),
];

fn sampler_names() -> String {
    SAMPLERS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A 422 naming `field` (FastAPI's validation shape on these routes).
pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_value", field, message)
}

/// easel's scheduler for the web UI's `sampler` and schedule type
/// `schedule` (`automatic` when absent) on a model whose scheduler family
/// is `family` (`None`: unknown, treated as DDPM-style).
///
/// # Errors
/// 422 naming `sampler_name` for a sampler easel does not have (listing
/// those it has), or `scheduler` for a schedule it cannot run with it.
pub fn map_sampler(
    sampler: &str,
    sampler_field: &str,
    schedule: Option<&str>,
    family: Option<SchedulerFamily>,
) -> Result<&'static str, ApiError> {
    let wanted = sampler.trim();
    let schedule = schedule
        .map(|s| s.trim().to_ascii_lowercase().replace(' ', "_"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "automatic".into());
    if family == Some(SchedulerFamily::FlowMatch) {
        if !wanted.eq_ignore_ascii_case("euler") && !wanted.eq_ignore_ascii_case("k_euler") {
            return Err(invalid(
                sampler_field,
                format!(
                    "sampler `{wanted}` is not available for this flow-matching model (allowed: Euler)"
                ),
            ));
        }
        return match schedule.as_str() {
            "automatic" | "simple" => Ok("flow_match_euler"),
            other => Err(invalid(
                "scheduler",
                format!("schedule type `{other}` is not available for this flow-matching model (allowed: automatic, simple)"),
            )),
        };
    }
    let found = SAMPLERS.iter().find(|s| {
        s.name.eq_ignore_ascii_case(wanted)
            || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted))
    });
    let Some(found) = found else {
        return Err(invalid(
            sampler_field,
            format!(
                "sampler `{wanted}` has no easel equivalent (allowed: {})",
                sampler_names()
            ),
        ));
    };
    match schedule.as_str() {
        "automatic" => Ok(found.scheduler),
        "karras" => found.karras.ok_or_else(|| {
            invalid(
                "scheduler",
                format!(
                    "schedule type `karras` is not available with sampler `{}` in easel (allowed: automatic; \
                     `karras` only with DPM++ 2M)",
                    found.name
                ),
            )
        }),
        other => Err(invalid(
            "scheduler",
            format!(
                "schedule type `{other}` has no easel equivalent (allowed: automatic, and karras with DPM++ 2M)"
            ),
        )),
    }
    .map(|s| if found.forces_karras { found.scheduler } else { s })
}

/// A `<lora:NAME:WEIGHT>` tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The LoRA's file name (without extension).
    pub name: String,
    /// Its weight (1 when not given).
    pub weight: f64,
}

/// The prompt without its `<lora:NAME[:WEIGHT[:UNET_WEIGHT]]>` tags, and
/// the tags, as the web UI's extra-networks parser reads them (a missing
/// weight is 1).
///
/// # Errors
/// A weight that is not a number, or a text-encoder weight that differs
/// from the UNet weight (easel applies one scale to both), naming `prompt`.
pub fn lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), ApiError> {
    let mut text = String::new();
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        text.push_str(&rest[..start]);
        let inner = &rest[start + "<lora:".len()..start + len];
        let mut parts = inner.split(':').map(str::trim);
        let name = parts.next().unwrap_or_default().to_string();
        let mut weights = Vec::new();
        for p in parts {
            // `te=0.5` / `unet=0.5` named arguments are the web UI's too.
            let value = p.split_once('=').map_or(p, |(_, v)| v.trim());
            weights.push(value.parse::<f64>().map_err(|_| {
                invalid(
                    "prompt",
                    format!("<lora:{inner}>: weight `{p}` is not a number"),
                )
            })?);
        }
        if weights.len() > 1 && weights.iter().any(|w| *w != weights[0]) {
            return Err(invalid(
                "prompt",
                format!("<lora:{inner}>: separate text-encoder and UNet weights are not supported; give one weight"),
            ));
        }
        if name.is_empty() {
            return Err(invalid("prompt", format!("<lora:{inner}>: no LoRA name")));
        }
        tags.push(LoraTag {
            name,
            weight: weights.first().copied().unwrap_or(1.0),
        });
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

/// A web UI model title (`name.safetensors [hash]`) as an easel model
/// reference: the hash and a checkpoint extension dropped.
pub fn model_reference(title: &str) -> String {
    let mut t = title.trim();
    if let Some(i) = t.rfind(" [") {
        if t.ends_with(']') {
            t = t[..i].trim_end();
        }
    }
    for ext in [".safetensors", ".ckpt", ".gguf"] {
        if let Some(stem) = t.strip_suffix(ext) {
            if !stem.contains('/') {
                return stem.to_string();
            }
        }
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_stripped_with_their_weights() {
        let (text, tags) = lora_tags("a cat <lora:style:0.6>, <lora:other> sitting").unwrap();
        assert_eq!(text, "a cat ,  sitting");
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "style".into(),
                    weight: 0.6
                },
                LoraTag {
                    name: "other".into(),
                    weight: 1.0
                },
            ]
        );
        assert_eq!(lora_tags("<lora:a:0.5:0.5>").unwrap().1[0].weight, 0.5);
        assert_eq!(
            lora_tags("<lora:a:0.5:1>").unwrap_err().field.as_deref(),
            Some("prompt")
        );
        assert!(lora_tags("<lora:a:x>").is_err());
        assert_eq!(lora_tags("no tags <b>").unwrap().0, "no tags <b>");
    }

    #[test]
    fn samplers_map_onto_easel_schedulers() {
        let ddpm = Some(SchedulerFamily::Ddpm);
        for (name, schedule, want) in [
            ("Euler a", None, "euler_a"),
            ("Euler", Some("Automatic"), "euler"),
            ("k_lms", None, "lms"),
            ("DPM++ 2M", Some("Karras"), "dpmpp_2m_karras"),
            ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
            ("DPM++ 2M", None, "dpmpp_2m"),
            ("PLMS", None, "pndm"),
            ("ddim", None, "ddim"),
        ] {
            assert_eq!(
                map_sampler(name, "sampler_name", schedule, ddpm).unwrap(),
                want,
                "{name}"
            );
        }
        let e = map_sampler("DPM++ SDE", "sampler_name", None, ddpm).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sampler_name"));
        assert!(e.message.contains("Euler a, Euler"), "{}", e.message);
        let e = map_sampler("Euler", "sampler_name", Some("exponential"), ddpm).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("scheduler"));
        let flow = Some(SchedulerFamily::FlowMatch);
        assert_eq!(
            map_sampler("Euler", "sampler_name", Some("Simple"), flow).unwrap(),
            "flow_match_euler"
        );
        assert!(map_sampler("Euler a", "sampler_name", None, flow).is_err());
    }

    #[test]
    fn model_titles_become_references() {
        assert_eq!(model_reference("tiny-sd15"), "tiny-sd15");
        assert_eq!(model_reference("v1-5.safetensors [6ce0161689]"), "v1-5");
        assert_eq!(model_reference("org/repo"), "org/repo");
    }
}
