//! `easel`: self-hosted image generation from the command line.
//!
//! A thin binary over the reusable crates: `easel-core` validates and
//! encodes, `easel-diffusion` loads models and runs pipelines,
//! `easel-server` is the HTTP service.

mod bench;
mod generate;
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
    /// Create, list and revoke API keys of the HTTP service.
    Keys {
        #[command(subcommand)]
        command: serve::KeysCommand,
    },
    /// Load-test the HTTP API on loopback: p50/p99 latency, throughput, no job lost.
    BenchApi(serve::BenchApiArgs),
}

fn main() -> ExitCode {
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
        Command::Models { command } => models::run(command),
        Command::Schedulers(args) => models::schedulers(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::serve(*args),
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
