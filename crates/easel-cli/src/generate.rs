//! `easel generate`: one prompt, one model, image files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use easel_core::{
    encode_image, output_paths, resolve_output_format, write_atomic, GenerationParams,
    ImageMetadata, OutputFormat, OutputTarget, Precision, RgbImageRef, ValidateOptions,
};
use easel_diffusion::device::Device;
use easel_diffusion::device::Offload;
use easel_diffusion::engine::{Engine, EngineOptions, JobRequest};
use easel_diffusion::loader::{ModelFamily, ResolveOptions};
use easel_diffusion::models::quantize::Quantization;
use easel_diffusion::models::vae_tiling::VaeTiling;
use easel_diffusion::pipelines::{CancelToken, Progress};
use easel_diffusion::schedulers::resolve_scheduler_name;
use easel_diffusion::Error as EngineError;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::component_args::ComponentArgs;
use crate::device_args::DeviceArgs;
use crate::inputs::{load_image_and_mask, resolve_loras};

/// Arguments of `easel generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A local diffusers directory, a single-file checkpoint (`.safetensors`
    /// in the original SD 1.x / 2.x / XL layout, as A1111 and ComfyUI load),
    /// the file name of a checkpoint in a --models-dir's A1111 / ComfyUI
    /// model folders (`dreamshaper_8` for
    /// `models/Stable-diffusion/dreamshaper_8.safetensors`), or a Hugging
    /// Face repo id (`org/name[@revision]`) found in the Hugging Face cache
    /// or downloaded into it.
    #[arg(long, short = 'm')]
    pub model: String,
    /// A folder to find --model and --lora names in: its diffusers model
    /// subfolders, and for an A1111 / ComfyUI install (or its `models/`
    /// folder) the checkpoints of `Stable-diffusion`, `checkpoints`,
    /// `diffusion_models`, `unet` and the LoRAs of `Lora`, `loras`
    /// (see `easel models list`); repeatable.
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<PathBuf>,
    /// For a single-file --model: the diffusers folder or repo id whose
    /// configs, tokenizers and scheduler config it uses (as diffusers'
    /// `from_single_file(..., config=...)`); for a FLUX transformer-only
    /// file also its text encoders and VAE [default: the standard repo of
    /// the detected architecture, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5
    /// or black-forest-labs/FLUX.1-dev; only its config files are
    /// downloaded, for FLUX all but the transformer].
    #[arg(long, value_name = "DIR_OR_REPO")]
    pub config: Option<String>,
    /// For a single-file --model: the scheduler's prediction type, `epsilon`
    /// or `v_prediction` (SD 2.x 768 models) [default: what the file tells,
    /// else the config's].
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,
    /// Quantize the model's UNet / FLUX.1 transformer (and FLUX's T5
    /// encoder) as it loads: q8_0 (ggml Q8_0, 8.5 bits per weight), q4_0
    /// (4.5 bits) or fp8 (float8_e4m3fn, scaled per tensor). Weights already
    /// quantized in their file (GGUF, fp8) stay as they are.
    #[arg(long, value_name = "q8_0|q4_0|fp8", value_parser = parse_quantization)]
    pub quantize: Option<Quantization>,
    /// FLUX: load the T5 encoder for each prompt encoding and free it
    /// after, as diffusers' model CPU offload does (about 9.5 GB in f16,
    /// 5 GB at q8_0 less while the transformer and VAE run; costs a T5
    /// load per generation).
    #[arg(long)]
    pub offload_t5: bool,
    /// When the VAE decodes in overlapping tiles, as diffusers'
    /// `enable_vae_tiling` (bounds the decode's memory by a tile; the
    /// pixels differ a little from a whole decode): `on` whenever the
    /// latents are larger than one tile, `off` never, `auto` above 2048x2048
    /// pixels per image on the CPU (1024x1024 on a GPU), never with --tiling.
    #[arg(long, value_name = "auto|on|off", default_value = "auto", value_parser = parse_vae_tiling)]
    pub vae_tiling: VaeTiling,
    /// Where the weights live between uses, as diffusers' CPU offload
    /// modes: `none` (all on the device), `model` (in RAM, each component
    /// moved to the GPU while its stage runs), `sequential` (in RAM, each
    /// layer moved for its own pass: least GPU memory, slowest). For GPUs;
    /// on the CPU it saves nothing.
    #[arg(long, value_name = "none|model|sequential", default_value = "none", value_parser = parse_offload)]
    pub offload: Offload,
    /// Component files replacing components of --model.
    #[command(flatten)]
    pub components: ComponentArgs,
    /// Where the models compute.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// What to generate.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance).
    #[arg(long, short = 'n', visible_alias = "negative")]
    pub negative_prompt: Option<String>,
    /// Denoising steps, 1..=60 [default: per model: 25 for Stable Diffusion,
    /// FLUX.1 schnell 4, dev 28, Fill 50].
    #[arg(long, visible_alias = "num-inference-steps")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale, 0..=30; 1 or less runs one UNet pass per step.
    /// FLUX.1 dev and Fill embed it instead; schnell ignores it
    /// [default: per model: 7.5 for Stable Diffusion, FLUX.1 schnell 0, dev 3.5, Fill 30].
    #[arg(long, short = 'g', visible_alias = "cfg")]
    pub guidance_scale: Option<f64>,
    /// Width in pixels in 8..=2048, a multiple of 8; FLUX rounds it to a multiple of 16
    /// with a notice [default: the init image's, else the model's native size].
    #[arg(long, short = 'W')]
    pub width: Option<u32>,
    /// Height in pixels in 8..=2048, a multiple of 8; FLUX rounds it to a multiple of 16
    /// with a notice [default: the init image's, else the model's native size].
    #[arg(long, short = 'H')]
    pub height: Option<u32>,
    /// FLUX: the T5 prompt length in tokens, 1..=512 [default: schnell 256, dev and Fill 512].
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Seed of the first image; image i uses seed + i [default: random, always reported].
    #[arg(long, short = 's')]
    pub seed: Option<u64>,
    /// Images to generate, 1..=4, each reproducible alone from its own seed.
    #[arg(long, short = 'b', default_value_t = 1, visible_alias = "num-images")]
    pub batch_size: u32,
    /// Sampler: a diffusers class name, a short name (`euler`, `ddim`, ...) or a
    /// hosted-API name (`EULER_DISCRETE`); see `easel schedulers` [default: the model's].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Output file; a batch writes FILE-0.ext, FILE-1.ext, ...
    #[arg(long, short = 'o', conflicts_with = "output_dir")]
    pub output: Option<PathBuf>,
    /// Output directory; files are named easel-<seed>-<i>.<ext> [default: .].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// File format: png, jpeg or webp [default: from --output's extension, else png].
    #[arg(long, short = 'f')]
    pub format: Option<OutputFormat>,
    /// Quality of jpeg and webp, 1..=100.
    #[arg(long, short = 'q', default_value_t = 80)]
    pub quality: u32,
    /// Compute precision: fp16, bf16 or fp32 [default: on a GPU the model's,
    /// on the CPU fp32]. On the CPU bf16 computes bf16 where the CPU has
    /// AVX512-BF16 (about 1.8x faster than fp32), fp16 as bf16 there; a CPU
    /// without it computes fp32 and the warnings say so.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Print a machine-readable result (files, seeds, timings) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Image-to-image / inpainting: the init image, a file path, an http(s) URL
    /// or a `data:image/...;base64,` URI (PNG, JPEG or WebP; alpha is composited
    /// on white). Without --width/--height it sets the size (rounded down to a
    /// multiple of 8, 16 for FLUX); otherwise it is resized (Lanczos) to the requested size.
    #[arg(long, short = 'i', visible_alias = "init-image")]
    pub image: Option<String>,
    /// How much of the init image is replaced, 0..=1: the last
    /// floor(steps x strength) steps of the schedule run [default: 0.8; FLUX.1 Fill 1.0].
    #[arg(long, visible_alias = "prompt-strength")]
    pub strength: Option<f64>,
    /// Inpainting: the mask (white repaints, black keeps), resized to the image;
    /// a path, URL or data URI, or `alpha` to use the init image's alpha channel
    /// (transparent repaints).
    #[arg(long, requires = "image")]
    pub mask: Option<String>,
    /// A LoRA adapter, PATH_OR_REPO[:SCALE] (scale -1..=3, default 1): a
    /// .safetensors file, a folder holding one, the file name (with or
    /// without .safetensors) of a LoRA in a --models-dir's `Lora` / `loras`
    /// folder, or a Hugging Face repo id. Repeat to stack several.
    #[arg(long = "lora", value_name = "PATH_OR_REPO[:SCALE]")]
    pub loras: Vec<String>,
    /// Seamless tiling: the image repeats without seams left-right and
    /// top-bottom (circular padding in the UNet and VAE convolutions, as
    /// A1111's and stable-diffusion.cpp's `tiling`).
    #[arg(long)]
    pub tiling: bool,
    /// Never download: use only models already on disk.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_bool_env)]
    pub offline: bool,
}

