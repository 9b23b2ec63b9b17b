//! Every body field of Leonardo's `POST /generations` (their OpenAPI
//! document, `createGeneration`), classified: mapped onto the native
//! request, accepted as cosmetic, or refused when it asks for something
//! easel does not do. The handler walks [`FIELDS`] for every request; the
//! tests walk it too (`tests/leonardo.rs`), so a field added here is tested.

use serde_json::Value;

/// What easel does with one Leonardo field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Translated into the native request field named (camelCase, as
    /// `POST /v1/generations` spells it; `images` for the image count).
    Mapped(&'static str),
    /// Accepted and recorded; it changes nothing easel draws.
    Cosmetic,
    /// A Leonardo feature easel does not have: refused (422 naming the
    /// field) unless its value is one of the [`Inactive`] ones.
    Unsupported(Inactive),
}

/// The values of an unsupported field that ask for nothing, and so pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inactive {
    /// `null` or `false`.
    FalseOrNull,
    /// `null` or `[]`.
    EmptyOrNull,
    /// Only `null`.
    Null,
    /// `null` or one of these strings.
    OneOf(&'static [&'static str]),
}

impl Inactive {
    /// Whether `value` asks for nothing.
    pub fn allows(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (Inactive::FalseOrNull, Value::Bool(false)) => true,
            (Inactive::EmptyOrNull, Value::Array(a)) => a.is_empty(),
            (Inactive::OneOf(values), Value::String(s)) => values.contains(&s.as_str()),
            _ => false,
        }
    }

    /// The values allowed, for messages.
    pub fn describe(self) -> String {
        match self {
            Inactive::FalseOrNull => "false or null".into(),
            Inactive::EmptyOrNull => "[] or null".into(),
            Inactive::Null => "null (leave it out)".into(),
            Inactive::OneOf(values) => format!("{} or null", values.join(", ")),
        }
    }
}

/// One body field of Leonardo's request.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Leonardo's name.
    pub name: &'static str,
    /// What easel does with it.
    pub role: Role,
    /// A value: one that is accepted for mapped and cosmetic fields, one
    /// that is refused for unsupported ones (the tests send it).
    pub example: &'static str,
    /// Why (for unsupported fields: what the feature is).
    pub note: &'static str,
}

const fn mapped(name: &'static str, to: &'static str, example: &'static str) -> Field {
    Field {
        name,
        role: Role::Mapped(to),
        example,
        note: "",
    }
}

const fn cosmetic(name: &'static str, example: &'static str, note: &'static str) -> Field {
    Field {
        name,
        role: Role::Cosmetic,
        example,
        note,
    }
}

const fn refused(
    name: &'static str,
    inactive: Inactive,
    example: &'static str,
    note: &'static str,
) -> Field {
    Field {
        name,
        role: Role::Unsupported(inactive),
        example,
        note,
    }
}

use Inactive::{EmptyOrNull, FalseOrNull, Null, OneOf};

