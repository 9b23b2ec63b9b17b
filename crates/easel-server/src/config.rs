//! Server configuration: defaults, then a TOML file (`--config FILE` or
//! `EASEL_CONFIG`), then `EASEL_*` environment variables, then the command
//! line (applied by the caller).
//!
//! Every key of [`Config`] can be set in the file under its own name
//! (`max_queue = 100`) and in the environment as `EASEL_` + the upper-case
//! name (`EASEL_MAX_QUEUE=100`); list values (`models_dirs`) are separated by
//! the platform's path separator (`:` on Unix). The `models` table (registry
//! names) is read from the file only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use easel_diffusion::device::{DeviceSpec, Offload};
use easel_diffusion::loader::{ComponentFiles, ComponentOverrides};
use serde::{Deserialize, Serialize};

/// Which engine the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The diffusion engine (`easel-diffusion`).
    #[default]
    Diffusion,
    /// A fast deterministic stand-in that draws patterns from the seed and
    /// prompt, for load tests of the service itself (`fake_step_ms` per step).
    Fake,
}

/// A registry entry of the `[models]` table: a reference (repo id or path),
/// or a table for a single-file checkpoint with the diffusers folder or repo
/// giving its configs (as `easel generate --config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelTarget {
    /// `name = "org/repo"` or `name = "/path/to/model"`.
    Reference(String),
    /// `name = { path = "...", config = "...", prediction_type = "..." }`.
    /// The settings go with the file (the worker loads models by path):
    /// two entries naming the same file share the first one's.
    Entry {
        /// The model: a path (a `.safetensors` single file, or a folder) or a repo id.
        path: String,
        /// For a single file: the diffusers folder or repo id of its configs
        /// and tokenizers; default: the standard repo of its architecture.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<String>,
        /// For a single file: `epsilon`, `v_prediction` or `sample`;
        /// default: what the file tells, else the config's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prediction_type: Option<String>,
        /// A `.safetensors` file replacing the model's UNet (as `easel
        /// generate --unet`): an absolute path, or one relative to a model
        /// root (the first root holding it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unet: Option<String>,
        /// A file replacing the model's FLUX transformer (`--transformer`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transformer: Option<String>,
        /// A file replacing the model's VAE (`--vae`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vae: Option<String>,
        /// A file replacing the model's (first) text encoder (`--text-encoder`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text_encoder: Option<String>,
        /// A file replacing the model's second text encoder (`--text-encoder-2`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text_encoder_2: Option<String>,
        /// Quantize the model's UNet / FLUX transformer (and FLUX's T5) as
        /// it loads, as `easel generate --quantize`: `q8_0`, `q4_0` or
        /// `fp8` (checked by [`Config::check`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quantize: Option<String>,
        /// FLUX: load T5 for each prompt encoding and free it after, as
        /// `easel generate --offload-t5` (T5-XXL's weights are not resident
        /// while the transformer runs; each generation pays T5's load).
        /// Models without T5 ignore it. Default false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        offload_t5: bool,
    },
}

impl ModelTarget {
    /// The model reference (the path or repo id).
    pub fn target(&self) -> &str {
        match self {
            ModelTarget::Reference(r) => r,
            ModelTarget::Entry { path, .. } => path,
        }
    }

    /// The single-file config, when the entry gives one.
    pub fn config(&self) -> Option<&str> {
        match self {
            ModelTarget::Entry { config, .. } => config.as_deref(),
            ModelTarget::Reference(_) => None,
        }
    }

    /// The single-file prediction type, when the entry gives one.
    pub fn prediction_type(&self) -> Option<&str> {
        match self {
            ModelTarget::Entry {
                prediction_type, ..
            } => prediction_type.as_deref(),
            ModelTarget::Reference(_) => None,
        }
    }
}

impl ModelTarget {
    /// The quantization the entry asks for (`quantize`), as written.
    pub fn quantize(&self) -> Option<&str> {
        match self {
            ModelTarget::Entry { quantize, .. } => quantize.as_deref(),
            ModelTarget::Reference(_) => None,
        }
    }

    /// Whether the entry asks for T5 to be offloaded (`offload_t5`).
    pub fn offload_t5(&self) -> bool {
        matches!(
            self,
            ModelTarget::Entry {
                offload_t5: true,
                ..
            }
        )
    }

    /// The component files the entry gives, `(component, path as written)`.
    pub fn component_files(&self) -> Vec<(&'static str, &str)> {
        let ModelTarget::Entry {
            unet,
            transformer,
            vae,
            text_encoder,
            text_encoder_2,
            ..
        } = self
        else {
            return Vec::new();
        };
        [
            ("unet", unet),
            ("transformer", transformer),
            ("vae", vae),
            ("text_encoder", text_encoder),
            ("text_encoder_2", text_encoder_2),
        ]
        .into_iter()
        .filter_map(|(c, f)| f.as_deref().map(|f| (c, f)))
        .collect()
    }

    /// What the worker loads the target by (without component files): a
    /// path target (absolute or starting with `.`) canonicalised, as the
    /// registry resolves it; a repo id as written.
    pub fn load_reference(&self) -> String {
        let target = self.target();
        let path = std::path::Path::new(target);
        if path.is_absolute() || target.starts_with('.') {
            path.canonicalize()
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string()
        } else {
            target.to_string()
        }
    }
}

