//! The per-image generation parameters the engine runs, and their validation.
//!
//! [`GenerationParams`] mirrors one image definition of the native request
//! (field names are the camelCase JSON names of `DESIGN.md`). A field left as
//! `None` means "use the default": the model family's default for `steps`,
//! `guidanceScale`, `width`, `height` and `scheduler` (the engine knows those),
//! and the constants of this module for the rest.
//!
//! [`GenerationParams::validate`] never clamps: a value out of range is a
//! [`ValidationError`] that names the field path and the allowed range, e.g.
//! `width: 1001 is not a multiple of 8 (allowed: multiples of 8 from 8 to 2048)`.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Allowed denoising steps.
pub const STEPS_RANGE: RangeInclusive<u32> = 1..=60;
/// Smallest allowed width or height, in pixels (raised to the size multiple
/// when that is larger, e.g. 16 for FLUX).
pub const SIZE_MIN: u32 = 8;
/// Largest allowed width or height, in pixels.
pub const SIZE_MAX: u32 = 2048;
/// Width and height must be multiples of this for Stable Diffusion models
/// (the VAE downsamples by 8).
pub const DEFAULT_SIZE_MULTIPLE: u32 = 8;
/// Width and height must be multiples of this for FLUX models (VAE factor 8
/// times 2x2 latent patches).
pub const FLUX_SIZE_MULTIPLE: u32 = 16;
/// Largest allowed `guidanceScale` (the smallest is 0). FLUX Fill works at 30.
pub const GUIDANCE_SCALE_MAX: f64 = 30.0;
/// Longest `prompt` and `negativePrompt`, in characters (Unicode scalar
/// values). Far past what the text encoders read (CLIP 77 tokens, T5 at most
/// 512), and low enough that both prompts always fit the 64 KiB EXIF segment
/// that carries the `parameters` text in JPEG (4 UTF-16 bytes a character at
/// worst).
pub const PROMPT_MAX_CHARS: usize = 6000;
/// Allowed images per definition.
pub const BATCH_SIZE_RANGE: RangeInclusive<u32> = 1..=4;
/// Allowed `outputQuality` for the lossy formats.
pub const OUTPUT_QUALITY_RANGE: RangeInclusive<u32> = 1..=100;
/// `outputFormat` when none is given.
pub const DEFAULT_OUTPUT_FORMAT: OutputFormat = OutputFormat::Webp;
/// `outputQuality` when none is given.
pub const DEFAULT_OUTPUT_QUALITY: u8 = 80;
/// `precision` when none is given.
pub const DEFAULT_PRECISION: Precision = Precision::Fp16;
/// `batchSize` when none is given.
pub const DEFAULT_BATCH_SIZE: u32 = 1;

/// An invalid parameter: the field path (e.g. `width` or `images[2].width`)
/// and what is wrong with it, including the allowed range.
///
/// Displays as `"{field}: {message}"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Field path, using the JSON (camelCase) names: `steps`, `images[2].width`.
    pub field: String,
    /// What is wrong and what is allowed, e.g. `0 is out of range (allowed: 1 to 60)`.
    pub message: String,
}

impl ValidationError {
    /// A new error for `field` (a path without any prefix) with `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error with `prefix` put before the field path:
    /// `width` with prefix `images[2]` becomes `images[2].width`.
    /// An empty prefix leaves the path unchanged.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.field = format!("{prefix}.{}", self.field);
        }
        self
    }
}

/// A string that names no variant of an enum parameter, e.g. `outputFormat: "gif"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}` (allowed: {allowed})")]
pub struct ParseEnumError {
    /// What was being parsed, e.g. `output format`.
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted spellings, comma separated.
    pub allowed: &'static str,
}

/// The encoded file format of generated images.
///
/// Parses case-insensitively from `png`, `jpeg` (or `jpg`) and `webp`; serializes
/// as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Lossless PNG, with the generation parameters embedded as text chunks.
    Png,
    /// Lossy JPEG (baseline), quality 1..=100.
    Jpeg,
    /// Lossy WebP (libwebp), quality 1..=100.
    Webp,
}

