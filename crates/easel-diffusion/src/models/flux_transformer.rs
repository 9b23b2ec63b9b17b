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

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::embeddings::timestep_embedding;
use super::layers::{merge_heads, scaled_dot_product_attention, split_heads, Activation, Linear};
use super::weights::Weights;
use crate::error::{Error, Result};

const COMPONENT: &str = "transformer";
/// Width of the sinusoidal timestep / guidance projection (`Timesteps(256)`).
const TIME_PROJ_DIM: usize = 256;
/// RoPE base frequency (`FluxPosEmbed(theta=10000)`).
const ROPE_THETA: f64 = 10000.0;
/// Epsilon of the parameter-free layer norms and of the q/k RMS norms.
const NORM_EPS: f32 = 1e-6;

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

    fn check(&self) -> Result<()> {
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
pub fn apply_rotary_emb(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    let pairs = x.reshape((b, h, n, d / 2, 2))?;
    let re = pairs.narrow(4, 0, 1)?;
    let im = pairs.narrow(4, 1, 1)?;
    let rotated = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, h, n, d))?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// `torch.nn.RMSNorm` over the last dimension, with a weight.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            NORM_EPS,
        )?)
    }
}

/// `nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)`.
struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    fn new(dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.ones,
            &self.zeros,
            NORM_EPS,
        )?)
    }
}

/// `x · (1 + scale) + shift` with per-row `(batch, dim)` modulation.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)?)
}

/// `gate · x` with a per-row `(batch, dim)` gate.
fn gated(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&gate.unsqueeze(1)?)?)
}

/// The `chunks` equal parts of `linear(silu(temb))` along the feature axis
/// (`AdaLayerNormZero` and friends).
struct AdaModulation {
    linear: Linear,
    chunks: usize,
}

impl AdaModulation {
    fn load(w: &Weights, dim: usize, chunks: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::load(&w.pp("linear"), dim, chunks * dim, true)?,
            chunks,
        })
    }

    fn forward(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        let emb = self.linear.forward(&candle_nn::ops::silu(temb)?)?;
        Ok(emb.chunk(self.chunks, D::Minus1)?)
    }
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
struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    fn load(w: &Weights, c: &FluxTransformer2DConfig) -> Result<Self> {
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
    fn forward(
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

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::load(&w.pp("net.0.proj"), dim, 4 * dim, true)?,
            out: Linear::load(&w.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&Activation::GeluTanh.forward(&self.proj.forward(x)?)?)
    }
}

/// Query, key and value of one stream, split into heads and q/k-normalised.
struct QkvProjection {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl QkvProjection {
    fn load(w: &Weights, dim: usize, head_dim: usize, names: [&str; 5]) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(&w.pp(names[0]), dim, dim, true)?,
            to_k: Linear::load(&w.pp(names[1]), dim, dim, true)?,
            to_v: Linear::load(&w.pp(names[2]), dim, dim, true)?,
            norm_q: RmsNorm::load(&w.pp(names[3]), head_dim)?,
            norm_k: RmsNorm::load(&w.pp(names[4]), head_dim)?,
        })
    }

    /// `x`: `(batch, tokens, dim)` → three `(batch, heads, tokens, head_dim)`.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let q = self
            .norm_q
            .forward(&split_heads(&self.to_q.forward(x)?, heads)?)?;
        let k = self
            .norm_k
            .forward(&split_heads(&self.to_k.forward(x)?, heads)?)?;
        let v = split_heads(&self.to_v.forward(x)?, heads)?;
        Ok((q, k, v))
    }
}

/// Rotary embeddings for the joint (text, image) token sequence.
struct Rope<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
}

/// Attention over `(q, k, v)` `(batch, heads, tokens, head_dim)` with RoPE on
/// q and k → `(batch, tokens, heads · head_dim)`.
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope<'_>) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let q = apply_rotary_emb(q, rope.cos, rope.sin)?;
    let k = apply_rotary_emb(k, rope.cos, rope.sin)?;
    let a = scaled_dot_product_attention(&q, &k, v, None, 1.0 / (head_dim as f64).sqrt())?;
    merge_heads(&a)
}

