//! Component files: one component of a model (`unet`, `transformer`,
//! `vae`, `text_encoder`, `text_encoder_2`) read from a separate
//! `.safetensors` file instead of the model's own weights, as ComfyUI's
//! separate UNet / VAE / CLIP loaders and `easel generate --vae FILE` do.
//!
//! A component file may be in the diffusers / transformers layout of that
//! component (the keys of the folder's `vae/diffusion_pytorch_model.safetensors`,
//! a `sdxl_vae.safetensors`), or in an original layout: an LDM VAE
//! (`encoder.down.0...`), an LDM UNet (`input_blocks.*`), a FLUX.1
//! transformer in the Black Forest Labs layout (`double_blocks.*`), a CLIP
//! text encoder (`text_model.*`) or an OpenCLIP one
//! (`transformer.resblocks.*`), a T5 encoder (`encoder.block.*`); each
//! optionally under a prefix (`first_stage_model.`,
//! `model.diffusion_model.`, `cond_stage_model.transformer.`,
//! `conditioner.embedders.N.`, ...), so a whole single-file checkpoint can
//! also give one component. The layout is found from anchor keys and
//! renamed with the single-file key maps ([`super::ldm_keys`],
//! [`super::flux_keys`]). Before the model loads, the decisive tensor
//! shapes are checked against the model's config for that component (and
//! every tensor against the model's own weights when they are on disk), so
//! a file of another architecture is refused naming the flag, the file,
//! the tensor and both shapes.
//!
//! The overrides sit on the [`ModelDir`] ([`ModelDir::component_file`]):
//! every pipeline opens its components through
//! `pipelines::component_source`, which reads an overridden component
//! from its file, and the memory estimate counts the file's tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::checkpoint::CheckpointFile;
use super::flux_keys;
use super::ldm_keys::{self, Op};
use super::single_file::{self, RenamedSource};
use super::ModelDir;
use crate::error::{Error, Result};
use crate::models::quantize::Quantization;
use crate::models::weights::TensorSource;

/// The components a component file may replace.
pub const OVERRIDABLE_COMPONENTS: [&str; 5] = [
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
];

/// The `easel generate` flag of a component (`text_encoder_2` →
/// `--text-encoder-2`).
pub fn component_flag(component: &str) -> String {
    format!("--{}", component.replace('_', "-"))
}

/// Which files replace which components of a model: component name →
/// `.safetensors` file. Ordered by component name, so equal sets give
/// equal [`Self::model_key`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentFiles(BTreeMap<String, PathBuf>);

impl ComponentFiles {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace `component` (one of [`OVERRIDABLE_COMPONENTS`]) with `file`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a component name not in
    /// [`OVERRIDABLE_COMPONENTS`], naming the allowed ones.
    pub fn insert(&mut self, component: &str, file: impl Into<PathBuf>) -> Result<()> {
        if !OVERRIDABLE_COMPONENTS.contains(&component) {
            return Err(Error::invalid(
                "component file",
                format!(
                    "`{component}` is not a component a file can replace; allowed: {}",
                    OVERRIDABLE_COMPONENTS.join(", ")
                ),
            ));
        }
        self.0.insert(component.to_string(), file.into());
        Ok(())
    }

    /// The file replacing `component`, if any.
    pub fn get(&self, component: &str) -> Option<&Path> {
        self.0.get(component).map(PathBuf::as_path)
    }

    /// `(component, file)` pairs, by component name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.0.iter().map(|(c, f)| (c.as_str(), f.as_path()))
    }

    /// Whether no component is replaced.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of model `reference` with these overrides, for the model
    /// cache and [`super::ResolveOptions::component_files`]: `reference`
    /// itself without overrides, else
    /// `reference [vae=/path/vae.safetensors, unet=...]`, so the same model
    /// with other component files is another cache entry.
    pub fn model_key(&self, reference: &str) -> String {
        if self.is_empty() {
            return reference.to_string();
        }
        let list: Vec<String> = self
            .iter()
            .map(|(c, f)| format!("{c}={}", f.display()))
            .collect();
        format!("{reference} [{}]", list.join(", "))
    }
}

