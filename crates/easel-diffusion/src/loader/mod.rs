//! Finding a model and reading its layout.
//!
//! A model reference is resolved to a diffusers folder ([`ModelDir`]):
//!
//! * a local folder (absolute or relative path) holding `model_index.json`;
//! * a single-file checkpoint (`.safetensors` in the original SD 1.x / 2.x /
//!   XL layout; pickles refused), opened by [`open_single_file`] with the
//!   settings [`ResolveOptions::single_files`] gives it;
//! * a folder name found in one of the extra model folders
//!   ([`ResolveOptions::model_dirs`]);
//! * the file name (with or without its extension) of a checkpoint or
//!   diffusion model in the A1111 / ComfyUI model folders of those folders
//!   (`models/Stable-diffusion`, `models/checkpoints`, ...: see
//!   [`scan_model_folders`]);
//! * a Hugging Face repo id `org/name`, optionally `org/name@revision`
//!   (branch, tag or commit), looked up in the hub cache laid out as
//!   `huggingface_hub` does (`models--org--name/refs/<revision>` holding a
//!   commit, `snapshots/<commit>/` holding the files), and downloaded there
//!   with `hf-hub` when missing, unless offline.
//!
//! A download fetches only what a diffusers pipeline reads: `model_index.json`,
//! each component's config, tokenizer files and weights: `.fp16` safetensors
//! variants when the repository has them, else the plain `.safetensors`, with
//! sharded `*.safetensors.index.json` checkpoints followed; never pickle
//! (`.bin`, `.ckpt`) files: a component with nothing else is an error.

mod cache;
mod checkpoint;
mod component_files;
mod component_shapes;
mod family;
mod flux_keys;
mod hub;
mod ldm_keys;
mod model_dir;
mod model_folders;
mod single_file;
mod weights;

use std::path::{Path, PathBuf};

pub use checkpoint::{is_gguf, CheckpointFile};
pub use component_files::{
    component_flag, open_component_file, ComponentFile, ComponentFiles, ComponentLayout,
    ComponentOverrides, OVERRIDABLE_COMPONENTS,
};
pub(crate) use family::supported_class;
pub use family::{MaskRule, ModelFamily, StrengthRule, DEFAULT_STRENGTH, SUPPORTED_PIPELINES};
pub use model_dir::{Component, ComponentKind, ModelDir, ModelSource};
pub use model_folders::{
    describe as describe_model_file, find_by_name, folder_family, list_model_files,
    scan_model_folders, FileFormat, FileKind, FolderEntry, FolderLayout, ModelFile,
};
pub use single_file::{
    detect as detect_single_file, is_checkpoint_file, open_single_file, Architecture, Detected,
    SingleFile,
};

use crate::error::{Error, Result};

/// The hub revision used when a repo id has no `@revision`.
pub const DEFAULT_REVISION: &str = "main";

/// Where to look for models and whether to download them.
///
/// `Default` reads nothing from the environment by itself: unset fields are
/// filled from it when used (`cache_dir` from `HF_HUB_CACHE` / `HF_HOME`,
/// `token` from `HF_TOKEN`, `endpoint` from `HF_ENDPOINT`), and
/// `HF_HUB_OFFLINE=1` turns `offline` on.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// The hub cache folder (the one holding `models--org--name`); `None`:
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Never use the network (also on when `HF_HUB_OFFLINE` is set to `1`).
    pub offline: bool,
    /// Extra folders whose immediate subfolders are diffusers models (listed
    /// by [`list_local_models`], resolvable by their folder name), and A1111
    /// / ComfyUI installs or their `models/` folders, whose checkpoints and
    /// LoRAs are resolvable by file name ([`scan_model_folders`]).
    pub model_dirs: Vec<PathBuf>,
    /// Hub token for gated or private repos; `None`: `$HF_TOKEN`, else the
    /// token file `huggingface-cli login` writes (`$HF_HOME/token`).
    pub token: Option<String>,
    /// Hub endpoint; `None`: `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Components not downloaded (nor required for a cached snapshot to
    /// count as complete). Default: `safety_checker`, which the engine does
    /// not run.
    pub skip_components: Vec<String>,
    /// Show download progress bars on stderr.
    pub progress: bool,
    /// Settings of single-file checkpoints, by file path (compared after
    /// resolving symlinks and `..`): the `config` and `prediction_type`
    /// [`open_single_file`] uses when [`resolve_model`] opens that file
    /// (the server's registry entries). Default: none (a file takes the
    /// default config repo of its architecture).
    pub single_files: Vec<SingleFileSettings>,
    /// Models with component files (`--vae FILE`, a registry entry's
    /// `vae`, ...): a reference equal to one's [`ComponentOverrides::key`]
    /// resolves to its model with those components read from the files
    /// (see [`open_component_file`]). Default: none.
    pub component_files: Vec<ComponentOverrides>,
}

