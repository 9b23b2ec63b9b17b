//! `FluxTransformer2DModel`, the denoiser of FLUX.1 (Black Forest Labs
//! 2024), following diffusers' `transformer_flux.py`.
//!
//! A rectified-flow transformer over packed latent tokens: the image tokens
//! (`x_embedder`) and the T5 text tokens (`context_embedder`) go through
//! `num_layers` double-stream blocks (separate weights per stream, one joint
//! attention) and then, concatenated, through `num_single_layers`
//! single-stream blocks (attention and MLP in parallel). Every block is
//! modulated (adaLN-Zero) by `time_text_embed`: the sinusoidal timestep
//! embedding, for guidance-distilled models (FLUX.1 dev, Fill) plus the
//! guidance embedding, plus the projected CLIP pooled output. Positions enter
//! through 3-axis rotary embeddings (RoPE, Su et al. 2021, arXiv:2104.09864)
//! on queries and keys. FLUX.1 Fill is the same model with more input
//! channels (the packed masked-image latents and mask are concatenated to the
//! latents).
//!
//! Keys mirror the diffusers checkpoint (`transformer_blocks.0.attn.to_q.weight`,
//! `single_transformer_blocks.0.proj_mlp.weight`, ...).
//!
//! Layout: `config` holds [`FluxTransformer2DConfig`], `embeddings` the
//! rotary position embeddings and the time / guidance / text conditioning,
//! `blocks` the double- and single-stream blocks and their parts; this file
//! the model, which ties them together.

mod blocks;
mod config;
mod embeddings;

use candle_core::{DType, Tensor};

use self::blocks::{
    modulate, AdaModulation, FluxSingleTransformerBlock, FluxTransformerBlock, PlainLayerNorm, Rope,
};
pub use self::config::FluxTransformer2DConfig;
use self::embeddings::TimeTextEmbed;
pub use self::embeddings::{apply_rotary_emb, FluxPosEmbed};
use super::layers::Linear;
use super::weights::Weights;
use crate::error::{Error, Result};

/// RoPE base frequency (`FluxPosEmbed(theta=10000)`).
const ROPE_THETA: f64 = 10000.0;

/// The denoiser's inputs for one call.
#[derive(Clone, Copy)]
pub struct FluxTransformerInput<'a> {
    /// Packed latent tokens `(batch, n_img, in_channels)`.
    pub hidden_states: &'a Tensor,
    /// T5 token embeddings `(batch, n_txt, joint_attention_dim)`.
    pub encoder_hidden_states: &'a Tensor,
    /// CLIP pooled output `(batch, pooled_projection_dim)`.
    pub pooled_projections: &'a Tensor,
    /// One timestep per batch row, as the pipeline passes it: the scheduler's
    /// `t / 1000` (σ in [0, 1]); the model multiplies by 1000 in f32.
    pub timestep: &'a [f32],
    /// Image token positions `(n_img, 3)`: `(0, row, column)` of each 2x2 patch.
    pub img_ids: &'a Tensor,
    /// Text token positions `(n_txt, 3)` (zeros).
    pub txt_ids: &'a Tensor,
    /// The guidance scale per batch row, for `guidance_embeds` models
    /// (ignored by the others).
    pub guidance: Option<&'a [f32]>,
}

/// A loaded `FluxTransformer2DModel`.
pub struct FluxTransformer2DModel {
    config: FluxTransformer2DConfig,
    pos_embed: FluxPosEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    x_embedder: Linear,
    transformer_blocks: Vec<FluxTransformerBlock>,
    single_transformer_blocks: Vec<FluxSingleTransformerBlock>,
    norm_out: AdaModulation,
    norm: PlainLayerNorm,
    proj_out: Linear,
    /// The dtype the transformer computes in (its weights' [`Weights::dtype`]).
    dtype: DType,
}

