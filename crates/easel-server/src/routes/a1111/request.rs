//! AUTOMATIC1111's `txt2img` / `img2img` request bodies (the web UI's
//! `StableDiffusionProcessing{Txt2Img,Img2Img}` fields, as
//! `modules/api/models.py` builds them) translated into one native request.
//!
//! [`FIELDS`] is the table of every field easel knows and what it does with
//! it (mapped, accepted without effect, or accepted only at the value that
//! changes nothing); `docs/API.md` prints it and `tests/a1111.rs` walks it.
//! Fields outside the table are ignored, as the web UI's pydantic models
//! ignore them, and listed in the answer's `info.easel_ignored_fields`.
//! Samplers and schedulers map through [`super::names::SAMPLERS`];
//! `<lora:NAME:WEIGHT>` prompt tags through [`super::names::lora_tags`].

use axum::http::StatusCode;
use easel_core::{ImageDefinition, LoraRef, NativeRequest, OutputFormat};
use easel_diffusion::schedulers::SchedulerFamily;
use serde_json::{Map, Value};

use super::names::{invalid, lora_tags, map_sampler};
use crate::error::ApiError;

/// Which endpoint a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST /sdapi/v1/txt2img`.
    Txt2Img,
    /// `POST /sdapi/v1/img2img`.
    Img2Img,
}

/// Where a field applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Both endpoints.
    Both,
    /// `txt2img` only.
    Txt2Img,
    /// `img2img` only.
    Img2Img,
}

impl Applies {
    /// Whether the field applies to `mode`.
    pub fn to(self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (Applies::Both, _)
                | (Applies::Txt2Img, Mode::Txt2Img)
                | (Applies::Img2Img, Mode::Img2Img)
        )
    }
}

/// What easel does with a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Mapped onto the native image definition field `native` (`images`
    /// for the number of definitions). `example` (JSON, with the JSON
    /// object `with` merged into the request) maps to `native_example`
    /// (JSON; `"<set>"` for an input stored as an asset).
    Maps {
        /// The native field.
        native: &'static str,
        /// A value of the A1111 field.
        example: &'static str,
        /// Other fields the example needs.
        with: &'static str,
        /// What the native field then holds.
        native_example: &'static str,
    },
    /// Accepted; changes nothing easel makes (cosmetic, or used only by a
    /// feature that is off).
    Ignored,
    /// Changes the answer, not the images (`send_images: false`: no
    /// images in the answer; the job and its files exist).
    Answer,
    /// Accepted only at the JSON values `allowed` (which change nothing);
    /// any other value (such as `refused_example`) is a 422 naming the
    /// field. With `with_mask`, only checked when a `mask` is given.
    Only {
        /// The accepted values (JSON; numbers compare by value).
        allowed: &'static [&'static str],
        /// A value that is refused.
        refused_example: &'static str,
        /// Checked only for inpainting (a `mask` given).
        with_mask: bool,
        /// Why other values are refused.
        why: &'static str,
    },
}

/// One A1111 request field.
#[derive(Debug, Clone, Copy)]
pub struct FieldRule {
    /// The A1111 field name.
    pub name: &'static str,
    /// Where it applies.
    pub applies: Applies,
    /// What easel does with it.
    pub rule: Rule,
}

const fn maps(
    name: &'static str,
    applies: Applies,
    native: &'static str,
    example: &'static str,
    with: &'static str,
    native_example: &'static str,
) -> FieldRule {
    FieldRule {
        name,
        applies,
        rule: Rule::Maps {
            native,
            example,
            with,
            native_example,
        },
    }
}

const fn ignored(name: &'static str, applies: Applies) -> FieldRule {
    FieldRule {
        name,
        applies,
        rule: Rule::Ignored,
    }
}

const fn only(
    name: &'static str,
    applies: Applies,
    allowed: &'static [&'static str],
    refused_example: &'static str,
    with_mask: bool,
    why: &'static str,
) -> FieldRule {
    FieldRule {
        name,
        applies,
        rule: Rule::Only {
            allowed,
            refused_example,
            with_mask,
            why,
        },
    }
}

use Applies::{Both, Img2Img as I2I, Txt2Img as T2I};

