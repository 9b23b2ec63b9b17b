//! The model cache's estimate of a model's memory
//! ([`easel_diffusion::engine::estimate_model_bytes`], made before loading
//! from the safetensors headers) against what the loaded pipeline really
//! holds: the heap bytes a load leaves allocated, counted by this test
//! binary's global allocator, less the heap its tokenizers hold (measured
//! the same way by loading them alone). Weight tensors live on the heap
//! (candle copies them out of the memory-mapped files), so the remainder is
//! the tensors plus a few kilobytes of configs and module structs.
//!
//! One test function: the allocator counts every thread of the process, so
//! nothing else may run while it measures.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use candle_core::Device;
use easel_diffusion::engine::estimate_model_bytes;
use easel_diffusion::loader::{ModelDir, ModelFamily};
use easel_diffusion::models::quantize::Quantization;
use easel_diffusion::pipelines::load_pipeline;
use easel_diffusion::tokenizer::{ClipTokenizer, T5Tokenizer};

/// Live heap bytes of the process.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::SeqCst)
}

/// Heap bytes the tokenizers of `model` hold, loaded alone as the
/// pipelines load them (CLIP `tokenizer`; `tokenizer_2`: CLIP for SDXL, T5
/// for FLUX).
fn tokenizer_bytes(model: &ModelDir) -> i64 {
    let before = live();
    let clip = ClipTokenizer::from_dir(model.component_dir("tokenizer").unwrap()).unwrap();
    let second: Option<Box<dyn std::any::Any>> = match model.family() {
        Some(ModelFamily::Flux | ModelFamily::FluxFill) => Some(Box::new(
            T5Tokenizer::from_dir(model.component_dir("tokenizer_2").unwrap()).unwrap(),
        )),
        Some(ModelFamily::StableDiffusionXl) => Some(Box::new(
            ClipTokenizer::from_dir(model.component_dir("tokenizer_2").unwrap()).unwrap(),
        )),
        _ => None,
    };
    let bytes = live() - before;
    drop((clip, second));
    bytes
}

/// Copy the folder `from` to `to` without its `.safetensors` files (with
/// `flux`, without its transformer's only: a FLUX single file holds only
/// the transformer, the rest comes from the config folder).
fn copy_without_weights(from: &std::path::Path, to: &std::path::Path, flux: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        let weights = path.extension().is_some_and(|e| e == "safetensors");
        if path.is_dir() {
            copy_without_weights(&path, &target, flux);
        } else if !weights || (flux && !from.ends_with("transformer")) {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn estimate_matches_loaded_tensor_bytes_for_every_fixture_model() {
    let mut report = Vec::new();
    let folders = [
        "tiny-sd15",
        "tiny-sd15-inpaint",
        "tiny-sd2-v",
        "tiny-sdxl",
        "tiny-flux-schnell",
        "tiny-flux-dev",
        "tiny-flux-fill",
    ]
    .map(|name| {
        (
            name.to_string(),
            ModelDir::open(common::model(name)).unwrap(),
        )
    });
    // Single-file checkpoints (LDM layout) with a config folder that holds
    // no weights (as `--config` usually is), and FLUX transformer-only
    // files (BFL layout) with a config folder without transformer weights:
    // the estimate must count the file's tensors under the names the model
    // loads (fused qkv / linear1 split into their parts).
    let configs = tempfile::tempdir().unwrap();
    let single_files = [
        "tiny-sd15",
        "tiny-sd2-v",
        "tiny-sdxl",
        "tiny-flux-dev",
        "tiny-flux-schnell",
        "tiny-flux-fill",
    ]
    .map(|name| {
        let file = single_file_fixture(name);
        let config = configs.path().join(name);
        copy_without_weights(&common::model(name), &config, name.contains("flux"));
        let model = easel_diffusion::loader::open_single_file(
            &file,
            Some(config.to_str().unwrap()),
            None,
            &easel_diffusion::loader::ResolveOptions {
                offline: true,
                ..Default::default()
            },
        )
        .unwrap();
        (format!("{name} (single file)"), model)
    });
    // Quantized and fp8 transformer files (their block weights held as
    // stored), and models quantized as they load (`--quantize`).
    let flux_config = configs.path().join("tiny-flux-dev");
    let quantized_files = [
        "tiny-flux-dev-Q8_0.gguf",
        "tiny-flux-dev-Q4_0.gguf",
        "tiny-flux-dev-fp8_e4m3fn.safetensors",
        "tiny-flux-dev-fp8_scaled.safetensors",
    ]
    .map(|file| {
        let path = common::fixtures().join("generated/quantized").join(file);
        let model = easel_diffusion::loader::open_single_file(
            &path,
            Some(flux_config.to_str().unwrap()),
            None,
            &easel_diffusion::loader::ResolveOptions {
                offline: true,
                ..Default::default()
            },
        )
        .unwrap();
        (file.to_string(), model)
    });
    let quantized_at_load = [
        ("tiny-flux-dev", Quantization::Q8_0),
        ("tiny-flux-dev", Quantization::Q4_0),
        ("tiny-sdxl", Quantization::Fp8),
        ("tiny-sd15", Quantization::Q8_0),
    ]
    .map(|(name, q)| {
        (
            format!("{name} --quantize {}", q.name()),
            ModelDir::open(common::model(name))
                .unwrap()
                .with_quantization(Some(q)),
        )
    });
    for (name, model) in folders
        .into_iter()
        .chain(single_files)
        .chain(quantized_files)
        .chain(quantized_at_load)
    {
        let estimate = estimate_model_bytes(&model) as f64;
        // Warm one load up first: lazily initialised statics (thread pools,
        // kernel tables) are allocated once and would count as weights.
        drop(load_pipeline(&model, &Device::Cpu).unwrap());
        let tokenizers = tokenizer_bytes(&model);
        let before = live();
        let pipeline = load_pipeline(&model, &Device::Cpu).unwrap();
        let held = (live() - before - tokenizers) as f64;
        drop(pipeline);
        let ratio = estimate / held;
        report.push(format!(
            "{name}: estimate {estimate} bytes, loaded tensors {held} bytes (tokenizers {tokenizers}), ratio {ratio:.3}"
        ));
        eprintln!("{}", report.last().unwrap());
        assert!((0.9..=1.1).contains(&ratio), "{}", report.join("\n"));
    }
}
