//! Model resolution and layout: a fake Hugging Face cache built in a temporary
//! folder (the `huggingface_hub` layout: `models--org--name/refs/<rev>`,
//! `snapshots/<commit>/` symlinking into `blobs/`), local folders, weight
//! selection. Nothing here touches the network or the process environment.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;

use std::path::{Path, PathBuf};

use easel_diffusion::loader::{
    list_local_models, resolve_model, ComponentKind, ModelDir, ModelSource, ResolveOptions,
};
use easel_diffusion::tokenizer::ClipTokenizer;
use easel_diffusion::Error;

const MAIN: &str = "1111111111111111111111111111111111111111";
const V1: &str = "2222222222222222222222222222222222222222";
const LOOSE: &str = "3333333333333333333333333333333333333333";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_sd15() -> PathBuf {
    fixtures().join("models/tiny-sd15")
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Adds a snapshot of `source` to the fake cache `hub` as repo `repo_id` at
/// `commit`, with the files stored once in `blobs/` and linked from the
/// snapshot (copied where symlinks are not available), and points `refs` at it.
fn add_snapshot(hub: &Path, repo_id: &str, commit: &str, refs: &[&str], source: &Path) -> PathBuf {
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    for rel in files_under(source) {
        let blob_name = rel.to_string_lossy().replace(['/', '\\'], "_");
        let blob = repo.join("blobs").join(&blob_name);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        if !blob.exists() {
            std::fs::copy(source.join(&rel), &blob).unwrap();
        }
        let link = snapshot.join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        #[cfg(unix)]
        {
            // Relative, as huggingface_hub makes them: snapshots/<c>/<rel> -> ../../blobs/<b>.
            let depth = rel.components().count() + 1;
            let mut target = PathBuf::new();
            for _ in 0..depth {
                target.push("..");
            }
            std::os::unix::fs::symlink(target.join("blobs").join(&blob_name), &link).unwrap();
        }
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
    }
    for name in refs {
        let path = repo.join("refs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
    snapshot
}

fn offline(hub: &Path) -> ResolveOptions {
    ResolveOptions {
        cache_dir: Some(hub.to_path_buf()),
        offline: true,
        ..Default::default()
    }
}

#[test]
fn resolves_repo_id_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let snapshot = add_snapshot(&hub, "org/tiny-sd15", MAIN, &["main"], &tiny_sd15());

    let model = resolve_model("org/tiny-sd15", &offline(&hub)).unwrap();
    assert_eq!(model.path(), snapshot);
    assert_eq!(model.name(), "org/tiny-sd15");
    assert_eq!(
        model.source(),
        &ModelSource::HubCache {
            repo_id: "org/tiny-sd15".into(),
            revision: "main".into(),
            commit: MAIN.into(),
        }
    );
    assert_eq!(model.pipeline_class(), "StableDiffusionPipeline");
    assert_eq!(model.diffusers_version(), Some("0.42.1"));

    // Components: null entries skipped; kinds from the class names.
    let names: Vec<&str> = model.components().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    );
    let unet = model.component("unet").unwrap();
    assert_eq!(
        (unet.library.as_str(), unet.class_name.as_str()),
        ("diffusers", "UNet2DConditionModel")
    );
    assert_eq!(unet.kind(), ComponentKind::Model);
    assert_eq!(
        model.component("scheduler").unwrap().kind(),
        ComponentKind::Scheduler
    );
    assert_eq!(
        model.component("tokenizer").unwrap().kind(),
        ComponentKind::Tokenizer
    );
    assert!(model.component("safety_checker").is_none());
    assert_eq!(
        model.option("requires_safety_checker"),
        Some(&serde_json::Value::Bool(false))
    );

    // Configs by kind.
    assert_eq!(
        model.component_config("scheduler").unwrap()["_class_name"],
        "PNDMScheduler"
    );
    assert_eq!(
        model.component_config("unet").unwrap()["_class_name"],
        "UNet2DConditionModel"
    );
    assert_eq!(
        model.component_config("tokenizer").unwrap()["model_max_length"],
        77
    );
    assert_eq!(
        model.component_config("text_encoder").unwrap()["hidden_act"],
        "quick_gelu"
    );

    // Weights through the snapshot's symlinks.
    let unet_weights = model.weight_files("unet").unwrap();
    assert_eq!(
        unet_weights,
        [snapshot.join("unet/diffusion_pytorch_model.safetensors")]
    );
    assert!(std::fs::metadata(&unet_weights[0]).unwrap().len() > 0);
    assert_eq!(
        model.weight_files("text_encoder").unwrap(),
        [snapshot.join("text_encoder/model.safetensors")]
    );

    // The tokenizer loads from the snapshot.
    let tok = ClipTokenizer::from_dir(model.component_dir("tokenizer").unwrap()).unwrap();
    assert_eq!(
        &tok.encode("a photo of a cat").unwrap()[..7],
        &[49406, 320, 1125, 539, 320, 2368, 49407]
    );
}

#[test]
fn resolves_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    add_snapshot(&hub, "org/tiny-sd15", MAIN, &["main"], &tiny_sd15());
    let v1 = add_snapshot(
        &hub,
        "org/tiny-sd15",
        V1,
        &["v1", "refs/pr/3"],
        &tiny_sd15(),
    );
    let loose = add_snapshot(&hub, "org/tiny-sd15", LOOSE, &[], &tiny_sd15());
    let options = offline(&hub);

    let model = resolve_model("org/tiny-sd15@v1", &options).unwrap();
    assert_eq!(model.path(), v1);
    assert_eq!(model.name(), "org/tiny-sd15@v1");
    assert!(
        matches!(model.source(), ModelSource::HubCache { revision, commit, .. }
        if revision == "v1" && commit == V1)
    );
    assert_eq!(
        resolve_model("org/tiny-sd15@refs/pr/3", &options)
            .unwrap()
            .path(),
        v1
    );
    // A commit hash without a ref: the snapshot itself.
    assert_eq!(
        resolve_model(&format!("org/tiny-sd15@{LOOSE}"), &options)
            .unwrap()
            .path(),
        loose
    );

    let err = resolve_model("org/tiny-sd15@nope", &options).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains("refs/nope"), "{message}");
    assert!(message.contains("--revision nope"), "{message}");
}

