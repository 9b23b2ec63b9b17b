//! The built `easel` binary end to end on the tiny fixture models.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;
#[path = "../../../tests/support/component_files.rs"]
mod component_files_support;
use component_files_support::component_file;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn easel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_DEVICE")
        .output()
        .expect("run easel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rgb8(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let img = easel_core::decode_image(&bytes).unwrap();
    let (w, h) = (img.width, img.height);
    (w, h, img.into_rgb8())
}

/// The largest per-channel difference between two 8-bit images.
fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Run `easel generate` with the settings of reference case `case` (its
/// prompt, negative prompt, steps, guidance, size and seed, and its init
/// image, mask, strength and LoRA) and `scheduler`, and check the PNG is
/// within one level per channel of diffusers' PNG. Returns the `--json` result.
fn reproduce_reference_png(case: &str, scheduler: &str) -> serde_json::Value {
    reproduce_png_in("references", case, scheduler, &[])
}

/// [`reproduce_reference_png`] for a case of `tests/fixtures/<folder>/`,
/// with `extra` arguments (replacing the case's `--image` / `--mask` when
/// they name them).
fn reproduce_png_in(
    folder: &str,
    case: &str,
    scheduler: &str,
    extra: &[&str],
) -> serde_json::Value {
    reproduce_png_within(folder, case, scheduler, extra, 1)
}

/// [`reproduce_png_in`] with the image allowed `max_levels` from the
/// reference's (per channel, 8-bit).
fn reproduce_png_within(
    folder: &str,
    case: &str,
    scheduler: &str,
    extra: &[&str],
    max_levels: u8,
) -> serde_json::Value {
    let refs = fixtures().join(folder);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let model = fixtures().join(c["model"].as_str().unwrap());
    let num = |k: &str| c[k].to_string();
    let (steps, guidance, seed) = (
        num("num_inference_steps"),
        num("guidance_scale"),
        num("seed"),
    );
    let mut args: Vec<String> = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--steps",
        &steps,
        "--guidance-scale",
        &guidance,
        "--seed",
        &seed,
        "--scheduler",
        scheduler,
        "--output",
        out.to_str().unwrap(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut push = |flag: &str, value: String| args.extend([flag.to_string(), value]);
    for key in ["width", "height"] {
        if let Some(v) = c[key].as_u64() {
            push(&format!("--{key}"), v.to_string());
        }
    }
    if let Some(neg) = c["negative_prompt"].as_str() {
        push("--negative-prompt", neg.to_string());
    }
    if !extra.contains(&"--image") {
        if let Some(f) = c["init_image"].as_str() {
            push("--image", refs.join(f).display().to_string());
        }
    }
    if !extra.contains(&"--mask") {
        if let Some(f) = c["mask_image"].as_str() {
            push("--mask", refs.join(f).display().to_string());
        }
    }
    if let Some(s) = c["strength"].as_f64() {
        push("--strength", s.to_string());
    }
    if let Some(n) = c["max_sequence_length"].as_u64() {
        push("--max-sequence-length", n.to_string());
    }
    if let Some(f) = c["lora"].as_str() {
        let scale = c["lora_scale"].as_f64().unwrap_or(1.0);
        push(
            "--lora",
            format!("{}:{scale}", fixtures().join(f).display()),
        );
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = easel(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    let (w, h, got) = rgb8(&out);
    let (rw, rh, want) = rgb8(&refs.join(format!("{case}.0.png")));
    assert_eq!((w, h), (rw, rh));
    let d = max_level_diff(&got, &want);
    assert!(d <= max_levels, "{case}: max difference {d} levels");

    // The generation parameters are embedded in the PNG.
    let meta = easel_core::read_png_metadata(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(meta.prompt, c["prompt"].as_str().unwrap());
    assert_eq!(
        meta.negative_prompt.as_deref(),
        c["negative_prompt"].as_str()
    );
    assert_eq!(meta.seed.to_string(), seed);
    assert_eq!(meta.steps.to_string(), steps);
    assert_eq!((meta.width, meta.height), (rw, rh));
    if let Some(s) = c["strength"].as_f64() {
        assert_eq!(meta.extra["Denoising strength"], s.to_string());
    }
    json
}

/// Issue 2: `easel generate` with the settings of `sd15_txt2img_euler.json`
/// and `--seed 42` reproduces diffusers' PNG within one level per channel.
#[test]
fn generate_reproduces_sd15_euler_reference_png() {
    let json = reproduce_reference_png("sd15_txt2img_euler", "euler");
    assert_eq!(json["images"][0]["seed"], 42);
    assert_eq!(json["scheduler"], "EulerDiscreteScheduler");
    assert_eq!(json["timings"]["step_s"].as_array().unwrap().len(), 4);
}

/// `--precision bf16` on the CPU computes bf16 where the CPU has
/// AVX512-BF16 (the image within the bf16 bound of
/// easel-diffusion's tests/half_precision.rs of the fp32 reference) and
/// `fp16` computes as bf16 there, with a warning; on a CPU without it (or
/// with `EASEL_KERNELS=off`) both compute fp32 and say so: in the `--json`
/// result's warnings and its `precision`, with the fp32 image.
#[test]
fn cpu_precision_is_honoured_or_reported() {
    let bf16_cpu = easel_diffusion::models::kernels::bf16_compute_available();
    eprintln!(
        "bf16 kernels on this CPU and process: {bf16_cpu} (checking the {} path)",
        if bf16_cpu { "bf16" } else { "fp32 fallback" }
    );
    let warned = |json: &serde_json::Value, what: &[&str]| {
        json["warnings"].as_array().unwrap().iter().any(|w| {
            let w = w.as_str().unwrap();
            what.iter().all(|part| w.contains(part))
        })
    };
    for requested in ["bf16", "fp16"] {
        let flags = ["--precision", requested];
        let case = ("references", "sd15_txt2img_euler", "euler");
        if bf16_cpu {
            let json = reproduce_png_within(case.0, case.1, case.2, &flags, 14);
            assert_eq!(json["precision"], "bf16", "{requested}");
            let fp16_note = warned(&json, &["fp16 was requested", "bf16"]);
            assert_eq!(fp16_note, requested == "fp16", "{:?}", json["warnings"]);
        } else {
            let json = reproduce_png_in(case.0, case.1, case.2, &flags);
            assert_eq!(json["precision"], "fp32");
            let note = format!("{requested} was requested");
            assert!(warned(&json, &[&note, "fp32"]), "{:?}", json["warnings"]);
        }
    }
}

/// Issue 3: the stochastic Euler ancestral sampler draws its per-step noise
/// from the seeded generator in diffusers' order.
#[test]
fn generate_reproduces_sd15_euler_ancestral_reference_png() {
    let json = reproduce_reference_png("sd15_txt2img_euler_ancestral", "euler_a");
    assert_eq!(json["scheduler"], "EulerAncestralDiscreteScheduler");
}

/// Image i of a batch uses seed + i and equals a single run with that seed.
#[test]
fn batch_images_are_reproducible_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red house",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "40",
        ];
        args.extend_from_slice(extra);
        let o = easel(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run(&[
        "--seed",
        "100",
        "--batch-size",
        "2",
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    let single = dir.path().join("single.png");
    run(&["--seed", "101", "--output", single.to_str().unwrap()]);
    let (_, _, b0) = rgb8(&dir.path().join("easel-100-0.png"));
    let (_, _, b1) = rgb8(&dir.path().join("easel-100-1.png"));
    let (_, _, s) = rgb8(&single);
    assert!(
        max_level_diff(&b1, &s) <= 1,
        "image 1 of the batch differs from seed 101 alone"
    );
    assert_ne!(b0, b1, "two seeds gave the same image");
}

/// Bad input: a one-line error naming the field and the allowed values,
/// a non-zero exit, and no file written.
#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixtures().join("models/tiny-sd15");
    let m = model.to_str().unwrap();
    let o_s = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--width", "65"], "width"),
        (vec!["--height", "4096"], "height"),
        (vec!["--steps", "0"], "steps"),
        (vec!["--steps", "61"], "steps"),
        (vec!["--guidance-scale", "31"], "guidance"),
        (vec!["--batch-size", "5"], "batch"),
        (vec!["--scheduler", "nope"], "euler"),
        (vec!["--scheduler", "flow_match_euler"], "flow-matching"),
        (vec!["--quality", "0"], "quality"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate", "--model", m, "--prompt", "x", "--output", o_s, "--steps", "1",
        ];
        args.extend(extra.iter().copied());
        let o = easel(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.to_lowercase().contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote a file");
    }
    // Unknown model, offline: says where it looked.
    let o = easel(&[
        "generate",
        "--model",
        "nobody/nothing",
        "--prompt",
        "x",
        "--output",
        o_s,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("models--nobody--nothing"),
        "{}",
        stderr(&o)
    );
    // An output directory that does not exist.
    let o = easel(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--output",
        "/nonexistent/dir/x.png",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/dir"), "{}", stderr(&o));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
}

#[test]
fn schedulers_and_models_list() {
    let o = easel(&["schedulers"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for name in [
        "euler",
        "euler_a",
        "ddim",
        "pndm",
        "lms",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "unipc",
        "lcm",
        "flow_match_euler",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    let o = easel(&[
        "models",
        "list",
        "--models-dir",
        fixtures().join("models").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let models: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(models
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["pipeline_class"] == "StableDiffusionXLPipeline"));
}

// Issue 4: image-to-image, inpainting and LoRA from the command line.

/// `--image` + `--strength` (the size comes from the image) reproduce
/// diffusers' `StableDiffusionImg2ImgPipeline` PNG.
#[test]
fn generate_reproduces_sd15_img2img_reference_png() {
    let json = reproduce_reference_png("sd15_img2img_ddim", "ddim");
    assert_eq!(json["task"], "image-to-image");
    assert_eq!(json["strength"], 0.6);
    assert_eq!(
        (json["width"].as_u64(), json["height"].as_u64()),
        (Some(64), Some(64))
    );
    // floor(5 x 0.6) = 3 steps run.
    assert_eq!(json["timings"]["step_s"].as_array().unwrap().len(), 3);
}

/// `--mask` with an inpainting model (9-channel UNet).
#[test]
fn generate_reproduces_sd15_inpaint_reference_png() {
    let json = reproduce_reference_png("sd15_inpaint_ddim", "ddim");
    assert_eq!(json["task"], "inpainting");
    assert_eq!(json["pipeline"], "StableDiffusionInpaintPipeline");
}

/// `--mask alpha`: the init image's transparency is the mask.
#[test]
fn mask_from_alpha_matches_mask_file() {
    let rgba = fixtures().join("generated/init_rgba.png");
    reproduce_png_in(
        "references",
        "sd15_inpaint_ddim",
        "ddim",
        &["--image", rgba.to_str().unwrap(), "--mask", "alpha"],
    );
}

/// A data URI works as `--image`.
#[test]
fn image_as_data_uri() {
    let bytes = std::fs::read(fixtures().join("references/init_image.png")).unwrap();
    let uri = format!("data:image/png;base64,{}", base64_encode(&bytes));
    reproduce_png_in(
        "references",
        "sd15_img2img_ddim",
        "ddim",
        &["--image", &uri],
    );
}

/// Serve one HTTP response (`status`, `body`) on 127.0.0.1 to the first
/// request; returns the URL.
fn serve_once(status: &'static str, body: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
            line.clear();
        }
        let mut stream = stream;
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    format!("http://{addr}/init_image.png")
}

/// An http:// URL works as `--image`; a URL answering 404 is a clear error.
#[test]
fn image_from_url() {
    let bytes = std::fs::read(fixtures().join("references/init_image.png")).unwrap();
    let url = serve_once("200 OK", bytes);
    reproduce_png_in(
        "references",
        "sd15_img2img_ddim",
        "ddim",
        &["--image", &url],
    );
    let url = serve_once("404 Not Found", b"no such image".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixtures().join("models/tiny-sd15");
    let o = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--image",
        &url,
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--image: fetching http://127.0.0.1"), "{err}");
    assert!(err.contains("404"), "{err}");
    assert!(!out.exists());
}

/// The generated 4-channel inpainting case, through the CLI.
#[test]
fn generate_reproduces_generated_sdxl_inpaint_png() {
    let json = reproduce_png_in("generated", "sdxl_inpaint_euler", "euler", &[]);
    assert_eq!(json["task"], "inpainting");
}

#[test]
fn generate_reproduces_sd15_lora_peft_reference_png() {
    let json = reproduce_reference_png("sd15_lora_peft_scale0.7", "euler");
    assert_eq!(json["loras"][0]["scale"], 0.7);
    assert_eq!(json["task"], "text-to-image");
}

#[test]
fn generate_reproduces_sd15_lora_kohya_reference_png() {
    let json = reproduce_reference_png("sd15_lora_kohya_scale1.0", "euler");
    assert_eq!(json["loras"][0]["scale"], 1.0);
}

/// A lossless WebP with alpha (the pixels of `init_rgba.png`) as the init
/// image, its alpha as the mask, reproduces the 9-channel inpainting PNG.
#[test]
fn webp_with_alpha_as_image_and_mask() {
    let rgba = easel_core::decode_image(
        &std::fs::read(fixtures().join("generated/init_rgba.png")).unwrap(),
    )
    .unwrap();
    assert_eq!(rgba.layout, easel_core::PixelLayout::Rgba8);
    let webp = webp::Encoder::from_rgba(&rgba.pixels, rgba.width, rgba.height).encode_lossless();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.webp");
    std::fs::write(&path, &*webp).unwrap();
    let json = reproduce_png_in(
        "references",
        "sd15_inpaint_ddim",
        "ddim",
        &["--image", path.to_str().unwrap(), "--mask", "alpha"],
    );
    assert_eq!(json["task"], "inpainting");
}

/// A JPEG init image (quality 95, via `--init-image`) gives the image-to-image
/// result of the PNG within JPEG's small error; a JPEG mask works too.
#[test]
fn jpeg_image_and_mask() {
    let dir = tempfile::tempdir().unwrap();
    let to_jpeg = |src: &str, dst: &str| {
        let (w, h, rgb) = rgb8(&fixtures().join("references").join(src));
        let img = easel_core::RgbImageRef::new(w, h, &rgb).unwrap();
        let bytes = easel_core::encode_image(
            &img,
            easel_core::OutputFormat::Jpeg,
            95,
            &Default::default(),
        )
        .unwrap();
        let path = dir.path().join(dst);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let init = to_jpeg("init_image.png", "init.jpg");
    let mask = to_jpeg("mask.png", "mask.jpg");
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("references/sd15_img2img_ddim.json")).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("out.png");
    let model = fixtures().join(c["model"].as_str().unwrap());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "--steps",
            "5",
            "--strength",
            "0.6",
            "--seed",
            "42",
            "--scheduler",
            "ddim",
            "--output",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let o = easel(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (json, rgb8(&out))
    };
    let png = fixtures().join("references/init_image.png");
    let (_, (_, _, from_png)) = run(&["--image", png.to_str().unwrap()]);
    let (json, (w, h, from_jpeg)) = run(&["--init-image", init.to_str().unwrap()]);
    assert_eq!(json["task"], "image-to-image");
    assert_eq!((w, h), (64, 64));
    let mean = from_png
        .iter()
        .zip(&from_jpeg)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / from_png.len() as f64;
    eprintln!("JPEG vs PNG init image: mean difference {mean:.3} levels");
    assert!(mean > 0.0 && mean < 3.0, "mean difference {mean}");
    let (json, _) = run(&[
        "--image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
    ]);
    assert_eq!(json["task"], "inpainting");
}

/// `--lora` by folder and by Hugging Face repo id (from the hub cache,
/// offline) reproduces the PEFT LoRA reference PNG like the file path does.
#[test]
fn lora_by_folder_and_repo_id() {
    let case = "sd15_lora_peft_scale0.7";
    let refs = fixtures().join("references");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join(c["lora"].as_str().unwrap());
    // A folder holding the file under diffusers' default name.
    let folder = dir.path().join("my-lora");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(&lora, folder.join("pytorch_lora_weights.safetensors")).unwrap();
    // A hub cache holding repo `someone/tiny-lora` at a commit `main` points to.
    let hub = dir.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = hub.join("models--someone--tiny-lora");
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::copy(
        &lora,
        repo.join("snapshots")
            .join(commit)
            .join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    let (_, _, want) = rgb8(&refs.join(format!("{case}.0.png")));
    let model = fixtures().join(c["model"].as_str().unwrap());
    let out = dir.path().join("out.png");
    for lora_arg in [
        format!("{}:0.7", folder.display()),
        "someone/tiny-lora:0.7".to_string(),
    ] {
        let n = |k: &str| c[k].to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args([
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                c["prompt"].as_str().unwrap(),
                "--steps",
                &n("num_inference_steps"),
                "--guidance-scale",
                &n("guidance_scale"),
                "--width",
                &n("width"),
                "--height",
                &n("height"),
                "--seed",
                &n("seed"),
                "--scheduler",
                "euler",
                "--lora",
                &lora_arg,
                "--output",
                out.to_str().unwrap(),
                "--json",
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap();
        assert!(o.status.success(), "{lora_arg}: {}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(json["loras"][0]["scale"], 0.7);
        assert!(json["loras"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("pytorch_lora_weights.safetensors"));
        let (_, _, got) = rgb8(&out);
        let d = max_level_diff(&got, &want);
        assert!(d <= 1, "{lora_arg}: max difference {d} levels");
    }
}

/// Bad images, masks, strengths and LoRAs: a clear one-line error, a
/// non-zero exit (not a panic), no file written.
#[test]
fn bad_image_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let corrupt = dir.path().join("corrupt.png");
    let mut bytes = std::fs::read(fixtures().join("references/init_image.png")).unwrap();
    bytes.truncate(60);
    std::fs::write(&corrupt, &bytes).unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, b"not an image at all").unwrap();
    // A 64x32 mask for a 64x64 image.
    let wide_mask = dir.path().join("wide.png");
    let gray: Vec<u8> = vec![255; 64 * 32 * 3];
    let img = easel_core::RgbImageRef::new(64, 32, &gray).unwrap();
    let png =
        easel_core::encode_image(&img, easel_core::OutputFormat::Png, 80, &Default::default())
            .unwrap();
    std::fs::write(&wide_mask, png).unwrap();
    let init = fixtures().join("references/init_image.png");
    let sd15 = fixtures().join("models/tiny-sd15");
    let sd15_inpaint = fixtures().join("models/tiny-sd15-inpaint");
    let sdxl = fixtures().join("models/tiny-sdxl");
    let lora = fixtures().join("loras/tiny-sd15-lora.safetensors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--image".into(), s(&corrupt)], "--image"),
        (vec!["--image".into(), s(&text)], "--image"),
        (
            vec!["--image".into(), "/no/such/file.png".into()],
            "/no/such/file.png",
        ),
        (
            vec!["--image".into(), "data:image/png;base64,@@@".into()],
            "base64",
        ),
        (
            vec!["--image".into(), s(&init), "--mask".into(), s(&wide_mask)],
            "aspect",
        ),
        (
            vec!["--image".into(), s(&init), "--mask".into(), "alpha".into()],
            "alpha channel",
        ),
        (
            vec![
                "--image".into(),
                s(&init),
                "--strength".into(),
                "1.5".into(),
            ],
            "strength",
        ),
        (
            vec![
                "--image".into(),
                s(&init),
                "--strength".into(),
                "0.1".into(),
            ],
            "no denoising step",
        ),
        (vec!["--strength".into(), "0.5".into()], "--image"),
        (vec!["--mask".into(), s(&init)], "--image"),
        (vec!["--lora".into(), format!("{}:9", s(&lora))], "-1 to 3"),
        (
            vec!["--lora".into(), "/no/such.safetensors".into()],
            "/no/such.safetensors",
        ),
        (
            vec!["--model".into(), s(&sdxl), "--lora".into(), s(&lora)],
            "has no module",
        ),
        (vec!["--model".into(), s(&sd15_inpaint)], "inpainting model"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = [
            "generate",
            "--prompt",
            "x",
            "--output",
            out.to_str().unwrap(),
            "--steps",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--model".to_string()) {
            args.extend(["--model".to_string(), s(&sd15)]);
        }
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = easel(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert_ne!(o.status.code(), Some(101), "{extra:?} panicked: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote a file");
    }
}

/// Standard base64 (for data URIs in tests).
fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Issue 5: FLUX.1 schnell text-to-image from the CLI reproduces diffusers' PNG.
#[test]
fn generate_reproduces_flux_schnell_reference_png() {
    let json = reproduce_reference_png("flux_schnell_txt2img", "flow_match_euler");
    assert_eq!(json["pipeline"], "FluxPipeline");
    assert_eq!(json["scheduler"], "FlowMatchEulerDiscreteScheduler");
}

/// Issue 5: FLUX.1 dev (guidance embedding, dynamic shifting).
#[test]
fn generate_reproduces_flux_dev_reference_png() {
    reproduce_reference_png("flux_dev_txt2img", "flow_match_euler");
}

/// Issue 5: FLUX.1 Fill inpainting with --image and --mask.
#[test]
fn generate_reproduces_flux_fill_reference_png() {
    let json = reproduce_reference_png("flux_fill_inpaint", "flow_match_euler");
    assert_eq!(json["pipeline"], "FluxFillPipeline");
}

/// Issue 5: FLUX.1 dev image-to-image with --image and --strength.
#[test]
fn generate_reproduces_flux_dev_img2img_png() {
    reproduce_png_in("generated", "flux_dev_img2img", "flow_match_euler", &[]);
}

/// Issue 5: FLUX.1 dev with a kohya-layout LoRA (original FLUX names) via
/// `--lora FILE:1.6` reproduces diffusers' PNG.
#[test]
fn generate_reproduces_flux_dev_kohya_lora_png() {
    let json = reproduce_png_in(
        "generated",
        "flux_dev_lora_kohya_scale1.6",
        "flow_match_euler",
        &[],
    );
    assert_eq!(json["loras"][0]["scale"], 1.6);
}

/// Issue 5: FLUX rounds width and height to multiples of 16 with a notice and
/// uses the per-model defaults (schnell: 4 steps, guidance 0).
#[test]
fn flux_rounds_sizes_to_16_and_uses_model_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let model = fixtures().join("models/tiny-flux-schnell");
    let o = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red house",
        "--width",
        "70",
        "--height",
        "41",
        "--seed",
        "1",
        "--max-sequence-length",
        "16",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("--width 70 rounded to 64"), "{err}");
    assert!(err.contains("--height 41 rounded to 48"), "{err}");
    assert!(err.contains("4 steps"), "{err}");
    let (w, h, _) = rgb8(&out);
    assert_eq!((w, h), (64, 48));
    let meta = easel_core::read_png_metadata(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!((meta.width, meta.height, meta.steps), (64, 48, 4));
    assert_eq!(meta.guidance_scale, 0.0);

    // A mask needs a Fill model; a strength outside 0..=1 is refused early.
    let init = fixtures().join("references/init_image.png");
    let mask = fixtures().join("references/mask.png");
    let o = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Fill"), "{}", stderr(&o));
    let o = easel(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--image",
        init.to_str().unwrap(),
        "--strength",
        "1.5",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("strength"), "{}", stderr(&o));
}

// ------------------------------------------------------------------ flows

/// `easel flow ...` with no LLM configured from the environment.
fn easel_flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .arg("flow")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_LLM_URL")
        .env_remove("EASEL_LLM_MODEL")
        .env_remove("EASEL_DATA_DIR")
        .env_remove("EASEL_DEVICE")
        .output()
        .expect("run easel")
}

fn write_flow(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn flow_run_basic_steps_prints_the_run_record() {
    let dir = tempfile::tempdir().unwrap();
    let flow = write_flow(
        dir.path(),
        "titles.json5",
        "{ steps: [
            { id: 'subjects', type: 'List', parameters: { value: ['a fox', 'an owl'] } },
            { id: 'titles', type: 'Template', parameters: { template: [[ '@Map($.results.subjects)', 'A portrait of {{ $$ }} by {{ $.input.artist }}' ]] } },
        ] }",
    );
    let input = write_flow(dir.path(), "input.json", r#"{"artist": "Vermeer"}"#);
    let data = dir.path().join("data");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        &format!("@{}", input.display()),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["steps"][1]["result"],
        serde_json::json!([
            "A portrait of a fox by Vermeer",
            "A portrait of an owl by Vermeer"
        ])
    );
    // Without --json: one line per step with status and duration.
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        r#"{"artist": "Ter Borch"}"#,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("titles (Template): succeeded"), "{text}");
    assert!(text.contains("Ter Borch"), "{text}");
}

#[test]
fn flow_run_generates_one_asset_per_prompt_on_the_fixture_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let flow = write_flow(
        dir.path(),
        "gen.json5",
        &format!(
            "{{ steps: [
                {{ id: 'prompts', type: 'List', parameters: {{ value: '$.input.prompts' }} }},
                {{ id: 'gen', type: 'ImageGenerator', parameters: {{
                    baseModel: '{}', steps: 2, width: 32, height: 32, outputFormat: 'png',
                    images: [[ '@Map($.results.prompts)', {{ prompt: '$$.text', seed: '$$.seed' }} ]] }} }},
                {{ id: 'first', type: 'Template', parameters: {{ template: '$.results.gen[0].file_url' }} }},
            ] }}",
            model.display()
        ),
    );
    let data = dir.path().join("data");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        r#"{"prompts": [{"text": "a red house", "seed": 1}, {"text": "a blue boat", "seed": 2}]}"#,
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let gen = &run["steps"][1];
    let job = gen["jobId"].as_str().unwrap();
    let assets = gen["result"].as_array().unwrap();
    assert_eq!(assets.len(), 2, "one asset per prompt");
    for (asset, seed) in assets.iter().zip([1, 2]) {
        assert_eq!(asset["job_id"], job);
        assert_eq!(asset["seed"], seed);
        assert_eq!(asset["file_type"], "image/png");
        let url = asset["file_url"].as_str().unwrap();
        assert!(url.starts_with("file:///"), "{url}");
        let path = PathBuf::from(asset["path"].as_str().unwrap());
        assert!(path.starts_with(data.canonicalize().unwrap().join("assets").join(job)));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            asset["file_size"].as_u64().unwrap()
        );
        assert_eq!(rgb8(&path).0, 32);
    }
    assert_eq!(run["steps"][2]["result"], assets[0]["file_url"]);
}

#[test]
fn flow_run_failures_and_invalid_flows_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let data = dir.path().join("data");
    let flow = write_flow(
        dir.path(),
        "bad-size.json",
        &format!(
            r#"{{"steps": [{{"id": "gen", "type": "ImageGenerator", "parameters": {{"baseModel": "{}", "images": [{{"prompt": "x", "width": 1001}}]}}}}]}}"#,
            model.display()
        ),
    );
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "failed");
    let message = run["steps"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("parameters.images[0].width: 1001"),
        "{message}"
    );

    let flow = write_flow(dir.path(), "unknown.json5", "[{ id: 'a', type: 'Nope' }]");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("steps[0] (a).type: unknown step type `Nope`"),
        "{}",
        stderr(&o)
    );

    let flow = write_flow(
        dir.path(),
        "llm.json5",
        "[{ id: 'p', type: 'ObjectGenerator', parameters: { description: 'd', schema: { type: 'object' } } }]",
    );
    let o = easel_flow(&["validate", flow.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("EASEL_LLM_URL"), "{}", stderr(&o));
}

/// Issue 5 with issue 8: `easel bench --random-weights` builds a FLUX model
/// from its configs alone and reports one transformer pass per step.
#[test]
fn bench_random_weights_runs_a_flux_model() {
    let model = fixtures().join("models/tiny-flux-dev");
    let o = easel(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--random-weights",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--runs",
        "0",
        "--no-peak",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("(FluxPipeline)"), "{out}");
    assert!(
        out.contains("guidance 3.5 (1 transformer pass per step)"),
        "{out}"
    );
    assert!(out.contains("| transformer call (mean;"), "{out}");
    // Per-stage memory (Linux: reset through /proc/self/clear_refs) and
    // what the run computed on.
    for stage in ["model load", "text encoding", "denoising", "VAE decode"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("| {stage} | "))
                && l.ends_with(" |")
                && l.matches('|').count() == 4),
            "{stage}: {out}"
        );
    }
    assert!(out.contains("\ncpu: "), "{out}");
    assert!(out.contains("\ncomputed: f32"), "{out}");
    assert!(
        out.contains("\noutputs: finite (every run's final latents)"),
        "{out}"
    );
}

/// The AUTOMATIC1111 `parameters` text of a JPEG or WebP file, read with
/// `kamadak-exif` from EXIF `UserComment` (`UNICODE` + UTF-16, in the TIFF
/// byte order), as the web UI's `read_info_from_image` reads it.
fn exif_parameters(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let exif = exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(&bytes))
        .unwrap_or_else(|e| panic!("{}: no EXIF: {e}", path.display()));
    let field = exif
        .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
        .expect("no UserComment");
    let exif::Value::Undefined(raw, _) = &field.value else {
        panic!("UserComment is {:?}", field.value);
    };
    assert_eq!(&raw[..8], b"UNICODE\0");
    let units: Vec<u16> = raw[8..]
        .chunks_exact(2)
        .map(|b| {
            if exif.little_endian() {
                u16::from_le_bytes([b[0], b[1]])
            } else {
                u16::from_be_bytes([b[0], b[1]])
            }
        })
        .collect();
    String::from_utf16(&units).unwrap()
}