/// The keys of a `[models]` table entry ([`ModelTarget::Entry`]).
pub const MODEL_ENTRY_KEYS: &[&str] = &[
    "path",
    "config",
    "prediction_type",
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "quantize",
    "offload_t5",
];

/// Refuse an unknown key in a `[models]` table entry, naming the entry, the
/// key and the allowed keys. (The entry is an untagged enum variant, which
/// serde would accept with the key silently dropped: a misspelt
/// `quantise = "q4_0"` would load the model unquantized.)
fn check_model_entry_keys(
    table: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ConfigError> {
    let Some(serde_json::Value::Object(models)) = table.get("models") else {
        return Ok(());
    };
    for (name, entry) in models {
        let serde_json::Value::Object(entry) = entry else {
            continue;
        };
        if let Some(key) = entry
            .keys()
            .find(|k| !MODEL_ENTRY_KEYS.contains(&k.as_str()))
        {
            return Err(ConfigError(format!(
                "models.{name}: unknown key `{key}`; allowed: {}",
                MODEL_ENTRY_KEYS.join(", ")
            )));
        }
    }
    Ok(())
}

impl From<String> for ModelTarget {
    fn from(reference: String) -> Self {
        ModelTarget::Reference(reference)
    }
}

/// The server's configuration. See the module docs for where values come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8420`.
    pub bind: String,
    /// Where the SQLite database (`easel.db`), the assets, uploaded LoRAs and
    /// local models (`models/`) live. Default: `$XDG_DATA_HOME/easel` or
    /// `~/.local/share/easel`.
    pub data_dir: PathBuf,
    /// Accept requests without an API key. Only allowed when `bind` is a
    /// loopback address.
    pub no_auth: bool,
    /// Extra model roots: folders of diffusers models (and LoRA files) that
    /// requests may name by path or by folder name, and A1111 / ComfyUI
    /// installs (or their `models/` folders), whose checkpoints and LoRAs
    /// requests may name by file name.
    pub models_dirs: Vec<PathBuf>,
    /// Where images and uploaded LoRA files are kept (`assets/` and
    /// `trainings/` under it): a folder, or `s3://BUCKET[/PREFIX]` for an
    /// S3-compatible bucket, with endpoint, region and credentials from the
    /// standard `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`) and
    /// the `s3` table. Default: the data dir (`DATA_DIR/assets`,
    /// `DATA_DIR/trainings`). `easel serve --asset-store`.
    pub asset_store: Option<crate::assets::AssetStoreSpec>,
    /// S3 settings for an `s3://` `asset_store`, over the `AWS_*`
    /// variables: object_store's configuration keys (`endpoint`, `region`,
    /// `access_key_id`, `secret_access_key`, `session_token`, `allow_http`,
    /// `virtual_hosted_style_request`, …) with string, boolean or number
    /// values. From the file only (`[s3]` table).
    #[serde(deserialize_with = "scalar_table")]
    pub s3: BTreeMap<String, String>,
    /// The Hugging Face hub cache. Default: `$HF_HUB_CACHE`, `$HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`.
    pub hf_cache: Option<PathBuf>,
    /// Never download models: a repo id must be in the hub cache already.
    pub offline: bool,
    /// The engine: `diffusion` (default) or `fake` (for load tests).
    pub engine: EngineKind,
    /// Milliseconds per denoising step of the `fake` engine.
    pub fake_step_ms: u64,
    /// Where the engine computes: `"auto"` (default: a compiled-in GPU that
    /// is present, else the CPU), `"cpu"`, `"cuda"` / `"cuda:N"`, or a list
    /// (`["cuda:0", "cuda:1"]`): one engine worker per device, each with its
    /// own model cache, all taking jobs from the one queue. A device listed
    /// twice is refused; one that is absent or not compiled in stops the
    /// start with the reason. In the environment (`EASEL_DEVICE`) and with
    /// `easel serve --device`: comma-separated.
    #[serde(deserialize_with = "one_or_many_devices")]
    pub device: Vec<DeviceSpec>,
    /// Where the models' weights live between uses on each device:
    /// `"none"` (default), `"model"` or `"sequential"`, diffusers' CPU
    /// offload modes (`easel generate --offload`; README, "GPU (CUDA)").
    pub offload: Offload,
    /// Registry names: `name = "repo/id"` or `name = "/path/to/model"`,
    /// or for a single-file checkpoint
    /// `name = { path = "/models/x.safetensors", config = "DIR_OR_REPO",
    /// prediction_type = "v_prediction" }` (see [`ModelTarget`]).
    /// Targets here are trusted (not limited to the model roots).
    pub models: BTreeMap<String, ModelTarget>,
    /// The model for OpenAI-compatible requests that name an OpenAI model
    /// (`dall-e-2`, `dall-e-3`, `gpt-image-1`) or none.
    pub default_model: Option<String>,
    /// Price of one inference (one image definition), in USD.
    pub price_per_inference_usd: f64,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most image definitions per request (after merging an inference pack).
    pub max_images_per_request: usize,
    /// Most queued jobs; beyond it requests get 429 with `Retry-After`.
    pub max_queue: usize,
    /// A job interrupted this many times (its worker died while it ran) fails.
    pub max_attempts: u32,
    /// The job store: `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// (several API nodes and workers on one database, see docs/DEPLOY.md).
    /// Default: `sqlite://DATA_DIR/easel.db`.
    pub database_url: Option<String>,
    /// How long a worker's claim on a running job lasts without renewal, in
    /// seconds (2-3600; renewed every second while it runs). A job whose
    /// worker died is claimed again this long after its last renewal.
    pub lease_seconds: u64,
    /// Run no engine workers in this process (an API-only node: the jobs it
    /// accepts are run by `easel worker` processes on the same database).
    pub no_worker: bool,
    /// This process is an `easel worker` (set by it, not configurable):
    /// it runs jobs only, and leaves flow runs to the API nodes.
    #[serde(skip)]
    pub worker_only: bool,
    /// Memory budget of the loaded-model cache, in bytes (least recently used
    /// models are unloaded to stay within it; the model in use always stays).
    pub model_cache_bytes: u64,
    /// How many times in a row a job for a loaded model may go before an
    /// older job for another model.
    pub fair_skip_limit: u32,
    /// Run the image definitions of one request that share their engine
    /// settings as one tensor batch. Faster, but on the CPU a batched matmul
    /// may round differently from a single one, so an image can differ by a
    /// unit in a few pixels from the one its definition gives alone (or from
    /// `easel generate`). Off by default: each definition is then one engine
    /// call (its `batchSize` images), still in one job with one model load.
    pub batch_definitions: bool,
    /// The base of absolute URLs in responses (`file_url`), e.g.
    /// `https://easel.example.com`. Default: from the request's `Host`.
    pub public_url: Option<String>,
    /// The HMAC-SHA256 key that signs webhook bodies. Default: a random key
    /// kept in `DATA_DIR/webhook_secret`.
    pub webhook_secret: Option<String>,
    /// Delivery attempts of a webhook event before it is given up.
    pub webhook_max_attempts: u32,
    /// Delay before the first webhook retry, in milliseconds (doubling after
    /// each failure, at most one hour).
    pub webhook_backoff_ms: u64,
    /// Timeout of one webhook delivery, in seconds.
    pub webhook_timeout_seconds: u64,
    /// Fetch `http(s)` URLs given as `image` / `mask` inputs.
    pub allow_remote_images: bool,
    /// Largest input image (decoded from base64 or fetched), in bytes.
    pub max_input_image_bytes: usize,
    /// Exceptions to the outbound fetcher's address rules (see `fetch.rs`):
    /// CIDR blocks (`10.0.0.0/8`, `fd00::/8`), single addresses
    /// (`127.0.0.1`, `::1`) or host names (`models.internal`, matched
    /// exactly). By default image, mask and LoRA URLs and webhooks may only
    /// reach public unicast addresses. In the environment: comma-separated.
    pub allow_fetch_hosts: Vec<String>,
    /// Total time one image or mask URL fetch may take (all redirects and
    /// the body), in seconds.
    pub fetch_timeout_seconds: u64,
    /// Largest LoRA file downloaded from a `loras[].url`, in bytes.
    pub max_lora_bytes: u64,
    /// Total time one LoRA download may take, in seconds.
    pub lora_fetch_timeout_seconds: u64,
    /// Longest `Prefer: wait=N` honoured, in seconds (and how long the
    /// OpenAI-compatible endpoints wait for their images).
    pub max_wait_seconds: u64,
    /// An OpenAI-compatible chat-completions server for the flows'
    /// `ObjectGenerator` step (`http://127.0.0.1:8080/v1`); without one that
    /// step fails with a message saying so.
    pub llm_url: Option<String>,
    /// The model name the chat-completions server expects (with `llm_url`).
    pub llm_model: Option<String>,
    /// A bearer token for the chat-completions server, if it needs one.
    pub llm_api_key: Option<String>,
    /// Seconds a connection has to send a complete request head, from being
    /// accepted or from the first byte of a kept-alive request (1..=3600).
    /// Default 10.
    pub header_read_timeout_seconds: u64,
    /// Seconds a request has to send its whole body, from its head
    /// (1..=3600). Default 60: `max_body_bytes` (32 MiB) at 10 Mbit/s with
    /// room to spare.
    pub body_read_timeout_seconds: u64,
    /// Seconds a kept-alive connection may wait for its next request
    /// (1..=3600). Default 60. Never cuts a response in flight (SSE,
    /// `Prefer: wait`).
    pub idle_timeout_seconds: u64,
    /// Most client connections served at once (1..=1000000); beyond it new
    /// connections wait briefly, then are closed. Kept below the open file
    /// limit (a warning says so when it has to be lowered). Default 1024.
    pub max_connections: usize,
    /// Submissions per minute per API key (`POST /v1/generations`, the
    /// OpenAI image routes, flow runs); `0` turns the limit off. Default 600.
    pub rate_limit_per_minute: u32,
    /// Submissions a key may make at once before the per-minute rate applies
    /// (1..=1000000). Default 100.
    pub rate_limit_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8420".into(),
            data_dir: default_data_dir(),
            no_auth: false,
            models_dirs: Vec::new(),
            hf_cache: None,
            asset_store: None,
            s3: BTreeMap::new(),
            offline: false,
            engine: EngineKind::Diffusion,
            fake_step_ms: 5,
            device: vec![DeviceSpec::Auto],
            offload: Offload::None,
            models: BTreeMap::new(),
            default_model: None,
            price_per_inference_usd: 0.02,
            max_body_bytes: 32 << 20,
            max_images_per_request: 64,
            max_queue: 1000,
            max_attempts: 3,
            database_url: None,
            lease_seconds: 15,
            no_worker: false,
            worker_only: false,
            model_cache_bytes: 16 << 30,
            fair_skip_limit: 4,
            batch_definitions: false,
            public_url: None,
            webhook_secret: None,
            webhook_max_attempts: 6,
            webhook_backoff_ms: 1000,
            webhook_timeout_seconds: 10,
            allow_remote_images: true,
            max_input_image_bytes: 20 << 20,
            allow_fetch_hosts: Vec::new(),
            fetch_timeout_seconds: 30,
            max_lora_bytes: 2 << 30,
            lora_fetch_timeout_seconds: 600,
            max_wait_seconds: 600,
            llm_url: None,
            llm_model: None,
            llm_api_key: None,
            header_read_timeout_seconds: 10,
            body_read_timeout_seconds: 60,
            idle_timeout_seconds: 60,
            max_connections: 1024,
            rate_limit_per_minute: 600,
            rate_limit_burst: 100,
        }
    }
}

