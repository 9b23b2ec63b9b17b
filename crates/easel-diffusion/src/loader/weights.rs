//! Which weight files of a component folder to load (or download).
//!
//! The names follow diffusers (`diffusion_pytorch_model[.<variant>].safetensors`)
//! and transformers (`model[.<variant>].safetensors`); a sharded checkpoint
//! has an index `<name>.safetensors.index[.<variant>].json` whose
//! `weight_map` names the shards. The `fp16` variant is preferred when a
//! folder has it (half the size; the engine computes in its own dtype), then
//! the plain file. Pickle and other formats are never chosen.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The weight file stems, diffusers' then transformers'.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Variants in order of preference (`None`: the plain file).
const VARIANTS: [Option<&str>; 2] = [Some("fp16"), None];

/// Extensions of weight formats that are recognised but not supported.
const UNSUPPORTED_EXTENSIONS: [&str; 7] =
    [".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx"];

/// The weights chosen in one component folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WeightChoice {
    /// One `.safetensors` file.
    Single(String),
    /// A shard index (`*.safetensors.index[.fp16].json`); the shards are in its `weight_map`.
    Sharded(String),
}

/// Why no weights could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoWeights {
    /// No weight file at all.
    Missing,
    /// Only files in unsupported formats (their names).
    Unsupported(Vec<String>),
}

/// Chooses the weights among the file names (not paths) of one component folder.
pub(crate) fn choose(files: &[&str]) -> std::result::Result<WeightChoice, NoWeights> {
    let has = |name: &str| files.contains(&name);
    for variant in VARIANTS {
        for stem in STEMS {
            let (single, index) = match variant {
                Some(v) => (
                    format!("{stem}.{v}.safetensors"),
                    format!("{stem}.safetensors.index.{v}.json"),
                ),
                None => (
                    format!("{stem}.safetensors"),
                    format!("{stem}.safetensors.index.json"),
                ),
            };
            if has(&single) {
                return Ok(WeightChoice::Single(single));
            }
            if has(&index) {
                return Ok(WeightChoice::Sharded(index));
            }
        }
    }
    let unsupported: Vec<String> = files
        .iter()
        .filter(|f| UNSUPPORTED_EXTENSIONS.iter().any(|ext| f.ends_with(ext)))
        .map(|f| f.to_string())
        .collect();
    if unsupported.is_empty() {
        Err(NoWeights::Missing)
    } else {
        Err(NoWeights::Unsupported(unsupported))
    }
}

/// What the expected weight file is called, for "missing" messages.
pub(crate) fn expected_name(library: &str) -> &'static str {
    if library == "transformers" {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    }
}

/// The shard file names listed in a shard index, sorted and deduplicated.
///
/// # Errors
/// [`Error::Json`] / [`Error::Io`] for an unreadable index;
/// [`Error::Config`] when it has no `weight_map` or names a file outside
/// its folder.
pub(crate) fn shards(index: &Path, component: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::config(
                component,
                format!("{}: no `weight_map` object", index.display()),
            )
        })?;
    let mut files = BTreeSet::new();
    for file in map.values() {
        let name = file.as_str().ok_or_else(|| {
            Error::config(
                component,
                format!(
                    "{}: a `weight_map` value is not a file name",
                    index.display()
                ),
            )
        })?;
        if !is_plain_file_name(name) || !name.ends_with(".safetensors") {
            return Err(Error::config(
                component,
                format!(
                    "{}: shard `{name}` is not a .safetensors file of this folder",
                    index.display()
                ),
            ));
        }
        files.insert(name.to_string());
    }
    if files.is_empty() {
        return Err(Error::config(
            component,
            format!("{}: `weight_map` is empty", index.display()),
        ));
    }
    Ok(files.into_iter().collect())
}

/// A bare file name: no separators, not `.`/`..`, not empty.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_fp16_then_plain_then_shards() {
        let files = [
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ];
        assert_eq!(
            choose(&files),
            Ok(WeightChoice::Single(
                "diffusion_pytorch_model.fp16.safetensors".into()
            ))
        );
        assert_eq!(
            choose(&files[..3]),
            Ok(WeightChoice::Single(
                "diffusion_pytorch_model.safetensors".into()
            ))
        );
        let sharded = [
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
        ];
        assert_eq!(
            choose(&sharded),
            Ok(WeightChoice::Sharded(
                "diffusion_pytorch_model.safetensors.index.fp16.json".into()
            ))
        );
        assert_eq!(
            choose(&sharded[..2]),
            Ok(WeightChoice::Sharded(
                "diffusion_pytorch_model.safetensors.index.json".into()
            ))
        );
        // transformers' names.
        assert_eq!(
            choose(&[
                "model.safetensors",
                "model.fp16.safetensors",
                "pytorch_model.bin"
            ]),
            Ok(WeightChoice::Single("model.fp16.safetensors".into()))
        );
    }

    #[test]
    fn never_pickle() {
        assert_eq!(
            choose(&["config.json", "pytorch_model.bin", "model.ckpt"]),
            Err(NoWeights::Unsupported(vec![
                "pytorch_model.bin".into(),
                "model.ckpt".into()
            ]))
        );
        assert_eq!(choose(&["config.json"]), Err(NoWeights::Missing));
        assert_eq!(choose(&[]), Err(NoWeights::Missing));
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in ["", ".", "..", "../x.safetensors", "a/b", "a\\b", "/abs"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