/// Issue 12: `easel generate` writes JPEG and WebP with the `parameters`
/// text other tools read (EXIF UserComment), sampler in the web UI's
/// spelling (DPM-Solver++ with Karras sigmas is `DPM++ 2M Karras`).
#[test]
fn generate_writes_a1111_parameters_into_jpeg_and_webp_exif() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    for ext in ["jpg", "webp"] {
        let out = dir.path().join(format!("out.{ext}"));
        let o = easel(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red house, \"tall\": 家",
            "--negative-prompt",
            "blurry",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "40",
            "--seed",
            "5",
            "--scheduler",
            "dpmpp_2m_karras",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = exif_parameters(&out);
        let (prompt, rest) = text.split_once("\nNegative prompt: ").unwrap();
        assert_eq!(prompt, "a red house, \"tall\": 家", "{ext}: {text}");
        let (negative, line) = rest.split_once('\n').unwrap();
        assert_eq!(negative, "blurry");
        assert!(
            line.starts_with("Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: "),
            "{ext}: {line}"
        );
        assert!(
            line.contains(", Seed: 5, Size: 32x40, Model: "),
            "{ext}: {line}"
        );
        // The file still decodes.
        let (w, h, _) = rgb8(&out);
        assert_eq!((w, h), (32, 40));
    }
}