/// `$XDG_DATA_HOME/easel`, else `~/.local/share/easel`, else `./easel-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("easel");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/easel"),
        None => PathBuf::from("easel-data"),
    }
}

/// A configuration that cannot be read or is invalid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// How an environment variable's text becomes a value.
#[derive(Clone, Copy)]
enum EnvKind {
    Str,
    Bool,
    Int,
    Float,
    Paths,
    /// Comma-separated, blanks dropped.
    List,
}

/// The keys settable from the environment, with their kind.
const ENV_KEYS: &[(&str, EnvKind)] = &[
    ("bind", EnvKind::Str),
    ("data_dir", EnvKind::Str),
    ("no_auth", EnvKind::Bool),
    ("models_dirs", EnvKind::Paths),
    ("hf_cache", EnvKind::Str),
    ("asset_store", EnvKind::Str),
    ("offline", EnvKind::Bool),
    ("engine", EnvKind::Str),
    ("fake_step_ms", EnvKind::Int),
    ("device", EnvKind::List),
    ("offload", EnvKind::Str),
    ("default_model", EnvKind::Str),
    ("price_per_inference_usd", EnvKind::Float),
    ("max_body_bytes", EnvKind::Int),
    ("max_images_per_request", EnvKind::Int),
    ("max_queue", EnvKind::Int),
    ("max_attempts", EnvKind::Int),
    ("database_url", EnvKind::Str),
    ("lease_seconds", EnvKind::Int),
    ("no_worker", EnvKind::Bool),
    ("model_cache_bytes", EnvKind::Int),
    ("fair_skip_limit", EnvKind::Int),
    ("batch_definitions", EnvKind::Bool),
    ("public_url", EnvKind::Str),
    ("webhook_secret", EnvKind::Str),
    ("webhook_max_attempts", EnvKind::Int),
    ("webhook_backoff_ms", EnvKind::Int),
    ("webhook_timeout_seconds", EnvKind::Int),
    ("allow_remote_images", EnvKind::Bool),
    ("max_input_image_bytes", EnvKind::Int),
    ("allow_fetch_hosts", EnvKind::List),
    ("fetch_timeout_seconds", EnvKind::Int),
    ("max_lora_bytes", EnvKind::Int),
    ("lora_fetch_timeout_seconds", EnvKind::Int),
    ("max_wait_seconds", EnvKind::Int),
    ("llm_url", EnvKind::Str),
    ("llm_model", EnvKind::Str),
    ("llm_api_key", EnvKind::Str),
    ("header_read_timeout_seconds", EnvKind::Int),
    ("body_read_timeout_seconds", EnvKind::Int),
    ("idle_timeout_seconds", EnvKind::Int),
    ("max_connections", EnvKind::Int),
    ("rate_limit_per_minute", EnvKind::Int),
    ("rate_limit_burst", EnvKind::Int),
];

