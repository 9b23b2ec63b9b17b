//! End-to-end parity with diffusers: each case of
//! `tests/fixtures/references/` runs through the real pipeline with the
//! recorded noise, and `latents_to_vae` must land within 1e-4 relative L2
//! and `image` within 1e-3 max absolute of what diffusers produced.

#[path = "../../../tests/support/single_file.rs"]
mod single_file_support;
use single_file_support::single_file_fixture;

mod common;

use candle_core::{Device, Tensor};
use common::cases::*;
use common::*;
use easel_diffusion::loader::{ModelDir, ModelFamily};
use easel_diffusion::lora::LoraSpec;
use easel_diffusion::pipelines::{
    CancelToken, GenerationRequest, ImageInput, MaskInput, RunContext,
};
use serde_json::Value;

/// Run reference case `name` and compare with diffusers' outputs.
pub fn check_case(name: &str) {
    check_case_in("references", name, None)
}

/// Run reference case `name` with the scheduler given by `scheduler` (any
/// alias) instead of the case's class name.
pub fn check_case_with(name: &str, scheduler: Option<&str>) {
    check_case_in("references", name, scheduler)
}

/// Load the case's model (with its LoRA, if any), run it and compare.
fn check_case_in(folder: &str, name: &str, scheduler: Option<&str>) {
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join(folder).join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let model = ModelDir::open(fixtures().join(case["model"].as_str().unwrap())).unwrap();
    let mut pipeline = test_pipeline(&model);
    pipeline.set_loras(&case_loras(&case)).unwrap();
    let (latents, images, tensors) = run_case(&pipeline, folder, name, scheduler);
    assert_close(name, &latents, &images, &tensors);
}

/// The parity tolerances `(latents_to_vae relative L2, image max abs)`:
/// the f32 ones given, or, when the suite runs in half precision
/// (`EASEL_TEST_PRECISION`), the larger of them and the half-precision
/// bounds: fp16 3e-2 / 0.1, bf16 0.3 / 0.45 (the largest differences the
/// fixture cases show against diffusers' f32 outputs, sd15_txt2img_ddim's,
/// with a margin; see docs/PERFORMANCE.md, "Half precision").
fn tolerance(lat_f32: f64, img_f32: f64) -> (f64, f64) {
    let (lat, img) = match test_dtype() {
        candle_core::DType::F16 => (3e-2, 0.1),
        candle_core::DType::BF16 => (0.3, 0.45),
        _ => (0.0, 0.0),
    };
    (lat_f32.max(lat), img_f32.max(img))
}

fn assert_close(
    name: &str,
    latents: &Tensor,
    images: &Tensor,
    tensors: &std::collections::HashMap<String, Tensor>,
) {
    let lat = rel_l2(latents, &tensors["latents_to_vae"]);
    let img = max_abs(images, &tensors["image"]);
    eprintln!("{name}: latents_to_vae rel L2 {lat:.2e}, image max abs {img:.2e}");
    let (lat_tol, img_tol) = tolerance(1e-4, 1e-3);
    assert!(
        lat <= lat_tol,
        "{name}: latents_to_vae relative L2 {lat:.3e} > {lat_tol:e}"
    );
    assert!(
        img <= img_tol,
        "{name}: image max abs {img:.3e} > {img_tol:e}"
    );
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
        test_pipeline(&dir)
    };
    for (name, class, steps, guidance, strength) in [
        ("tiny-flux-schnell", "FluxPipeline", 4, 0.0, 0.8),
        ("tiny-flux-dev", "FluxPipeline", 28, 3.5, 0.8),
        ("tiny-flux-fill", "FluxFillPipeline", 50, 30.0, 1.0),
    ] {
        let p = load(name);
        assert_eq!(p.class_name(), class, "{name}");
        assert!(
            matches!(p.family(), ModelFamily::Flux | ModelFamily::FluxFill),
            "{name}"
        );
        assert_eq!(p.default_steps(), steps, "{name}");
        assert_eq!(p.default_guidance_scale(), guidance, "{name}");
        assert_eq!(p.family().default_strength(), strength, "{name}");
        assert_eq!(p.size_multiple(), 16, "{name}");
        assert_eq!(p.default_size(), (1024, 1024), "{name}");
        assert_eq!(p.family().denoiser_name(), "transformer", "{name}");
    }
    let sd = load("tiny-sd15");
    assert_eq!((sd.default_steps(), sd.size_multiple()), (25, 8));
    assert_eq!(sd.family().denoiser_name(), "UNet");
}

/// Issue 5: FLUX requests that cannot run are errors naming the field.
#[test]
fn flux_bad_requests_are_errors_naming_the_field() {
    let run = |name: &str, request: GenerationRequest| -> String {
        let dir = ModelDir::open(fixtures().join("models").join(name)).unwrap();
        let p = test_pipeline(&dir);
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
            // Another size than the request: resized, as diffusers does,
            // but a strength that leaves no step (strength 0) is refused.
            image: Some(ImageInput {
                width: 16,
                height: 32,
                rgb: vec![128; 16 * 32 * 3],
            }),
            strength: 0.0,
            ..base
        },
    );
    assert!(e.contains("strength"), "{e}");
}

