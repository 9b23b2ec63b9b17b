//! `easel bench`: time each stage of a generation and report peak memory.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use candle_core::DType;
use clap::Args;
use easel_core::params::Precision;
use easel_core::GenerationParams;
use easel_diffusion::engine::JobRequest;
use easel_diffusion::models::layers::{
    half_precision_paths, measure_bf16_gemm_gflops, measure_matmul_gflops, profile, PROFILE_KINDS,
};
use easel_diffusion::pipelines::{CancelToken, Progress};

use crate::component_args::ComponentArgs;
use crate::device_args::DeviceArgs;
use crate::generate::{
    local_engine, parse_bool_env, parse_offload, parse_quantization, parse_vae_tiling,
};
use easel_diffusion::device::Offload;
use easel_diffusion::models::quantize::Quantization;
use easel_diffusion::models::vae_tiling::VaeTiling;

/// Arguments of `easel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A local diffusers directory, a single-file checkpoint or a Hugging
    /// Face repo id.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Component files replacing components of --model.
    #[command(flatten)]
    pub components: ComponentArgs,
    /// Where the models compute (printed with the results).
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Width in pixels [default: the model's native size].
    #[arg(long, short = 'W')]
    pub width: Option<usize>,
    /// Height in pixels [default: the model's native size].
    #[arg(long, short = 'H')]
    pub height: Option<usize>,
    /// Denoising steps per run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Guidance scale (Stable Diffusion: above 1 runs two UNet passes per step;
    /// FLUX embeds it, one transformer pass) [default: the model's: 7.5 for
    /// Stable Diffusion, FLUX.1 schnell 0, dev 3.5, Fill 30].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Scheduler [default: the model's].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Timed runs after one warm-up run; the table shows the fastest.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// The prompt (its length changes nothing: CLIP always encodes 77 tokens, T5
    /// its `max_sequence_length`).
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    /// Never download: use only models already on disk.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_bool_env)]
    pub offline: bool,
    /// Synthesise every weight (f16, random values of the right shapes) instead of
    /// reading weight files: benchmarks real-size architectures from their configs alone.
    #[arg(long)]
    pub random_weights: bool,
    /// Quantize the UNet / transformer (and FLUX's T5) as they load, as
    /// `easel generate --quantize`: q8_0, q4_0 or fp8.
    #[arg(long, value_name = "q8_0|q4_0|fp8", value_parser = parse_quantization)]
    pub quantize: Option<Quantization>,
    /// FLUX: load T5 per prompt encoding and free it after, as `easel
    /// generate --offload-t5`.
    #[arg(long)]
    pub offload_t5: bool,
    /// When the VAE decodes in tiles, as `easel generate --vae-tiling`:
    /// auto, on or off.
    #[arg(long, value_name = "auto|on|off", default_value = "auto", value_parser = parse_vae_tiling)]
    pub vae_tiling: VaeTiling,
    /// Where the weights live between uses (as `easel generate --offload`).
    #[arg(long, value_name = "none|model|sequential", default_value = "none", value_parser = parse_offload)]
    pub offload: Offload,
    /// Skip measuring the machine's matrix-product peaks.
    #[arg(long)]
    pub no_peak: bool,
    /// Compute precision: fp32, fp16 or bf16 [default: fp32 on the CPU; on a
    /// GPU the model's: bf16 for FLUX, fp16 for Stable Diffusion]. On the
    /// CPU, bf16 computes on the AVX512-BF16 kernels where the CPU has them;
    /// fp16 (and bf16 elsewhere) gives a half-precision run's numbers (each
    /// layer rounds its output) with f32 arithmetic: not faster.
    #[arg(long, value_name = "fp32|fp16|bf16")]
    pub precision: Option<Precision>,
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident set size of this process now (`VmRSS`), in bytes.
fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset this process's peak resident set size to its current one (Linux:
/// writing `5` to `/proc/self/clear_refs`, see proc(5)), so the next
/// [`peak_rss_bytes`] is the peak since now. `false` where the kernel does
/// not allow it (then per-stage peaks are not reported).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak RSS during each stage of the last run and RSS at its end, in bytes
/// (`None`: not measured).
#[derive(Debug, Default, Clone, Copy)]
struct StagePeaks {
    load: (Option<u64>, Option<u64>),
    text_encoding: (Option<u64>, Option<u64>),
    denoising: (Option<u64>, Option<u64>),
    decode: (Option<u64>, Option<u64>),
}

/// The last run's layer-kind seconds ([`PROFILE_KINDS`] order) in
/// denoising and in the decode, those stages' wall times and its model
/// calls, for `EASEL_PROFILE=1`.
#[derive(Debug, Default)]
struct StageProfile {
    denoise: Vec<f64>,
    decode: Vec<f64>,
    denoise_wall: Duration,
    decode_wall: Duration,
    calls: usize,
}

impl StageProfile {
    /// Print the table: seconds per `denoiser` call and per decode, by
    /// layer kind, and what no kind covers. Nothing when a mark is missing.
    fn print(&self, denoiser: &str) {
        let n = PROFILE_KINDS.len();
        if self.denoise.len() != n || self.decode.len() != n {
            return;
        }
        println!();
        println!("| layer kind (last run) | per {denoiser} call, s | VAE decode, s |");
        println!("| --- | --- | --- |");
        let per_call = |s: f64| s / self.calls.max(1) as f64;
        for (i, kind) in PROFILE_KINDS.iter().enumerate() {
            println!(
                "| {kind} | {:.3} | {:.3} |",
                per_call(self.denoise[i]),
                self.decode[i]
            );
        }
        // What no layer kind covers: element-wise ops outside the kernels,
        // layer norms, layout copies, dtype conversions, the scheduler.
        println!(
            "| everything else | {:.3} | {:.3} |",
            per_call(self.denoise_wall.as_secs_f64() - self.denoise.iter().sum::<f64>()),
            self.decode_wall.as_secs_f64() - self.decode.iter().sum::<f64>()
        );
    }
}

/// Records the peak RSS of each stage from the pipeline's progress events:
/// the peak is read and reset when the prompt is encoded, when the last
/// step ends and when the latents are decoded.
struct StagePeakMeter {
    enabled: bool,
    peaks: StagePeaks,
    /// The layer-kind seconds ([`easel_diffusion::models::layers::profile`])
    /// at the start of denoising, at its end and at the end of the decode.
    profile_marks: [Vec<f64>; 3],
}

impl StagePeakMeter {
    fn start(load: (Option<u64>, Option<u64>)) -> Self {
        let enabled = reset_peak_rss();
        Self {
            enabled,
            peaks: StagePeaks {
                load,
                ..StagePeaks::default()
            },
            profile_marks: Default::default(),
        }
    }

    /// Record the layer-kind seconds so far as mark `i`.
    fn mark_profile(&mut self, i: usize) {
        self.profile_marks[i] = profile().into_iter().map(|(_, s)| s).collect();
    }

    /// Seconds per layer kind between marks `from` and `to` (empty when a
    /// mark is missing).
    fn profile_between(&self, from: usize, to: usize) -> Vec<f64> {
        let (a, b) = (&self.profile_marks[from], &self.profile_marks[to]);
        if a.len() != b.len() {
            return Vec::new();
        }
        a.iter().zip(b).map(|(a, b)| b - a).collect()
    }

    fn take(&self) -> (Option<u64>, Option<u64>) {
        if !self.enabled {
            return (None, None);
        }
        let peak = peak_rss_bytes();
        reset_peak_rss();
        (peak, rss_bytes())
    }

    fn on_progress(&mut self, progress: &Progress) {
        match *progress {
            Progress::PromptEncoded => {
                self.peaks.text_encoding = self.take();
                self.mark_profile(0);
            }
            Progress::Step { step, total } if step == total => {
                self.peaks.denoising = self.take();
                self.mark_profile(1);
            }
            Progress::Decoded => {
                self.peaks.decode = self.take();
                self.mark_profile(2);
            }
            Progress::Step { .. } => {}
        }
    }
}

/// The CPU's model name and the instruction sets among those that matter
/// to the kernels (`/proc/cpuinfo`'s first processor; `None` elsewhere).
fn cpu_description() -> Option<(String, Vec<&'static str>)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let has: Vec<&str> = flags.split_whitespace().collect();
    let sets = [
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("f16c", "F16C"),
        ("avx512f", "AVX-512F"),
        ("avx512_vnni", "AVX512-VNNI"),
        ("avx512_bf16", "AVX512-BF16"),
        ("avx_vnni", "AVX-VNNI"),
        ("amx_tile", "AMX-TILE"),
        ("amx_bf16", "AMX-BF16"),
        ("amx_int8", "AMX-INT8"),
    ]
    .into_iter()
    .filter(|(flag, _)| has.contains(flag))
    .map(|(_, name)| name)
    .collect();
    Some((model, sets))
}

/// The instruction set the f32 matrix products run on: the `gemm` crate's
/// micro-kernels, chosen at run time.
fn f32_kernel_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512F";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "AVX2 + FMA";
        }
        "SSE2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable"
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

