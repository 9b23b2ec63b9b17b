//! Finding the LoRA file a reference names: a file, a folder or a Hugging
//! Face repo id.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