/// A model reference with component files and / or a quantization at
/// load (see [`super::ResolveOptions::component_files`]): resolving its
/// [`Self::key`] resolves `model`, then replaces the components and sets
/// the quantization ([`ModelDir::with_quantization`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentOverrides {
    /// The model: a diffusers folder, a repo id or a single-file checkpoint.
    pub model: String,
    /// The files replacing some of its components.
    pub files: ComponentFiles,
    /// The quantization its large components get as they load (a registry
    /// entry's `quantize`).
    pub quantization: Option<Quantization>,
    /// FLUX: T5 loaded for each prompt encoding and freed after (a registry
    /// entry's `offload_t5`; [`super::ModelDir::with_offloaded_t5`]).
    /// Models without T5 ignore it.
    pub offload_t5: bool,
}

impl ComponentOverrides {
    /// The reference that resolves to this model with its overrides
    /// ([`ComponentFiles::model_key`]; with load settings,
    /// `reference [quantize=q8_0, offload_t5, vae=...]`).
    pub fn key(&self) -> String {
        let mut settings = Vec::new();
        if let Some(q) = self.quantization {
            settings.push(format!("quantize={}", q.name()));
        }
        if self.offload_t5 {
            settings.push("offload_t5".to_string());
        }
        if settings.is_empty() {
            return self.files.model_key(&self.model);
        }
        let files = self.files.model_key("");
        let files = files
            .trim_start()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if !files.is_empty() {
            settings.push(files.to_string());
        }
        format!("{} [{}]", self.model, settings.join(", "))
    }

    /// Whether it changes nothing (no files, no load settings).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.quantization.is_none() && !self.offload_t5
    }
}

/// The key layout a component file was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentLayout {
    /// The diffusers / transformers names of the component (T5 encoders
    /// and CLIP text encoders in transformers' own layout included).
    Diffusers,
    /// An LDM (CompVis / A1111) VAE: `encoder.down.N.block.M...`.
    LdmVae,
    /// An LDM UNet: `input_blocks.N.M...`, `middle_block.*`, `output_blocks.*`.
    LdmUnet,
    /// An OpenCLIP text encoder: `transformer.resblocks.N...` with fused `in_proj`.
    OpenClip,
    /// A FLUX.1 transformer in the Black Forest Labs layout: `double_blocks.*`.
    FluxBfl,
}

impl ComponentLayout {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ComponentLayout::Diffusers => "diffusers",
            ComponentLayout::LdmVae => "LDM VAE",
            ComponentLayout::LdmUnet => "LDM UNet",
            ComponentLayout::OpenClip => "OpenCLIP",
            ComponentLayout::FluxBfl => "FLUX.1 BFL",
        }
    }
}

/// One component's renames: diffusers key → (file key, reshaping).
type KeyMap = HashMap<String, (String, Op)>;

/// A component file, opened and checked against its model: the mapped
/// file and, for each diffusers key of the component, the file key it is
/// read from.
pub struct ComponentFile {
    component: String,
    path: PathBuf,
    layout: ComponentLayout,
    prefix: String,
    tensors: Arc<CheckpointFile>,
    map: Arc<KeyMap>,
}

impl std::fmt::Debug for ComponentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentFile")
            .field("component", &self.component)
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("prefix", &self.prefix)
            .field("tensors", &self.map.len())
            .finish()
    }
}

impl ComponentFile {
    /// The component it replaces.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout its keys were found in.
    pub fn layout(&self) -> ComponentLayout {
        self.layout
    }

    /// The prefix its component's keys carry in the file (empty for none;
    /// `first_stage_model.`, `model.diffusion_model.`, ...).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The component's weights, read from the file under their diffusers
    /// names.
    pub fn source(&self) -> Arc<dyn TensorSource> {
        Arc::new(RenamedSource::new(
            self.path.clone(),
            self.tensors.clone(),
            self.map.clone(),
        ))
    }