// ------------------------------------------------- issue 13: flow inputs

/// `easel flow run` honours an ImageGenerator step's `image` and `strength`
/// (image-to-image) and `loras` exactly as `easel generate` does with the
/// same flags: both go through the engine's front door and its one job
/// builder, so the decoded pixels are identical.
#[test]
fn flow_img2img_and_lora_steps_match_generate_pixel_for_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let init = fixtures().join("references/init_image.png");
    let lora = fixtures().join("loras/tiny-sd15-lora.safetensors");
    let (model_s, init_s, lora_s) = (
        model.to_str().unwrap(),
        init.to_str().unwrap(),
        lora.to_str().unwrap(),
    );

    // The same two images through `easel generate`.
    let img2img = dir.path().join("img2img.png");
    let o = easel(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "a red house",
        "--image",
        init_s,
        "--strength",
        "0.6",
        "--steps",
        "4",
        "--seed",
        "5",
        "--output",
        img2img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lora_png = dir.path().join("lora.png");
    let lora_arg = format!("{lora_s}:0.7");
    let o = easel(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "a blue boat",
        "--lora",
        &lora_arg,
        "--steps",
        "3",
        "--seed",
        "9",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        lora_png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The LoRA changes the image: a flow that dropped it would differ.
    let base_png = dir.path().join("base.png");
    let o = easel(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "a blue boat",
        "--steps",
        "3",
        "--seed",
        "9",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        base_png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(
        rgb8(&base_png).2,
        rgb8(&lora_png).2,
        "the LoRA changes nothing"
    );

    let flow = write_flow(
        dir.path(),
        "inputs.json",
        &serde_json::json!({"steps": [
            {"id": "img2img", "type": "ImageGenerator", "parameters": {
                "baseModel": model_s, "steps": 4, "outputFormat": "png",
                "images": [{"prompt": "a red house", "image": init_s, "strength": 0.6, "seed": 5}]}},
            {"id": "lora", "type": "ImageGenerator", "parameters": {
                "baseModel": model_s, "steps": 3, "width": 32, "height": 32, "outputFormat": "png",
                "images": [{"prompt": "a blue boat", "seed": 9,
                            "loras": [{"path": lora_s, "scale": 0.7}]}]}}
        ]})
        .to_string(),
    );
    let data = dir.path().join("data");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    for (step, want) in run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip([&img2img, &lora_png])
    {
        let assets = step["result"].as_array().unwrap();
        assert_eq!(assets.len(), 1, "{step:#}");
        let got = PathBuf::from(assets[0]["path"].as_str().unwrap());
        let (gw, gh, got) = rgb8(&got);
        let (ww, wh, want_px) = rgb8(want);
        assert_eq!((gw, gh), (ww, wh), "{}", step["id"]);
        assert!(
            got == want_px,
            "{}: pixels differ from easel generate",
            step["id"]
        );
    }

    // A LoRA by training id stays a named refusal on this machine.
    let flow = write_flow(
        dir.path(),
        "training.json",
        &serde_json::json!({"steps": [{"id": "gen", "type": "ImageGenerator", "parameters": {
            "baseModel": model_s, "steps": 2,
            "images": [{"prompt": "x", "loras": [{"id": "7e0b0c59-3f55-4d4b-8a4c-3c0a2d1e0f00"}]}]}}]})
        .to_string(),
    );
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let message = run["steps"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("parameters.images[0].loras[0].id: not supported by `easel flow run`"),
        "{message}"
    );
}

// Single-file checkpoints (issue 14).

/// `--model FILE.safetensors --config DIR` (the tiny SD 2 v-prediction model
/// in the original LDM layout, `tests/fixtures/generated/single_file/`)
/// reproduces the folder's diffusers PNG within one level; pickles and
/// bad prediction types are refused before anything is written.
#[test]
fn generate_from_a_single_file_with_config() {
    let refs = fixtures().join("references");
    let case = "sd2v_txt2img_ddim";
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let file = single_file_fixture("tiny-sd2-v");
    let config = fixtures().join("models/tiny-sd2-v");
    let num = |k: &str| c[k].to_string();
    let (steps, guidance, seed, width, height) = (
        num("num_inference_steps"),
        num("guidance_scale"),
        num("seed"),
        num("width"),
        num("height"),
    );
    let mut args = vec![
        "generate",
        "--model",
        file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--steps",
        &steps,
        "--guidance-scale",
        &guidance,
        "--seed",
        &seed,
        "--width",
        &width,
        "--height",
        &height,
        "--scheduler",
        "ddim",
        "--output",
        out.to_str().unwrap(),
    ];
    if let Some(neg) = c["negative_prompt"].as_str() {
        args.extend(["--negative-prompt", neg]);
    }
    let o = easel(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, got) = rgb8(&out);
    let (_, _, want) = rgb8(&refs.join(format!("{case}.0.png")));
    let d = max_level_diff(&got, &want);
    assert!(
        d <= 1,
        "{case} from a single file: max difference {d} levels"
    );

    // The same file with the wrong prediction type gives another image.
    let other = dir.path().join("eps.png");
    let mut eps_args = args.clone();
    let at = eps_args.iter().position(|a| *a == "--output").unwrap();
    eps_args[at + 1] = other.to_str().unwrap();
    eps_args.extend(["--prediction-type", "epsilon"]);
    let o = easel(&eps_args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, eps) = rgb8(&other);
    assert!(max_level_diff(&eps, &want) > 1);

    // Refusals: an unknown prediction type, a pickle, --config on a folder.
    let bad = dir.path().join("bad.png");
    let mut bad_args = args.clone();
    let at = bad_args.iter().position(|a| *a == "--output").unwrap();
    bad_args[at + 1] = bad.to_str().unwrap();
    let mut typo = bad_args.clone();
    typo.extend(["--prediction-type", "v"]);
    let o = easel(&typo);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("epsilon, v_prediction, sample"),
        "{}",
        stderr(&o)
    );
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    let at = bad_args.iter().position(|a| *a == "--model").unwrap();
    bad_args[at + 1] = ckpt.to_str().unwrap();
    let o = easel(&bad_args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pickle"), "{}", stderr(&o));
    bad_args[at + 1] = config.to_str().unwrap();
    let o = easel(&bad_args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a file"), "{}", stderr(&o));
    assert!(!bad.exists());
}

/// `--model flux.safetensors --config DIR`: a FLUX.1 schnell transformer
/// in Black Forest Labs' layout with ComfyUI's `model.diffusion_model.`
/// prefix (`tools/gen_flux_single_files.py`) and a config folder holding
/// every component but the transformer reproduces the folder's diffusers
/// PNG within one level.
#[test]
fn generate_from_a_flux_transformer_file_with_config() {
    let refs = fixtures().join("references");
    let case = "flux_schnell_txt2img";
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The fixture folder without its transformer weights.
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy(&path, &target);
            } else if !(from.ends_with("transformer")
                && path.extension().is_some_and(|e| e == "safetensors"))
            {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    let config = dir.path().join("config");
    copy(&fixtures().join("models/tiny-flux-schnell"), &config);
    let out = dir.path().join("out.png");
    let file = single_file_fixture("tiny-flux-schnell");
    let num = |k: &str| c[k].to_string();
    let (steps, guidance, seed, width, height, max_len) = (
        num("num_inference_steps"),
        num("guidance_scale"),
        num("seed"),
        num("width"),
        num("height"),
        num("max_sequence_length"),
    );
    let args = vec![
        "generate",
        "--model",
        file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--steps",
        &steps,
        "--guidance-scale",
        &guidance,
        "--seed",
        &seed,
        "--width",
        &width,
        "--height",
        &height,
        "--max-sequence-length",
        &max_len,
        "--output",
        out.to_str().unwrap(),
    ];
    let o = easel(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, got) = rgb8(&out);
    let (_, _, want) = rgb8(&refs.join(format!("{case}.0.png")));
    let d = max_level_diff(&got, &want);
    assert!(
        d <= 1,
        "{case} from a FLUX single file: max difference {d} levels"
    );
}

// ---- component files (issue 14) ------------------------------------------------

/// `easel generate` of tiny-sd15 at 32x32, 2 steps, seed 3, with `extra`
/// arguments, into `out`.
fn generate_sd15(out: &Path, extra: &[&str]) -> Output {
    let model = fixtures().join("models/tiny-sd15");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red house by the sea",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    easel(&args)
}

/// `--vae`, `--unet` and `--text-encoder` with files in original layouts
/// holding the folder's own weights (cut from the SD 1.5 single-file
/// fixture: an LDM VAE without prefix, the LDM UNet under
/// `model.diffusion_model.`, CLIP under `cond_stage_model.transformer.`)
/// give the folder's image exactly; the PNG names the VAE file as A1111
/// does (`VAE: name`).
#[test]
fn generate_with_component_files_gives_the_folders_image() {
    let dir = tempfile::tempdir().unwrap();
    let single = single_file_fixture("tiny-sd15");
    let vae = component_file(
        &single,
        "first_stage_model.",
        true,
        &dir.path().join("vae-ldm.safetensors"),
    );
    let unet = component_file(
        &single,
        "model.diffusion_model.",
        false,
        &dir.path().join("unet.safetensors"),
    );
    let clip = component_file(
        &single,
        "cond_stage_model.transformer.",
        false,
        &dir.path().join("clip.safetensors"),
    );
    let plain = dir.path().join("plain.png");
    let o = generate_sd15(&plain, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = rgb8(&plain);
    for (flag, file) in [
        ("--vae", &vae),
        ("--unet", &unet),
        ("--text-encoder", &clip),
    ] {
        let out = dir
            .path()
            .join(format!("{}.png", flag.trim_start_matches('-')));
        let o = generate_sd15(&out, &[flag, file.to_str().unwrap()]);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        assert_eq!(rgb8(&out), want, "{flag} {}", file.display());
        if flag == "--vae" {
            let png = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
            assert!(
                png.contains("VAE: vae-ldm.safetensors"),
                "no VAE in the parameters"
            );
        }
    }
}

/// A VAE of another architecture (FLUX's 16 latent channels into SD
/// 1.5's 4), a missing file and a pickle are refused before anything is
/// generated, naming the flag, the file and (for the architecture) the
/// tensor and both shapes; no output file is written.
#[test]
fn generate_refuses_unusable_component_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let flux_vae = fixtures().join("models/tiny-flux-dev/vae/diffusion_pytorch_model.safetensors");
    let o = generate_sd15(&out, &["--vae", flux_vae.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--vae") && e.contains(flux_vae.to_str().unwrap()),
        "{e}"
    );
    assert!(e.contains("decoder.conv_in.weight"), "{e}");
    assert!(
        e.contains("[64, 16, 3, 3]") && e.contains("[64, 4, 3, 3]"),
        "{e}"
    );

    let missing = dir.path().join("missing.safetensors");
    let o = generate_sd15(&out, &["--unet", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--unet") && e.contains("missing.safetensors") && e.contains("no such file"),
        "{e}"
    );

    let pickle = dir.path().join("clip.pt");
    std::fs::write(&pickle, b"never unpickled").unwrap();
    let o = generate_sd15(&out, &["--text-encoder", pickle.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--text-encoder") && e.contains("pickle"), "{e}");
    assert!(!out.exists());
}

// ---- GGUF, fp8 and --quantize (issue 14) ---------------------------------------

/// `easel generate` of the tiny FLUX.1 dev reference request (the
/// `flux_dev_txt2img` parameters the quantized references use) on `model`,
/// with `extra` arguments, into `out`.
fn generate_flux_dev(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "A photo of an astronaut riding a horse on mars",
        "--steps",
        "6",
        "--guidance-scale",
        "3.5",
        "--seed",
        "19",
        "--width",
        "80",
        "--height",
        "64",
        "--max-sequence-length",
        "64",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    easel(&args)
}

/// `--model FILE.gguf --config DIR`: the tiny FLUX.1 dev transformer as a
/// city96-layout Q8_0 GGUF file gives diffusers' image of the same file's
/// weights (dequantized exactly) within one level; `--quantize` on the
/// folder runs, and a quantization that does not exist is refused naming
/// the allowed ones, before anything is written.
#[test]
fn generate_from_gguf_and_with_quantize() {
    let dir = tempfile::tempdir().unwrap();
    let quantized = fixtures().join("generated/quantized");
    let folder = fixtures().join("models/tiny-flux-dev");
    let out = dir.path().join("gguf.png");
    let o = generate_flux_dev(
        &quantized.join("tiny-flux-dev-Q8_0.gguf"),
        &out,
        &["--config", folder.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, got) = rgb8(&out);
    let (_, _, want) = rgb8(&quantized.join("flux_dev_gguf_q8_0_exact.0.png"));
    let d = max_level_diff(&got, &want);
    assert!(d <= 1, "Q8_0 GGUF: max difference {d} levels");
    // --offload-t5 (T5 loaded per prompt, freed after): the same image.
    let offloaded = dir.path().join("gguf-offload.png");
    let o = generate_flux_dev(
        &quantized.join("tiny-flux-dev-Q8_0.gguf"),
        &offloaded,
        &["--config", folder.to_str().unwrap(), "--offload-t5"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rgb8(&offloaded).2, got, "--offload-t5 changed the image");

    // --quantize q8_0 on the folder: the transformer's blocks become the
    // same Q8_0 values as the GGUF's (T5 is quantized too, so the image
    // is close to, not equal to, the GGUF's).
    let out = dir.path().join("q8.png");
    let o = generate_flux_dev(&folder, &out, &["--quantize", "q8_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, _, q8) = rgb8(&out);
    let (_, _, plain) = rgb8(&fixtures().join("references/flux_dev_txt2img.0.png"));
    let d = max_level_diff(&q8, &plain);
    assert!((1..=8).contains(&d), "--quantize q8_0: {d} levels from f16");

    let bad = dir.path().join("bad.png");
    let o = generate_flux_dev(&folder, &bad, &["--quantize", "int4"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("q8_0, q4_0, fp8") && err.contains("int4"),
        "{err}"
    );
    assert!(!bad.exists());
}

/// Issue 15: `--vae-tiling on` reproduces diffusers' PNG of a run with
/// `pipe.vae.enable_tiling()` (`tools/gen_vae_tiling_refs.py`: 10x14
/// latents, 8-latent tiles); a bad mode and `on` with seamless `--tiling`
/// fail naming the flag's field and its values, writing nothing.
#[test]
fn vae_tiling_on_reproduces_diffusers_tiled_decode_png() {
    reproduce_png_in(
        "generated",
        "sd15_vae_tiling_ddim",
        "ddim",
        &["--vae-tiling", "on"],
    );
    let model = fixtures().join("models/tiny-sd15");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "p",
        "--steps",
        "1",
        "--width",
        "80",
        "--height",
        "80",
        "--output",
        out.to_str().unwrap(),
    ];
    let o = easel(&[&base[..], &["--vae-tiling", "sometimes"]].concat());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--vae-tiling") && e.contains("auto, on, off"),
        "{e}"
    );
    let o = easel(&[&base[..], &["--tiling", "--vae-tiling", "on"]].concat());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("vae_tiling") && e.contains("seamless"), "{e}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// Issue 15: `--offload model` and `--offload sequential` reproduce the
/// reference PNGs (the same pixels as without offload: a LoRA and an
/// image-to-image encode included), a quantized GGUF gives the image it
/// gives resident, the CPU run says in a warning that offload saves
/// nothing there, and a bad mode is refused naming the allowed ones.
#[test]
fn offload_modes_reproduce_reference_pngs() {
    let record = reproduce_png_in(
        "references",
        "sd15_lora_peft_scale0.7",
        "euler",
        &["--offload", "model"],
    );
    assert!(
        record.to_string().contains("saves no memory"),
        "no CPU offload warning in {record}"
    );
    reproduce_png_in(
        "references",
        "sd15_img2img_ddim",
        "ddim",
        &["--offload", "sequential"],
    );

    let dir = tempfile::tempdir().unwrap();
    let quantized = fixtures().join("generated/quantized");
    let folder = fixtures().join("models/tiny-flux-dev");
    let gguf = quantized.join("tiny-flux-dev-Q8_0.gguf");
    let config = ["--config", folder.to_str().unwrap()];
    let resident = dir.path().join("resident.png");
    let o = generate_flux_dev(&gguf, &resident, &config);
    assert!(o.status.success(), "{}", stderr(&o));
    let offloaded = dir.path().join("offloaded.png");
    let o = generate_flux_dev(
        &gguf,
        &offloaded,
        &[&config[..], &["--offload", "model"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        rgb8(&offloaded).2,
        rgb8(&resident).2,
        "--offload model changed the image"
    );

    let bad = dir.path().join("bad.png");
    let o = generate_flux_dev(&folder, &bad, &["--offload", "gpu"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("--offload") && err.contains("none, model, sequential"),
        "{err}"
    );
    assert!(!bad.exists());
}