#[test]
fn offline_and_not_cached_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    add_snapshot(&hub, "org/tiny-sd15", MAIN, &["main"], &tiny_sd15());

    let err = resolve_model("org/missing", &offline(&hub)).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    let message = err.to_string();
    let expected_path = hub.join("models--org--missing");
    assert!(
        message.contains(&expected_path.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("huggingface-cli download org/missing"),
        "{message}"
    );
    assert!(message.contains("local diffusers folder"), "{message}");
    assert!(message.contains("offline"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");

    // A snapshot without model_index.json is not a cached model.
    std::fs::create_dir_all(hub.join("models--org--partial/snapshots").join(MAIN)).unwrap();
    std::fs::create_dir_all(hub.join("models--org--partial/refs")).unwrap();
    std::fs::write(hub.join("models--org--partial/refs/main"), MAIN).unwrap();
    assert!(matches!(
        resolve_model("org/partial", &offline(&hub)),
        Err(Error::ModelNotFound(_))
    ));
}

#[test]
fn offline_uses_an_incomplete_snapshot_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let snapshot = add_snapshot(&hub, "org/tiny-sd15", MAIN, &["main"], &tiny_sd15());
    let vae_weights = snapshot.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&vae_weights).unwrap();

    let model = resolve_model("org/tiny-sd15", &offline(&hub)).unwrap();
    assert!(model.check_complete(&[]).is_err());
    match model.weight_files("vae").unwrap_err() {
        Error::MissingComponent { model, what, path } => {
            assert_eq!(model, "org/tiny-sd15");
            assert!(what.contains("vae"), "{what}");
            assert_eq!(path, vae_weights);
        }
        other => panic!("{other}"),
    }
    assert!(model.weight_files("unet").is_ok());
}

