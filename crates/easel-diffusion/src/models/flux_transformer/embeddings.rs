//! FLUX's embeddings, following diffusers' `embeddings.py`: the rotary
//! position embeddings (`FluxPosEmbed`, `apply_rotary_emb`) and the
//! conditioning vector of timestep, guidance and pooled text
//! (`CombinedTimestepGuidanceTextProjEmbeddings`).

use candle_core::{DType, Tensor};

use super::config::FluxTransformer2DConfig;
use crate::error::{Error, Result};
use crate::models::embeddings::timestep_embedding;
use crate::models::layers::Linear;
use crate::models::weights::Weights;

/// Width of the sinusoidal timestep / guidance projection (`Timesteps(256)`).
const TIME_PROJ_DIM: usize = 256;

/// `FluxPosEmbed`: rotary embeddings over several position axes. Each axis
/// `i` of a token's id gets `axes_dim[i]` dimensions of
/// `cos/sin(pos · θ^(−2j/axes_dim[i]))`, each frequency repeated twice
/// (interleaved pairs), computed in f64 and rounded to f32 as diffusers does.
#[derive(Debug, Clone)]
pub struct FluxPosEmbed {
    theta: f64,
    axes_dim: Vec<usize>,
}

impl FluxPosEmbed {
    /// Embeddings for `axes_dim` (one entry per axis, each even) with base `theta`.
    pub fn new(theta: f64, axes_dim: Vec<usize>) -> Self {
        Self { theta, axes_dim }
    }

    /// `ids`: `(tokens, axes)` positions → `(cos, sin)`, each
    /// `(tokens, sum(axes_dim))` f32.
    ///
    /// Errors: `ids` with a different number of axes than `axes_dim`.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, axes) = ids.dims2()?;
        if axes != self.axes_dim.len() {
            return Err(Error::invalid(
                "ids",
                format!(
                    "{axes} position axes given, the model has {}",
                    self.axes_dim.len()
                ),
            ));
        }
        let pos: Vec<Vec<f32>> = ids.to_dtype(DType::F32)?.to_vec2()?;
        let dim: usize = self.axes_dim.iter().sum();
        let mut cos = Vec::with_capacity(n * dim);
        let mut sin = Vec::with_capacity(n * dim);
        let freqs: Vec<Vec<f64>> = self
            .axes_dim
            .iter()
            .map(|&d| {
                (0..d)
                    .step_by(2)
                    .map(|j| 1.0 / self.theta.powf(j as f64 / d as f64))
                    .collect()
            })
            .collect();
        for row in &pos {
            for (axis, f) in freqs.iter().enumerate() {
                let p = row[axis] as f64;
                for &fj in f {
                    let a = p * fj;
                    let (s, c) = (a.sin() as f32, a.cos() as f32);
                    cos.extend([c, c]);
                    sin.extend([s, s]);
                }
            }
        }
        let device = ids.device();
        Ok((
            Tensor::from_vec(cos, (n, dim), device)?,
            Tensor::from_vec(sin, (n, dim), device)?,
        ))
    }
}

/// Rotate interleaved pairs of `x` `(batch, heads, tokens, head_dim)` by the
/// angles of `cos`/`sin` `(tokens, head_dim)`: `x·cos + rot(x)·sin` with
/// `rot(x)[2i] = −x[2i+1]`, `rot(x)[2i+1] = x[2i]` (diffusers'
/// `apply_rotary_emb` with `use_real_unbind_dim=-1`).
///
/// A half-precision `x` is rotated in f32 and cast back, as diffusers does
/// (`x.float() * cos + x_rotated.float() * sin`); `cos`/`sin` may be of any
/// float dtype.
pub fn apply_rotary_emb(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    let x32 = x.to_dtype(DType::F32)?;
    let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    let pairs = x32.reshape((b, h, n, d / 2, 2))?;
    let re = pairs.narrow(4, 0, 1)?;
    let im = pairs.narrow(4, 1, 1)?;
    let rotated = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, h, n, d))?;
    Ok((x32.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.to_dtype(x.dtype())?)
}

/// A two-layer MLP with SiLU (`TimestepEmbedding`, `PixArtAlphaTextProjection`
/// with `act_fn="silu"`): `linear_2(silu(linear_1(x)))`.
struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    fn load(w: &Weights, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&w.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&candle_nn::ops::silu(&self.linear_1.forward(x)?)?)
    }
}

/// `CombinedTimestep(Guidance)TextProjEmbeddings`: the conditioning vector
/// `timestep_embedder(proj(t)) [+ guidance_embedder(proj(g))] + text_embedder(pooled)`.
pub(super) struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    pub(super) fn load(w: &Weights, c: &FluxTransformer2DConfig) -> Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            timestep_embedder: MlpEmbedder::load(&w.pp("timestep_embedder"), TIME_PROJ_DIM, dim)?,
            guidance_embedder: if c.guidance_embeds {
                Some(MlpEmbedder::load(
                    &w.pp("guidance_embedder"),
                    TIME_PROJ_DIM,
                    dim,
                )?)
            } else {
                None
            },
            text_embedder: MlpEmbedder::load(&w.pp("text_embedder"), c.pooled_projection_dim, dim)?,
        })
    }

    /// `timestep` and `guidance` already multiplied by 1000.
    pub(super) fn forward(
        &self,
        timestep: &[f64],
        guidance: Option<&[f64]>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let device = pooled.device();
        let proj = |v: &[f64]| -> Result<Tensor> {
            timestep_embedding(v, TIME_PROJ_DIM, true, 0.0, device)?
                .to_dtype(pooled.dtype())
                .map_err(Error::from)
        };
        let mut emb = self.timestep_embedder.forward(&proj(timestep)?)?;
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            emb = (emb + embedder.forward(&proj(g)?)?)?;
        }
        Ok((emb + self.text_embedder.forward(pooled)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rope_rotates_interleaved_pairs() {
        let dev = Device::Cpu;
        // One token, one head, head_dim 4: pairs (1, 2) and (3, 4) rotated by 90°.
        let x = Tensor::new(&[1f32, 2., 3., 4.], &dev)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let cos = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
        let sin = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
        let y: Vec<f32> = apply_rotary_emb(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![-2., 1., -4., 3.]);
    }

    #[test]
    fn pos_embed_repeats_each_frequency_twice_per_axis() {
        let e = FluxPosEmbed::new(10000.0, vec![2, 4]);
        let ids = Tensor::new(&[[0f32, 3.]], &Device::Cpu).unwrap();
        let (cos, sin) = e.forward(&ids).unwrap();
        let cos: Vec<f32> = cos.flatten_all().unwrap().to_vec1().unwrap();
        let sin: Vec<f32> = sin.flatten_all().unwrap().to_vec1().unwrap();
        // Axis 0 at position 0; axis 1 at 3 with frequencies 1 and 1/100.
        let want_cos = [1., 1., 3f64.cos(), 3f64.cos(), 0.03f64.cos(), 0.03f64.cos()];
        let want_sin = [0., 0., 3f64.sin(), 3f64.sin(), 0.03f64.sin(), 0.03f64.sin()];
        for i in 0..6 {
            assert!((cos[i] as f64 - want_cos[i]).abs() < 1e-6, "cos {i}");
            assert!((sin[i] as f64 - want_sin[i]).abs() < 1e-6, "sin {i}");
        }
        assert!(e
            .forward(&Tensor::new(&[[0f32]], &Device::Cpu).unwrap())
            .is_err());
    }
}
