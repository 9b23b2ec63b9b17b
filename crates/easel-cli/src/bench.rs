//! `easel bench`: time each stage of a generation and report peak memory.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use easel_diffusion::noise::PerImageGenerators;
use easel_diffusion::pipelines::{CancelToken, GenerationRequest, RunContext};

use crate::generate::{load_model, parse_bool_env};

/// Arguments of `easel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A local diffusers directory or a Hugging Face repo id.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Width in pixels [default: the model's native size].
    #[arg(long, short = 'W')]
    pub width: Option<usize>,
    /// Height in pixels [default: the model's native size].
    #[arg(long, short = 'H')]
    pub height: Option<usize>,
    /// Denoising steps per run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Guidance scale (above 1: two UNet passes per step).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Scheduler [default: the model's].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Timed runs after one warm-up run; the table shows the fastest.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// The prompt (its length changes nothing: CLIP always encodes 77 tokens).
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    /// Never download: use only models already on disk.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_bool_env)]
    pub offline: bool,
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Row {
    text: Duration,
    step: Duration,
    denoise: Duration,
    decode: Duration,
    total: Duration,
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let model = load_model(&args.model, args.offline)?;
    let (w, h) = model.pipeline.default_size();
    let request = GenerationRequest {
        prompts: vec![args.prompt.clone()],
        negative_prompts: vec![],
        num_images_per_prompt: args.batch_size,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        width: args.width.unwrap_or(w),
        height: args.height.unwrap_or(h),
        scheduler: args.scheduler.clone(),
        ..Default::default()
    };
    let seeds: Vec<u64> = (0..args.batch_size as u64).collect();
    let mut rows = Vec::new();
    for run in 0..=args.runs {
        let mut noise = PerImageGenerators::new(&seeds);
        let mut progress = |_| {};
        let mut ctx = RunContext {
            noise: &mut noise,
            progress: &mut progress,
            cancel: CancelToken::new(),
        };
        let out = model.pipeline.run(&request, &mut ctx)?;
        let t = out.timings;
        let label = if run == 0 { "warm-up" } else { "run" };
        eprintln!("{label} {run}: {:.2}s", t.total.as_secs_f64());
        if run > 0 || args.runs == 0 {
            let n = t.steps.len().max(1) as u32;
            rows.push(Row {
                text: t.text_encoding,
                step: t.denoising / n,
                denoise: t.denoising,
                decode: t.vae_decode,
                total: t.total,
            });
        }
    }
    let best = rows
        .iter()
        .min_by_key(|r| r.total)
        .expect("at least one run");
    let guided = args.guidance_scale > 1.0;
    println!(
        "model: {} ({}), {}x{}, {} steps, batch {}, guidance {} ({} UNet pass{} per step), device cpu, f32",
        args.model,
        model.pipeline.class_name(),
        request.width,
        request.height,
        args.steps,
        args.batch_size,
        args.guidance_scale,
        if guided { 2 } else { 1 },
        if guided { "es" } else { "" },
    );
    println!("| stage | seconds |");
    println!("| --- | --- |");
    println!("| model load | {:.3} |", model.load_time.as_secs_f64());
    println!("| text encoding | {:.3} |", best.text.as_secs_f64());
    println!("| denoising step (mean) | {:.3} |", best.step.as_secs_f64());
    println!(
        "| denoising ({} steps) | {:.3} |",
        args.steps,
        best.denoise.as_secs_f64()
    );
    println!("| VAE decode | {:.3} |", best.decode.as_secs_f64());
    println!("| total | {:.3} |", best.total.as_secs_f64());
    match peak_rss_bytes() {
        Some(b) => println!("| peak RSS | {:.2} GiB |", b as f64 / (1u64 << 30) as f64),
        None => println!("| peak RSS | unavailable |"),
    }
    Ok(ExitCode::SUCCESS)
}