impl Config {
    /// The job store's URL: `database_url`, else the SQLite file in the
    /// data dir.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| crate::store::sqlite_url(&self.data_dir))
    }

    /// How long a worker's lease on a running job lasts.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_seconds)
    }

    /// Defaults, overlaid with `file` (TOML) when given, then with the
    /// `EASEL_*` variables of `env`, then validated.
    ///
    /// # Errors
    /// An unreadable or malformed file, an unknown key in it, a value of the
    /// wrong type (naming the key and where it came from), or an invalid
    /// combination (see [`Config::check`]).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = serde_json::Map::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            let value: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            let json = serde_json::to_value(value)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            if let serde_json::Value::Object(map) = json {
                table = map;
            }
        }
        for (name, value) in env {
            let Some(key) = name.strip_prefix("EASEL_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some((_, kind)) = ENV_KEYS.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            let parsed = parse_env(&value, *kind)
                .map_err(|e| ConfigError(format!("environment variable {name}: {e}")))?;
            table.insert(key, parsed);
        }
        check_model_entry_keys(&table)?;
        let config: Config = serde_path_to_error::deserialize(serde_json::Value::Object(table))
            .map_err(|e| ConfigError(format!("configuration key `{}`: {}", e.path(), e.inner())))?;
        config.check()?;
        Ok(config)
    }

    /// Check values that serde cannot: at least one `device`, none listed
    /// twice, a parsable `bind`, `no_auth` only on
    /// loopback, a finite non-negative price, non-zero limits, listener
    /// timeouts of 1..=3600 s, `max_connections` and `rate_limit_burst` in
    /// 1..=1000000.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_devices(&self.device)?;
        if let Some(key) = self.s3.keys().find(|k| !crate::assets::is_s3_option(k)) {
            return Err(ConfigError(format!(
                "s3.{key}: not an S3 setting; allowed: object_store's S3 keys \
                 (endpoint, region, access_key_id, secret_access_key, session_token, \
                 allow_http, virtual_hosted_style_request, ...)"
            )));
        }
        for (name, target) in &self.models {
            if let Some(q) = target.quantize() {
                q.parse::<easel_diffusion::models::quantize::Quantization>()
                    .map_err(|_| {
                        ConfigError(format!(
                            "models.{name}.quantize: `{q}` is not a quantization; allowed: {}",
                            easel_diffusion::models::quantize::Quantization::NAMES
                        ))
                    })?;
            }
        }
        let addr = self.bind_addr()?;
        if self.no_auth && !addr.ip().is_loopback() {
            return Err(ConfigError(format!(
                "no_auth is only allowed on a loopback address, but bind is {addr}; \
                 bind to 127.0.0.1 or create an API key with `easel keys create`"
            )));
        }
        if !self.price_per_inference_usd.is_finite() || self.price_per_inference_usd < 0.0 {
            return Err(ConfigError(format!(
                "price_per_inference_usd: {} is not a non-negative number",
                self.price_per_inference_usd
            )));
        }
        for (key, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_images_per_request", self.max_images_per_request),
            ("max_queue", self.max_queue),
            ("max_input_image_bytes", self.max_input_image_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{key}: must be at least 1")));
            }
        }
        for (key, value) in [
            ("fetch_timeout_seconds", self.fetch_timeout_seconds),
            ("max_lora_bytes", self.max_lora_bytes),
            (
                "lora_fetch_timeout_seconds",
                self.lora_fetch_timeout_seconds,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{key}: must be at least 1")));
            }
        }
        self.fetch_allow_list()?;
        if !(2..=3600).contains(&self.lease_seconds) {
            return Err(ConfigError(format!(
                "lease_seconds: {} is not between 2 and 3600 seconds",
                self.lease_seconds
            )));
        }
        if let Some(url) = &self.database_url {
            crate::store::Backend::of_url(url).map_err(|e| ConfigError(e.to_string()))?;
        }
        if self.max_attempts == 0 || self.webhook_max_attempts == 0 {
            return Err(ConfigError(
                "max_attempts and webhook_max_attempts must be at least 1".into(),
            ));
        }
        for (key, value) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("body_read_timeout_seconds", self.body_read_timeout_seconds),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
        ] {
            if !(1..=3600).contains(&value) {
                return Err(ConfigError(format!(
                    "{key}: {value} is not between 1 and 3600 seconds"
                )));
            }
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ConfigError(format!(
                "max_connections: {} is not between 1 and 1000000",
                self.max_connections
            )));
        }
        if !(1..=1_000_000).contains(&self.rate_limit_burst) {
            return Err(ConfigError(format!(
                "rate_limit_burst: {} is not between 1 and 1000000",
                self.rate_limit_burst
            )));
        }
        for (key, url) in [("public_url", &self.public_url), ("llm_url", &self.llm_url)] {
            let Some(url) = url else { continue };
            let ok = url::Url::parse(url)
                .map(|u| matches!(u.scheme(), "http" | "https"))
                .unwrap_or(false);
            if !ok {
                return Err(ConfigError(format!("{key}: `{url}` is not an http(s) URL")));
            }
        }
        if self.llm_url.is_some() && self.llm_model.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError(
                "llm_url is set but llm_model is not: set it to the model name the \
                 chat-completions server expects"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The `asset_store` in effect: the one set, else the data dir.
    pub fn asset_store_spec(&self) -> crate::assets::AssetStoreSpec {
        self.asset_store
            .clone()
            .unwrap_or_else(|| crate::assets::AssetStoreSpec::Folder(self.data_dir.clone()))
    }

    /// The chat-completions server of the flows' `ObjectGenerator` step,
    /// if one is configured (`llm_url`, `llm_model`, `llm_api_key`).
    pub fn chat_config(&self) -> Option<easel_flow::ChatConfig> {
        let (url, model) = (self.llm_url.as_ref()?, self.llm_model.as_ref()?);
        let mut chat = easel_flow::ChatConfig::new(url.clone(), model.clone());
        chat.api_key = self.llm_api_key.clone();
        Some(chat)
    }

    /// `allow_fetch_hosts`, parsed.
    ///
    /// # Errors
    /// An entry that is not a CIDR block, address or host name.
    pub fn fetch_allow_list(&self) -> Result<crate::fetch::AllowList, ConfigError> {
        crate::fetch::AllowList::parse(&self.allow_fetch_hosts)
            .map_err(|e| ConfigError(format!("allow_fetch_hosts: {e}")))
    }

    /// `bind` as a socket address.
    ///
    /// # Errors
    /// When it is not `IP:PORT`.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind.parse().map_err(|e| {
            ConfigError(format!(
                "bind: `{}` is not an address such as 127.0.0.1:8420 ({e})",
                self.bind
            ))
        })
    }

    /// The price of one inference in micro-USD (rounded to the nearest).
    pub fn price_micros(&self) -> i64 {
        (self.price_per_inference_usd * 1e6).round() as i64
    }

    /// The `config` / `prediction_type` of the registry entries that give
    /// them (single-file checkpoints), for the loader's resolve options.
    pub fn single_file_settings(&self) -> Vec<easel_diffusion::loader::SingleFileSettings> {
        self.models
            .values()
            .filter(|t| t.config().is_some() || t.prediction_type().is_some())
            .map(|t| easel_diffusion::loader::SingleFileSettings {
                file: PathBuf::from(t.target()),
                config: t.config().map(str::to_string),
                prediction_type: t.prediction_type().map(str::to_string),
            })
            .collect()
    }

    /// The model of registry entry `target` with its component files
    /// (`vae = "..."`, ...; see [`ModelTarget::component_files`]): the
    /// worker loads it by its [`ComponentOverrides::key`], which
    /// [`Self::component_overrides`] gives the loader. A relative file path
    /// is looked up under the model roots, in order (the first root
    /// holding it; the first root when none does, so the loader's
    /// refusal names a path). `None` when the entry has no files.
    pub fn entry_overrides(&self, target: &ModelTarget) -> Option<ComponentOverrides> {
        let list = target.component_files();
        // Checked by `Config::check`: a bad name never gets here.
        let quantization = target.quantize().and_then(|q| q.parse().ok());
        let offload_t5 = target.offload_t5();
        if list.is_empty() && quantization.is_none() && !offload_t5 {
            return None;
        }
        let roots = self.model_roots();
        let mut files = ComponentFiles::new();
        for (component, file) in list {
            let path = Path::new(file);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                roots
                    .iter()
                    .map(|r| r.join(path))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| roots[0].join(path))
            };
            let path = path.canonicalize().unwrap_or(path);
            // The names come from the entry's fields: all allowed.
            let _ = files.insert(component, path);
        }
        Some(ComponentOverrides {
            model: target.load_reference(),
            files,
            quantization,
            offload_t5,
        })
    }

    /// The component files of every registry entry that gives some, for
    /// the loader's resolve options.
    pub fn component_overrides(&self) -> Vec<ComponentOverrides> {
        self.models
            .values()
            .filter_map(|t| self.entry_overrides(t))
            .collect()
    }

    /// The model roots: `DATA_DIR/models`, each of `models_dirs` (a local
    /// model or LoRA path must lie under one of these or the hub cache).
    pub fn model_roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.data_dir.join("models")];
        roots.extend(self.models_dirs.iter().cloned());
        roots
    }
}