impl FluxTransformer2DModel {
    /// Build from `config` and the `transformer` weights.
    ///
    /// Errors: an unsupported config ([`Error::Config`]: `patch_size` other
    /// than 1, `axes_dims_rope` not summing to `attention_head_dim`), or
    /// missing / misshapen weights.
    pub fn load(w: &Weights, config: &FluxTransformer2DConfig) -> Result<Self> {
        config.check()?;
        let dim = config.inner_dim();
        let norm = || PlainLayerNorm::new(dim, w.dtype(), w.device());
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                FluxTransformerBlock::load(
                    &w.pp(format!("transformer_blocks.{i}")),
                    config,
                    norm()?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let single_transformer_blocks = (0..config.num_single_layers)
            .map(|i| {
                FluxSingleTransformerBlock::load(
                    &w.pp(format!("single_transformer_blocks.{i}")),
                    config,
                    norm()?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let p = config.patch_size;
        Ok(Self {
            config: config.clone(),
            pos_embed: FluxPosEmbed::new(ROPE_THETA, config.axes_dims_rope.clone()),
            time_text_embed: TimeTextEmbed::load(&w.pp("time_text_embed"), config)?,
            context_embedder: Linear::load(
                &w.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                true,
            )?,
            x_embedder: Linear::load(&w.pp("x_embedder"), config.in_channels, dim, true)?,
            transformer_blocks,
            single_transformer_blocks,
            norm_out: AdaModulation::load(&w.pp("norm_out"), dim, 2)?,
            norm: norm()?,
            proj_out: Linear::load(&w.pp("proj_out"), dim, p * p * config.out_channels(), true)?,
            dtype: w.dtype(),
        })
    }

    /// The dtype the transformer computes in (f32, or bf16 / f16 for a
    /// model loaded in half precision).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The config the model was built from.
    pub fn config(&self) -> &FluxTransformer2DConfig {
        &self.config
    }

    /// Predict the flow velocity for each image token:
    /// `(batch, n_img, patch_size² · out_channels)`.
    ///
    /// Errors: inputs whose shapes disagree with each other or with the
    /// config, or a guidance-embedding model called without `guidance`
    /// ([`Error::InvalidArgument`]).
    ///
    /// The tensors may be of any float dtype: they are cast to
    /// [`Self::dtype`], in which the transformer computes, and the result is
    /// cast back to `hidden_states`' dtype.
    pub fn forward(&self, input: &FluxTransformerInput<'_>) -> Result<Tensor> {
        let dt = self.dtype;
        let hidden_states = input.hidden_states.to_dtype(dt)?;
        let encoder_hidden_states = input.encoder_hidden_states.to_dtype(dt)?;
        let pooled_projections = input.pooled_projections.to_dtype(dt)?;
        let out = self.forward_in_dtype(&FluxTransformerInput {
            hidden_states: &hidden_states,
            encoder_hidden_states: &encoder_hidden_states,
            pooled_projections: &pooled_projections,
            ..*input
        })?;
        Ok(out.to_dtype(input.hidden_states.dtype())?)
    }

    /// [`Self::forward`] with the tensors already in [`Self::dtype`].
    fn forward_in_dtype(&self, input: &FluxTransformerInput<'_>) -> Result<Tensor> {
        let c = &self.config;
        let (b, n_img, ch) = input.hidden_states.dims3()?;
        let (tb, n_txt, tch) = input.encoder_hidden_states.dims3()?;
        let (pb, pch) = input.pooled_projections.dims2()?;
        let bad = |field: &str, m: String| Err(Error::invalid(field, m));
        if ch != c.in_channels {
            return bad(
                "hidden_states",
                format!("{ch} channels per token, the model takes {}", c.in_channels),
            );
        }
        if tch != c.joint_attention_dim || tb != b {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape ({tb}, {n_txt}, {tch}); expected ({b}, _, {})",
                    c.joint_attention_dim
                ),
            );
        }
        if pch != c.pooled_projection_dim || pb != b {
            return bad(
                "pooled_projections",
                format!(
                    "shape ({pb}, {pch}); expected ({b}, {})",
                    c.pooled_projection_dim
                ),
            );
        }
        if input.timestep.len() != b {
            return bad(
                "timestep",
                format!("{} values for a batch of {b}", input.timestep.len()),
            );
        }
        if input.img_ids.dim(0)? != n_img || input.txt_ids.dim(0)? != n_txt {
            return bad(
                "img_ids",
                format!(
                    "{} image and {} text positions for {n_img} image and {n_txt} text tokens",
                    input.img_ids.dim(0)?,
                    input.txt_ids.dim(0)?
                ),
            );
        }
        // `timestep.to(dtype) * 1000` and `guidance * 1000`, in f32.
        let timestep: Vec<f64> = input
            .timestep
            .iter()
            .map(|&t| (t * 1000f32) as f64)
            .collect();
        let guidance: Option<Vec<f64>> = match (c.guidance_embeds, input.guidance) {
            (false, _) => None,
            (true, Some(g)) if g.len() == b => {
                Some(g.iter().map(|&g| (g * 1000f32) as f64).collect())
            }
            (true, Some(g)) => {
                return bad("guidance", format!("{} values for a batch of {b}", g.len()))
            }
            (true, None) => {
                return bad(
                    "guidance",
                    "this model embeds the guidance scale (guidance_embeds); give one".into(),
                )
            }
        };

        let mut img = self.x_embedder.forward(input.hidden_states)?;
        let temb = self.time_text_embed.forward(
            &timestep,
            guidance.as_deref(),
            input.pooled_projections,
        )?;
        let mut txt = self.context_embedder.forward(input.encoder_hidden_states)?;
        // Positions in f32 whatever dtype the pipeline made them in.
        let ids = Tensor::cat(
            &[
                &input.txt_ids.to_dtype(DType::F32)?,
                &input.img_ids.to_dtype(DType::F32)?,
            ],
            0,
        )?;
        // The rotary angles stay f32: the rotation runs in f32
        // (`apply_rotary_emb`), as diffusers'.
        let (cos, sin) = self.pos_embed.forward(&ids)?;
        let rope = Rope {
            cos: &cos,
            sin: &sin,
        };

        for block in &self.transformer_blocks {
            (img, txt) = block.forward(&img, &txt, &temb, &rope)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_transformer_blocks {
            x = block.forward(&x, &temb, &rope)?;
        }
        let img = x.narrow(1, n_txt, n_img)?;
        // AdaLayerNormContinuous: (scale, shift), in that order.
        let m = self.norm_out.forward(&temb)?;
        let img = modulate(&self.norm.forward(&img)?, &m[1], &m[0])?;
        self.proj_out.forward(&img)
    }
}