#[test]
fn resolves_local_folders() {
    let absolute = tiny_sd15().canonicalize().unwrap();
    let model = resolve_model(absolute.to_str().unwrap(), &ResolveOptions::default()).unwrap();
    assert_eq!(model.path(), absolute);
    assert_eq!(model.source(), &ModelSource::Local);
    assert_eq!(model.pipeline_class(), "StableDiffusionPipeline");

    // Integration tests run in the crate folder.
    let relative = "../../tests/fixtures/models/tiny-sdxl";
    let model = resolve_model(relative, &ResolveOptions::default()).unwrap();
    assert_eq!(model.name(), relative);
    assert_eq!(model.pipeline_class(), "StableDiffusionXLPipeline");
    assert_eq!(
        model.option("force_zeros_for_empty_prompt"),
        Some(&serde_json::Value::Bool(true))
    );
    let names: Vec<&str> = model.components().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "scheduler",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "unet",
            "vae"
        ]
    );

    // By name in an extra model folder.
    let options = ResolveOptions {
        model_dirs: vec![fixtures().join("models")],
        ..Default::default()
    };
    let model = resolve_model("tiny-flux-dev", &options).unwrap();
    assert_eq!(model.pipeline_class(), "FluxPipeline");
    assert_eq!(model.name(), "tiny-flux-dev");
    assert_eq!(
        model.component_config("tokenizer_2").unwrap()["model_max_length"],
        512
    );
}

#[test]
fn bad_references_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let options = offline(&tmp.path().join("hub"));
    for reference in [
        "./no/such/model",
        "no/such/model",
        "not a model",
        "nothing-here",
    ] {
        let err = resolve_model(reference, &options).unwrap_err();
        assert!(matches!(err, Error::ModelNotFound(_)), "{reference}: {err}");
        assert!(err.to_string().contains(reference), "{reference}: {err}");
    }
    let err = resolve_model("", &options).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)));

    // A folder that is not a diffusers model, and a file.
    let folder = fixtures().join("models");
    let err = resolve_model(folder.to_str().unwrap(), &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("without model_index.json"), "{err}");
    let file = tiny_sd15().join("unet/diffusion_pytorch_model.safetensors");
    let err = resolve_model(file.to_str().unwrap(), &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("single-file"), "{err}");

    // A broken model_index.json.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model_index.json"), "{").unwrap();
    assert!(matches!(
        resolve_model(broken.to_str().unwrap(), &options),
        Err(Error::Json { .. })
    ));
    std::fs::write(
        broken.join("model_index.json"),
        r#"{"unet": ["diffusers", "X"]}"#,
    )
    .unwrap();
    let err = resolve_model(broken.to_str().unwrap(), &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("_class_name"), "{err}");
}

/// A model folder with a `unet` (diffusers) and a `text_encoder` (transformers).
fn scratch_model(root: &Path) -> ModelDir {
    std::fs::create_dir_all(root.join("unet")).unwrap();
    std::fs::create_dir_all(root.join("text_encoder")).unwrap();
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "safety_checker": [null, null]}"#,
    )
    .unwrap();
    std::fs::write(root.join("unet/config.json"), "{}").unwrap();
    std::fs::write(root.join("text_encoder/config.json"), "{}").unwrap();
    ModelDir::open(root).unwrap()
}

