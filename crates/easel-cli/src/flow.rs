//! `easel flow run` / `easel flow validate`: flows on this machine.
//!
//! Image steps run on the local engine ([`LocalBackend`]) through the same
//! front door and job builder as `easel generate`
//! ([`easel_diffusion::engine`]): every image definition of a step in one
//! job, `image`, `mask`, `strength`, `loras` (by `path`, or a Hugging Face
//! repo id as `url`) and `tiling` as `easel generate` takes them, models kept
//! in the engine's cache within `--model-cache-bytes`, files stored under
//! `DATA_DIR/assets/<job>/` and returned as asset records with `file://`
//! URLs. Trainings and inference packs live in the server's stores, so
//! flows that use them need the server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use easel_core::{encode_image, write_atomic, ImageDefinition, ImageMetadata, RgbImageRef};
use easel_diffusion::device::Device;
use easel_diffusion::engine::{Engine, EngineOptions, JobRequest};
use easel_diffusion::loader::ResolveOptions;
use easel_diffusion::lora::{resolve_lora, LoraSpec};
use easel_diffusion::pipelines::{CancelToken, Progress};
use easel_diffusion::Error as EngineError;
use easel_flow::document::parse_json_or_json5;
use easel_flow::{
    AssetRecord, ChatConfig, FlowEvent, FlowRun, FlowRunner, ImageBackend, ImageJobResult,
    RunOptions, RunStatus, StepContext, StepError, StepRegistry, StepStatus,
};
use serde_json::{Map, Value};

use crate::device_args::DeviceArgs;
use crate::generate::parse_bool_env;
use crate::inputs::load_image_and_mask_as;

/// `easel flow ...`
#[derive(Subcommand, Debug)]
pub enum FlowCommand {
    /// Run a flow (JSON or JSON5) with an input; prints each step's status,
    /// duration and result, and exits non-zero when the run failed.
    Run(RunArgs),
    /// Check a flow (and an input) without running anything.
    Validate(ValidateArgs),
}

/// The default `--model-cache-bytes`: 16 GiB, as the server's
/// `model_cache_bytes`.
pub const DEFAULT_MODEL_CACHE_BYTES: u64 = 16 << 30;

/// Arguments of `easel flow run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The flow file (`.json` or `.json5`).
    pub flow: PathBuf,
    /// The input: a JSON (or JSON5) object, or `@FILE` to read one.
    #[arg(long, short = 'i', default_value = "{}")]
    pub input: String,
    /// Where generated images are stored (`DIR/assets/<job>/`).
    #[arg(long, env = "EASEL_DATA_DIR", default_value = "easel-data")]
    pub data_dir: PathBuf,
    /// Print the whole run record (asset records included) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Never download models: use only models already on disk.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_bool_env)]
    pub offline: bool,
    /// Memory budget of the loaded-model cache, in bytes (estimated from the
    /// weights as loaded); least recently used models are unloaded to stay
    /// within it, as the server's `model_cache_bytes`.
    #[arg(long, env = "EASEL_MODEL_CACHE_BYTES", default_value_t = DEFAULT_MODEL_CACHE_BYTES)]
    pub model_cache_bytes: u64,
    /// Where the image steps' models compute.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// OpenAI-compatible chat-completions server for ObjectGenerator steps
    /// (e.g. http://127.0.0.1:8080/v1).
    #[arg(long, env = "EASEL_LLM_URL")]
    pub llm_url: Option<String>,
    /// The model name sent to the chat-completions server.
    #[arg(long, env = "EASEL_LLM_MODEL")]
    pub llm_model: Option<String>,
}

/// Arguments of `easel flow validate`.
#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The flow file (`.json` or `.json5`).
    pub flow: PathBuf,
    /// Also check references into this input: a JSON object or `@FILE`.
    #[arg(long, short = 'i')]
    pub input: Option<String>,
}

/// Runs `easel flow ...`.
pub fn run(command: FlowCommand) -> Result<ExitCode> {
    match command {
        FlowCommand::Run(args) => run_flow(args),
        FlowCommand::Validate(args) => validate_flow(args),
    }
}

fn read_input(input: &str) -> Result<Value> {
    let text = match input.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the input file {path}"))?,
        None => input.to_string(),
    };
    parse_json_or_json5(&text).map_err(|e| anyhow!("--input is not JSON or JSON5: {e}"))
}

fn read_flow(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the flow {}", path.display()))
}