/// The body fields, in the order of Leonardo's reference.
pub const FIELDS: &[Field] = &[
    refused(
        "alchemy",
        FalseOrNull,
        "true",
        "Alchemy (Leonardo's refiner pipeline); easel treats an absent `alchemy` as false",
    ),
    refused("contrastRatio", Null, "0.5", "Alchemy's contrast ratio"),
    refused("contrast", Null, "3.5", "Phoenix / Flux contrast levels"),
    refused(
        "controlnets",
        EmptyOrNull,
        r#"[{"initImageId": "x", "initImageType": "UPLOADED", "preprocessorId": 67}]"#,
        "ControlNet (not in easel yet)",
    ),
    mapped(
        "elements",
        "loras",
        r#"[{"akUUID": "LORA", "weight": 0.5}]"#,
    ),
    refused(
        "userElements",
        EmptyOrNull,
        r#"[{"userLoraId": 1, "weight": 1}]"#,
        "Leonardo user LoRAs by numeric id; pass easel LoRAs in `elements`",
    ),
    refused(
        "expandedDomain",
        FalseOrNull,
        "true",
        "Alchemy's Expanded Domain",
    ),
    refused("fantasyAvatar", FalseOrNull, "true", "Fantasy Avatar"),
    mapped("guidance_scale", "guidanceScale", "7"),
    mapped("height", "height", "64"),
    refused(
        "highContrast",
        FalseOrNull,
        "true",
        "Prompt Magic's High Contrast",
    ),
    refused(
        "highResolution",
        FalseOrNull,
        "true",
        "Prompt Magic's High Resolution",
    ),
    refused(
        "imagePrompts",
        EmptyOrNull,
        r#"["x"]"#,
        "image prompts (IP-Adapter)",
    ),
    refused("imagePromptWeight", Null, "0.5", "image prompts' weight"),
    mapped("init_generation_image_id", "image", "ASSET"),
    mapped("init_image_id", "image", "ASSET"),
    mapped("init_strength", "strength", "0.5"),
    mapped("modelId", "baseModel", r#""tiny-sd15""#),
    mapped("negative_prompt", "negativePrompt", r#""blurry""#),
    mapped("num_images", "images", "2"),
    mapped("num_inference_steps", "steps", "12"),
    refused("photoReal", FalseOrNull, "true", "PhotoReal"),
    refused("photoRealVersion", Null, r#""v2""#, "PhotoReal's version"),
    refused(
        "photoRealStrength",
        Null,
        "0.55",
        "PhotoReal's depth of field",
    ),
    mapped("presetStyle", "prompt", r#""NONE""#),
    mapped("prompt", "prompt", r#""a red fox""#),
    refused("promptMagic", FalseOrNull, "true", "Prompt Magic"),
    refused(
        "promptMagicStrength",
        Null,
        "0.5",
        "Prompt Magic's strength",
    ),
    refused(
        "promptMagicVersion",
        Null,
        r#""v3""#,
        "Prompt Magic's version",
    ),
    cosmetic("public", "true", "the community feed: easel has none"),
    mapped("scheduler", "scheduler", r#""DDIM""#),
    mapped("sd_version", "baseModel", r#""v1_5""#),
    mapped("seed", "seed", "42"),
    mapped("tiling", "tiling", "true"),
    refused(
        "transparency",
        OneOf(&["disabled"]),
        r#""foreground_only""#,
        "transparent foregrounds (diffusion models draw no alpha channel)",
    ),
    refused("ultra", FalseOrNull, "true", "Ultra mode"),
    refused("unzoom", FalseOrNull, "true", "unzoom"),
    refused("unzoomAmount", Null, "0.5", "unzoom's amount"),
    refused("upscaleRatio", Null, "2", "upscaling"),
    mapped("width", "width", "64"),
    refused(
        "controlNet",
        FalseOrNull,
        "true",
        "ControlNet (deprecated field)",
    ),
    refused(
        "controlNetType",
        Null,
        r#""CANNY""#,
        "ControlNet's type (deprecated field)",
    ),
    refused(
        "weighting",
        Null,
        "0.5",
        "ControlNet's weight (deprecated field)",
    ),
    refused(
        "canvasRequest",
        FalseOrNull,
        "true",
        "Canvas Editor requests",
    ),
    refused(
        "canvasRequestType",
        Null,
        r#""INPAINT""#,
        "Canvas Editor requests",
    ),
    refused("canvasInitId", Null, r#""x""#, "Canvas Editor init images"),
    refused("canvasMaskId", Null, r#""x""#, "Canvas Editor masks"),
    refused(
        "enhancePrompt",
        FalseOrNull,
        "true",
        "prompt enhancement by an LLM",
    ),
    refused(
        "enhancePromptInstruction",
        Null,
        r#""x""#,
        "prompt enhancement's instruction",
    ),
];

/// The field named `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// Leonardo's scheduler values and easel's scheduler for each (`None`:
/// the model's own scheduler, for `LEONARDO`, Leonardo's in-house sampler,
/// which is not published).
pub const SCHEDULERS: &[(&str, Option<&str>)] = &[
    ("KLMS", Some("lms")),
    ("EULER_ANCESTRAL_DISCRETE", Some("euler_a")),
    ("EULER_DISCRETE", Some("euler")),
    ("DDIM", Some("ddim")),
    ("DPM_SOLVER", Some("dpmpp_2m")),
    ("PNDM", Some("pndm")),
    ("LEONARDO", None),
];

/// Leonardo's `sd_version` values easel can serve: the model family, and
/// the words that pick among that family's models (see
/// [`super::super::compat_models`]). `v3`, `PHOENIX` and `KINO_2_0` are
/// Leonardo's own architectures and are refused.
pub const SD_VERSIONS: &[(&str, easel_diffusion::loader::ModelFamily, &[&str])] = {
    use easel_diffusion::loader::ModelFamily::{Flux, StableDiffusion, StableDiffusionXl};
    &[
        ("v1_5", StableDiffusion, &["sd15", "1.5", "1-5", "v1"]),
        ("v2", StableDiffusion, &["sd2", "2.1", "2-1", "v2"]),
        ("SDXL_0_8", StableDiffusionXl, &["xl"]),
        ("SDXL_0_9", StableDiffusionXl, &["xl"]),
        ("SDXL_1_0", StableDiffusionXl, &["xl"]),
        ("SDXL_LIGHTNING", StableDiffusionXl, &["lightning"]),
        ("FLUX", Flux, &["schnell"]),
        ("FLUX_DEV", Flux, &["dev"]),
    ]
};

/// Every `sd_version` value of Leonardo's enum.
pub const SD_VERSIONS_ALL: &[&str] = &[
    "v1_5",
    "v2",
    "v3",
    "SDXL_0_8",
    "SDXL_0_9",
    "SDXL_1_0",
    "SDXL_LIGHTNING",
    "PHOENIX",
    "FLUX",
    "FLUX_DEV",
    "KINO_2_0",
];

/// `presetStyle` values easel serves. Leonardo applies its styles through
/// Alchemy / PhotoReal (refused here); without Alchemy it allows only
/// `LEONARDO` and `NONE`, and easel draws both as the plain prompt. Every
/// other value of Leonardo's enum is refused with these listed.
pub const PRESET_STYLES: &[&str] = &["NONE", "LEONARDO"];
