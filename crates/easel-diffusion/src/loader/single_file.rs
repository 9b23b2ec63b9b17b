//! Single-file checkpoints in the original Stable Diffusion layout (the
//! `.safetensors` files A1111, Forge and ComfyUI load), opened as a
//! [`ModelDir`] whose weights come from the file.
//!
//! As diffusers' `from_single_file(file, config=...)`: the architecture is
//! detected from the file's keys and tensor shapes (ComfyUI's
//! `model_detection`, diffusers' `infer_diffusers_model_type`); configs,
//! tokenizers and the scheduler config come from a diffusers folder or
//! repo (`--config`), by default the repo diffusers uses for the detected
//! architecture (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`), of which only the
//! config and tokenizer files are downloaded. The weights stay in the
//! memory-mapped file: each component reads its tensors through a renaming
//! [`TensorSource`] ([`super::ldm_keys`]).
//!
//! Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused: loading
//! one runs whatever code it holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::checkpoint::CheckpointFile;
use super::flux_keys;
use super::ldm_keys::{self, Op};
use super::{ModelDir, ModelFamily, ResolveOptions};
use crate::error::{Error, Result};
use crate::models::stored::StoredTensor;
use crate::models::weights::TensorSource;

/// The Stable Diffusion generation a single-file checkpoint holds, as
/// detected from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: OpenAI CLIP text encoder under `cond_stage_model.transformer.`.
    StableDiffusion1,
    /// SD 2.x: OpenCLIP text encoder under `cond_stage_model.model.`.
    StableDiffusion2,
    /// SDXL base: CLIP-L under `conditioner.embedders.0.transformer.`,
    /// OpenCLIP bigG under `conditioner.embedders.1.model.`.
    StableDiffusionXl,
    /// FLUX.1 dev (and Fill): a transformer-only file in the Black Forest
    /// Labs layout (`double_blocks.*`, `single_blocks.*`) with a guidance
    /// embedder (`guidance_in.*`).
    FluxDev,
    /// FLUX.1 schnell: the same layout without `guidance_in.*`.
    FluxSchnell,
}

impl Architecture {
    /// The model family its pipeline belongs to.
    pub fn family(self) -> ModelFamily {
        match self {
            Architecture::StableDiffusionXl => ModelFamily::StableDiffusionXl,
            Architecture::FluxDev | Architecture::FluxSchnell => ModelFamily::Flux,
            _ => ModelFamily::StableDiffusion,
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::StableDiffusion1 => "Stable Diffusion 1.x",
            Architecture::StableDiffusion2 => "Stable Diffusion 2.x",
            Architecture::StableDiffusionXl => "Stable Diffusion XL",
            Architecture::FluxDev => "FLUX.1 dev",
            Architecture::FluxSchnell => "FLUX.1 schnell",
        }
    }
}

/// What the keys of a checkpoint say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    /// The architecture.
    pub architecture: Architecture,
    /// Whether the UNet takes 9 input channels (an inpainting model); for
    /// FLUX, whether `img_in` takes 384 features (FLUX.1 Fill: 64 latent,
    /// 64 masked-image and 256 mask features per patch).
    pub inpainting: bool,
    /// `Some(true)` when the file says it predicts v (a `v_pred` key, as
    /// ComfyUI saves; or, for SD 2.x of real size, ComfyUI's test of the
    /// spread of `output_blocks.11.1.transformer_blocks.0.norm1.bias`),
    /// `Some(false)` when that test says epsilon, `None` when the file does
    /// not tell.
    pub v_prediction: Option<bool>,
    /// Whether the file holds only the UNet (ComfyUI's `diffusion_models`
    /// files, city96's SD / SDXL GGUF files: LDM UNet keys with or without
    /// `model.diffusion_model.`, no VAE or text encoder): the text
    /// encoders and VAE come from the config, as for a FLUX transformer.
    pub unet_only: bool,
    /// Whether a FLUX.1 file also holds its text encoders and VAE
    /// (ComfyUI's all-in-one checkpoints: `text_encoders.clip_l.*`,
    /// `text_encoders.t5xxl.*`, `vae.*` beside `model.diffusion_model.*`);
    /// only configs and tokenizers then come from the config.
    pub bundled: bool,
}