struct Row {
    text: Duration,
    step: Duration,
    call: Duration,
    flops_per_call: f64,
    denoise: Duration,
    decode: Duration,
    total: Duration,
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let device = args.device.open()?;
    let device_name = easel_diffusion::device::device_name(&device);
    let mut engine = local_engine(
        args.offline,
        args.random_weights,
        args.quantize,
        args.offload_t5,
        Vec::new(),
        device,
    )
    .with_half_precision_on_cpu(true);
    engine.set_vae_tiling(args.vae_tiling);
    engine.set_offload(args.offload);
    let model_key = engine.register_component_files(&args.model, args.components.files());
    let model = engine.load_for(&model_key, args.precision)?;
    let compute = easel_diffusion::engine::precision::precision_of(model.compute_dtype());
    let load_time = model.load_time();
    let load_peak = (peak_rss_bytes(), rss_bytes());
    let defaults = model.defaults().clone();
    let family = defaults.family;
    let job = JobRequest::new(
        model_key.clone(),
        GenerationParams {
            steps: Some(args.steps as u32),
            guidance_scale: args.guidance_scale,
            width: args.width.map(|w| w as u32),
            height: args.height.map(|h| h as u32),
            seed: Some(0),
            batch_size: Some(args.batch_size as u32),
            scheduler: args.scheduler.clone(),
            precision: args.precision,
            ..GenerationParams::new(args.prompt.clone())
        },
    )
    .build(&defaults)?;
    let guidance_scale = job.request.guidance_scale;
    let mut rows = Vec::new();
    let mut stage_peaks = StagePeaks::default();
    let mut stage_profile = StageProfile::default();
    let mut overall_peak = load_peak.0;
    // The most non-finite latent values of any run (0: every output finite).
    let mut non_finite = 0usize;
    // The last run's warnings (a VAE decode that `auto` tiled says so).
    let mut warnings = Vec::new();
    let paths_before = half_precision_paths();
    for run in 0..=args.runs {
        let mut meter = StagePeakMeter::start(load_peak);
        let out = engine.run(&job, &mut |p| meter.on_progress(&p), &CancelToken::new())?;
        stage_peaks = meter.peaks;
        stage_profile = StageProfile {
            denoise: meter.profile_between(0, 1),
            decode: meter.profile_between(1, 2),
            denoise_wall: out.timings.denoising,
            decode_wall: out.timings.vae_decode,
            calls: out.timings.model_calls.len().max(1),
        };
        for p in [
            stage_peaks.text_encoding.0,
            stage_peaks.denoising.0,
            stage_peaks.decode.0,
            peak_rss_bytes(),
        ]
        .into_iter()
        .flatten()
        {
            overall_peak = Some(overall_peak.map_or(p, |o| o.max(p)));
        }
        non_finite = non_finite.max(out.non_finite_latents);
        warnings = out.params.warnings.clone();
        let t = out.timings;
        let label = if run == 0 { "warm-up" } else { "run" };
        eprintln!("{label} {run}: {:.2}s", t.total.as_secs_f64());
        if run > 0 || args.runs == 0 {
            let n = t.steps.len().max(1) as u32;
            let calls = t.model_calls.len().max(1);
            rows.push(Row {
                text: t.text_encoding,
                step: t.denoising / n,
                call: t.model_calls.iter().sum::<Duration>() / calls as u32,
                flops_per_call: t.model_flops as f64 / calls as f64,
                denoise: t.denoising,
                decode: t.vae_decode,
                total: t.total,
            });
        }
    }
    let paths_after = half_precision_paths();
    let (bf16_layers, widened_layers) = (
        paths_after.0 - paths_before.0,
        paths_after.1 - paths_before.1,
    );
    let best = rows
        .iter()
        .min_by_key(|r| r.total)
        .expect("at least one run");
    // FLUX embeds the guidance scale: one transformer pass per step.
    let guided = guidance_scale > 1.0 && family.takes_negative_prompt();
    println!(
        "model: {} ({}), {}x{}, {} steps, batch {}, guidance {} ({} {} pass{} per step), device {}, {compute}",
        args.model,
        defaults.pipeline,
        job.request.width,
        job.request.height,
        args.steps,
        args.batch_size,
        guidance_scale,
        if guided { 2 } else { 1 },
        family.denoiser_name(),
        if guided { "es" } else { "" },
        device_name,
    );
    println!("vae tiling: {}, offload: {}", args.vae_tiling, args.offload);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    println!("| stage | seconds |");
    println!("| --- | --- |");
    println!("| model load | {:.3} |", load_time.as_secs_f64());
    println!("| text encoding | {:.3} |", best.text.as_secs_f64());
    println!("| denoising step (mean) | {:.3} |", best.step.as_secs_f64());
    println!(
        "| {} call (mean; {:.3} TFLOP) | {:.3} |",
        family.denoiser_name(),
        best.flops_per_call / 1e12,
        best.call.as_secs_f64()
    );
    println!(
        "| denoising ({} steps) | {:.3} |",
        args.steps,
        best.denoise.as_secs_f64()
    );
    println!("| VAE decode | {:.3} |", best.decode.as_secs_f64());
    println!("| total | {:.3} |", best.total.as_secs_f64());
    match overall_peak {
        Some(b) => println!("| peak RSS | {:.2} GiB |", gib(b)),
        None => println!("| peak RSS | unavailable |"),
    }
    if stage_peaks.text_encoding.0.is_some() {
        println!();
        println!("| stage (last run) | peak RSS, GiB | RSS at its end, GiB |");
        println!("| --- | --- | --- |");
        let show =
            |b: Option<u64>| b.map_or("unavailable".to_string(), |b| format!("{:.2}", gib(b)));
        for (stage, (peak, end)) in [
            ("model load", stage_peaks.load),
            ("text encoding", stage_peaks.text_encoding),
            ("denoising", stage_peaks.denoising),
            ("VAE decode", stage_peaks.decode),
        ] {
            println!("| {stage} | {} | {} |", show(peak), show(end));
        }
    }
    if std::env::var_os("EASEL_PROFILE").is_some() {
        stage_profile.print(family.denoiser_name());
    }
    let effective = best.flops_per_call / best.call.as_secs_f64() / 1e9;
    println!();
    println!("| throughput | GFLOP/s |");
    println!("| --- | --- |");
    println!("| {} effective | {effective:.1} |", family.denoiser_name());
    if !args.no_peak {
        match measure_matmul_gflops(DType::F32, 2048, 3) {
            Ok(peak) => println!(
                "| machine f32 matmul peak (2048³, {}) | {peak:.1} ({:.0} % used by the {}) |",
                f32_kernel_isa(),
                100.0 * effective / peak,
                family.denoiser_name()
            ),
            Err(e) => println!("| machine f32 matmul peak | unavailable: {e} |"),
        }
        // The bf16 peak of the kernel bf16 layers run on: the engine's
        // AVX512-BF16 kernel where the CPU has it, else candle's bf16
        // matmul, which widens to f32 (not the CPU's bf16 instructions).
        let bf16_peak = if easel_diffusion::models::kernels::bf16_gemm_available()
            && easel_diffusion::models::kernels::enabled()
            && easel_diffusion::models::kernels::bf16_enabled()
        {
            measure_bf16_gemm_gflops(2048, 3)
                .map(|p| (p, "AVX512-BF16 vdpbf16ps, f32 accumulation"))
        } else {
            measure_matmul_gflops(DType::BF16, 2048, 3)
                .map(|p| (p, "candle's widening matmul (no bf16 instructions)"))
        };
        match bf16_peak {
            Ok((peak, kernel)) if compute == Precision::Bf16 => println!(
                "| machine bf16 matmul peak (2048³, {kernel}) | {peak:.1} ({:.0} % used by the {}) |",
                100.0 * effective / peak,
                family.denoiser_name()
            ),
            Ok((peak, kernel)) => println!("| machine bf16 matmul peak (2048³, {kernel}) | {peak:.1} |"),
            Err(e) => println!("| machine bf16 matmul peak | unavailable: {e} |"),
        }
    }
    println!();
    match cpu_description() {
        Some((model, sets)) => {
            println!(
                "cpu: {model}; {} threads",
                easel_diffusion::models::kernels::num_threads()
            );
            println!("instruction sets: {}", sets.join(", "));
        }
        None => println!(
            "cpu: unknown; {} threads",
            easel_diffusion::models::kernels::num_threads()
        ),
    }
    if compute == Precision::Fp32 {
        let kernels = if easel_diffusion::models::kernels::f32_gemm_native() {
            "easel's GEMM for linear layers and attention, the gemm crate for convolutions; \
             linear weights widened from their stored type while packed, convolution weights \
             per layer"
        } else {
            "the gemm crate; weights widened per layer from their stored type"
        };
        println!(
            "computed: f32 (matrix products on {}: {kernels})",
            f32_kernel_isa()
        );
    } else {
        if bf16_layers > 0 {
            println!(
                "computed: {compute} with {compute} arithmetic: {bf16_layers} linear / convolution / \
                 attention calls ran on the AVX512-BF16 kernels (vdpbf16ps, f32 accumulation, \
                 output rounded to {compute}); norms and the rest widen to f32"
            );
        }
        if widened_layers > 0 || bf16_layers == 0 {
            println!(
                "computed: {widened_layers} linear / convolution / attention calls with {compute} numbers \
                 and f32 arithmetic: each widens its {compute} input, accumulates in f32 on {} and \
                 rounds its output to {compute} (no {compute} instructions used)",
                f32_kernel_isa()
            );
        }
    }
    if non_finite == 0 {
        println!("outputs: finite (every run's final latents)");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "outputs: NOT FINITE ({non_finite} NaN or infinite values in a run's final latents): \
             the timings above are of a broken run"
        );
        Ok(ExitCode::FAILURE)
    }
}