/// The `config` / `prediction_type` of one single-file checkpoint (see
/// [`ResolveOptions::single_files`] and [`open_single_file`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleFileSettings {
    /// The checkpoint file.
    pub file: PathBuf,
    /// A diffusers folder or repo id giving its configs and tokenizers.
    pub config: Option<String>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            offline: false,
            model_dirs: Vec::new(),
            token: None,
            endpoint: None,
            skip_components: vec!["safety_checker".to_string()],
            progress: false,
            single_files: Vec::new(),
            component_files: Vec::new(),
        }
    }
}

impl ResolveOptions {
    /// The hub cache folder: [`Self::cache_dir`], else from the environment.
    ///
    /// # Errors
    /// [`Error::ModelNotFound`] when neither is set and there is no home folder.
    pub fn hub_cache(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.cache_dir {
            return Ok(dir.clone());
        }
        cache::hub_cache_from_env(env_var).ok_or_else(|| {
            Error::ModelNotFound(
                "cannot locate the Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into(),
            )
        })
    }

    /// Whether downloads are off: [`Self::offline`] or `HF_HUB_OFFLINE` set to
    /// a true value (`1`, `ON`, `YES`, `TRUE`), as `huggingface_hub` reads it.
    pub fn is_offline(&self) -> bool {
        self.offline
            || env_var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            })
    }

    fn hub_token(&self) -> Option<String> {
        if let Some(token) = &self.token {
            return Some(token.clone());
        }
        if let Some(token) = env_var("HF_TOKEN").filter(|t| !t.trim().is_empty()) {
            return Some(token.trim().to_string());
        }
        let path = env_var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .or_else(|| cache::hf_home_from_env(&env_var).map(|home| home.join("token")))?;
        let token = std::fs::read_to_string(path).ok()?;
        let token = token.trim();
        (!token.is_empty()).then(|| token.to_string())
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses `org/name` or `org/name@revision` into (repo id, revision), with
/// the repo id rules of `huggingface_hub.utils.validate_repo_id`; `None`
/// when it is not one.
fn parse_repo_id(reference: &str) -> Option<(String, String)> {
    let (repo_id, revision) = match reference.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (reference, None),
    };
    let (org, name) = repo_id.split_once('/')?;
    let part_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
            && !s.contains("--")
            && !s.contains("..")
    };
    if !part_ok(org) || !part_ok(name) || repo_id.len() > 96 {
        return None;
    }
    let revision = match revision {
        None => DEFAULT_REVISION.to_string(),
        Some(rev) => {
            let ok = !rev.is_empty()
                && rev.split('/').all(|p| {
                    !p.is_empty()
                        && p != "."
                        && p != ".."
                        && !p.contains(['\\', '\0', '@'])
                        && !p.chars().any(char::is_whitespace)
                });
            if !ok {
                return None;
            }
            rev.to_string()
        }
    };
    Some((repo_id.to_string(), revision))
}