impl OutputFormat {
    /// All formats, in the order they are listed in messages.
    pub const ALL: [OutputFormat; 3] = [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp];

    /// The canonical name: `png`, `jpeg` or `webp`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The file extension to write, without the dot: `png`, `jpg` or `webp`.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The MIME type: `image/png`, `image/jpeg` or `image/webp`.
    pub fn mime_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// The format for a file extension (without the dot, case-insensitive):
    /// `png`, `jpg`, `jpeg`, `webp`. `None` for any other extension.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "png" => Some(OutputFormat::Png),
            "jpg" | "jpeg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    /// Whether the format is lossy, i.e. whether `outputQuality` applies.
    pub fn is_lossy(self) -> bool {
        !matches!(self, OutputFormat::Png)
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutputFormat {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutputFormat::from_extension(s.trim()).ok_or_else(|| ParseEnumError {
            what: "output format",
            value: s.to_string(),
            allowed: "png, jpeg, jpg, webp",
        })
    }
}

/// The compute dtype on the GPU. CPU always computes in f32 (and says so).
///
/// Parses case-insensitively from `fp16`, `bf16` and `fp32`; serializes as
/// the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// Single precision.
    Fp32,
}

impl Precision {
    /// The canonical name: `fp16`, `bf16` or `fp32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Fp32 => "fp32",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp16" => Ok(Precision::Fp16),
            "bf16" => Ok(Precision::Bf16),
            "fp32" => Ok(Precision::Fp32),
            _ => Err(ParseEnumError {
                what: "precision",
                value: s.to_string(),
                allowed: "fp16, bf16, fp32",
            }),
        }
    }
}

/// Serialize and deserialize an enum through its `as_str` / `FromStr`, so that
/// JSON accepts the same spellings as the CLI and the error lists them.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<str>::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(OutputFormat);
serde_via_str!(Precision);

/// Options for [`GenerationParams::validate_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidateOptions {
    /// Width and height must be multiples of this (8 for Stable Diffusion,
    /// 16 for FLUX). 0 is treated as 1.
    pub size_multiple: u32,
    /// Put before every field path in errors, e.g. `images[2]` gives
    /// `images[2].width`. Empty for none.
    pub field_prefix: String,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self {
            size_multiple: DEFAULT_SIZE_MULTIPLE,
            field_prefix: String::new(),
        }
    }
}

impl ValidateOptions {
    /// These options with width and height required to be multiples of `multiple`.
    pub fn size_multiple(mut self, multiple: u32) -> Self {
        self.size_multiple = multiple;
        self
    }

    /// These options with `prefix` put before every field path in errors.
    pub fn field_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.field_prefix = prefix.into();
        self
    }
}

