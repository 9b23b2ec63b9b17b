//! The blocks of `UNet2DConditionModel`, following diffusers'
//! `unet_2d_blocks.py`: down blocks (`DownBlock2D`, `CrossAttnDownBlock2D`),
//! up blocks (`UpBlock2D`, `CrossAttnUpBlock2D`) and the mid block
//! (`UNetMidBlock2DCrossAttn`, `UNetMidBlock2D`). They are built by
//! [`UNet2DConditionModel::load`](super::unet_2d_condition::UNet2DConditionModel::load).

use candle_core::Tensor;

use super::blocks::{Downsample2D, ResnetBlock2D, Transformer2D, Upsample2D};
use crate::error::{Error, Result};

/// A down block: resnets (each optionally followed by a transformer) and an
/// optional down-sampler (`DownBlock2D` / `CrossAttnDownBlock2D`).
pub(super) struct DownBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2D>,
    pub(super) downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Returns the output and the skip connections it contributes.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// An up block: resnets over the concatenation with the skip connections
/// (each optionally followed by a transformer) and an optional up-sampler.
pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2D>,
    pub(super) upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::config("unet", "ran out of skip connections"))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}

/// The mid block (`UNetMidBlock2DCrossAttn`: resnet, then transformer +
/// resnet pairs; or `UNetMidBlock2D` without attention).
pub(super) struct MidBlock {
    pub(super) first: ResnetBlock2D,
    pub(super) rest: Vec<(Option<Transformer2D>, ResnetBlock2D)>,
}

impl MidBlock {
    pub(super) fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, Some(temb))?;
        for (attn, resnet) in &self.rest {
            if let Some(attn) = attn {
                h = attn.forward(&h, context)?;
            }
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}