/// Resolves a model reference to a diffusers model folder.
///
/// In order: an existing path (a folder holding `model_index.json`, or a
/// single-file checkpoint: see [`open_single_file`]); a folder name in one
/// of [`ResolveOptions::model_dirs`]; the file name (or name without its
/// extension) of a checkpoint or diffusion model in their A1111 / ComfyUI
/// model folders ([`model_file_by_name`]); a Hugging Face repo id `org/name[@revision]`, taken from the hub cache
/// when its snapshot is there and complete, else downloaded into it (not
/// when offline; then an incomplete snapshot is used as it is).
///
/// # Errors
/// [`Error::ModelNotFound`] when the path is not a diffusers folder, the
/// reference is neither a path nor a repo id, or the repo is not cached and
/// cannot be downloaded (offline, network or hub error); the message names
/// the cache path it looked in and the ways out; [`Error::InvalidArgument`]
/// (field `model`) for a name that several model-folder files have. Errors
/// of reading `model_index.json` as [`ModelDir::open`].
pub fn resolve_model(reference: &str, options: &ResolveOptions) -> Result<ModelDir> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Err(Error::ModelNotFound(
            "no model given: pass a diffusers folder or a Hugging Face repo id (org/name)".into(),
        ));
    }
    if let Some(overrides) = options
        .component_files
        .iter()
        .find(|o| !o.is_empty() && o.key() == reference)
    {
        // (A repo's own weights of the replaced components are still
        // downloaded: skipping a component skips its config too.)
        let mut base = options.clone();
        base.component_files.clear();
        let model = resolve_model(&overrides.model, &base)?;
        return Ok(
            component_files::apply_component_files(model, &overrides.files)?
                .with_quantization(overrides.quantization)
                .with_offloaded_t5(overrides.offload_t5),
        );
    }
    let path = Path::new(reference);
    if path.exists() {
        return open_local(path, reference, options);
    }
    if !reference.contains(['/', '\\']) {
        for dir in &options.model_dirs {
            let candidate = dir.join(reference);
            if candidate.join("model_index.json").is_file() {
                return ModelDir::open_as(&candidate, reference.to_string(), ModelSource::Local);
            }
        }
        if let Some(path) = model_file_by_name(reference, options)? {
            return open_local(&path, reference, options);
        }
    }
    match parse_repo_id(reference) {
        Some((repo_id, revision)) => resolve_hub(&repo_id, &revision, options),
        None => {
            let dirs = if options.model_dirs.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = options
                    .model_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                format!(
                    ", nor a model folder or a checkpoint file of that name in {} (A1111 / \
                     ComfyUI model folders included; `easel models list --models-dir DIR` \
                     lists them)",
                    list.join(", ")
                )
            };
            Err(Error::ModelNotFound(format!(
                "model `{reference}` not found: no such folder{dirs}, and it is not a Hugging Face \
                 repo id (org/name or org/name@revision)"
            )))
        }
    }
}

/// The checkpoint or diffusion model file (or diffusers folder) `name`
/// names in the A1111 / ComfyUI model folders of
/// [`ResolveOptions::model_dirs`] ([`find_by_name`]): `dreamshaper_8` or
/// `dreamshaper_8.safetensors` for `models/Stable-diffusion/dreamshaper_8.safetensors`.
///
/// # Errors
/// [`Error::InvalidArgument`] (field `model`) when several files have that
/// name, naming each.
pub fn model_file_by_name(name: &str, options: &ResolveOptions) -> Result<Option<PathBuf>> {
    find_by_name(
        name,
        &options.model_dirs,
        &[FileKind::Checkpoint, FileKind::DiffusionModel],
        "model",
    )
}

fn open_local(path: &Path, reference: &str, options: &ResolveOptions) -> Result<ModelDir> {
    if single_file::is_checkpoint_file(path) {
        let canonical = path.canonicalize().ok();
        let settings = options.single_files.iter().find(|s| {
            s.file == path || (canonical.is_some() && s.file.canonicalize().ok() == canonical)
        });
        return single_file::open_single_file(
            path,
            settings.and_then(|s| s.config.as_deref()),
            settings.and_then(|s| s.prediction_type.as_deref()),
            options,
        );
    }
    if !path.is_dir() {
        return Err(Error::ModelNotFound(format!(
            "model `{reference}` is a file, not a diffusers model folder nor a .safetensors / .gguf \
             single-file checkpoint; pass a folder with model_index.json or a .safetensors / .gguf file"
        )));
    }
    if !path.join("model_index.json").is_file() {
        return Err(Error::ModelNotFound(format!(
            "model `{reference}` is a folder without model_index.json ({}): not a diffusers model folder",
            path.join("model_index.json").display()
        )));
    }
    ModelDir::open_as(path, reference.to_string(), ModelSource::Local)
}

