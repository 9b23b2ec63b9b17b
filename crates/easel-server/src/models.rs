//! Model references as the API takes them, checked before a job is accepted.
//!
//! A `baseModel` is, in order:
//! 1. a registry name from the config's `[models]` table (its target is
//!    trusted: any repo id or path);
//! 2. a local path (absolute, starting with `.` or `~`, or existing relative
//!    to the server's folder) of a diffusers folder or a single-file
//!    checkpoint (`.safetensors` in the original SD 1.x / 2.x / XL layout,
//!    with the configs of the default repo of its architecture; pickles
//!    are refused): accepted only under a model root
//!    (`DATA_DIR/models`, each `models_dirs` entry, the Hugging Face cache),
//!    after resolving `..` and symlinks, so no client can make the server
//!    read other files;
//! 3. a folder name inside a model root, or the file name (with or without
//!    its extension) of a checkpoint or diffusion model in a root's A1111 /
//!    ComfyUI model folders (`models/Stable-diffusion`, `models/checkpoints`,
//!    `models/diffusion_models`, `models/unet`; the root may be the install
//!    folder or its `models/`): `dreamshaper_8`; a name two files have is
//!    refused, naming both;
//! 4. a Hugging Face repo id `org/name[@revision]`: taken from the hub cache,
//!    or downloaded by the worker unless the server is offline.
//!
//! LoRA files given by path follow rule 2; a `loras[].path` that is a bare
//! file name is looked up in the roots' `Lora` / `loras` folders.

use std::path::{Component, Path, PathBuf};

use easel_diffusion::loader::{
    is_checkpoint_file, list_local_models, list_model_files, model_file_by_name, resolve_model,
    FileKind, ModelDir, ResolveOptions,
};

use crate::config::{Config, EngineKind};
use crate::engine::{resolve_options, FAKE_PIPELINE};
use crate::family_defaults::FamilyDefaults;
use crate::job::ModelSpec;
use easel_diffusion::loader::ModelFamily;

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefError {
    /// A local path outside every model root.
    #[error("{0}")]
    NotAllowed(String),
    /// Nothing by that name.
    #[error("{0}")]
    Unknown(String),
}

/// A model listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelEntry {
    /// What to pass as `baseModel`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// `registry` (a config name), `hub-cache` or `local`.
    pub source: String,
    /// The pipeline class, when known.
    pub pipeline_class: Option<String>,
    /// Bytes on disk, when known.
    pub size_bytes: Option<u64>,
    /// For a file of an A1111 / ComfyUI model folder: `checkpoint` or
    /// `diffusion_model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For a file of a model folder: its detected family (`SD 1.x`, `SDXL`,
    /// `FLUX.1 dev`, ...), or `unknown: REASON`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// For a file of a model folder: `safetensors`, `fp8_safetensors`,
    /// `gguf`, `pickle` (refused) or `diffusers_folder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The request defaults and rules of its family (from the pipeline
    /// class), when known: what a form prefills and which fields apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defaults: Option<FamilyDefaults>,
    /// Whether the worker has it loaded.
    pub loaded: bool,
    /// Always `easel` (OpenAI clients read it).
    pub owned_by: String,
    /// Unix seconds (OpenAI clients read it); 0 when unknown.
    pub created: i64,
}

/// Resolves references against the configuration.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    config: Config,
    roots: Vec<PathBuf>,
}

/// Lexically normalise `path` (drop `.`, apply `..`), without touching the disk.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Whether `reference` is a Hugging Face repo id, `org/name[@revision]`.
pub fn is_repo_id(reference: &str) -> bool {
    let (id, revision) = match reference.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (reference, None),
    };
    let Some((org, name)) = id.split_once('/') else {
        return false;
    };
    let part = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
            && !s.contains("..")
    };
    let rev_ok = revision.is_none_or(|r| {
        !r.is_empty()
            && r.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
            && !r.contains(['\\', ' '])
    });
    part(org) && part(name) && id.len() <= 96 && rev_ok
}

impl ModelRegistry {
    /// A registry for `config`.
    pub fn new(config: &Config) -> Self {
        let mut roots: Vec<PathBuf> = config.model_roots();
        if let Ok(cache) = resolve_options(config, true).hub_cache() {
            roots.push(cache);
        }
        let roots = roots
            .into_iter()
            .map(|r| {
                let absolute = if r.is_absolute() {
                    r
                } else {
                    std::env::current_dir().unwrap_or_default().join(r)
                };
                absolute
                    .canonicalize()
                    .unwrap_or_else(|_| normalize(&absolute))
            })
            .collect();
        Self {
            config: config.clone(),
            roots,
        }
    }

