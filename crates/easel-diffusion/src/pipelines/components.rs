//! Opening a model's components: their weights (memory-mapped safetensors,
//! or synthesised ones for random-weight models), the LoRA-targetable
//! weights of a family, and the VAE.

use std::sync::Arc;

use candle_core::{DType, Device};

use super::offload::{Held, Offload};
use crate::error::Result;
use crate::loader::{ModelDir, ModelFamily};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::quantize::QuantizingSource;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::{
    CachedSource, RandomSource, SafetensorsSource, TensorSource, Weights,
};

/// Open a component's weights in their stored dtype: its safetensors files
/// (memory-mapped), or synthesised f16 weights for a
/// [`ModelDir::with_random_weights`] model.
///
/// A component replaced by a component file (`--vae FILE`, ...) is read
/// from that file ([`crate::loader::ComponentFile::source`]); for a model
/// opened from a single-file checkpoint, the components the file holds are
/// read from it ([`crate::loader::SingleFile::source`]).
///
/// With [`ModelDir::with_quantization`], the family's large components
/// ([`ModelFamily::quantized_components`]) hand out their linear weights
/// quantized ([`QuantizingSource`]).
pub fn component_source(model: &ModelDir, component: &str) -> Result<Arc<dyn TensorSource>> {
    let source: Arc<dyn TensorSource> = if let Some(file) = model
        .component_file(component)
        .filter(|_| !model.random_weights())
    {
        file.source()
    } else if let Some(source) = model
        .single_file()
        .filter(|_| !model.random_weights())
        .and_then(|f| f.source(component))
    {
        source
    } else if model.random_weights() {
        Arc::new(RandomSource::new(DType::F16))
    } else {
        Arc::new(SafetensorsSource::open(&model.weight_files(component)?)?)
    };
    Ok(match (model.quantization(), model.family()) {
        (Some(q), Some(family)) if family.quantized_components().contains(&component) => {
            Arc::new(QuantizingSource::new(source, q))
        }
        _ => source,
    })
}

/// The weights of the components LoRA adapters can target in a model of
/// `family` ([`ModelFamily::lora_components`]), by name, for `LoraState`.
pub(crate) fn lora_sources(
    model: &ModelDir,
    family: ModelFamily,
) -> Result<Vec<(String, Arc<dyn TensorSource>)>> {
    family
        .lora_components()
        .iter()
        .map(|c| Ok((c.to_string(), component_source(model, c)?)))
        .collect()
}

/// Open a component's weights (see [`component_source`]) on `device`, in
/// the model's compute dtype ([`ModelDir::compute_dtype`]).
pub fn component_weights(model: &ModelDir, component: &str, device: &Device) -> Result<Weights> {
    component_weights_in(model, component, device, model.compute_dtype())
}

/// [`component_weights`] in `dtype`, placed as the model's
/// [`ModelDir::offload`] says: on `device` (`none`); kept in host memory
/// and moved to `device` as a model is built (`model`: the component is
/// built for each use, see [`Held`]); on the CPU, each layer moving its
/// weights to the device as it runs (`sequential`).
pub fn component_weights_in(
    model: &ModelDir,
    component: &str,
    device: &Device,
    dtype: DType,
) -> Result<Weights> {
    let source = component_source(model, component)?;
    let offload = model.offload();
    let source: Arc<dyn TensorSource> = match offload {
        Offload::Model => {
            Arc::new(CachedSource::new(source, dtype).on_host(offload.host_device(device)))
        }
        Offload::None | Offload::Sequential => source,
    };
    Ok(Weights::new(
        source,
        component,
        dtype,
        &offload.weights_device(device),
    ))
}

/// The VAE's weights and config, in the model's compute dtype, or in f32
/// where diffusers' pipeline upcasts it: `upcast_f16` (the SDXL pipelines)
/// with an f16 compute dtype and the VAE config's `force_upcast` (default
/// true) set, as `StableDiffusionXLPipeline` runs the VAE in f32 because
/// the SDXL VAE overflows in f16.
fn vae_weights(
    model: &ModelDir,
    device: &Device,
    upcast_f16: bool,
) -> Result<(Weights, AutoencoderKLConfig)> {
    let config: AutoencoderKLConfig =
        crate::models::read_config(&model.component_dir("vae")?.join("config.json"))?;
    let dtype = match model.compute_dtype() {
        DType::F16 if upcast_f16 && config.force_upcast => DType::F32,
        d => d,
    };
    Ok((component_weights_in(model, "vae", device, dtype)?, config))
}

/// Load the VAE (`with_encoder` for image-to-image) and its config, in the
/// model's compute dtype or upcast to f32 (`upcast_f16`, see
/// [`vae_weights`]).
pub fn load_vae(
    model: &ModelDir,
    device: &Device,
    with_encoder: bool,
    upcast_f16: bool,
) -> Result<AutoencoderKL> {
    let (weights, config) = vae_weights(model, device, upcast_f16)?;
    AutoencoderKL::load(&weights, &config, with_encoder)
}

/// [`load_vae`] as a pipeline holds it: resident, or built for each use
/// under `model` offload.
pub(crate) fn held_vae(
    model: &ModelDir,
    device: &Device,
    with_encoder: bool,
    upcast_f16: bool,
) -> Result<Held<AutoencoderKL>> {
    let (weights, config) = vae_weights(model, device, upcast_f16)?;
    Held::load(model.offload() == Offload::Model, move || {
        AutoencoderKL::load(&weights, &config, with_encoder)
    })
}

/// A UNet model's native `(width, height)` in pixels: its config's
/// `sample_size` (latent pixels; the family's default where the config has
/// none) times the VAE scale factor, as diffusers' Stable Diffusion
/// pipelines default `height` / `width`.
pub(super) fn unet_native_size(
    unet: &UNet2DConditionConfig,
    vae_scale_factor: usize,
    family: ModelFamily,
) -> (usize, usize) {
    let fallback = family.default_sample_size();
    let (h, w) = unet.sample_size().unwrap_or((fallback, fallback));
    (w * vae_scale_factor, h * vae_scale_factor)
}

/// A CLIP text encoder held by a pipeline (built from `weights` for each
/// use when `offloaded`).
pub(crate) fn held_text_encoder(
    offloaded: bool,
    weights: Weights,
    config: ClipTextConfig,
) -> Result<Held<ClipTextModel>> {
    Held::load(offloaded, move || ClipTextModel::load(&weights, &config))
}

/// A UNet held by a pipeline (built from `weights` for each use when
/// `offloaded`).
pub(crate) fn held_unet(
    offloaded: bool,
    weights: Weights,
    config: UNet2DConditionConfig,
) -> Result<Held<UNet2DConditionModel>> {
    Held::load(offloaded, move || {
        UNet2DConditionModel::load(&weights, &config)
    })
}
