//! Downloading a diffusers repository into the hub cache with `hf-hub`,
//! fetching only what a pipeline needs.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use super::model_dir::{read_json, ComponentKind, ModelIndex};
use super::weights::{self, NoWeights, WeightChoice};
use crate::error::{Error, Result};

/// Tokenizer files a diffusers pipeline may read (CLIP, T5, legacy layouts).
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
];

/// The files to fetch for one repository, before the shard indexes are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Files to fetch (`unet/config.json`, `unet/diffusion_pytorch_model.fp16.safetensors`, ...).
    pub(crate) files: Vec<String>,
    /// Shard indexes among `files`, whose shards are fetched next: (component, index path).
    pub(crate) shard_indexes: Vec<(String, String)>,
}

/// Chooses the files of the components of `index` (except `skip`) among the
/// repository's files `repo_files`.
///
/// # Errors
/// [`Error::MissingComponent`] when a model component has no weights or a
/// component has no config; [`Error::UnsupportedWeights`] when it has only
/// non-safetensors weights.
#[cfg(test)]
pub(crate) fn plan(
    model: &str,
    index: &ModelIndex,
    repo_files: &[String],
    skip: &[String],
) -> Result<Plan> {
    plan_files(model, index, repo_files, skip, true)
}

/// As [`plan`]; without `with_weights`, only configs and tokenizer files
/// (the configs of a single-file checkpoint).
pub(crate) fn plan_files(
    model: &str,
    index: &ModelIndex,
    repo_files: &[String],
    skip: &[String],
    with_weights: bool,
) -> Result<Plan> {
    let mut plan = Plan::default();
    for component in index.components.values() {
        if skip.iter().any(|s| s == &component.name) {
            continue;
        }
        let prefix = format!("{}/", component.name);
        // The files directly in the component folder.
        let files: Vec<&str> = repo_files
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|f| !f.contains('/'))
            .collect();
        let missing = |what: String, file: &str| Error::MissingComponent {
            model: model.to_string(),
            what,
            path: PathBuf::from(format!("{prefix}{file}")),
        };
        let kind = component.kind();
        match kind {
            ComponentKind::Tokenizer => {
                let found: Vec<&str> = TOKENIZER_FILES
                    .iter()
                    .copied()
                    .filter(|f| files.contains(f))
                    .collect();
                if found.is_empty() {
                    return Err(missing(
                        format!("`{}` tokenizer files in the repository", component.name),
                        "tokenizer_config.json",
                    ));
                }
                plan.files
                    .extend(found.iter().map(|f| format!("{prefix}{f}")));
            }
            ComponentKind::Scheduler | ComponentKind::Processor | ComponentKind::Model => {
                let config = kind.config_file();
                if !files.contains(&config) {
                    return Err(missing(
                        format!("`{}` config in the repository", component.name),
                        config,
                    ));
                }
                plan.files.push(format!("{prefix}{config}"));
            }
        }
        if kind != ComponentKind::Model || !with_weights {
            continue;
        }
        match weights::choose(&files) {
            Ok(WeightChoice::Single(file)) => plan.files.push(format!("{prefix}{file}")),
            Ok(WeightChoice::Sharded(file)) => {
                let path = format!("{prefix}{file}");
                plan.files.push(path.clone());
                plan.shard_indexes.push((component.name.clone(), path));
            }
            Err(NoWeights::Missing) => {
                return Err(missing(
                    format!("`{}` weights in the repository", component.name),
                    weights::expected_name(&component.library),
                ))
            }
            Err(NoWeights::Unsupported(found)) => {
                return Err(Error::UnsupportedWeights {
                    model: model.to_string(),
                    component: component.name.clone(),
                    found,
                    dir: PathBuf::from(&component.name),
                })
            }
        }
    }
    Ok(plan)
}

/// How to reach the hub.
pub(crate) struct HubAccess {
    pub(crate) cache: PathBuf,
    pub(crate) endpoint: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) progress: bool,
}

