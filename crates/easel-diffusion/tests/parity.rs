//! End-to-end parity with diffusers: each case of
//! `tests/fixtures/references/` runs through the real pipeline with the
//! recorded noise, and `latents_to_vae` must land within 1e-4 relative L2
//! and `image` within 1e-3 max absolute of what diffusers produced.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use easel_diffusion::loader::ModelDir;
use easel_diffusion::noise::RecordedNoise;
use easel_diffusion::pipelines::{
    load_pipeline, CancelToken, GenerationRequest, ImageInput, MaskInput, RunContext,
};
use serde_json::Value;

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => vec![],
    }
}

/// Run reference case `name` and compare with diffusers' outputs.
pub fn check_case(name: &str) {
    check_case_with(name, None)
}

/// Run reference case `name` with the scheduler given by `scheduler` (any
/// alias) instead of the case's class name.
pub fn check_case_with(name: &str, scheduler: Option<&str>) {
    check_case_in("references", name, scheduler)
}

/// An 8-bit image of the fixtures as the engine takes it.
fn load_image(path: &std::path::Path) -> ImageInput {
    let img = easel_core::decode_image(&std::fs::read(path).unwrap()).unwrap();
    let (width, height) = (img.width as usize, img.height as usize);
    ImageInput {
        width,
        height,
        rgb: img.into_rgb8(),
    }
}

