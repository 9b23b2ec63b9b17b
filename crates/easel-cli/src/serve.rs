//! `easel serve`, `easel keys` and `easel bench-api`: thin wrappers over
//! `easel-server`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use easel_diffusion::device::DeviceSpec;
use easel_server::bench::{run as run_bench, BenchOptions};
use easel_server::config::{Config, EngineKind};
use easel_server::store::Store;

/// Where the configuration comes from, shared by `serve` and `keys`.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// A TOML config file (keys as in docs/API.md; `EASEL_*` variables override it).
    #[arg(long, env = "EASEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the database, assets and uploaded LoRAs live
    /// [default: $XDG_DATA_HOME/easel or ~/.local/share/easel].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        Ok(config)
    }
}

/// Arguments of `easel serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Address to listen on [default: 127.0.0.1:8420].
    #[arg(long)]
    pub bind: Option<String>,
    /// Accept requests without an API key (only on a loopback address).
    #[arg(long)]
    pub no_auth: bool,
    /// A folder of models (and LoRA files) requests may name; repeatable.
    /// An A1111 / ComfyUI install (or its `models/` folder) also offers its
    /// checkpoints and LoRAs by file name. Local paths outside the model
    /// roots are refused.
    #[arg(long = "models-dir")]
    pub models_dirs: Vec<PathBuf>,
    /// Never download models; repo ids must be in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,
    /// The model for OpenAI-compatible requests naming an OpenAI model.
    #[arg(long)]
    pub default_model: Option<String>,
    /// Where the engine computes: auto (the first GPU of a `--features cuda`
    /// build when one is present, else the CPU), cpu, cuda (= cuda:0) or
    /// cuda:N. Repeat it or separate with commas (`--device cuda:0,cuda:1`)
    /// to run one engine worker per device, each with its own model cache
    /// [default: the config file's `device`, else auto].
    #[arg(
        long,
        env = "EASEL_DEVICE",
        value_delimiter = ',',
        value_name = "auto|cpu|cuda|cuda:N"
    )]
    pub device: Vec<DeviceSpec>,
    /// Where the weights live between uses on each device: none, model or
    /// sequential (as `easel generate --offload`) [default: the config
    /// file's `offload`, else none].
    #[arg(long, value_name = "none|model|sequential", value_parser = crate::generate::parse_offload)]
    pub offload: Option<easel_diffusion::device::Offload>,
    /// Where images and uploaded LoRA files are kept: a folder, or an
    /// S3-compatible bucket as s3://BUCKET/PREFIX (endpoint, region and
    /// credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP and the config's `[s3]` table)
    /// [default: the config's `asset_store` (EASEL_ASSET_STORE), else the
    /// data dir].
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub asset_store: Option<easel_server::assets::AssetStoreSpec>,
    /// Run the fast fake engine instead of the diffusion engine (for load tests).
    #[arg(long, hide = true)]
    pub fake_engine: bool,
}

/// `easel serve`.
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = args.config.load()?;
    if let Some(bind) = args.bind {
        config.bind = bind;
    }
    if args.no_auth {
        config.no_auth = true;
    }
    config.models_dirs.extend(args.models_dirs);
    if args.offline {
        config.offline = true;
    }
    if let Some(m) = args.default_model {
        config.default_model = Some(m);
    }
    if args.fake_engine {
        config.engine = EngineKind::Fake;
    }
    if !args.device.is_empty() {
        config.device = args.device;
    }
    if let Some(offload) = args.offload {
        config.offload = offload;
    }
    if let Some(store) = args.asset_store {
        config.asset_store = Some(store);
    }
    config
        .check()
        .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(easel_server::serve(config))
        .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
    Ok(ExitCode::SUCCESS)
}