/// Why a download failed.
#[derive(Debug)]
pub(crate) enum DownloadError {
    /// The hub could not be reached or refused (network, 401/404, ...): text
    /// for the caller to wrap with where it looked and what to do.
    Hub(String),
    /// The repository was reached but cannot be used (not a pipeline,
    /// pickle-only weights, malformed index): a final error.
    Model(Error),
}

impl From<String> for DownloadError {
    fn from(message: String) -> Self {
        DownloadError::Hub(message)
    }
}

impl From<Error> for DownloadError {
    fn from(error: Error) -> Self {
        DownloadError::Model(error)
    }
}

/// Downloads what the pipeline of `repo_id` at `revision` needs into the
/// cache (files already in the snapshot are not fetched again), points
/// `refs/<revision>` at the commit, and returns the snapshot folder and commit.
pub(crate) fn download(
    repo_id: &str,
    revision: &str,
    access: &HubAccess,
    skip: &[String],
) -> std::result::Result<(PathBuf, String), DownloadError> {
    download_files(repo_id, revision, access, skip, true)
}

/// As [`download`]; without `with_weights`, only configs and tokenizer
/// files ([`plan_files`]).
pub(crate) fn download_files(
    repo_id: &str,
    revision: &str,
    access: &HubAccess,
    skip: &[String],
    with_weights: bool,
) -> std::result::Result<(PathBuf, String), DownloadError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(access.cache.clone()))
        .with_progress(access.progress)
        .with_token(access.token.clone());
    if let Some(endpoint) = &access.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;

    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let api_repo = api.repo(repo.clone());
    let info = api_repo
        .info()
        .map_err(|e| format!("fetching the file list: {e}"))?;
    let commit = info.sha.clone();
    if !weights::is_plain_file_name(&commit) {
        return Err(format!("the hub answered an invalid commit `{commit}`").into());
    }
    let repo_files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !repo_files.iter().any(|f| f == "model_index.json") {
        return Err(Error::ModelNotFound(format!(
            "{repo_id} (revision {revision}) has no model_index.json: it is not a diffusers \
             pipeline repository (single-file checkpoints are not supported)"
        ))
        .into());
    }
    let snapshot = access
        .cache
        .join(super::cache::repo_folder_name(repo_id))
        .join("snapshots")
        .join(&commit);
    let fetch = |file: &str| fetch(&api_repo, &snapshot, file);

    let index_path = fetch("model_index.json")?;
    let index = match read_json(&index_path)? {
        Value::Object(map) => ModelIndex::parse(map).map_err(|e| {
            Error::config("model_index.json", format!("{}: {e}", index_path.display()))
        })?,
        _ => {
            return Err(Error::config(
                "model_index.json",
                format!("{}: expected a JSON object", index_path.display()),
            )
            .into())
        }
    };
    let plan = plan_files(repo_id, &index, &repo_files, skip, with_weights)?;
    for file in &plan.files {
        fetch(file)?;
    }
    for (component, index_file) in &plan.shard_indexes {
        let local = snapshot.join(index_file);
        let shards = weights::shards(&local, component)?;
        let dir = index_file.rsplit_once('/').map_or("", |(dir, _)| dir);
        for shard in shards {
            fetch(&format!("{dir}/{shard}"))?;
        }
    }
    // Point the revision at this commit even when nothing had to be fetched.
    if revision != commit {
        Cache::new(access.cache.clone())
            .repo(repo)
            .create_ref(&commit)
            .map_err(|e| {
                let refs = access.cache.join(super::cache::repo_folder_name(repo_id));
                Error::io(refs.join("refs").join(revision), e)
            })?;
    }
    Ok((snapshot, commit))
}

