//! A diffusers model folder: `model_index.json` plus one folder per component.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use serde_json::{Map, Value};

use super::component_files::ComponentFile;
use super::single_file::SingleFile;
use super::weights::{self, NoWeights, WeightChoice};
use crate::error::{Error, Result};
use crate::models::quantize::Quantization;

/// Where a [`ModelDir`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder given by path (or found in an extra model folder).
    Local,
    /// A snapshot in the Hugging Face hub cache.
    HubCache {
        /// `org/name`.
        repo_id: String,
        /// The revision asked for (`main`, a branch, tag or commit).
        revision: String,
        /// The commit the snapshot is of.
        commit: String,
    },
}

/// What a component is, from its class name in `model_index.json`; decides
/// which config file it has and whether it has weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// A network with weights (`UNet2DConditionModel`, `CLIPTextModel`,
    /// `AutoencoderKL`, ...): `config.json` + weights.
    Model,
    /// A scheduler: `scheduler_config.json`.
    Scheduler,
    /// A tokenizer: `tokenizer_config.json` + vocabulary files.
    Tokenizer,
    /// An image processor / feature extractor: `preprocessor_config.json`.
    Processor,
}

impl ComponentKind {
    /// The kind of a component class, as diffusers' loading code tells them
    /// apart by class name.
    pub fn of_class(class_name: &str) -> Self {
        if class_name.contains("Scheduler") {
            ComponentKind::Scheduler
        } else if class_name.contains("Tokenizer") {
            ComponentKind::Tokenizer
        } else if class_name.contains("FeatureExtractor")
            || class_name.contains("ImageProcessor")
            || class_name.ends_with("Processor")
        {
            ComponentKind::Processor
        } else {
            ComponentKind::Model
        }
    }

    /// The config file name of this kind of component.
    pub fn config_file(self) -> &'static str {
        match self {
            ComponentKind::Model => "config.json",
            ComponentKind::Scheduler => "scheduler_config.json",
            ComponentKind::Tokenizer => "tokenizer_config.json",
            ComponentKind::Processor => "preprocessor_config.json",
        }
    }
}

/// One entry of `model_index.json`'s components map, e.g.
/// `"unet": ["diffusers", "UNet2DConditionModel"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// The key, which is also the folder name (`unet`, `text_encoder_2`, ...).
    pub name: String,
    /// The library (`diffusers`, `transformers`, ...).
    pub library: String,
    /// The class (`UNet2DConditionModel`, `CLIPTokenizer`, ...).
    pub class_name: String,
}

impl Component {
    /// What the component is, from its class name.
    pub fn kind(&self) -> ComponentKind {
        ComponentKind::of_class(&self.class_name)
    }
}

/// A diffusers model folder (a local folder or a hub-cache snapshot) and its
/// `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    name: String,
    source: ModelSource,
    pipeline_class: String,
    diffusers_version: Option<String>,
    components: BTreeMap<String, Component>,
    options: Map<String, Value>,
    random_weights: bool,
    quantization: Option<Quantization>,
    offloaded_t5: bool,
    offload: crate::device::Offload,
    compute_dtype: DType,
    single_file: Option<Arc<SingleFile>>,
    prediction_type: Option<String>,
    component_files: BTreeMap<String, Arc<ComponentFile>>,
}

