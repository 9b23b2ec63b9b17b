//! LoRA adapters (Hu et al. 2021, arXiv:2106.09685): low-rank updates
//! `W' = W + scale · (α / r) · up · down` of a pipeline's weights, merged
//! into the UNet and text encoders with a scale per adapter; several stack.
//!
//! File layouts read (safetensors), as diffusers' `load_lora_weights` does:
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` (down, `(r, in)`) and
//!   `lora_B.weight` (up, `(out, r)`); `text_encoder.<module>...`,
//!   `text_encoder_2.<module>...` (SDXL); the older diffusers spellings
//!   `<module>.lora.down.weight` / `lora.up.weight`,
//!   `<module>.lora_linear_layer.down/up.weight` and attention-processor
//!   keys (`attn1.processor.to_q_lora.down.weight`); keys with no component
//!   prefix are the UNet's. No `alpha`: α = r (scale 1).
//! - kohya-ss: `lora_unet_<module_with_underscores>.lora_down.weight`,
//!   `lora_up.weight` and `.alpha` (α; the update is scaled by α / r);
//!   `lora_te_` / `lora_te1_` for the (first) text encoder, `lora_te2_` for
//!   SDXL's second. UNet names may use the diffusers module names or the
//!   original Stable Diffusion ones (`input_blocks_4_1_...`,
//!   `middle_block_1_...`, `output_blocks_...`), which are mapped as
//!   diffusers' `_maybe_map_sgm_blocks_to_diffusers` does. Underscore names
//!   are matched against the model's own module names, so they are never
//!   guessed.
//! - FLUX (`FluxTransformer2DModel`): the PEFT layout with `transformer.`
//!   (ai-toolkit, diffusers' trainers; `lora_down`/`lora_up`/`alpha`
//!   spellings too); kohya sd-scripts' `lora_unet_` keys with the original
//!   Black Forest Labs names (`double_blocks_0_img_attn_qkv`, fused q/k/v
//!   and `single_blocks_N_linear1` split by rows among the diffusers
//!   modules, see [`flux_bfl_to_diffusers`]), the same names with ComfyUI's
//!   `diffusion_model.` prefix, and `lora_transformer_` with diffusers names;
//!   `lora_te1_` for the CLIP text encoder. Unprefixed keys and `lora_unet_`
//!   name the transformer of a FLUX pipeline. Unlike diffusers 0.42.1, whose
//!   converter drops them, the kohya non-block layers (`img_in`, `txt_in`,
//!   `time_in`, `vector_in`, `guidance_in`, `final_layer`) are applied, with
//!   their α, as kohya's and ComfyUI's loaders do.
//!
//! Linear and convolution weights are supported (a convolution's update is
//! `up (out, r, 1, 1) · down (r, in, k, k)`). LyCORIS variants (LoHa, LoKr,
//! DoRA, `lora_mid`) are refused with an error naming the key.
//!
//! How adapters are applied: a pipeline keeps each targetable component's
//! weights in a [`CachedSource`] (the tensors its models hold). Setting a
//! new adapter set computes the merged updates, then rebuilds the affected
//! components from the cache with the updates added ([`LoraOverlay`]), and
//! swaps them in. Nothing is read from the weight files again, unmerging is
//! exact (the base tensors are untouched), and a switched pipeline computes
//! the same numbers as a freshly loaded one with the same adapters. The cost
//! of a switch is the update products (`out·in·r` per layer) and the sums
//! `W + ΔW` of the targeted weights; the extra memory, the merged copies of
//! the targeted weights.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::weights::{CachedSource, TensorSource, Weights};

/// One adapter to apply: a LoRA safetensors file and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file (see [`resolve_lora`] for folders and repo ids).
    pub path: PathBuf,
    /// The multiplier of the update (`lora_scale`; the product API accepts
    /// -1..=3). kohya files are further scaled by their α / r.
    pub scale: f64,
}

impl LoraSpec {
    /// An adapter at `scale`.
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self {
            path: path.into(),
            scale,
        }
    }
}

/// One low-rank update of one module, as read from a file.
#[derive(Debug, Clone)]
struct LoraLayer {
    /// The file's key stem (for error messages).
    key: String,
    /// The pipeline component: `unet`, `text_encoder`, `text_encoder_2`, ...
    component: String,
    /// The module name as the file spells it: dotted (diffusers / PEFT) or
    /// with underscores (kohya).
    module: ModuleName,
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ModuleName {
    Dotted(String),
    Underscored(String),
}

impl std::fmt::Display for ModuleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleName::Dotted(s) | ModuleName::Underscored(s) => f.write_str(s),
        }
    }
}

/// A parsed LoRA file: its low-rank layers, not yet matched to a model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    path: PathBuf,
    layers: Vec<LoraLayer>,
}

/// Which part of a key says down / up / alpha.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Split a key into (module stem, part), for every layout read.
fn split_key(key: &str) -> Option<(String, Part)> {
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(stem) = key.strip_suffix(suffix) {
            let part = match part {
                Part::Down => Part::Down,
                Part::Up => Part::Up,
                Part::Alpha => Part::Alpha,
            };
            return Some((stem.to_string(), part));
        }
    }
    // Attention-processor layout: `<attn>.processor.to_q_lora.down.weight`.
    for (proj, module) in [
        ("to_q", "to_q"),
        ("to_k", "to_k"),
        ("to_v", "to_v"),
        ("to_out", "to_out.0"),
    ] {
        for (dir, part) in [("down", Part::Down), ("up", Part::Up)] {
            let suffix = format!(".processor.{proj}_lora.{dir}.weight");
            if let Some(attn) = key.strip_suffix(&suffix) {
                return Some((format!("{attn}.{module}"), part));
            }
        }
    }
    None
}

/// Component and module name of a key stem.
fn component_of(stem: &str) -> (String, ModuleName) {
    for (prefix, component) in [
        ("lora_unet_", "unet"),
        ("lora_transformer_", "transformer"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return (component.into(), ModuleName::Underscored(rest.into()));
        }
    }
    // ComfyUI's spelling of the original FLUX names.
    if let Some(rest) = stem.strip_prefix("diffusion_model.") {
        return (
            "transformer".into(),
            ModuleName::Underscored(rest.replace('.', "_")),
        );
    }
    for component in [
        "unet",
        "text_encoder",
        "text_encoder_2",
        "transformer",
        "text_encoder_3",
    ] {
        if let Some(rest) = stem.strip_prefix(&format!("{component}.")) {
            return (component.into(), ModuleName::Dotted(rest.into()));
        }
    }
    ("unet".into(), ModuleName::Dotted(stem.into()))
}

/// The largest safetensors header [`check_lora_file`] reads (100 MB, the
/// limit the `safetensors` crate itself applies).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The error for `key`, which is of no LoRA layout this engine reads.
fn unknown_key(path: &Path, key: &str) -> Error {
    let variant = ["hada_", "lokr_", "dora_scale", "magnitude", "lora_mid"]
        .iter()
        .find(|v| key.contains(*v));
    Error::invalid(
        "lora",
        match variant {
            Some(v) => format!(
                "{}: key `{key}` is a LyCORIS / DoRA variant (`{v}`), which is not \
                 supported (plain LoRA only: lora_A/lora_B or lora_down/lora_up)",
                path.display()
            ),
            None => format!(
                "{}: key `{key}` is not a LoRA weight of a known layout \
                 (diffusers/PEFT `lora_A`/`lora_B`, kohya `lora_down`/`lora_up`/`alpha`)",
                path.display()
            ),
        },
    )
}

/// Check cheaply that `path` is a LoRA file [`LoraAdapter::open`] accepts,
/// reading only its safetensors header (the 8-byte little-endian length and
/// the JSON table of tensor names, never the weights): every key is of a
/// known layout (see the module docs), each module has both its down and
/// its up matrix, and there is at least one. Whether the modules match a
/// given model is only known once the model is loaded.
///
/// # Errors
/// An invalid `lora` value: an unreadable file, a header that is not
/// safetensors (longer than 100 MB, or not a JSON object), or the key
/// problems [`LoraAdapter::open`] reports.
pub fn check_lora_file(path: &Path) -> Result<()> {
    use std::io::Read;
    let not_safetensors = |why: String| {
        Error::invalid(
            "lora",
            format!("{}: not a readable safetensors file: {why}", path.display()),
        )
    };
    let mut file = std::fs::File::open(path).map_err(|e| not_safetensors(e.to_string()))?;
    let file_len = file
        .metadata()
        .map_err(|e| not_safetensors(e.to_string()))?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| not_safetensors("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(not_safetensors(format!(
            "the header length {header_len} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| not_safetensors(e.to_string()))?;
    check_lora_header(path, &header)
}

/// As [`check_lora_file`], for a whole file already in memory (an upload);
/// `label` names it in messages.
///
/// # Errors
/// As [`check_lora_file`].
pub fn check_lora_bytes(label: &Path, bytes: &[u8]) -> Result<()> {
    let not_safetensors = |why: String| {
        Error::invalid(
            "lora",
            format!(
                "{}: not a readable safetensors file: {why}",
                label.display()
            ),
        )
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| not_safetensors("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let available = bytes.len() as u64 - 8;
    if header_len > MAX_HEADER_BYTES || header_len > available {
        return Err(not_safetensors(format!(
            "the header length {header_len} does not fit the file ({} bytes)",
            bytes.len()
        )));
    }
    check_lora_header(label, &bytes[8..8 + header_len as usize])
}

/// The key checks of [`check_lora_file`] on a safetensors JSON header.
fn check_lora_header(path: &Path, header: &[u8]) -> Result<()> {
    let not_safetensors = |why: String| {
        Error::invalid(
            "lora",
            format!("{}: not a readable safetensors file: {why}", path.display()),
        )
    };
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| not_safetensors(format!("the header is not a JSON object: {e}")))?;
    check_lora_keys(
        path,
        header
            .keys()
            .filter(|k| *k != "__metadata__")
            .map(String::as_str),
    )
}

/// The key rules every LoRA file must pass, for [`LoraAdapter::open`] and the
/// header-only checks alike: each key of a known layout (see the module
/// docs), each module with both its down and its up matrix, and at least one
/// module. Keys are checked in sorted order, so the first problem reported
/// does not depend on the file's order.
///
/// # Errors
/// An invalid `lora` value naming the key or module at fault.
fn check_lora_keys<'a>(path: &Path, keys: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut keys: Vec<&str> = keys.collect();
    keys.sort_unstable();
    let mut parts: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for key in keys {
        let Some((stem, part)) = split_key(key) else {
            return Err(unknown_key(path, key));
        };
        let entry = parts.entry(stem).or_default();
        match part {
            Part::Down => entry.0 = true,
            Part::Up => entry.1 = true,
            Part::Alpha => {}
        }
    }
    for (stem, (down, up)) in &parts {
        if !down || !up {
            return Err(Error::invalid(
                "lora",
                format!(
                    "{}: `{stem}` has {} but no {} matrix",
                    path.display(),
                    if *down { "a down" } else { "an up" },
                    if *down { "up" } else { "down" },
                ),
            ));
        }
    }
    if parts.is_empty() {
        return Err(Error::invalid(
            "lora",
            format!("{}: no LoRA weights in the file", path.display()),
        ));
    }
    Ok(())
}

impl LoraAdapter {
    /// Read and parse a LoRA `.safetensors` file.
    ///
    /// Errors: an unreadable file, a key of no known LoRA layout (or of a
    /// LyCORIS variant: LoHa, LoKr, DoRA), or a module with a down matrix
    /// but no up matrix (or the reverse).
    pub fn open(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::invalid(
                "lora",
                format!("{}: not a readable safetensors file: {e}", path.display()),
            )
        })?;
        // The key rules first, before any tensor is converted.
        check_lora_keys(path, tensors.keys().map(String::as_str))?;
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let mut layers: BTreeMap<String, LoraLayer> = BTreeMap::new();
        for key in keys {
            let tensor = &tensors[key];
            let Some((stem, part)) = split_key(key) else {
                return Err(unknown_key(path, key));
            };
            let (component, module) = component_of(&stem);
            let layer = layers.entry(stem.clone()).or_insert_with(|| LoraLayer {
                key: stem.clone(),
                component,
                module,
                down: None,
                up: None,
                alpha: None,
            });
            let tensor = tensor.to_dtype(DType::F32)?;
            match part {
                Part::Down => layer.down = Some(tensor),
                Part::Up => layer.up = Some(tensor),
                Part::Alpha => {
                    layer.alpha = Some(
                        tensor
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .first()
                            .copied()
                            .ok_or_else(|| {
                                Error::invalid(
                                    "lora",
                                    format!("{}: `{key}` is empty", path.display()),
                                )
                            })? as f64,
                    )
                }
            }
        }
        let layers: Vec<LoraLayer> = layers.into_values().collect();
        Ok(Self {
            path: path.to_path_buf(),
            layers,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of low-rank layers (modules updated).
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the file has no layers (never true for an opened adapter).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// The module names of one component, to match adapter keys against.
struct ModuleIndex {
    /// Dotted module paths that have a `.weight`.
    dotted: HashSet<String>,
    /// `a_b_c` → `a.b.c` (kohya names).
    underscored: HashMap<String, String>,
}

impl ModuleIndex {
    fn new(source: &dyn TensorSource) -> Self {
        let dotted: HashSet<String> = source
            .keys()
            .into_iter()
            .filter_map(|k| k.strip_suffix(".weight").map(String::from))
            .collect();
        let underscored = dotted
            .iter()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        Self {
            dotted,
            underscored,
        }
    }

    /// The weights `name` updates in this component. `layers_per_block`
    /// enables the original-SD UNet names, `flux` the original FLUX ones.
    fn resolve(
        &self,
        name: &ModuleName,
        layers_per_block: Option<usize>,
        flux: bool,
    ) -> Option<Target> {
        let single = |m: String| Target {
            modules: vec![m],
            swap_halves: false,
        };
        match name {
            ModuleName::Dotted(m) => [m.clone(), format!("text_model.{m}")]
                .into_iter()
                .find(|c| self.dotted.contains(c))
                .map(single),
            ModuleName::Underscored(m) => {
                if let Some(found) = self.underscored.get(m) {
                    return Some(single(found.clone()));
                }
                if let Some(lpb) = layers_per_block {
                    let mapped = sgm_to_diffusers(m, lpb)?;
                    return self.underscored.get(&mapped).cloned().map(single);
                }
                if flux {
                    let target = flux_bfl_to_diffusers(m)?;
                    return target
                        .modules
                        .iter()
                        .all(|m| self.dotted.contains(m))
                        .then_some(target);
                }
                None
            }
        }
    }
}

/// The weights one layer of a file updates.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    /// Dotted module paths. A fused layer of the original FLUX code
    /// (`img_attn_qkv`, `linear1`) updates several: its update's rows are
    /// split among them in order, each taking its weight's row count.
    modules: Vec<String>,
    /// The update's two row halves are swapped first: the original FLUX
    /// `final_layer.adaLN_modulation` orders its output (shift, scale),
    /// diffusers' `norm_out.linear` (scale, shift).
    swap_halves: bool,
}

/// Map a module name of the original FLUX code (Black Forest Labs' `flux`
/// repository, as kohya sd-scripts and ComfyUI write LoRAs for it), with
/// underscores (`double_blocks_3_img_attn_qkv`), to the diffusers
/// `FluxTransformer2DModel` modules it updates, following diffusers'
/// `_convert_kohya_flux_lora_to_diffusers`:
///
/// - `double_blocks_{i}_`: `img_attn_qkv` → `attn.to_q/to_k/to_v`,
///   `img_attn_proj` → `attn.to_out.0`, `img_mlp_{0,2}` → `ff.net.{0.proj,2}`,
///   `img_mod_lin` → `norm1.linear`, and `txt_*` likewise →
///   `attn.add_{q,k,v}_proj`, `attn.to_add_out`, `ff_context.*`,
///   `norm1_context.linear`, under `transformer_blocks.{i}`;
/// - `single_blocks_{i}_`: `linear1` → `attn.to_q/to_k/to_v` + `proj_mlp`,
///   `linear2` → `proj_out`, `modulation_lin` → `norm.linear`, under
///   `single_transformer_blocks.{i}`;
/// - `img_in`, `txt_in`, `time_in_*`, `vector_in_*`, `guidance_in_*`,
///   `final_layer_linear`, `final_layer_adaLN_modulation_1` (rows swapped).
///
/// `None` when the name is none of these.
fn flux_bfl_to_diffusers(name: &str) -> Option<Target> {
    let target = |modules: Vec<String>| Target {
        modules,
        swap_halves: false,
    };
    let under = |prefix: String, parts: &[&str]| {
        target(parts.iter().map(|p| format!("{prefix}.{p}")).collect())
    };
    let block = |rest: &str| -> Option<(usize, String)> {
        let (i, part) = rest.split_once('_')?;
        Some((i.parse().ok()?, part.to_string()))
    };
    if let Some((i, part)) = name.strip_prefix("double_blocks_").and_then(block) {
        let prefix = format!("transformer_blocks.{i}");
        let parts: &[&str] = match part.as_str() {
            "img_attn_qkv" => &["attn.to_q", "attn.to_k", "attn.to_v"],
            "img_attn_proj" => &["attn.to_out.0"],
            "img_mlp_0" => &["ff.net.0.proj"],
            "img_mlp_2" => &["ff.net.2"],
            "img_mod_lin" => &["norm1.linear"],
            "txt_attn_qkv" => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "txt_attn_proj" => &["attn.to_add_out"],
            "txt_mlp_0" => &["ff_context.net.0.proj"],
            "txt_mlp_2" => &["ff_context.net.2"],
            "txt_mod_lin" => &["norm1_context.linear"],
            _ => return None,
        };
        return Some(under(prefix, parts));
    }
    if let Some((i, part)) = name.strip_prefix("single_blocks_").and_then(block) {
        let prefix = format!("single_transformer_blocks.{i}");
        let parts: &[&str] = match part.as_str() {
            "linear1" => &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2" => &["proj_out"],
            "modulation_lin" => &["norm.linear"],
            _ => return None,
        };
        return Some(under(prefix, parts));
    }
    let module = match name {
        "img_in" => "x_embedder",
        "txt_in" => "context_embedder",
        "time_in_in_layer" => "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer" => "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer" => "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer" => "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer" => "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer" => "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear" => "proj_out",
        "final_layer_adaLN_modulation_1" => {
            return Some(Target {
                modules: vec!["norm_out.linear".into()],
                swap_halves: true,
            })
        }
        _ => return None,
    };
    Some(target(vec![module.into()]))
}

/// Map an original-Stable-Diffusion UNet module name with underscores
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_k`) to the diffusers
/// one (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k`),
/// given the UNet's `layers_per_block`. `None` when it is not one.
pub fn sgm_to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    let resnet_part = |rest: &str| -> String {
        rest.replace("in_layers_2", "conv1")
            .replace("out_layers_3", "conv2")
            .replace("emb_layers_1", "time_emb_proj")
            .replace("skip_connection", "conv_shortcut")
    };
    let split_ids = |s: &str| -> Option<(usize, usize, String)> {
        let mut it = s.splitn(3, '_');
        let i = it.next()?.parse().ok()?;
        let j = it.next()?.parse().ok()?;
        Some((i, j, it.next().unwrap_or("").to_string()))
    };
    let join = |a: String, rest: &str| {
        if rest.is_empty() {
            a
        } else {
            format!("{a}_{rest}")
        }
    };
    if let Some(s) = name.strip_prefix("input_blocks_") {
        let (i, j, rest) = split_ids(s)?;
        if i == 0 {
            return Some("conv_in".into());
        }
        let (block, layer) = ((i - 1) / per, (i - 1) % per);
        return Some(match (j, rest.as_str()) {
            (0, r) if r.starts_with("op") => join(
                format!("down_blocks_{block}_downsamplers_0_conv"),
                r.trim_start_matches("op").trim_start_matches('_'),
            ),
            (0, r) => join(
                format!("down_blocks_{block}_resnets_{layer}"),
                &resnet_part(r),
            ),
            (1, r) => join(format!("down_blocks_{block}_attentions_{layer}"), r),
            _ => return None,
        });
    }
    if let Some(s) = name.strip_prefix("middle_block_") {
        let (j, rest) = s.split_once('_').unwrap_or((s, ""));
        return Some(match j.parse::<usize>().ok()? {
            0 => join("mid_block_resnets_0".into(), &resnet_part(rest)),
            1 => join("mid_block_attentions_0".into(), rest),
            2 => join("mid_block_resnets_1".into(), &resnet_part(rest)),
            _ => return None,
        });
    }
    if let Some(s) = name.strip_prefix("output_blocks_") {
        let (i, j, rest) = split_ids(s)?;
        let (block, layer) = (i / per, i % per);
        return Some(if rest == "conv" || rest.starts_with("conv_") {
            join(
                format!("up_blocks_{block}_upsamplers_0_conv"),
                rest[4..].trim_start_matches('_'),
            )
        } else {
            match j {
                0 => join(
                    format!("up_blocks_{block}_resnets_{layer}"),
                    &resnet_part(&rest),
                ),
                1 => join(format!("up_blocks_{block}_attentions_{layer}"), &rest),
                _ => return None,
            }
        });
    }
    let simple = [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ];
    simple
        .iter()
        .find(|(from, _)| *from == name)
        .map(|(_, to)| to.to_string())
}