/// The configs of a single-file checkpoint: a folder name in
/// [`ResolveOptions::model_dirs`], or a repo id `org/name[@revision]` from
/// the hub cache, else downloaded into it (config and tokenizer files only,
/// never weights).
///
/// # Errors
/// [`Error::ModelNotFound`] when it is neither, or the repo is not cached
/// and cannot be downloaded (offline, network or hub error).
pub(crate) fn resolve_config_repo(reference: &str, options: &ResolveOptions) -> Result<ModelDir> {
    let reference = reference.trim();
    if !reference.contains(['/', '\\']) {
        for dir in &options.model_dirs {
            let candidate = dir.join(reference);
            if candidate.join("model_index.json").is_file() {
                return ModelDir::open_as(&candidate, reference.to_string(), ModelSource::Local);
            }
        }
    }
    let Some((repo_id, revision)) = parse_repo_id(reference) else {
        return Err(Error::ModelNotFound(format!(
            "config `{reference}`: no such folder, and not a Hugging Face repo id (org/name)"
        )));
    };
    let cache_dir = options.hub_cache()?;
    let source = |commit: String| ModelSource::HubCache {
        repo_id: repo_id.clone(),
        revision: revision.clone(),
        commit,
    };
    let offline = options.is_offline();
    if let Some(snapshot) = cache::find_snapshot(&cache_dir, &repo_id, &revision) {
        let dir = ModelDir::open_as(
            &snapshot.path,
            reference.to_string(),
            source(snapshot.commit.clone()),
        )?;
        if offline || dir.check_configs(&options.skip_components).is_ok() {
            return Ok(dir);
        }
    }
    let repo_folder = cache_dir.join(cache::repo_folder_name(&repo_id));
    if offline {
        return Err(Error::ModelNotFound(format!(
            "config repo `{reference}` is not in the Hugging Face cache ({}) and downloads are off \
             (offline mode or HF_HUB_OFFLINE)",
            repo_folder.display()
        )));
    }
    let access = hub::HubAccess {
        cache: cache_dir.clone(),
        endpoint: options.endpoint.clone().or_else(|| env_var("HF_ENDPOINT")),
        token: options.hub_token(),
        progress: options.progress,
    };
    match hub::download_files(
        &repo_id,
        &revision,
        &access,
        &options.skip_components,
        false,
    ) {
        Ok((snapshot, commit)) => {
            ModelDir::open_as(&snapshot, reference.to_string(), source(commit))
        }
        Err(hub::DownloadError::Hub(message)) => Err(Error::ModelNotFound(format!(
            "config repo `{reference}` is not in the Hugging Face cache ({}) and its configs could \
             not be downloaded: {message}",
            repo_folder.display()
        ))),
        Err(hub::DownloadError::Model(error)) => Err(error),
    }
}