/// `HF_HUB_OFFLINE` style booleans: 1/true/yes/on.
pub fn parse_bool_env(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected 1/0/true/false, got `{other}`")),
    }
}

/// `--quantize`: `q8_0`, `q4_0` or `fp8`, with the allowed names on error.
pub fn parse_quantization(s: &str) -> Result<Quantization, String> {
    s.parse().map_err(|e: easel_diffusion::Error| e.to_string())
}

/// `--offload`: `none`, `model` or `sequential`.
pub fn parse_offload(s: &str) -> Result<Offload, String> {
    s.parse().map_err(|e: easel_diffusion::Error| e.to_string())
}

/// `--vae-tiling`: `auto`, `on` or `off`.
pub fn parse_vae_tiling(s: &str) -> Result<VaeTiling, String> {
    s.parse().map_err(|e: easel_diffusion::Error| e.to_string())
}

/// The CLI's engine: models resolved as `offline` says (with download
/// progress on stderr), and by name in `model_dirs` (`--models-dir`), kept
/// for the life of the process; `random_weights` synthesises the weights
/// (benchmarks); `device` is where the models compute; `quantization` quantizes the large components as they
/// load.
pub fn local_engine(
    offline: bool,
    random_weights: bool,
    quantization: Option<Quantization>,
    offload_t5: bool,
    model_dirs: Vec<PathBuf>,
    device: Device,
) -> Engine {
    Engine::new(EngineOptions {
        resolve: ResolveOptions {
            offline,
            progress: true,
            model_dirs,
            ..ResolveOptions::default()
        },
        random_weights,
        quantization,
        offload_t5,
        device,
        ..EngineOptions::default()
    })
}

