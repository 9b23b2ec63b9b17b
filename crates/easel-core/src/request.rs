//! The native request: a list of image definitions with request-wide
//! defaults that each definition may override (`DESIGN.md`, "What a request
//! must mean").
//!
//! ```json
//! {
//!   "baseModel": "stable-diffusion-v1-5/stable-diffusion-v1-5",
//!   "steps": 20,
//!   "images": [
//!     {"prompt": "an astronaut riding a horse on mars"},
//!     {"prompt": "a portrait in a sunlit garden", "width": 768, "seed": 7}
//!   ]
//! }
//! ```
//!
//! [`NativeRequest::from_json`] parses a JSON value, reporting the field path
//! of any wrong type or unknown field (`images[2].width`).
//! [`ImageDefinition::merged_over`] applies defaults and
//! [`ImageDefinition::validate`] checks every range that does not depend on
//! what is on disk (the server checks models, trainings and images). Nothing
//! is clamped: a value out of range is an error naming the field and the
//! allowed range.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::params::{GenerationParams, OutputFormat, Precision, ValidateOptions, ValidationError};

/// `scale` (the strength of a `trainingId` LoRA) when none is given.
pub const DEFAULT_LORA_SCALE: f64 = 0.9;
/// Smallest allowed LoRA scale.
pub const LORA_SCALE_MIN: f64 = -1.0;
/// Largest allowed LoRA scale.
pub const LORA_SCALE_MAX: f64 = 3.0;
/// Image-to-image `strength` when none is given.
pub const DEFAULT_STRENGTH: f64 = 0.8;
/// The allowed `megapixels` values.
pub const MEGAPIXELS: [f64; 2] = [1.0, 0.25];
/// The allowed `aspectRatio` values and their size at 1 megapixel (width,
/// height), every side a multiple of 32 so that the 0.25 megapixel size
/// (each side halved) is still a multiple of 16.
pub const ASPECT_RATIOS: [(&str, (u32, u32)); 11] = [
    ("1:1", (1024, 1024)),
    ("16:9", (1344, 768)),
    ("21:9", (1536, 640)),
    ("3:2", (1216, 832)),
    ("2:3", (832, 1216)),
    ("4:5", (896, 1088)),
    ("5:4", (1088, 896)),
    ("3:4", (896, 1152)),
    ("4:3", (1152, 896)),
    ("9:16", (768, 1344)),
    ("9:21", (640, 1536)),
];
/// The webhook event names a request may subscribe to.
pub const WEBHOOK_EVENTS: [&str; 3] = ["start", "progress", "completed"];

/// A LoRA adapter applied on top of the base model: exactly one of `id` (a
/// registered training), `path` (a local `.safetensors` under the server's
/// model roots) or `url`, and its `scale`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoraRef {
    /// A training id (UUID) returned by `POST /v1/trainings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A local `.safetensors` file under one of the server's model roots, or
    /// the file name (with or without `.safetensors`) of a LoRA in a root's
    /// A1111 / ComfyUI `Lora` / `loras` folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An `http(s)` URL of a `.safetensors` file, or a Hugging Face repo id
    /// `org/name` (its `pytorch_lora_weights.safetensors`) or
    /// `org/name/file.safetensors`. The server downloads it once into its
    /// LoRA cache through its outbound fetcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Strength, -1..=3. Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

