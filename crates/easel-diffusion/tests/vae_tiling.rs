//! Tiled VAE decode (`VaeTiling`, `--vae-tiling`) against diffusers'
//! `AutoencoderKL.enable_tiling()` decode (`tools/gen_vae_tiling_refs.py`,
//! `tests/fixtures/generated/vae_tiling.safetensors` and
//! `sd15_vae_tiling_ddim.*`).
//!
//! The tiny VAEs have `sample_size` 64: 8x8-latent tiles every 6 latents,
//! 16 pixels blended, 48 kept. The latents are larger than a tile in both
//! directions (13x17, 11x14) or in one (8x9), so several tiles overlap.
//! Random weights make the tiles disagree strongly (the tiled and untiled
//! decodes differ by over 1.5 in [-1, 1]), so a wrong blend, stride or crop
//! cannot pass.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use easel_core::GenerationParams;
use easel_diffusion::engine::{Engine, EngineOptions, JobRequest};
use easel_diffusion::loader::{ModelDir, ResolveOptions};
use easel_diffusion::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use easel_diffusion::models::vae_tiling::{VaeTileLayout, VaeTiling};
use easel_diffusion::noise::RecordedNoise;
use easel_diffusion::pipelines::{
    decode_to_images, load_pipeline, CancelToken, GenerationOutput, GenerationRequest, RunContext,
};

/// The VAE component tolerance of `components.rs` (relative L2).
const VAE_TOL: f64 = 1e-5;

fn vae(folder: &str) -> AutoencoderKL {
    let cfg = AutoencoderKLConfig::from_file(&model(folder).join("vae/config.json")).unwrap();
    AutoencoderKL::load(&component_weights(folder, "vae"), &cfg, false).unwrap()
}

fn refs() -> std::collections::HashMap<String, Tensor> {
    load_refs("generated/vae_tiling.safetensors")
}

#[test]
fn the_tile_layout_is_diffusers_for_the_fixture_and_real_vaes() {
    let cfg = vae("tiny-sd15").config().clone();
    let layout = VaeTileLayout::from_config(&cfg).unwrap();
    assert_eq!(
        layout,
        VaeTileLayout {
            tile_latent_min_size: 8,
            tile_sample_min_size: 64,
            overlap_stride: 6,
            blend_extent: 16,
            row_limit: 48,
        }
    );
    assert_eq!(layout.grid(13, 17), (3, 3));
    assert!(!layout.tiles(8, 8));
    assert!(layout.tiles(8, 9) && layout.tiles(9, 8));
    // SD 1.x (sample_size 512), SDXL / FLUX (1024), a list (first wins),
    // and diffusers' default 32 when the config has none.
    for (sample, latent, stride, blend) in [
        (serde_json::json!(512), 64, 48, 128),
        (serde_json::json!(1024), 128, 96, 256),
        (serde_json::json!([768, 512]), 96, 72, 192),
    ] {
        let cfg = AutoencoderKLConfig {
            sample_size: Some(sample.clone()),
            ..cfg.clone()
        };
        let l = VaeTileLayout::from_config(&cfg).unwrap();
        assert_eq!(
            (l.tile_latent_min_size, l.overlap_stride, l.blend_extent),
            (latent, stride, blend),
            "{sample}"
        );
        assert_eq!(l.row_limit, l.tile_sample_min_size - blend);
    }
    let none = AutoencoderKLConfig {
        sample_size: None,
        ..cfg.clone()
    };
    assert_eq!(
        VaeTileLayout::from_config(&none)
            .unwrap()
            .tile_latent_min_size,
        4
    );
    for bad in [serde_json::json!("big"), serde_json::json!(8)] {
        let cfg = AutoencoderKLConfig {
            sample_size: Some(bad.clone()),
            ..cfg.clone()
        };
        let e = VaeTileLayout::from_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("sample_size"), "{bad}: {e}");
    }
}