    /// The tensors as the model will load them, from the header only:
    /// `(diffusers name, safetensors dtype name, shape)` (as
    /// [`super::SingleFile::tensor_infos`]), for the model cache's estimate.
    pub fn tensor_infos(&self) -> Vec<(String, String, Vec<usize>)> {
        self.map
            .iter()
            .filter_map(|(name, (key, op))| {
                Some((
                    name.clone(),
                    self.tensors.dtype_name(key)?,
                    loaded_shape(&self.tensors.shape(key)?, *op),
                ))
            })
            .collect()
    }

    /// The shape `name` (a diffusers key) loads with, when the file holds it.
    pub(super) fn shape(&self, name: &str) -> Option<(Vec<usize>, &str, Op)> {
        let (key, op) = self.map.get(name)?;
        Some((
            loaded_shape(&self.tensors.shape(key)?, *op),
            key.as_str(),
            *op,
        ))
    }
}

/// The shape a stored tensor has once `op` cut it (a reshaped one keeps
/// its stored shape: the model's shape decides).
fn loaded_shape(stored: &[usize], op: Op) -> Vec<usize> {
    let mut shape = stored.to_vec();
    match op {
        Op::Chunk { parts, .. } if !shape.is_empty() => shape[0] /= parts.max(1),
        Op::Rows { len, .. } if !shape.is_empty() => shape[0] = len,
        Op::Transpose => shape.reverse(),
        _ => {}
    }
    shape
}

/// `model` with the components `files` names read from those files:
/// each file opened and checked ([`open_component_file`]).
///
/// # Errors
/// As [`open_component_file`], for the first file that fails.
pub(crate) fn apply_component_files(
    mut model: ModelDir,
    files: &ComponentFiles,
) -> Result<ModelDir> {
    for (component, file) in files.iter() {
        let opened = open_component_file(&model, component, file)?;
        model.set_component_file(Arc::new(opened));
    }
    Ok(model)
}

/// Opens `file` as component `component` of `model`: refuses pickles and
/// non-safetensors files, finds the layout of the component's keys
/// (by the model's class for the component), renames them to diffusers'
/// names and checks the decisive shapes against the component's config,
/// then every tensor against the model's own weights for it where those
/// are on disk.
///
/// # Errors
/// [`Error::InvalidArgument`] with the flag as the field
/// ([`component_flag`]: `--vae`, ...) and the file in the message: the
/// model has no such component; the file is missing, a pickle or not
/// safetensors; its keys match no layout of the component's class (naming
/// what was looked for, and the component the file looks like, if any); a
/// tensor has another shape than the model's (naming the tensor and both
/// shapes).
pub fn open_component_file(
    model: &ModelDir,
    component: &str,
    file: &Path,
) -> Result<ComponentFile> {
    let flag = component_flag(component);
    let invalid = |message: String| Error::invalid(flag.clone(), message);
    let Some(entry) = model.component(component) else {
        let listed: Vec<&str> = model
            .components()
            .filter(|c| OVERRIDABLE_COMPONENTS.contains(&c.name.as_str()))
            .map(|c| c.name.as_str())
            .collect();
        return Err(invalid(format!(
            "{} ({}) has no `{component}` component to replace with {}; its components that a \
             file can replace: {}",
            model.name(),
            model.pipeline_class(),
            file.display(),
            listed.join(", ")
        )));
    };
    let class = entry.class_name.clone();
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if single_file::PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        let message = match single_file::pickle_refusal(file) {
            Error::InvalidArgument { message, .. } => message,
            other => other.to_string(),
        };
        return Err(invalid(message));
    }
    if !file.is_file() {
        return Err(invalid(format!(
            "{}: no such file (a component file is a .safetensors or .gguf file)",
            file.display()
        )));
    }
    let tensors = CheckpointFile::open(file).map_err(|e| match e {
        Error::InvalidArgument { message, .. } => invalid(message),
        other => invalid(other.to_string()),
    })?;
    let keys = tensors.keys_and_shapes();
    let config = model.component_config(component)?;
    let Some((layout, prefix, map)) = find_layout(&class, component, &config, &keys)? else {
        return Err(invalid(no_layout_message(file, component, &class, &keys)));
    };
    let opened = ComponentFile {
        component: component.to_string(),
        path: file.to_path_buf(),
        layout,
        prefix,
        tensors: Arc::new(tensors),
        map: Arc::new(map),
    };
    super::component_shapes::check_shapes(model, &opened, &class, &config).map_err(invalid)?;
    Ok(opened)
}