#[test]
fn weight_files_prefer_fp16_and_follow_shard_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = scratch_model(tmp.path());
    let unet = tmp.path().join("unet");
    let touch = |name: &str| std::fs::write(unet.join(name), b"x").unwrap();

    // Nothing yet: the error names the component and the expected file.
    match model.weight_files("unet").unwrap_err() {
        Error::MissingComponent { what, path, .. } => {
            assert!(what.contains("unet"), "{what}");
            assert_eq!(path, unet.join("diffusion_pytorch_model.safetensors"));
        }
        other => panic!("{other}"),
    }
    match model.weight_files("text_encoder").unwrap_err() {
        Error::MissingComponent { path, .. } => {
            assert_eq!(path, tmp.path().join("text_encoder/model.safetensors"))
        }
        other => panic!("{other}"),
    }

    // Only pickle: refused.
    touch("diffusion_pytorch_model.bin");
    let err = model.weight_files("unet").unwrap_err();
    assert!(matches!(err, Error::UnsupportedWeights { .. }), "{err}");
    assert!(
        err.to_string().contains("only safetensors are supported"),
        "{err}"
    );

    // Sharded plain checkpoint.
    let index = r#"{"metadata": {"total_size": 2},
        "weight_map": {"a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
                       "b.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                       "c.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}"#;
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        index,
    )
    .unwrap();
    touch("diffusion_pytorch_model-00001-of-00002.safetensors");
    match model.weight_files("unet").unwrap_err() {
        Error::MissingComponent { what, path, .. } => {
            assert!(what.contains("shard"), "{what}");
            assert_eq!(
                path,
                unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")
            );
        }
        other => panic!("{other}"),
    }
    touch("diffusion_pytorch_model-00002-of-00002.safetensors");
    assert_eq!(
        model.weight_files("unet").unwrap(),
        [
            unet.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
            unet.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        ]
    );

    // A single plain file beats the shards; the fp16 variant beats both.
    touch("diffusion_pytorch_model.safetensors");
    assert_eq!(
        model.weight_files("unet").unwrap(),
        [unet.join("diffusion_pytorch_model.safetensors")]
    );
    touch("diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(
        model.weight_files("unet").unwrap(),
        [unet.join("diffusion_pytorch_model.fp16.safetensors")]
    );

    // A sharded fp16 variant (diffusers' `.safetensors.index.fp16.json` naming).
    let fp16_index =
        r#"{"weight_map": {"a": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"}}"#;
    std::fs::remove_file(unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.fp16.json"),
        fp16_index,
    )
    .unwrap();
    touch("diffusion_pytorch_model.fp16-00001-of-00001.safetensors");
    assert_eq!(
        model.weight_files("unet").unwrap(),
        [unet.join("diffusion_pytorch_model.fp16-00001-of-00001.safetensors")]
    );

    // A shard index pointing outside its folder is refused.
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.fp16.json"),
        r#"{"weight_map": {"a": "../text_encoder/x.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(
        model.weight_files("unet"),
        Err(Error::Config { .. })
    ));

    // transformers' fp16 variant.
    std::fs::write(tmp.path().join("text_encoder/model.safetensors"), b"x").unwrap();
    std::fs::write(tmp.path().join("text_encoder/model.fp16.safetensors"), b"x").unwrap();
    assert_eq!(
        model.weight_files("text_encoder").unwrap(),
        [tmp.path().join("text_encoder/model.fp16.safetensors")]
    );

    // Unknown components are named with what the index lists.
    let err = model.weight_files("vae").unwrap_err().to_string();
    assert!(
        err.contains("`vae`") && err.contains("text_encoder, unet"),
        "{err}"
    );
    assert!(model.component_dir("safety_checker").is_err());
}