#[test]
fn tiled_decode_matches_diffusers_enable_tiling() {
    let r = refs();
    for (key, folder) in [
        ("sd15_13x17", "tiny-sd15"),
        ("sd15_8x9", "tiny-sd15"),
        ("flux_11x14", "tiny-flux-schnell"),
    ] {
        let vae = vae(folder);
        let z = &r[&format!("{key}.z")];
        assert!(VaeTiling::On.resolve(vae.config(), z, false).unwrap());
        let tiled = vae.decode_with_tiling(z, true).unwrap();
        assert_close(
            &format!("{key} tiled"),
            &tiled,
            &r[&format!("{key}.tiled")],
            VAE_TOL,
        );
        // The comparison can fail: the untiled decode is far from it.
        let untiled = vae.decode(z).unwrap();
        let apart = max_abs(&untiled, &r[&format!("{key}.tiled")]);
        assert!(apart > 0.5, "{key}: untiled is within {apart} of tiled");
    }
}

#[test]
fn tiles_differ_from_the_untiled_decode_and_keep_their_own_decode_away_from_seams() {
    let r = refs();
    let vae = vae("tiny-sd15");
    let z = &r["sd15_13x17.z"];
    let untiled = vae.decode(z).unwrap();
    // Ours matches diffusers' untiled decode, and diffusers' tiled one is
    // far from it.
    assert_close("untiled", &untiled, &r["sd15_13x17.untiled"], VAE_TOL);
    let tiled = vae.tiled_decode(z).unwrap();
    assert_eq!(tiled.dims(), untiled.dims());
    // In the band where the first and second column of tiles are blended
    // (pixels 48..64 of each row), the images differ.
    let band = |t: &Tensor| t.narrow(3, 48, 16).unwrap();
    let in_band = max_abs(&band(&tiled), &band(&untiled));
    assert!(in_band > 0.5, "overlap band differs by only {in_band}");
    // The first tile's kept corner (rows and columns 0..48, blended with
    // nothing) is that tile decoded alone.
    let corner = |t: &Tensor| t.narrow(2, 0, 48).unwrap().narrow(3, 0, 48).unwrap();
    let first_tile = vae
        .decode(&z.narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap())
        .unwrap();
    assert_eq!(max_abs(&corner(&tiled), &corner(&first_tile)), 0.0);
}

#[test]
fn latents_no_larger_than_a_tile_take_the_untiled_path() {
    let vae = vae("tiny-sd15");
    let z = &refs()["sd15_13x17.z"];
    for (h, w) in [(8, 8), (8, 5), (3, 8)] {
        let small = z.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
        assert!(!VaeTiling::On.resolve(vae.config(), &small, false).unwrap());
        let plain = vae.decode(&small).unwrap();
        let tiled = vae.decode_with_tiling(&small, true).unwrap();
        assert_eq!(max_abs(&tiled, &plain), 0.0, "{h}x{w}");
    }
    // Forced through the tiler, as diffusers' `tiled_decode` itself, a tile
    // starts every 6 latents even below the tile size: 8 latents are two
    // overlapping tiles, 6 one (the plain decode).
    let eight = z.narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap();
    assert!(
        max_abs(
            &vae.tiled_decode(&eight).unwrap(),
            &vae.decode(&eight).unwrap()
        ) > 0.1
    );
    for (h, w) in [(6, 6), (2, 5)] {
        let small = z.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
        let plain = vae.decode(&small).unwrap();
        assert_eq!(max_abs(&vae.tiled_decode(&small).unwrap(), &plain), 0.0);
    }
}

