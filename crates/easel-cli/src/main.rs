//! `easel`: self-hosted image generation from the command line.
//!
//! A thin binary over the reusable crates: `easel-core` validates and
//! encodes, `easel-diffusion` loads models and runs pipelines, `easel-flow`
//! runs flows, `easel-server` is the HTTP service.

mod bench;
mod component_args;
mod device_args;
mod flow;
mod generate;
mod inputs;
mod migrate;
mod models;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Self-hosted image generation: Stable Diffusion 1.x / 2.x / XL from
/// diffusers-format models, matching diffusers' output for the same seed.
#[derive(Parser)]
#[command(name = "easel", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Run or check flows: steps with JSONPath references and @Map.
    Flow {
        #[command(subcommand)]
        command: flow::FlowCommand,
    },
    /// Models found locally (Hugging Face cache and model directories).
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// List the schedulers (samplers) and their aliases.
    Schedulers(models::SchedulersArgs),
    /// Time each stage of a generation: text encoding, denoising steps, VAE decode.
    Bench(bench::BenchArgs),
    /// Run the image-generation HTTP service (native API, OpenAI Images API).
    Serve(Box<serve::ServeArgs>),
    /// Run jobs from a shared job store (PostgreSQL) without serving HTTP:
    /// the GPU workers of a multi-machine deployment (docs/DEPLOY.md).
    Worker(Box<serve::WorkerArgs>),
    /// Move a single-machine install (SQLite and its asset folder) to
    /// PostgreSQL and S3-compatible storage; idempotent, resumable.
    Migrate(Box<migrate::MigrateArgs>),
    /// Create, list and revoke API keys of the HTTP service.
    Keys {
        #[command(subcommand)]
        command: serve::KeysCommand,
    },
    /// Load-test the HTTP API on loopback: p50/p99 latency, throughput, no job lost.
    BenchApi(serve::BenchApiArgs),
}

/// Keep freed activation buffers in the heap for reuse. glibc returns blocks
/// above a dynamic threshold (128 KiB at first) to the kernel on every free,
/// so each layer's output costs fresh page faults; raising the mmap and trim
/// thresholds halved the system time of a UNet call (10.3 s to 5.9 s on
/// SD 1.5 at 256², see docs/PERFORMANCE.md).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EASEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Flow { command } => flow::run(command),
        Command::Models { command } => models::run(command),
        Command::Schedulers(args) => models::schedulers(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::serve(*args),
        Command::Worker(args) => serve::worker(*args),
        Command::Migrate(args) => migrate::run(*args),
        Command::Keys { command } => serve::keys(command),
        Command::BenchApi(args) => serve::bench_api(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
