//! Seamless tiling (`GenerationRequest::tiling`): circular padding in every
//! convolution of the UNet and the VAE, as A1111's `tiling` and
//! stable-diffusion.cpp's `--circular` do it.
//!
//! - The layer: a circularly padded [`Conv2d`] equals the zero-padded
//!   convolution of the input tiled 3×3, cropped to the middle tile, on
//!   every convolution path (direct 3×3, Winograd 3×3, stride-2 down-sampler).
//! - The pipelines: a tiled image's right edge continues into its left edge
//!   and its bottom into its top (and an untiled one's does not), and a
//!   tiled run is equivariant under circular shifts of its noise (the model
//!   sees a torus: shifting the noise by half the latent shifts the image by
//!   half, wrapping around, which no image with a seam can do).
//! - FLUX: only the VAE has convolutions; its decoder is circular and joins
//!   the edges, the transformer's latents are untouched.
//! - Against diffusers: tiled SD 1.5 (text-to-image and image-to-image),
//!   SDXL and FLUX runs match diffusers with every `nn.Conv2d` set to
//!   `padding_mode="circular"` (`tools/gen_tiling_refs.py`) within the
//!   parity tolerances.
//!
//! The fixture models have random weights, so their images are textures:
//! "continues" is measured as the correlation of the last line with the
//! first against that of neighbouring lines (mean differences do not
//! separate the cases: zero padding makes both edges flat and alike).

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use easel_diffusion::loader::ModelDir;
use easel_diffusion::models::kernels::{with_conv3x3_kernel, Conv3x3Kernel};
use easel_diffusion::models::layers::{
    circular_padding, circular_padding_active, pad_circular, Conv2d,
};
use easel_diffusion::models::weights::{RandomSource, Weights};
use easel_diffusion::noise::{NoiseSource, PerImageGenerators, RecordedNoise};
use easel_diffusion::pipelines::{
    load_pipeline, load_vae, CancelToken, GenerationOutput, GenerationRequest, ImageInput,
    Pipeline, RunContext,
};

/// `x` rolled by `k` along `dim` (torch.roll: element `i` moves to `i + k`).
fn roll(x: &Tensor, dim: usize, k: usize) -> Tensor {
    let n = x.dim(dim).unwrap();
    let k = k % n;
    if k == 0 {
        return x.clone();
    }
    Tensor::cat(
        &[
            &x.narrow(dim, n - k, k).unwrap(),
            &x.narrow(dim, 0, n - k).unwrap(),
        ],
        dim,
    )
    .unwrap()
}

/// `x`, `(b, c, h, w)`, repeated 3×3 times: `(b, c, 3h, 3w)`.
fn tile3x3(x: &Tensor) -> Tensor {
    let row = Tensor::cat(&[x, x, x], 3).unwrap();
    Tensor::cat(&[&row, &row, &row], 2).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    PerImageGenerators::new(&vec![seed; shape[0]])
        .randn(shape, &Device::Cpu)
        .unwrap()
}

fn conv(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize) -> Conv2d {
    let w = Weights::new(
        Arc::new(RandomSource::new(DType::F32)),
        "test",
        DType::F32,
        &Device::Cpu,
    );
    Conv2d::load(&w.pp("conv"), cin, cout, kernel, stride, padding).unwrap()
}

/// The circular convolution against the zero-padded one on the 3×3-tiled
/// input, cropped to the output of the middle tile; and, so the comparison
/// can fail, the zero-padded convolution of `x` itself must differ.
fn check_circular_conv(layer: &Conv2d, x: &Tensor, stride: usize) {
    let (_, _, h, w) = x.dims4().unwrap();
    let circular = {
        let _tiling = circular_padding(true);
        layer.forward(x).unwrap()
    };
    let zero = layer.forward(x).unwrap();
    let tiled = layer.forward(&tile3x3(x)).unwrap();
    let (oh, ow) = (h / stride, w / stride);
    let expected = tiled.narrow(2, oh, oh).unwrap().narrow(3, ow, ow).unwrap();
    assert_eq!(circular.dims(), zero.dims());
    let err = max_abs(&circular, &expected);
    assert!(
        err < 1e-4,
        "circular conv differs from the tiled conv by {err}"
    );
    let border = max_abs(&zero, &expected);
    assert!(
        border > 1e-2,
        "zero padding should differ at the borders, differs by {border}"
    );
}

