//! Finding the LoRA file a reference names: a file, a folder, a file name
//! in the A1111 / ComfyUI LoRA folders (`models/Lora`, `models/loras`), or a
//! Hugging Face repo id.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Find the LoRA file a reference names: a `.safetensors` file; a folder
/// holding `pytorch_lora_weights.safetensors` or a single `.safetensors`;
/// the file name, with or without `.safetensors`, of a LoRA in the A1111 /
/// ComfyUI LoRA folders of `options.model_dirs` ([`lora_by_name`]); or a
/// Hugging Face repo id (`org/name[@revision]`) whose snapshot in the hub
/// cache holds one (downloaded into the cache when not there, unless
/// `options` is offline).
///
/// Errors: nothing found, several candidate files (naming them), or a
/// pickle file found by name (refused, saying how to convert it).
pub fn resolve_lora(reference: &str, options: &crate::loader::ResolveOptions) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return pick_lora_file(path);
    }
    if let Some(found) = lora_by_name(reference, &options.model_dirs)? {
        return Ok(found);
    }
    crate::loader::resolve_lora_repo(reference, options, pick_lora_name)
}

/// The LoRA file `name` names in the LoRA folders (`models/Lora`,
/// `models/loras`, subfolders included) of the model roots `roots`: the
/// file called `name`, else the one called `name` without its extension
/// (`detail_tweaker` for `detail_tweaker.safetensors`). `Ok(None)` when
/// there is none (or `name` holds a path separator).
///
/// # Errors
/// [`Error::InvalidArgument`] (field `lora`) when several files have that
/// name (naming each), or the file found is a pickle (`.ckpt`, `.pt`,
/// `.bin`), which is never loaded.
pub fn lora_by_name(name: &str, roots: &[PathBuf]) -> Result<Option<PathBuf>> {
    use crate::loader::{find_by_name, FileKind};
    let Some(found) = find_by_name(name, roots, &[FileKind::Lora], "lora")? else {
        return Ok(None);
    };
    let ext = found
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if ext == "gguf" {
        return Err(Error::invalid(
            "lora",
            format!(
                "{}: GGUF LoRA files are not read; use the .safetensors version",
                found.display()
            ),
        ));
    }
    if ext != "safetensors" && ext != "sft" {
        return Err(Error::invalid(
            "lora",
            format!(
                "{}: only .safetensors LoRA files are loaded (a pickle file can run code when \
                 loaded); convert it with `python -c \"import torch, safetensors.torch as s; \
                 s.save_file(torch.load('{}', weights_only=True), 'out.safetensors')\"`, or \
                 download its .safetensors version",
                found.display(),
                found.display()
            ),
        ));
    }
    Ok(Some(found))
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
}