fn chat_config(args: &RunArgs) -> Result<Option<ChatConfig>> {
    let mut config = ChatConfig::from_env().map_err(|e| anyhow!(e))?;
    if let Some(url) = &args.llm_url {
        let model = args.llm_model.clone().ok_or_else(|| {
            anyhow!("--llm-url needs --llm-model (the model name the server expects)")
        })?;
        let mut c = config.unwrap_or_else(|| ChatConfig::new(url.clone(), model.clone()));
        c.url = url.clone();
        c.model = model;
        config = Some(c);
    }
    Ok(config)
}

fn validate_flow(args: ValidateArgs) -> Result<ExitCode> {
    let runner = FlowRunner::new(StepRegistry::standard(
        Arc::new(easel_flow::NoImageBackend),
        None,
    ));
    let flow = match runner.load(&read_flow(&args.flow)?) {
        Ok(flow) => flow,
        Err(e) => {
            eprintln!("{}: {e}", args.flow.display());
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(input) = &args.input {
        if let Err(e) = runner.validate(&flow, Some(&read_input(input)?)) {
            eprintln!("{}: {e}", args.flow.display());
            return Ok(ExitCode::from(2));
        }
    }
    println!("{}: {} steps, valid", args.flow.display(), flow.steps.len());
    Ok(ExitCode::SUCCESS)
}

fn run_flow(args: RunArgs) -> Result<ExitCode> {
    let text = read_flow(&args.flow)?;
    let input = read_input(&args.input)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let backend = Arc::new(LocalBackend::new(
        args.data_dir.clone(),
        args.offline,
        args.model_cache_bytes,
        args.device.open()?,
    )?);
    let runner = FlowRunner::new(StepRegistry::standard(backend, chat_config(&args)?));
    let flow = match runner.load(&text) {
        Ok(flow) => flow,
        Err(e) => {
            eprintln!("{}: {e}", args.flow.display());
            return Ok(ExitCode::from(2));
        }
    };
    let cancel = easel_flow::CancelToken::new();
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || cancel.cancel());
    }
    let quiet = args.json;
    let options = RunOptions {
        cancel,
        events: Some(Arc::new(move |event: &FlowEvent| {
            if !quiet {
                print_event(event)
            }
        })),
        ..RunOptions::default()
    };
    let run = match runner.run(&flow, input, &options) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("{}: {e}", args.flow.display());
            return Ok(ExitCode::from(2));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        print_run(&run);
    }
    Ok(match run.status {
        RunStatus::Succeeded => ExitCode::SUCCESS,
        RunStatus::Canceled => ExitCode::from(130),
        _ => ExitCode::from(1),
    })
}

fn print_event(event: &FlowEvent) {
    match event {
        FlowEvent::StepStarted {
            step_id, step_type, ..
        } => eprintln!("{step_id} ({step_type}) ..."),
        FlowEvent::StepLog {
            step_id, message, ..
        } => eprintln!("{step_id}: {message}"),
        _ => {}
    }
}

fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "-".to_string(),
        |ms| format!("{:.2}s", ms as f64 / 1000.0),
    )
}

fn summary(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 160 {
        format!("{}...", text.chars().take(157).collect::<String>())
    } else {
        text
    }
}

fn print_run(run: &FlowRun) {
    println!(
        "run {}: {} in {}",
        run.id,
        serde_json::to_value(run.status)
            .unwrap_or_default()
            .as_str()
            .unwrap_or("?"),
        seconds(run.duration_ms)
    );
    for step in &run.steps {
        let status = serde_json::to_value(step.status).unwrap_or_default();
        println!(
            "  {} ({}): {} {}",
            step.id,
            step.step_type,
            status.as_str().unwrap_or("?"),
            seconds(step.duration_ms)
        );
        if let Some(error) = &step.error {
            println!("    error: {}", error.message);
        }
        match (&step.result, step.status) {
            (Some(Value::Array(assets)), StepStatus::Succeeded) if step.job_id.is_some() => {
                println!(
                    "    job {}: {} images",
                    step.job_id.as_deref().unwrap_or(""),
                    assets.len()
                );
                for asset in assets {
                    println!("    {}", asset["file_url"].as_str().unwrap_or("?"));
                }
            }
            (Some(result), StepStatus::Succeeded) => println!("    {}", summary(result)),
            _ => {}
        }
    }
    if let Some(error) = &run.error {
        eprintln!("error: {}", error.message);
    }
}

/// Fields of the native request this backend cannot serve, and why.
const UNSUPPORTED: [(&str, &str); 5] = [
    ("trainingId", "trainings are registered in the easel server"),
    ("scale", "trainings are registered in the easel server"),
    (
        "inferencePackId",
        "inference packs are stored in the easel server",
    ),
    ("aspectRatio", "use width and height"),
    ("megapixels", "use width and height"),
];

