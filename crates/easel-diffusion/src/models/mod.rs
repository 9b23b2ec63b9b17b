//! The neural networks of the pipelines, each configured from its
//! component's `config.json` and loaded from safetensors with
//! checkpoint-mirroring key paths.

pub mod autoencoder_kl;
pub mod blocks;
pub mod clip_text;
pub mod embeddings;
pub mod flux_transformer;
pub mod kernels;
pub mod layers;
pub mod quantize;
pub mod stored;
pub mod t5;
mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae_tiling;
pub mod weights;

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Read and deserialize a JSON config file, with errors naming the file.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    serde_json::from_value(crate::json::parse_lenient(&text).map_err(json)?).map_err(json)
}