impl Detected {
    /// The model family of its pipeline (FLUX.1 Fill: [`ModelFamily::FluxFill`]).
    pub fn family(&self) -> ModelFamily {
        match (self.architecture.family(), self.inpainting) {
            (ModelFamily::Flux, true) => ModelFamily::FluxFill,
            (family, _) => family,
        }
    }

    /// Whether the file holds only a transformer (FLUX, not
    /// [`Self::bundled`]): every other component comes from the config.
    pub fn transformer_only(&self) -> bool {
        self.architecture.family() == ModelFamily::Flux && !self.bundled
    }

    /// Whether the file holds only the denoiser (a FLUX transformer, or a
    /// UNet-only file): the text encoders and VAE come from the config.
    pub fn denoiser_only(&self) -> bool {
        self.transformer_only() || self.unet_only
    }

    /// The diffusers repo whose configs and tokenizers a checkpoint of this
    /// kind uses when no `--config` is given, as diffusers'
    /// `DIFFUSERS_DEFAULT_PIPELINE_PATHS` (SD 2.x epsilon: the 512 `-base`).
    pub fn default_config_repo(&self) -> &'static str {
        match (self.architecture, self.inpainting) {
            (Architecture::StableDiffusion1, false) => {
                "stable-diffusion-v1-5/stable-diffusion-v1-5"
            }
            (Architecture::StableDiffusion1, true) => {
                "stable-diffusion-v1-5/stable-diffusion-inpainting"
            }
            (Architecture::StableDiffusion2, true) => "stabilityai/stable-diffusion-2-inpainting",
            (Architecture::StableDiffusion2, false) if self.v_prediction == Some(false) => {
                "stabilityai/stable-diffusion-2-1-base"
            }
            (Architecture::StableDiffusion2, false) => "stabilityai/stable-diffusion-2-1",
            (Architecture::StableDiffusionXl, false) => "stabilityai/stable-diffusion-xl-base-1.0",
            (Architecture::StableDiffusionXl, true) => {
                "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
            }
            (Architecture::FluxDev | Architecture::FluxSchnell, true) => {
                "black-forest-labs/FLUX.1-Fill-dev"
            }
            (Architecture::FluxDev, false) => "black-forest-labs/FLUX.1-dev",
            (Architecture::FluxSchnell, false) => "black-forest-labs/FLUX.1-schnell",
        }
    }
}

/// File extensions of pickle checkpoints, refused.
pub(crate) const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// The UNet, VAE and text encoder key prefixes of the LDM layout.
const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_CLIP: &str = "cond_stage_model.model.";
const XL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const XL_CLIP_G: &str = "conditioner.embedders.1.model.";
/// The text encoder and VAE prefixes of ComfyUI's all-in-one FLUX.1 files.
const FLUX_CLIP: &str = "text_encoders.clip_l.";
const FLUX_T5: &str = "text_encoders.t5xxl.";
const FLUX_VAE: &str = "vae.";

/// Whether `path` names a file that [`open_single_file`] is the loader of
/// (or refuses): a file (not a folder) ending in `.safetensors` or a
/// pickle extension.
pub fn is_checkpoint_file(path: &Path) -> bool {
    path.is_file()
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            let e = e.to_ascii_lowercase();
            e == "safetensors" || e == "gguf" || PICKLE_EXTENSIONS.contains(&e.as_str())
        })
}

