//! The LDM single-file fixtures (`tests/fixtures/generated/single_file/`),
//! completed for the tests that load them.
//!
//! To keep the repository lean, the committed SD 1.5 / SD 2 / SDXL files
//! (`NAME.partial.safetensors`, written by `tools/gen_single_files.py`)
//! leave out their UNet and their CLIP token-embedding tables, which are
//! most of their bytes and equal, tensor for tensor, to the fixture
//! folder's. The header's `easel.left_out` metadata maps each left-out LDM
//! key to `[folder component, key there]`; [`single_file_fixture`] copies
//! them back in under their LDM names and writes the whole checkpoint once
//! per process tree into the temp folder. The FLUX transformer files are
//! small and used as committed.
//!
//! Included by the test code of several crates (`#[path]`), so it uses
//! only `std`, `safetensors` and `serde_json`.

use std::path::{Path, PathBuf};

/// The fixtures folder (`tests/fixtures`), from any crate under `crates/`.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The single-file checkpoint `name` (`tiny-sd15`, `tiny-sd2-v`,
/// `tiny-sdxl`, `tiny-flux-dev`, ...), complete, as a path to read.
///
/// Panics (test code) when a fixture file is missing or unreadable.
#[allow(dead_code)]
pub fn single_file_fixture(name: &str) -> PathBuf {
    let dir = fixtures().join("generated/single_file");
    let partial_path = dir.join(format!("{name}.partial.safetensors"));
    if !partial_path.is_file() {
        return dir.join(format!("{name}.safetensors"));
    }
    let partial = std::fs::read(&partial_path).unwrap();
    let out_dir = std::env::temp_dir().join("easel-single-file-fixtures");
    // The partial file's length names the completed one, so a regenerated
    // fixture is completed again.
    let out = out_dir.join(format!("{name}-{}.safetensors", partial.len()));
    if out.is_file() {
        return out;
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&partial).unwrap();
    let left_out: std::collections::BTreeMap<String, (String, String)> = serde_json::from_str(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("easel.left_out"))
            .expect("a partial fixture lists what it leaves out"),
    )
    .unwrap();
    // The folder's weight file of each component named, read once.
    let mut folder_files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for (component, _) in left_out.values() {
        if folder_files.contains_key(component) {
            continue;
        }
        let dir = fixtures().join("models").join(name).join(component);
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        folder_files.insert(component.clone(), std::fs::read(file).unwrap());
    }
    let folders: std::collections::BTreeMap<&str, safetensors::SafeTensors> = folder_files
        .iter()
        .map(|(c, bytes)| {
            (
                c.as_str(),
                safetensors::SafeTensors::deserialize(bytes).unwrap(),
            )
        })
        .collect();
    let partial = safetensors::SafeTensors::deserialize(&partial).unwrap();
    let mut tensors = partial.tensors();
    for (key, (component, folder_key)) in &left_out {
        tensors.push((
            key.clone(),
            folders[component.as_str()].tensor(folder_key).unwrap(),
        ));
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