fn resolve_hub(repo_id: &str, revision: &str, options: &ResolveOptions) -> Result<ModelDir> {
    let cache_dir = options.hub_cache()?;
    let reference = if revision == DEFAULT_REVISION {
        repo_id.to_string()
    } else {
        format!("{repo_id}@{revision}")
    };
    let source = |commit: String| ModelSource::HubCache {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        commit,
    };
    let offline = options.is_offline();
    let cached = cache::find_snapshot(&cache_dir, repo_id, revision);
    if let Some(snapshot) = &cached {
        let dir = ModelDir::open_as(
            &snapshot.path,
            reference.clone(),
            source(snapshot.commit.clone()),
        )?;
        match dir.check_complete(&options.skip_components) {
            Ok(()) => return Ok(dir),
            Err(e) if offline => {
                tracing::warn!(
                    "{reference}: cached snapshot is incomplete ({e}); offline, using it as it is"
                );
                return Ok(dir);
            }
            Err(e) => {
                tracing::info!("{reference}: cached snapshot is incomplete ({e}); downloading")
            }
        }
    }

    let repo_folder = cache_dir.join(cache::repo_folder_name(repo_id));
    let looked = format!(
        "looked in {} (refs/{revision} -> snapshots/<commit>/model_index.json), and there is no \
         local folder `{reference}`",
        repo_folder.display()
    );
    let download_hint = if revision == DEFAULT_REVISION {
        format!("`huggingface-cli download {repo_id}`")
    } else {
        format!("`huggingface-cli download {repo_id} --revision {revision}`")
    };
    if offline {
        return Err(Error::ModelNotFound(format!(
            "model `{reference}` is not in the Hugging Face cache and downloads are off (offline mode \
             or HF_HUB_OFFLINE); {looked}. Run once with network access, or {download_hint}, or \
             pass the path of a local diffusers folder"
        )));
    }

    let access = hub::HubAccess {
        cache: cache_dir.clone(),
        endpoint: options.endpoint.clone().or_else(|| env_var("HF_ENDPOINT")),
        token: options.hub_token(),
        progress: options.progress,
    };
    tracing::info!("{reference}: downloading into {}", cache_dir.display());
    match hub::download(repo_id, revision, &access, &options.skip_components) {
        Ok((snapshot, commit)) => ModelDir::open_as(&snapshot, reference, source(commit)),
        Err(hub::DownloadError::Hub(message)) => {
            if let Some(snapshot) = cached {
                tracing::warn!(
                    "{reference}: download failed ({message}); using the incomplete cached snapshot"
                );
                return ModelDir::open_as(&snapshot.path, reference, source(snapshot.commit));
            }
            Err(Error::ModelNotFound(format!(
                "model `{reference}` is not in the Hugging Face cache and could not be downloaded: \
                 {message}; {looked}. Check the network and the repo id (gated or private repos \
                 need HF_TOKEN), or run {download_hint}, or pass the path of a local diffusers folder"
            )))
        }
        Err(hub::DownloadError::Model(error)) => Err(error),
    }
}

/// A file of a Hugging Face repository that is not a pipeline (a LoRA
/// adapter): from the snapshot of `reference` (`org/name[@revision]`) in
/// the hub cache, choosing the file with `pick` among the snapshot's
/// top-level files; when not cached and not offline, the file list is
/// fetched from the hub, `pick` chooses among it and that file is
/// downloaded into the cache.
///
/// Errors: the reference is not a repo id, `pick` finds nothing, or the
/// repo is not cached and cannot be downloaded.
pub(crate) fn resolve_lora_repo(
    reference: &str,
    options: &ResolveOptions,
    pick: fn(&[String]) -> std::result::Result<String, String>,
) -> Result<PathBuf> {
    let not_found = |why: String| Error::invalid("lora", format!("LoRA `{reference}`: {why}"));
    let Some((repo_id, revision)) = parse_repo_id(reference.trim()) else {
        return Err(not_found(
            "no such file or folder, and not a Hugging Face repo id (org/name)".into(),
        ));
    };
    let cache_dir = options.hub_cache()?;
    let repo = cache_dir.join(cache::repo_folder_name(&repo_id));
    let commit = match std::fs::read_to_string(cache::ref_path(&repo, &revision)) {
        Ok(c) => Some(c.trim().to_string()),
        Err(_) if cache::is_commit_hash(&revision) => Some(revision.clone()),
        Err(_) => None,
    };
    if let Some(commit) = commit.filter(|c| weights::is_plain_file_name(c)) {
        let snapshot = repo.join("snapshots").join(&commit);
        if let Ok(entries) = std::fs::read_dir(&snapshot) {
            let names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if let Ok(name) = pick(&names) {
                return Ok(snapshot.join(name));
            }
        }
    }
    if options.is_offline() {
        return Err(not_found(format!(
            "not in the Hugging Face cache ({}) and downloads are off",
            repo.display()
        )));
    }
    let access = hub::HubAccess {
        cache: cache_dir.clone(),
        endpoint: options.endpoint.clone().or_else(|| env_var("HF_ENDPOINT")),
        token: options.hub_token(),
        progress: options.progress,
    };
    hub::download_picked(&repo_id, &revision, &access, pick).map_err(not_found)
}

