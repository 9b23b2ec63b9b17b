//! The reference cases of `tests/fixtures/<folder>/` (a JSON request and
//! diffusers' outputs with the noise it drew) as requests, and running
//! them on a pipeline with the recorded noise.

use easel_diffusion::lora::LoraSpec;
use easel_diffusion::noise::RecordedNoise;
use easel_diffusion::pipelines::{
    CancelToken, GenerationRequest, ImageInput, MaskInput, Pipeline, RunContext,
};
use serde_json::Value;

use super::{fixtures, load_refs};
use candle_core::Tensor;

pub fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => vec![],
    }
}

/// An RGB image file of the fixtures.
pub fn image_input(path: &std::path::Path) -> ImageInput {
    let img = easel_core::decode_image(&std::fs::read(path).unwrap()).unwrap();
    ImageInput {
        width: img.width as usize,
        height: img.height as usize,
        rgb: img.into_rgb8(),
    }
}

/// A mask file of the fixtures, as luma.
pub fn mask_input(path: &std::path::Path) -> MaskInput {
    let img = image_input(path);
    MaskInput {
        width: img.width,
        height: img.height,
        luma: easel_diffusion::image_processor::rgb_to_luma(&img.rgb),
    }
}

/// The request a case JSON describes (prompt, steps, guidance, size, init
/// image, mask, strength; the size defaults to the init image's, rounded
/// down to a multiple of 8, as diffusers' image processor does).
pub fn case_request(
    dir: &std::path::Path,
    case: &Value,
    scheduler: Option<&str>,
    default_strength: f64,
) -> GenerationRequest {
    let image = case["init_image"]
        .as_str()
        .map(|f| image_input(&dir.join(f)));
    let mask = case["mask_image"]
        .as_str()
        .map(|f| mask_input(&dir.join(f)));
    let size = |key: &str, from_image: Option<usize>| {
        case[key]
            .as_u64()
            .map(|v| v as usize)
            .or(from_image.map(|v| v / 8 * 8))
            .unwrap()
    };
    GenerationRequest {
        prompts: strings(&case["prompt"]),
        negative_prompts: strings(&case["negative_prompt"]),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        width: size("width", image.as_ref().map(|i| i.width)),
        height: size("height", image.as_ref().map(|i| i.height)),
        scheduler: scheduler
            .map(String::from)
            .or_else(|| case["scheduler"].as_str().map(String::from)),
        strength: case["strength"].as_f64().unwrap_or(default_strength),
        max_sequence_length: case["max_sequence_length"].as_u64().map(|v| v as usize),
        image,
        mask,
        ..Default::default()
    }
}

/// The LoRA a case names (`lora`, `lora_scale`), if any.
pub fn case_loras(case: &Value) -> Vec<LoraSpec> {
    case["lora"]
        .as_str()
        .map(|f| {
            LoraSpec::new(
                fixtures().join(f),
                case["lora_scale"].as_f64().unwrap_or(1.0),
            )
        })
        .into_iter()
        .collect()
}

/// Run case `name` of `tests/fixtures/<folder>/` on `pipeline` with its
/// recorded noise; returns `(latents_to_vae, image)` and the references.
pub fn run_case(
    pipeline: &Pipeline,
    folder: &str,
    name: &str,
    scheduler: Option<&str>,
) -> (Tensor, Tensor, std::collections::HashMap<String, Tensor>) {
    let dir = fixtures().join(folder);
    let case: Value = easel_diffusion::json::parse_lenient(
        &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors = load_refs(&format!("{folder}/{name}.safetensors"));
    let request = case_request(&dir, &case, scheduler, pipeline.family().default_strength());
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
    (out.latents_to_vae, out.images, tensors)
}