/// The parameters of one image definition (one billed inference, producing
/// `batchSize` images), as the engine runs them.
///
/// JSON names are camelCase (`negativePrompt`, `guidanceScale`, ...). The model
/// reference is `baseModel` (`model` is accepted too). `None` means "use the
/// default" (see the module docs). Unknown JSON fields are ignored here; the
/// request layers that embed this struct decide whether to reject them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationParams {
    /// The text to generate from. Required in JSON, but may be empty: an
    /// empty prompt is legal (diffusers generates an unconditional image).
    pub prompt: String,
    /// What to steer away from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// The model: a Hugging Face repo id, a registry name or a local path.
    /// `None` when the caller supplies it elsewhere (a request-wide default,
    /// the CLI's default model).
    #[serde(
        default,
        rename = "baseModel",
        alias = "model",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_model: Option<String>,
    /// Denoising steps, 1..=60. Default: per model family (25; FLUX schnell 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (or FLUX's guidance embedding), finite,
    /// 0..=30. Default: per model (7.5; FLUX dev 3.5; FLUX schnell 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// Width in pixels, a multiple of 8 (16 for FLUX) in 8..=2048.
    /// Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 8 (16 for FLUX) in 8..=2048.
    /// Default: the model's native size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Seed of image 0; image `i` of the batch uses `seed + i` (wrapping).
    /// Default: random, and the seed used is always reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Images from this definition, 1..=4. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Sampler name (diffusers class name, short name or hosted-API enum;
    /// the engine resolves it). Default: the model's scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Encoded file format. Default webp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<OutputFormat>,
    /// Quality of the lossy formats, 1..=100 (ignored for PNG). Default 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_quality: Option<u32>,
    /// GPU compute dtype. Default fp16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl GenerationParams {
    /// Parameters with this prompt and every other field left to its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// Validate with the default options (sizes multiples of 8, no field
    /// prefix). Returns the first problem found; see [`Self::validate_with`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_with(&ValidateOptions::default())
    }

    /// Validate with `options`. Returns the first problem found, in field
    /// order; [`Self::validation_errors`] returns all of them.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the field path and the allowed range.
    pub fn validate_with(&self, options: &ValidateOptions) -> Result<(), ValidationError> {
        match self.validation_errors(options).into_iter().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Every problem with these parameters, in field order (empty when valid).
    pub fn validation_errors(&self, options: &ValidateOptions) -> Vec<ValidationError> {
        let mut errors = Vec::new();
        let mut check = |field: &str, result: Result<(), String>| {
            if let Err(message) = result {
                errors
                    .push(ValidationError::new(field, message).with_prefix(&options.field_prefix));
            }
        };

        if let Some(model) = &self.base_model {
            check(
                "baseModel",
                not_blank(
                    model,
                    "a Hugging Face repo id, a model registry name or a local path",
                ),
            );
        }
        for (field, text) in [
            ("prompt", Some(&self.prompt)),
            ("negativePrompt", self.negative_prompt.as_ref()),
        ] {
            let chars = text.map_or(0, |t| t.chars().count());
            if chars > PROMPT_MAX_CHARS {
                check(
                    field,
                    Err(format!(
                        "{chars} characters is too long (at most {PROMPT_MAX_CHARS}; \
                         the text encoders read far less)"
                    )),
                );
            }
        }
        if let Some(steps) = self.steps {
            check("steps", in_range(steps, &STEPS_RANGE));
        }
        if let Some(scale) = self.guidance_scale {
            check("guidanceScale", check_guidance_scale(scale));
        }
        if let Some(width) = self.width {
            check("width", check_size(width, options.size_multiple));
        }
        if let Some(height) = self.height {
            check("height", check_size(height, options.size_multiple));
        }
        if let Some(batch_size) = self.batch_size {
            check("batchSize", in_range(batch_size, &BATCH_SIZE_RANGE));
        }
        if let Some(scheduler) = &self.scheduler {
            check(
                "scheduler",
                not_blank(
                    scheduler,
                    "a sampler name, or leave it out for the model's default",
                ),
            );
        }
        if let Some(quality) = self.output_quality {
            check("outputQuality", in_range(quality, &OUTPUT_QUALITY_RANGE));
        }
        errors
    }

    /// `outputFormat`, or [`DEFAULT_OUTPUT_FORMAT`] (webp).
    pub fn output_format_or_default(&self) -> OutputFormat {
        self.output_format.unwrap_or(DEFAULT_OUTPUT_FORMAT)
    }

    /// `outputQuality`, or [`DEFAULT_OUTPUT_QUALITY`] (80), as the `u8` the
    /// encoders take.
    ///
    /// # Errors
    /// An `outputQuality` [`ValidationError`] when the value is outside 1..=100.
    pub fn output_quality_or_default(&self) -> Result<u8, ValidationError> {
        match self.output_quality {
            None => Ok(DEFAULT_OUTPUT_QUALITY),
            Some(q) => in_range(q, &OUTPUT_QUALITY_RANGE)
                .and_then(|()| u8::try_from(q).map_err(|e| e.to_string()))
                .map_err(|message| ValidationError::new("outputQuality", message)),
        }
    }

    /// `precision`, or [`DEFAULT_PRECISION`] (fp16).
    pub fn precision_or_default(&self) -> Precision {
        self.precision.unwrap_or(DEFAULT_PRECISION)
    }

    /// `batchSize`, or [`DEFAULT_BATCH_SIZE`] (1).
    pub fn batch_size_or_default(&self) -> u32 {
        self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)
    }
}