/// One image definition of the native request, or the request-wide defaults
/// (the same fields at the top level). Every field is optional here; after
/// [`ImageDefinition::merged_over`] a definition must have a `prompt` and a
/// `baseModel`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageDefinition {
    /// What to generate. Required (per image, or as a default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// What to steer away from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// A Hugging Face repo id (`org/name[@revision]`), a model registry name,
    /// or a local path under the server's model roots. Required (per image,
    /// or as a default). `model` is accepted as an alias.
    #[serde(default, alias = "model", skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// A registered LoRA (UUID from `POST /v1/trainings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_id: Option<String>,
    /// Strength of the `trainingId` LoRA, -1..=3. Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// More LoRA adapters, stacked after `trainingId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<LoraRef>>,
    /// Denoising steps, 1..=60. Default: per model family (25; FLUX schnell 4).
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub steps: Option<u32>,
    /// Width in pixels, a multiple of 8 (16 for FLUX), 8..=2048. Default: the
    /// model's native size.
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 8 (16 for FLUX), 8..=2048. Default: the
    /// model's native size.
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub height: Option<u32>,
    /// Instead of width/height: `1:1`, `16:9`, `21:9`, `3:2`, `2:3`, `4:5`,
    /// `5:4`, `3:4`, `4:3`, `9:16`, `9:21`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// With `aspectRatio`: 1 or 0.25. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub megapixels: Option<f64>,
    /// Classifier-free guidance scale, 0..=30. Default: per model (7.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// Sampler name (`euler`, `EulerDiscreteScheduler`, `EULER_DISCRETE`, ...).
    /// Default: the model's scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Seed of the first image; image `i` of the batch uses `seed + i`.
    /// Default: random (below 2^32), and always reported.
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub seed: Option<u64>,
    /// Images from this definition, 1..=4. Default 1.
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub batch_size: Option<u32>,
    /// Image-to-image init image: an `http(s)` URL, a `data:` URI, plain
    /// base64, or an asset id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Inpainting mask (white repaints, black keeps), in the same forms as
    /// `image`; needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// Image-to-image: how much of the init image is replaced, 0..=1. Default 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// GPU compute dtype: `fp16` (default) or `bf16`; the CPU computes in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "fp16"))]
    pub precision: Option<Precision>,
    /// `png`, `jpeg` or `webp`. Default webp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "webp"))]
    pub output_format: Option<OutputFormat>,
    /// Quality of jpeg and webp, 1..=100. Default 80.
    #[serde(
        default,
        deserialize_with = "crate::integer::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub output_quality: Option<u32>,
    /// Seamless (tiling) images. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<bool>,
}

/// Pick `a` when set, else `b`.
fn or<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
    a.clone().or_else(|| b.clone())
}

impl ImageDefinition {
    /// This definition with every unset field taken from `defaults`.
    pub fn merged_over(&self, defaults: &ImageDefinition) -> ImageDefinition {
        let d = defaults;
        ImageDefinition {
            prompt: or(&self.prompt, &d.prompt),
            negative_prompt: or(&self.negative_prompt, &d.negative_prompt),
            base_model: or(&self.base_model, &d.base_model),
            training_id: or(&self.training_id, &d.training_id),
            scale: or(&self.scale, &d.scale),
            loras: or(&self.loras, &d.loras),
            // A size given either way overrides the other way's default.
            steps: or(&self.steps, &d.steps),
            width: if self.aspect_ratio.is_some() || self.megapixels.is_some() {
                self.width
            } else {
                or(&self.width, &d.width)
            },
            height: if self.aspect_ratio.is_some() || self.megapixels.is_some() {
                self.height
            } else {
                or(&self.height, &d.height)
            },
            aspect_ratio: if self.width.is_some() || self.height.is_some() {
                self.aspect_ratio.clone()
            } else {
                or(&self.aspect_ratio, &d.aspect_ratio)
            },
            megapixels: if self.width.is_some() || self.height.is_some() {
                self.megapixels
            } else {
                or(&self.megapixels, &d.megapixels)
            },
            guidance_scale: or(&self.guidance_scale, &d.guidance_scale),
            scheduler: or(&self.scheduler, &d.scheduler),
            seed: or(&self.seed, &d.seed),
            batch_size: or(&self.batch_size, &d.batch_size),
            image: or(&self.image, &d.image),
            mask: or(&self.mask, &d.mask),
            strength: or(&self.strength, &d.strength),
            precision: or(&self.precision, &d.precision),
            output_format: or(&self.output_format, &d.output_format),
            output_quality: or(&self.output_quality, &d.output_quality),
            tiling: or(&self.tiling, &d.tiling),
        }
    }

