//! Reading LoRA files: the key layouts (diffusers / PEFT, kohya-ss,
//! attention processors), the header-only checks and [`LoraAdapter::open`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// One low-rank update of one module, as read from a file.
#[derive(Debug, Clone)]
pub(super) struct LoraLayer {
    /// The file's key stem (for error messages).
    pub(super) key: String,
    /// The pipeline component: `unet`, `text_encoder`, `text_encoder_2`, ...
    pub(super) component: String,
    /// The module name as the file spells it: dotted (diffusers / PEFT) or
    /// with underscores (kohya).
    pub(super) module: ModuleName,
    pub(super) down: Option<Tensor>,
    pub(super) up: Option<Tensor>,
    pub(super) alpha: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum ModuleName {
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
    pub(super) layers: Vec<LoraLayer>,
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
pub(super) fn component_of(stem: &str) -> (String, ModuleName) {
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
}