/// `device = "cuda:0"` or `device = ["cuda:0", "cuda:1"]`: one device or a
/// list, each parsed by [`DeviceSpec`]'s `FromStr` (a bad entry is named by
/// its index through `serde_path_to_error`: `device[1]`).
fn one_or_many_devices<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<DeviceSpec>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<DeviceSpec>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(
                f,
                "a device or a list of devices ({})",
                easel_diffusion::device::DEVICE_NAMES
            )
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse().map(|d| vec![d]).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut list = Vec::new();
            while let Some(device) = seq.next_element::<DeviceSpec>()? {
                list.push(device);
            }
            Ok(list)
        }
    }
    d.deserialize_any(Visitor)
}

/// At least one device, none listed twice (`cuda` and `cuda:0` are one
/// device): each device runs one worker with its own model cache.
/// A table of scalars (`s3`): strings, booleans and numbers, kept as text
/// (`allow_http = true` and `allow_http = "true"` alike).
fn scalar_table<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let table = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    table
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Ok((k, v.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "`{k}`: {other} is not a string, boolean or number"
            ))),
        })
        .collect()
}

fn check_devices(devices: &[DeviceSpec]) -> Result<(), ConfigError> {
    if devices.is_empty() {
        return Err(ConfigError(format!(
            "device: the list is empty; give at least one of {}",
            easel_diffusion::device::DEVICE_NAMES
        )));
    }
    for (i, device) in devices.iter().enumerate() {
        if devices[..i].contains(device) {
            return Err(ConfigError(format!(
                "device: `{device}` is listed twice; each device runs one engine worker, \
                 so list each once"
            )));
        }
    }
    Ok(())
}

