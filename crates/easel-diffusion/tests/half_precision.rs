//! Half-precision compute (`ModelDir::with_compute_dtype`): the fixture
//! cases in bf16 and in f16 stay within a documented distance of the same
//! cases in f32, measured on the 8-bit images a user gets.
//!
//! On the CPU a half-precision model holds its weights and activations in
//! f16 / bf16 and each layer rounds its output to that dtype, accumulating
//! in f32 (`models::layers`: the numbers of a half-precision GEMM with f32
//! accumulation, as oneDNN and cuBLAS compute); the latents and schedulers
//! stay f32 between model calls, and the SDXL VAE upcasts f16 to f32 as
//! diffusers' pipeline does. The tolerances below are the measured
//! differences (docs/PERFORMANCE.md, "Half precision") with a margin; the
//! fixture models are tiny random networks, whose images are noise-like
//! textures, so these are bounds on numerical drift, not on how a real
//! image looks.
//!
//! The peer's own drift on the same cases (diffusers 0.42.1 / PyTorch
//! 2.15 on the CPU, bf16 against f32, `tools/bf16_drift_diffusers.py`),
//! max / mean levels: sd15_txt2img_euler 9 / 1.16, sd15_img2img_ddim
//! 33 / 3.55, sdxl_txt2img_euler 6 / 0.85, flux_schnell_txt2img 7 / 0.69,
//! flux_dev_txt2img 10 / 1.35, flux_fill_inpaint 24 / 2.81. The bf16
//! bounds below stay within about 1.5 times those.

mod common;

use candle_core::DType;
use common::cases::run_case;
use common::*;
use easel_diffusion::loader::ModelDir;
use easel_diffusion::output::images_to_rgb8;
use easel_diffusion::pipelines::load_pipeline;

/// `(max, mean)` absolute difference between two 8-bit image batches, in
/// levels.
fn levels(a: &[Vec<u8>], b: &[Vec<u8>]) -> (u8, f64) {
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0u64);
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (&p, &q) in x.iter().zip(y) {
            let d = p.abs_diff(q);
            max = max.max(d);
            sum += d as u64;
            n += 1;
        }
    }
    (max, sum as f64 / n.max(1) as f64)
}

/// Run reference case `name` in f32 and in `dtype` on the CPU and return
/// the 8-bit distance between their images.
fn distance(name: &str, dtype: DType) -> (u8, f64) {
    let case: serde_json::Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join("references").join(format!("{name}.json")))
            .unwrap(),
    )
    .unwrap();
    let dir = ModelDir::open(fixtures().join(case["model"].as_str().unwrap())).unwrap();
    let run = |dt: DType| {
        let p = load_pipeline(
            &dir.clone().with_compute_dtype(dt),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (_, images, _) = run_case(&p, "references", name, None);
        images_to_rgb8(&images).unwrap()
    };
    let (max, mean) = levels(&run(dtype), &run(DType::F32));
    eprintln!("{name} {dtype:?}: max {max} levels, mean {mean:.3} levels from f32");
    (max, mean)
}

/// Assert the documented bounds `(max, mean)` in 8-bit levels.
fn check(name: &str, dtype: DType, max_bound: u8, mean_bound: f64) {
    let (max, mean) = distance(name, dtype);
    assert!(
        max <= max_bound && mean <= mean_bound,
        "{name} in {dtype:?}: max {max} levels (bound {max_bound}), mean {mean:.3} (bound {mean_bound})"
    );
    assert!(
        max > 0,
        "{name} in {dtype:?} equals f32 exactly: half precision did not run"
    );
}

#[test]
fn sd15_in_fp16_and_bf16() {
    check("sd15_txt2img_euler", DType::F16, 2, 0.25);
    check("sd15_txt2img_euler", DType::BF16, 14, 1.5);
    check("sd15_img2img_ddim", DType::F16, 6, 0.6);
    check("sd15_img2img_ddim", DType::BF16, 45, 4.5);
}

#[test]
fn sdxl_in_fp16_and_bf16() {
    check("sdxl_txt2img_euler", DType::F16, 2, 0.2);
    check("sdxl_txt2img_euler", DType::BF16, 9, 1.0);
}

#[test]
fn flux_in_bf16_and_fp16() {
    check("flux_schnell_txt2img", DType::BF16, 8, 0.8);
    check("flux_dev_txt2img", DType::BF16, 8, 0.8);
    check("flux_dev_txt2img", DType::F16, 2, 0.15);
    check("flux_fill_inpaint", DType::BF16, 8, 0.8);
}

/// The SDXL VAE computes in f32 when the model computes in f16 and its
/// config sets `force_upcast` (the SDXL VAE's does; diffusers' SDXL
/// pipelines upcast it), not in bf16, not for SD 1.x's pipeline, and not
/// when the config says `force_upcast: false` (the tiny fixture's).
#[test]
fn the_sdxl_vae_upcasts_f16() {
    use easel_diffusion::pipelines::load_vae;
    let cpu = candle_core::Device::Cpu;
    let fixture = model("tiny-sdxl");
    // A copy of the model whose VAE config sets force_upcast, as SDXL's.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture.join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    let vae = tmp.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    for entry in std::fs::read_dir(fixture.join("vae")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, vae.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae.join("config.json")).unwrap()).unwrap();
    config["force_upcast"] = true.into();
    std::fs::write(vae.join("config.json"), config.to_string()).unwrap();

    let upcast = ModelDir::open(tmp.path()).unwrap();
    let dtype = |dir: &ModelDir, dt: DType, sdxl: bool| {
        load_vae(&dir.clone().with_compute_dtype(dt), &cpu, false, sdxl)
            .unwrap()
            .dtype()
    };
    assert_eq!(dtype(&upcast, DType::F16, true), DType::F32);
    assert_eq!(dtype(&upcast, DType::F16, false), DType::F16);
    assert_eq!(dtype(&upcast, DType::BF16, true), DType::BF16);
    let as_is = ModelDir::open(&fixture).unwrap();
    assert_eq!(dtype(&as_is, DType::F16, true), DType::F16);
}