/// The refusal of a pickle checkpoint, with how to convert it.
pub(crate) fn pickle_refusal(path: &Path) -> Error {
    Error::invalid(
        "model",
        format!(
            "{} is a pickle checkpoint (.ckpt / .pt / .pth / .bin): loading one can run any code \
             it holds, so easel does not read them. Convert it to .safetensors once, in a Python \
             environment you trust with the file: `python -c \"import torch, safetensors.torch as s; \
             sd = torch.load('{name}', map_location='cpu', weights_only=True); \
             sd = sd.get('state_dict', sd); s.save_file({{k: v.clone() for k, v in sd.items() \
             if isinstance(v, torch.Tensor)}}, '{stem}.safetensors')\"` (weights_only=True refuses \
             code), or download the .safetensors version most checkpoints are also published as",
            path.display(),
            name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            stem = path
                .file_stem()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
        ),
    )
}

/// Detects the architecture of a checkpoint from its keys and shapes.
///
/// # Errors
/// [`Error::InvalidArgument`] (field `model`) when the keys match no
/// supported layout, naming the layouts looked for and the file's top-level
/// key prefixes; SDXL refiner files are named as not supported yet. FLUX
/// files (`detect_flux`) are told by `double_blocks.*` keys.
pub fn detect(file: &Path, tensors: &CheckpointFile) -> Result<Detected> {
    let keys: Vec<String> = tensors.keys();
    let has_prefix = |p: &str| keys.iter().any(|k| k.starts_with(p));
    let unsupported = |what: &str| {
        Error::invalid(
            "model",
            format!(
                "{}: {what} single-file checkpoints are not supported yet; use a diffusers folder \
                 or repo (diffusers' `from_single_file(...).save_pretrained(dir)` makes one)",
                file.display()
            ),
        )
    };
    if has_prefix("double_blocks.")
        || has_prefix(&format!("{}double_blocks.", flux_keys::COMFY_PREFIX))
    {
        return detect_flux(file, tensors, &keys);
    }
    if !has_prefix(VAE) && !has_prefix("cond_stage_model.") && !has_prefix("conditioner.") {
        if let Some(detected) = detect_unet_only(file, tensors, &keys)? {
            return Ok(detected);
        }
    }
    let architecture =
        if has_prefix(XL_CLIP_L) && has_prefix(&format!("{XL_CLIP_G}transformer.resblocks.")) {
            Some(Architecture::StableDiffusionXl)
        } else if has_prefix("conditioner.embedders.0.model.") {
            return Err(unsupported("SDXL refiner"));
        } else if has_prefix(&format!("{SD2_CLIP}transformer.resblocks.")) {
            Some(Architecture::StableDiffusion2)
        } else if has_prefix(SD1_CLIP) {
            Some(Architecture::StableDiffusion1)
        } else {
            None
        };
    let conv_in = tensors.shape(&format!("{UNET}input_blocks.0.0.weight"));
    let (Some(architecture), Some(conv_in), true) = (architecture, conv_in, has_prefix(VAE)) else {
        let prefixes: BTreeSet<String> = keys
            .iter()
            .map(|k| {
                let mut parts = k.splitn(3, '.');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), Some(_)) => format!("{a}.{b}.*"),
                    _ => k.clone(),
                }
            })
            .collect();
        let found: Vec<String> = prefixes.into_iter().take(12).collect();
        let hint = if keys.iter().any(|k| k.contains("lora")) {
            " (this looks like a LoRA adapter: pass it with --lora / `loras`)"
        } else {
            ""
        };
        return Err(Error::invalid(
            "model",
            format!(
                "{}: its keys match no supported single-file layout. Looked for the original \
                 (LDM / A1111) layout: a UNet under `{UNET}*` (with `{UNET}input_blocks.0.0.weight`), \
                 a VAE under `{VAE}*`, and a text encoder under `{SD1_CLIP}*` (SD 1.x), \
                 `{SD2_CLIP}transformer.resblocks.*` (SD 2.x) or `{XL_CLIP_L}*` + \
                 `{XL_CLIP_G}*` (SDXL); and FLUX.1 transformer files in the Black Forest Labs \
                 layout (`double_blocks.*`, `single_blocks.*`, optionally under \
                 `model.diffusion_model.`). Found {} keys, starting: {}{hint}",
                file.display(),
                keys.len(),
                if found.is_empty() {
                    "(none)".to_string()
                } else {
                    found.join(", ")
                }
            ),
        ));
    };
    let inpainting = unet_takes_mask(file, &conv_in)?;
    let v_prediction = if keys.iter().any(|k| k == "v_pred") {
        Some(true)
    } else if architecture == Architecture::StableDiffusion2 && !inpainting {
        // ComfyUI's `SD20.model_type`: a v model's last attention block
        // has norm biases spread wider than an epsilon one's.
        let key = format!("{UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias");
        match tensors.load(&key, &Device::Cpu) {
            Ok(t) => {
                let t = t.to_dtype(DType::F32)?.flatten_all()?;
                let mean = t.mean_all()?.to_scalar::<f32>()?;
                let var = t
                    .broadcast_sub(&Tensor::new(mean, &Device::Cpu)?)?
                    .sqr()?
                    .mean_all()?
                    .to_scalar::<f32>()?;
                Some(var.sqrt() > 0.09)
            }
            Err(_) => None,
        }
    } else {
        None
    };
    Ok(Detected {
        architecture,
        inpainting,
        v_prediction,
        unet_only: false,
        bundled: false,
    })
}

