//! Component files (issue 14: `--vae FILE`, `--unet FILE`, ...): a model
//! with one or more components read from separate files, in the diffusers
//! layout or an original one, gives exactly the image of the model with
//! its own weights when the files hold the same weights; files of another
//! architecture, missing files and pickles are refused before anything
//! loads, naming the flag, the file, the tensor and the shapes.
//!
//! The LDM-layout files are cut out of the single-file fixtures
//! (`tests/support/component_files.rs`), which hold the fixture folders'
//! weights.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;
#[path = "../../../tests/support/component_files.rs"]
mod component_files_support;
use component_files_support::component_file;

mod common;

use std::path::Path;

use common::model;
use easel_core::GenerationParams;
use easel_diffusion::engine::{estimate_model_bytes, Engine, EngineOptions, JobRequest};
use easel_diffusion::loader::{
    open_component_file, resolve_model, ComponentFiles, ComponentLayout, ComponentOverrides,
    ModelDir, ResolveOptions,
};
use easel_diffusion::pipelines::CancelToken;
use easel_diffusion::Error;

fn offline() -> ResolveOptions {
    ResolveOptions {
        offline: true,
        ..ResolveOptions::default()
    }
}

/// A copy of fixture model `name` without the weight files of `drop`
/// (component folder names), so those must come from component files.
fn without_weights(name: &str, drop: &[&str]) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path, drop: &[&str], component: &str) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                copy(&path, &target, drop, &name);
            } else if !(path.extension().is_some_and(|e| e == "safetensors")
                && drop.contains(&component))
            {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&model(name), dir.path(), drop, "");
    dir
}

/// The 8-bit images of a 2-step run of `reference` (resolved by `engine`).
fn generate(engine: &mut Engine, reference: &str, size: u32) -> Vec<Vec<u8>> {
    let defaults = engine.load(reference).unwrap().defaults().clone();
    let job = JobRequest::new(
        reference.to_string(),
        GenerationParams {
            steps: Some(2),
            width: Some(size),
            height: Some(size),
            seed: Some(7),
            ..GenerationParams::new("a red house by the sea")
        },
    )
    .build(&defaults)
    .unwrap();
    engine
        .run(&job, &mut |_| {}, &CancelToken::new())
        .unwrap()
        .images
}

fn engine() -> Engine {
    Engine::new(EngineOptions {
        resolve: offline(),
        ..EngineOptions::default()
    })
}

fn files(pairs: &[(&str, &Path)]) -> ComponentFiles {
    let mut files = ComponentFiles::new();
    for (component, file) in pairs {
        files.insert(component, *file).unwrap();
    }
    files
}

#[test]
fn an_ldm_vae_file_gives_the_folders_image_and_its_own_cache_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let vae = component_file(
        &single_file_fixture("tiny-sd15"),
        "first_stage_model.",
        true,
        &tmp.path().join("vae-ldm.safetensors"),
    );
    let folder = model("tiny-sd15").display().to_string();
    let mut engine = engine();
    let want = generate(&mut engine, &folder, 32);
    let key = engine.register_component_files(&folder, files(&[("vae", &vae)]));
    assert_ne!(key, folder, "the overrides are part of the cache key");
    let dir = engine.resolve(&key).unwrap();
    let file = dir.component_file("vae").unwrap();
    assert_eq!(file.layout(), ComponentLayout::LdmVae);
    assert_eq!(file.path(), vae);
    assert_eq!(generate(&mut engine, &key, 32), want);
    let keys: Vec<String> = engine.loaded().into_iter().map(|m| m.key).collect();
    assert_eq!(keys.len(), 2, "two cache entries: {keys:?}");
}

#[test]
fn an_older_diffusers_vae_with_deprecated_attention_names_gives_the_folders_image() {
    // The folder's VAE with its mid-block attention named as older
    // diffusers files (sd-vae-ft-mse) name it: query / key / value / proj_attn.
    let tmp = tempfile::tempdir().unwrap();
    let folder_vae = model("tiny-sd15").join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&folder_vae).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut renamed = 0;
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let mut key = k.clone();
            for (new, old) in [
                (".to_q.", ".query."),
                (".to_k.", ".key."),
                (".to_v.", ".value."),
                (".to_out.0.", ".proj_attn."),
            ] {
                if key.contains(".attentions.0") && key.contains(new) {
                    key = key.replace(new, old);
                    renamed += 1;
                }
            }
            (key, v)
        })
        .collect();
    assert!(renamed >= 8, "{renamed} keys renamed");
    let old_vae = tmp.path().join("old-vae.safetensors");
    safetensors::serialize_to_file(tensors, None, &old_vae).unwrap();
    let configs = without_weights("tiny-sd15", &["vae"]);
    let mut engine = engine();
    let want = generate(&mut engine, &model("tiny-sd15").display().to_string(), 32);
    let key = engine.register_component_files(
        &configs.path().display().to_string(),
        files(&[("vae", &old_vae)]),
    );
    assert_eq!(generate(&mut engine, &key, 32), want);
}