#[test]
fn circular_conv_equals_the_conv_of_the_tiled_input_cropped() {
    // 3×3 "same" convolutions on both CPU kernels (direct and Winograd),
    // with sizes that are not multiples of the Winograd tile.
    for kernel in [Conv3x3Kernel::Direct, Conv3x3Kernel::Winograd] {
        with_conv3x3_kernel(kernel, || {
            let layer = conv(5, 7, 3, 1, 1);
            check_circular_conv(&layer, &randn(&[2, 5, 7, 9], 1), 1);
        });
    }
    // The stride-2 down-sampler (candle's convolution on the wrapped input).
    let layer = conv(4, 6, 3, 2, 1);
    check_circular_conv(&layer, &randn(&[1, 4, 8, 10], 2), 2);
    // A 1×1 convolution has no padding: circular mode changes nothing.
    let layer = conv(4, 3, 1, 1, 0);
    let x = randn(&[1, 4, 5, 6], 3);
    let circular = {
        let _tiling = circular_padding(true);
        layer.forward(&x).unwrap()
    };
    assert_eq!(max_abs(&circular, &layer.forward(&x).unwrap()), 0.0);
}

#[test]
fn pad_circular_wraps_like_torch_and_refuses_wrapping_twice() {
    // [[0, 1, 2], [3, 4, 5]] padded by 1: F.pad(x, (1, 1, 1, 1), mode="circular").
    let x = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 3))
        .unwrap();
    let p = pad_circular(&x, 1).unwrap();
    let got: Vec<Vec<f32>> = p.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let want = vec![
        vec![5., 3., 4., 5., 3.],
        vec![2., 0., 1., 2., 0.],
        vec![5., 3., 4., 5., 3.],
        vec![2., 0., 1., 2., 0.],
    ];
    assert_eq!(got, want);
    let e = pad_circular(&x, 3).unwrap_err().to_string();
    assert!(e.contains("tiling") && e.contains("2x3"), "{e}");
}

#[test]
fn circular_padding_is_scoped_to_the_guard_and_the_thread() {
    assert!(!circular_padding_active());
    {
        let _outer = circular_padding(true);
        assert!(circular_padding_active());
        // Another thread keeps zero padding.
        assert!(!std::thread::spawn(circular_padding_active).join().unwrap());
        {
            let _inner = circular_padding(false);
            assert!(!circular_padding_active());
        }
        assert!(circular_padding_active());
    }
    assert!(!circular_padding_active());
}

/// Noise from `seed`, with every 4-D draw (the initial latents) rolled by
/// `shift` latent pixels on both spatial axes.
struct RolledNoise {
    inner: PerImageGenerators,
    shift: usize,
}

impl NoiseSource for RolledNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> easel_diffusion::Result<Tensor> {
        let t = self.inner.randn(shape, device)?;
        Ok(if t.rank() == 4 {
            roll(&roll(&t, 2, self.shift), 3, self.shift)
        } else {
            t
        })
    }
}

fn load(name: &str) -> Pipeline {
    load_pipeline(&ModelDir::open(model(name)).unwrap(), &Device::Cpu).unwrap()
}

/// Run `pipeline` on a `size`² text-to-image request, noise from seed 42
/// rolled by `shift` latent pixels.
fn generate(
    pipeline: &Pipeline,
    size: usize,
    steps: usize,
    tiling: bool,
    shift: usize,
) -> GenerationOutput {
    let request = GenerationRequest {
        prompts: vec!["a tiled floor".into()],
        num_inference_steps: steps,
        guidance_scale: pipeline.default_guidance_scale(),
        width: size,
        height: size,
        tiling,
        ..Default::default()
    };
    let mut noise = RolledNoise {
        inner: PerImageGenerators::new(&[42]),
        shift,
    };
    let mut progress = |_| {};
    let mut ctx = RunContext {
        noise: &mut noise,
        progress: &mut progress,
        cancel: CancelToken::new(),
    };
    pipeline.run(&request, &mut ctx).unwrap()
}

/// Pearson correlation of lines `a` and `b` of an `(1, H, W, 3)` image
/// along `axis` (2: columns, 1: rows), each line's per-channel mean
/// removed: about 0.85 for neighbouring lines of the fixture models'
/// images, about 0 for lines far apart.
fn line_correlation(images: &Tensor, axis: usize, a: usize, b: usize) -> f64 {
    let line = |i: usize| {
        let l = images
            .to_dtype(DType::F64)
            .unwrap()
            .narrow(axis, i, 1)
            .unwrap();
        let along = if axis == 2 { 1 } else { 2 };
        l.broadcast_sub(&l.mean_keepdim(along).unwrap()).unwrap()
    };
    let (x, y) = (line(a), line(b));
    let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
    sum((&x * &y).unwrap()) / (sum(x.sqr().unwrap()) * sum(y.sqr().unwrap())).sqrt()
}

