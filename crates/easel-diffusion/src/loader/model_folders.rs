//! The model folders of A1111 / Forge and ComfyUI installs: finding the
//! files in them, telling what each is from its header alone, and finding
//! a file by name.
//!
//! A model root ([`super::ResolveOptions::model_dirs`]) may be the install
//! folder (holding `models/`) or its `models/` folder itself. Under it these
//! folders are scanned (subfolders included, as both UIs do):
//!
//! | folder | layout | kind |
//! |---|---|---|
//! | `Stable-diffusion` | A1111 | checkpoint |
//! | `Lora` | A1111 | LoRA |
//! | `VAE` | A1111 | VAE |
//! | `checkpoints` | ComfyUI | checkpoint |
//! | `diffusion_models`, `unet` | ComfyUI | diffusion model (UNet / transformer only) |
//! | `loras` | ComfyUI | LoRA |
//! | `vae` | ComfyUI | VAE |
//! | `text_encoders`, `clip` | ComfyUI | text encoder |
//! | `diffusers` | ComfyUI | diffusers folders (a checkpoint each) |
//!
//! A root that is itself a diffusers folder (`model_index.json`) is not
//! scanned this way: its `unet/` and `vae/` are a model's components.
//!
//! Files are recognised by extension: `.safetensors` (and `.sft`), `.gguf`,
//! and the pickles `.ckpt` / `.pt` / `.pth` / `.bin` (listed, never read).
//! [`describe`] reads only headers: the safetensors JSON header through a
//! memory map (the checkpoint detection of [`super::single_file::detect`] and
//! the LoRA key checks of [`crate::lora::check_lora_file`]), and a GGUF
//! file's metadata and tensor table (`general.architecture`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use serde::Serialize;

use super::single_file::{self, Architecture};
use super::{ModelDir, ModelFamily};
use crate::error::{Error, Result};

/// What a file in a model folder is, by the folder it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A whole model (UNet or transformer, text encoders, VAE): A1111's
    /// `Stable-diffusion`, ComfyUI's `checkpoints` and `diffusers`.
    Checkpoint,
    /// A UNet or transformer alone (FLUX files): ComfyUI's
    /// `diffusion_models` / `unet`.
    DiffusionModel,
    /// A LoRA adapter: A1111's `Lora`, ComfyUI's `loras`.
    Lora,
    /// A VAE: A1111's `VAE`, ComfyUI's `vae`.
    Vae,
    /// A text encoder (CLIP, T5): ComfyUI's `text_encoders` / `clip`.
    TextEncoder,
}

impl FileKind {
    /// Its name in listings: `checkpoint`, `diffusion model`, `lora`, `vae`,
    /// `text encoder`.
    pub fn label(self) -> &'static str {
        match self {
            FileKind::Checkpoint => "checkpoint",
            FileKind::DiffusionModel => "diffusion model",
            FileKind::Lora => "lora",
            FileKind::Vae => "vae",
            FileKind::TextEncoder => "text encoder",
        }
    }
}

/// Whose folder layout a file was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FolderLayout {
    /// AUTOMATIC1111 / Forge (`models/Stable-diffusion`, `models/Lora`, `models/VAE`).
    A1111,
    /// ComfyUI (`models/checkpoints`, `models/loras`, ...).
    ComfyUi,
}

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// A diffusers folder (`model_index.json` and component folders).
    DiffusersFolder,
    /// A `.safetensors` file of f32 / f16 / bf16 weights.
    Safetensors,
    /// A `.safetensors` file holding `F8_E4M3` or `F8_E5M2` weights.
    Fp8Safetensors,
    /// A GGUF file (quantized weights).
    Gguf,
    /// A pickle file (`.ckpt`, `.pt`, `.pth`, `.bin`): never loaded, since
    /// loading one can run the code it holds.
    Pickle,
}

impl FileFormat {
    /// Its name in listings: `diffusers folder`, `safetensors`,
    /// `fp8 safetensors`, `GGUF`, `pickle (refused)`.
    pub fn label(self) -> &'static str {
        match self {
            FileFormat::DiffusersFolder => "diffusers folder",
            FileFormat::Safetensors => "safetensors",
            FileFormat::Fp8Safetensors => "fp8 safetensors",
            FileFormat::Gguf => "GGUF",
            FileFormat::Pickle => "pickle (refused)",
        }
    }
}