/// The merged weight updates of an adapter set, per component:
/// weight key (`down_blocks.0....to_q.weight`) → `ΔW` (f32, the weight's shape).
pub type LoraDeltas = HashMap<String, HashMap<String, Tensor>>;

/// Compute the merged updates of `specs` for a pipeline whose targetable
/// components are `components` (name → base weights).
/// `unet_layers_per_block` enables the original-SD kohya names.
///
/// Errors: a file that cannot be read or parsed ([`LoraAdapter::open`]); a
/// LoRA for a component the pipeline lacks, or for a module the model lacks
/// (naming the first such module, in key order); matrices whose shapes do
/// not fit the weight; a scale that is not finite.
pub fn merge_deltas(
    specs: &[LoraSpec],
    components: &[(&str, &dyn TensorSource)],
    unet_layers_per_block: Option<usize>,
    device: &Device,
) -> Result<LoraDeltas> {
    let indexes: HashMap<&str, ModuleIndex> = components
        .iter()
        .map(|(name, source)| (*name, ModuleIndex::new(*source)))
        .collect();
    let mut deltas: LoraDeltas = HashMap::new();
    for spec in specs {
        if !spec.scale.is_finite() {
            return Err(Error::invalid(
                "lora",
                format!(
                    "{}: scale {} is not a finite number",
                    spec.path.display(),
                    spec.scale
                ),
            ));
        }
        let adapter = LoraAdapter::open(&spec.path)?;
        // Resolve every layer first, so an error leaves nothing half done.
        let mut resolved = Vec::with_capacity(adapter.layers.len());
        for layer in &adapter.layers {
            // Keys without a component, and kohya's `lora_unet_`, name the
            // denoiser: the UNet, or the transformer of a FLUX pipeline.
            let component = match layer.component.as_str() {
                "unet" if !indexes.contains_key("unet") && indexes.contains_key("transformer") => {
                    "transformer"
                }
                c => c,
            };
            let Some(index) = indexes.get(component) else {
                return Err(Error::invalid(
                    "lora",
                    format!(
                        "{}: `{}` targets component `{}`, which this pipeline does not have \
                         (it has {}): the LoRA was made for another model family",
                        spec.path.display(),
                        layer.key,
                        component,
                        components
                            .iter()
                            .map(|c| c.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            };
            let lpb = (component == "unet")
                .then_some(unet_layers_per_block)
                .flatten();
            let Some(target) = index.resolve(&layer.module, lpb, component == "transformer") else {
                return Err(Error::invalid(
                    "lora",
                    format!(
                        "{}: the model's {} has no module `{}` (key `{}`): the LoRA was made \
                         for another model",
                        spec.path.display(),
                        component,
                        layer.module,
                        layer.key
                    ),
                ));
            };
            resolved.push((layer, component, target));
        }
        if spec.scale == 0.0 {
            continue;
        }
        for (layer, component, target) in resolved {
            let source = components
                .iter()
                .find(|c| c.0 == component)
                .map(|c| c.1)
                .ok_or_else(|| Error::invalid("lora", "component vanished"))?;
            let weight_keys: Vec<String> = target
                .modules
                .iter()
                .map(|m| format!("{m}.weight"))
                .collect();
            let mut weight_dims = Vec::with_capacity(weight_keys.len());
            for key in &weight_keys {
                let base = source
                    .tensor(key, &[], device)?
                    .ok_or_else(|| Error::invalid("lora", format!("`{key}` is missing")))?;
                weight_dims.push(base.dims().to_vec());
            }
            let parts = layer_delta(
                layer,
                &weight_dims,
                target.swap_halves,
                spec.scale,
                &spec.path,
            )?;
            for (weight_key, delta) in weight_keys.into_iter().zip(parts) {
                let delta = delta.to_device(device)?;
                let slot = deltas
                    .entry(component.to_string())
                    .or_default()
                    .entry(weight_key);
                match slot {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let sum = (e.get() + &delta)?;
                        e.insert(sum);
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(delta);
                    }
                }
            }
        }
    }
    Ok(deltas)
}

/// `scale · (α / r) · up · down`, split by rows among the weights it
/// updates (one, or the parts of a fused layer) and shaped like each
/// (`weight_dims`); with `swap_halves`, the two row halves of the product
/// are exchanged first.
fn layer_delta(
    layer: &LoraLayer,
    weight_dims: &[Vec<usize>],
    swap_halves: bool,
    scale: f64,
    path: &Path,
) -> Result<Vec<Tensor>> {
    let (Some(down), Some(up)) = (&layer.down, &layer.up) else {
        return Err(Error::invalid(
            "lora",
            format!("`{}` is incomplete", layer.key),
        ));
    };
    let bad = |why: String| {
        Error::invalid(
            "lora",
            format!(
                "{}: `{}` does not fit the weight{} of shape {}: {why}",
                path.display(),
                layer.key,
                if weight_dims.len() > 1 { "s" } else { "" },
                weight_dims
                    .iter()
                    .map(|d| format!("{d:?}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ),
        )
    };
    let rank = *down
        .dims()
        .first()
        .ok_or_else(|| bad("empty down matrix".into()))?;
    let out = *up
        .dims()
        .first()
        .ok_or_else(|| bad("empty up matrix".into()))?;
    if rank == 0 || up.elem_count() != out * rank {
        return Err(bad(format!(
            "down {:?} and up {:?} do not share a rank",
            down.dims(),
            up.dims()
        )));
    }
    let down2 = down.reshape((rank, down.elem_count() / rank))?;
    let up2 = up.reshape((out, rank))?;
    let inner = down2.dim(1)?;
    let fits = weight_dims
        .iter()
        .map(|d| d.first().copied())
        .sum::<Option<usize>>()
        == Some(out)
        && weight_dims
            .iter()
            .all(|d| d.iter().product::<usize>() == d[0] * inner);
    if !fits || (swap_halves && out % 2 != 0) {
        return Err(bad(format!(
            "down {:?} and up {:?} make a {out}x{inner} update",
            down.dims(),
            up.dims(),
        )));
    }
    let factor = scale * layer.alpha.map_or(1.0, |a| a / rank as f64);
    let mut product = (up2.matmul(&down2)? * factor)?;
    if swap_halves {
        let half = out / 2;
        product = Tensor::cat(
            &[product.narrow(0, half, half)?, product.narrow(0, 0, half)?],
            0,
        )?;
    }
    let mut row = 0;
    let mut parts = Vec::with_capacity(weight_dims.len());
    for dims in weight_dims {
        parts.push(product.narrow(0, row, dims[0])?.reshape(dims.as_slice())?);
        row += dims[0];
    }
    Ok(parts)
}

/// A [`TensorSource`] that returns `W + ΔW` for the weights a
/// [`LoraDeltas`] entry names and the base tensors otherwise.
pub struct LoraOverlay {
    base: Arc<dyn TensorSource>,
    deltas: HashMap<String, Tensor>,
}

impl LoraOverlay {
    /// `base` with `deltas` (weight key → update of the weight's shape) added.
    pub fn new(base: Arc<dyn TensorSource>, deltas: HashMap<String, Tensor>) -> Self {
        Self { base, deltas }
    }
}

impl TensorSource for LoraOverlay {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        let Some(t) = self.base.tensor(name, shape, device)? else {
            return Ok(None);
        };
        match self.deltas.get(name) {
            Some(d) => Ok(Some((t.to_dtype(d.dtype())? + d)?)),
            None => Ok(Some(t)),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    fn origin(&self) -> PathBuf {
        self.base.origin()
    }

    fn keys(&self) -> Vec<String> {
        self.base.keys()
    }
}

/// The LoRA bookkeeping of a loaded pipeline: the cached base weights of
/// each component adapters can target, and the adapter set now merged.
pub struct LoraState {
    components: Vec<(String, Arc<CachedSource>)>,
    unet_layers_per_block: Option<usize>,
    active: Vec<LoraSpec>,
    /// Components whose models now hold merged weights.
    merged: HashSet<String>,
    dtype: DType,
    device: Device,
}

impl LoraState {
    /// Wrap each targetable component's weights in a cache (converted to
    /// `dtype` on `device`).
    pub fn new(
        components: Vec<(String, Arc<dyn TensorSource>)>,
        unet_layers_per_block: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            components: components
                .into_iter()
                .map(|(n, s)| (n, Arc::new(CachedSource::new(s, dtype))))
                .collect(),
            unet_layers_per_block,
            active: Vec::new(),
            merged: HashSet::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// The base weights of `component` (no adapters).
    pub fn base_weights(&self, component: &str) -> Result<Weights> {
        self.weights(component, None)
    }

    fn source(&self, component: &str) -> Result<&Arc<CachedSource>> {
        self.components
            .iter()
            .find(|c| c.0 == component)
            .map(|c| &c.1)
            .ok_or_else(|| Error::config(component, "not a LoRA-targetable component"))
    }

    /// The weights of `component` with `deltas` of it added, if any.
    pub fn weights(&self, component: &str, deltas: Option<&LoraDeltas>) -> Result<Weights> {
        let base: Arc<dyn TensorSource> = self.source(component)?.clone();
        let source: Arc<dyn TensorSource> = match deltas.and_then(|d| d.get(component)) {
            Some(d) if !d.is_empty() => Arc::new(LoraOverlay::new(base, d.clone())),
            _ => base,
        };
        Ok(Weights::new(source, component, self.dtype, &self.device))
    }

    /// The adapter set merged now.
    pub fn active(&self) -> &[LoraSpec] {
        &self.active
    }

    /// Compute the updates of `specs`, and the components that must be
    /// rebuilt to go from the active set to it (those merged now or after).
    pub fn plan(&self, specs: &[LoraSpec]) -> Result<(LoraDeltas, Vec<String>)> {
        let sources: Vec<(&str, &dyn TensorSource)> = self
            .components
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_ref() as &dyn TensorSource))
            .collect();
        let deltas = merge_deltas(specs, &sources, self.unet_layers_per_block, &self.device)?;
        let rebuild = self
            .components
            .iter()
            .map(|c| c.0.clone())
            .filter(|c| self.merged.contains(c) || deltas.get(c).is_some_and(|d| !d.is_empty()))
            .collect();
        Ok((deltas, rebuild))
    }

    /// `component` built again by `load` from its weights with `deltas`
    /// added, when `rebuild` (from [`Self::plan`]) names it; `None` when it
    /// keeps its current model.
    pub fn rebuilt<T>(
        &self,
        component: &str,
        deltas: &LoraDeltas,
        rebuild: &[String],
        load: impl FnOnce(&Weights) -> Result<T>,
    ) -> Result<Option<T>> {
        if !rebuild.iter().any(|c| c == component) {
            return Ok(None);
        }
        load(&self.weights(component, Some(deltas))?).map(Some)
    }

    /// Record that `specs` are now merged, per `deltas`.
    pub fn commit(&mut self, specs: &[LoraSpec], deltas: &LoraDeltas) {
        self.active = specs.to_vec();
        self.merged = deltas
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(c, _)| c.clone())
            .collect();
    }

    /// Tensors read from the weight files so far, over all targetable
    /// components (each at most once: switching adapters reads none).
    pub fn base_reads(&self) -> usize {
        self.components.iter().map(|c| c.1.reads()).sum()
    }
}

/// Find the LoRA file a reference names: a `.safetensors` file; a folder
/// holding `pytorch_lora_weights.safetensors` or a single `.safetensors`;
/// or a Hugging Face repo id (`org/name[@revision]`) whose snapshot in the
/// hub cache holds one (downloaded into the cache when not there, unless
/// `options` is offline).
///
/// Errors: nothing found, or several candidate files (naming them).
pub fn resolve_lora(reference: &str, options: &crate::loader::ResolveOptions) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return pick_lora_file(path);
    }
    crate::loader::resolve_lora_repo(reference, options, pick_lora_name)
}

/// The LoRA file among `names`: `pytorch_lora_weights.safetensors`, else the
/// only `.safetensors` at the top level.
pub(crate) fn pick_lora_name(names: &[String]) -> std::result::Result<String, String> {
    if let Some(n) = names
        .iter()
        .find(|n| *n == "pytorch_lora_weights.safetensors")
    {
        return Ok(n.clone());
    }
    let found: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err("no .safetensors LoRA file".into()),
        many => Err(format!(
            "several .safetensors files ({}); name the file",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn pick_lora_file(dir: &Path) -> Result<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pick_lora_name(&names)
        .map(|n| dir.join(n))
        .map_err(|why| Error::invalid("lora", format!("{}: {why}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_layout_split() {
        let cases = [
            ("unet.a.b.lora_A.weight", "unet.a.b"),
            ("lora_unet_a_b.lora_up.weight", "lora_unet_a_b"),
            ("lora_te_x.alpha", "lora_te_x"),
            ("text_encoder.t.lora.down.weight", "text_encoder.t"),
            (
                "unet.m.attn1.processor.to_out_lora.up.weight",
                "unet.m.attn1.to_out.0",
            ),
        ];
        for (key, stem) in cases {
            assert_eq!(split_key(key).unwrap().0, stem, "{key}");
        }
        assert!(split_key("unet.a.hada_w1_a").is_none());
        assert_eq!(
            component_of("lora_te2_text_model_x"),
            (
                "text_encoder_2".to_string(),
                ModuleName::Underscored("text_model_x".into())
            )
        );
        assert_eq!(
            component_of("down_blocks.0.x"),
            (
                "unet".to_string(),
                ModuleName::Dotted("down_blocks.0.x".into())
            )
        );
    }

    #[test]
    fn original_sd_names_map_to_diffusers() {
        let m = |s| sgm_to_diffusers(s, 2);
        assert_eq!(
            m("input_blocks_4_1_transformer_blocks_0_attn1_to_k").unwrap(),
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
        );
        assert_eq!(
            m("input_blocks_2_0_in_layers_2").unwrap(),
            "down_blocks_0_resnets_1_conv1"
        );
        assert_eq!(
            m("input_blocks_3_0_op").unwrap(),
            "down_blocks_0_downsamplers_0_conv"
        );
        assert_eq!(
            m("middle_block_1_proj_in").unwrap(),
            "mid_block_attentions_0_proj_in"
        );
        assert_eq!(
            m("middle_block_2_emb_layers_1").unwrap(),
            "mid_block_resnets_1_time_emb_proj"
        );
        assert_eq!(
            m("output_blocks_5_1_proj_out").unwrap(),
            "up_blocks_1_attentions_2_proj_out"
        );
        assert_eq!(
            m("output_blocks_2_2_conv").unwrap(),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(
            m("output_blocks_2_1_conv").unwrap(),
            "up_blocks_0_upsamplers_0_conv"
        );
        assert_eq!(
            m("output_blocks_0_0_skip_connection").unwrap(),
            "up_blocks_0_resnets_0_conv_shortcut"
        );
        assert!(m("something_else").is_none());
    }

    #[test]
    fn picks_the_lora_file() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pick_lora_name(&names(&["README.md", "x.safetensors"])).unwrap(),
            "x.safetensors"
        );
        assert_eq!(
            pick_lora_name(&names(&[
                "a.safetensors",
                "pytorch_lora_weights.safetensors"
            ]))
            .unwrap(),
            "pytorch_lora_weights.safetensors"
        );
        assert!(pick_lora_name(&names(&["a.safetensors", "b.safetensors"])).is_err());
        assert!(pick_lora_name(&names(&["a.bin"])).is_err());
    }

    #[test]
    fn original_flux_names_map_to_diffusers_modules() {
        let t = flux_bfl_to_diffusers("double_blocks_12_txt_attn_qkv").unwrap();
        assert_eq!(
            t.modules,
            [
                "transformer_blocks.12.attn.add_q_proj",
                "transformer_blocks.12.attn.add_k_proj",
                "transformer_blocks.12.attn.add_v_proj"
            ]
        );
        assert!(!t.swap_halves);
        let t = flux_bfl_to_diffusers("single_blocks_3_linear1").unwrap();
        assert_eq!(t.modules.len(), 4);
        assert_eq!(t.modules[3], "single_transformer_blocks.3.proj_mlp");
        let t = flux_bfl_to_diffusers("final_layer_adaLN_modulation_1").unwrap();
        assert_eq!(t.modules, ["norm_out.linear"]);
        assert!(t.swap_halves);
        assert_eq!(
            flux_bfl_to_diffusers("guidance_in_out_layer")
                .unwrap()
                .modules,
            ["time_text_embed.guidance_embedder.linear_2"]
        );
        for bad in [
            "double_blocks_x_img_attn_qkv",
            "double_blocks_0_img_attn_norm",
            "single_blocks_0",
            "down_blocks_0_attentions_0",
        ] {
            assert!(flux_bfl_to_diffusers(bad).is_none(), "{bad}");
        }
        assert_eq!(
            component_of("diffusion_model.double_blocks.0.img_attn.qkv"),
            (
                "transformer".to_string(),
                ModuleName::Underscored("double_blocks_0_img_attn_qkv".into())
            )
        );
        assert_eq!(
            component_of("lora_transformer_single_transformer_blocks_0_proj_out"),
            (
                "transformer".to_string(),
                ModuleName::Underscored("single_transformer_blocks_0_proj_out".into())
            )
        );
    }

    /// A fused update is split by rows, and the halves swap when asked.
    #[test]
    fn fused_updates_split_by_rows() {
        let down = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let up = Tensor::new(
            &[[1f32, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let layer = LoraLayer {
            key: "k".into(),
            component: "transformer".into(),
            module: ModuleName::Dotted("m".into()),
            down: Some(down),
            up: Some(up),
            alpha: Some(1.0),
        };
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let parts = layer_delta(
            &layer,
            &[vec![1, 2], vec![3, 2]],
            false,
            2.0,
            Path::new("f"),
        )
        .unwrap();
        // scale 2 · α/r = 1/2 → factor 1.
        assert_eq!(rows(&parts[0]), [[1.0, 0.0]]);
        assert_eq!(rows(&parts[1]), [[0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]);
        let swapped = layer_delta(&layer, &[vec![4, 2]], true, 2.0, Path::new("f")).unwrap();
        assert_eq!(
            rows(&swapped[0]),
            [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]]
        );
        let e = layer_delta(
            &layer,
            &[vec![2, 2], vec![3, 2]],
            false,
            1.0,
            Path::new("f"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[2, 2] + [3, 2]"), "{e}");
    }
}