/// The first key ending in `anchor` (shortest prefix first), as the
/// prefix before it; with `filter` on the prefix.
fn prefixes<'a>(keys: &'a [(String, Vec<usize>)], anchor: &str) -> Vec<&'a str> {
    let mut found: Vec<&str> = keys
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(anchor))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .collect();
    found.sort_by_key(|p| (p.len(), *p));
    found
}

/// Every key under `prefix`, without it, mapped to itself.
fn identity(keys: &[(String, Vec<usize>)], prefix: &str) -> KeyMap {
    keys.iter()
        .filter_map(|(k, _)| {
            k.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), (k.clone(), Op::Same)))
        })
        .collect()
}

/// An integer of a config.
pub(super) fn config_usize(config: &Value, key: &str) -> Option<usize> {
    config.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

/// A list of integers of a config.
pub(super) fn config_list(config: &Value, key: &str) -> Option<Vec<usize>> {
    config
        .get(key)?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().map(|v| v as usize))
        .collect()
}

/// The layout, prefix and key map of the component in `keys`; `None`
/// when no layout of `class` matches.
fn find_layout(
    class: &str,
    component: &str,
    config: &Value,
    keys: &[(String, Vec<usize>)],
) -> Result<Option<(ComponentLayout, String, KeyMap)>> {
    let has = |k: &str| keys.iter().any(|(key, _)| key.starts_with(k));
    let found = |layout, prefix: &str, map: KeyMap| Ok(Some((layout, prefix.to_string(), map)));
    if class.starts_with("AutoencoderKL") {
        for p in prefixes(keys, "decoder.conv_in.weight") {
            if has(&format!("{p}decoder.up_blocks.")) {
                let mut map = identity(keys, p);
                deprecated_attention_names(&mut map);
                return found(ComponentLayout::Diffusers, p, map);
            }
            if has(&format!("{p}decoder.up.")) {
                let up_blocks = config_list(config, "block_out_channels")
                    .map(|b| b.len())
                    .ok_or_else(|| {
                        Error::config("vae", "the config has no `block_out_channels`")
                    })?;
                let mut map = KeyMap::new();
                for (key, _) in keys {
                    if let Some((d, op)) = key
                        .strip_prefix(p)
                        .and_then(|r| ldm_keys::vae_key(r, up_blocks))
                    {
                        map.insert(d, (key.clone(), op));
                    }
                }
                return found(ComponentLayout::LdmVae, p, map);
            }
        }
    } else if class.starts_with("UNet2DConditionModel") {
        if let Some(p) = prefixes(keys, "time_embedding.linear_1.weight").first() {
            return found(ComponentLayout::Diffusers, p, identity(keys, p));
        }
        if let Some(p) = prefixes(keys, "input_blocks.0.0.weight").first() {
            let layers_per_block = config_usize(config, "layers_per_block").ok_or_else(|| {
                Error::config(
                    component,
                    "the config has no integer `layers_per_block` (a list is not supported for \
                     LDM-layout UNet files)",
                )
            })?;
            let mut map = KeyMap::new();
            for (key, _) in keys {
                if let Some(d) = key
                    .strip_prefix(*p)
                    .and_then(|r| ldm_keys::unet_key(r, layers_per_block))
                {
                    map.insert(d, (key.clone(), Op::Same));
                }
            }
            return found(ComponentLayout::LdmUnet, p, map);
        }
    } else if class.starts_with("FluxTransformer2DModel") {
        if let Some(p) = prefixes(keys, "x_embedder.weight").first() {
            if has(&format!("{p}transformer_blocks.")) {
                return found(ComponentLayout::Diffusers, p, identity(keys, p));
            }
        }
        if let Some(p) = prefixes(keys, "img_in.weight").first() {
            let p: &str = p;
            let hidden = keys
                .iter()
                .find(|(k, _)| *k == format!("{p}img_in.weight"))
                .and_then(|(_, s)| s.first().copied())
                .unwrap_or(0);
            let mut map = KeyMap::new();
            for (key, shape) in keys {
                let Some(rest) = key.strip_prefix(p) else {
                    continue;
                };
                let rows = shape.first().copied().unwrap_or(0);
                for (d, op) in flux_keys::flux_keys(rest, rows, hidden) {
                    map.insert(d, (key.clone(), op));
                }
            }
            return found(ComponentLayout::FluxBfl, p, map);
        }
    } else if class.starts_with("CLIPTextModel") {
        // CLIP (transformers names, under any prefix) or OpenCLIP; with
        // several (a whole SDXL checkpoint), `conditioner.embedders.0` is
        // the first text encoder and `.1` the second.
        let mut candidates: Vec<(ComponentLayout, String)> = Vec::new();
        for p in prefixes(keys, "embeddings.position_embedding.weight") {
            // `text_model.` belongs to the diffusers names, not the prefix.
            let outer = p.strip_suffix("text_model.").unwrap_or(p);
            candidates.push((ComponentLayout::Diffusers, outer.to_string()));
        }
        for p in prefixes(keys, "positional_embedding") {
            if has(&format!("{p}transformer.resblocks.")) {
                candidates.push((ComponentLayout::OpenClip, p.to_string()));
            }
        }
        let index = if component == "text_encoder_2" { 1 } else { 0 };
        let preferred = candidates
            .iter()
            .position(|(_, p)| p.contains(&format!("embedders.{index}.")))
            .unwrap_or(0);
        if let Some((layout, p)) = candidates.get(preferred) {
            let mut map = KeyMap::new();
            for (key, _) in keys {
                let Some(rest) = key.strip_prefix(p.as_str()) else {
                    continue;
                };
                match layout {
                    ComponentLayout::OpenClip => {
                        for (d, op) in ldm_keys::open_clip_keys(rest) {
                            map.insert(d, (key.clone(), op));
                        }
                    }
                    _ => {
                        map.insert(ldm_keys::clip_key(rest), (key.clone(), Op::Same));
                    }
                }
            }
            return found(*layout, p, map);
        }
    } else if class.starts_with("T5EncoderModel") {
        if let Some(p) = prefixes(keys, "encoder.block.0.layer.0.SelfAttention.q.weight").first() {
            return found(ComponentLayout::Diffusers, p, identity(keys, p));
        }
    } else {
        return Err(Error::invalid(
            component_flag(component),
            format!(
                "the `{component}` component is a {class}, which component files cannot replace"
            ),
        ));
    }
    Ok(None)
}

