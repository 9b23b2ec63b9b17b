//! `easel models list` and `easel schedulers`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use easel_diffusion::loader::{
    list_local_models, list_model_files, FileFormat, FileKind, FolderLayout, ModelDir,
    ResolveOptions,
};
use easel_diffusion::schedulers::scheduler_names;
use serde::Serialize;

/// `easel models ...`
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Models on disk: diffusers models in the Hugging Face cache and in
    /// --models-dir folders, and the files of A1111 / ComfyUI model folders
    /// (checkpoints, diffusion models, LoRAs, VAEs, text encoders) with their
    /// kind, detected family, format and size.
    List {
        /// Also look in this folder: its subfolders holding a model_index.json,
        /// and, for an A1111 / ComfyUI install or its `models/` folder,
        /// `Stable-diffusion`, `Lora`, `VAE`, `checkpoints`, `diffusion_models`,
        /// `unet`, `loras`, `vae`, `text_encoders`, `clip`; repeatable.
        #[arg(long = "models-dir")]
        models_dirs: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One row of `easel models list` (and one object of its `--json`).
#[derive(Serialize)]
struct Row {
    /// What `--model` / `--lora` take.
    name: String,
    /// `checkpoint`, `diffusion_model`, `lora`, `vae`, `text_encoder`.
    kind: FileKind,
    /// The detected family; `null` when unknown.
    family: Option<String>,
    /// Why the family is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown_reason: Option<String>,
    /// `diffusers_folder`, `safetensors`, `fp8_safetensors`, `gguf`, `pickle`.
    format: FileFormat,
    /// `a1111` or `comfyui` for a file of those folders.
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<FolderLayout>,
    /// The pipeline class, when known.
    pipeline_class: Option<String>,
    size_bytes: u64,
    path: PathBuf,
    /// For a diffusers model of the hub cache or a model folder: what
    /// `--model` takes (the repo id, `@revision` when not `main`, or the path).
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    /// The repo id of a hub-cache snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    repo_id: Option<String>,
    /// The refs pointing at a hub-cache snapshot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    revisions: Vec<String>,
    /// The commit of a hub-cache snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    commit: Option<String>,
}

/// The family of a diffusers folder (or why it is unknown) and its class.
fn folder_family(path: &std::path::Path) -> (Option<String>, Option<String>) {
    match ModelDir::open(path) {
        Ok(model) => match easel_diffusion::loader::folder_family(&model) {
            Ok(family) => (Some(family), None),
            Err(why) => (None, Some(why)),
        },
        Err(e) => (None, Some(e.to_string())),
    }
}

fn rows(options: &ResolveOptions) -> Vec<Row> {
    let mut rows: Vec<Row> = list_local_models(options)
        .into_iter()
        .map(|m| {
            let (family, unknown_reason) = folder_family(&m.path);
            Row {
                name: m.reference.clone(),
                kind: FileKind::Checkpoint,
                family,
                unknown_reason,
                format: FileFormat::DiffusersFolder,
                layout: None,
                pipeline_class: (!m.pipeline_class.is_empty()).then(|| m.pipeline_class.clone()),
                size_bytes: m.size_bytes,
                path: m.path,
                reference: Some(m.reference),
                repo_id: m.repo_id,
                revisions: m.revisions,
                commit: m.commit,
            }
        })
        .collect();
    rows.extend(
        list_model_files(&options.model_dirs)
            .into_iter()
            .map(|f| Row {
                name: f.name,
                kind: f.kind,
                family: f.family,
                unknown_reason: f.unknown_reason,
                format: f.format,
                layout: Some(f.layout),
                pipeline_class: f.pipeline_class,
                size_bytes: f.size_bytes,
                path: f.path,
                reference: None,
                repo_id: None,
                revisions: Vec::new(),
                commit: None,
            }),
    );
    rows
}

pub fn run(command: ModelsCommand) -> Result<ExitCode> {
    match command {
        ModelsCommand::List { models_dirs, json } => {
            let options = ResolveOptions {
                model_dirs: models_dirs,
                ..ResolveOptions::default()
            };
            let rows = rows(&options);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!(
                    "no models found in {} (download one with `easel generate --model org/name`, or pass --models-dir)",
                    options
                        .hub_cache()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "the Hugging Face cache".into())
                );
                return Ok(ExitCode::SUCCESS);
            }
            let name_width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
            let family_width = rows
                .iter()
                .map(|r| r.family.as_deref().unwrap_or("unknown").len())
                .max()
                .unwrap_or(0)
                .max(6);
            println!(
                "{:<name_width$}  {:<15} {:<family_width$}  {:<17} {:>9}  path",
                "name", "kind", "family", "format", "size"
            );
            for r in &rows {
                println!(
                    "{:<name_width$}  {:<15} {:<family_width$}  {:<17} {:>9}  {}",
                    r.name,
                    r.kind.label(),
                    r.family.as_deref().unwrap_or("unknown"),
                    r.format.label(),
                    format_size(r.size_bytes),
                    r.path.display()
                );
                if let Some(why) = &r.unknown_reason {
                    println!("    unknown family: {why}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn format_size(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
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