/// Every A1111 field easel knows, in the order `docs/API.md` lists them.
pub const FIELDS: &[FieldRule] = &[
    maps("prompt", Both, "prompt", "\"a fox\"", "{}", "\"a fox\""),
    maps("negative_prompt", Both, "negativePrompt", "\"blurry\"", "{}", "\"blurry\""),
    maps("seed", Both, "seed", "7", "{}", "7"),
    maps("steps", Both, "steps", "3", "{}", "3"),
    maps("cfg_scale", Both, "guidanceScale", "5.5", "{}", "5.5"),
    maps("width", Both, "width", "72", "{}", "72"),
    maps("height", Both, "height", "56", "{}", "56"),
    maps("batch_size", Both, "images", "2", "{}", "2"),
    maps("n_iter", Both, "images", "3", "{}", "3"),
    maps("sampler_name", Both, "scheduler", "\"DPM++ 2M\"", "{}", "\"dpmpp_2m\""),
    maps("sampler_index", Both, "scheduler", "\"Euler a\"", "{}", "\"euler_a\""),
    maps("scheduler", Both, "scheduler", "\"karras\"", "{\"sampler_name\": \"DPM++ 2M\"}", "\"dpmpp_2m_karras\""),
    maps("tiling", Both, "tiling", "true", "{}", "true"),
    maps("override_settings", Both, "baseModel", "{\"sd_model_checkpoint\": \"fake/other\"}", "{}", "\"fake/other\""),
    maps("init_images", I2I, "image", "null", "{}", "\"<set>\""),
    maps("denoising_strength", I2I, "strength", "0.5", "{}", "0.5"),
    maps("mask", I2I, "mask", "null", "{\"mask_blur\": 0, \"inpainting_fill\": 1, \"inpaint_full_res\": false}", "\"<set>\""),
    FieldRule { name: "eta", applies: Both, rule: Rule::Only { allowed: &["null"], refused_example: "0.5", with_mask: false, why: "easel's `Euler a` runs at eta 1 and `DDIM` at eta 0; other samplers take no eta (any value is accepted for them)" } },
    only("restore_faces", Both, &["false", "null"], "true", false, "easel has no face restoration"),
    only("enable_hr", T2I, &["false", "null"], "true", false, "easel has no hires. fix second pass; generate at the final size, or upscale with img2img"),
    only("firstpass_image", T2I, &["null", "\"\""], "\"abc\"", false, "easel has no hires. fix second pass"),
    only("styles", Both, &["[]", "null"], "[\"cinematic\"]", false, "easel has no saved prompt styles; put the style's text in the prompt"),
    only("subseed_strength", Both, &["0", "null"], "0.3", false, "easel has no variation seeds"),
    only("seed_resize_from_h", Both, &["-1", "0", "null"], "512", false, "easel has no seed resizing"),
    only("seed_resize_from_w", Both, &["-1", "0", "null"], "512", false, "easel has no seed resizing"),
    only("s_churn", Both, &["0", "null"], "1", false, "easel's samplers add no churn"),
    only("s_noise", Both, &["1", "null"], "0.9", false, "easel's samplers use noise multiplier 1"),
    only("s_min_uncond", Both, &["0", "null"], "1", false, "easel does not skip the negative prompt in late steps"),
    only("script_name", Both, &["null", "\"\""], "\"X/Y/Z plot\"", false, "easel runs no web UI scripts"),
    only("alwayson_scripts", Both, &["{}", "null"], "{\"ControlNet\": {\"args\": [{}]}}", false, "easel runs no web UI extensions"),
    only("refiner_checkpoint", Both, &["null", "\"\"", "\"None\""], "\"sdxl-refiner\"", false, "easel has no refiner pass"),
    only("infotext", Both, &["null", "\"\""], "\"Steps: 20\"", false, "easel does not read parameters from an infotext; send the fields"),
    only("disable_extra_networks", Both, &["false", "null"], "true", false, "easel applies the prompt's <lora:...> tags"),
    only("resize_mode", I2I, &["0", "null"], "1", false, "easel resizes the init image to width x height (`Just resize`, 0)"),
    only("initial_noise_multiplier", I2I, &["1", "null"], "0.5", false, "easel adds noise at multiplier 1"),
    only("latent_mask", I2I, &["null", "\"\""], "\"abc\"", false, "easel uses `mask` at latent size too"),
    only("inpainting_mask_invert", I2I, &["0", "null"], "1", false, "easel repaints the white part of the mask; invert the mask image"),
    only("mask_blur", I2I, &["0", "null"], "4", true, "easel does not blur the mask (send 0)"),
    only("mask_blur_x", I2I, &["0", "null"], "4", true, "easel does not blur the mask (send 0)"),
    only("mask_blur_y", I2I, &["0", "null"], "4", true, "easel does not blur the mask (send 0)"),
    only("inpainting_fill", I2I, &["1", "null"], "0", true, "easel starts the masked area from the original image (`original`, 1)"),
    only("inpaint_full_res", I2I, &["false", "0", "null"], "true", true, "easel inpaints the whole picture (send false)"),
    FieldRule {
        name: "send_images",
        applies: Both,
        rule: Rule::Answer,
    },
    ignored("save_images", Both),
    ignored("do_not_save_samples", Both),
    ignored("do_not_save_grid", Both),
    ignored("subseed", Both),
    ignored("s_tmin", Both),
    ignored("s_tmax", Both),
    ignored("override_settings_restore_afterwards", Both),
    ignored("script_args", Both),
    ignored("force_task_id", Both),
    ignored("comments", Both),
    ignored("refiner_switch_at", Both),
    ignored("denoising_strength", T2I),
    ignored("hr_scale", T2I),
    ignored("hr_upscaler", T2I),
    ignored("hr_second_pass_steps", T2I),
    ignored("hr_resize_x", T2I),
    ignored("hr_resize_y", T2I),
    ignored("hr_checkpoint_name", T2I),
    ignored("hr_sampler_name", T2I),
    ignored("hr_scheduler", T2I),
    ignored("hr_prompt", T2I),
    ignored("hr_negative_prompt", T2I),
    ignored("hr_cfg", T2I),
    ignored("hr_additional_modules", T2I),
    ignored("firstphase_width", T2I),
    ignored("firstphase_height", T2I),
    ignored("image_cfg_scale", I2I),
    ignored("include_init_images", I2I),
    ignored("inpaint_full_res_padding", I2I),
    ignored("mask_round", I2I),
];