/// Older diffusers VAE files (e.g. `stabilityai/sd-vae-ft-mse`) name the
/// mid-block attention's projections `query`, `key`, `value` and
/// `proj_attn`; today's names (`to_q`, `to_k`, `to_v`, `to_out.0`) are
/// added for them, as diffusers' `_convert_deprecated_attention_blocks`
/// renames them on load.
fn deprecated_attention_names(map: &mut KeyMap) {
    const RENAMES: [(&str, &str); 4] = [
        (".attentions.0.query.", ".attentions.0.to_q."),
        (".attentions.0.key.", ".attentions.0.to_k."),
        (".attentions.0.value.", ".attentions.0.to_v."),
        (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
    ];
    let renamed: Vec<(String, (String, Op))> = map
        .iter()
        .filter_map(|(name, source)| {
            let (old, new) = RENAMES.iter().find(|(old, _)| name.contains(old))?;
            Some((name.replace(old, new), source.clone()))
        })
        .collect();
    map.extend(renamed);
}

/// The component kinds whose anchor keys a file holds, for the hint of a
/// file given for the wrong component.
fn looks_like(keys: &[(String, Vec<usize>)]) -> Vec<&'static str> {
    let any = |anchor: &str| !prefixes(keys, anchor).is_empty();
    let mut kinds = Vec::new();
    if any("decoder.conv_in.weight") {
        kinds.push("a VAE (--vae)");
    }
    if any("time_embedding.linear_1.weight") || any("input_blocks.0.0.weight") {
        kinds.push("a UNet (--unet)");
    }
    if any("x_embedder.weight") || any("img_in.weight") {
        kinds.push("a FLUX transformer (--transformer)");
    }
    if any("embeddings.position_embedding.weight") || any("positional_embedding") {
        kinds.push("a CLIP text encoder (--text-encoder / --text-encoder-2)");
    }
    if any("encoder.block.0.layer.0.SelfAttention.q.weight") {
        kinds.push("a T5 text encoder (--text-encoder-2 of FLUX)");
    }
    kinds
}