impl ModelDir {
    /// Opens a folder holding `model_index.json`; its name (in messages) is the path.
    ///
    /// # Errors
    /// [`Error::MissingComponent`] when there is no `model_index.json`;
    /// [`Error::Json`] / [`Error::Io`] when it cannot be read;
    /// [`Error::Config`] when it has no `_class_name`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        Self::open_as(root, root.display().to_string(), ModelSource::Local)
    }

    /// Opens a folder, naming it `name` in messages.
    pub(crate) fn open_as(root: &Path, name: String, source: ModelSource) -> Result<Self> {
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::MissingComponent {
                model: name,
                what: "model_index.json (not a diffusers model folder)".into(),
                path: index_path,
            });
        }
        let index = read_json(&index_path)?;
        let Value::Object(index) = index else {
            return Err(Error::config(
                "model_index.json",
                format!("{}: expected a JSON object", index_path.display()),
            ));
        };
        let parsed = ModelIndex::parse(index).map_err(|message| {
            Error::config(
                "model_index.json",
                format!("{}: {message}", index_path.display()),
            )
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            name,
            source,
            pipeline_class: parsed.pipeline_class,
            diffusers_version: parsed.diffusers_version,
            components: parsed.components,
            options: parsed.options,
            random_weights: false,
            quantization: None,
            offloaded_t5: false,
            offload: crate::device::Offload::None,
            compute_dtype: DType::F32,
            single_file: None,
            prediction_type: None,
            component_files: BTreeMap::new(),
        })
    }

    /// The same model with every weight tensor synthesised (random values of
    /// the shapes the configs imply) instead of read from files: benchmarks
    /// of real-size architectures whose weights are not on disk
    /// (`easel bench --random-weights`).
    pub fn with_random_weights(mut self, random: bool) -> Self {
        self.random_weights = random;
        self
    }

    /// The same model with its large components
    /// ([`super::ModelFamily::quantized_components`]) quantized as they load
    /// ([`Quantization`]; `None`: as stored).
    pub fn with_quantization(mut self, quantization: Option<Quantization>) -> Self {
        self.quantization = quantization;
        self
    }

    /// The same model with FLUX's T5 encoder (`text_encoder_2`) loaded for
    /// each prompt encoding and freed after it instead of kept (`--offload-t5`):
    /// less memory while the transformer and VAE run, a T5 load per
    /// generation. No effect on other families.
    pub fn with_offloaded_t5(mut self, offloaded: bool) -> Self {
        self.offloaded_t5 = offloaded;
        self
    }

    /// The same model computing in `dtype` (diffusers' `torch_dtype`): its
    /// text encoders, denoiser and VAE hold their weights and activations
    /// in `dtype` (f32, f16 or bf16), except where the pipeline upcasts as
    /// diffusers does (the SDXL VAE in f16, `force_upcast`). Latents and
    /// the schedulers stay f32 between model calls. Default f32: the
    /// engine's own CPU kernels run only in f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The compute dtype ([`Self::with_compute_dtype`]; f32 by default).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The same model with its weights kept in host memory between uses
    /// (`--offload model|sequential`; see [`crate::pipelines::offload`]).
    pub fn with_offload(mut self, offload: crate::device::Offload) -> Self {
        self.offload = offload;
        self
    }

    /// The memory mode set by [`Self::with_offload`] (default `none`).
    pub fn offload(&self) -> crate::device::Offload {
        self.offload
    }

    /// Whether [`Self::with_offloaded_t5`] is on.
    pub fn offloaded_t5(&self) -> bool {
        self.offloaded_t5
    }

    /// The quantization applied at load ([`Self::with_quantization`]).
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantization
    }

    /// Makes this (config) folder the configs of the single-file checkpoint
    /// `file`, named `name` in messages; `prediction_type` (when given)
    /// replaces the scheduler config's.
    pub(crate) fn set_single_file(
        &mut self,
        name: String,
        file: Arc<SingleFile>,
        prediction_type: Option<String>,
    ) {
        self.name = name;
        self.single_file = Some(file);
        self.prediction_type = prediction_type;
    }

    /// The single-file checkpoint the weights come from, when the model was
    /// opened from one ([`super::open_single_file`]); then this folder only
    /// gives configs and tokenizers, and a component the file holds is read
    /// from the file ([`SingleFile::source`]).
    pub fn single_file(&self) -> Option<&SingleFile> {
        self.single_file.as_deref()
    }

    /// Makes `file` the weights of its component (replacing an earlier
    /// file for it), checked by [`super::open_component_file`].
    pub(crate) fn set_component_file(&mut self, file: Arc<ComponentFile>) {
        self.component_files
            .insert(file.component().to_string(), file);
    }

    /// The file a component's weights come from instead of the model's
    /// own (`--vae FILE`, ...; see [`super::ComponentFiles`]): the
    /// pipelines read the component from it, before a single-file
    /// checkpoint or the folder's weights.
    pub fn component_file(&self, component: &str) -> Option<&ComponentFile> {
        self.component_files.get(component).map(Arc::as_ref)
    }

    /// Every component file, by component name.
    pub fn component_files(&self) -> impl Iterator<Item = &ComponentFile> {
        self.component_files.values().map(Arc::as_ref)
    }

    /// Whether [`Self::with_random_weights`] is on.
    pub fn random_weights(&self) -> bool {
        self.random_weights
    }

    /// The folder holding `model_index.json`.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The model's name in messages: the repo id, or the path it was given as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the folder came from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The pipeline class (`_class_name`: `StableDiffusionPipeline`,
    /// `StableDiffusionXLPipeline`, `FluxPipeline`, ...).
    pub fn pipeline_class(&self) -> &str {
        &self.pipeline_class
    }

    /// The model's family, decided from [`Self::pipeline_class`]; `None`
    /// for a class the engine does not load.
    pub fn family(&self) -> Option<super::ModelFamily> {
        super::ModelFamily::from_class_name(&self.pipeline_class)
    }

    /// `_diffusers_version`, when the index records it.
    pub fn diffusers_version(&self) -> Option<&str> {
        self.diffusers_version.as_deref()
    }

    /// The components, by name; entries given as `[null, null]` are left out.
    pub fn components(&self) -> impl Iterator<Item = &Component> {
        self.components.values()
    }

    /// One component, if the index lists it.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.get(name)
    }

    /// The top-level options of `model_index.json` that are neither
    /// components nor `_`-prefixed metadata (`force_zeros_for_empty_prompt`,
    /// `requires_safety_checker`, `is_distilled`, ...), as raw JSON.
    pub fn options(&self) -> &Map<String, Value> {
        &self.options
    }

    /// One option (see [`Self::options`]).
    pub fn option(&self, key: &str) -> Option<&Value> {
        self.options.get(key)
    }

    /// The folder of a component.
    ///
    /// # Errors
    /// [`Error::MissingComponent`] when the index does not list it or its folder is missing.
    pub fn component_dir(&self, name: &str) -> Result<PathBuf> {
        let component = self.require(name)?;
        let dir = self.root.join(&component.name);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(self.missing(format!("component `{name}` folder"), dir))
        }
    }

    /// A component's config as raw JSON: `config.json` for models,
    /// `scheduler_config.json` for the scheduler, `tokenizer_config.json` for
    /// tokenizers, `preprocessor_config.json` for image processors.
    ///
    /// # Errors
    /// [`Error::MissingComponent`] when the component or its config is missing;
    /// [`Error::Json`] / [`Error::Io`] when the config cannot be read.
    pub fn component_config(&self, name: &str) -> Result<Value> {
        let kind = self.require(name)?.kind();
        let path = self.component_dir(name)?.join(kind.config_file());
        if !path.is_file() {
            return Err(self.missing(format!("`{name}` config"), path));
        }
        let mut config = read_json(&path)?;
        if let (Some(p), Value::Object(map)) = (&self.prediction_type, &mut config) {
            if kind == ComponentKind::Scheduler {
                map.insert("prediction_type".into(), Value::String(p.clone()));
            }
        }
        Ok(config)
    }

    /// Checks that every component not in `skip` has its folder and config
    /// (tokenizers: their files), not weights: a folder that gives a
    /// single-file checkpoint its configs.
    ///
    /// # Errors
    /// As [`Self::component_config`].
    pub(crate) fn check_configs(&self, skip: &[String]) -> Result<()> {
        for component in self.components.values() {
            if !skip.iter().any(|s| s == &component.name) {
                self.component_config(&component.name)?;
            }
        }
        Ok(())
    }

    /// The weight files of a model component: one `.safetensors` file, or
    /// every shard a `*.safetensors.index.json` lists (sorted); the `.fp16.`
    /// variant when the folder has one.
    ///
    /// # Errors
    /// [`Error::MissingComponent`] naming the component and the expected path
    /// when there are no weights or a shard is missing;
    /// [`Error::UnsupportedWeights`] when there are only non-safetensors
    /// weights (`.bin`, `.ckpt`, ...); [`Error::Config`] / [`Error::Json`] for
    /// a malformed shard index.
    pub fn weight_files(&self, name: &str) -> Result<Vec<PathBuf>> {
        let component = self.require(name)?;
        let dir = self.component_dir(name)?;
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            // `is_file` follows symlinks (hub-cache snapshots link into blobs/).
            if entry.path().is_file() {
                if let Some(file) = entry.file_name().to_str() {
                    files.push(file.to_string());
                }
            }
        }
        let names: Vec<&str> = files.iter().map(String::as_str).collect();
        match weights::choose(&names) {
            Ok(WeightChoice::Single(file)) => Ok(vec![dir.join(file)]),
            Ok(WeightChoice::Sharded(index)) => {
                let shards = weights::shards(&dir.join(&index), name)?;
                shards
                    .into_iter()
                    .map(|shard| {
                        let path = dir.join(&shard);
                        if path.is_file() {
                            Ok(path)
                        } else {
                            Err(self.missing(
                                format!("`{name}` weight shard {shard} (listed in {index})"),
                                path,
                            ))
                        }
                    })
                    .collect()
            }
            Err(NoWeights::Missing) => Err(self.missing(
                format!("`{name}` weights"),
                dir.join(weights::expected_name(&component.library)),
            )),
            Err(NoWeights::Unsupported(found)) => Err(Error::UnsupportedWeights {
                model: self.name.clone(),
                component: name.to_string(),
                found,
                dir,
            }),
        }
    }

    /// Checks that every component not in `skip` has its folder, its config
    /// and (for models) its weights; the first problem is the error.
    ///
    /// # Errors
    /// As [`Self::component_config`] and [`Self::weight_files`].
    pub fn check_complete(&self, skip: &[String]) -> Result<()> {
        for component in self.components.values() {
            if skip.iter().any(|s| s == &component.name) {
                continue;
            }
            self.component_config(&component.name)?;
            if component.kind() == ComponentKind::Model {
                self.weight_files(&component.name)?;
            }
        }
        Ok(())
    }

    fn require(&self, name: &str) -> Result<&Component> {
        self.components.get(name).ok_or_else(|| {
            let listed: Vec<&str> = self.components.keys().map(String::as_str).collect();
            self.missing(
                format!(
                    "component `{name}` ({} lists: {})",
                    self.pipeline_class,
                    listed.join(", ")
                ),
                self.root.join("model_index.json"),
            )
        })
    }

    fn missing(&self, what: String, path: PathBuf) -> Error {
        Error::MissingComponent {
            model: self.name.clone(),
            what,
            path,
        }
    }
}

