//! `--models-dir` on A1111 and ComfyUI model folders (issue 14): `easel
//! models list` tells each file's kind, family, format and size from its
//! header, and `--model NAME` / `--lora NAME` find files by name.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `easel ARGS`, offline, with `hub` as the Hugging Face cache.
fn easel(hub: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", hub)
        .output()
        .expect("run easel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

/// `file` with its 2-D weights stored as `F8_E4M3` (zero bytes: only the
/// header is read by the listing).
fn write_fp8_copy(file: &Path, to: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let count: usize = view.shape().iter().product();
            (name, view.shape().to_vec(), vec![0u8; count])
        })
        .collect();
    let mut views = Vec::new();
    for (name, shape, data) in &zeros {
        let original = st.tensor(name).unwrap();
        let view = if shape.len() == 2 {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F8_E4M3, shape.clone(), data)
        } else {
            safetensors::tensor::TensorView::new(
                original.dtype(),
                original.shape().to_vec(),
                original.data(),
            )
        }
        .unwrap();
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, to).unwrap();
}

/// A GGUF v3 file with `general.architecture = flux` and two f32 tensors
/// named as a FLUX.1 dev transformer's (`double_blocks.*`, `guidance_in.*`).
fn write_flux_gguf(to: &Path) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend(2u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    string(&mut out, "flux");
    for (i, name) in [
        "double_blocks.0.img_attn.proj.weight",
        "guidance_in.in_layer.weight",
    ]
    .iter()
    .enumerate()
    {
        string(&mut out, name);
        out.extend(1u32.to_le_bytes()); // dims
        out.extend(4u64.to_le_bytes());
        out.extend(0u32.to_le_bytes()); // F32
        out.extend((i as u64 * 32).to_le_bytes());
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend([0u8; 48]);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::write(to, out).unwrap();
}

/// The config and tokenizer files (no weights) of fixture folder `fixture`
/// as the hub-cache snapshot of `repo_id` (the default config repo of a
/// single-file checkpoint, read offline).
fn cache_configs(hub: &Path, repo_id: &str, fixture: &str) {
    let commit = "1111111111111111111111111111111111111111";
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    let source = fixtures().join("models").join(fixture);
    let mut stack = vec![source.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none_or(|e| e != "safetensors") {
                copy(&path, &snapshot.join(path.strip_prefix(&source).unwrap()));
            }
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

/// An A1111 install (given as the install folder) and a ComfyUI install
/// (given as its `models/` folder), built from the fixtures.
struct Trees {
    _dir: tempfile::TempDir,
    hub: PathBuf,
    webui: PathBuf,
    comfy_models: PathBuf,
}

fn trees() -> Trees {
    let dir = tempfile::tempdir().unwrap();
    let webui = dir.path().join("stable-diffusion-webui");
    let a = webui.join("models");
    copy(
        &single_file_fixture("tiny-sd15"),
        &a.join("Stable-diffusion/dreamshaper_8.safetensors"),
    );
    std::fs::write(a.join("Stable-diffusion/old.ckpt"), b"\x80\x02}q\x00.").unwrap();
    copy(
        &fixtures().join("loras/tiny-sd15-lora.safetensors"),
        &a.join("Lora/detail.safetensors"),
    );
    copy(
        &fixtures().join("models/tiny-sd15/vae/diffusion_pytorch_model.safetensors"),
        &a.join("VAE/sd-vae.safetensors"),
    );

    let comfy_models = dir.path().join("ComfyUI/models");
    let c = &comfy_models;
    copy(
        &single_file_fixture("tiny-sdxl"),
        &c.join("checkpoints/sdxl/juggernaut.safetensors"),
    );
    copy(
        &single_file_fixture("tiny-flux-schnell"),
        &c.join("diffusion_models/flux1-schnell.safetensors"),
    );
    copy(
        &single_file_fixture("tiny-flux-dev"),
        &c.join("diffusion_models/flux1-dev.safetensors"),
    );
    copy(
        &single_file_fixture("tiny-flux-fill"),
        &c.join("unet/flux1-fill.safetensors"),
    );
    write_fp8_copy(
        &single_file_fixture("tiny-flux-dev"),
        &c.join("diffusion_models/flux1-dev-fp8.safetensors"),
    );
    write_flux_gguf(&c.join("unet/flux1-dev-Q8_0.gguf"));
    copy(
        &fixtures().join("loras/tiny-flux-lora.safetensors"),
        &c.join("loras/flux-style.safetensors"),
    );
    copy(
        &fixtures().join("loras/tiny-sdxl-lora-kohya.safetensors"),
        &c.join("loras/xl-style.safetensors"),
    );
    copy(
        &fixtures().join("models/tiny-flux-schnell/vae/diffusion_pytorch_model.safetensors"),
        &c.join("vae/ae.safetensors"),
    );
    copy(
        &fixtures().join("models/tiny-flux-schnell/text_encoder_2/model.safetensors"),
        &c.join("text_encoders/t5xxl.safetensors"),
    );
    copy(
        &fixtures().join("models/tiny-flux-schnell/text_encoder/model.safetensors"),
        &c.join("clip/clip_l.safetensors"),
    );
    let hub = dir.path().join("hub");
    cache_configs(
        &hub,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "tiny-sd15",
    );
    Trees {
        _dir: dir,
        hub,
        webui,
        comfy_models,
    }
}

#[test]
fn models_list_tells_kind_family_format_and_size() {
    let t = trees();
    let (webui, comfy) = (t.webui.to_str().unwrap(), t.comfy_models.to_str().unwrap());
    let o = easel(
        &t.hub,
        &[
            "models",
            "list",
            "--models-dir",
            webui,
            "--models-dir",
            comfy,
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The model-folder files (not the hub cache's config snapshot).
    let rows: Vec<&serde_json::Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["layout"].is_string())
        .collect();
    let want = [
        (
            "dreamshaper_8",
            "checkpoint",
            Some("SD 1.x"),
            "safetensors",
            "a1111",
        ),
        ("old", "checkpoint", None, "pickle", "a1111"),
        (
            "detail",
            "lora",
            Some("SD 1.x / 2.x"),
            "safetensors",
            "a1111",
        ),
        (
            "sd-vae",
            "vae",
            Some("SD 1.x / 2.x / SDXL"),
            "safetensors",
            "a1111",
        ),
        (
            "juggernaut",
            "checkpoint",
            Some("SDXL"),
            "safetensors",
            "comfyui",
        ),
        (
            "flux1-schnell",
            "diffusion_model",
            Some("FLUX.1 schnell"),
            "safetensors",
            "comfyui",
        ),
        (
            "flux1-dev",
            "diffusion_model",
            Some("FLUX.1 dev"),
            "safetensors",
            "comfyui",
        ),
        (
            "flux1-dev-fp8",
            "diffusion_model",
            Some("FLUX.1 dev"),
            "fp8_safetensors",
            "comfyui",
        ),
        (
            "flux1-fill",
            "diffusion_model",
            Some("FLUX.1 Fill"),
            "safetensors",
            "comfyui",
        ),
        (
            "flux1-dev-Q8_0",
            "diffusion_model",
            Some("FLUX.1 dev"),
            "gguf",
            "comfyui",
        ),
        (
            "flux-style",
            "lora",
            Some("FLUX.1"),
            "safetensors",
            "comfyui",
        ),
        ("xl-style", "lora", Some("SDXL"), "safetensors", "comfyui"),
        ("ae", "vae", Some("FLUX.1"), "safetensors", "comfyui"),
        (
            "t5xxl",
            "text_encoder",
            Some("T5 encoder"),
            "safetensors",
            "comfyui",
        ),
        (
            "clip_l",
            "text_encoder",
            Some("CLIP text encoder"),
            "safetensors",
            "comfyui",
        ),
    ];
    assert_eq!(rows.len(), want.len(), "{rows:#?}");
    for (name, kind, family, format, layout) in want {
        let row = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {rows:#?}"));
        assert_eq!(row["kind"], kind, "{row}");
        assert_eq!(row["family"].as_str(), family, "{row}");
        assert_eq!(row["format"], format, "{row}");
        assert_eq!(row["layout"], layout, "{row}");
        let path = Path::new(row["path"].as_str().unwrap());
        assert_eq!(
            row["size_bytes"].as_u64(),
            Some(std::fs::metadata(path).unwrap().len()),
            "{row}"
        );
    }
    let old = rows.iter().find(|r| r["name"] == "old").unwrap();
    assert!(
        old["unknown_reason"].as_str().unwrap().contains("pickle"),
        "{old}"
    );
    let sd = rows.iter().find(|r| r["name"] == "dreamshaper_8").unwrap();
    assert_eq!(sd["pipeline_class"], "StableDiffusionPipeline");

    // The table: one line per file, unknown families with their reason.
    let o = easel(
        &t.hub,
        &[
            "models",
            "list",
            "--models-dir",
            webui,
            "--models-dir",
            comfy,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        line("dreamshaper_8").contains("checkpoint SD 1.x safetensors "),
        "{text}"
    );
    assert!(
        line("flux1-dev-fp8").contains("diffusion model FLUX.1 dev fp8 safetensors"),
        "{text}"
    );
    assert!(line("flux1-dev-Q8_0").contains("FLUX.1 dev GGUF"), "{text}");
    assert!(
        line("old").contains("checkpoint unknown pickle (refused)"),
        "{text}"
    );
    assert!(text.contains("unknown family: not read: pickle"), "{text}");
}

/// `--model NAME` and `--lora NAME[:SCALE]` from both layouts give the
/// images the files' paths give; an ambiguous name and a pickle are refused
/// before anything is written.
#[test]
fn model_and_lora_names_resolve_in_both_layouts() {
    let t = trees();
    let (webui, comfy) = (t.webui.to_str().unwrap(), t.comfy_models.to_str().unwrap());
    let out = t.hub.parent().unwrap().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let generate = |model: &str, lora: &str, extra: &[&str], file: &str| {
        let path = out.join(file);
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--lora",
            lora,
            "--prompt",
            "a red fox",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "1",
            "--output",
        ];
        let p = path.to_str().unwrap().to_string();
        args.push(&p);
        args.extend(["--models-dir", webui, "--models-dir", comfy]);
        args.extend(extra);
        let o = easel(&t.hub, &args);
        (o, path)
    };
    // A1111: the checkpoint with its default config repo from the cache.
    let (o, by_name) = generate("dreamshaper_8", "detail:0.8", &[], "a-name.png");
    assert!(o.status.success(), "{}", stderr(&o));
    let file = t
        .webui
        .join("models/Stable-diffusion/dreamshaper_8.safetensors");
    let lora = format!(
        "{}:0.8",
        t.webui.join("models/Lora/detail.safetensors").display()
    );
    let (o, by_path) = generate(file.to_str().unwrap(), &lora, &[], "a-path.png");
    assert!(o.status.success(), "{}", stderr(&o));
    // The PNG text names the model as given: compare the pixels.
    let pixels = |p: &Path| {
        easel_core::decode_image(&std::fs::read(p).unwrap())
            .unwrap()
            .into_rgb8()
    };
    assert_eq!(pixels(&by_name), pixels(&by_path));
    let (o, full_name) = generate(
        "dreamshaper_8.safetensors",
        "detail.safetensors:0.8",
        &[],
        "a-full.png",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pixels(&full_name), pixels(&by_path));

    // ComfyUI: a FLUX transformer file with --config, a LoRA from `loras`.
    let config = fixtures().join("models/tiny-flux-dev");
    let config = config.to_str().unwrap();
    let (o, by_name) = generate(
        "flux1-dev",
        "flux-style",
        &["--config", config],
        "c-name.png",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let file = t
        .comfy_models
        .join("diffusion_models/flux1-dev.safetensors");
    let lora = t.comfy_models.join("loras/flux-style.safetensors");
    let (o, by_path) = generate(
        file.to_str().unwrap(),
        lora.to_str().unwrap(),
        &["--config", config],
        "c-path.png",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pixels(&by_name), pixels(&by_path));

    // Refusals, with nothing written.
    copy(
        &t.webui
            .join("models/Stable-diffusion/dreamshaper_8.safetensors"),
        &t.comfy_models.join("checkpoints/dreamshaper_8.safetensors"),
    );
    let (o, path) = generate("dreamshaper_8", "detail", &[], "ambiguous.png");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("ambiguous"), "{e}");
    assert!(
        e.contains("Stable-diffusion/dreamshaper_8.safetensors"),
        "{e}"
    );
    assert!(e.contains("checkpoints/dreamshaper_8.safetensors"), "{e}");
    assert!(!path.exists());
    let (o, path) = generate("old", "detail", &[], "pickle.png");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pickle"), "{}", stderr(&o));
    assert!(!path.exists());
    std::fs::write(t.webui.join("models/Lora/old-style.pt"), b"\x80\x02}q\x00.").unwrap();
    let (o, path) = generate("juggernaut", "old-style:0.5", &[], "pickle-lora.png");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pickle"), "{}", stderr(&o));
    assert!(!path.exists());
    let (o, path) = generate("juggernaut", "no-such-lora", &[], "nolora.png");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-lora"), "{}", stderr(&o));
    assert!(!path.exists());
}
