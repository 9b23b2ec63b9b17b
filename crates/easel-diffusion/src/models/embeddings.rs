//! Timestep embeddings shared by the denoisers, following diffusers'
//! `embeddings.py`: the sinusoidal projection (`get_timestep_embedding`),
//! used by the UNet and FLUX, and the UNet's `TimestepEmbedding` MLP.

use candle_core::{Device, Tensor};

use super::layers::{Activation, Linear};
use super::weights::Weights;
use crate::error::Result;

/// Sinusoidal timestep embedding (`get_timestep_embedding` in diffusers,
/// after "Attention Is All You Need"), computed in f32 as PyTorch does so
/// the phases of large timesteps round the same way.
///
/// `timesteps`: one value per batch row → `(batch, dim)`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln_max = -(10000f64.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((ln_max * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                args.iter().map(|a| a.cos()).collect(),
                args.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                args.iter().map(|a| a.sin()).collect(),
                args.iter().map(|a| a.cos()).collect(),
            )
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// `TimestepEmbedding`: `linear_2(act(linear_1(x)))`.
pub(super) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub(super) fn load(
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&w.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), out_dim, out_dim, true)?,
            act,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}
