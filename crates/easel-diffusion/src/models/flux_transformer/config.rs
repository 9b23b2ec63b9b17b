//! The `FluxTransformer2DModel` config (`transformer/config.json`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

const COMPONENT: &str = "transformer";

/// The fields of a diffusers `FluxTransformer2DModel` config, with its defaults
/// (those of FLUX.1 dev / schnell).
#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformer2DConfig {
    /// Patch size of the packed tokens (1 for every FLUX.1 checkpoint; the
    /// pipeline packs 2x2 latent patches itself).
    #[serde(default = "d_one")]
    pub patch_size: usize,
    /// Channels of each input token: 64 (16 latent channels × 2 × 2), 384 for Fill.
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels of each output token (default `in_channels`; 64 for Fill).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks (19).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Single-stream blocks (38).
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    /// Width of each attention head (128).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads (24); the model width is `heads × head_dim`.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the text tokens (T5 `d_model`, 4096).
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding (CLIP, 768).
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    /// Whether the model embeds the guidance scale (guidance-distilled: dev, Fill).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE dimensions per position axis (`[16, 56, 56]`); they sum to the head width.
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn d_one() -> usize {
    1
}
fn d_in() -> usize {
    64
}
fn d_layers() -> usize {
    19
}
fn d_single() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint() -> usize {
    4096
}
fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxTransformer2DConfig {
    /// Read a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }

    /// The model width, `num_attention_heads × attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of each output token (`out_channels`, else `in_channels`).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub(super) fn check(&self) -> Result<()> {
        let err = |m: String| Err(Error::config(COMPONENT, m));
        if self.patch_size != 1 {
            return err(format!(
                "patch_size {} is not supported (FLUX.1 checkpoints use 1)",
                self.patch_size
            ));
        }
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ] {
            if v == 0 {
                return err(format!("{name} is 0"));
            }
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.is_empty()
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
            || sum != self.attention_head_dim
        {
            return err(format!(
                "axes_dims_rope {:?} must be even numbers summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_mismatched_rope_axes_and_patches() {
        let mut c: FluxTransformer2DConfig = serde_json::from_value(serde_json::json!({
            "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6]
        }))
        .unwrap();
        assert!(c.check().is_ok());
        c.axes_dims_rope = vec![4, 6, 8];
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("axes_dims_rope"));
        c.axes_dims_rope = vec![4, 6, 6];
        c.patch_size = 2;
        assert!(c.check().unwrap_err().to_string().contains("patch_size"));
    }
}