// Issue 4: image-to-image, inpainting and LoRA adapters.

#[test]
fn sd15_img2img_ddim() {
    check_case("sd15_img2img_ddim");
}

#[test]
fn sd15_inpaint_ddim() {
    check_case("sd15_inpaint_ddim");
}

#[test]
fn sd15_lora_peft_scale0_7() {
    check_case("sd15_lora_peft_scale0.7");
}

#[test]
fn sd15_lora_kohya_scale1_0() {
    check_case("sd15_lora_kohya_scale1.0");
}

/// Cases made by `tools/gen_img2img_refs.py` (tests/fixtures/generated/).
#[test]
fn sd15_img2img_resize_euler_a() {
    check_case_in("generated", "sd15_img2img_resize_euler_a", None);
}

#[test]
fn sd15_inpaint_4ch_euler() {
    check_case_in("generated", "sd15_inpaint_4ch_euler", None);
}

#[test]
fn sd15_inpaint_9ch_strength0_6_ddim() {
    check_case_in("generated", "sd15_inpaint_9ch_strength0.6_ddim", None);
}

#[test]
fn sdxl_img2img_euler() {
    check_case_in("generated", "sdxl_img2img_euler", None);
}

#[test]
fn sdxl_inpaint_euler() {
    check_case_in("generated", "sdxl_inpaint_euler", None);
}

/// SDXL LoRAs touching the UNet and both text encoders
/// (`tools/gen_sdxl_lora_refs.py`): PEFT layout at scale 0.8 and the same
/// matrices in the kohya layout (`lora_te1_` / `lora_te2_`, alpha/rank 0.5)
/// at scale 1.6.
#[test]
fn sdxl_lora_peft_scale0_8() {
    check_case_in("generated", "sdxl_lora_peft_scale0.8", None);
}

#[test]
fn sdxl_lora_kohya_scale1_6() {
    check_case_in("generated", "sdxl_lora_kohya_scale1.6", None);
}

/// The SDXL LoRA's text-encoder parts matter: merging only its UNet part
/// (a copy of the file without the `text_encoder*` keys) gives other latents,
/// so the parity above checks both text encoders' merges too.
#[test]
fn sdxl_lora_text_encoder_parts_change_the_result() {
    let src = fixtures().join("loras/tiny-sdxl-lora.safetensors");
    let all = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let n_te1 = all
        .keys()
        .filter(|k| k.starts_with("text_encoder."))
        .count();
    let n_te2 = all
        .keys()
        .filter(|k| k.starts_with("text_encoder_2."))
        .count();
    assert!(n_te1 > 0 && n_te2 > 0, "{n_te1} {n_te2}");
    let unet_only: std::collections::HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("unet."))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet-only.safetensors");
    candle_core::safetensors::save(&unet_only, &path).unwrap();
    let model = ModelDir::open(fixtures().join("models/tiny-sdxl")).unwrap();
    let mut p = test_pipeline(&model);
    p.set_loras(&[LoraSpec::new(path, 0.8)]).unwrap();
    let (lat, _, refs) = run_case(&p, "generated", "sdxl_lora_peft_scale0.8", None);
    let d = rel_l2(&lat, &refs["latents_to_vae"]);
    assert!(
        d > 1e-3,
        "text-encoder LoRA parts moved the latents by only {d:.2e}"
    );
}

/// Switching LoRA sets on one loaded pipeline gives the images of fresh
/// loads, and reads no base weights from disk.
#[test]
fn switching_loras_matches_fresh_loads() {
    let model = ModelDir::open(fixtures().join("models/tiny-sd15")).unwrap();
    let peft = LoraSpec::new(fixtures().join("loras/tiny-sd15-lora.safetensors"), 0.7);
    let kohya = LoraSpec::new(
        fixtures().join("loras/tiny-sd15-lora-kohya.safetensors"),
        1.0,
    );
    let fresh = |loras: &[LoraSpec], case: &str| {
        let mut p = test_pipeline(&model);
        p.set_loras(loras).unwrap();
        let (lat, img, _) = run_case(&p, "references", case, None);
        (lat, img)
    };
    let mut shared = test_pipeline(&model);
    let reads = shared.base_tensor_reads();
    assert!(reads > 0);
    // Each set, in an order that switches between all of them, including
    // back to none and a stack of both.
    let sets: Vec<(Vec<LoraSpec>, &str)> = vec![
        (vec![peft.clone()], "sd15_lora_peft_scale0.7"),
        (vec![kohya.clone()], "sd15_lora_kohya_scale1.0"),
        (vec![], "sd15_lora_peft_scale0.7"),
        (
            vec![peft.clone(), kohya.clone()],
            "sd15_lora_kohya_scale1.0",
        ),
        (vec![peft.clone()], "sd15_lora_peft_scale0.7"),
    ];
    for (loras, case) in &sets {
        shared.set_loras(loras).unwrap();
        assert_eq!(shared.loras(), loras.as_slice());
        let (lat, img, refs) = run_case(&shared, "references", case, None);
        let (fresh_lat, fresh_img) = fresh(loras, case);
        assert_eq!(max_abs(&lat, &fresh_lat), 0.0, "{loras:?}: latents differ");
        assert_eq!(max_abs(&img, &fresh_img), 0.0, "{loras:?}: images differ");
        if loras.len() == 1 {
            assert_close(case, &lat, &img, &refs);
        } else {
            // Another adapter set: the result must have moved.
            assert!(rel_l2(&lat, &refs["latents_to_vae"]) > 1e-3, "{loras:?}");
        }
    }
    assert_eq!(
        shared.base_tensor_reads(),
        reads,
        "switching LoRAs read base weights again"
    );
}