#[test]
fn every_component_from_files_gives_the_folders_image() {
    // The folder keeps only configs and tokenizers: the UNet comes from the
    // whole single file (prefix `model.diffusion_model.` kept), the VAE from
    // an LDM file without prefix, the text encoder from CLIP keys under
    // `cond_stage_model.transformer.`.
    let tmp = tempfile::tempdir().unwrap();
    let single = single_file_fixture("tiny-sd15");
    let unet = component_file(
        &single,
        "model.diffusion_model.",
        false,
        &tmp.path().join("unet.safetensors"),
    );
    let vae = component_file(
        &single,
        "first_stage_model.",
        true,
        &tmp.path().join("vae.safetensors"),
    );
    let clip = component_file(
        &single,
        "cond_stage_model.transformer.",
        false,
        &tmp.path().join("clip.safetensors"),
    );
    let configs = without_weights("tiny-sd15", &["unet", "vae", "text_encoder"]);
    let config_ref = configs.path().display().to_string();
    let mut engine = engine();
    let want = generate(&mut engine, &model("tiny-sd15").display().to_string(), 32);
    let files = files(&[("unet", &unet), ("vae", &vae), ("text_encoder", &clip)]);
    let key = engine.register_component_files(&config_ref, files.clone());
    let dir = engine.resolve(&key).unwrap();
    assert_eq!(
        dir.component_file("unet").unwrap().layout(),
        ComponentLayout::LdmUnet
    );
    assert_eq!(
        dir.component_file("unet").unwrap().prefix(),
        "model.diffusion_model."
    );
    assert_eq!(
        dir.component_file("text_encoder").unwrap().prefix(),
        "cond_stage_model.transformer."
    );
    // The estimate counts the files' tensors as it counts the folder's.
    let folder_bytes = estimate_model_bytes(&ModelDir::open(model("tiny-sd15")).unwrap());
    assert_eq!(estimate_model_bytes(&dir), folder_bytes);
    assert_eq!(generate(&mut engine, &key, 32), want);
    // The same overrides through ResolveOptions (the server's way).
    let options = ResolveOptions {
        component_files: vec![ComponentOverrides {
            model: config_ref.clone(),
            files,
            quantization: None,
            offload_t5: false,
        }],
        ..offline()
    };
    let dir = resolve_model(&key, &options).unwrap();
    assert!(dir.component_file("vae").is_some());
}

#[test]
fn diffusers_layout_and_flux_files_give_the_folders_image() {
    // A FLUX.1 dev folder without its transformer and T5 weights: the
    // transformer from the BFL-layout file, T5 from the folder's own
    // (transformers layout) file, the VAE from its diffusers-layout file.
    let flux = model("tiny-flux-dev");
    let configs = without_weights("tiny-flux-dev", &["transformer", "text_encoder_2", "vae"]);
    let files = files(&[
        ("transformer", &single_file_fixture("tiny-flux-dev")),
        (
            "text_encoder_2",
            &flux.join("text_encoder_2/model.safetensors"),
        ),
        ("vae", &flux.join("vae/diffusion_pytorch_model.safetensors")),
    ]);
    let mut engine = engine();
    let want = generate(&mut engine, &flux.display().to_string(), 32);
    let key = engine.register_component_files(&configs.path().display().to_string(), files);
    let dir = engine.resolve(&key).unwrap();
    assert_eq!(
        dir.component_file("transformer").unwrap().layout(),
        ComponentLayout::FluxBfl
    );
    assert_eq!(
        dir.component_file("text_encoder_2").unwrap().layout(),
        ComponentLayout::Diffusers
    );
    assert_eq!(generate(&mut engine, &key, 32), want);
}

/// Load settings without files (a server registry entry's `quantize` /
/// `offload_t5`): the key names them, the resolved model carries them, and
/// an offloaded T5 gives the resident one's image.
#[test]
fn load_settings_without_files_resolve_with_their_key() {
    let flux = model("tiny-flux-dev").display().to_string();
    let overrides = ComponentOverrides {
        model: flux.clone(),
        files: ComponentFiles::new(),
        quantization: None,
        offload_t5: true,
    };
    let key = overrides.key();
    assert_eq!(key, format!("{flux} [offload_t5]"));
    let options = ResolveOptions {
        component_files: vec![overrides],
        ..offline()
    };
    let dir = resolve_model(&key, &options).unwrap();
    assert!(dir.offloaded_t5());
    assert!(!resolve_model(&flux, &options).unwrap().offloaded_t5());
    let mut resident = engine();
    let want = generate(&mut resident, &flux, 32);
    let mut offloaded = Engine::new(EngineOptions {
        resolve: options,
        ..EngineOptions::default()
    });
    assert_eq!(generate(&mut offloaded, &key, 32), want);
}