fn parse_env(value: &str, kind: EnvKind) -> Result<serde_json::Value, String> {
    let v = value.trim();
    Ok(match kind {
        EnvKind::Str => serde_json::Value::from(v),
        EnvKind::Bool => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true.into(),
            "0" | "false" | "no" | "off" | "" => false.into(),
            other => return Err(format!("expected 1/0/true/false, got `{other}`")),
        },
        EnvKind::Int => v
            .parse::<u64>()
            .map_err(|_| format!("expected a whole number, got `{v}`"))?
            .into(),
        EnvKind::Float => v
            .parse::<f64>()
            .map_err(|_| format!("expected a number, got `{v}`"))?
            .into(),
        EnvKind::List => serde_json::Value::Array(
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(serde_json::Value::from)
                .collect(),
        ),
        EnvKind::Paths => serde_json::Value::Array(
            std::env::split_paths(v)
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| serde_json::Value::from(p.display().to_string()))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(
            &file,
            "max_queue = 5\nbind = \"127.0.0.1:9000\"\nprice_per_inference_usd = 0.05\n\
             [models]\nsd15 = \"/models/sd15\"\n\
             sd2 = { path = \"/models/sd2.safetensors\", config = \"org/sd2\" }\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("EASEL_MAX_QUEUE", "7"),
                ("EASEL_NO_AUTH", "1"),
                ("EASEL_MODELS_DIRS", "/a:/b"),
                ("EASEL_LOG", "debug"),
                (
                    "EASEL_ALLOW_FETCH_HOSTS",
                    "127.0.0.1, 10.0.0.0/8,,models.internal",
                ),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.max_queue, 7);
        assert_eq!(config.bind, "127.0.0.1:9000");
        assert!(config.no_auth);
        assert_eq!(config.price_micros(), 50_000);
        assert_eq!(
            config.models_dirs,
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(config.models["sd15"].target(), "/models/sd15");
        assert_eq!(config.models["sd15"].config(), None);
        assert_eq!(config.models["sd2"].target(), "/models/sd2.safetensors");
        assert_eq!(config.models["sd2"].config(), Some("org/sd2"));
        assert_eq!(config.models["sd2"].prediction_type(), None);
        assert_eq!(
            config.allow_fetch_hosts,
            ["127.0.0.1", "10.0.0.0/8", "models.internal"]
        );
    }

    /// A registry entry's `quantize` is part of the model's load key (its
    /// own cache entry); a name that is not a quantization is refused at
    /// load, naming the entry and the allowed names.
    #[test]
    fn registry_entry_quantize() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(
            &file,
            "[models]\nschnell = { path = \"org/flux\", quantize = \"q8_0\" }\n",
        )
        .unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        let target = &config.models["schnell"];
        assert_eq!(target.quantize(), Some("q8_0"));
        let overrides = config.entry_overrides(target).unwrap();
        assert_eq!(overrides.key(), "org/flux [quantize=q8_0]");
        std::fs::write(
            &file,
            "[models]\nschnell = { path = \"org/flux\", quantize = \"int4\" }\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(
            e.0.contains("models.schnell.quantize") && e.0.contains("q8_0, q4_0, fp8"),
            "{e}"
        );
    }

    /// `offload_t5` is a load setting like `quantize`: its own load key,
    /// alone or with a quantization.
    #[test]
    fn registry_entry_offload_t5() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(
            &file,
            "[models]\nschnell = { path = \"org/flux\", offload_t5 = true }\n\
             small = { path = \"org/flux\", quantize = \"q4_0\", offload_t5 = true }\n\
             plain = { path = \"org/flux\", offload_t5 = false }\n",
        )
        .unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        let key = |name: &str| {
            config
                .entry_overrides(&config.models[name])
                .map(|o| o.key())
        };
        assert_eq!(key("schnell").as_deref(), Some("org/flux [offload_t5]"));
        assert_eq!(
            key("small").as_deref(),
            Some("org/flux [quantize=q4_0, offload_t5]")
        );
        assert_eq!(key("plain"), None);
        // A misspelt key is refused, not dropped.
        std::fs::write(
            &file,
            "[models]\nschnell = { path = \"org/flux\", quantise = \"q4_0\" }\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(
            e.0.contains("models.schnell: unknown key `quantise`")
                && e.0.contains("quantize, offload_t5"),
            "{e}"
        );
        std::fs::write(
            &file,
            "[models]\nschnell = { path = \"org/flux\", offload_t5 = \"yes\" }\n",
        )
        .unwrap();
        assert!(Config::load(Some(&file), []).is_err());
    }

    #[test]
    fn bad_fetch_allow_list_entries_are_named() {
        let e = Config::load(None, env(&[("EASEL_ALLOW_FETCH_HOSTS", "10.0.0.0/40")])).unwrap_err();
        assert!(
            e.0.contains("allow_fetch_hosts") && e.0.contains("10.0.0.0/40"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::load(None, env(&[("EASEL_MAX_QUEUE", "many")])).unwrap_err();
        assert!(e.0.contains("EASEL_MAX_QUEUE"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(&file, "max_queu = 5\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(e.0.contains("max_queu"), "{e}");
        std::fs::write(&file, "max_queue = \"x\"\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(e.0.contains("max_queue"), "{e}");
    }

    #[test]
    fn listener_limits_from_the_environment_and_their_ranges() {
        let config = Config::load(
            None,
            env(&[
                ("EASEL_HEADER_READ_TIMEOUT_SECONDS", "5"),
                ("EASEL_MAX_CONNECTIONS", "64"),
                ("EASEL_RATE_LIMIT_PER_MINUTE", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(config.header_read_timeout_seconds, 5);
        assert_eq!(config.body_read_timeout_seconds, 60);
        assert_eq!(config.max_connections, 64);
        assert_eq!(config.rate_limit_per_minute, 0);
        for (var, value, key) in [
            (
                "EASEL_HEADER_READ_TIMEOUT_SECONDS",
                "0",
                "header_read_timeout_seconds",
            ),
            (
                "EASEL_BODY_READ_TIMEOUT_SECONDS",
                "3601",
                "body_read_timeout_seconds",
            ),
            ("EASEL_IDLE_TIMEOUT_SECONDS", "0", "idle_timeout_seconds"),
            ("EASEL_MAX_CONNECTIONS", "0", "max_connections"),
            ("EASEL_RATE_LIMIT_BURST", "0", "rate_limit_burst"),
        ] {
            let e = Config::load(None, env(&[(var, value)])).unwrap_err();
            assert!(e.0.contains(key) && e.0.contains(value), "{e}");
        }
    }

    /// `asset_store` from the file or `EASEL_ASSET_STORE`, default the data
    /// dir; a bad value is named with the allowed forms; the `s3` table
    /// takes scalars and refuses keys object_store does not know.
    #[test]
    fn asset_store_setting() {
        use crate::assets::AssetStoreSpec;
        let config = Config::load(None, env(&[("EASEL_DATA_DIR", "/srv/easel")])).unwrap();
        assert_eq!(config.asset_store, None);
        assert_eq!(
            config.asset_store_spec(),
            AssetStoreSpec::Folder("/srv/easel".into())
        );
        let config =
            Config::load(None, env(&[("EASEL_ASSET_STORE", "s3://bucket/easel")])).unwrap();
        assert_eq!(
            config.asset_store_spec(),
            AssetStoreSpec::S3 {
                bucket: "bucket".into(),
                prefix: "easel".into()
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(
            &file,
            "asset_store = \"/mnt/assets\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\n\
             allow_http = true\n",
        )
        .unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        assert_eq!(
            config.asset_store_spec(),
            AssetStoreSpec::Folder("/mnt/assets".into())
        );
        assert_eq!(config.s3["allow_http"], "true");
        let e = Config::load(None, env(&[("EASEL_ASSET_STORE", "gs://bucket")])).unwrap_err();
        assert!(
            e.0.contains("asset_store") && e.0.contains("s3://BUCKET/PREFIX"),
            "{e}"
        );
        std::fs::write(&file, "[s3]\nendpont = \"http://x\"\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(e.0.contains("s3.endpont"), "{e}");
    }

    /// `offload` from the file or `EASEL_OFFLOAD`, default none; a bad mode
    /// is named with the allowed ones.
    #[test]
    fn offload_mode() {
        assert_eq!(Config::default().offload, Offload::None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(&file, "offload = \"model\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&file), []).unwrap().offload,
            Offload::Model
        );
        let config = Config::load(Some(&file), env(&[("EASEL_OFFLOAD", "sequential")])).unwrap();
        assert_eq!(config.offload, Offload::Sequential);
        std::fs::write(&file, "offload = \"gpu\"\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(
            e.0.contains("offload") && e.0.contains("none, model, sequential"),
            "{e}"
        );
    }

    /// `device` is one device or a list, from the file or `EASEL_DEVICE`
    /// (comma-separated); bad names, empty lists and duplicates are named.
    #[test]
    fn device_one_or_many() {
        assert_eq!(Config::default().device, [DeviceSpec::Auto]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("easel.toml");
        std::fs::write(&file, "device = \"CUDA:1\"\n").unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        assert_eq!(config.device, [DeviceSpec::Cuda(1)]);
        std::fs::write(&file, "device = [\"cuda:0\", \"cuda:1\"]\n").unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        assert_eq!(config.device, [DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
        let config = Config::load(Some(&file), env(&[("EASEL_DEVICE", "cpu")])).unwrap();
        assert_eq!(config.device, [DeviceSpec::Cpu]);
        let config = Config::load(None, env(&[("EASEL_DEVICE", "cuda:2, cuda:3")])).unwrap();
        assert_eq!(config.device, [DeviceSpec::Cuda(2), DeviceSpec::Cuda(3)]);

        std::fs::write(&file, "device = [\"cuda:0\", \"gpu1\"]\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(
            e.0.contains("device[1]")
                && e.0.contains("`gpu1` is not a device")
                && e.0.contains("auto, cpu, cuda, cuda:N"),
            "{e}"
        );
        std::fs::write(&file, "device = 1\n").unwrap();
        let e = Config::load(Some(&file), []).unwrap_err();
        assert!(
            e.0.contains("`device`") && e.0.contains("a list of devices"),
            "{e}"
        );
        for (value, expected) in [
            ("cuda, cuda:0", "`cuda:0` is listed twice"),
            ("cpu,CPU", "`cpu` is listed twice"),
            ("", "device: the list is empty"),
        ] {
            let e = Config::load(None, env(&[("EASEL_DEVICE", value)])).unwrap_err();
            assert!(e.0.contains(expected), "{value}: {e}");
        }
        let e = Config::load(None, env(&[("EASEL_DEVICE", "tpu")])).unwrap_err();
        assert!(e.0.contains("device[0]") && e.0.contains("`tpu`"), "{e}");
    }

    #[test]
    fn no_auth_only_on_loopback() {
        let e = Config::load(
            None,
            env(&[("EASEL_NO_AUTH", "true"), ("EASEL_BIND", "0.0.0.0:8420")]),
        )
        .unwrap_err();
        assert!(e.0.contains("loopback"), "{e}");
        Config::load(
            None,
            env(&[("EASEL_NO_AUTH", "true"), ("EASEL_BIND", "[::1]:8420")]),
        )
        .unwrap();
    }
}