/// `(seam, neighbours)`: the correlation across the wrap-around seam (last
/// line against the first) and the mean correlation of neighbouring lines
/// inside the image. A seamless image's seam is just another neighbour pair.
fn seam_correlation(images: &Tensor, axis: usize) -> (f64, f64) {
    let n = images.dim(axis).unwrap();
    let seam = line_correlation(images, axis, n - 1, 0);
    let neighbours = (0..n - 1)
        .map(|i| line_correlation(images, axis, i, i + 1))
        .sum::<f64>()
        / (n - 1) as f64;
    (seam, neighbours)
}

/// The tiled image's seams (left/right, top/bottom) correlate at least
/// `share` as well as its neighbouring lines do; the untiled image's, of
/// the same seed, less than 0.4 times as well (so the check can fail).
fn check_seams(name: &str, tiled: &Tensor, untiled: &Tensor, share: f64) {
    for (axis, edges) in [(2, "left/right"), (1, "top/bottom")] {
        let (t, tn) = seam_correlation(tiled, axis);
        let (u, un) = seam_correlation(untiled, axis);
        eprintln!(
            "{name} {edges}: seam correlation tiled {t:.3} (neighbours {tn:.3}), \
             untiled {u:.3} (neighbours {un:.3})"
        );
        assert!(
            tn > 0.6 && t > share * tn,
            "{name}: tiled {edges} edges do not continue each other \
             (seam correlation {t:.3}, neighbours {tn:.3})"
        );
        assert!(
            un > 0.6 && u < 0.4 * un,
            "{name}: the untiled image should show a {edges} seam \
             (seam correlation {u:.3}, neighbours {un:.3})"
        );
    }
}

/// The tiled image's opposite edges continue each other; the untiled
/// image's do not; and the tiled run is equivariant under a circular shift
/// of its noise by half the latent (which shifts the image by half), while
/// the untiled run is not.
fn check_seamless(name: &str, size: usize, steps: usize) {
    let pipeline = load(name);
    let f = pipeline.vae_scale_factor();
    let tiled = generate(&pipeline, size, steps, true, 0);
    let untiled = generate(&pipeline, size, steps, false, 0);
    check_seams(name, &tiled.images, &untiled.images, 0.8);
    // Shift the noise by half the latent (a multiple of every down-sampling
    // factor): the tiled image must come out rolled by half the image.
    let half = size / f / 2;
    for (tiling, run) in [(true, &tiled), (false, &untiled)] {
        let shifted = generate(&pipeline, size, steps, tiling, half);
        let expected = roll(&roll(&run.images, 1, half * f), 2, half * f);
        let err = max_abs(&shifted.images, &expected);
        eprintln!("{name} tiling={tiling}: shifted noise vs rolled image, max |diff| {err:.2e}");
        if tiling {
            assert!(
                err < 1e-4,
                "{name}: tiled run is not shift-equivariant ({err})"
            );
        } else {
            assert!(err > 5e-2, "{name}: untiled run should not be ({err})");
        }
    }
}

#[test]
fn sd15_tiled_image_edges_continue_each_other() {
    check_seamless("tiny-sd15", 64, 4);
}

#[test]
fn sdxl_tiled_image_edges_continue_each_other() {
    check_seamless("tiny-sdxl", 64, 3);
}