/// The folders scanned under a root (or its `models/`), in this order.
const FOLDERS: &[(&str, FileKind, FolderLayout)] = &[
    (
        "Stable-diffusion",
        FileKind::Checkpoint,
        FolderLayout::A1111,
    ),
    ("Lora", FileKind::Lora, FolderLayout::A1111),
    ("VAE", FileKind::Vae, FolderLayout::A1111),
    ("checkpoints", FileKind::Checkpoint, FolderLayout::ComfyUi),
    ("diffusers", FileKind::Checkpoint, FolderLayout::ComfyUi),
    (
        "diffusion_models",
        FileKind::DiffusionModel,
        FolderLayout::ComfyUi,
    ),
    ("unet", FileKind::DiffusionModel, FolderLayout::ComfyUi),
    ("loras", FileKind::Lora, FolderLayout::ComfyUi),
    ("vae", FileKind::Vae, FolderLayout::ComfyUi),
    (
        "text_encoders",
        FileKind::TextEncoder,
        FolderLayout::ComfyUi,
    ),
    ("clip", FileKind::TextEncoder, FolderLayout::ComfyUi),
];

/// How deep subfolders of a model folder are scanned.
const MAX_DEPTH: usize = 6;

/// File extensions of weights listed (pickles are listed as refused).
const SAFETENSORS_EXTENSIONS: [&str; 2] = ["safetensors", "sft"];
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// A model file (or diffusers folder) found in a model folder, before
/// anything in it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderEntry {
    /// The file (or diffusers folder).
    pub path: PathBuf,
    /// Its file name without the extension: what `--model` / `--lora` take.
    pub name: String,
    /// What it is, by its folder.
    pub kind: FileKind,
    /// Whose layout its folder belongs to.
    pub layout: FolderLayout,
}

/// A model file described from its header, for `easel models list` and
/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelFile {
    /// Its file name without the extension (what `--model` / `--lora` take).
    pub name: String,
    /// What it is, by its folder.
    pub kind: FileKind,
    /// Whose layout its folder belongs to.
    pub layout: FolderLayout,
    /// How it is stored.
    pub format: FileFormat,
    /// The detected family (`SD 1.x`, `SD 2.x`, `SDXL`, `FLUX.1 dev`,
    /// `FLUX.1 schnell`, `FLUX.1 Fill`, ...); `None` when unknown.
    pub family: Option<String>,
    /// Why the family is unknown (`None` when it is known).
    pub unknown_reason: Option<String>,
    /// The diffusers pipeline class a checkpoint loads as, when known.
    pub pipeline_class: Option<String>,
    /// Bytes on disk (a folder: its files' sum).
    pub size_bytes: u64,
    /// The file (or folder).
    pub path: PathBuf,
}

/// The model folders under `root` (itself or its `models/`), each once
/// (compared after resolving symlinks), in [`FOLDERS`] order.
fn model_folders(root: &Path) -> Vec<(PathBuf, FileKind, FolderLayout)> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for base in [root.join("models"), root.to_path_buf()] {
        if base.join("model_index.json").exists() || !base.is_dir() {
            continue;
        }
        for &(name, kind, layout) in FOLDERS {
            let dir = base.join(name);
            if !dir.is_dir() {
                continue;
            }
            // A case-insensitive file system finds `VAE` and `vae` alike.
            let key = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if seen.insert(key) {
                out.push((dir, kind, layout));
            }
        }
    }
    out
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default()
}

/// Whether a file name is one of the weight formats listed.
fn is_weights_file(path: &Path) -> bool {
    let ext = extension(path);
    SAFETENSORS_EXTENSIONS.contains(&ext.as_str())
        || ext == "gguf"
        || PICKLE_EXTENSIONS.contains(&ext.as_str())
}