/// Image steps on this machine's engine (on `--device`).
pub struct LocalBackend {
    data_dir: PathBuf,
    offline: bool,
    engine: Mutex<Engine>,
}

impl LocalBackend {
    /// A backend storing files under `data_dir/assets`, keeping loaded
    /// models within `model_cache_bytes` (estimated), computing on `device`.
    pub fn new(
        data_dir: PathBuf,
        offline: bool,
        model_cache_bytes: u64,
        device: Device,
    ) -> Result<Self> {
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("data directory {}", data_dir.display()))?;
        let engine = Engine::new(EngineOptions {
            resolve: ResolveOptions {
                offline,
                progress: true,
                ..ResolveOptions::default()
            },
            cache_budget_bytes: model_cache_bytes,
            device,
            ..EngineOptions::default()
        });
        Ok(Self {
            data_dir,
            offline,
            engine: Mutex::new(engine),
        })
    }

    /// The LoRA files of `definition`'s `loras` (by `path`, or a Hugging
    /// Face repo id or file as `url`), resolved as `easel generate --lora`
    /// resolves them; `prefix` is the definition's field path.
    fn loras(
        &self,
        definition: &ImageDefinition,
        prefix: &str,
    ) -> Result<Vec<LoraSpec>, StepError> {
        let options = ResolveOptions {
            offline: self.offline,
            progress: true,
            ..ResolveOptions::default()
        };
        let mut specs = Vec::new();
        for (j, lora) in definition.loras.iter().flatten().enumerate() {
            let (field, reference) = match (&lora.path, &lora.url, &lora.id) {
                (Some(path), _, _) => ("path", path),
                (None, Some(url), _) => ("url", url),
                _ => {
                    return Err(StepError::failed(format!(
                        "{prefix}.loras[{j}].id: not supported by `easel flow run` (trainings are \
                         registered in the easel server); give `path` or `url`, or run this flow on the easel server"
                    )))
                }
            };
            let path = resolve_lora(reference, &options)
                .map_err(|e| StepError::failed(format!("{prefix}.loras[{j}].{field}: {e}")))?;
            specs.push(LoraSpec::new(
                path,
                lora.scale
                    .unwrap_or(easel_core::request::DEFAULT_LORA_SCALE),
            ));
        }
        Ok(specs)
    }
}

/// The image definitions of a request with the global values merged in
/// (per-image values win), parsed and validated as the server's
/// ImageGenerator steps are (`ImageDefinition::validate`).
fn image_definitions(request: &Value) -> Result<Vec<ImageDefinition>, StepError> {
    let fail = |path: String, message: String| StepError::failed(format!("{path}: {message}"));
    let Some(map) = request.as_object() else {
        return Err(StepError::failed("parameters: must be an object"));
    };
    let mut defaults = Map::new();
    for (key, value) in map {
        if key == "images" {
            continue;
        }
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| k == key) {
            return Err(fail(
                format!("parameters.{key}"),
                format!(
                    "not supported by `easel flow run` ({why}); run this flow on the easel server"
                ),
            ));
        }
        defaults.insert(key.clone(), value.clone());
    }
    let images = map
        .get("images")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let prefix = format!("parameters.images[{i}]");
        let mut merged = defaults.clone();
        if let Some(fields) = image.as_object() {
            for (key, value) in fields {
                if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| k == key) {
                    return Err(fail(
                        format!("{prefix}.{key}"),
                        format!("not supported by `easel flow run` ({why}); run this flow on the easel server"),
                    ));
                }
                merged.insert(key.clone(), value.clone());
            }
        }
        let definition: ImageDefinition = serde_json::from_value(Value::Object(merged))
            .map_err(|e| fail(prefix.clone(), e.to_string()))?;
        if definition.base_model.is_none() {
            return Err(fail(
                format!("{prefix}.baseModel"),
                "missing: set `baseModel` on the step or on this image".to_string(),
            ));
        }
        definition
            .validate(&easel_core::ValidateOptions::default().field_prefix(prefix.clone()))
            .map_err(|e| StepError::failed(e.to_string()))?;
        out.push(definition);
    }
    Ok(out)
}