#[test]
fn lists_cached_and_local_models() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let main = add_snapshot(&hub, "org/tiny-sd15", MAIN, &["main"], &tiny_sd15());
    let v1 = add_snapshot(&hub, "org/tiny-sd15", V1, &["v1"], &tiny_sd15());
    add_snapshot(
        &hub,
        "other/tiny-flux",
        MAIN,
        &["main"],
        &fixtures().join("models/tiny-flux-dev"),
    );
    // Not diffusers models: skipped.
    std::fs::create_dir_all(hub.join("models--org--no-index/snapshots").join(MAIN)).unwrap();
    std::fs::create_dir_all(hub.join("datasets--org--data/snapshots").join(MAIN)).unwrap();

    let options = ResolveOptions {
        model_dirs: vec![fixtures().join("models"), tmp.path().join("absent")],
        ..offline(&hub)
    };
    let models = list_local_models(&options);
    let references: Vec<&str> = models.iter().map(|m| m.reference.as_str()).collect();
    assert_eq!(
        &references[..3],
        ["org/tiny-sd15", "org/tiny-sd15@v1", "other/tiny-flux"]
    );
    assert_eq!(models.len(), 3 + 7, "{references:?}");

    let sd15_size: u64 = files_under(&tiny_sd15())
        .iter()
        .map(|f| std::fs::metadata(tiny_sd15().join(f)).unwrap().len())
        .sum();
    let first = &models[0];
    assert_eq!(first.repo_id.as_deref(), Some("org/tiny-sd15"));
    assert_eq!(first.revisions, ["main"]);
    assert_eq!(first.commit.as_deref(), Some(MAIN));
    assert_eq!(first.path, main);
    assert_eq!(first.pipeline_class, "StableDiffusionPipeline");
    assert_eq!(first.size_bytes, sd15_size);
    assert_eq!(models[1].path, v1);
    assert_eq!(models[1].revisions, ["v1"]);
    assert_eq!(models[2].pipeline_class, "FluxPipeline");

    let local: Vec<(&str, &str)> = models[3..]
        .iter()
        .map(|m| {
            (
                m.path.file_name().unwrap().to_str().unwrap(),
                m.pipeline_class.as_str(),
            )
        })
        .collect();
    assert_eq!(
        local,
        [
            ("tiny-flux-dev", "FluxPipeline"),
            ("tiny-flux-fill", "FluxFillPipeline"),
            ("tiny-flux-schnell", "FluxPipeline"),
            ("tiny-sd15", "StableDiffusionPipeline"),
            ("tiny-sd15-inpaint", "StableDiffusionInpaintPipeline"),
            ("tiny-sd2-v", "StableDiffusionPipeline"),
            ("tiny-sdxl", "StableDiffusionXLPipeline"),
        ]
    );
    assert!(models[3..]
        .iter()
        .all(|m| m.repo_id.is_none() && m.size_bytes > 0));
    assert_eq!(models[6].size_bytes, sd15_size);

    // Every listed model resolves by its reference.
    for model in &models {
        let resolved = resolve_model(&model.reference, &options).unwrap();
        assert_eq!(resolved.path(), model.path, "{}", model.reference);
    }

    // No cache at all: nothing, no error.
    let empty = ResolveOptions {
        cache_dir: Some(tmp.path().join("nowhere")),
        ..Default::default()
    };
    assert!(list_local_models(&empty).is_empty());
}

// Single-file checkpoints (issue 14): the default config repo from the hub
// cache, the `--config` hint when it is missing, the prediction type, and
// the refusals (pickles, unknown layouts, a config of another family).

fn single_file(name: &str) -> PathBuf {
    single_file_fixture(name)
}

/// A copy of `source` without its `.safetensors` files (configs and tokenizers).
fn copy_configs(source: &Path, target: &Path) {
    for rel in files_under(source) {
        if rel.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        std::fs::create_dir_all(target.join(&rel).parent().unwrap()).unwrap();
        std::fs::copy(source.join(&rel), target.join(&rel)).unwrap();
    }
}

