//! `--unet`, `--transformer`, `--vae`, `--text-encoder`, `--text-encoder-2`:
//! component files replacing one component of `--model` (as ComfyUI's
//! separate UNet / VAE / CLIP loaders), shared by `easel generate` and
//! `easel bench`.

use std::path::PathBuf;

use clap::Args;
use easel_diffusion::loader::ComponentFiles;

/// Component files: each a `.safetensors` file in the component's
/// diffusers layout or an original one (LDM VAE / UNet, FLUX.1 BFL
/// transformer, CLIP / OpenCLIP / T5 text encoder, optionally under a
/// single-file prefix), checked against the model's config before it loads.
#[derive(Args, Debug, Default, Clone)]
pub struct ComponentArgs {
    /// Read the model's UNet (SD 1.x / 2.x / XL) from this .safetensors file:
    /// diffusers or LDM layout (`input_blocks.*`, with or without
    /// `model.diffusion_model.`).
    #[arg(long, value_name = "FILE")]
    pub unet: Option<PathBuf>,
    /// Read the model's FLUX.1 transformer from this .safetensors file:
    /// diffusers or Black Forest Labs layout (`double_blocks.*`).
    #[arg(long, value_name = "FILE")]
    pub transformer: Option<PathBuf>,
    /// Read the model's VAE from this .safetensors file: diffusers or LDM
    /// layout (`encoder.down.*`, e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// Read the model's (first) CLIP text encoder from this .safetensors
    /// file: transformers layout (`text_model.*`), optionally under
    /// `cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`.
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// Read the model's second text encoder from this .safetensors file:
    /// SDXL's CLIP-G (transformers or OpenCLIP layout), FLUX's T5 encoder
    /// (transformers layout, `encoder.block.*`).
    #[arg(long, value_name = "FILE")]
    pub text_encoder_2: Option<PathBuf>,
}

impl ComponentArgs {
    /// The files given, by component name.
    pub fn files(&self) -> ComponentFiles {
        let mut files = ComponentFiles::new();
        for (component, file) in [
            ("unet", &self.unet),
            ("transformer", &self.transformer),
            ("vae", &self.vae),
            ("text_encoder", &self.text_encoder),
            ("text_encoder_2", &self.text_encoder_2),
        ] {
            if let Some(file) = file {
                // The names above are the allowed ones: this cannot fail.
                let _ = files.insert(component, file.clone());
            }
        }
        files
    }
}
