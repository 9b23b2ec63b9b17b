//! The LDM single-file fixtures (`tests/fixtures/generated/single_file/`),
//! completed for the tests that load them.
//!
//! To keep the repository lean, the committed SD 1.5 / SD 2 / SDXL files
//! (`NAME.partial.safetensors`, written by `tools/gen_single_files.py`)
//! leave out their CLIP token-embedding tables, which are most of their
//! bytes and equal, tensor for tensor, to the fixture folder's text
//! encoders. [`single_file_fixture`] copies them back in under their LDM
//! names and writes the whole checkpoint once per process tree into the
//! temp folder. The FLUX transformer files are small and used as committed.
//!
//! Included by the test code of several crates (`#[path]`), so it uses
//! only `std` and the `safetensors` crate.

use std::path::{Path, PathBuf};

/// The fixtures folder (`tests/fixtures`), from any crate under `crates/`.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The token-embedding tables a partial file leaves out: (its key in the
/// LDM file, the folder component holding it). The folder's key is
/// `text_model.embeddings.token_embedding.weight` in each.
fn left_out(name: &str) -> &'static [(&'static str, &'static str)] {
    match name {
        "tiny-sd15" => &[(
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "text_encoder",
        )],
        "tiny-sd2-v" => &[(
            "cond_stage_model.model.token_embedding.weight",
            "text_encoder",
        )],
        "tiny-sdxl" => &[
            (
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "text_encoder",
            ),
            (
                "conditioner.embedders.1.model.token_embedding.weight",
                "text_encoder_2",
            ),
        ],
        _ => &[],
    }
}

/// The single-file checkpoint `name` (`tiny-sd15`, `tiny-sd2-v`,
/// `tiny-sdxl`, `tiny-flux-dev`, ...), complete, as a path to read.
///
/// Panics (test code) when a fixture file is missing or unreadable.
#[allow(dead_code)]
pub fn single_file_fixture(name: &str) -> PathBuf {
    let dir = fixtures().join("generated/single_file");
    let missing = left_out(name);
    if missing.is_empty() {
        return dir.join(format!("{name}.safetensors"));
    }
    let partial_path = dir.join(format!("{name}.partial.safetensors"));
    let partial = std::fs::read(&partial_path).unwrap();
    let out_dir = std::env::temp_dir().join("easel-single-file-fixtures");
    // The partial file's length names the completed one, so a regenerated
    // fixture is completed again.
    let out = out_dir.join(format!("{name}-{}.safetensors", partial.len()));
    if out.is_file() {
        return out;
    }
    let folder_files: Vec<(&str, Vec<u8>)> = missing
        .iter()
        .map(|(_, component)| {
            let path = fixtures()
                .join("models")
                .join(name)
                .join(component)
                .join("model.safetensors");
            (*component, std::fs::read(path).unwrap())
        })
        .collect();
    let partial = safetensors::SafeTensors::deserialize(&partial).unwrap();
    let mut tensors = partial.tensors();
    for ((key, _), (_, bytes)) in missing.iter().zip(&folder_files) {
        let folder = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let table = folder
            .tensor("text_model.embeddings.token_embedding.weight")
            .unwrap();
        tensors.push((key.to_string(), table));
    }
    std::fs::create_dir_all(&out_dir).unwrap();
    // Written beside, then renamed: tests running at once never read half
    // a file.
    let tmp = out_dir.join(format!(
        "{name}.{}.{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    safetensors::serialize_to_file(tensors, None, &tmp).unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    out
}