/// FLUX: the transformer has no spatial convolutions (patches are linear
/// projections), so tiling leaves the denoised latents exactly as they
/// were and changes only the VAE decode; that alone joins the image's
/// edges, and the FLUX VAE decoder is circular: decoding latents rolled by
/// half gives the image rolled by half.
#[test]
fn flux_tiling_reaches_the_vae_only_and_its_decoder_is_circular() {
    let pipeline = load("tiny-flux-schnell");
    let tiled = generate(&pipeline, 64, 2, true, 0);
    let untiled = generate(&pipeline, 64, 2, false, 0);
    assert_eq!(
        max_abs(&tiled.latents_to_vae, &untiled.latents_to_vae),
        0.0,
        "the FLUX transformer has no convolutions to tile"
    );
    let changed = max_abs(&tiled.images, &untiled.images);
    assert!(changed > 1e-2, "tiling did not reach the VAE ({changed})");
    // The circular VAE alone joins the pixels across the edges (measured:
    // seam correlation 0.60 / 0.73 against 0.72 / 0.71 for neighbours).
    check_seams("tiny-flux-schnell", &tiled.images, &untiled.images, 0.7);

    let dir = ModelDir::open(model("tiny-flux-schnell")).unwrap();
    let vae = load_vae(&dir, &Device::Cpu, false, false).unwrap();
    let f = vae.config().vae_scale_factor();
    let z = randn(&[1, vae.config().latent_channels, 8, 8], 7);
    let rolled_z = roll(&roll(&z, 2, 4), 3, 4);
    for (circular, bound) in [(true, 1e-4), (false, f64::INFINITY)] {
        let _tiling = circular_padding(circular);
        let image = vae.decode(&z).unwrap();
        let expected = roll(&roll(&image, 2, 4 * f), 3, 4 * f);
        let err = max_abs(&vae.decode(&rolled_z).unwrap(), &expected);
        eprintln!("FLUX VAE circular={circular}: rolled latents vs rolled image {err:.2e}");
        if circular {
            assert!(
                err < bound,
                "the tiled FLUX VAE decoder is not circular ({err})"
            );
        } else {
            assert!(err > 5e-2, "the zero-padded decoder should not be ({err})");
        }
    }
}

/// Run the diffusers reference case `name` of `tests/fixtures/generated/`
/// (made by `tools/gen_tiling_refs.py`: every `nn.Conv2d` of the UNet /
/// transformer and the VAE set to `padding_mode="circular"`, as A1111's
/// `tiling`) with its recorded noise and `tiling: true`; compare with the
/// tolerances of the parity tests, and check that zero padding would not
/// have matched (so the comparison can fail).
fn check_tiling_reference(name: &str) {
    let dir = fixtures().join("generated");
    let case: serde_json::Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(case["tiling"], true);
    let tensors = load_refs(&format!("generated/{name}.safetensors"));
    let pipeline = load_pipeline(
        &ModelDir::open(fixtures().join(case["model"].as_str().unwrap())).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let run = |tiling: bool| {
        let request = GenerationRequest {
            prompts: vec![case["prompt"].as_str().unwrap().to_string()],
            negative_prompts: case["negative_prompt"]
                .as_str()
                .map(String::from)
                .into_iter()
                .collect(),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            scheduler: case["scheduler"].as_str().map(String::from),
            max_sequence_length: case["max_sequence_length"].as_u64().map(|v| v as usize),
            image: case["init_image"].as_str().map(|f| {
                let img = easel_core::decode_image(&std::fs::read(dir.join(f)).unwrap()).unwrap();
                ImageInput {
                    width: img.width as usize,
                    height: img.height as usize,
                    rgb: img.into_rgb8(),
                }
            }),
            strength: case["strength"].as_f64().unwrap_or(0.8),
            tiling,
            ..Default::default()
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
        assert_eq!(noise.remaining(), 0, "{name}: recorded draws left over");
        out
    };
    let tiled = run(true);
    let lat = rel_l2(&tiled.latents_to_vae, &tensors["latents_to_vae"]);
    let img = max_abs(&tiled.images, &tensors["image"]);
    eprintln!("{name}: latents_to_vae rel L2 {lat:.2e}, image max abs {img:.2e}");
    assert!(lat <= 1e-4, "{name}: latents_to_vae relative L2 {lat:.3e}");
    assert!(img <= 1e-3, "{name}: image max abs {img:.3e}");
    let zero = max_abs(&run(false).images, &tensors["image"]);
    assert!(zero > 1e-2, "{name}: zero padding matches too ({zero:.3e})");
}

#[test]
fn sd15_tiling_matches_diffusers_with_circular_convs() {
    check_tiling_reference("sd15_tiling_ddim");
}

#[test]
fn sd15_tiled_image_to_image_matches_diffusers_with_circular_convs() {
    check_tiling_reference("sd15_img2img_tiling_ddim");
}

#[test]
fn sdxl_tiling_matches_diffusers_with_circular_convs() {
    check_tiling_reference("sdxl_tiling_euler");
}

#[test]
fn flux_tiling_matches_diffusers_with_circular_convs() {
    check_tiling_reference("flux_schnell_tiling");
}