/// The parsed `model_index.json`.
pub(crate) struct ModelIndex {
    pub(crate) pipeline_class: String,
    pub(crate) diffusers_version: Option<String>,
    pub(crate) components: BTreeMap<String, Component>,
    pub(crate) options: Map<String, Value>,
}

impl ModelIndex {
    /// Splits the index into metadata, components (`[library, class]` pairs;
    /// `[null, null]` skipped) and options (everything else).
    pub(crate) fn parse(index: Map<String, Value>) -> std::result::Result<Self, String> {
        let pipeline_class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or("no `_class_name` (pipeline class)")?
            .to_string();
        let diffusers_version = index
            .get("_diffusers_version")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut components = BTreeMap::new();
        let mut options = Map::new();
        for (key, value) in index {
            if key.starts_with('_') {
                continue;
            }
            match component_entry(&value) {
                Some(Some((library, class_name))) => {
                    if !weights::is_plain_file_name(&key) {
                        return Err(format!("component name `{key}` is not a folder name"));
                    }
                    components.insert(
                        key.clone(),
                        Component {
                            name: key,
                            library,
                            class_name,
                        },
                    );
                }
                Some(None) => {} // [null, null]: not part of this model
                None => {
                    options.insert(key, value);
                }
            }
        }
        Ok(Self {
            pipeline_class,
            diffusers_version,
            components,
            options,
        })
    }
}

/// `Some(Some((library, class)))` for a component, `Some(None)` for an absent
/// one (`[null, null]`), `None` for a value that is not a component entry.
fn component_entry(value: &Value) -> Option<Option<(String, String)>> {
    let Value::Array(pair) = value else {
        return None;
    };
    if pair.len() != 2 || !pair.iter().all(|v| v.is_string() || v.is_null()) {
        return None;
    }
    match (pair[0].as_str(), pair[1].as_str()) {
        (Some(library), Some(class)) => Some(Some((library.to_string(), class.to_string()))),
        (None, Some(class)) => Some(Some((String::new(), class.to_string()))),
        _ => Some(None),
    }
}

/// Reads a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // Python's json writes -Infinity / NaN (DPMSolver's lambda_min_clipped);
    // the lenient parser keeps them as strings the config readers understand.
    crate::json::parse_lenient(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