/// Whether a UNet whose `conv_in` weight has shape `conv_in` is an
/// inpainting UNet: 9 input channels (latents, mask, masked-image
/// latents) rather than 4.
///
/// Errors: any other channel count.
fn unet_takes_mask(file: &Path, conv_in: &[usize]) -> Result<bool> {
    match conv_in.get(1) {
        Some(4) => Ok(false),
        Some(9) => Ok(true),
        other => Err(Error::invalid(
            "model",
            format!(
                "{}: the UNet's conv_in takes {other:?} channels; supported: 4 \
                 (text-to-image) or 9 (inpainting)",
                file.display()
            ),
        )),
    }
}

/// The prefix of a file's LDM UNet keys: `model.diffusion_model.`, or none
/// (UNet-only files as city96's GGUF converter writes them).
fn unet_prefix(keys: &[String]) -> &'static str {
    if keys.iter().any(|k| k.starts_with(UNET)) {
        UNET
    } else {
        ""
    }
}

/// Detects a UNet-only file: LDM UNet keys (`input_blocks.0.0.weight`,
/// with or without `model.diffusion_model.`) and nothing else. SDXL when
/// it has the added-condition embedding `label_emb.*`, SD 2.x when its
/// cross-attention reads 1024 features (OpenCLIP-H), else SD 1.x; `None`
/// when the keys are not a UNet's.
fn detect_unet_only(
    file: &Path,
    tensors: &CheckpointFile,
    keys: &[String],
) -> Result<Option<Detected>> {
    let prefix = unet_prefix(keys);
    let Some(conv_in) = tensors.shape(&format!("{prefix}input_blocks.0.0.weight")) else {
        return Ok(None);
    };
    if !keys
        .iter()
        .any(|k| k.starts_with(&format!("{prefix}output_blocks.")))
    {
        return Ok(None);
    }
    let inpainting = unet_takes_mask(file, &conv_in)?;
    let context = keys
        .iter()
        .find(|k| k.starts_with(prefix) && k.ends_with("attn2.to_k.weight"))
        .and_then(|k| tensors.shape(k))
        .and_then(|s| s.get(1).copied());
    let architecture = if keys
        .iter()
        .any(|k| k.starts_with(&format!("{prefix}label_emb.")))
    {
        Architecture::StableDiffusionXl
    } else if context == Some(1024) {
        Architecture::StableDiffusion2
    } else {
        Architecture::StableDiffusion1
    };
    Ok(Some(Detected {
        architecture,
        inpainting,
        v_prediction: keys.iter().any(|k| k == "v_pred").then_some(true),
        unet_only: true,
        bundled: false,
    }))
}

/// The prefix of a FLUX file's keys: none (BFL) or ComfyUI's
/// `model.diffusion_model.`.
fn flux_prefix(keys: &[String]) -> &'static str {
    if keys.iter().any(|k| k.starts_with("double_blocks.")) {
        ""
    } else {
        flux_keys::COMFY_PREFIX
    }
}