/// Files (and, in `diffusers`, model folders) under `dir`, sorted.
fn walk(
    dir: &Path,
    kind: FileKind,
    layout: FolderLayout,
    depth: usize,
    out: &mut Vec<FolderEntry>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!("model folder {}: cannot be read", dir.display());
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            if path.join("model_index.json").is_file() {
                out.push(FolderEntry {
                    name: file_name(&path),
                    path,
                    kind,
                    layout,
                });
            } else if depth < MAX_DEPTH {
                walk(&path, kind, layout, depth + 1, out);
            }
        } else if path.is_file() && is_weights_file(&path) {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(FolderEntry {
                path,
                name,
                kind,
                layout,
            });
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every model file (and diffusers folder) in the A1111 / ComfyUI model
/// folders of `roots` (see the module docs), reading nothing but folder
/// listings; a file reached through two roots is listed once. Unreadable
/// folders are skipped (with a warning).
pub fn scan_model_folders(roots: &[PathBuf]) -> Vec<FolderEntry> {
    let mut out = Vec::new();
    for root in roots {
        for (dir, kind, layout) in model_folders(root) {
            walk(&dir, kind, layout, 0, &mut out);
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|e| seen.insert(e.path.canonicalize().unwrap_or_else(|_| e.path.clone())));
    out
}

/// The file of `kinds` that `name` names in the model folders of `roots`:
/// a file whose name is `name` (`dreamshaper_8.safetensors`), else whose
/// name without its extension is (`dreamshaper_8`). `Ok(None)` when there
/// is none, or `name` holds a path separator.
///
/// # Errors
/// [`Error::InvalidArgument`] (field `field`) when several files match,
/// naming each path.
pub fn find_by_name(
    name: &str,
    roots: &[PathBuf],
    kinds: &[FileKind],
    field: &str,
) -> Result<Option<PathBuf>> {
    let name = name.trim();
    if name.is_empty() || name.contains(['/', '\\']) || roots.is_empty() {
        return Ok(None);
    }
    let entries: Vec<FolderEntry> = scan_model_folders(roots)
        .into_iter()
        .filter(|e| kinds.contains(&e.kind))
        .collect();
    let exact: Vec<&FolderEntry> = entries
        .iter()
        .filter(|e| file_name(&e.path) == name)
        .collect();
    let matches = if exact.is_empty() {
        entries.iter().filter(|e| e.name == name).collect()
    } else {
        exact
    };
    match matches.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.path.clone())),
        many => Err(Error::invalid(
            field,
            format!(
                "`{name}` is ambiguous: {} files in the model folders have that name: {}; \
                 pass the path of the one you mean (or its full file name)",
                many.len(),
                many.iter()
                    .map(|e| e.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Size on disk of a file, or of a folder's files.
fn size_on_disk(path: &Path) -> u64 {
    if path.is_dir() {
        super::cache::size_on_disk(path)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Describes a found file from its header alone (never its weights):
/// format, family (unknown with the reason when it cannot be told) and size.
pub fn describe(entry: &FolderEntry) -> ModelFile {
    let ext = extension(&entry.path);
    let mut file = ModelFile {
        name: entry.name.clone(),
        kind: entry.kind,
        layout: entry.layout,
        format: FileFormat::Safetensors,
        family: None,
        unknown_reason: None,
        pipeline_class: None,
        size_bytes: size_on_disk(&entry.path),
        path: entry.path.clone(),
    };
    let family = if entry.path.is_dir() {
        file.format = FileFormat::DiffusersFolder;
        describe_folder(&entry.path, &mut file)
    } else if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        file.format = FileFormat::Pickle;
        Err("not read: pickle files can run code when loaded; convert it to .safetensors".into())
    } else if ext == "gguf" {
        file.format = FileFormat::Gguf;
        // The loader's own detection first (what `--model` will load it
        // as), else the file's `general.architecture`.
        match super::CheckpointFile::open(&entry.path)
            .and_then(|c| single_file::detect(&entry.path, &c))
        {
            Ok(detected) => {
                file.pipeline_class = Some(checkpoint_class(&detected).to_string());
                Ok(checkpoint_family(&detected))
            }
            Err(_) => gguf_family(&entry.path),
        }
    } else {
        describe_safetensors(entry, &mut file)
    };
    match family {
        Ok(f) => file.family = Some(f),
        Err(why) => file.unknown_reason = Some(why),
    }
    file
}

/// Every model file of `roots`' model folders, described ([`describe`]).
pub fn list_model_files(roots: &[PathBuf]) -> Vec<ModelFile> {
    scan_model_folders(roots).iter().map(describe).collect()
}

fn describe_folder(dir: &Path, file: &mut ModelFile) -> std::result::Result<String, String> {
    let model = ModelDir::open(dir).map_err(|e| e.to_string())?;
    file.pipeline_class = Some(model.pipeline_class().to_string());
    folder_family(&model)
}

/// The family of a diffusers model folder (`SD 1.x`, `SDXL`, `FLUX.1 dev`,
/// ...) from its pipeline class and component configs; SD 1.x and 2.x are
/// told apart by the UNet's cross-attention width (768 / 1024), else named
/// together.
///
/// # Errors
/// The reason it is unknown: a pipeline class easel does not load.
pub fn folder_family(model: &ModelDir) -> std::result::Result<String, String> {
    let class = model.pipeline_class().to_string();
    match ModelFamily::from_class_name(&class) {
        Some(ModelFamily::StableDiffusionXl) => Ok("SDXL".into()),
        Some(ModelFamily::FluxFill) => Ok("FLUX.1 Fill".into()),
        Some(ModelFamily::Flux) => {
            let guidance = model
                .component_config("transformer")
                .ok()
                .and_then(|c| c.get("guidance_embeds").and_then(|g| g.as_bool()));
            Ok(match guidance {
                Some(true) => "FLUX.1 dev",
                Some(false) => "FLUX.1 schnell",
                None => "FLUX.1",
            }
            .into())
        }
        Some(ModelFamily::StableDiffusion) => {
            let width = model
                .component_config("unet")
                .ok()
                .and_then(|c| c.get("cross_attention_dim").and_then(|d| d.as_u64()));
            Ok(match width {
                Some(768) => "SD 1.x",
                Some(1024) => "SD 2.x",
                _ => "SD 1.x / 2.x",
            }
            .into())
        }
        None => Err(format!("pipeline class `{class}` is not one easel loads")),
    }
}

/// The family name of a detected checkpoint.
fn checkpoint_family(detected: &single_file::Detected) -> String {
    let name = match (detected.architecture, detected.inpainting) {
        (Architecture::FluxDev | Architecture::FluxSchnell, true) => "FLUX.1 Fill",
        (Architecture::FluxDev, false) => "FLUX.1 dev",
        (Architecture::FluxSchnell, false) => "FLUX.1 schnell",
        (Architecture::StableDiffusion1, _) => "SD 1.x",
        (Architecture::StableDiffusion2, _) => "SD 2.x",
        (Architecture::StableDiffusionXl, _) => "SDXL",
    };
    if detected.inpainting && detected.architecture.family() != ModelFamily::Flux {
        format!("{name} inpainting")
    } else {
        name.to_string()
    }
}

/// The pipeline class a detected checkpoint loads as.
fn checkpoint_class(detected: &single_file::Detected) -> &'static str {
    match (detected.family(), detected.inpainting) {
        (ModelFamily::StableDiffusion, false) => "StableDiffusionPipeline",
        (ModelFamily::StableDiffusion, true) => "StableDiffusionInpaintPipeline",
        (ModelFamily::StableDiffusionXl, false) => "StableDiffusionXLPipeline",
        (ModelFamily::StableDiffusionXl, true) => "StableDiffusionXLInpaintPipeline",
        (ModelFamily::Flux, _) => "FluxPipeline",
        (ModelFamily::FluxFill, _) => "FluxFillPipeline",
    }
}

fn describe_safetensors(
    entry: &FolderEntry,
    file: &mut ModelFile,
) -> std::result::Result<String, String> {
    let path = &entry.path;
    // SAFETY: read-only mapping; only the header's pages are touched here
    // (and, for an SD 2.x checkpoint, one bias vector of the v-prediction
    // test).
    let tensors = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| format!("not a readable safetensors file: {e}"))?;
    // Names, safetensors dtype names (`F16`, `F8_E4M3`, ...) and shapes.
    let infos: Vec<(String, String, Vec<usize>)> = tensors
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, format!("{:?}", v.dtype()), v.shape().to_vec()))
        .collect();
    if infos
        .iter()
        .any(|(_, dtype, _)| matches!(dtype.as_str(), "F8_E4M3" | "F8_E5M2"))
    {
        file.format = FileFormat::Fp8Safetensors;
    }
    let keys: Vec<&str> = infos.iter().map(|(k, _, _)| k.as_str()).collect();
    let shape = |key: &str| -> Option<Vec<usize>> {
        infos
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, s)| s.clone())
    };
    match entry.kind {
        FileKind::Checkpoint | FileKind::DiffusionModel => {
            let checkpoint = super::CheckpointFile::open(path).map_err(|e| strip_path(e, path))?;
            let detected =
                single_file::detect(path, &checkpoint).map_err(|e| strip_path(e, path))?;
            file.pipeline_class = Some(checkpoint_class(&detected).to_string());
            Ok(checkpoint_family(&detected))
        }
        FileKind::Lora => {
            crate::lora::check_lora_file(path).map_err(|e| strip_path(e, path))?;
            lora_family(&keys, &infos)
        }
        FileKind::Vae => {
            let conv_in = [
                "decoder.conv_in.weight",
                "first_stage_model.decoder.conv_in.weight",
            ]
            .into_iter()
            .find_map(shape);
            match conv_in.as_deref() {
                Some([_, 4, ..]) => Ok("SD 1.x / 2.x / SDXL".into()),
                Some([_, 16, ..]) => Ok("FLUX.1".into()),
                Some(s) => Err(format!(
                    "`decoder.conv_in.weight` has shape {s:?}: not 4 or 16 latent channels"
                )),
                None => Err("no `decoder.conv_in.weight`: not a VAE of a known layout".into()),
            }
        }
        FileKind::TextEncoder => {
            let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
            if has("encoder.block.") || has("shared.weight") {
                Ok("T5 encoder".into())
            } else if has("text_model.") || has("transformer.resblocks.") {
                Ok("CLIP text encoder".into())
            } else {
                Err(
                    "keys of neither a CLIP (`text_model.*`) nor a T5 (`encoder.block.*`) text \
                     encoder"
                        .into(),
                )
            }
        }
    }
}

