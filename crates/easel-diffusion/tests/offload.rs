//! `--offload model|sequential` (diffusers' model and sequential CPU
//! offload) changes where the weights live between uses, never the
//! numbers: each fixture case gives the same pixels with every mode.
//!
//! On the CPU (CI) host and device are one memory, so this checks the
//! offload paths themselves: `model` builds each component from its
//! host-memory copy for every use (LoRA updates included, VAE encoder for
//! image-to-image and inpainting), `sequential` keeps the weights apart
//! from the computation's device and moves them per layer. Run with
//! `EASEL_TEST_DEVICE=cuda` (scripts/gpu-check.sh) the same test moves
//! real weights between RAM and the GPU.

mod common;

use candle_core::Tensor;
use common::cases::{case_loras, run_case};
use common::*;
use easel_diffusion::device::Offload;
use easel_diffusion::loader::ModelDir;
use easel_diffusion::pipelines::{load_pipeline, Pipeline};

/// Reference case `name` and its model loaded with `offload`, on the test
/// device in the test dtype.
fn case_pipeline(name: &str, offload: Offload) -> (serde_json::Value, Pipeline) {
    let case: serde_json::Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join("references").join(format!("{name}.json")))
            .unwrap(),
    )
    .unwrap();
    let dir = ModelDir::open(fixtures().join(case["model"].as_str().unwrap()))
        .unwrap()
        .with_compute_dtype(test_dtype())
        .with_offload(offload);
    let pipeline = load_pipeline(&dir, &test_device()).unwrap();
    (case, pipeline)
}

/// The images of reference case `name` on a pipeline loaded with `offload`
/// (the case's LoRAs merged).
fn images(name: &str, offload: Offload) -> Tensor {
    let (case, mut pipeline) = case_pipeline(name, offload);
    pipeline.set_loras(&case_loras(&case)).unwrap();
    let (_, images, _) = run_case(&pipeline, "references", name, None);
    on_cpu_f64(&images)
}

/// Every mode gives `none`'s pixels, exactly.
fn same_pixels(name: &str) {
    let none = images(name, Offload::None);
    for offload in [Offload::Model, Offload::Sequential] {
        let other = images(name, offload);
        let diff = max_abs(&other, &none);
        assert_eq!(
            diff, 0.0,
            "{name}: offload {offload} differs from none by {diff}"
        );
    }
}

#[test]
fn sd15_txt2img_same_pixels() {
    same_pixels("sd15_txt2img_euler");
}

#[test]
fn sd15_img2img_same_pixels() {
    same_pixels("sd15_img2img_ddim");
}

#[test]
fn sd15_inpaint_same_pixels() {
    same_pixels("sd15_inpaint_ddim");
}

#[test]
fn sd15_lora_same_pixels() {
    same_pixels("sd15_lora_peft_scale0.7");
}

#[test]
fn sdxl_same_pixels() {
    same_pixels("sdxl_txt2img_euler");
}

#[test]
fn flux_schnell_same_pixels() {
    same_pixels("flux_schnell_txt2img");
}

#[test]
fn flux_fill_same_pixels() {
    same_pixels("flux_fill_inpaint");
}

/// Switching adapters on an offloaded pipeline rebuilds from the kept base
/// weights: merging a LoRA and then removing it gives the base images back.
#[test]
fn model_offload_lora_switch_restores_base() {
    let name = "sd15_lora_peft_scale0.7";
    let (case, mut pipeline) = case_pipeline(name, Offload::Model);
    let (_, base, _) = run_case(&pipeline, "references", name, None);
    pipeline.set_loras(&case_loras(&case)).unwrap();
    let (_, with_lora, _) = run_case(&pipeline, "references", name, None);
    pipeline.set_loras(&[]).unwrap();
    let (_, again, _) = run_case(&pipeline, "references", name, None);
    assert!(
        max_abs(&on_cpu_f64(&with_lora), &on_cpu_f64(&base)) > 1e-3,
        "the LoRA changed nothing: the test would not see a lost update"
    );
    assert_eq!(max_abs(&on_cpu_f64(&again), &on_cpu_f64(&base)), 0.0);
}

/// The mode names, as `--offload` and the server's `offload` read them.
#[test]
fn offload_names() {
    for name in Offload::NAMES {
        assert_eq!(name.parse::<Offload>().unwrap().as_str(), name);
    }
    assert_eq!("Model".parse::<Offload>().unwrap(), Offload::Model);
    let err = "cpu".parse::<Offload>().unwrap_err().to_string();
    assert!(
        err.contains("offload") && err.contains("none, model, sequential"),
        "{err}"
    );
}