    /// The explicit size: `width`/`height` as given, or the size of
    /// `aspectRatio` at `megapixels`. `(None, None)` leaves the model's
    /// native size.
    ///
    /// # Errors
    /// When both ways are given, or `aspectRatio` / `megapixels` name no
    /// allowed value.
    pub fn explicit_size(&self) -> Result<(Option<u32>, Option<u32>), ValidationError> {
        if self.aspect_ratio.is_none() && self.megapixels.is_none() {
            return Ok((self.width, self.height));
        }
        if self.width.is_some() || self.height.is_some() {
            let field = if self.aspect_ratio.is_some() {
                "aspectRatio"
            } else {
                "megapixels"
            };
            return Err(ValidationError::new(
                field,
                "give either width/height or aspectRatio/megapixels, not both",
            ));
        }
        let ratio = self.aspect_ratio.as_deref().unwrap_or("1:1");
        let Some((_, (w, h))) = ASPECT_RATIOS.iter().find(|(name, _)| *name == ratio.trim()) else {
            let allowed: Vec<&str> = ASPECT_RATIOS.iter().map(|(n, _)| *n).collect();
            return Err(ValidationError::new(
                "aspectRatio",
                format!("`{ratio}` is not allowed (allowed: {})", allowed.join(", ")),
            ));
        };
        let mp = self.megapixels.unwrap_or(1.0);
        if mp == 1.0 {
            Ok((Some(*w), Some(*h)))
        } else if mp == 0.25 {
            Ok((Some(w / 2), Some(h / 2)))
        } else {
            Err(ValidationError::new(
                "megapixels",
                format!("{mp} is not allowed (allowed: 1, 0.25)"),
            ))
        }
    }

    /// The engine parameters of this definition (with the explicit size;
    /// unset fields stay `None` for the model's defaults).
    ///
    /// # Errors
    /// As [`Self::explicit_size`].
    pub fn generation_params(&self) -> Result<GenerationParams, ValidationError> {
        let (width, height) = self.explicit_size()?;
        Ok(GenerationParams {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone(),
            base_model: self.base_model.clone(),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            width,
            height,
            seed: self.seed,
            batch_size: self.batch_size,
            scheduler: self.scheduler.clone(),
            output_format: self.output_format,
            output_quality: self.output_quality,
            precision: self.precision,
        })
    }

    /// Check a merged definition: `prompt` and `baseModel` present, every
    /// range (with `options`' size multiple and field prefix), LoRA scales,
    /// `strength`, `mask` only with `image`. Returns the first problem, in
    /// field order.
    ///
    /// # Errors
    /// A [`ValidationError`] whose field carries `options.field_prefix`.
    pub fn validate(&self, options: &ValidateOptions) -> Result<(), ValidationError> {
        let prefix = options.field_prefix.as_str();
        let err = |field: &str, message: String| {
            Err(ValidationError::new(field, message).with_prefix(prefix))
        };
        if self.prompt.is_none() {
            return err(
                "prompt",
                "missing: every image definition needs a prompt (give it per image or at the top level)"
                    .into(),
            );
        }
        if self.base_model.is_none() {
            return err(
                "baseModel",
                "missing: give a baseModel per image or at the top level".into(),
            );
        }
        let params = self
            .generation_params()
            .map_err(|e| e.with_prefix(prefix))?;
        params.validate_with(options)?;
        if let Some(scale) = self.scale {
            if let Err(m) = check_lora_scale(scale) {
                return err("scale", m);
            }
        }
        if let Some(id) = &self.training_id {
            if id.trim().is_empty() {
                return err(
                    "trainingId",
                    "must not be empty (give a training UUID)".into(),
                );
            }
        }
        for (i, lora) in self.loras.iter().flatten().enumerate() {
            let given = [&lora.id, &lora.path, &lora.url]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if given != 1 {
                return err(
                    &format!("loras[{i}]"),
                    format!("give exactly one of id, path or url (got {given})"),
                );
            }
            for (name, value) in [("id", &lora.id), ("path", &lora.path), ("url", &lora.url)] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    return err(&format!("loras[{i}].{name}"), "must not be empty".into());
                }
            }
            if let Some(scale) = lora.scale {
                if let Err(m) = check_lora_scale(scale) {
                    return err(&format!("loras[{i}].scale"), m);
                }
            }
        }
        if let Some(strength) = self.strength {
            if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
                return err(
                    "strength",
                    format!("{strength} is out of range (allowed: 0 to 1)"),
                );
            }
            // As `easel generate --strength` without `--image`: a strength
            // with nothing to apply it to is a mistake, not a no-op.
            if self.image.is_none() {
                return err(
                    "strength",
                    "applies to image-to-image and inpainting; give `image` too".into(),
                );
            }
        }
        for (name, value) in [("image", &self.image), ("mask", &self.mask)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return err(
                    name,
                    "must not be empty (give a URL, a data URI, base64 or an asset id)".into(),
                );
            }
        }
        if self.mask.is_some() && self.image.is_none() {
            return err(
                "mask",
                "a mask needs an image to inpaint (give `image` too)".into(),
            );
        }
        Ok(())
    }

    /// Check request-wide defaults (the top-level image fields of a
    /// generation request or an inference pack) on their own: every field
    /// that is set must be in its range, even when every image overrides it.
    /// `prompt`, `baseModel` and `image` may be missing here (the images or
    /// a later request give them), so a `strength` or `mask` default is not
    /// refused for want of an `image`.
    ///
    /// # Errors
    /// As [`Self::validate`], with top-level field paths (`batchSize`).
    pub fn validate_defaults(&self, options: &ValidateOptions) -> Result<(), ValidationError> {
        let mut placeholder = self.clone();
        placeholder.prompt.get_or_insert_with(String::new);
        placeholder.base_model.get_or_insert_with(|| "-".into());
        if placeholder.strength.is_some() || placeholder.mask.is_some() {
            placeholder.image.get_or_insert_with(|| "-".into());
        }
        placeholder.validate(options)
    }

    /// The LoRA scale of `trainingId`: `scale`, or [`DEFAULT_LORA_SCALE`].
    pub fn scale_or_default(&self) -> f64 {
        self.scale.unwrap_or(DEFAULT_LORA_SCALE)
    }
}