#[test]
fn sdxl_text_encoder_2_from_a_whole_checkpoint_takes_embedders_1() {
    let single = single_file_fixture("tiny-sdxl");
    let folder = model("tiny-sdxl").display().to_string();
    let mut engine = engine();
    let want = generate(&mut engine, &folder, 32);
    let key = engine.register_component_files(
        &folder,
        files(&[("text_encoder", &single), ("text_encoder_2", &single)]),
    );
    let dir = engine.resolve(&key).unwrap();
    let second = dir.component_file("text_encoder_2").unwrap();
    assert_eq!(second.layout(), ComponentLayout::OpenClip);
    assert_eq!(second.prefix(), "conditioner.embedders.1.model.");
    assert_eq!(
        dir.component_file("text_encoder").unwrap().prefix(),
        "conditioner.embedders.0.transformer."
    );
    assert_eq!(generate(&mut engine, &key, 32), want);
}

/// The message of an [`Error::InvalidArgument`] for `flag`.
fn refusal(result: easel_diffusion::Result<impl std::fmt::Debug>, flag: &str) -> String {
    match result {
        Err(Error::InvalidArgument { field, message }) => {
            assert_eq!(field, flag, "{message}");
            message
        }
        other => panic!("expected a refusal naming {flag}, got {other:?}"),
    }
}

#[test]
fn files_of_another_architecture_are_refused_naming_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    // An SD 1.5 VAE (4 latent channels) into FLUX (16).
    let vae = component_file(
        &single_file_fixture("tiny-sd15"),
        "first_stage_model.",
        true,
        &tmp.path().join("sd15-vae.safetensors"),
    );
    let flux = ModelDir::open(model("tiny-flux-dev")).unwrap();
    let m = refusal(open_component_file(&flux, "vae", &vae), "--vae");
    assert!(m.contains(&vae.display().to_string()), "{m}");
    assert!(m.contains("decoder.conv_in"), "{m}");
    assert!(
        m.contains("[64, 4, 3, 3]") && m.contains("[64, 16, 3, 3]"),
        "{m}"
    );
    assert!(m.contains("latent_channels 16"), "{m}");

    // An SDXL UNet (cross-attention width 64, LDM layout in the whole
    // checkpoint) into SD 1.5 (32).
    let sdxl = single_file_fixture("tiny-sdxl");
    let sd15 = ModelDir::open(model("tiny-sd15")).unwrap();
    let m = refusal(open_component_file(&sd15, "unet", &sdxl), "--unet");
    assert!(m.contains("attn2.to_k.weight"), "{m}");
    assert!(m.contains("[64, 64]") && m.contains("[64, 32]"), "{m}");
    assert!(m.contains("cross_attention_dim 32"), "{m}");

    // The same refusal through the resolver, before anything loads.
    let options = ResolveOptions {
        component_files: vec![ComponentOverrides {
            model: model("tiny-sd15").display().to_string(),
            files: files(&[("unet", &sdxl)]),
            quantization: None,
            offload_t5: false,
        }],
        ..offline()
    };
    let key = options.component_files[0].key();
    refusal(resolve_model(&key, &options), "--unet");
}

#[test]
fn missing_pickled_and_misplaced_files_are_refused() {
    let sd15 = ModelDir::open(model("tiny-sd15")).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("nope.safetensors");
    let m = refusal(open_component_file(&sd15, "vae", &missing), "--vae");
    assert!(
        m.contains("no such file") && m.contains("nope.safetensors"),
        "{m}"
    );

    let pickle = tmp.path().join("vae.ckpt");
    std::fs::write(&pickle, b"not looked at").unwrap();
    let m = refusal(open_component_file(&sd15, "vae", &pickle), "--vae");
    assert!(m.contains("pickle") && m.contains(".safetensors"), "{m}");

    let not_safetensors = tmp.path().join("vae.safetensors");
    std::fs::write(&not_safetensors, b"garbage").unwrap();
    let m = refusal(open_component_file(&sd15, "vae", &not_safetensors), "--vae");
    assert!(m.contains("not a readable safetensors or GGUF file"), "{m}");

    // A VAE given as the UNet: no UNet layout, and a hint.
    let vae = model("tiny-sd15").join("vae/diffusion_pytorch_model.safetensors");
    let m = refusal(open_component_file(&sd15, "unet", &vae), "--unet");
    assert!(
        m.contains("match no layout") && m.contains("input_blocks.0.0.weight"),
        "{m}"
    );
    assert!(m.contains("looks like a VAE (--vae)"), "{m}");

    // A component the model does not have.
    let m = refusal(
        open_component_file(&sd15, "transformer", &vae),
        "--transformer",
    );
    assert!(
        m.contains("no `transformer` component") && m.contains("unet"),
        "{m}"
    );

    // A name that is not a component a file replaces.
    assert!(ComponentFiles::new().insert("scheduler", &vae).is_err());
}