/// The settings `GET /sdapi/v1/options` reports besides
/// `sd_model_checkpoint`, at the values easel always runs with; setting
/// one (options or `override_settings`) to another value is refused.
pub const FIXED_OPTIONS: &[(&str, &str)] = &[
    ("samples_format", "\"png\""),
    ("CLIP_stop_at_last_layers", "1"),
    ("eta_ancestral", "1"),
    ("eta_ddim", "0"),
    ("sd_vae", "\"Automatic\""),
    ("face_restoration", "false"),
];

/// Numbers compare by value (`1` equals `1.0`), everything else exactly.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// What a request asks, besides the native request.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The native request (one definition per image).
    pub request: NativeRequest,
    /// The seed of the first image (the one drawn for `seed: -1`).
    pub seed: u64,
    /// `send_images`.
    pub send_images: bool,
    /// Fields outside [`FIELDS`], ignored.
    pub ignored: Vec<String>,
}

/// The request's `sd_model_checkpoint` override, if any (checked later by
/// [`translate`]).
pub fn checkpoint_override(body: &Map<String, Value>) -> Option<String> {
    body.get("override_settings")?
        .get("sd_model_checkpoint")?
        .as_str()
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
}

fn get_f64(body: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| invalid(name, format!("`{v}` is not a number"))),
    }
}

fn get_int(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match get_f64(body, name)? {
        None => Ok(None),
        Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(Some(f as i64)),
        Some(f) => Err(invalid(name, format!("`{f}` is not a whole number"))),
    }
}

fn get_u32(
    body: &Map<String, Value>,
    name: &str,
    min: i64,
    max: i64,
) -> Result<Option<u32>, ApiError> {
    match get_int(body, name)? {
        None => Ok(None),
        Some(i) if (min..=max).contains(&i) => Ok(Some(i as u32)),
        Some(i) => Err(invalid(
            name,
            format!("{i} is out of range (allowed: {min} to {max})"),
        )),
    }
}

fn get_str<'a>(body: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(name, format!("`{v}` is not a string"))),
    }
}

fn get_bool(body: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(name, format!("`{v}` is not true or false"))),
    }
}