fn check_lora_scale(scale: f64) -> Result<(), String> {
    if !scale.is_finite() || !(LORA_SCALE_MIN..=LORA_SCALE_MAX).contains(&scale) {
        Err(format!(
            "{scale} is out of range (allowed: {LORA_SCALE_MIN} to {LORA_SCALE_MAX})"
        ))
    } else {
        Ok(())
    }
}

/// What kind of problem a [`RequestError`] is, for a stable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// The body is not JSON, or not a JSON object.
    InvalidJson,
    /// A value of the wrong JSON type (`"width": "big"`).
    InvalidType,
    /// A field the schema does not have (a typo such as `negative_prompt`).
    UnknownField,
    /// A required field is missing.
    MissingField,
    /// A value of the right type outside its range or set.
    InvalidValue,
}

impl RequestErrorKind {
    /// The stable code: `invalid_json`, `invalid_type`, `unknown_field`,
    /// `missing_field` or `invalid_value`.
    pub fn code(self) -> &'static str {
        match self {
            RequestErrorKind::InvalidJson => "invalid_json",
            RequestErrorKind::InvalidType => "invalid_type",
            RequestErrorKind::UnknownField => "unknown_field",
            RequestErrorKind::MissingField => "missing_field",
            RequestErrorKind::InvalidValue => "invalid_value",
        }
    }
}

/// A request that cannot be parsed or is invalid: its kind, the field path
/// (empty for the whole body) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// What kind of problem it is.
    pub kind: RequestErrorKind,
    /// The field path, e.g. `images[2].width`; empty for the whole body.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for RequestError {}

impl From<ValidationError> for RequestError {
    fn from(e: ValidationError) -> Self {
        let kind = if e.message.starts_with("missing") {
            RequestErrorKind::MissingField
        } else {
            RequestErrorKind::InvalidValue
        };
        RequestError {
            kind,
            field: e.field,
            message: e.message,
        }
    }
}

impl RequestError {
    /// An [`RequestErrorKind::InvalidValue`] error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RequestError {
            kind: RequestErrorKind::InvalidValue,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Deserialize `value` as `T`, turning serde's error into a [`RequestError`]
/// whose field path is `prefix` joined with the path inside `value`
/// (`images[2].width`; an unknown field's own name is put on the path).
pub fn from_json_at<T: DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let message = e.inner().to_string();
        let mut field = join_path(prefix, if inner == "." { "" } else { &inner });
        let kind = if message.starts_with("invalid type") {
            RequestErrorKind::InvalidType
        } else if message.starts_with("unknown field") || message.starts_with("missing field") {
            // Put the field's own name on the path when serde did not.
            if let Some(name) = message.split('`').nth(1) {
                if field.rsplit('.').next() != Some(name) {
                    field = join_path(&field, name);
                }
            }
            if message.starts_with("unknown field") {
                RequestErrorKind::UnknownField
            } else {
                RequestErrorKind::MissingField
            }
        } else {
            RequestErrorKind::InvalidValue
        };
        // serde's messages carry no position once the input is a Value.
        RequestError {
            kind,
            field,
            message,
        }
    })
}