/// The engine of `easel generate` and the reference of its model:
/// --config / --prediction-type become the settings of the single-file
/// --model (a path, or a file name in the --models-dir model folders), and
/// the component files (--vae, ...) are registered with it
/// ([`Engine::register_component_files`]), so the model resolves through
/// the engine's front door with all of them.
fn generate_engine(args: &GenerateArgs) -> Result<(Engine, String)> {
    let device = args.device.open()?;
    let mut engine = local_engine(
        args.offline,
        false,
        args.quantize,
        args.offload_t5,
        args.models_dirs.clone(),
        device.clone(),
    );
    let mut model = args.model.clone();
    if args.config.is_some() || args.prediction_type.is_some() {
        let mut options = ResolveOptions {
            offline: args.offline,
            progress: true,
            model_dirs: args.models_dirs.clone(),
            ..ResolveOptions::default()
        };
        let by_name = if Path::new(&args.model).exists() {
            None
        } else {
            easel_diffusion::loader::model_file_by_name(&args.model, &options)?
        };
        let file = by_name.unwrap_or_else(|| PathBuf::from(&args.model));
        if !file.is_file() {
            bail!(
                "--config and --prediction-type apply to a single-file checkpoint; --model `{}` \
                 is not a file{}",
                args.model,
                if args.models_dirs.is_empty() {
                    ""
                } else {
                    " nor the name of one in the --models-dir model folders"
                }
            );
        }
        model = file.display().to_string();
        options
            .single_files
            .push(easel_diffusion::loader::SingleFileSettings {
                file,
                config: args.config.clone(),
                prediction_type: args.prediction_type.clone(),
            });
        engine = Engine::new(EngineOptions {
            resolve: options,
            quantization: args.quantize,
            offload_t5: args.offload_t5,
            device,
            ..EngineOptions::default()
        });
    }
    let key = engine.register_component_files(&model, args.components.files());
    Ok((engine, key))
}