    /// The canonical model roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn under_roots(&self, path: &Path) -> bool {
        self.roots.iter().any(|root| path.starts_with(root))
    }

    fn looks_like_path(reference: &str) -> bool {
        let p = Path::new(reference);
        p.is_absolute()
            || reference.starts_with('.')
            || reference.starts_with('~')
            || reference.contains('\\')
            || p.exists()
    }

    /// Check that a local path lies under a model root and exists; returns
    /// its canonical form.
    ///
    /// # Errors
    /// [`ModelRefError::NotAllowed`] outside the roots,
    /// [`ModelRefError::Unknown`] when nothing is there.
    pub fn check_path(&self, reference: &str) -> Result<PathBuf, ModelRefError> {
        let not_allowed = || {
            ModelRefError::NotAllowed(format!(
                "`{reference}` is outside the model roots; local paths must lie under {} \
                 (add a folder with --models-dir)",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        let path = Path::new(reference);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(path)
        };
        if !self.under_roots(&normalize(&absolute)) && !absolute.exists() {
            return Err(not_allowed());
        }
        let canonical = absolute.canonicalize().map_err(|_| {
            if self.under_roots(&normalize(&absolute)) {
                ModelRefError::Unknown(format!("`{reference}`: no such file or folder"))
            } else {
                not_allowed()
            }
        })?;
        if !self.under_roots(&canonical) {
            return Err(not_allowed());
        }
        Ok(canonical)
    }

    /// A single-file checkpoint: detected and its configs found now (a
    /// pickle, an unknown layout or a config repo that is neither cached nor
    /// downloadable is refused), with the `config` / `prediction_type` of
    /// its registry entry ([`resolve_options`] carries them); the worker
    /// opens it the same way.
    fn local_file(&self, reference: &str, file: &Path) -> Result<ModelSpec, ModelRefError> {
        let options = resolve_options(&self.config, true);
        let pipeline_class = match resolve_model(&file.display().to_string(), &options) {
            Ok(dir) => Some(dir.pipeline_class().to_string()),
            // Its config repo is not cached: the worker downloads its
            // configs, unless the server is offline.
            Err(easel_diffusion::Error::ModelNotFound(_)) if !self.config.offline => None,
            Err(e) => {
                return Err(ModelRefError::Unknown(format!(
                    "`{reference}` cannot be used as a model: {e}"
                )))
            }
        };
        Ok(ModelSpec {
            reference: reference.into(),
            load: file.display().to_string(),
            pipeline_class,
        })
    }

    /// A registry entry's component files (`vae`, ...): opened and checked
    /// against its model now (a missing file, a pickle, a file of another
    /// architecture is refused), when the model itself is on disk; the
    /// worker resolves `spec.load` the same way.
    fn check_component_files(
        &self,
        reference: &str,
        spec: &ModelSpec,
    ) -> Result<(), ModelRefError> {
        if self.config.engine == EngineKind::Fake || spec.pipeline_class.is_none() {
            return Ok(());
        }
        let options = resolve_options(&self.config, true);
        match resolve_model(&spec.load, &options) {
            Ok(_) => Ok(()),
            Err(easel_diffusion::Error::ModelNotFound(_)) if !self.config.offline => Ok(()),
            Err(e) => Err(ModelRefError::Unknown(format!(
                "`{reference}` cannot be used as a model: {e}"
            ))),
        }
    }

    fn local_folder(&self, reference: &str, folder: &Path) -> Result<ModelSpec, ModelRefError> {
        if folder.is_file() && is_checkpoint_file(folder) {
            return self.local_file(reference, folder);
        }
        if self.config.engine == EngineKind::Fake {
            return Ok(ModelSpec {
                reference: reference.into(),
                load: folder.display().to_string(),
                pipeline_class: Some(FAKE_PIPELINE.into()),
            });
        }
        let dir = ModelDir::open(folder).map_err(|e| {
            ModelRefError::Unknown(format!(
                "`{reference}` is not a diffusers model folder: {e}"
            ))
        })?;
        Ok(ModelSpec {
            reference: reference.into(),
            load: folder.display().to_string(),
            pipeline_class: Some(dir.pipeline_class().to_string()),
        })
    }

    /// Resolve a `baseModel` reference (see the module docs).
    ///
    /// # Errors
    /// [`ModelRefError::NotAllowed`] for a path outside the roots,
    /// [`ModelRefError::Unknown`] for anything not found.
    pub fn resolve(&self, reference: &str) -> Result<ModelSpec, ModelRefError> {
        let reference = reference.trim();
        // 1. Registry names: trusted targets.
        if let Some(entry) = self.config.models.get(reference) {
            let target = entry.target();
            let target_path = Path::new(target);
            let mut spec = if target_path.is_absolute() || target.starts_with('.') {
                let folder = target_path
                    .canonicalize()
                    .unwrap_or_else(|_| target_path.to_path_buf());
                self.local_folder(reference, &folder)?
            } else {
                self.resolve_repo(target)?
            };
            spec.reference = reference.into();
            if let Some(overrides) = self.config.entry_overrides(entry) {
                spec.load = overrides.key();
                self.check_component_files(reference, &spec)?;
            }
            return Ok(spec);
        }
        // 2. Local paths: only under the roots.
        if Self::looks_like_path(reference) {
            let folder = self.check_path(reference)?;
            if !folder.is_dir() && !is_checkpoint_file(&folder) {
                return Err(ModelRefError::Unknown(format!(
                    "`{reference}` is a file, not a diffusers model folder nor a .safetensors \
                     single-file checkpoint"
                )));
            }
            return self.local_folder(reference, &folder);
        }
        // 3. Folder names in the roots.
        if !reference.contains('/') {
            for root in self.config.model_roots() {
                let folder = root.join(reference);
                if folder.join("model_index.json").is_file() {
                    let canonical = self.check_path(&folder.display().to_string())?;
                    return self.local_folder(reference, &canonical);
                }
            }
            if self.config.engine == EngineKind::Fake && !reference.contains("missing") {
                return Ok(ModelSpec {
                    reference: reference.into(),
                    load: reference.into(),
                    pipeline_class: Some(FAKE_PIPELINE.into()),
                });
            }
            if let Some(file) = self.model_file(reference)? {
                let canonical = self.check_path(&file.display().to_string())?;
                return self.local_folder(reference, &canonical);
            }
            return Err(ModelRefError::Unknown(format!(
                "unknown model `{reference}`: not a registry name, not a folder nor a checkpoint \
                 file name in {} (A1111 / ComfyUI model folders included), and not a Hugging \
                 Face repo id (org/name); `GET /v1/models` lists what is available",
                self.config
                    .model_roots()
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // 4. Hugging Face repo ids.
        self.resolve_repo(reference)
    }

    /// The checkpoint or diffusion model file that `name` names in the
    /// A1111 / ComfyUI model folders of the model roots.
    ///
    /// # Errors
    /// [`ModelRefError::Unknown`] when several files have that name (naming them).
    fn model_file(&self, name: &str) -> Result<Option<PathBuf>, ModelRefError> {
        let options = ResolveOptions {
            model_dirs: self.config.model_roots(),
            ..ResolveOptions::default()
        };
        model_file_by_name(name, &options).map_err(|e| ModelRefError::Unknown(e.to_string()))
    }

    /// The LoRA file that `name` (a file name, with or without
    /// `.safetensors`) names in the `Lora` / `loras` folders of the model
    /// roots; `Ok(None)` when none does.
    ///
    /// # Errors
    /// [`ModelRefError::Unknown`] when several files have that name (naming
    /// them) or the file is a pickle.
    pub fn lora_by_name(&self, name: &str) -> Result<Option<PathBuf>, ModelRefError> {
        easel_diffusion::lora::lora_by_name(name, &self.config.model_roots())
            .map_err(|e| ModelRefError::Unknown(e.to_string()))
    }

    fn resolve_repo(&self, reference: &str) -> Result<ModelSpec, ModelRefError> {
        if !is_repo_id(reference) {
            return Err(ModelRefError::Unknown(format!(
                "unknown model `{reference}`: not a Hugging Face repo id (org/name[@revision]), \
                 a registry name or a folder in the model roots"
            )));
        }
        if self.config.engine == EngineKind::Fake {
            if reference.contains("missing") {
                return Err(ModelRefError::Unknown(format!(
                    "unknown model `{reference}`"
                )));
            }
            return Ok(ModelSpec {
                reference: reference.into(),
                load: reference.into(),
                pipeline_class: Some(FAKE_PIPELINE.into()),
            });
        }
        let options = resolve_options(&self.config, true);
        match resolve_model(reference, &options) {
            Ok(dir) => Ok(ModelSpec {
                reference: reference.into(),
                load: reference.into(),
                pipeline_class: Some(dir.pipeline_class().to_string()),
            }),
            Err(_) if !self.config.offline => Ok(ModelSpec {
                reference: reference.into(),
                load: reference.into(),
                pipeline_class: None,
            }),
            Err(e) => Err(ModelRefError::Unknown(format!(
                "unknown model `{reference}`: {e}"
            ))),
        }
    }

    /// Width/height multiple for a model family (`ModelSpec::family`): the
    /// family's (16 for FLUX), else 8 (an unknown class, the fake engine).
    pub fn size_multiple(family: Option<ModelFamily>) -> u32 {
        family.map_or(
            easel_core::params::DEFAULT_SIZE_MULTIPLE,
            ModelFamily::size_multiple,
        )
    }

    /// Registry names and the models on disk, with `loaded` marking those
    /// whose `ModelSpec::load` is in `loaded`.
    pub fn list(&self, loaded: &[String]) -> Vec<ModelEntry> {
        let is_loaded = |load: &str| loaded.iter().any(|l| l == load);
        let mut out = Vec::new();
        for (name, target) in &self.config.models {
            let spec = self.resolve(name).ok();
            out.push(ModelEntry {
                id: name.clone(),
                object: "model".into(),
                source: "registry".into(),
                pipeline_class: spec.as_ref().and_then(|s| s.pipeline_class.clone()),
                size_bytes: None,
                kind: None,
                family: None,
                format: None,
                defaults: FamilyDefaults::of_class(
                    spec.as_ref().and_then(|s| s.pipeline_class.as_deref()),
                ),
                loaded: spec.as_ref().is_some_and(|s| is_loaded(&s.load))
                    || is_loaded(target.target()),
                owned_by: "easel".into(),
                created: 0,
            });
        }
        if self.config.engine == EngineKind::Diffusion {
            for m in list_local_models(&resolve_options(&self.config, true)) {
                let (id, load) = match &m.repo_id {
                    Some(_) => (m.reference.clone(), m.reference.clone()),
                    None => {
                        let canonical = m.path.canonicalize().unwrap_or(m.path.clone());
                        let name = m
                            .path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| m.reference.clone());
                        (name, canonical.display().to_string())
                    }
                };
                out.push(ModelEntry {
                    id,
                    object: "model".into(),
                    source: if m.repo_id.is_some() {
                        "hub-cache"
                    } else {
                        "local"
                    }
                    .into(),
                    pipeline_class: (!m.pipeline_class.is_empty())
                        .then(|| m.pipeline_class.clone()),
                    size_bytes: Some(m.size_bytes),
                    kind: None,
                    family: None,
                    format: None,
                    defaults: FamilyDefaults::of_class(Some(&m.pipeline_class)),
                    loaded: is_loaded(&load),
                    owned_by: "easel".into(),
                    created: 0,
                });
            }
            // Checkpoints and diffusion models of A1111 / ComfyUI model
            // folders, by file name (what `baseModel` takes).
            for f in list_model_files(&self.config.model_roots()) {
                if !matches!(f.kind, FileKind::Checkpoint | FileKind::DiffusionModel) {
                    continue;
                }
                let canonical = f.path.canonicalize().unwrap_or(f.path.clone());
                out.push(ModelEntry {
                    id: f.name.clone(),
                    object: "model".into(),
                    source: "local".into(),
                    pipeline_class: f.pipeline_class.clone(),
                    size_bytes: Some(f.size_bytes),
                    kind: Some(snake(&f.kind)),
                    family: Some(match (&f.family, &f.unknown_reason) {
                        (Some(family), _) => family.clone(),
                        (None, Some(why)) => format!("unknown: {why}"),
                        (None, None) => "unknown".into(),
                    }),
                    format: Some(snake(&f.format)),
                    defaults: FamilyDefaults::of_class(f.pipeline_class.as_deref()),
                    loaded: is_loaded(&canonical.display().to_string()),
                    owned_by: "easel".into(),
                    created: 0,
                });
            }
        } else {
            for load in loaded {
                out.push(ModelEntry {
                    id: load.clone(),
                    object: "model".into(),
                    source: "fake".into(),
                    pipeline_class: Some(FAKE_PIPELINE.into()),
                    size_bytes: None,
                    kind: None,
                    family: None,
                    format: None,
                    defaults: None,
                    loaded: true,
                    owned_by: "easel".into(),
                    created: 0,
                });
            }
        }
        out
    }
}

/// The JSON name of a unit enum value (`checkpoint`, `fp8_safetensors`).
fn snake<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The completed single-file fixtures, shared with the other crates' tests.
#[cfg(test)]
#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;

#[cfg(test)]
mod tests {
    use super::single_file_support::single_file_fixture;
    use super::*;

    fn registry(root: &Path) -> ModelRegistry {
        let config = Config {
            data_dir: root.join("data"),
            models_dirs: vec![root.join("models")],
            hf_cache: Some(root.join("hub")),
            offline: true,
            ..Config::default()
        };
        std::fs::create_dir_all(root.join("models/sd")).unwrap();
        std::fs::create_dir_all(root.join("data/models")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        ModelRegistry::new(&config)
    }

    #[test]
    fn local_paths_outside_the_model_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let outside = dir.path().join("outside");
        assert!(matches!(
            reg.resolve(&outside.display().to_string()),
            Err(ModelRefError::NotAllowed(_))
        ));
        let sneaky = dir.path().join("models/../outside");
        assert!(matches!(
            reg.resolve(&sneaky.display().to_string()),
            Err(ModelRefError::NotAllowed(_))
        ));
        assert!(matches!(
            reg.resolve("/etc/passwd"),
            Err(ModelRefError::NotAllowed(_))
        ));
        #[cfg(unix)]
        {
            let link = dir.path().join("models/link");
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            assert!(matches!(
                reg.resolve(&link.display().to_string()),
                Err(ModelRefError::NotAllowed(_))
            ));
        }
        // Inside a root but not a model folder: unknown, not refused.
        let inside = dir.path().join("models/sd");
        assert!(matches!(
            reg.resolve(&inside.display().to_string()),
            Err(ModelRefError::Unknown(_))
        ));
        assert!(matches!(
            reg.resolve("no-such-model"),
            Err(ModelRefError::Unknown(_))
        ));
        assert!(matches!(
            reg.resolve("org/not-cached"),
            Err(ModelRefError::Unknown(_))
        ));
    }

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("stabilityai/stable-diffusion-xl-base-1.0"));
        assert!(is_repo_id("org/name@refs/pr/1"));
        for bad in [
            "name",
            "a/b/c",
            "org/..",
            "org/na me",
            "../x/y",
            "org/name@",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    /// Issue 14: a single-file checkpoint under a model root is a model
    /// (with its default config repo from the hub cache); a pickle there
    /// is refused, saying why; without the config repo an offline server
    /// names `--config`.
    #[test]
    fn single_file_checkpoints_under_a_model_root() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let file = dir.path().join("models/sd15.safetensors");
        std::fs::copy(single_file_fixture("tiny-sd15"), &file).unwrap();
        let err = reg.resolve(&file.display().to_string()).unwrap_err();
        assert!(
            matches!(&err, ModelRefError::Unknown(m) if m.contains("--config")),
            "{err}"
        );

        // The default config repo's configs in the hub cache.
        let commit = "1111111111111111111111111111111111111111";
        let repo = dir
            .path()
            .join("hub/models--stable-diffusion-v1-5--stable-diffusion-v1-5");
        let snapshot = repo.join("snapshots").join(commit);
        let source = fixtures.join("models/tiny-sd15");
        let mut stack = vec![source.clone()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let target = snapshot.join(path.strip_prefix(&source).unwrap());
                if path.is_dir() {
                    std::fs::create_dir_all(&target).unwrap();
                    stack.push(path);
                } else if path.extension().is_none_or(|e| e != "safetensors") {
                    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                    std::fs::copy(&path, &target).unwrap();
                }
            }
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let spec = reg.resolve(&file.display().to_string()).unwrap();
        assert_eq!(
            spec.pipeline_class.as_deref(),
            Some("StableDiffusionPipeline")
        );
        assert_eq!(
            Path::new(&spec.load).canonicalize().unwrap(),
            file.canonicalize().unwrap()
        );

        let ckpt = dir.path().join("models/old.ckpt");
        std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
        let err = reg.resolve(&ckpt.display().to_string()).unwrap_err();
        assert!(
            matches!(&err, ModelRefError::Unknown(m) if m.contains("pickle")),
            "{err}"
        );
        // Outside the roots, a file is refused like a folder.
        let outside = dir.path().join("outside/sd15.safetensors");
        std::fs::copy(&file, &outside).unwrap();
        assert!(matches!(
            reg.resolve(&outside.display().to_string()),
            Err(ModelRefError::NotAllowed(_))
        ));
    }

    /// Issue 14: a registry entry `{ path, config, prediction_type }` opens
    /// a single file with that config (no default repo needed, offline),
    /// and the worker's resolve options carry the same settings.
    #[test]
    fn registry_entries_give_single_files_their_config() {
        use crate::config::ModelTarget;
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let file = single_file_fixture("tiny-sd2-v");
        let config_dir = fixtures.join("models/tiny-sd2-v");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            hf_cache: Some(dir.path().join("hub")),
            offline: true,
            ..Config::default()
        };
        config.models.insert(
            "sd2".into(),
            ModelTarget::Entry {
                path: file.display().to_string(),
                config: Some(config_dir.display().to_string()),
                prediction_type: Some("epsilon".into()),
                unet: None,
                transformer: None,
                vae: None,
                text_encoder: None,
                text_encoder_2: None,
                quantize: None,
                offload_t5: false,
            },
        );
        // Settings go with the file: another entry needs another file.
        let copy = dir.path().join("sd2-copy.safetensors");
        std::fs::copy(&file, &copy).unwrap();
        config.models.insert(
            "sd2-default".into(),
            ModelTarget::Reference(copy.display().to_string()),
        );
        let reg = ModelRegistry::new(&config);
        let spec = reg.resolve("sd2").unwrap();
        assert_eq!(
            spec.pipeline_class.as_deref(),
            Some("StableDiffusionPipeline")
        );
        let options = resolve_options(&config, true);
        let model = resolve_model(&spec.load, &options).unwrap();
        assert!(model.single_file().is_some());
        assert_eq!(
            model.component_config("scheduler").unwrap()["prediction_type"],
            "epsilon"
        );
        // Without a config, the default repo (not cached, offline) is missing.
        let err = reg.resolve("sd2-default").unwrap_err();
        assert!(
            matches!(&err, ModelRefError::Unknown(m) if m.contains("stabilityai/stable-diffusion-2-1")),
            "{err}"
        );
    }

    /// Issue 14: a FLUX.1 transformer file (BFL layout, ComfyUI's prefix)
    /// as a registry entry with a diffusers `config` is a FLUX model for the
    /// server: its family decides the size multiple, and the worker's
    /// engine loads and runs it (transformer from the file, the rest from
    /// the config).
    #[test]
    fn registry_entries_give_flux_transformer_files_their_config() {
        use crate::config::ModelTarget;
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let file = single_file_fixture("tiny-flux-schnell");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            hf_cache: Some(dir.path().join("hub")),
            offline: true,
            ..Config::default()
        };
        config.models.insert(
            "schnell".into(),
            ModelTarget::Entry {
                path: file.display().to_string(),
                config: Some(
                    fixtures
                        .join("models/tiny-flux-schnell")
                        .display()
                        .to_string(),
                ),
                prediction_type: None,
                unet: None,
                transformer: None,
                vae: None,
                text_encoder: None,
                text_encoder_2: None,
                quantize: None,
                offload_t5: false,
            },
        );
        let reg = ModelRegistry::new(&config);
        let spec = reg.resolve("schnell").unwrap();
        assert_eq!(spec.pipeline_class.as_deref(), Some("FluxPipeline"));
        assert_eq!(spec.family(), Some(ModelFamily::Flux));
        let mut engine =
            easel_diffusion::engine::Engine::new(easel_diffusion::engine::EngineOptions {
                resolve: resolve_options(&config, true),
                ..Default::default()
            });
        let job = easel_diffusion::engine::JobRequest::new(
            spec.load.clone(),
            easel_core::GenerationParams {
                steps: Some(2),
                width: Some(32),
                height: Some(32),
                seed: Some(1),
                ..easel_core::GenerationParams::new("a lighthouse")
            },
        );
        let defaults = engine.load(&spec.load).unwrap().defaults().clone();
        assert!(engine
            .load(&spec.load)
            .unwrap()
            .dir()
            .single_file()
            .is_some());
        let out = engine
            .run(
                &job.build(&defaults).unwrap(),
                &mut |_| {},
                &easel_diffusion::pipelines::CancelToken::new(),
            )
            .unwrap();
        assert_eq!(out.params.pipeline, "FluxPipeline");
        assert_eq!(out.images.len(), 1);
        assert_eq!(out.images[0].len(), 32 * 32 * 3);
    }
}