fn join_path(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if inner.starts_with('[') => format!("{prefix}{inner}"),
        (false, false) => format!("{prefix}.{inner}"),
    }
}

/// The native generation request (`POST /v1/generations`): image
/// definitions, request-wide defaults (every [`ImageDefinition`] field at the
/// top level), an optional inference pack merged in first, and webhook
/// settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NativeRequest {
    /// The request-wide defaults.
    #[serde(flatten)]
    pub defaults: ImageDefinition,
    /// The image definitions (at least one, unless an inference pack gives some).
    pub images: Vec<ImageDefinition>,
    /// An inference pack whose definitions run before `images`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_pack_id: Option<String>,
    /// An `http(s)` URL to POST events to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Which events to send: `start`, `progress`, `completed` (default: completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_events: Option<Vec<String>>,
}

/// The top-level fields of [`NativeRequest`] that are not image fields.
const REQUEST_FIELDS: [&str; 4] = ["images", "inferencePackId", "webhook", "webhookEvents"];

impl NativeRequest {
    /// Parse a request body. `images` may be absent only with an
    /// `inferencePackId`; `webhookEvents` must name known events.
    ///
    /// # Errors
    /// A [`RequestError`] with the field path of the first problem.
    pub fn from_json(value: serde_json::Value) -> Result<Self, RequestError> {
        Self::parse(value, &REQUEST_FIELDS)
    }

    /// Parse the body of an inference pack: image definitions and defaults,
    /// no `inferencePackId` or webhook.
    ///
    /// # Errors
    /// A [`RequestError`] with the field path of the first problem.
    pub fn pack_from_json(value: serde_json::Value) -> Result<Self, RequestError> {
        Self::parse(value, &["images"])
    }