/// A size rounded to the model family's multiple (FLUX: 16), with a
/// notice on stderr (unless `quiet`) when it changes.
fn round_size(family: ModelFamily, field: &str, value: u32, quiet: bool) -> u32 {
    match family.round_size(value) {
        Some(r) => {
            if !quiet {
                eprintln!(
                    "note: this model needs multiples of {}: --{field} {value} rounded to {r}",
                    family.size_multiple()
                );
            }
            r
        }
        None => value,
    }
}

#[derive(Serialize)]
struct JsonImage {
    path: PathBuf,
    seed: u64,
    width: u32,
    height: u32,
    format: OutputFormat,
}

#[derive(Serialize)]
struct JsonTimings {
    load_s: f64,
    text_encoding_s: f64,
    denoising_s: f64,
    step_s: Vec<f64>,
    vae_decode_s: f64,
    encode_and_write_s: f64,
    total_s: f64,
}

#[derive(Serialize)]
struct JsonLora {
    path: PathBuf,
    scale: f64,
}

#[derive(Serialize)]
struct JsonResult {
    model: String,
    model_path: PathBuf,
    pipeline: String,
    scheduler: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: u32,
    guidance_scale: f64,
    width: u32,
    height: u32,
    /// `text-to-image`, `image-to-image` or `inpainting`.
    task: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    strength: Option<f64>,
    loras: Vec<JsonLora>,
    device: &'static str,
    precision: &'static str,
    images: Vec<JsonImage>,
    warnings: Vec<String>,
    timings: JsonTimings,
}