#[test]
fn single_file_takes_the_default_config_repo_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let configs = tmp.path().join("configs");
    copy_configs(&tiny_sd15(), &configs);
    let hub = tmp.path().join("hub");
    add_snapshot(
        &hub,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        MAIN,
        &["main"],
        &configs,
    );
    let file = single_file("tiny-sd15");
    let model = resolve_model(file.to_str().unwrap(), &offline(&hub)).unwrap();
    let single = model.single_file().expect("opened as a single file");
    assert_eq!(single.path(), file);
    assert_eq!(
        single.detected().architecture,
        easel_diffusion::loader::Architecture::StableDiffusion1
    );
    assert_eq!(model.name(), file.display().to_string());
    assert_eq!(
        model.family(),
        Some(easel_diffusion::loader::ModelFamily::StableDiffusion)
    );
    assert_eq!(
        single.components().collect::<Vec<_>>(),
        ["text_encoder", "unet", "vae"]
    );
    let unet = single.source("unet").unwrap();
    assert!(unet.contains("down_blocks.0.attentions.0.proj_in.weight"));
    assert!(unet.contains("up_blocks.0.upsamplers.0.conv.weight"));
    let vae = single.source("vae").unwrap();
    // 1x1 convolution in the file, a linear weight under the diffusers name.
    let q = vae
        .tensor(
            "decoder.mid_block.attentions.0.to_q.weight",
            &[64, 64],
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .unwrap();
    assert_eq!(q.dims(), [64, 64]);
}