/// An engine error's message without the file path it starts with (the
/// listing shows the path already).
fn strip_path(error: Error, path: &Path) -> String {
    let message = match error {
        Error::InvalidArgument { message, .. } => message,
        other => other.to_string(),
    };
    let prefix = format!("{}: ", path.display());
    message
        .strip_prefix(&prefix)
        .map(str::to_string)
        .unwrap_or(message)
}

/// The family a LoRA adapts, from its key names and the width of its
/// cross-attention key projections (768: SD 1.x, 1024: SD 2.x, 2048: SDXL).
fn lora_family(
    keys: &[&str],
    infos: &[(String, String, Vec<usize>)],
) -> std::result::Result<String, String> {
    let any = |f: &dyn Fn(&str) -> bool| keys.iter().any(|k| f(k));
    if any(&|k| {
        k.contains("double_blocks")
            || k.contains("single_blocks")
            || k.contains("single_transformer_blocks")
            || k.starts_with("transformer.")
            || k.starts_with("lora_transformer_")
    }) {
        return Ok("FLUX.1".into());
    }
    if any(&|k| k.starts_with("lora_te2_") || k.starts_with("text_encoder_2.")) {
        return Ok("SDXL".into());
    }
    let width = infos.iter().find_map(|(k, _, shape)| {
        let to_k = (k.contains("attn2.to_k") || k.contains("attn2_to_k"))
            && (k.contains("lora_down") || k.contains("lora_A") || k.contains("lora.down"));
        to_k.then(|| shape.get(1).copied()).flatten()
    });
    match width {
        Some(768) => Ok("SD 1.x".into()),
        Some(1024) => Ok("SD 2.x".into()),
        Some(2048) => Ok("SDXL".into()),
        _ if any(&|k| {
            k.starts_with("lora_te_")
                || k.starts_with("lora_te1_")
                || k.starts_with("text_encoder.")
        }) =>
        {
            Ok("SD 1.x / 2.x".into())
        }
        Some(w) => Err(format!(
            "cross-attention width {w}: not 768 (SD 1.x), 1024 (SD 2.x) or 2048 (SDXL)"
        )),
        None => Err("no cross-attention or FLUX keys to tell its model from".into()),
    }
}

