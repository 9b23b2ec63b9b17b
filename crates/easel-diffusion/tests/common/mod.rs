//! Shared helpers of the engine's integration tests: fixture paths,
//! reference loading and tolerance checks.
#![allow(dead_code)]

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

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
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
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
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