/// Detects a FLUX.1 transformer file: dev when it has a guidance embedder
/// (`guidance_in.*`), else schnell; Fill when `img_in` takes 384 features
/// (64 for text-to-image), as diffusers' `infer_diffusers_model_type`.
fn detect_flux(file: &Path, tensors: &CheckpointFile, keys: &[String]) -> Result<Detected> {
    let prefix = flux_prefix(keys);
    let img_in = tensors.shape(&format!("{prefix}img_in.weight"));
    let inpainting = match img_in.as_deref() {
        Some([_, 64]) => false,
        Some([_, 384]) => true,
        other => {
            return Err(Error::invalid(
                "model",
                format!(
                    "{}: a FLUX transformer file (`double_blocks.*` keys) whose `{prefix}img_in.weight` \
                     has shape {other:?}; supported: [width, 64] (FLUX.1 dev / schnell) or \
                     [width, 384] (FLUX.1 Fill)",
                    file.display()
                ),
            ))
        }
    };
    let guidance = keys
        .iter()
        .any(|k| k.starts_with(&format!("{prefix}guidance_in.")));
    Ok(Detected {
        architecture: if guidance {
            Architecture::FluxDev
        } else {
            Architecture::FluxSchnell
        },
        inpainting,
        v_prediction: None,
        unet_only: false,
        bundled: keys
            .iter()
            .any(|k| k.starts_with(FLUX_CLIP) || k.starts_with(FLUX_T5) || k.starts_with(FLUX_VAE)),
    })
}

/// One component's renames: diffusers key -> (file key, how it is reshaped).
type KeyMap = HashMap<String, (String, Op)>;

/// A single-file checkpoint: the mapped file, what it holds, and for each
/// component the diffusers keys it provides.
pub struct SingleFile {
    path: PathBuf,
    detected: Detected,
    tensors: Arc<CheckpointFile>,
    components: BTreeMap<String, Arc<KeyMap>>,
}

impl fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("detected", &self.detected)
            .field("components", &self.components.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SingleFile {
    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was detected from its keys.
    pub fn detected(&self) -> Detected {
        self.detected
    }

    /// The container: `safetensors` or `GGUF`.
    pub fn format(&self) -> &'static str {
        self.tensors.format()
    }

    /// The components whose weights the file holds.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.components.keys().map(String::as_str)
    }

    /// The tensors the file holds for `component`, as the model will load
    /// them, read from the header only: `(diffusers name, stored type
    /// (safetensors' `F16`, `BF16`, `F32`, `F8_E4M3`, ... or GGUF's `Q8_0`,
    /// `Q4_K`, ...), shape)`; a fused tensor split into
    /// parts (OpenCLIP's `in_proj`) counts once per part with its share of
    /// rows, a transposed one with its dimensions swapped. Empty when the
    /// file does not hold `component`. For the model cache's estimate
    /// ([`crate::engine::estimate_model_bytes`]).
    pub fn tensor_infos(&self, component: &str) -> Vec<(String, String, Vec<usize>)> {
        let Some(map) = self.components.get(component) else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(name, (key, op))| {
                let mut shape = self.tensors.shape(key)?;
                match *op {
                    Op::Chunk { parts, .. } if !shape.is_empty() => shape[0] /= parts.max(1),
                    Op::Rows { len, .. } if !shape.is_empty() => shape[0] = len,
                    Op::Transpose => shape.reverse(),
                    _ => {}
                }
                Some((name.clone(), self.tensors.dtype_name(key)?, shape))
            })
            .collect()
    }

    /// The weights of `component`, read from the file under their diffusers
    /// names; `None` when the file does not hold that component.
    pub fn source(&self, component: &str) -> Option<Arc<dyn TensorSource>> {
        let map = self.components.get(component)?;
        Some(Arc::new(RenamedSource {
            path: self.path.clone(),
            tensors: self.tensors.clone(),
            map: map.clone(),
        }))
    }
}