/// `FluxTransformerBlock`: the double-stream (MMDiT) block.
struct FluxTransformerBlock {
    norm1: AdaModulation,
    norm1_context: AdaModulation,
    img_qkv: QkvProjection,
    txt_qkv: QkvProjection,
    to_out: Linear,
    to_add_out: Linear,
    norm: PlainLayerNorm,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl FluxTransformerBlock {
    fn load(w: &Weights, c: &FluxTransformer2DConfig, norm: PlainLayerNorm) -> Result<Self> {
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        let attn = w.pp("attn");
        Ok(Self {
            norm1: AdaModulation::load(&w.pp("norm1"), dim, 6)?,
            norm1_context: AdaModulation::load(&w.pp("norm1_context"), dim, 6)?,
            img_qkv: QkvProjection::load(
                &attn,
                dim,
                hd,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            )?,
            txt_qkv: QkvProjection::load(
                &attn,
                dim,
                hd,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
            )?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, true)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, true)?,
            norm,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
            ff_context: FeedForward::load(&w.pp("ff_context"), dim)?,
            heads: c.num_attention_heads,
        })
    }

    /// `img`: `(batch, n_img, dim)`, `txt`: `(batch, n_txt, dim)` → both updated.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(temb)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let c = self.norm1_context.forward(temb)?;
        let (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) =
            (&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]);
        let norm_img = modulate(&self.norm.forward(img)?, shift_msa, scale_msa)?;
        let norm_txt = modulate(&self.norm.forward(txt)?, c_shift_msa, c_scale_msa)?;

        // Joint attention over [text, image] tokens.
        let (iq, ik, iv) = self.img_qkv.forward(&norm_img, self.heads)?;
        let (tq, tk, tv) = self.txt_qkv.forward(&norm_txt, self.heads)?;
        let q = Tensor::cat(&[&tq, &iq], 2)?;
        let k = Tensor::cat(&[&tk, &ik], 2)?;
        let v = Tensor::cat(&[&tv, &iv], 2)?;
        let a = rope_attention(&q, &k, &v, rope)?;
        let n_txt = txt.dim(1)?;
        let n_img = img.dim(1)?;
        let txt_attn = self.to_add_out.forward(&a.narrow(1, 0, n_txt)?)?;
        let img_attn = self.to_out.forward(&a.narrow(1, n_txt, n_img)?)?;

        let img = (img + gated(gate_msa, &img_attn)?)?;
        let h = modulate(&self.norm.forward(&img)?, shift_mlp, scale_mlp)?;
        let img = (&img + gated(gate_mlp, &self.ff.forward(&h)?)?)?;

        let txt = (txt + gated(c_gate_msa, &txt_attn)?)?;
        let h = modulate(&self.norm.forward(&txt)?, c_shift_mlp, c_scale_mlp)?;
        let txt = (&txt + gated(c_gate_mlp, &self.ff_context.forward(&h)?)?)?;
        Ok((img, txt))
    }
}

/// `FluxSingleTransformerBlock`: attention and MLP in parallel on the joint sequence.
struct FluxSingleTransformerBlock {
    norm: AdaModulation,
    qkv: QkvProjection,
    proj_mlp: Linear,
    proj_out: Linear,
    layer_norm: PlainLayerNorm,
    heads: usize,
}

impl FluxSingleTransformerBlock {
    fn load(w: &Weights, c: &FluxTransformer2DConfig, layer_norm: PlainLayerNorm) -> Result<Self> {
        let dim = c.inner_dim();
        let mlp = 4 * dim;
        Ok(Self {
            norm: AdaModulation::load(&w.pp("norm"), dim, 3)?,
            qkv: QkvProjection::load(
                &w.pp("attn"),
                dim,
                c.attention_head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            )?,
            proj_mlp: Linear::load(&w.pp("proj_mlp"), dim, mlp, true)?,
            proj_out: Linear::load(&w.pp("proj_out"), dim + mlp, dim, true)?,
            layer_norm,
            heads: c.num_attention_heads,
        })
    }

    /// `x`: the joint `(batch, n_txt + n_img, dim)` sequence.
    fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope<'_>) -> Result<Tensor> {
        let m = self.norm.forward(temb)?;
        let h = modulate(&self.layer_norm.forward(x)?, &m[0], &m[1])?;
        let mlp = Activation::GeluTanh.forward(&self.proj_mlp.forward(&h)?)?;
        let (q, k, v) = self.qkv.forward(&h, self.heads)?;
        let a = rope_attention(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&a, &mlp], 2)?)?;
        Ok((x + gated(&m[2], &out)?)?)
    }
}

/// The denoiser's inputs for one call.
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
        })
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
    pub fn forward(&self, input: &FluxTransformerInput<'_>) -> Result<Tensor> {
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
        let ids = Tensor::cat(&[input.txt_ids, input.img_ids], 0)?;
        let (cos, sin) = self.pos_embed.forward(&ids)?;
        let (cos, sin) = (cos.to_dtype(img.dtype())?, sin.to_dtype(img.dtype())?);
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

#[cfg(test)]
mod tests {
    use super::*;

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