/// The refusal of a file whose keys match no layout of the component.
fn no_layout_message(
    file: &Path,
    component: &str,
    class: &str,
    keys: &[(String, Vec<usize>)],
) -> String {
    let looked_for = if class.starts_with("AutoencoderKL") {
        "`decoder.conv_in.weight` with `decoder.up_blocks.*` (diffusers) or `decoder.up.*` \
         (LDM), under any prefix (`first_stage_model.`, `vae.`)"
    } else if class.starts_with("UNet2DConditionModel") {
        "`time_embedding.linear_1.weight` (diffusers) or `input_blocks.0.0.weight` (LDM), under \
         any prefix (`model.diffusion_model.`)"
    } else if class.starts_with("FluxTransformer2DModel") {
        "`x_embedder.weight` with `transformer_blocks.*` (diffusers) or `img_in.weight` with \
         `double_blocks.*` (BFL), under any prefix (`model.diffusion_model.`)"
    } else if class.starts_with("CLIPTextModel") {
        "`text_model.embeddings.position_embedding.weight` (transformers CLIP) or \
         `positional_embedding` with `transformer.resblocks.*` (OpenCLIP), under any prefix \
         (`cond_stage_model.transformer.`, `conditioner.embedders.N.`)"
    } else {
        "`encoder.block.0.layer.0.SelfAttention.q.weight` (transformers T5), under any prefix"
    };
    let hint = match looks_like(keys).as_slice() {
        [] if keys.iter().any(|(k, _)| k.contains("lora")) => {
            " It looks like a LoRA adapter: pass it with --lora / `loras`.".to_string()
        }
        [] => String::new(),
        kinds => format!(" It looks like {}.", kinds.join(" and ")),
    };
    let mut first: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    first.sort_unstable();
    first.truncate(6);
    format!(
        "{}: its keys match no layout of the model's `{component}` ({class}); looked for \
         {looked_for}. Found {} keys, starting: {}.{hint}",
        file.display(),
        keys.len(),
        if first.is_empty() {
            "(none)".to_string()
        } else {
            first.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_keys_name_every_file_in_component_order() {
        let mut files = ComponentFiles::new();
        assert_eq!(files.model_key("org/model"), "org/model");
        files.insert("vae", "/m/vae.safetensors").unwrap();
        files.insert("text_encoder", "/m/clip.safetensors").unwrap();
        assert_eq!(
            files.model_key("org/model"),
            "org/model [text_encoder=/m/clip.safetensors, vae=/m/vae.safetensors]"
        );
        let err = files.insert("tokenizer", "/m/x.safetensors").unwrap_err();
        assert!(
            err.to_string().contains("allowed: unet, transformer"),
            "{err}"
        );
        assert_eq!(component_flag("text_encoder_2"), "--text-encoder-2");
    }

    #[test]
    fn prefixes_end_at_a_dot_shortest_first() {
        let keys: Vec<(String, Vec<usize>)> = [
            "first_stage_model.decoder.conv_in.weight",
            "decoder.conv_in.weight",
            "xdecoder.conv_in.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), vec![1]))
        .collect();
        assert_eq!(
            prefixes(&keys, "decoder.conv_in.weight"),
            ["", "first_stage_model."]
        );
    }
}