fn in_range(value: u32, range: &RangeInclusive<u32>) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{value} is out of range (allowed: {} to {})",
            range.start(),
            range.end()
        ))
    }
}

fn check_guidance_scale(scale: f64) -> Result<(), String> {
    let allowed = format!("(allowed: 0 to {GUIDANCE_SCALE_MAX})");
    if !scale.is_finite() {
        Err(format!("{scale} is not a finite number {allowed}"))
    } else if !(0.0..=GUIDANCE_SCALE_MAX).contains(&scale) {
        Err(format!("{scale} is out of range {allowed}"))
    } else {
        Ok(())
    }
}

/// Width/height: a multiple of `multiple` from `max(SIZE_MIN, multiple)` to
/// `SIZE_MAX` rounded down to a multiple.
fn check_size(value: u32, multiple: u32) -> Result<(), String> {
    let multiple = multiple.max(1);
    let min = SIZE_MIN.div_ceil(multiple) * multiple;
    let max = SIZE_MAX / multiple * multiple;
    let allowed = format!("(allowed: multiples of {multiple} from {min} to {max})");
    if !(min..=max).contains(&value) {
        Err(format!("{value} is out of range {allowed}"))
    } else if !value.is_multiple_of(multiple) {
        Err(format!("{value} is not a multiple of {multiple} {allowed}"))
    } else {
        Ok(())
    }
}