/// Downloads one file of `repo_id` at `revision`, chosen by `pick` among
/// the repository's files, into the cache; returns its local path.
pub(crate) fn download_picked(
    repo_id: &str,
    revision: &str,
    access: &HubAccess,
    pick: fn(&[String]) -> std::result::Result<String, String>,
) -> std::result::Result<PathBuf, String> {
    let mut builder = ApiBuilder::from_cache(Cache::new(access.cache.clone()))
        .with_progress(access.progress)
        .with_token(access.token.clone());
    if let Some(endpoint) = &access.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let api_repo = api.repo(repo);
    let info = api_repo
        .info()
        .map_err(|e| format!("fetching the file list: {e}"))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let file = pick(&names)?;
    api_repo
        .download(&file)
        .map_err(|e| format!("downloading {file}: {e}"))
}

/// One file: from the snapshot when already there, else downloaded.
fn fetch(api_repo: &ApiRepo, snapshot: &Path, file: &str) -> std::result::Result<PathBuf, String> {
    let local = snapshot.join(file);
    if local.is_file() {
        return Ok(local);
    }
    tracing::info!(file, "downloading");
    let path = api_repo
        .download(file)
        .map_err(|e| format!("downloading {file}: {e}"))?;
    if path != local {
        // The branch moved between the file list and this download.
        return Err(format!(
            "{file} was downloaded for another commit ({}); the repository changed during \
             the download, try again",
            path.display()
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index(value: Value) -> ModelIndex {
        match value {
            Value::Object(map) => ModelIndex::parse(map).unwrap(),
            _ => unreachable!(),
        }
    }

    fn sd15_files() -> Vec<String> {
        [
            ".gitattributes",
            "README.md",
            "model_index.json",
            "v1-5-pruned.ckpt",
            "v1-5-pruned.safetensors",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/pytorch_model.bin",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae_flax_model.msgpack",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn sd15_index() -> ModelIndex {
        index(json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "requires_safety_checker": true,
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [null, null]
        }))
    }

    #[test]
    fn plans_only_what_the_pipeline_needs() {
        let p = plan(
            "org/sd15",
            &sd15_index(),
            &sd15_files(),
            &["safety_checker".into()],
        )
        .unwrap();
        let mut files = p.files.clone();
        files.sort();
        assert_eq!(
            files,
            vec![
                "feature_extractor/preprocessor_config.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ]
        );
        assert!(p.shard_indexes.is_empty());

        // Not skipped, the safety checker comes in its fp16 safetensors.
        let all = plan("org/sd15", &sd15_index(), &sd15_files(), &[]).unwrap();
        assert!(all
            .files
            .contains(&"safety_checker/model.fp16.safetensors".to_string()));
    }

    #[test]
    fn plans_shard_indexes() {
        let index = index(json!({
            "_class_name": "FluxPipeline",
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"]
        }));
        let files: Vec<String> = [
            "model_index.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder_2/config.json",
            "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors",
            "text_encoder_2/model.safetensors.index.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = plan("bfl/flux", &index, &files, &[]).unwrap();
        assert_eq!(
            p.shard_indexes,
            vec![
                (
                    "text_encoder_2".to_string(),
                    "text_encoder_2/model.safetensors.index.json".to_string()
                ),
                (
                    "transformer".to_string(),
                    "transformer/diffusion_pytorch_model.safetensors.index.json".to_string()
                ),
            ]
        );
    }

    #[test]
    fn refuses_pickle_only_and_missing() {
        let mut files = sd15_files();
        files.retain(|f| {
            !f.starts_with("unet/") || f.ends_with(".bin") || f.ends_with("config.json")
        });
        let err = plan(
            "org/sd15",
            &sd15_index(),
            &files,
            &["safety_checker".into()],
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::UnsupportedWeights { .. }), "{message}");
        assert!(
            message.contains("only safetensors are supported"),
            "{message}"
        );
        assert!(message.contains("diffusion_pytorch_model.bin"), "{message}");

        let mut files = sd15_files();
        files.retain(|f| !f.starts_with("vae/diffusion"));
        let err = plan(
            "org/sd15",
            &sd15_index(),
            &files,
            &["safety_checker".into()],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("vae/diffusion_pytorch_model.safetensors"),
            "{err}"
        );
    }
}