/// A diffusers model found on disk, for `easel models list`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalModel {
    /// What to pass to [`resolve_model`]: the repo id (with `@revision` when
    /// the snapshot is not `main`), or the folder path.
    pub reference: String,
    /// The repo id, for a hub-cache snapshot.
    pub repo_id: Option<String>,
    /// The refs pointing at the snapshot (`main`, a tag, `refs/pr/1`), sorted;
    /// empty for a folder, or a snapshot no ref points at.
    pub revisions: Vec<String>,
    /// The commit of a hub-cache snapshot.
    pub commit: Option<String>,
    /// The model folder (the snapshot folder for the cache).
    pub path: PathBuf,
    /// `_class_name` of `model_index.json`; empty when it cannot be read.
    pub pipeline_class: String,
    /// Bytes on disk (files of a snapshot counted through their blobs).
    pub size_bytes: u64,
}

/// Every diffusers model (a folder with `model_index.json`) in the hub cache
/// (each snapshot, as `huggingface-cli scan-cache` lists revisions) and in the
/// extra model folders (each immediate subfolder, and the folder itself).
/// Unreadable entries are skipped; a missing cache is no error.
pub fn list_local_models(options: &ResolveOptions) -> Vec<LocalModel> {
    let mut out = Vec::new();
    match options.hub_cache() {
        Ok(cache_dir) => {
            for snapshot in cache::scan(&cache_dir) {
                let reference = if snapshot.refs.iter().any(|r| r == DEFAULT_REVISION) {
                    snapshot.repo_id.clone()
                } else {
                    let rev = snapshot.refs.first().unwrap_or(&snapshot.commit);
                    format!("{}@{rev}", snapshot.repo_id)
                };
                out.push(LocalModel {
                    reference,
                    repo_id: Some(snapshot.repo_id),
                    revisions: snapshot.refs,
                    commit: Some(snapshot.commit),
                    pipeline_class: pipeline_class(&snapshot.path),
                    size_bytes: cache::size_on_disk(&snapshot.path),
                    path: snapshot.path,
                });
            }
        }
        Err(e) => tracing::warn!("{e}"),
    }
    for dir in &options.model_dirs {
        let mut candidates = vec![dir.clone()];
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut subdirs: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                subdirs.sort();
                candidates.extend(subdirs);
            }
            Err(e) => {
                tracing::warn!("model folder {}: {e}", dir.display());
                continue;
            }
        }
        for path in candidates {
            if !path.join("model_index.json").is_file() {
                continue;
            }
            out.push(LocalModel {
                reference: path.display().to_string(),
                repo_id: None,
                revisions: Vec::new(),
                commit: None,
                pipeline_class: pipeline_class(&path),
                size_bytes: cache::size_on_disk(&path),
                path,
            });
        }
    }
    out
}

fn pipeline_class(dir: &Path) -> String {
    match ModelDir::open(dir) {
        Ok(model) => model.pipeline_class().to_string(),
        Err(e) => {
            tracing::warn!("{e}");
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo_id: &str, revision: &str) -> Option<(String, String)> {
        Some((repo_id.into(), revision.into()))
    }

    #[test]
    fn repo_ids() {
        assert_eq!(
            parse_repo_id("stabilityai/stable-diffusion-xl-base-1.0"),
            hub("stabilityai/stable-diffusion-xl-base-1.0", "main")
        );
        assert_eq!(
            parse_repo_id("black-forest-labs/FLUX.1-schnell@refs/pr/12"),
            hub("black-forest-labs/FLUX.1-schnell", "refs/pr/12")
        );
        assert_eq!(parse_repo_id("org/name@v1.0"), hub("org/name", "v1.0"));
        for bad in [
            "name",
            "org/name/extra",
            "/abs/path",
            "./rel",
            "org/",
            "org/na me",
            "org/name@",
            "org/name@../x",
            "org--x/name",
            "org/-name",
            "a b/c",
            "C:\\models\\sd",
        ] {
            assert_eq!(parse_repo_id(bad), None, "{bad}");
        }
    }
}