/// Check that `dir` exists and that a file can be created in it, before
/// any model is loaded.
fn check_writable_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if !dir.is_dir() {
        bail!(
            "output directory {} does not exist (create it, or choose another --output/--output-dir)",
            dir.display()
        );
    }
    tempfile::NamedTempFile::new_in(dir).with_context(|| {
        format!(
            "output directory {} is not writable (choose another --output/--output-dir)",
            dir.display()
        )
    })?;
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let started = Instant::now();
    // Validate everything that doesn't need the model before loading it.
    let params = GenerationParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        base_model: Some(args.model.clone()),
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        width: args.width,
        height: args.height,
        seed: args.seed,
        batch_size: Some(args.batch_size),
        scheduler: args.scheduler.clone(),
        output_format: args.format,
        output_quality: Some(args.quality),
        precision: args.precision,
    };
    // Sizes are checked against the model family's multiple once the model
    // is resolved (FLUX rounds them to 16); everything else now.
    params
        .validate_with(&ValidateOptions::default().size_multiple(1))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Without --format, the format follows --output's extension; png otherwise.
    let no_extension = args.output.as_ref().is_none_or(|p| p.extension().is_none());
    let format = if args.format.is_none() && no_extension {
        OutputFormat::Png
    } else {
        resolve_output_format(args.format, args.output.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let target = match (&args.output, &args.output_dir) {
        (Some(file), _) => OutputTarget::File(file.clone()),
        (None, Some(dir)) => OutputTarget::Dir(dir.clone()),
        (None, None) => OutputTarget::Dir(PathBuf::from(".")),
    };
    match &target {
        OutputTarget::File(f) => check_writable_dir(f.parent().unwrap_or(Path::new(".")))?,
        OutputTarget::Dir(d) => check_writable_dir(d)?,
    }
    if let Some(name) = &args.scheduler {
        resolve_scheduler_name(name)?;
    }
    if let Some(s) = args.strength {
        if args.image.is_none() {
            bail!("strength: applies to image-to-image and inpainting; give --image too");
        }
        if !s.is_finite() || !(0.0..=1.0).contains(&s) {
            bail!("strength: {s} is out of range (allowed: 0 to 1)");
        }
    }
    // Inputs are read and checked before the model is loaded.
    let inputs = match &args.image {
        Some(image) => {
            let (image, mask, had_alpha) = load_image_and_mask(image, args.mask.as_deref())?;
            if had_alpha && args.mask.as_deref() != Some("alpha") && !args.json {
                eprintln!("note: the init image's transparent pixels were composited on white (--mask alpha repaints them instead)");
            }
            Some((image, mask))
        }
        None => None,
    };
    let loras = resolve_loras(&args.loras, args.offline, &args.models_dirs)?;

    if let Some(n) = args.max_sequence_length {
        if !(1..=512).contains(&n) {
            bail!("max_sequence_length: {n} is out of range (allowed: 1 to 512)");
        }
    }

    let load_start = Instant::now();
    let (mut engine, model_key) = generate_engine(&args)?;
    engine.set_vae_tiling(args.vae_tiling);
    engine.set_offload(args.offload);
    let dir = engine.resolve(&model_key)?;
    let quiet = args.json;
    // A family that rounds sizes (FLUX, to multiples of 16) does so with a
    // notice; the others take multiples of 8 and refuse anything else.
    let (arg_width, arg_height) = match dir.family() {
        Some(family) if family.rounds_sizes() => (
            args.width.map(|w| round_size(family, "width", w, quiet)),
            args.height.map(|h| round_size(family, "height", h, quiet)),
        ),
        _ => {
            params.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            (args.width, args.height)
        }
    };
    let model_path = dir.path().to_path_buf();
    let model = engine
        .load_resolved(&model_key, dir)
        .with_context(|| format!("loading model {}", model_path.display()))?;
    let load_time = load_start.elapsed();
    let job = JobRequest {
        model: model_key.clone(),
        params: GenerationParams {
            width: arg_width,
            height: arg_height,
            ..params.clone()
        },
        image: inputs.as_ref().map(|i| i.0.clone()),
        mask: inputs.as_ref().and_then(|i| i.1.clone()),
        strength: args.strength,
        loras: loras.clone(),
        max_sequence_length: args.max_sequence_length,
        tiling: args.tiling,
    }
    .build(model.defaults())
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (width, height, steps) = (
        job.request.width as u32,
        job.request.height as u32,
        job.request.num_inference_steps as u32,
    );
    let (guidance_scale, seed) = (job.request.guidance_scale, job.seeds[0]);
    let paths =
        output_paths(&target, job.seeds.len(), format, seed).map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut extra: std::collections::BTreeMap<String, String> =
        [("easel".to_string(), env!("CARGO_PKG_VERSION").to_string())].into();
    if job.request.image.is_some() {
        extra.insert(
            "Denoising strength".into(),
            job.request.strength.to_string(),
        );
    }
    if let Some(n) = args.max_sequence_length {
        extra.insert("max_sequence_length".into(), n.to_string());
    }
    // The component files by name, as A1111 writes `VAE: name`.
    for (component, file) in args.components.files().iter() {
        let label = match component {
            "vae" => "VAE",
            "unet" => "UNet",
            "transformer" => "Transformer",
            "text_encoder" => "Text encoder",
            _ => "Text encoder 2",
        };
        let name = file.file_name().unwrap_or(file.as_os_str());
        extra.insert(label.into(), name.to_string_lossy().into_owned());
    }
    if !loras.is_empty() {
        let list: Vec<String> = loras
            .iter()
            .map(|l| format!("{}:{}", l.path.display(), l.scale))
            .collect();
        extra.insert("Lora".into(), list.join(" "));
    }

    // Ctrl-C cancels at the next step; nothing is written for a canceled job.
    let cancel = CancelToken::new();
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || cancel.cancel());
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] step {pos}/{len} {elapsed} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message("encoding prompt");
    let mut on_progress = |p: Progress| match p {
        Progress::PromptEncoded => bar.set_message("denoising"),
        Progress::Step { step, total } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            if step == total {
                bar.set_message("decoding");
            }
        }
        Progress::Decoded => bar.set_message("done"),
    };
    let output = match engine.run(&job, &mut on_progress, &cancel) {
        Ok(o) => o,
        Err(EngineError::Canceled) => {
            bar.abandon_with_message("canceled");
            eprintln!("canceled: no image was written");
            return Ok(ExitCode::from(130));
        }
        Err(e) => {
            bar.abandon();
            return Err(e.into());
        }
    };
    bar.finish_and_clear();
    let resolved = &output.params;
    for w in &resolved.warnings {
        eprintln!("warning: {w}");
    }

    let t_write = Instant::now();
    let mut written = Vec::new();
    for ((pixels, path), &image_seed) in output.images.iter().zip(&paths).zip(&resolved.seeds) {
        let metadata = ImageMetadata {
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            steps,
            scheduler: resolved.scheduler.clone(),
            sigma_schedule: resolved.sigma_schedule.clone(),
            guidance_scale,
            seed: image_seed,
            width,
            height,
            model: args.model.clone(),
            extra: extra.clone(),
        };
        let image = RgbImageRef::new(width, height, pixels).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bytes = encode_image(&image, format, args.quality as u8, &metadata)
            .map_err(|e| anyhow::anyhow!("encoding {}: {e}", path.display()))?;
        write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        written.push(JsonImage {
            path: path.clone(),
            seed: image_seed,
            width,
            height,
            format,
        });
    }
    let t = &output.timings;
    let timings = JsonTimings {
        load_s: load_time.as_secs_f64(),
        text_encoding_s: t.text_encoding.as_secs_f64(),
        denoising_s: t.denoising.as_secs_f64(),
        step_s: t.steps.iter().map(Duration::as_secs_f64).collect(),
        vae_decode_s: t.vae_decode.as_secs_f64(),
        encode_and_write_s: t_write.elapsed().as_secs_f64(),
        total_s: started.elapsed().as_secs_f64(),
    };
    if args.json {
        let result = JsonResult {
            model: args.model.clone(),
            model_path,
            pipeline: resolved.pipeline.clone(),
            scheduler: resolved.scheduler.clone(),
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            steps,
            guidance_scale,
            width,
            height,
            task: resolved.task.as_str(),
            strength: resolved.strength,
            loras: resolved
                .loras
                .iter()
                .map(|l| JsonLora {
                    path: l.path.clone(),
                    scale: l.scale,
                })
                .collect(),
            device: "cpu",
            precision: resolved.compute_precision.as_str(),
            images: written,
            warnings: resolved.warnings.clone(),
            timings,
        };
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        for img in &written {
            println!("{} (seed {})", img.path.display(), img.seed);
        }
        let per_step = if t.steps.is_empty() {
            0.0
        } else {
            timings.denoising_s / t.steps.len() as f64
        };
        eprintln!(
            "{} {}x{}, {} steps ({}), guidance {}: load {:.2}s, text {:.2}s, denoise {:.2}s ({:.3}s/step), decode {:.2}s, total {:.2}s",
            resolved.pipeline,
            width,
            height,
            steps,
            resolved.scheduler,
            guidance_scale,
            timings.load_s,
            timings.text_encoding_s,
            timings.denoising_s,
            per_step,
            timings.vae_decode_s,
            timings.total_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