fn not_blank(value: &str, expected: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err(format!("must not be empty (give {expected})"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> GenerationParams {
        GenerationParams {
            prompt: "a lighthouse at dusk".into(),
            negative_prompt: Some("blurry".into()),
            base_model: Some("stable-diffusion-v1-5/stable-diffusion-v1-5".into()),
            steps: Some(25),
            guidance_scale: Some(7.5),
            width: Some(512),
            height: Some(768),
            seed: Some(u64::MAX),
            batch_size: Some(4),
            scheduler: Some("euler_a".into()),
            output_format: Some(OutputFormat::Jpeg),
            output_quality: Some(90),
            precision: Some(Precision::Bf16),
        }
    }

    fn error_of(params: &GenerationParams) -> String {
        params.validate().unwrap_err().to_string()
    }

    #[test]
    fn good_params_pass() {
        assert_eq!(valid().validate(), Ok(()));
        assert_eq!(GenerationParams::new("").validate(), Ok(()));
        let edges = GenerationParams {
            steps: Some(1),
            guidance_scale: Some(0.0),
            width: Some(8),
            height: Some(2048),
            batch_size: Some(1),
            output_quality: Some(1),
            seed: Some(0),
            ..valid()
        };
        assert_eq!(edges.validate(), Ok(()));
        let edges = GenerationParams {
            steps: Some(60),
            guidance_scale: Some(30.0),
            output_quality: Some(100),
            ..valid()
        };
        assert_eq!(edges.validate(), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named_with_its_range() {
        let cases: Vec<(GenerationParams, &str)> = vec![
            (
                GenerationParams { steps: Some(0), ..valid() },
                "steps: 0 is out of range (allowed: 1 to 60)",
            ),
            (
                GenerationParams { steps: Some(61), ..valid() },
                "steps: 61 is out of range (allowed: 1 to 60)",
            ),
            (
                GenerationParams { width: Some(1001), ..valid() },
                "width: 1001 is not a multiple of 8 (allowed: multiples of 8 from 8 to 2048)",
            ),
            (
                GenerationParams { width: Some(0), ..valid() },
                "width: 0 is out of range (allowed: multiples of 8 from 8 to 2048)",
            ),
            (
                GenerationParams { height: Some(4096), ..valid() },
                "height: 4096 is out of range (allowed: multiples of 8 from 8 to 2048)",
            ),
            (
                GenerationParams { guidance_scale: Some(30.5), ..valid() },
                "guidanceScale: 30.5 is out of range (allowed: 0 to 30)",
            ),
            (
                GenerationParams { guidance_scale: Some(-1.0), ..valid() },
                "guidanceScale: -1 is out of range (allowed: 0 to 30)",
            ),
            (
                GenerationParams { guidance_scale: Some(f64::NAN), ..valid() },
                "guidanceScale: NaN is not a finite number (allowed: 0 to 30)",
            ),
            (
                GenerationParams { guidance_scale: Some(f64::INFINITY), ..valid() },
                "guidanceScale: inf is not a finite number (allowed: 0 to 30)",
            ),
            (
                GenerationParams { batch_size: Some(0), ..valid() },
                "batchSize: 0 is out of range (allowed: 1 to 4)",
            ),
            (
                GenerationParams { batch_size: Some(5), ..valid() },
                "batchSize: 5 is out of range (allowed: 1 to 4)",
            ),
            (
                GenerationParams { output_quality: Some(0), ..valid() },
                "outputQuality: 0 is out of range (allowed: 1 to 100)",
            ),
            (
                GenerationParams { output_quality: Some(101), ..valid() },
                "outputQuality: 101 is out of range (allowed: 1 to 100)",
            ),
            (
                GenerationParams { base_model: Some("  ".into()), ..valid() },
                "baseModel: must not be empty (give a Hugging Face repo id, a model registry name or a local path)",
            ),
            (
                GenerationParams { scheduler: Some(String::new()), ..valid() },
                "scheduler: must not be empty (give a sampler name, or leave it out for the model's default)",
            ),
        ];
        for (params, expected) in cases {
            assert_eq!(error_of(&params), expected);
        }
        let error = GenerationParams {
            steps: Some(0),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.field, "steps");
        assert_eq!(error.message, "0 is out of range (allowed: 1 to 60)");
    }

    #[test]
    fn flux_asks_for_multiples_of_16() {
        let flux = ValidateOptions::default().size_multiple(FLUX_SIZE_MULTIPLE);
        let params = GenerationParams {
            width: Some(1000),
            ..valid()
        };
        assert_eq!(params.validate(), Ok(()));
        assert_eq!(
            params.validate_with(&flux).unwrap_err().to_string(),
            "width: 1000 is not a multiple of 16 (allowed: multiples of 16 from 16 to 2048)"
        );
        let params = GenerationParams {
            height: Some(8),
            ..valid()
        };
        assert_eq!(
            params.validate_with(&flux).unwrap_err().to_string(),
            "height: 8 is out of range (allowed: multiples of 16 from 16 to 2048)"
        );
        assert_eq!(valid().validate_with(&flux), Ok(()));
    }

    #[test]
    fn field_prefix_is_put_before_every_path() {
        let options = ValidateOptions::default().field_prefix("images[2]");
        let params = GenerationParams {
            width: Some(1001),
            steps: Some(99),
            ..valid()
        };
        assert_eq!(
            params.validate_with(&options).unwrap_err().to_string(),
            "images[2].steps: 99 is out of range (allowed: 1 to 60)"
        );
        let all = params.validation_errors(&options);
        let fields: Vec<&str> = all.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["images[2].steps", "images[2].width"]);
        assert_eq!(
            ValidationError::new("width", "x").with_prefix("").field,
            "width"
        );
    }

    #[test]
    fn prompts_longer_than_the_limit_are_named() {
        let mut params = GenerationParams::new("a".repeat(PROMPT_MAX_CHARS));
        assert!(params.validate_with(&ValidateOptions::default()).is_ok());
        params.negative_prompt = Some("é".repeat(PROMPT_MAX_CHARS + 1));
        let e = params
            .validate_with(&ValidateOptions::default())
            .unwrap_err();
        assert_eq!(e.field, "negativePrompt");
        assert!(e.to_string().contains("at most 6000"), "{e}");
        params.prompt.push('b');
        let e = params
            .validate_with(&ValidateOptions::default())
            .unwrap_err();
        assert_eq!(e.field, "prompt");
    }

    #[test]
    fn json_uses_camel_case_and_requires_prompt() {
        let json = r#"{
            "prompt": "a cat", "negativePrompt": "dog", "baseModel": "sd15",
            "steps": 20, "guidanceScale": 5.5, "width": 640, "height": 480,
            "seed": 18446744073709551615, "batchSize": 2, "scheduler": "ddim",
            "outputFormat": "jpg", "outputQuality": 70, "precision": "BF16"
        }"#;
        let params: GenerationParams = serde_json::from_str(json).unwrap();
        assert_eq!(params.negative_prompt.as_deref(), Some("dog"));
        assert_eq!(params.base_model.as_deref(), Some("sd15"));
        assert_eq!(params.guidance_scale, Some(5.5));
        assert_eq!(params.seed, Some(u64::MAX));
        assert_eq!(params.batch_size, Some(2));
        assert_eq!(params.output_format, Some(OutputFormat::Jpeg));
        assert_eq!(params.precision, Some(Precision::Bf16));

        let back = serde_json::to_value(&params).unwrap();
        assert_eq!(back["outputFormat"], "jpeg");
        assert_eq!(back["precision"], "bf16");
        assert_eq!(back["guidanceScale"], 5.5);
        let again: GenerationParams = serde_json::from_value(back).unwrap();
        assert_eq!(again, params);

        let minimal: GenerationParams = serde_json::from_str(r#"{"prompt": ""}"#).unwrap();
        assert_eq!(minimal, GenerationParams::new(""));
        assert_eq!(serde_json::to_string(&minimal).unwrap(), r#"{"prompt":""}"#);
        let aliased: GenerationParams =
            serde_json::from_str(r#"{"prompt": "x", "model": "m"}"#).unwrap();
        assert_eq!(aliased.base_model.as_deref(), Some("m"));

        let missing = serde_json::from_str::<GenerationParams>(r#"{"steps": 4}"#).unwrap_err();
        assert!(
            missing.to_string().contains("missing field `prompt`"),
            "{missing}"
        );
        let bad =
            serde_json::from_str::<GenerationParams>(r#"{"prompt": "", "outputFormat": "gif"}"#)
                .unwrap_err();
        assert!(
            bad.to_string()
                .contains("unknown output format `gif` (allowed: png, jpeg, jpg, webp)"),
            "{bad}"
        );
        let bad =
            serde_json::from_str::<GenerationParams>(r#"{"prompt": "", "precision": "int8"}"#)
                .unwrap_err();
        assert!(
            bad.to_string()
                .contains("unknown precision `int8` (allowed: fp16, bf16, fp32)"),
            "{bad}"
        );
    }

    #[test]
    fn output_format_names() {
        for format in OutputFormat::ALL {
            assert_eq!(
                OutputFormat::from_extension(format.extension()),
                Some(format)
            );
            assert_eq!(format.as_str().parse::<OutputFormat>(), Ok(format));
        }
        assert_eq!("JPG".parse::<OutputFormat>(), Ok(OutputFormat::Jpeg));
        assert_eq!(
            OutputFormat::from_extension("JPEG"),
            Some(OutputFormat::Jpeg)
        );
        assert_eq!(OutputFormat::from_extension("gif"), None);
        assert_eq!(OutputFormat::Webp.mime_type(), "image/webp");
        assert_eq!(OutputFormat::Jpeg.mime_type(), "image/jpeg");
        assert_eq!(OutputFormat::Png.mime_type(), "image/png");
        assert_eq!(OutputFormat::Jpeg.extension(), "jpg");
        assert!(!OutputFormat::Png.is_lossy());
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::Fp32));
        assert_eq!(Precision::Fp16.to_string(), "fp16");
    }

    #[test]
    fn defaults() {
        let params = GenerationParams::new("x");
        assert_eq!(params.output_format_or_default(), OutputFormat::Webp);
        assert_eq!(params.output_quality_or_default(), Ok(80));
        assert_eq!(params.precision_or_default(), Precision::Fp16);
        assert_eq!(params.batch_size_or_default(), 1);
        let params = GenerationParams {
            output_quality: Some(300),
            ..params
        };
        assert_eq!(
            params.output_quality_or_default().unwrap_err().to_string(),
            "outputQuality: 300 is out of range (allowed: 1 to 100)"
        );
    }
}