/// One component's weights in a single file, by diffusers key.
pub(crate) struct RenamedSource {
    path: PathBuf,
    tensors: Arc<CheckpointFile>,
    map: Arc<KeyMap>,
}

impl RenamedSource {
    /// The tensors of `map` (diffusers key -> file key, reshaping) read
    /// from `tensors`, the mapped file `path` (also used by
    /// [`super::component_files`]).
    pub(crate) fn new(
        path: PathBuf,
        tensors: Arc<CheckpointFile>,
        map: Arc<HashMap<String, (String, Op)>>,
    ) -> Self {
        Self { path, tensors, map }
    }
}

impl TensorSource for RenamedSource {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        self.stored(name, shape, device)?
            .map(|t| t.to_dense(device))
            .transpose()
    }

    /// The file's tensor under its diffusers name, renamed and reshaped by
    /// its [`Op`] in its stored form (a fused quantized or fp8 tensor is
    /// split by rows without widening).
    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<StoredTensor>> {
        let Some((key, op)) = self.map.get(name) else {
            return Ok(None);
        };
        let t = self.tensors.stored(key, device)?;
        let rows = t.dims().first().copied().unwrap_or(0);
        let too_few = |need: usize| {
            Error::config(
                "single file",
                format!(
                    "{}: `{key}` has {rows} rows, fewer than {need}",
                    self.path.display()
                ),
            )
        };
        Ok(Some(match *op {
            Op::Same => t,
            Op::Reshape
                if t.dims() != shape && t.elem_count() == shape.iter().product::<usize>() =>
            {
                t.reshape(shape)?
            }
            Op::Reshape => t,
            Op::Transpose => StoredTensor::Dense(t.to_dense(device)?.t()?.contiguous()?),
            Op::Chunk { index, parts } => {
                let part = rows / parts;
                if part * parts != rows {
                    return Err(Error::config(
                        "single file",
                        format!(
                            "{}: `{key}` has {rows} rows, not a multiple of {parts}",
                            self.path.display()
                        ),
                    ));
                }
                t.narrow_rows(index * part, part)?
            }
            Op::Rows { start, len } => {
                if start + len > rows {
                    return Err(too_few(start + len));
                }
                t.narrow_rows(start, len)?
            }
            Op::SwapHalves => {
                let half = rows / 2;
                StoredTensor::cat_rows(&[t.narrow_rows(half, half)?, t.narrow_rows(0, half)?])?
            }
        }))
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn origin(&self) -> PathBuf {
        self.path.clone()
    }

    fn keys(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

/// Opens the single-file checkpoint `file` as a model: its weights, with
/// the configs and tokenizers of `config` (a diffusers folder, or a repo id
/// `org/name[@revision]` resolved as [`super::resolve_model`] does but
/// downloading only config and tokenizer files); without `config`, the
/// default repo of the detected architecture
/// ([`Detected::default_config_repo`]). `prediction_type`
/// (`epsilon` / `v_prediction` / `sample`) overrides the scheduler's, else
/// what the file tells ([`Detected::v_prediction`]) does.
///
/// # Errors
/// [`Error::InvalidArgument`] for a pickle file, a file that is not
/// safetensors, keys of no supported layout ([`detect`]), a config of
/// another family, or an unknown `prediction_type`;
/// [`Error::ModelNotFound`] when the config repo is not cached and cannot
/// be downloaded (the message names `--config`).
pub fn open_single_file(
    file: &Path,
    config: Option<&str>,
    prediction_type: Option<&str>,
    options: &ResolveOptions,
) -> Result<ModelDir> {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(pickle_refusal(file));
    }
    if let Some(p) = prediction_type {
        if !matches!(p, "epsilon" | "v_prediction" | "sample") {
            return Err(Error::invalid(
                "prediction_type",
                format!("`{p}` is not a prediction type; allowed: epsilon, v_prediction, sample"),
            ));
        }
    }
    if !file.is_file() {
        return Err(Error::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint file not found"),
        ));
    }
    let tensors = CheckpointFile::open(file)?;
    let detected = detect(file, &tensors)?;
    let config_ref = config.unwrap_or(detected.default_config_repo());
    let not_usable = |e: Error| match (config, e) {
        (None, Error::ModelNotFound(m)) => Error::ModelNotFound(format!(
            "{}: detected {}; its configs and tokenizers{} come from `{config_ref}` by \
                 default, which is not usable: {m}. Pass --config (server: `config`) with a \
                 diffusers folder or repo id of the same architecture",
            file.display(),
            detected.architecture.name(),
            if detected.denoiser_only() {
                " (and its text encoders and VAE)"
            } else {
                ""
            }
        )),
        (_, e) => e,
    };
    let mut model = if Path::new(config_ref).exists() {
        ModelDir::open(config_ref)?
    } else if detected.denoiser_only() {
        // A transformer- or UNet-only file: the text encoders and the VAE
        // are the config repo's, downloaded with it (all weights but the
        // denoiser's), then every config (the denoiser's included).
        let mut weights = options.clone();
        weights.skip_components.push(
            if detected.transformer_only() {
                "transformer"
            } else {
                "unet"
            }
            .to_string(),
        );
        super::resolve_model(config_ref, &weights).map_err(not_usable)?;
        super::resolve_config_repo(config_ref, options).map_err(not_usable)?
    } else {
        super::resolve_config_repo(config_ref, options).map_err(not_usable)?
    };
    if model.family() != Some(detected.family()) {
        return Err(Error::invalid(
            "config",
            format!(
                "{} is {} but the config `{config_ref}` is a {} model; pass a config of the same \
                 architecture",
                file.display(),
                detected.architecture.name(),
                model.pipeline_class()
            ),
        ));
    }
    let components = if detected.architecture.family() == ModelFamily::Flux {
        flux_component_maps(file, &tensors)?
    } else {
        component_maps(&model, &detected, &tensors)?
    };
    if detected.unet_only && !components.contains_key("unet") {
        return Err(Error::invalid(
            "model",
            format!(
                "{}: no UNet key of the file maps to a diffusers UNet key",
                file.display()
            ),
        ));
    }
    let prediction = prediction_type
        .map(str::to_string)
        .or(match detected.v_prediction {
            Some(true) => Some("v_prediction".to_string()),
            Some(false) => Some("epsilon".to_string()),
            None => None,
        });
    let keys = tensors.keys();
    model.set_single_file(
        file.display().to_string(),
        Arc::new(SingleFile {
            path: file.to_path_buf(),
            detected,
            tensors: Arc::new(tensors),
            components,
        }),
        prediction,
    );
    if detected.bundled {
        // The text encoders and VAE of an all-in-one FLUX file are read as
        // component files of the same file (their layouts found under the
        // prefixes, their shapes checked against the config's).
        for (component, prefix) in [
            ("text_encoder", FLUX_CLIP),
            ("text_encoder_2", FLUX_T5),
            ("vae", FLUX_VAE),
        ] {
            if keys.iter().any(|k| k.starts_with(prefix)) {
                let opened = super::open_component_file(&model, component, file)?;
                model.set_component_file(Arc::new(opened));
            }
        }
    }
    Ok(model)
}