    fn parse(value: serde_json::Value, own_fields: &[&str]) -> Result<Self, RequestError> {
        let serde_json::Value::Object(mut map) = value else {
            return Err(RequestError {
                kind: RequestErrorKind::InvalidJson,
                field: String::new(),
                message: "the body must be a JSON object".into(),
            });
        };
        let mut take = |name: &str| {
            if own_fields.contains(&name) {
                map.remove(name)
            } else {
                None
            }
        };
        let images_value = take("images");
        let pack_value = take("inferencePackId");
        let webhook_value = take("webhook");
        let events_value = take("webhookEvents");
        let inference_pack_id: Option<String> = match pack_value {
            Some(v) => from_json_at(v, "inferencePackId")?,
            None => None,
        };
        let images: Vec<ImageDefinition> = match images_value {
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    // serde would read a struct from an array too (`[null, null]`).
                    if !item.is_object() {
                        return Err(RequestError {
                            kind: RequestErrorKind::InvalidType,
                            field: format!("images[{i}]"),
                            message: format!(
                                "invalid type: {}, expected an image definition object",
                                json_type(&item)
                            ),
                        });
                    }
                    from_json_at(item, &format!("images[{i}]"))
                })
                .collect::<Result<_, _>>()?,
            Some(serde_json::Value::Null) | None => Vec::new(),
            Some(other) => {
                return Err(RequestError {
                    kind: RequestErrorKind::InvalidType,
                    field: "images".into(),
                    message: format!(
                        "invalid type: {}, expected an array of image definitions",
                        json_type(&other)
                    ),
                })
            }
        };
        let defaults: ImageDefinition = from_json_at(serde_json::Value::Object(map), "")?;
        let webhook: Option<String> = match webhook_value {
            Some(v) => from_json_at(v, "webhook")?,
            None => None,
        };
        let webhook_events: Option<Vec<String>> = match events_value {
            Some(v) => from_json_at(v, "webhookEvents")?,
            None => None,
        };
        for (i, event) in webhook_events.iter().flatten().enumerate() {
            if !WEBHOOK_EVENTS.contains(&event.as_str()) {
                return Err(RequestError::invalid(
                    format!("webhookEvents[{i}]"),
                    format!(
                        "unknown event `{event}` (allowed: {})",
                        WEBHOOK_EVENTS.join(", ")
                    ),
                ));
            }
        }
        if images.is_empty() && inference_pack_id.is_none() {
            return Err(RequestError {
                kind: RequestErrorKind::MissingField,
                field: "images".into(),
                message: "give at least one image definition (or an inferencePackId)".into(),
            });
        }
        Ok(NativeRequest {
            defaults,
            images,
            inference_pack_id,
            webhook,
            webhook_events,
        })
    }

    /// The request's own definitions merged over its defaults, each with
    /// its field prefix (`images[i]`).
    pub fn merged_images(&self) -> Vec<(String, ImageDefinition)> {
        self.images
            .iter()
            .enumerate()
            .map(|(i, image)| (format!("images[{i}]"), image.merged_over(&self.defaults)))
            .collect()
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<NativeRequest, RequestError> {
        NativeRequest::from_json(v)
    }

    #[test]
    fn an_image_definition_must_be_an_object_not_an_array() {
        let e = parse(json!({"prompt": "a", "images": [[null, null]]})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::InvalidType, "images[0]")
        );
    }

    #[test]
    fn seed_shape_merges_global_defaults_with_per_image_overrides() {
        let request = parse(json!({
            "trainingId": "4716c93e-03bc-49cf-921d-203971fe5866",
            "baseModel": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "steps": 20,
            "images": [
                {"prompt": "an astronaut", "negativePrompt": "blurry", "width": 768, "height": 768},
                {"prompt": "a garden", "baseModel": "Realistic_Vision_V6.0_B1", "steps": 30},
            ]
        }))
        .unwrap();
        let merged = request.merged_images();
        assert_eq!(merged[0].0, "images[0]");
        let a = &merged[0].1;
        assert_eq!(
            a.base_model.as_deref(),
            Some("stable-diffusion-v1-5/stable-diffusion-v1-5")
        );
        assert_eq!((a.steps, a.width), (Some(20), Some(768)));
        assert_eq!(a.scale_or_default(), 0.9);
        let b = &merged[1].1;
        assert_eq!(b.base_model.as_deref(), Some("Realistic_Vision_V6.0_B1"));
        assert_eq!(b.steps, Some(30));
        assert_eq!(b.training_id, a.training_id);
        assert_eq!(b.negative_prompt, None);
        for (prefix, def) in &merged {
            def.validate(&ValidateOptions::default().field_prefix(prefix.clone()))
                .unwrap();
        }
    }

    #[test]
    fn wrong_types_and_unknown_fields_name_their_path() {
        let e = parse(json!({"images": [{"prompt": "a"}, {"prompt": "b", "width": "wide"}]}))
            .unwrap_err();
        assert_eq!(e.kind, RequestErrorKind::InvalidType);
        assert_eq!(e.field, "images[1].width");
        let e = parse(json!({"images": [{"prompt": "a", "negative_prompt": "x"}]})).unwrap_err();
        assert_eq!(e.kind, RequestErrorKind::UnknownField);
        assert_eq!(e.field, "images[0].negative_prompt");
        let e = parse(json!({"images": [{"prompt": "a"}], "stepz": 3})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::UnknownField, "stepz")
        );
        let e = parse(json!({"images": [{"prompt": "a", "loras": [{"id": "x", "scale": "hi"}]}]}))
            .unwrap_err();
        assert_eq!(e.field, "images[0].loras[0].scale");
        let e = parse(json!({"images": {"prompt": "a"}})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::InvalidType, "images")
        );
        let e = parse(json!({"baseModel": "m"})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::MissingField, "images")
        );
        let e = parse(json!([1, 2])).unwrap_err();
        assert_eq!(e.kind, RequestErrorKind::InvalidJson);
        let e = parse(json!({"images": [{"prompt": "a"}], "webhookEvents": ["done"]})).unwrap_err();
        assert_eq!(e.field, "webhookEvents[0]");
        let e = parse(json!({"images": [{"prompt": "a", "outputFormat": "gif"}]})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::InvalidValue, "images[0].outputFormat")
        );
        let e = parse(json!({"images": [{"prompt": "a", "seed": -1}]})).unwrap_err();
        assert_eq!(e.field, "images[0].seed");
    }

    #[test]
    fn out_of_range_values_name_the_field_and_range() {
        let request = parse(json!({
            "baseModel": "m",
            "images": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "width": 1001}]
        }))
        .unwrap();
        let (prefix, def) = &request.merged_images()[2];
        let e = def
            .validate(&ValidateOptions::default().field_prefix(prefix.clone()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "images[2].width: 1001 is not a multiple of 8 (allowed: multiples of 8 from 8 to 2048)"
        );
        let check = |def: serde_json::Value| {
            let mut def: ImageDefinition = serde_json::from_value(def).unwrap();
            def.base_model = Some("m".into());
            def.validate(&ValidateOptions::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            check(json!({"prompt": "a", "scale": 3.5})),
            "scale: 3.5 is out of range (allowed: -1 to 3)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "strength": 1.5})),
            "strength: 1.5 is out of range (allowed: 0 to 1)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "loras": [{"id": "x"}, {"id": "y", "path": "z"}]})),
            "loras[1]: give exactly one of id, path or url (got 2)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "mask": "abc"})),
            "mask: a mask needs an image to inpaint (give `image` too)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "aspectRatio": "7:5"})),
            "aspectRatio: `7:5` is not allowed (allowed: 1:1, 16:9, 21:9, 3:2, 2:3, 4:5, 5:4, 3:4, 4:3, 9:16, 9:21)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "aspectRatio": "1:1", "megapixels": 2})),
            "megapixels: 2 is not allowed (allowed: 1, 0.25)"
        );
        assert_eq!(
            check(json!({"prompt": "a", "aspectRatio": "1:1", "width": 512})),
            "aspectRatio: give either width/height or aspectRatio/megapixels, not both"
        );
        assert_eq!(
            check(json!({"batchSize": 9, "prompt": "a"})),
            "batchSize: 9 is out of range (allowed: 1 to 4)"
        );
        let missing: ImageDefinition = serde_json::from_value(json!({"baseModel": "m"})).unwrap();
        let e = missing
            .validate(&ValidateOptions::default().field_prefix("images[0]"))
            .unwrap_err();
        assert_eq!(e.field, "images[0].prompt");
        assert_eq!(RequestError::from(e).kind, RequestErrorKind::MissingField);
    }

    #[test]
    fn aspect_ratio_sizes_fit_flux_multiples() {
        for (name, (w, h)) in ASPECT_RATIOS {
            for mp in MEGAPIXELS {
                let def = ImageDefinition {
                    aspect_ratio: Some(name.into()),
                    megapixels: Some(mp),
                    ..Default::default()
                };
                let (Some(sw), Some(sh)) = def.explicit_size().unwrap() else {
                    panic!("no size for {name}")
                };
                assert_eq!(sw % 16, 0, "{name} {mp}");
                assert_eq!(sh % 16, 0, "{name} {mp}");
                let area = f64::from(sw) * f64::from(sh) / 1e6;
                assert!((area / mp - 1.0).abs() < 0.1, "{name} {mp}: {area}");
                if mp == 1.0 {
                    assert_eq!((sw, sh), (w, h));
                }
            }
        }
    }

    #[test]
    fn per_image_size_overrides_a_global_aspect_ratio() {
        let request = parse(json!({
            "baseModel": "m", "aspectRatio": "16:9",
            "images": [{"prompt": "a"}, {"prompt": "b", "width": 64, "height": 64}]
        }))
        .unwrap();
        let merged = request.merged_images();
        assert_eq!(
            merged[0].1.explicit_size().unwrap(),
            (Some(1344), Some(768))
        );
        assert_eq!(merged[1].1.explicit_size().unwrap(), (Some(64), Some(64)));
    }

    #[test]
    fn packs_accept_no_webhook() {
        let e = NativeRequest::pack_from_json(json!({"images": [{"prompt": "a"}], "webhook": "x"}))
            .unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (RequestErrorKind::UnknownField, "webhook")
        );
        let pack = NativeRequest::pack_from_json(json!({"steps": 3, "images": [{"prompt": "a"}]}))
            .unwrap();
        assert_eq!(pack.defaults.steps, Some(3));
    }
}