/// Check `override_settings`: an object whose keys are
/// `sd_model_checkpoint` or one of [`FIXED_OPTIONS`] at its value.
///
/// # Errors
/// 422 naming `override_settings.KEY`.
pub fn check_settings(settings: &Map<String, Value>, field: &str) -> Result<(), ApiError> {
    for (key, value) in settings {
        let at = if field.is_empty() {
            key.clone()
        } else {
            format!("{field}.{key}")
        };
        if key == "sd_model_checkpoint" {
            if !(value.is_string() || value.is_null()) {
                return Err(invalid(&at, format!("`{value}` is not a model title")));
            }
            continue;
        }
        match FIXED_OPTIONS.iter().find(|(k, _)| k == key) {
            Some((_, fixed)) => {
                let fixed: Value = serde_json::from_str(fixed).unwrap_or(Value::Null);
                if !json_equal(value, &fixed) && !value.is_null() {
                    return Err(invalid(
                        &at,
                        format!("easel runs with {key} = {fixed} only; `{value}` is not supported"),
                    ));
                }
            }
            None => {
                let known: Vec<&str> = std::iter::once("sd_model_checkpoint")
                    .chain(FIXED_OPTIONS.iter().map(|(k, _)| *k))
                    .collect();
                return Err(invalid(
                    &at,
                    format!(
                        "`{key}` is not a setting easel has (allowed: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Translate an A1111 `body` for `mode` into a native request on `model`
/// (the model reference already chosen: `override_settings`, the key's
/// options, or `default_model`) whose scheduler family is `family`: one
/// image definition per image (`batch_size × n_iter`, at most
/// `max_images`). `random_seed` is the seed used for `seed: -1`.
///
/// # Errors
/// The first field that is out of range or asks what easel cannot do, as
/// a 422 naming the A1111 field.
pub fn translate(
    body: &Map<String, Value>,
    mode: Mode,
    model: &str,
    family: Option<SchedulerFamily>,
    max_images: u32,
    random_seed: u64,
) -> Result<Translated, ApiError> {
    let has_mask = mode == Mode::Img2Img
        && matches!(body.get("mask"), Some(Value::String(s)) if !s.is_empty());
    // The fields accepted only at neutral values.
    for f in FIELDS.iter().filter(|f| f.applies.to(mode)) {
        if let Rule::Only {
            allowed,
            with_mask,
            why,
            ..
        } = f.rule
        {
            let Some(value) = body.get(f.name) else {
                continue;
            };
            if f.name == "eta" || (with_mask && !has_mask) {
                continue;
            }
            let ok = allowed
                .iter()
                .filter_map(|a| serde_json::from_str::<Value>(a).ok())
                .any(|a| json_equal(value, &a));
            if !ok {
                return Err(invalid(
                    f.name,
                    format!(
                        "{} = {value} is not supported: {why} (allowed: {})",
                        f.name,
                        allowed.join(", ")
                    ),
                ));
            }
        }
    }
    if let Some(v) = body.get("override_settings") {
        match v {
            Value::Null => {}
            Value::Object(settings) => check_settings(settings, "override_settings")?,
            other => {
                return Err(invalid(
                    "override_settings",
                    format!("`{other}` is not an object"),
                ))
            }
        }
    }
    let prompt = get_str(body, "prompt")?.unwrap_or_default();
    let (prompt, tags) = lora_tags(prompt)?;
    let negative = get_str(body, "negative_prompt")?
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let steps = get_u32(body, "steps", 1, i64::from(u32::MAX))?.unwrap_or(50);
    let cfg = get_f64(body, "cfg_scale")?.unwrap_or(7.0);
    let width = get_u32(body, "width", 1, 1 << 20)?.unwrap_or(512);
    let height = get_u32(body, "height", 1, 1 << 20)?.unwrap_or(512);
    // The web UI's form limits: batch size 1..8, batch count 1..100.
    let batch_size = get_u32(body, "batch_size", 1, 8)?.unwrap_or(1);
    let n_iter = get_u32(body, "n_iter", 1, 100)?.unwrap_or(1);
    let total = batch_size * n_iter;
    if total > max_images {
        return Err(invalid(
            "n_iter",
            format!("batch_size x n_iter = {total} images; at most {max_images} per request"),
        ));
    }
    let seed = match get_int(body, "seed")? {
        None | Some(-1) => random_seed,
        Some(s) if s >= 0 => s as u64,
        Some(s) => {
            return Err(invalid(
                "seed",
                format!("{s} is out of range (allowed: -1 for random, or 0 and above)"),
            ))
        }
    };
    // `sampler_name` wins over `sampler_index` (as in the web UI); the
    // web UI's default is `Euler`.
    let (sampler, sampler_field) = match get_str(body, "sampler_name")?.filter(|s| !s.is_empty()) {
        Some(s) => (s, "sampler_name"),
        None => (
            get_str(body, "sampler_index")?
                .filter(|s| !s.is_empty())
                .unwrap_or("Euler"),
            "sampler_index",
        ),
    };
    let schedule = get_str(body, "scheduler")?;
    let scheduler = map_sampler(sampler, sampler_field, schedule, family)?;
    if let Some(eta) = get_f64(body, "eta")? {
        let needed = match scheduler {
            "euler_a" => Some(1.0),
            "ddim" => Some(0.0),
            _ => None,
        };
        if let Some(needed) = needed.filter(|n| *n != eta) {
            return Err(invalid(
                "eta",
                format!("eta {eta} is not supported with sampler `{sampler}`: easel runs it at eta {needed} (allowed: {needed} or null)"),
            ));
        }
    }
    let tiling = get_bool(body, "tiling")?;
    let send_images = get_bool(body, "send_images")?.unwrap_or(true);
    let (image, mask, strength) = if mode == Mode::Img2Img {
        let images = match body.get("init_images") {
            Some(Value::Array(a)) => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(other) => {
                return Err(invalid(
                    "init_images",
                    format!("`{other}` is not a list of base64 images"),
                ))
            }
        };
        let image = match images.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => {
                return Err(invalid(
                    "init_images",
                    "give one init image (base64, or a data: URI)",
                ))
            }
            [_] => {
                return Err(invalid(
                    "init_images",
                    "the init image must be a base64 string",
                ))
            }
            more => {
                return Err(invalid(
                    "init_images",
                    format!(
                        "{} init images given; easel takes one per request",
                        more.len()
                    ),
                ))
            }
        };
        let mask = get_str(body, "mask")?
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let strength = get_f64(body, "denoising_strength")?.unwrap_or(0.75);
        if !(0.0..=1.0).contains(&strength) {
            return Err(invalid(
                "denoising_strength",
                format!("{strength} is out of range (allowed: 0 to 1)"),
            ));
        }
        (Some(image), mask, Some(strength))
    } else {
        (None, None, None)
    };
    let loras: Vec<LoraRef> = tags
        .iter()
        .map(|t| LoraRef {
            path: Some(t.name.clone()),
            scale: Some(t.weight),
            ..LoraRef::default()
        })
        .collect();
    let defaults = ImageDefinition {
        prompt: Some(prompt),
        negative_prompt: negative,
        base_model: Some(model.to_string()),
        loras: (!loras.is_empty()).then_some(loras),
        steps: Some(steps),
        width: Some(width),
        height: Some(height),
        guidance_scale: Some(cfg),
        scheduler: Some(scheduler.to_string()),
        image,
        mask,
        strength,
        tiling,
        output_format: Some(OutputFormat::Png),
        ..ImageDefinition::default()
    };
    // One definition per image, billed per image (as the OpenAI routes);
    // image i (0-based, iterations in order) has seed + i, as in the web UI.
    let images = (0..u64::from(total))
        .map(|i| ImageDefinition {
            seed: Some(seed.wrapping_add(i)),
            ..ImageDefinition::default()
        })
        .collect();
    let known = |name: &str| FIELDS.iter().any(|f| f.name == name && f.applies.to(mode));
    let ignored = body.keys().filter(|k| !known(k)).cloned().collect();
    Ok(Translated {
        request: NativeRequest {
            defaults,
            images,
            ..NativeRequest::default()
        },
        seed,
        send_images,
        ignored,
    })
}

/// The A1111 field for a native field path (`images[0].guidanceScale` ->
/// `cfg_scale`).
pub fn a1111_field(native: &str) -> String {
    let name = native.rsplit('.').next().unwrap_or(native);
    let name = name.split('[').next().unwrap_or(name);
    match name {
        "guidanceScale" => "cfg_scale",
        "negativePrompt" => "negative_prompt",
        "batchSize" => "batch_size",
        "scheduler" => "sampler_name",
        "image" => "init_images",
        "strength" => "denoising_strength",
        "baseModel" => "override_settings.sd_model_checkpoint",
        "loras" | "path" | "prompt" => "prompt",
        "images" => "n_iter",
        "width" => "width",
        "height" => "height",
        "steps" => "steps",
        "seed" => "seed",
        "mask" => "mask",
        "tiling" => "tiling",
        _ => return native.to_string(),
    }
    .to_string()
}

/// An error of the native checks with its field renamed to the A1111 one;
/// a field error is a 422 (FastAPI's validation status).
pub fn rename_field(mut e: ApiError) -> ApiError {
    if let Some(f) = e.field.take() {
        e.field = Some(a1111_field(&f));
        if e.status == StatusCode::BAD_REQUEST {
            e.status = StatusCode::UNPROCESSABLE_ENTITY;
        }
    }
    e
}