/// A FLUX file's one component, `transformer`: its diffusers keys and the
/// file keys they come from ([`flux_keys::flux_keys`]), the model width
/// taken from `img_in.weight`'s rows.
fn flux_component_maps(
    file: &Path,
    tensors: &CheckpointFile,
) -> Result<BTreeMap<String, Arc<KeyMap>>> {
    let keys = tensors.keys_and_shapes();
    let names: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    let prefix = flux_prefix(&names);
    let hidden = tensors
        .shape(&format!("{prefix}img_in.weight"))
        .and_then(|s| s.first().copied())
        .ok_or_else(|| {
            Error::invalid(
                "model",
                format!(
                    "{}: a FLUX file without `{prefix}img_in.weight`",
                    file.display()
                ),
            )
        })?;
    let mut map = KeyMap::new();
    for (key, shape) in keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let rows = shape.first().copied().unwrap_or(0);
        for (d, op) in flux_keys::flux_keys(rest, rows, hidden) {
            map.insert(d, (key.clone(), op));
        }
    }
    Ok(BTreeMap::from([("transformer".to_string(), Arc::new(map))]))
}

/// Each component's diffusers keys and the file keys they come from.
fn component_maps(
    model: &ModelDir,
    detected: &Detected,
    tensors: &CheckpointFile,
) -> Result<BTreeMap<String, Arc<KeyMap>>> {
    let unet_config = model.component_config("unet")?;
    let layers_per_block = unet_config
        .get("layers_per_block")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            Error::config(
                "unet",
                "single file: the config has no integer `layers_per_block` (a list is not supported)",
            )
        })? as usize;
    let vae_config = model.component_config("vae")?;
    let up_blocks = vae_config
        .get("block_out_channels")
        .and_then(Value::as_array)
        .map(Vec::len)
        .ok_or_else(|| Error::config("vae", "the config has no `block_out_channels`"))?;

    let mut maps: BTreeMap<String, KeyMap> = BTreeMap::new();
    let mut put = |component: &str, diffusers: String, key: &str, op: Op| {
        maps.entry(component.to_string())
            .or_default()
            .insert(diffusers, (key.to_string(), op));
    };
    let (clip, open_clip) = match detected.architecture {
        Architecture::StableDiffusion1 => (Some(("text_encoder", SD1_CLIP)), None),
        Architecture::StableDiffusion2 => (None, Some(("text_encoder", SD2_CLIP))),
        Architecture::StableDiffusionXl => (
            Some(("text_encoder", XL_CLIP_L)),
            Some(("text_encoder_2", XL_CLIP_G)),
        ),
        // Transformer-only: mapped by `flux_component_maps`.
        Architecture::FluxDev | Architecture::FluxSchnell => (None, None),
    };
    let unet = unet_prefix(&tensors.keys());
    for key in tensors.keys() {
        if let Some(rest) = key
            .strip_prefix(unet)
            .filter(|_| !unet.is_empty() || detected.unet_only)
        {
            if let Some(d) = ldm_keys::unet_key(rest, layers_per_block) {
                put("unet", d, &key, Op::Same);
            }
        } else if let Some(rest) = key.strip_prefix(VAE) {
            if let Some((d, op)) = ldm_keys::vae_key(rest, up_blocks) {
                put("vae", d, &key, op);
            }
        } else if let Some(rest) = clip.and_then(|(_, p)| key.strip_prefix(p)) {
            let component = clip.map_or("", |(c, _)| c);
            put(component, ldm_keys::clip_key(rest), &key, Op::Same);
        } else if let Some(rest) = open_clip.and_then(|(_, p)| key.strip_prefix(p)) {
            let component = open_clip.map_or("", |(c, _)| c);
            for (d, op) in ldm_keys::open_clip_keys(rest) {
                put(component, d, &key, op);
            }
        }
    }
    Ok(maps.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_repos_follow_diffusers() {
        let d = |architecture, inpainting, v_prediction| Detected {
            architecture,
            inpainting,
            v_prediction,
            unet_only: false,
            bundled: false,
        };
        assert_eq!(
            d(Architecture::StableDiffusion1, false, None).default_config_repo(),
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        );
        assert_eq!(
            d(Architecture::StableDiffusion2, false, None).default_config_repo(),
            "stabilityai/stable-diffusion-2-1"
        );
        assert_eq!(
            d(Architecture::StableDiffusion2, false, Some(false)).default_config_repo(),
            "stabilityai/stable-diffusion-2-1-base"
        );
        assert_eq!(
            d(Architecture::StableDiffusionXl, false, None).default_config_repo(),
            "stabilityai/stable-diffusion-xl-base-1.0"
        );
    }
}