/// The denoising steps of a step's definitions, for its progress total:
/// each definition's `steps`, or its model's default steps where it gives
/// none (Stable Diffusion 25, FLUX.1 schnell 4, dev 28, Fill 50). Such a
/// model loads now; the generation loop then finds it in the cache.
///
/// # Errors
/// A model that cannot be loaded, naming `parameters.images[i].baseModel`.
fn total_steps(definitions: &[ImageDefinition], engine: &mut Engine) -> Result<u64, StepError> {
    let mut total = 0u64;
    for (i, definition) in definitions.iter().enumerate() {
        total += match definition.steps {
            Some(steps) => u64::from(steps),
            None => {
                let reference = definition.base_model.clone().unwrap_or_default();
                let model = engine.load(&reference).map_err(|e| {
                    StepError::failed(format!("parameters.images[{i}].baseModel: {e}"))
                })?;
                model.defaults().steps as u64
            }
        };
    }
    Ok(total)
}

/// `file://` URL of an absolute path, with unsafe bytes percent-encoded.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for byte in path.to_string_lossy().bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            url.push(byte as char);
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url
}

fn new_job_id() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default();
    format!("job-{now:x}")
}

impl ImageBackend for LocalBackend {
    fn generate(&self, request: Value, ctx: &StepContext<'_>) -> Result<ImageJobResult, StepError> {
        let definitions = image_definitions(&request)?;
        let job_id = new_job_id();
        let dir = self.data_dir.join("assets").join(&job_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StepError::failed(format!("creating {}: {e}", dir.display())))?;
        let mut engine = self
            .engine
            .lock()
            .map_err(|_| StepError::failed("the model cache is poisoned"))?;
        let total_steps = total_steps(&definitions, &mut engine)?;
        let mut done_steps = 0u64;
        let mut assets = Vec::new();
        for (i, definition) in definitions.iter().enumerate() {
            if ctx.is_canceled() {
                return Err(StepError::canceled());
            }
            let prefix = format!("parameters.images[{i}]");
            let params = definition
                .generation_params()
                .map_err(|e| StepError::failed(e.with_prefix(&prefix).to_string()))?;
            let reference = params.base_model.clone().unwrap_or_default();
            // Inputs are read and checked before the model is loaded.
            let (image, mask) = match &definition.image {
                Some(image) => {
                    let (image, mask, had_alpha) = load_image_and_mask_as(
                        image,
                        definition.mask.as_deref(),
                        &format!("{prefix}.image"),
                        &format!("{prefix}.mask"),
                    )
                    .map_err(|e| StepError::failed(format!("{e:#}")))?;
                    if had_alpha && definition.mask.as_deref() != Some("alpha") {
                        ctx.log(format!(
                            "images[{i}]: the init image's transparent pixels were composited on white (mask `alpha` repaints them instead)"
                        ));
                    }
                    (Some(image), mask)
                }
                None => (None, None),
            };
            let loras = self.loras(definition, &prefix)?;
            let model = engine
                .load(&reference)
                .map_err(|e| StepError::failed(format!("{prefix}.baseModel: {e}")))?;
            let job = JobRequest {
                model: reference.clone(),
                params: params.clone(),
                image,
                mask,
                strength: definition.strength,
                loras,
                max_sequence_length: None,
                tiling: definition.tiling.unwrap_or(false),
            }
            .build(model.defaults())
            .map_err(|e| StepError::failed(format!("{prefix}: {e}")))?;
            let format = params.output_format_or_default();
            let quality = params
                .output_quality_or_default()
                .map_err(|e| StepError::failed(e.to_string()))?;
            let engine_cancel = CancelToken::new();
            let base = done_steps;
            let mut on_progress = |p: Progress| {
                if ctx.is_canceled() {
                    engine_cancel.cancel();
                }
                if let Progress::Step { step, .. } = p {
                    ctx.progress(base + step as u64, total_steps, Some("denoising steps"));
                }
            };
            let output = match engine.run(&job, &mut on_progress, &engine_cancel) {
                Ok(output) => output,
                Err(EngineError::Canceled) => return Err(StepError::canceled()),
                Err(e) => return Err(StepError::failed(format!("{prefix}: {e}"))),
            };
            let resolved = &output.params;
            done_steps += resolved.steps as u64;
            for w in &resolved.warnings {
                ctx.log(format!("images[{i}]: {w}"));
            }
            let (width, height) = (resolved.width as u32, resolved.height as u32);
            let mut extra_metadata: std::collections::BTreeMap<String, String> =
                [("easel".to_string(), env!("CARGO_PKG_VERSION").to_string())].into();
            if let Some(strength) = resolved.strength {
                extra_metadata.insert("Denoising strength".into(), strength.to_string());
            }
            if !resolved.loras.is_empty() {
                let list: Vec<String> = resolved
                    .loras
                    .iter()
                    .map(|l| format!("{}:{}", l.path.display(), l.scale))
                    .collect();
                extra_metadata.insert("Lora".into(), list.join(" "));
            }
            for (b, (pixels, &image_seed)) in output.images.iter().zip(&resolved.seeds).enumerate()
            {
                let metadata = ImageMetadata {
                    prompt: params.prompt.clone(),
                    negative_prompt: params.negative_prompt.clone(),
                    steps: resolved.steps as u32,
                    scheduler: resolved.scheduler.clone(),
                    sigma_schedule: resolved.sigma_schedule.clone(),
                    guidance_scale: resolved.guidance_scale,
                    seed: image_seed,
                    width,
                    height,
                    model: reference.clone(),
                    extra: extra_metadata.clone(),
                };
                let image = RgbImageRef::new(width, height, pixels)
                    .map_err(|e| StepError::failed(e.to_string()))?;
                let bytes = encode_image(&image, format, quality, &metadata)
                    .map_err(|e| StepError::failed(format!("encoding images[{i}]: {e}")))?;
                let file_name = format!("{i}-{b}-{image_seed}.{}", format.extension());
                let path = dir.join(&file_name);
                write_atomic(&path, &bytes)
                    .map_err(|e| StepError::failed(format!("writing {}: {e}", path.display())))?;
                let mut extra = Map::new();
                extra.insert("prompt".into(), Value::String(params.prompt.clone()));
                extra.insert("seed".into(), image_seed.into());
                extra.insert("width".into(), width.into());
                extra.insert("height".into(), height.into());
                extra.insert("model".into(), Value::String(reference.clone()));
                extra.insert("path".into(), Value::String(path.display().to_string()));
                assets.push(AssetRecord {
                    id: format!("{job_id}-{}", assets.len()),
                    file_url: file_url(&path),
                    file_name,
                    file_size: bytes.len() as u64,
                    file_type: format.mime_type().to_string(),
                    extra,
                });
            }
        }
        Ok(ImageJobResult { job_id, assets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_merge_globals_and_overrides() {
        let defs = image_definitions(&json!({
            "baseModel": "m", "steps": 3, "negativePrompt": "n",
            "images": [{ "prompt": "a" }, { "prompt": "b", "baseModel": "other", "steps": 4 }]
        }))
        .unwrap();
        assert_eq!(defs[0].base_model.as_deref(), Some("m"));
        assert_eq!(defs[0].steps, Some(3));
        assert_eq!(defs[1].base_model.as_deref(), Some("other"));
        assert_eq!(defs[1].steps, Some(4));
        assert_eq!(defs[1].negative_prompt.as_deref(), Some("n"));
    }

    #[test]
    fn the_progress_total_uses_each_models_default_steps() {
        let fixture = |name: &str| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models")
                .join(name)
                .display()
                .to_string()
        };
        let (schnell, sd15) = (fixture("tiny-flux-schnell"), fixture("tiny-sd15"));
        let defs = image_definitions(&json!({
            "images": [
                { "prompt": "a", "baseModel": schnell },
                { "prompt": "b", "baseModel": sd15, "steps": 3 },
                { "prompt": "c", "baseModel": sd15 },
            ]
        }))
        .unwrap();
        let mut engine = Engine::new(EngineOptions::default());
        // FLUX.1 schnell's 4, the given 3, Stable Diffusion's 25.
        assert_eq!(total_steps(&defs, &mut engine).unwrap(), 4 + 3 + 25);
        let defs = image_definitions(&json!({
            "images": [{ "prompt": "a", "baseModel": "/no/such/model" }]
        }))
        .unwrap();
        let e = total_steps(&defs, &mut engine).unwrap_err();
        assert!(
            e.message.starts_with("parameters.images[0].baseModel: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn definitions_errors_name_the_field() {
        let e = image_definitions(&json!({ "baseModel": "m", "images": [{ "prompt": "a" }, { "prompt": "b", "width": 1001 }] }))
            .unwrap_err();
        assert!(
            e.message.starts_with("parameters.images[1].width: 1001"),
            "{}",
            e.message
        );
        let e = image_definitions(&json!({ "images": [{ "prompt": "a" }] })).unwrap_err();
        assert_eq!(
            e.message,
            "parameters.images[0].baseModel: missing: set `baseModel` on the step or on this image"
        );
        let e = image_definitions(&json!({ "trainingId": "x", "images": [] })).unwrap_err();
        assert!(
            e.message
                .starts_with("parameters.trainingId: not supported by `easel flow run`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn file_urls() {
        assert_eq!(file_url(Path::new("/a b/c.webp")), "file:///a%20b/c.webp");
    }
}