#[test]
fn off_never_tiles_and_auto_tiles_only_large_images() {
    let vae = vae("tiny-sd15");
    let cfg = vae.config();
    let z = &refs()["sd15_13x17.z"];
    assert!(!VaeTiling::Off.resolve(cfg, z, false).unwrap());
    // Auto leaves an ordinary CPU decode whole.
    assert!(!VaeTiling::Auto.resolve(cfg, z, false).unwrap());
    // On the CPU, auto tiles above 2048x2048 pixels per image, never with
    // seamless tiling; off never does. (Only the shape is read.)
    let latents = |h: usize, w: usize| Tensor::zeros((1, 4, h, w), DType::F32, &Device::Cpu);
    let (big, edge) = (latents(264, 256).unwrap(), latents(256, 256).unwrap());
    assert!(VaeTiling::Auto.resolve(cfg, &big, false).unwrap());
    assert!(!VaeTiling::Auto.resolve(cfg, &edge, false).unwrap());
    assert!(!VaeTiling::Auto.resolve(cfg, &big, true).unwrap());
    assert!(!VaeTiling::Off.resolve(cfg, &big, false).unwrap());
    let e = VaeTiling::On.resolve(cfg, z, true).unwrap_err().to_string();
    assert!(e.contains("vae_tiling") && e.contains("seamless"), "{e}");

    // Through the decode stage: off is the untiled decode, on the tiled one.
    let mut warnings = Vec::new();
    let stage = |mode: VaeTiling, warnings: &mut Vec<String>| {
        let request = GenerationRequest {
            vae_tiling: mode,
            ..Default::default()
        };
        decode_to_images(&vae, z, &request, warnings).unwrap()
    };
    let to_images = |x: Tensor| {
        ((x / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
    };
    let off = stage(VaeTiling::Off, &mut warnings);
    assert_eq!(max_abs(&off, &to_images(vae.decode(z).unwrap())), 0.0);
    let auto = stage(VaeTiling::Auto, &mut warnings);
    assert_eq!(max_abs(&auto, &off), 0.0);
    let on = stage(VaeTiling::On, &mut warnings);
    assert_eq!(max_abs(&on, &to_images(vae.tiled_decode(z).unwrap())), 0.0);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn modes_parse_from_their_names_and_refuse_others() {
    for (name, mode) in [
        ("auto", VaeTiling::Auto),
        ("on", VaeTiling::On),
        ("OFF", VaeTiling::Off),
    ] {
        assert_eq!(name.parse::<VaeTiling>().unwrap(), mode);
        assert_eq!(mode.to_string(), name.to_ascii_lowercase());
    }
    let e = "tiles".parse::<VaeTiling>().unwrap_err().to_string();
    assert!(
        e.contains("vae_tiling") && e.contains("auto, on, off"),
        "{e}"
    );
    assert_eq!(VaeTiling::default(), VaeTiling::Auto);
}

/// The diffusers pipeline case `sd15_vae_tiling_ddim` (`pipe.vae.enable_tiling()`).
fn reference_case() -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures().join("generated");
    let case: serde_json::Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(dir.join("sd15_vae_tiling_ddim.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(case["vae_tiling"], true);
    (
        case,
        load_refs("generated/sd15_vae_tiling_ddim.safetensors"),
    )
}

fn reference_request(case: &serde_json::Value) -> GenerationRequest {
    GenerationRequest {
        prompts: vec![case["prompt"].as_str().unwrap().to_string()],
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"].as_str().map(String::from),
        ..Default::default()
    }
}

#[test]
fn a_pipeline_run_with_vae_tiling_on_matches_diffusers() {
    let (case, tensors) = reference_case();
    let pipeline = load_pipeline(
        &ModelDir::open(fixtures().join(case["model"].as_str().unwrap())).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let run = |vae_tiling: VaeTiling| -> GenerationOutput {
        let request = GenerationRequest {
            vae_tiling,
            ..reference_request(&case)
        };
        let draws: Vec<Tensor> = (0..)
            .map_while(|i| tensors.get(&format!("noise.{i}")).cloned())
            .collect();
        let mut noise = RecordedNoise::new(draws);
        let mut progress = |_| {};
        let mut ctx = RunContext {
            noise: &mut noise,
            progress: &mut progress,
            cancel: CancelToken::new(),
        };
        let out = pipeline.run(&request, &mut ctx).unwrap();
        assert_eq!(noise.remaining(), 0, "recorded draws left over");
        out
    };
    let on = run(VaeTiling::On);
    let lat = rel_l2(&on.latents_to_vae, &tensors["latents_to_vae"]);
    let img = max_abs(&on.images, &tensors["image"]);
    eprintln!("sd15_vae_tiling_ddim: latents_to_vae rel L2 {lat:.2e}, image max abs {img:.2e}");
    assert!(lat <= 1e-4, "latents_to_vae relative L2 {lat:.3e}");
    assert!(img <= 1e-3, "image max abs {img:.3e}");
    // Auto (an ordinary CPU size) and off decode whole: far from the reference.
    for mode in [VaeTiling::Auto, VaeTiling::Off] {
        let whole = max_abs(&run(mode).images, &tensors["image"]);
        assert!(
            whole > 1e-2,
            "{mode}: the untiled image matches too ({whole:.3e})"
        );
    }

    // Seamless tiling with VAE tiling on is refused before any work.
    let request = GenerationRequest {
        tiling: true,
        vae_tiling: VaeTiling::On,
        ..reference_request(&case)
    };
    let mut noise = RecordedNoise::new(Vec::new());
    let mut progress = |_| {};
    let mut ctx = RunContext {
        noise: &mut noise,
        progress: &mut progress,
        cancel: CancelToken::new(),
    };
    let e = pipeline.run(&request, &mut ctx).err().unwrap().to_string();
    assert!(e.contains("vae_tiling") && e.contains("seamless"), "{e}");
}

/// The engine's `vae_tiling` reaches the decode of a job that leaves it
/// `auto`: with the reference's seed (the engine draws torch's CPU noise),
/// `on` gives diffusers' tiled image to within one 8-bit level.
#[test]
fn the_engine_option_reaches_the_decode() {
    let (case, tensors) = reference_case();
    let reference = fixtures()
        .join(case["model"].as_str().unwrap())
        .display()
        .to_string();
    let run = |vae_tiling: VaeTiling| -> Vec<u8> {
        let mut engine = Engine::new(EngineOptions {
            resolve: ResolveOptions {
                offline: true,
                ..ResolveOptions::default()
            },
            vae_tiling,
            ..EngineOptions::default()
        });
        let defaults = engine.load(&reference).unwrap().defaults().clone();
        let job = JobRequest::new(
            reference.clone(),
            GenerationParams {
                steps: Some(case["num_inference_steps"].as_u64().unwrap() as u32),
                guidance_scale: case["guidance_scale"].as_f64(),
                width: Some(case["width"].as_u64().unwrap() as u32),
                height: Some(case["height"].as_u64().unwrap() as u32),
                seed: case["seed"].as_u64(),
                scheduler: Some("DDIMScheduler".into()),
                ..GenerationParams::new(case["prompt"].as_str().unwrap())
            },
        )
        .build(&defaults)
        .unwrap();
        assert_eq!(job.request.vae_tiling, VaeTiling::Auto);
        let out = engine.run(&job, &mut |_| {}, &CancelToken::new()).unwrap();
        out.images.into_iter().next().unwrap()
    };
    let want: Vec<f32> = tensors["image"].flatten_all().unwrap().to_vec1().unwrap();
    let levels = |got: &[u8]| {
        got.iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f32 - w * 255.0).abs())
            .fold(0f32, f32::max)
    };
    let on = levels(&run(VaeTiling::On));
    assert!(
        on <= 1.0,
        "engine with vae_tiling on is {on} levels from diffusers"
    );
    let off = levels(&run(VaeTiling::Off));
    assert!(
        off > 5.0,
        "engine with vae_tiling off is only {off} levels away"
    );
}