/// A configuration error about `device` as `easel serve` reports it: the
/// key and its flag (`device (--device)`), so the message names what the
/// user set however they set it.
fn flag_names(message: &str) -> String {
    match message.strip_prefix("device") {
        Some(rest) if rest.starts_with(':') || rest.starts_with('[') => {
            format!("device (--device, EASEL_DEVICE){rest}")
        }
        _ => message.to_string(),
    }
}

/// `easel keys ...`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key; its secret is printed once.
    Create {
        #[command(flatten)]
        config: ConfigArgs,
        /// A label for the key.
        #[arg(long, default_value = "default")]
        name: String,
        /// Stop accepting jobs (402) once this many USD are used.
        #[arg(long)]
        credit_limit: Option<f64>,
    },
    /// List the keys (never their secrets).
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Revoke a key by id.
    Revoke {
        #[command(flatten)]
        config: ConfigArgs,
        /// The key's id (`key_...`).
        id: String,
    },
}

/// `easel keys`.
pub fn keys(command: KeysCommand) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match command {
            KeysCommand::Create {
                config,
                name,
                credit_limit,
            } => {
                if credit_limit.is_some_and(|c| !c.is_finite() || c < 0.0) {
                    bail!("--credit-limit must be a non-negative number of USD");
                }
                let config = config.load()?;
                let (row, secret) =
                    easel_server::auth::create_key(&config.data_dir, &name, credit_limit)
                        .await
                        .with_context(|| {
                            format!("creating a key in {}", config.data_dir.display())
                        })?;
                eprintln!(
                    "created key {} ({}) in {}; the secret is shown once:",
                    row.id,
                    row.name,
                    config.data_dir.display()
                );
                println!("{secret}");
            }
            KeysCommand::List { config } => {
                let config = config.load()?;
                let store = Store::open(&config.data_dir).await?;
                for k in store.keys().await? {
                    println!(
                        "{}\t{}\t{}…\t{}\t{}",
                        k.id,
                        k.name,
                        k.prefix,
                        k.credit_limit_micros
                            .map(|l| format!("limit {:.2} USD", l as f64 / 1e6))
                            .unwrap_or_else(|| "no limit".into()),
                        if k.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            KeysCommand::Revoke { config, id } => {
                let config = config.load()?;
                let store = Store::open(&config.data_dir).await?;
                if !store.revoke_key(&id).await? {
                    bail!("no active key `{id}` (see `easel keys list`)");
                }
                eprintln!("revoked {id}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Arguments of `easel bench-api`.
#[derive(Args, Debug)]
pub struct BenchApiArgs {
    /// Generation requests to submit.
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Image definitions per request.
    #[arg(long, default_value_t = 1)]
    pub images: usize,
    /// Run this model folder for real (e.g. tests/fixtures/models/tiny-sd15)
    /// [default: the fake engine, which measures the service alone].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Width and height in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Fake engine: milliseconds per step.
    #[arg(long, default_value_t = 0)]
    pub fake_step_ms: u64,
    /// Give up waiting for the jobs after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub time_limit: u64,
}

/// `easel bench-api`.
pub fn bench_api(args: BenchApiArgs) -> Result<ExitCode> {
    if args.requests == 0 || args.requests > 100_000 {
        bail!("--requests must be between 1 and 100000");
    }
    if args.clients == 0 || args.clients > 1024 {
        bail!("--clients must be between 1 and 1024");
    }
    let options = BenchOptions {
        requests: args.requests,
        clients: args.clients,
        images_per_request: args.images.max(1),
        model: args.model,
        steps: args.steps,
        size: args.size,
        fake_step_ms: args.fake_step_ms,
        time_limit: Duration::from_secs(args.time_limit),
        ..BenchOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    eprintln!(
        "bench-api: {} requests from {} clients on loopback ({})",
        options.requests,
        options.clients,
        options
            .model
            .as_ref()
            .map(|m| format!("model {}", m.display()))
            .unwrap_or_else(|| "fake engine".into())
    );
    let report = runtime
        .block_on(run_bench(options))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", report.table());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
