//! `easel serve`, `easel worker`, `easel keys` and `easel bench-api`: thin
//! wrappers over `easel-server`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use easel_diffusion::device::DeviceSpec;
use easel_server::bench::{run as run_bench, BenchOptions};
use easel_server::bench_cluster::{run as run_cluster, table as cluster_table, ClusterOptions};
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
    /// The job store: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB
    /// (one database for several API nodes and workers; docs/DEPLOY.md)
    /// [default: the config's `database_url`, else sqlite://DATA_DIR/easel.db].
    #[arg(long, env = "EASEL_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
}

impl ConfigArgs {
    pub(crate) fn load(&self) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &self.database_url {
            config.database_url = Some(url.clone());
        }
        Ok(config)
    }
}

/// What `easel serve` and `easel worker` share: the models, the engine's
/// devices and the asset store.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// A folder of models (and LoRA files) requests may name; repeatable.
    /// An A1111 / ComfyUI install (or its `models/` folder) also offers its
    /// checkpoints and LoRAs by file name. Local paths outside the model
    /// roots are refused. Give every node of a deployment the same folders.
    #[arg(long = "models-dir")]
    pub models_dirs: Vec<PathBuf>,
    /// Never download models; repo ids must be in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,
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

impl NodeArgs {
    /// Lay these flags over `config`.
    fn apply(self, config: &mut Config) {
        config.models_dirs.extend(self.models_dirs);
        if self.offline {
            config.offline = true;
        }
        if self.fake_engine {
            config.engine = EngineKind::Fake;
        }
        if !self.device.is_empty() {
            config.device = self.device;
        }
        if let Some(offload) = self.offload {
            config.offload = offload;
        }
        if let Some(store) = self.asset_store {
            config.asset_store = Some(store);
        }
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
    /// The model for OpenAI-compatible requests naming an OpenAI model.
    #[arg(long)]
    pub default_model: Option<String>,
    /// Run no engine workers: an API-only node whose jobs are run by
    /// `easel worker` processes on the same `--database-url`.
    #[arg(long)]
    pub no_worker: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Arguments of `easel worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Check `config` and run `task` on a multi-threaded runtime until it ends
/// (`easel serve`, `easel worker`).
fn run_node<F>(config: Config, task: impl FnOnce(Config) -> F) -> Result<ExitCode>
where
    F: std::future::Future<Output = Result<(), easel_server::StartError>>,
{
    config
        .check()
        .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(task(config))
        .map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
    Ok(ExitCode::SUCCESS)
}

/// `easel worker`: claim and run jobs from the shared store, no HTTP.
pub fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let mut config = args.config.load()?;
    args.node.apply(&mut config);
    run_node(config, easel_server::run_worker)
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
    if let Some(m) = args.default_model {
        config.default_model = Some(m);
    }
    if args.no_worker {
        config.no_worker = true;
    }
    args.node.apply(&mut config);
    run_node(config, easel_server::serve)
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
                let url = config.database_url();
                let shown = easel_server::store::redact_url(&url);
                if config.database_url.is_none() {
                    std::fs::create_dir_all(&config.data_dir).with_context(|| {
                        format!("creating the data dir {}", config.data_dir.display())
                    })?;
                }
                let (row, secret) = easel_server::auth::create_key_at(&url, &name, credit_limit)
                    .await
                    .with_context(|| format!("creating a key in {shown}"))?;
                eprintln!(
                    "created key {} ({}) in {shown}; the secret is shown once:",
                    row.id, row.name,
                );
                println!("{secret}");
            }
            KeysCommand::List { config } => {
                let config = config.load()?;
                let store = Store::connect(&config.database_url()).await?;
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
                let store = Store::connect(&config.database_url()).await?;
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
    /// Measure a multi-process deployment on this database instead (a
    /// PostgreSQL URL; docs/DEPLOY.md): `--api-nodes` API-only nodes and
    /// `--workers` worker processes started from this binary, fake engine.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// With --database-url: API nodes (`easel serve --no-worker`).
    #[arg(long, default_value_t = 2, requires = "database_url")]
    pub api_nodes: usize,
    /// With --database-url: worker counts to measure, one run each
    /// (`--workers 1,2,4`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4",
        requires = "database_url"
    )]
    pub workers: Vec<usize>,
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
    if let Some(database_url) = args.database_url {
        if options.model.is_some() {
            bail!(
                "--model is not supported with --database-url (the cluster runs the fake engine)"
            );
        }
        if args.api_nodes == 0 || args.api_nodes > 16 {
            bail!("--api-nodes must be between 1 and 16");
        }
        if args.workers.is_empty() || args.workers.iter().any(|&w| w == 0 || w > 64) {
            bail!("--workers must list worker counts between 1 and 64");
        }
        let cluster = ClusterOptions {
            database_url,
            exe: std::env::current_exe().context("finding the easel binary")?,
            api_nodes: args.api_nodes,
            workers: args.workers,
        };
        eprintln!(
            "bench-api: {} requests from {} clients, {} API nodes, workers {:?}, fake engine {} ms/step x {} steps, on {}",
            options.requests,
            options.clients,
            cluster.api_nodes,
            cluster.workers,
            options.fake_step_ms,
            options.steps,
            easel_server::store::redact_url(&cluster.database_url)
        );
        let runs = runtime
            .block_on(run_cluster(&options, &cluster))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        print!("{}", cluster_table(&runs, cluster.api_nodes));
        return Ok(if runs.iter().all(|r| r.report.ok()) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
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
