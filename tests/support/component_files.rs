//! Component files for the tests of `--vae FILE` and friends, cut at test
//! time out of the completed single-file fixtures
//! (`tests/support/single_file.rs`), so nothing more is committed: the LDM
//! VAE of `tiny-sd15.safetensors` without its `first_stage_model.` prefix
//! is an LDM-layout VAE file holding the `tiny-sd15` folder's VAE weights
//! (`tools/gen_single_files.py` proves the single file holds the folder's
//! weights with diffusers' `from_single_file`).
//!
//! Included by the test code of several crates (`#[path]`), so it uses
//! only `std` and the `safetensors` crate.

use std::path::{Path, PathBuf};

/// The tensors of `source` whose keys start with `prefix`, written to
/// `out` (a path in the test's temporary folder); with `strip`, the keys
/// lose the prefix. Returns `out`.
///
/// Panics (test code) when `source` is unreadable or holds no such key.
#[allow(dead_code)]
pub fn component_file(source: &Path, prefix: &str, strip: bool, out: &Path) -> PathBuf {
    let bytes = std::fs::read(source).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(prefix)?;
            Some((if strip { rest.to_string() } else { k.clone() }, v))
        })
        .collect();
    assert!(
        !tensors.is_empty(),
        "no `{prefix}` keys in {}",
        source.display()
    );
    safetensors::serialize_to_file(tensors, None, out).unwrap();
    out.to_path_buf()
}
