//! `easel models list` and `easel schedulers`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use easel_diffusion::loader::{list_local_models, ResolveOptions};
use easel_diffusion::schedulers::scheduler_names;

/// `easel models ...`
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Diffusers models in the Hugging Face cache and in --models-dir directories.
    List {
        /// Also look in this directory (each subdirectory with a model_index.json); repeatable.
        #[arg(long = "models-dir")]
        models_dirs: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ModelsCommand) -> Result<ExitCode> {
    match command {
        ModelsCommand::List { models_dirs, json } => {
            let options = ResolveOptions {
                model_dirs: models_dirs,
                ..ResolveOptions::default()
            };
            let models = list_local_models(&options);
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
                return Ok(ExitCode::SUCCESS);
            }
            if models.is_empty() {
                println!(
                    "no models found in {} (download one with `easel generate --model org/name`, or pass --models-dir)",
                    options
                        .hub_cache()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "the Hugging Face cache".into())
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<48} {:<28} {:>9}  path", "model", "pipeline", "size");
            for m in &models {
                println!(
                    "{:<48} {:<28} {:>9}  {}",
                    m.reference,
                    if m.pipeline_class.is_empty() {
                        "?"
                    } else {
                        m.pipeline_class.as_str()
                    },
                    format_size(m.size_bytes),
                    m.path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn format_size(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// `easel schedulers`
#[derive(Args, Debug)]
pub struct SchedulersArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn schedulers(args: SchedulersArgs) -> Result<ExitCode> {
    let names = scheduler_names();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&names)?);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &names {
        println!(
            "{:<18} {:<36} {}",
            s.name,
            s.class_name,
            s.aliases.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