/// The family of a GGUF file from its metadata and tensor table (read with
/// candle's GGUF reader, which stops before the tensor data).
fn gguf_family(path: &Path) -> std::result::Result<String, String> {
    let mut reader = std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|e| format!("GGUF: {e}"))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader)
        .map_err(|e| format!("GGUF: {e}"))?;
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let names: Vec<&String> = content.tensor_infos.keys().collect();
    let has = |p: &str| names.iter().any(|n| n.starts_with(p) || n.contains(p));
    if has("double_blocks.") {
        let img_in = content
            .tensor_infos
            .iter()
            .find(|(n, _)| n.ends_with("img_in.weight"))
            .map(|(_, t)| t.shape.dims().to_vec());
        if img_in.as_deref().is_some_and(|d| d.contains(&384)) {
            return Ok("FLUX.1 Fill".into());
        }
        return Ok(if has("guidance_in.") {
            "FLUX.1 dev"
        } else {
            "FLUX.1 schnell"
        }
        .into());
    }
    match architecture.as_deref() {
        Some("flux") => Ok("FLUX.1".into()),
        Some("sdxl") => Ok("SDXL".into()),
        Some("sd1") => Ok("SD 1.x".into()),
        Some("sd2") => Ok("SD 2.x".into()),
        Some(other) => Err(format!(
            "GGUF architecture `{other}` is not one easel knows"
        )),
        None => Err("GGUF without `general.architecture`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn scans_both_layouts_from_the_install_or_its_models_folder() {
        let dir = tempfile::tempdir().unwrap();
        let a1111 = dir.path().join("webui");
        touch(&a1111.join("models/Stable-diffusion/sd15.safetensors"));
        touch(&a1111.join("models/Stable-diffusion/sub/old.ckpt"));
        touch(&a1111.join("models/Lora/style.safetensors"));
        touch(&a1111.join("models/Lora/notes.txt"));
        let comfy = dir.path().join("ComfyUI/models");
        touch(&comfy.join("unet/flux.gguf"));
        touch(&comfy.join("clip/t5.safetensors"));
        // A diffusers folder given as a root is not an install.
        let diffusers = dir.path().join("sd");
        touch(&diffusers.join("model_index.json"));
        touch(&diffusers.join("vae/diffusion_pytorch_model.safetensors"));

        let found = scan_model_folders(&[a1111.clone(), comfy.clone(), diffusers]);
        let got: Vec<(String, FileKind, FolderLayout)> = found
            .iter()
            .map(|e| (e.name.clone(), e.kind, e.layout))
            .collect();
        assert_eq!(
            got,
            vec![
                ("sd15".into(), FileKind::Checkpoint, FolderLayout::A1111),
                ("old".into(), FileKind::Checkpoint, FolderLayout::A1111),
                ("style".into(), FileKind::Lora, FolderLayout::A1111),
                (
                    "flux".into(),
                    FileKind::DiffusionModel,
                    FolderLayout::ComfyUi
                ),
                ("t5".into(), FileKind::TextEncoder, FolderLayout::ComfyUi),
            ]
        );
        // The same install through two roots: listed once.
        assert_eq!(
            scan_model_folders(&[a1111.clone(), a1111.join("models")]).len(),
            3
        );
        // Names: exact file name first, then the stem; none for a path.
        let roots = [a1111.clone()];
        let kinds = [FileKind::Checkpoint];
        assert_eq!(
            find_by_name("sd15", &roots, &kinds, "model").unwrap(),
            Some(a1111.join("models/Stable-diffusion/sd15.safetensors"))
        );
        assert_eq!(
            find_by_name("old.ckpt", &roots, &kinds, "model").unwrap(),
            Some(a1111.join("models/Stable-diffusion/sub/old.ckpt"))
        );
        assert_eq!(
            find_by_name("style", &roots, &kinds, "model").unwrap(),
            None
        );
        assert_eq!(
            find_by_name("a/sd15", &roots, &kinds, "model").unwrap(),
            None
        );
        touch(&a1111.join("models/Stable-diffusion/sub/sd15.safetensors"));
        let err = find_by_name("sd15", &roots, &kinds, "model")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(err.contains("Stable-diffusion/sd15.safetensors"), "{err}");
        assert!(err.contains("sub/sd15.safetensors"), "{err}");
    }
}