/// Run case `name` of `tests/fixtures/<dir>` (`references` or `generated`):
/// its JSON gives the request (prompt, steps, guidance, size, strength,
/// `max_sequence_length`, init image and mask files next to it), its
/// safetensors the recorded noise and diffusers' outputs.
pub fn check_case_in(dir: &str, name: &str, scheduler: Option<&str>) {
    let refs_dir = fixtures().join(dir);
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(refs_dir.join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors = load_refs(&format!("{dir}/{name}.safetensors"));
    let model_dir = fixtures().join(case["model"].as_str().unwrap());
    let model = ModelDir::open(&model_dir).unwrap();
    let pipeline = load_pipeline(&model, &Device::Cpu).unwrap();

    let image = case["init_image"]
        .as_str()
        .map(|f| load_image(&refs_dir.join(f)));
    let mask = case["mask_image"].as_str().map(|f| {
        let m = load_image(&refs_dir.join(f));
        MaskInput::from_rgb8(m.width, m.height, &m.rgb).unwrap()
    });
    let request = GenerationRequest {
        prompts: strings(&case["prompt"]),
        negative_prompts: strings(&case["negative_prompt"]),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        scheduler: scheduler
            .map(String::from)
            .or_else(|| case["scheduler"].as_str().map(String::from)),
        image,
        mask,
        strength: case["strength"]
            .as_f64()
            .unwrap_or_else(|| pipeline.default_strength()),
        max_sequence_length: case["max_sequence_length"].as_u64().map(|v| v as usize),
    };
    let draws: Vec<Tensor> = (0..)
        .map_while(|i| tensors.get(&format!("noise.{i}")).cloned())
        .collect();
    let n_draws = draws.len();
    let mut noise = RecordedNoise::new(draws);
    let mut progress = |_| {};
    let mut ctx = RunContext {
        noise: &mut noise,
        progress: &mut progress,
        cancel: CancelToken::new(),
    };
    let out = pipeline.run(&request, &mut ctx).unwrap();
    assert_eq!(
        noise.remaining(),
        0,
        "{name}: used fewer than the {n_draws} recorded draws"
    );
    let lat = rel_l2(&out.latents_to_vae, &tensors["latents_to_vae"]);
    let img = max_abs(&out.images, &tensors["image"]);
    eprintln!("{name}: latents_to_vae rel L2 {lat:.2e}, image max abs {img:.2e}");
    assert!(
        lat <= 1e-4,
        "{name}: latents_to_vae relative L2 {lat:.3e} > 1e-4"
    );
    assert!(img <= 1e-3, "{name}: image max abs {img:.3e} > 1e-3");
}

#[test]
fn sd15_txt2img_pndm() {
    check_case("sd15_txt2img_pndm");
}

#[test]
fn sd15_txt2img_ddim() {
    check_case("sd15_txt2img_ddim");
}

#[test]
fn sd15_txt2img_euler() {
    check_case("sd15_txt2img_euler");
}

#[test]
fn sd2v_txt2img_ddim() {
    check_case("sd2v_txt2img_ddim");
}

#[test]
fn sdxl_txt2img_euler() {
    check_case("sdxl_txt2img_euler");
}

#[test]
fn sdxl_txt2img_empty_negative() {
    check_case("sdxl_txt2img_empty_negative");
}

#[test]
fn sd15_txt2img_batch_nocfg() {
    check_case("sd15_txt2img_batch_nocfg");
}

#[test]
fn sd15_txt2img_num_images_2() {
    check_case("sd15_txt2img_num_images_2");
}

/// The seeded generator reproduces `torch.randn` for every recorded seed and shape.
#[test]
fn torch_randn_matches_recorded_draws() {
    use easel_diffusion::noise::TorchGenerator;
    let recorded = load_refs("references/torch_randn.safetensors");
    assert!(!recorded.is_empty());
    for (key, expected) in &recorded {
        let (seed, _) = key.split_once('.').unwrap();
        let seed: u64 = seed.trim_start_matches("seed").parse().unwrap();
        let got = TorchGenerator::new(seed)
            .randn_tensor(expected.dims(), &Device::Cpu)
            .unwrap();
        let err = max_abs(&got, expected);
        assert!(err < 1e-6, "{key}: max abs {err:.3e}");
    }
}

// Samplers beyond the models' defaults (built with `from_config` semantics
// from the model's own scheduler config).

#[test]
fn sd15_txt2img_lms() {
    check_case("sd15_txt2img_lms");
}

#[test]
fn sd15_txt2img_heun() {
    check_case("sd15_txt2img_heun");
}

#[test]
fn sd15_txt2img_dpmpp_2m() {
    check_case("sd15_txt2img_dpmpp_2m");
}

#[test]
fn sd15_txt2img_dpmpp_2m_karras() {
    check_case_with("sd15_txt2img_dpmpp_2m_karras", Some("dpmpp_2m_karras"));
}

#[test]
fn sd15_txt2img_unipc() {
    check_case("sd15_txt2img_unipc");
}

#[test]
fn sd15_txt2img_euler_ancestral() {
    check_case("sd15_txt2img_euler_ancestral");
}

#[test]
fn sd15_txt2img_lcm() {
    check_case("sd15_txt2img_lcm");
}

// FLUX.1 (issue 5): no classifier-free guidance, 2x2-packed latents,
// flow-match Euler with static (schnell) or dynamic (dev, Fill) shifting.

#[test]
fn flux_schnell_txt2img() {
    check_case("flux_schnell_txt2img");
}

#[test]
fn flux_dev_txt2img() {
    check_case("flux_dev_txt2img");
}

#[test]
fn flux_fill_inpaint() {
    check_case("flux_fill_inpaint");
}

/// FLUX.1 dev image-to-image (dynamic shifting, guidance embedding),
/// `tests/fixtures/generated/flux_dev_img2img.*` from
/// `tools/gen_flux_img2img_refs.py`: strength 0.6 of 5 steps.
#[test]
fn flux_dev_img2img() {
    check_case_in("generated", "flux_dev_img2img", None);
}

/// FLUX.1 schnell image-to-image (static shift): strength 0.75 of 4 steps.
#[test]
fn flux_schnell_img2img() {
    check_case_in("generated", "flux_schnell_img2img", None);
}

/// Issue 5: per-model defaults come from the model's configs: schnell (no
/// `guidance_embeds`) 4 steps and guidance 0, dev 28 and 3.5, Fill 50, 30 and
/// strength 1; FLUX sizes are multiples of 16 with a native 1024².
#[test]
fn flux_defaults_follow_the_model() {
    let load = |name: &str| {
        let dir = ModelDir::open(fixtures().join("models").join(name)).unwrap();
        load_pipeline(&dir, &Device::Cpu).unwrap()
    };
    for (name, class, steps, guidance, strength) in [
        ("tiny-flux-schnell", "FluxPipeline", 4, 0.0, 0.8),
        ("tiny-flux-dev", "FluxPipeline", 28, 3.5, 0.8),
        ("tiny-flux-fill", "FluxFillPipeline", 50, 30.0, 1.0),
    ] {
        let p = load(name);
        assert_eq!(p.class_name(), class, "{name}");
        assert!(p.is_flux(), "{name}");
        assert_eq!(p.default_steps(), steps, "{name}");
        assert_eq!(p.default_guidance_scale(), guidance, "{name}");
        assert_eq!(p.default_strength(), strength, "{name}");
        assert_eq!(p.size_multiple(), 16, "{name}");
        assert_eq!(p.default_size(), (1024, 1024), "{name}");
        assert_eq!(p.denoiser_name(), "transformer", "{name}");
    }
    let sd = load("tiny-sd15");
    assert_eq!((sd.default_steps(), sd.size_multiple()), (25, 8));
    assert_eq!(sd.denoiser_name(), "UNet");
}

/// Issue 5: FLUX requests that cannot run are errors naming the field.
#[test]
fn flux_bad_requests_are_errors_naming_the_field() {
    let run = |name: &str, request: GenerationRequest| -> String {
        let dir = ModelDir::open(fixtures().join("models").join(name)).unwrap();
        let p = load_pipeline(&dir, &Device::Cpu).unwrap();
        let mut noise = easel_diffusion::noise::PerImageGenerators::new(&[1]);
        let mut progress = |_| {};
        let mut ctx = RunContext {
            noise: &mut noise,
            progress: &mut progress,
            cancel: CancelToken::new(),
        };
        match p.run(&request, &mut ctx) {
            Ok(_) => panic!("{name}: expected an error"),
            Err(e) => e.to_string(),
        }
    };
    let base = GenerationRequest {
        prompts: vec!["a cat".into()],
        num_inference_steps: 1,
        width: 32,
        height: 32,
        max_sequence_length: Some(8),
        ..Default::default()
    };
    let e = run(
        "tiny-flux-schnell",
        GenerationRequest {
            width: 40,
            ..base.clone()
        },
    );
    assert!(e.contains("width") && e.contains("16"), "{e}");
    let e = run(
        "tiny-flux-schnell",
        GenerationRequest {
            max_sequence_length: Some(513),
            ..base.clone()
        },
    );
    assert!(
        e.contains("max_sequence_length") && e.contains("512"),
        "{e}"
    );
    let e = run("tiny-flux-fill", base.clone());
    assert!(e.contains("image"), "{e}");
    let gray = ImageInput {
        width: 32,
        height: 32,
        rgb: vec![128; 32 * 32 * 3],
    };
    let e = run(
        "tiny-flux-dev",
        GenerationRequest {
            image: Some(gray),
            mask: Some(MaskInput {
                width: 32,
                height: 32,
                luma: vec![255; 32 * 32],
            }),
            ..base.clone()
        },
    );
    assert!(e.contains("mask") && e.contains("Fill"), "{e}");
    let e = run(
        "tiny-flux-dev",
        GenerationRequest {
            image: Some(ImageInput {
                width: 16,
                height: 32,
                rgb: vec![128; 16 * 32 * 3],
            }),
            ..base
        },
    );
    assert!(e.contains("image is 16x32"), "{e}");
}
