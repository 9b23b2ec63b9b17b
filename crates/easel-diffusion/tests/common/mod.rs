//! Shared helpers of the engine's integration tests: fixture paths,
//! reference loading and tolerance checks.
#![allow(dead_code)]

pub mod cases;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_diffusion::models::weights::{SafetensorsSource, Weights};

/// `tests/fixtures` at the repository root, or `EASEL_FIXTURES` where set:
/// a test executable carried to another machine (scripts/gpu-check.sh) finds
/// the fixtures there, not at the path it was built in.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("EASEL_FIXTURES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// A fixture model folder, e.g. `model("tiny-sd15")`.
pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// Every tensor of a safetensors file under `tests/fixtures`.
pub fn load_refs(relative: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(relative), &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// The weights of a fixture model's component, as f32.
pub fn component_weights(model_name: &str, component: &str) -> Weights {
    let dir = model(model_name).join(component);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap_or_else(|| panic!("no safetensors in {}", dir.display()));
    let source = SafetensorsSource::open(&[file]).unwrap();
    Weights::new(Arc::new(source), component, DType::F32, &Device::Cpu)
}

/// The device the parity tests run on: `EASEL_TEST_DEVICE` (`cpu`,
/// `cuda`, `cuda:N`; default `cpu`). A CUDA device in a build without the
/// `cuda` feature, or one that is absent, fails the test that asks for it.
pub fn test_device() -> Device {
    match std::env::var("EASEL_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).expect("EASEL_TEST_DEVICE=cuda"),
        Ok(other) => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n).expect("EASEL_TEST_DEVICE=cuda:N"),
            None => panic!("EASEL_TEST_DEVICE={other}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// The compute dtype of the parity tests: `EASEL_TEST_PRECISION` (`fp32`,
/// `fp16`, `bf16`; default `fp32`).
pub fn test_dtype() -> DType {
    match std::env::var("EASEL_TEST_PRECISION").as_deref() {
        Err(_) | Ok("") | Ok("fp32") => DType::F32,
        Ok("fp16") => DType::F16,
        Ok("bf16") => DType::BF16,
        Ok(other) => panic!("EASEL_TEST_PRECISION={other}: expected fp32, fp16 or bf16"),
    }
}

/// Load `dir`'s pipeline on [`test_device`] in [`test_dtype`].
pub fn test_pipeline(
    dir: &easel_diffusion::loader::ModelDir,
) -> easel_diffusion::pipelines::Pipeline {
    easel_diffusion::pipelines::load_pipeline(
        &dir.clone().with_compute_dtype(test_dtype()),
        &test_device(),
    )
    .unwrap()
}

/// `t` as f64 on the CPU (outputs of a GPU run meet CPU references).
pub fn on_cpu_f64(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = on_cpu_f64(a).flatten_all().unwrap();
    let b = on_cpu_f64(b).flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (diff / norm.max(1e-30)).sqrt()
}

/// max |a − b|.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = on_cpu_f64(a);
    let b = on_cpu_f64(b);
    (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Assert `a` is within `tol` relative L2 of the reference `b`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let r = rel_l2(a, b);
    assert!(
        r <= tol,
        "{what}: relative L2 {r:.3e} > {tol:.0e} (max abs {:.3e})",
        max_abs(a, b)
    );
}