/// The two fixture files hold the same matrices: PEFT at scale 0.5 equals
/// kohya (alpha 2, rank 4) at scale 1.
#[test]
fn peft_and_kohya_layouts_agree() {
    let model = ModelDir::open(fixtures().join("models/tiny-sd15")).unwrap();
    let run = |lora: LoraSpec| {
        let mut p = test_pipeline(&model);
        p.set_loras(&[lora]).unwrap();
        run_case(&p, "references", "sd15_lora_kohya_scale1.0", None).0
    };
    let a = run(LoraSpec::new(
        fixtures().join("loras/tiny-sd15-lora.safetensors"),
        0.5,
    ));
    let b = run(LoraSpec::new(
        fixtures().join("loras/tiny-sd15-lora-kohya.safetensors"),
        1.0,
    ));
    assert!(rel_l2(&a, &b) < 1e-6);
}

/// A LoRA for modules the model lacks (an SD 1.5 LoRA on SDXL) is an error
/// naming the first such module; the pipeline is left as it was.
#[test]
fn lora_for_another_model_is_an_error() {
    let model = ModelDir::open(fixtures().join("models/tiny-sdxl")).unwrap();
    let mut p = test_pipeline(&model);
    for file in [
        "tiny-sd15-lora.safetensors",
        "tiny-sd15-lora-kohya.safetensors",
    ] {
        let e = p
            .set_loras(&[LoraSpec::new(fixtures().join("loras").join(file), 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no module"), "{e}");
        assert!(e.contains("down_blocks"), "{e}");
        assert!(p.loras().is_empty());
    }
    // Not a LoRA file at all.
    let e = p
        .set_loras(&[LoraSpec::new(
            fixtures().join("references/torch_randn.safetensors"),
            1.0,
        )])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a LoRA weight"), "{e}");
    let e = p
        .set_loras(&[LoraSpec::new(
            fixtures().join("models/tiny-sdxl/model_index.json"),
            1.0,
        )])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a readable safetensors"), "{e}");
}

// FLUX LoRA (issue 5): `tools/gen_flux_lora_refs.py` writes one rank-4
// adapter for tiny-flux-dev (every transformer linear, CLIP attention and
// MLP) in the PEFT layout and in kohya's layout with the original FLUX names
// (fused q/k/v, `linear1`, `final_layer`), and runs diffusers with each.

#[test]
fn flux_dev_lora_peft_scale0_8() {
    check_case_in("generated", "flux_dev_lora_peft_scale0.8", None);
}

#[test]
fn flux_dev_lora_kohya_scale1_6() {
    check_case_in("generated", "flux_dev_lora_kohya_scale1.6", None);
}

/// On one loaded FLUX pipeline, switching between the PEFT file, no LoRA
/// and the kohya file gives each reference in turn and reads no base
/// weights again.
#[test]
fn flux_lora_switching_matches_the_references() {
    let model = ModelDir::open(fixtures().join("models/tiny-flux-dev")).unwrap();
    let mut p = test_pipeline(&model);
    let reads = p.base_tensor_reads();
    assert!(reads > 0);
    let peft = LoraSpec::new(fixtures().join("loras/tiny-flux-lora.safetensors"), 0.8);
    let kohya = LoraSpec::new(
        fixtures().join("loras/tiny-flux-lora-kohya.safetensors"),
        1.6,
    );
    let steps: Vec<(Vec<LoraSpec>, &str, &str)> = vec![
        (
            vec![peft.clone()],
            "generated",
            "flux_dev_lora_peft_scale0.8",
        ),
        (vec![], "references", "flux_dev_txt2img"),
        (
            vec![kohya.clone()],
            "generated",
            "flux_dev_lora_kohya_scale1.6",
        ),
        (vec![peft], "generated", "flux_dev_lora_kohya_scale1.6"),
    ];
    for (loras, folder, case) in &steps {
        p.set_loras(loras).unwrap();
        assert_eq!(p.loras(), loras.as_slice());
        let (lat, img, refs) = run_case(&p, folder, case, None);
        assert_close(case, &lat, &img, &refs);
    }
    assert_eq!(p.base_tensor_reads(), reads, "switching read base weights");
}

/// The LoRA changes the result (so the parity above is not the base model's).
#[test]
fn flux_lora_moves_the_latents() {
    let model = ModelDir::open(fixtures().join("models/tiny-flux-dev")).unwrap();
    let p = test_pipeline(&model);
    let (lat, _, refs) = run_case(&p, "generated", "flux_dev_lora_peft_scale0.8", None);
    let d = rel_l2(&lat, &refs["latents_to_vae"]);
    assert!(d > 1e-2, "the LoRA moved the latents by only {d:.2e}");
}

/// A LoRA whose shapes do not fit (the dev adapter's `x_embedder` on Fill,
/// which takes 384 input channels) or whose modules the transformer lacks
/// (an SD 1.5 LoRA) is an error naming the layer; the pipeline is unchanged.
#[test]
fn flux_lora_for_another_model_is_an_error() {
    let model = ModelDir::open(fixtures().join("models/tiny-flux-fill")).unwrap();
    let mut p = test_pipeline(&model);
    let e = p
        .set_loras(&[LoraSpec::new(
            fixtures().join("loras/tiny-flux-lora.safetensors"),
            1.0,
        )])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x_embedder") && e.contains("does not fit"),
        "{e}"
    );
    assert!(p.loras().is_empty());
    for file in [
        "tiny-sd15-lora.safetensors",
        "tiny-sd15-lora-kohya.safetensors",
    ] {
        let e = p
            .set_loras(&[LoraSpec::new(fixtures().join("loras").join(file), 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no module"), "{e}");
        assert!(e.contains("transformer"), "{e}");
    }
    assert!(p.loras().is_empty());
}

/// The kohya file's keys respelled as ComfyUI writes them
/// (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`) give
/// the same result.
#[test]
fn flux_lora_comfyui_spelling_matches_kohya() {
    let src = fixtures().join("loras/tiny-flux-lora-kohya.safetensors");
    let all = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let dotted = |name: &str| -> String {
        // The original FLUX module path of an underscored kohya name.
        let mut out = name.to_string();
        for (from, to) in [
            ("double_blocks_", "double_blocks."),
            ("single_blocks_", "single_blocks."),
            ("_img_attn_", ".img_attn."),
            ("_txt_attn_", ".txt_attn."),
            ("_img_mlp_", ".img_mlp."),
            ("_txt_mlp_", ".txt_mlp."),
            ("_img_mod_lin", ".img_mod.lin"),
            ("_txt_mod_lin", ".txt_mod.lin"),
            ("_linear1", ".linear1"),
            ("_linear2", ".linear2"),
            ("_modulation_lin", ".modulation.lin"),
            ("_in_layer", ".in_layer"),
            ("_out_layer", ".out_layer"),
            (
                "final_layer_adaLN_modulation_1",
                "final_layer.adaLN_modulation.1",
            ),
            ("final_layer_linear", "final_layer.linear"),
        ] {
            out = out.replace(from, to);
        }
        out
    };
    let respelled: std::collections::HashMap<String, Tensor> = all
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("lora_unet_") {
            Some(rest) => {
                let (stem, part) = rest.split_once('.').unwrap();
                (format!("diffusion_model.{}.{part}", dotted(stem)), v)
            }
            None => (k, v),
        })
        .collect();
    assert!(respelled
        .keys()
        .any(|k| k == "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comfy.safetensors");
    candle_core::safetensors::save(&respelled, &path).unwrap();
    let model = ModelDir::open(fixtures().join("models/tiny-flux-dev")).unwrap();
    let mut p = test_pipeline(&model);
    p.set_loras(&[LoraSpec::new(path, 1.6)]).unwrap();
    let (lat, img, refs) = run_case(&p, "generated", "flux_dev_lora_kohya_scale1.6", None);
    assert_close("comfyui spelling", &lat, &img, &refs);
}

/// The tiny fixtures have 32–64 channels, below the Winograd threshold, so
/// the cases above run the direct 3×3 kernel; these run every convolution
/// of the UNet / transformer-free VAE through Winograd F(2×2, 3×3) and must
/// land within the same tolerances (text-to-image SD 1.5, SD 2 v-prediction,
/// SDXL, inpainting, image-to-image with VAE encode, FLUX's 16-channel VAE).
#[test]
fn winograd_kernel_reproduces_the_references() {
    use easel_diffusion::models::kernels::{with_conv3x3_kernel, Conv3x3Kernel};
    with_conv3x3_kernel(Conv3x3Kernel::Winograd, || {
        for case in [
            "sd15_txt2img_euler",
            "sd2v_txt2img_ddim",
            "sdxl_txt2img_euler",
            "sd15_inpaint_ddim",
            "sd15_img2img_ddim",
            "flux_dev_txt2img",
        ] {
            check_case(case);
        }
    });
}

/// Pillow's Lanczos resize, byte for byte (`image_resize.safetensors`).
#[test]
fn lanczos_resize_matches_pillow() {
    use easel_diffusion::image_processor::resize_lanczos;
    let refs = load_refs("generated/image_resize.safetensors");
    assert!(!refs.is_empty());
    for (key, want) in &refs {
        let (src, rest) = key.split_once(".png.").unwrap();
        let (mode, size) = rest.split_once('.').unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let img = image_input(&fixtures().join("generated").join(format!("{src}.png")));
        let (pixels, channels) = match mode {
            "RGB" => (img.rgb.clone(), 3),
            _ => (easel_diffusion::image_processor::rgb_to_luma(&img.rgb), 1),
        };
        let got = resize_lanczos(&pixels, img.width, img.height, channels, w, h).unwrap();
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(got.len(), want.len(), "{key}");
        assert_eq!(diff, 0, "{key}: {diff} bytes differ from Pillow");
    }
}

// Single-file checkpoints (issue 14): the fixture models converted to the
// original LDM / A1111 layout by `tools/gen_single_files.py` (which proves
// with diffusers' `from_single_file` that they hold the folders' weights)
// must reproduce the folders' references, with the configs of a copy of
// the folder that has no weight files (so every tensor comes from the
// single file).

/// A copy of fixture model `name` without its `.safetensors` files (for a
/// FLUX model, without its transformer's only: the text encoders and VAE
/// of a transformer-only file come from the config folder).
fn configs_only(name: &str) -> tempfile::TempDir {
    fn copy(from: &std::path::Path, to: &std::path::Path, flux: bool) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            let weights = path.extension().is_some_and(|e| e == "safetensors");
            let keep = !weights || (flux && !from.ends_with("transformer"));
            if path.is_dir() {
                copy(&path, &target, flux);
            } else if keep {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&model(name), dir.path(), name.contains("flux"));
    dir
}

/// `file` opened as a single-file checkpoint with the configs (and any
/// component the file lacks) of the folder `config`, offline.
fn open_with_config(file: &std::path::Path, config: &str) -> ModelDir {
    easel_diffusion::loader::open_single_file(
        file,
        Some(config),
        None,
        &easel_diffusion::loader::ResolveOptions {
            offline: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Write the tensors of `source` that `rename` keeps (under the name it
/// gives) to a GGUF file at `path`, f16 matrices and f32 vectors, as
/// city96's and stable-diffusion.cpp's converters store unquantized
/// tensors; `metadata` as given. Returns how many tensors were written.
fn write_gguf(
    source: &easel_diffusion::loader::CheckpointFile,
    rename: impl Fn(&str) -> Option<String>,
    metadata: &[(&str, &candle_core::quantized::gguf_file::Value)],
    path: &std::path::Path,
) -> usize {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let mut tensors = Vec::new();
    for key in source.keys() {
        let Some(name) = rename(&key) else {
            continue;
        };
        let t = source.load(&key, &Device::Cpu).unwrap();
        let values = t
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    }
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), metadata, &refs).unwrap();
    tensors.len()
}

/// Run reference case `name` on its model loaded from the single file.
fn check_single_file_case(folder: &str, name: &str) {
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join(folder).join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let model_name = case["model"]
        .as_str()
        .unwrap()
        .trim_start_matches("models/")
        .to_string();
    let file = single_file_fixture(&model_name);
    let config = configs_only(&model_name);
    let options = easel_diffusion::loader::ResolveOptions {
        offline: true,
        ..Default::default()
    };
    let model = easel_diffusion::loader::open_single_file(
        &file,
        Some(config.path().to_str().unwrap()),
        None,
        &options,
    )
    .unwrap();
    assert_eq!(model.single_file().unwrap().path(), file);
    let mut pipeline = test_pipeline(&model);
    pipeline.set_loras(&case_loras(&case)).unwrap();
    let (latents, images, tensors) = run_case(&pipeline, folder, name, None);
    assert_close(
        &format!("{name} (single file)"),
        &latents,
        &images,
        &tensors,
    );
}

#[test]
fn single_file_sd15_txt2img_euler() {
    check_single_file_case("references", "sd15_txt2img_euler");
}

#[test]
fn single_file_sd15_lora_kohya() {
    check_single_file_case("references", "sd15_lora_kohya_scale1.0");
}

#[test]
fn single_file_sd2v_txt2img_ddim() {
    check_single_file_case("references", "sd2v_txt2img_ddim");
}

#[test]
fn single_file_sdxl_txt2img_euler() {
    check_single_file_case("references", "sdxl_txt2img_euler");
}

#[test]
fn single_file_sdxl_lora_kohya() {
    check_single_file_case("generated", "sdxl_lora_kohya_scale1.6");
}

// FLUX transformer-only files in the Black Forest Labs layout, written by
// `tools/gen_flux_single_files.py` (proved with diffusers'
// `FluxTransformer2DModel.from_single_file`): the transformer from the
// file, everything else from the config folder. The schnell file has
// ComfyUI's `model.diffusion_model.` prefix.

#[test]
fn single_file_flux_dev_txt2img() {
    check_single_file_case("references", "flux_dev_txt2img");
}

#[test]
fn single_file_flux_dev_lora_kohya() {
    check_single_file_case("generated", "flux_dev_lora_kohya_scale1.6");
}

#[test]
fn single_file_flux_schnell_comfy_prefix_txt2img() {
    check_single_file_case("references", "flux_schnell_txt2img");
}

#[test]
fn single_file_flux_fill_inpaint() {
    check_single_file_case("references", "flux_fill_inpaint");
}

// Quantized and fp8 FLUX.1 transformers (issue 14), written by
// tools/gen_quantized_refs.py: city96-layout GGUF files (Q8_0, Q4_0) and
// fp8 safetensors (e4m3fn, e5m2, ComfyUI's scaled fp8) of the tiny dev
// transformer. The weights stay quantized / fp8 in memory and are widened
// exactly per layer; the `_exact` references load the same file's weights
// dequantized exactly in f32 (ggml's arithmetic), the `_diffusers` ones
// are diffusers' GGUFQuantizationConfig at compute dtype f32, which rounds
// dequantized weights to f16 first (so: within 5e-4 and one level).

/// Run reference case `name` (in `generated/quantized/`) on the file its
/// JSON names as `transformer_file`, opened as a single file with the tiny
/// dev folder's configs, text encoders and VAE. Returns the stored types
/// of the transformer's tensors and the outputs against the reference.
fn run_transformer_file_case(name: &str) -> (Vec<String>, f64, f64) {
    let folder = "generated/quantized";
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join(folder).join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let file = fixtures().join(case["transformer_file"].as_str().unwrap());
    let config = configs_only("tiny-flux-dev");
    let options = easel_diffusion::loader::ResolveOptions {
        offline: true,
        ..Default::default()
    };
    let model = easel_diffusion::loader::open_single_file(
        &file,
        Some(config.path().to_str().unwrap()),
        None,
        &options,
    )
    .unwrap();
    let types: Vec<String> = model
        .single_file()
        .unwrap()
        .tensor_infos("transformer")
        .into_iter()
        .map(|(_, dtype, _)| dtype)
        .collect();
    let pipeline = test_pipeline(&model);
    let (latents, images, tensors) = run_case(&pipeline, folder, name, None);
    let lat = rel_l2(&latents, &tensors["latents_to_vae"]);
    let img = max_abs(&images, &tensors["image"]);
    eprintln!("{name}: latents_to_vae rel L2 {lat:.2e}, image max abs {img:.2e}");
    (types, lat, img)
}

/// The exact-dequantization reference to 1e-4 / 1e-3 (as every parity
/// case), diffusers' f16-rounded one to 5e-4 and one 8-bit level.
fn check_gguf_case(quant: &str) {
    let (types, lat, img) = run_transformer_file_case(&format!("flux_dev_gguf_{quant}_exact"));
    let want = quant.to_uppercase();
    assert!(
        types.iter().filter(|t| **t == want).count() >= 20,
        "the GGUF file's block weights are {want}: {types:?}"
    );
    let (lat_tol, img_tol) = tolerance(1e-4, 1e-3);
    assert!(
        lat <= lat_tol,
        "{quant} exact: latents rel L2 {lat:.3e} > {lat_tol:e}"
    );
    assert!(
        img <= img_tol,
        "{quant} exact: image max abs {img:.3e} > {img_tol:e}"
    );
    let (_, lat, img) = run_transformer_file_case(&format!("flux_dev_gguf_{quant}_diffusers"));
    let (lat_tol, img_tol) = tolerance(5e-4, 1.0 / 255.0);
    assert!(
        lat <= lat_tol,
        "{quant} diffusers: latents rel L2 {lat:.3e} > {lat_tol:e}"
    );
    assert!(
        img <= img_tol,
        "{quant} diffusers: image max abs {img:.3e} > {img_tol:e}"
    );
}

#[test]
fn gguf_flux_dev_q8_0() {
    check_gguf_case("q8_0");
}

#[test]
fn gguf_flux_dev_q4_0() {
    check_gguf_case("q4_0");
}

/// fp8 files against diffusers loading the same file (exact widening).
fn check_fp8_case(name: &str, format: &str) {
    let (types, lat, img) = run_transformer_file_case(name);
    assert!(
        types.iter().filter(|t| *t == format).count() >= 30,
        "the file's matrix weights are {format}: {types:?}"
    );
    let (lat_tol, img_tol) = tolerance(1e-4, 1e-3);
    assert!(
        lat <= lat_tol,
        "{name}: latents rel L2 {lat:.3e} > {lat_tol:e}"
    );
    assert!(
        img <= img_tol,
        "{name}: image max abs {img:.3e} > {img_tol:e}"
    );
}

#[test]
fn fp8_flux_dev_e4m3fn() {
    check_fp8_case("flux_dev_fp8_e4m3fn", "F8_E4M3");
}

#[test]
fn fp8_flux_dev_e5m2() {
    check_fp8_case("flux_dev_fp8_e5m2", "F8_E5M2");
}

#[test]
fn fp8_flux_dev_scaled() {
    check_fp8_case("flux_dev_fp8_scaled", "F8_E4M3");
}

/// A UNet-only GGUF file in city96's layout (LDM UNet keys without
/// `model.diffusion_model.`; f16 matrices, f32 vectors, no VAE or text
/// encoder), written here from the tiny SDXL single file, opened with the
/// tiny SDXL folder as `--config` (which gives the text encoders and the
/// VAE): the folder's reference, exactly as from the safetensors file.
#[test]
fn gguf_sdxl_unet_only_txt2img_euler() {
    let source =
        easel_diffusion::loader::CheckpointFile::open(&single_file_fixture("tiny-sdxl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-sdxl-unet-F16.gguf");
    let arch = candle_core::quantized::gguf_file::Value::String("sdxl".into());
    let written = write_gguf(
        &source,
        |k| k.strip_prefix("model.diffusion_model.").map(str::to_string),
        &[("general.architecture", &arch)],
        &path,
    );
    assert!(written > 100, "{written} UNet tensors");
    let model = open_with_config(&path, model("tiny-sdxl").to_str().unwrap());
    let file = model.single_file().unwrap();
    assert!(file.detected().unet_only);
    assert_eq!(file.format(), "GGUF");
    assert_eq!(file.components().collect::<Vec<_>>(), ["unet"]);
    let pipeline = test_pipeline(&model);
    let (latents, images, refs) = run_case(&pipeline, "references", "sdxl_txt2img_euler", None);
    assert_close(
        "sdxl_txt2img_euler (UNet-only GGUF)",
        &latents,
        &images,
        &refs,
    );
}

/// `--quantize` on the tiny FLUX dev folder. Q8_0 made at load (candle's
/// `quantize_row_q8_0`) holds the very values of the Q8_0 GGUF file
/// gguf-py wrote from the same f16 weights, for the block weights both
/// quantize (the GGUF keeps the embedders and the final layer f32 / f16 as
/// `--quantize` does). End to end (T5 quantized too) each quantization
/// stays within the error its bits allow of the unquantized reference (the
/// GGUF references show the transformer's share: Q8_0 3e-4, Q4_0 6e-3,
/// fp8 2e-2 relative L2 of the latents).
#[test]
fn quantize_at_load_flux_dev() {
    use easel_diffusion::models::quantize::Quantization;
    let folder = |q: Quantization| {
        ModelDir::open(model("tiny-flux-dev"))
            .unwrap()
            .with_quantization(Some(q))
    };
    let at_load =
        easel_diffusion::pipelines::component_source(&folder(Quantization::Q8_0), "transformer")
            .unwrap();
    let config = configs_only("tiny-flux-dev");
    let gguf = open_with_config(
        &fixtures().join("generated/quantized/tiny-flux-dev-Q8_0.gguf"),
        config.path().to_str().unwrap(),
    );
    let from_file = gguf.single_file().unwrap().source("transformer").unwrap();
    let mut compared = 0;
    for name in from_file.keys() {
        let want = from_file.stored(&name, &[], &Device::Cpu).unwrap().unwrap();
        if want.type_name() != "Q8_0" {
            continue;
        }
        let got = at_load
            .stored(&name, want.dims(), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(got.type_name(), "Q8_0", "{name}");
        let diff = max_abs(
            &got.to_dense(&Device::Cpu).unwrap(),
            &want.to_dense(&Device::Cpu).unwrap(),
        );
        assert!(diff <= 1e-6, "{name}: Q8_0 values differ by {diff:e}");
        compared += 1;
    }
    assert!(compared >= 20, "{compared} Q8_0 weights compared");
    for (q, bound) in [
        (Quantization::Q8_0, 2e-3),
        (Quantization::Q4_0, 2e-2),
        (Quantization::Fp8, 5e-2),
    ] {
        let pipeline = test_pipeline(&folder(q));
        let (latents, _, refs) = run_case(&pipeline, "references", "flux_dev_txt2img", None);
        let lat = rel_l2(&latents, &refs["latents_to_vae"]);
        eprintln!(
            "--quantize {}: latents rel L2 {lat:.2e} from the unquantized reference",
            q.name()
        );
        assert!(lat > 1e-5, "{q:?} changed nothing: {lat:e}");
        let (bound, _) = tolerance(bound, 0.0);
        assert!(lat < bound, "{q:?}: latents rel L2 {lat:.3e} >= {bound:e}");
    }
}

/// A LoRA on a quantized transformer: the Q8_0 GGUF file with the kohya
/// FLUX LoRA at scale 1.6 (the weights it changes merged in f32, the rest
/// kept Q8_0) lands within Q8_0's error of diffusers' f16 folder with the
/// same LoRA, several times closer than the file without the LoRA is; and
/// switching the LoRA off gives the file's own image back.
#[test]
fn gguf_flux_dev_q8_0_with_lora() {
    let config = configs_only("tiny-flux-dev");
    let model = open_with_config(
        &fixtures().join("generated/quantized/tiny-flux-dev-Q8_0.gguf"),
        config.path().to_str().unwrap(),
    );
    let mut pipeline = test_pipeline(&model);
    let name = "flux_dev_lora_kohya_scale1.6";
    let (latents, _, refs) = run_case(&pipeline, "generated", name, None);
    let without = rel_l2(&latents, &refs["latents_to_vae"]);
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(fixtures().join(format!("generated/{name}.json"))).unwrap(),
    )
    .unwrap();
    pipeline.set_loras(&case_loras(&case)).unwrap();
    let (latents, _, refs) = run_case(&pipeline, "generated", name, None);
    let with = rel_l2(&latents, &refs["latents_to_vae"]);
    eprintln!(
        "Q8_0 GGUF vs the f16 + LoRA reference: with the LoRA {with:.2e}, without {without:.2e}"
    );
    let (bound, _) = tolerance(1e-2, 0.0);
    assert!(with < bound, "Q8_0 GGUF + LoRA: {with:.3e}");
    assert!(
        with * 5.0 < without,
        "the LoRA moved it too little: {with:.3e} vs {without:.3e}"
    );
    pipeline.set_loras(&[]).unwrap();
    let (latents, images, refs) = run_case(
        &pipeline,
        "generated/quantized",
        "flux_dev_gguf_q8_0_exact",
        None,
    );
    assert_close("Q8_0 GGUF, LoRA off again", &latents, &images, &refs);
}

/// An all-in-one FLUX.1 file as ComfyUI saves them (the BFL transformer
/// under `model.diffusion_model.`, CLIP-L under
/// `text_encoders.clip_l.transformer.`, T5 under
/// `text_encoders.t5xxl.transformer.`, the VAE under `vae.`), written here
/// from the tiny dev fixtures, with a config folder that holds no weights
/// at all: every component comes from the file, and the image is the
/// folder's reference.
#[test]
fn single_file_flux_dev_all_in_one() {
    fn copy_configs(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_configs(&path, &target);
            } else if path.extension().is_none_or(|e| e != "safetensors") {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    let mut tensors = std::collections::HashMap::new();
    let mut add = |file: &std::path::Path, prefix: &str| {
        for (k, t) in candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
            tensors.insert(format!("{prefix}{k}"), t);
        }
    };
    add(
        &single_file_fixture("tiny-flux-dev"),
        "model.diffusion_model.",
    );
    let folder = model("tiny-flux-dev");
    add(
        &folder.join("text_encoder/model.safetensors"),
        "text_encoders.clip_l.transformer.",
    );
    add(
        &folder.join("text_encoder_2/model.safetensors"),
        "text_encoders.t5xxl.transformer.",
    );
    add(
        &folder.join("vae/diffusion_pytorch_model.safetensors"),
        "vae.",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flux1-dev-all-in-one.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let config = dir.path().join("config");
    copy_configs(&folder, &config);
    let model = open_with_config(&file, config.to_str().unwrap());
    assert!(model.single_file().unwrap().detected().bundled);
    for c in ["text_encoder", "text_encoder_2", "vae"] {
        assert!(model.component_file(c).is_some(), "{c} from the file");
    }
    let pipeline = test_pipeline(&model);
    let (latents, images, refs) = run_case(&pipeline, "references", "flux_dev_txt2img", None);
    assert_close(
        "flux_dev_txt2img (all-in-one file)",
        &latents,
        &images,
        &refs,
    );
}

/// A whole SD 1.5 checkpoint as stable-diffusion.cpp's converter writes
/// GGUF files (every tensor under its LDM name and prefix, no metadata,
/// f16 matrices and f32 vectors), written here from the tiny single file:
/// detected as SD 1.x from its keys and the folder's reference exactly.
#[test]
fn gguf_sd15_whole_checkpoint_txt2img_euler() {
    let source =
        easel_diffusion::loader::CheckpointFile::open(&single_file_fixture("tiny-sd15")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-sd15-F16.gguf");
    write_gguf(&source, |k| Some(k.to_string()), &[], &path);
    let config = configs_only("tiny-sd15");
    let model = open_with_config(&path, config.path().to_str().unwrap());
    let file = model.single_file().unwrap();
    assert_eq!(file.format(), "GGUF");
    assert!(!file.detected().unet_only);
    assert_eq!(
        file.components().collect::<Vec<_>>(),
        ["text_encoder", "unet", "vae"]
    );
    let pipeline = test_pipeline(&model);
    let (latents, images, refs) = run_case(&pipeline, "references", "sd15_txt2img_euler", None);
    assert_close("sd15_txt2img_euler (whole GGUF)", &latents, &images, &refs);
}

/// `--offload-t5`: FLUX's T5 loaded per prompt encoding and freed after
/// gives the same image, and the model's estimate leaves T5 out.
#[test]
fn flux_dev_offloaded_t5() {
    let kept = ModelDir::open(model("tiny-flux-dev")).unwrap();
    let offloaded = kept.clone().with_offloaded_t5(true);
    let full = easel_diffusion::engine::estimate_model_bytes(&kept);
    let less = easel_diffusion::engine::estimate_model_bytes(&offloaded);
    assert!(less < full, "estimate {less} not below {full}");
    let pipeline = test_pipeline(&offloaded);
    let (latents, images, refs) = run_case(&pipeline, "references", "flux_dev_txt2img", None);
    assert_close("flux_dev_txt2img (T5 offloaded)", &latents, &images, &refs);
}