#[test]
fn single_file_without_its_config_repo_names_the_config_option() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model(
        single_file("tiny-sdxl").to_str().unwrap(),
        &offline(tmp.path()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--config"), "{err}");
    assert!(
        err.contains("stabilityai/stable-diffusion-xl-base-1.0"),
        "{err}"
    );
    assert!(err.contains("Stable Diffusion XL"), "{err}");
}

#[test]
fn pickle_checkpoints_are_refused_with_how_to_convert() {
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["ckpt", "pt", "pth", "bin"] {
        let path = tmp.path().join(format!("model.{ext}"));
        std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
        let err = resolve_model(path.to_str().unwrap(), &offline(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickle"), "{ext}: {err}");
        assert!(err.contains("run any code"), "{ext}: {err}");
        assert!(err.contains("safetensors"), "{ext}: {err}");
        assert!(err.contains("weights_only=True"), "{ext}: {err}");
    }
}

#[test]
fn single_files_of_unknown_layouts_are_refused_naming_what_was_looked_for() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, keys: &[&str]| {
        let path = tmp.path().join(name);
        let tensors: std::collections::HashMap<String, Tensor> = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    // A LoRA is a .safetensors file, but not a model.
    let lora = write(
        "lora.safetensors",
        &["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
    );
    let err = resolve_model(lora.to_str().unwrap(), &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("match no supported single-file layout"),
        "{err}"
    );
    assert!(err.contains("model.diffusion_model."), "{err}");
    assert!(err.contains("cond_stage_model.transformer."), "{err}");
    assert!(err.contains("conditioner.embedders.1.model."), "{err}");
    assert!(err.contains("double_blocks.*"), "{err}");
    assert!(
        err.contains("lora_unet_down_blocks_0_attentions_0_proj_in"),
        "{err}"
    );
    assert!(err.contains("looks like a LoRA adapter"), "{err}");
    // FLUX in Black Forest Labs' layout without the `img_in` its kind is
    // told by: refused naming the tensor and the widths supported.
    let flux = write("flux.safetensors", &["double_blocks.0.img_attn.qkv.weight"]);
    let err = resolve_model(flux.to_str().unwrap(), &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("FLUX"), "{err}");
    assert!(err.contains("img_in.weight"), "{err}");
    assert!(err.contains("[width, 384]"), "{err}");
    // Not safetensors at all.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let err = resolve_model(junk.to_str().unwrap(), &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a readable safetensors or GGUF file"),
        "{err}"
    );
}

#[test]
fn single_file_config_must_be_of_the_same_architecture() {
    let err = easel_diffusion::loader::open_single_file(
        &single_file("tiny-sdxl"),
        Some(tiny_sd15().to_str().unwrap()),
        None,
        &ResolveOptions {
            offline: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Stable Diffusion XL"), "{err}");
    assert!(err.contains("StableDiffusionPipeline"), "{err}");
}

#[test]
fn single_file_prediction_type_from_the_option_the_file_or_the_config() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let options = ResolveOptions {
        offline: true,
        ..Default::default()
    };
    // A config folder whose scheduler says epsilon.
    let configs = tmp.path().join("sd2-epsilon");
    copy_configs(&fixtures().join("models/tiny-sd2-v"), &configs);
    let scheduler = configs.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&scheduler).unwrap();
    assert!(text.contains("v_prediction"));
    std::fs::write(&scheduler, text.replace("v_prediction", "epsilon")).unwrap();
    let prediction = |file: &Path, option: Option<&str>| {
        let model = easel_diffusion::loader::open_single_file(
            file,
            Some(configs.to_str().unwrap()),
            option,
            &options,
        )
        .unwrap();
        model.component_config("scheduler").unwrap()["prediction_type"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sd2 = single_file("tiny-sd2-v");
    // The tiny file does not tell: the config's.
    assert_eq!(prediction(&sd2, None), "epsilon");
    assert_eq!(prediction(&sd2, Some("v_prediction")), "v_prediction");
    // ComfyUI marks v models with a `v_pred` key.
    let mut tensors = candle_core::safetensors::load(&sd2, &Device::Cpu).unwrap();
    tensors.insert(
        "v_pred".into(),
        Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let marked = tmp.path().join("sd2-vpred.safetensors");
    candle_core::safetensors::save(&tensors, &marked).unwrap();
    assert_eq!(prediction(&marked, None), "v_prediction");
    assert_eq!(prediction(&marked, Some("epsilon")), "epsilon");
    let err = easel_diffusion::loader::open_single_file(&sd2, None, Some("v"), &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prediction_type"), "{err}");
    assert!(err.contains("epsilon, v_prediction, sample"), "{err}");
}

/// ComfyUI's test of an SD 2.x checkpoint of real size: the spread of the
/// last attention block's norm bias tells v-prediction (wide) from epsilon,
/// which also picks the default config repo (`-2-1` vs `-2-1-base`); a
/// 9-channel conv_in is an inpainting model.
#[test]
fn sd2_prediction_type_is_detected_from_real_size_weights() {
    use candle_core::{DType, Device, Tensor};
    use easel_diffusion::loader::{detect_single_file, Architecture};
    let tmp = tempfile::tempdir().unwrap();
    let detect = |name: &str, bias_scale: f64, in_channels: usize| {
        let mut tensors = std::collections::HashMap::new();
        let small = || Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            Tensor::zeros((320, in_channels, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "first_stage_model.encoder.conv_in.bias".to_string(),
            small(),
        );
        tensors.insert(
            "cond_stage_model.model.transformer.resblocks.0.ln_1.bias".to_string(),
            small(),
        );
        let bias = (Tensor::randn(0f32, 1f32, 1280, &Device::Cpu).unwrap() * bias_scale).unwrap();
        tensors.insert(
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias".to_string(),
            bias,
        );
        let path = tmp.path().join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let mapped = easel_diffusion::loader::CheckpointFile::open(&path).unwrap();
        detect_single_file(&path, &mapped)
    };
    let v = detect("v.safetensors", 0.2, 4).unwrap();
    assert_eq!(v.architecture, Architecture::StableDiffusion2);
    assert_eq!(v.v_prediction, Some(true));
    assert_eq!(v.default_config_repo(), "stabilityai/stable-diffusion-2-1");
    let eps = detect("eps.safetensors", 0.02, 4).unwrap();
    assert_eq!(eps.v_prediction, Some(false));
    assert_eq!(
        eps.default_config_repo(),
        "stabilityai/stable-diffusion-2-1-base"
    );
    let inpaint = detect("inpaint.safetensors", 0.02, 9).unwrap();
    assert!(inpaint.inpainting);
    assert_eq!(
        inpaint.default_config_repo(),
        "stabilityai/stable-diffusion-2-inpainting"
    );
    let err = detect("odd.safetensors", 0.02, 5).unwrap_err().to_string();
    assert!(err.contains("supported: 4"), "{err}");
}

// FLUX transformer-only single files (BFL layout, issue 14).

#[test]
fn flux_single_files_are_told_apart_by_guidance_and_img_in_width() {
    use easel_diffusion::loader::{detect_single_file, Architecture, ModelFamily};
    for (name, architecture, fill, repo) in [
        (
            "tiny-flux-dev",
            Architecture::FluxDev,
            false,
            "black-forest-labs/FLUX.1-dev",
        ),
        (
            "tiny-flux-schnell",
            Architecture::FluxSchnell,
            false,
            "black-forest-labs/FLUX.1-schnell",
        ),
        (
            "tiny-flux-fill",
            Architecture::FluxDev,
            true,
            "black-forest-labs/FLUX.1-Fill-dev",
        ),
    ] {
        let file = single_file(name);
        let tensors = easel_diffusion::loader::CheckpointFile::open(&file).unwrap();
        let detected = detect_single_file(&file, &tensors).unwrap();
        assert_eq!(detected.architecture, architecture, "{name}");
        assert_eq!(detected.inpainting, fill, "{name}");
        assert!(detected.transformer_only(), "{name}");
        assert_eq!(detected.default_config_repo(), repo, "{name}");
        let family = if fill {
            ModelFamily::FluxFill
        } else {
            ModelFamily::Flux
        };
        assert_eq!(detected.family(), family, "{name}");
    }
}

#[test]
fn flux_single_file_takes_other_components_from_the_default_repo() {
    // No --config: the FLUX.1-dev repo from the hub cache gives the text
    // encoders, VAE, tokenizers and scheduler; its transformer weights are
    // not needed (removed here), the file's are read.
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let snapshot = add_snapshot(
        &hub,
        "black-forest-labs/FLUX.1-dev",
        MAIN,
        &["main"],
        &fixtures().join("models/tiny-flux-dev"),
    );
    std::fs::remove_file(snapshot.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let file = single_file("tiny-flux-dev");
    let model = resolve_model(file.to_str().unwrap(), &offline(&hub)).unwrap();
    assert_eq!(
        model.family(),
        Some(easel_diffusion::loader::ModelFamily::Flux)
    );
    let single = model.single_file().unwrap();
    assert_eq!(single.components().collect::<Vec<_>>(), ["transformer"]);
    let infos = single.tensor_infos("transformer");
    let find = |n: &str| {
        infos
            .iter()
            .find(|(k, _, _)| k == n)
            .map(|(_, _, s)| s.clone())
    };
    // linear1 [3*32 + 128, 32] splits by the width img_in gives (32).
    assert_eq!(
        find("single_transformer_blocks.1.attn.to_v.weight"),
        Some(vec![32, 32])
    );
    assert_eq!(
        find("single_transformer_blocks.1.proj_mlp.weight"),
        Some(vec![128, 32])
    );
    assert_eq!(find("norm_out.linear.weight"), Some(vec![64, 32]));
    // Without the repo in the cache: an error naming it and --config.
    let err = resolve_model(file.to_str().unwrap(), &offline(&tmp.path().join("empty")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("black-forest-labs/FLUX.1-dev"), "{err}");
    assert!(err.contains("--config"), "{err}");
    assert!(err.contains("text encoders and VAE"), "{err}");
}

#[test]
fn flux_single_file_config_must_be_flux() {
    let err = easel_diffusion::loader::open_single_file(
        &single_file("tiny-flux-schnell"),
        Some(tiny_sd15().to_str().unwrap()),
        None,
        &ResolveOptions {
            offline: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("FLUX.1 schnell"), "{err}");
    assert!(err.contains("StableDiffusionPipeline"), "{err}");
}
