//! `UNet2DConditionModel`, the denoiser of Stable Diffusion 1.x / 2.x / XL,
//! following diffusers' `unet_2d_condition.py` and `unet_2d_blocks.py`
//! (Rombach et al. 2022, arXiv:2112.10752; SDXL's micro-conditioning,
//! Podell et al. 2023, arXiv:2307.01952).
//!
//! Every shape comes from the component's `config.json`: block types and
//! widths, per-block head counts, transformer depths, cross-attention width,
//! linear or convolutional projections and the SDXL `text_time` additional
//! embedding. Latent sizes that are not multiples of the UNet's overall
//! down-sampling factor are handled as diffusers does: each up-sampler
//! resizes to the size of the matching skip connection.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::blocks::{
    Downsample2D, ResnetBlock2D, ResnetConfig, Transformer2D, Transformer2DConfig, Upsample2D,
};
pub use super::embeddings::timestep_embedding;
use super::embeddings::TimestepEmbedding;
use super::layers::{Activation, Conv2d, ConvPrologue, GroupNorm};
use super::unet_2d_blocks::{DownBlock, MidBlock, UpBlock};
use super::weights::Weights;
use crate::error::{Error, Result};

/// A config value that is either one value for every block or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                "unet",
                format!("`{field}` has {} entries for {n} blocks", v.len()),
            )),
        }
    }
}

/// The fields of a diffusers `UNet2DConditionModel` config the engine uses.
/// Unsupported options that would change the result are rejected at load.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: Option<PerBlock<usize>>,
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_pb")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one_f")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_one_pb")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

fn d_sample_size() -> Option<PerBlock<usize>> {
    None
}
fn d_four() -> usize {
    4
}
fn d_three() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_false_pb() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one_f() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_one_pb() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

impl UNet2DConditionConfig {
    /// Read a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }

    /// The latent `sample_size` (height, width), the model's native size
    /// divided by the VAE scale factor.
    pub fn sample_size(&self) -> Option<(usize, usize)> {
        match &self.sample_size {
            Some(PerBlock::One(s)) => Some((*s, *s)),
            Some(PerBlock::Each(v)) if v.len() == 2 => Some((v[0], v[1])),
            _ => None,
        }
    }

    /// Whether the model takes SDXL's `text_time` conditioning (pooled text
    /// embeddings + six size/crop ids).
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    fn check_supported(&self) -> Result<()> {
        let reject = |field: &str, value: String, allowed: &str| {
            Err(Error::config(
                "unet",
                format!("`{field}` = {value} is not supported (supported: {allowed})"),
            ))
        };
        if let Some(t) = &self.class_embed_type {
            return reject("class_embed_type", t.clone(), "null");
        }
        if self.num_class_embeds.is_some() {
            return reject("num_class_embeds", "set".into(), "null");
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(t) => return reject("addition_embed_type", t.into(), "null, text_time"),
        }
        if self.encoder_hid_dim.is_some() {
            return reject("encoder_hid_dim", "set".into(), "null");
        }
        if self.resnet_time_scale_shift != "default" {
            return reject(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
                "default",
            );
        }
        if self.time_embedding_type != "positional" {
            return reject(
                "time_embedding_type",
                self.time_embedding_type.clone(),
                "positional",
            );
        }
        if self.attention_type != "default" {
            return reject("attention_type", self.attention_type.clone(), "default");
        }
        if self.dual_cross_attention {
            return reject("dual_cross_attention", "true".into(), "false");
        }
        if self.class_embeddings_concat {
            return reject("class_embeddings_concat", "true".into(), "false");
        }
        if self.time_cond_proj_dim.is_some() {
            return reject("time_cond_proj_dim", "set".into(), "null");
        }
        if self.time_embedding_act_fn.is_some() {
            return reject("time_embedding_act_fn", "set".into(), "null");
        }
        if self.timestep_post_act.is_some() {
            return reject("timestep_post_act", "set".into(), "null");
        }
        if self.resnet_skip_time_act {
            return reject("resnet_skip_time_act", "true".into(), "false");
        }
        if self.cross_attention_norm.is_some() {
            return reject("cross_attention_norm", "set".into(), "null");
        }
        if self.center_input_sample {
            return reject("center_input_sample", "true".into(), "false");
        }
        if self.down_block_types.len() != self.up_block_types.len()
            || self.down_block_types.len() != self.block_out_channels.len()
        {
            return Err(Error::config(
                "unet",
                "down_block_types, up_block_types and block_out_channels must have the same length",
            ));
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return Err(Error::config(
                "unet",
                "conv_in_kernel and conv_out_kernel must be odd",
            ));
        }
        Ok(())
    }
}

/// SDXL's extra conditioning (`added_cond_kwargs`).
#[derive(Clone, Copy)]
pub struct TextTimeConditioning<'a> {
    /// `(batch, pooled_dim)`: pooled, projected text embeddings of the second encoder.
    pub text_embeds: &'a Tensor,
    /// `(batch, 6)`: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: &'a [[f64; 6]],
}

/// A loaded `UNet2DConditionModel`.
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: Option<GroupNorm>,
    conv_out: Conv2d,
    act: Activation,
    num_upsamplers: usize,
    /// The dtype the UNet computes in (its weights' [`Weights::dtype`]).
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Build from `config` and the `unet` component's weights.
    ///
    /// Errors: [`Error::Config`] for unsupported options or inconsistent
    /// lists, [`Error::MissingTensor`] / [`Error::ShapeMismatch`] when the
    /// weights don't fit the config.
    pub fn load(w: &Weights, config: &UNet2DConditionConfig) -> Result<Self> {
        config.check_supported()?;
        let c = config;
        let n = c.block_out_channels.len();
        let act = Activation::from_name("unet", &c.act_fn)?;
        let groups = c.norm_num_groups.unwrap_or(32);
        let eps = c.norm_eps;
        let time_embed_dim = c.time_embedding_dim.unwrap_or(c.block_out_channels[0] * 4);

        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        // (the historical naming: SD 1.x's `attention_head_dim: 8` is 8 heads).
        let heads = c
            .num_attention_heads
            .as_ref()
            .unwrap_or(&c.attention_head_dim)
            .expand(n, "num_attention_heads")?;
        let cross = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = c
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let only_cross = c.only_cross_attention.expand(n, "only_cross_attention")?;

        let resnet = |in_c, out_c, scale: f64| ResnetConfig {
            in_channels: in_c,
            out_channels: out_c,
            temb_channels: Some(time_embed_dim),
            groups,
            eps,
            act,
            output_scale_factor: scale,
        };
        let transformer =
            |channels: usize, heads: usize, layers: usize, cross: usize, only_cross| {
                if heads == 0 || channels % heads != 0 {
                    return Err(Error::config(
                        "unet",
                        format!(
                            "{channels} channels are not divisible into {heads} attention heads"
                        ),
                    ));
                }
                Ok(Transformer2DConfig {
                    in_channels: channels,
                    heads,
                    head_dim: channels / heads,
                    num_layers: layers,
                    cross_attention_dim: cross,
                    groups,
                    use_linear_projection: c.use_linear_projection,
                    only_cross_attention: only_cross,
                })
            };

        let conv_in = Conv2d::load(
            &w.pp("conv_in"),
            c.in_channels,
            c.block_out_channels[0],
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
        )?;
        let time_embedding = TimestepEmbedding::load(
            &w.pp("time_embedding"),
            c.block_out_channels[0],
            time_embed_dim,
            act,
        )?;
        let add_embedding = if c.uses_text_time() {
            let in_dim = c.projection_class_embeddings_input_dim.ok_or_else(|| {
                Error::config(
                    "unet",
                    "text_time needs projection_class_embeddings_input_dim",
                )
            })?;
            if c.addition_time_embed_dim.is_none() {
                return Err(Error::config(
                    "unet",
                    "text_time needs addition_time_embed_dim",
                ));
            }
            Some(TimestepEmbedding::load(
                &w.pp("add_embedding"),
                in_dim,
                time_embed_dim,
                act,
            )?)
        } else {
            None
        };

        // Down blocks.
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = c.block_out_channels[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = c.block_out_channels[i];
            let is_final = i == n - 1;
            let with_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(Error::config(
                        "unet",
                        format!("down block type `{other}` is not supported (supported: CrossAttnDownBlock2D, DownBlock2D)"),
                    ))
                }
            };
            let bw = w.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    &bw.pp(format!("resnets.{j}")),
                    resnet(rin, out_c, c.resnet_out_scale_factor),
                )?);
                if with_attention {
                    attentions.push(Transformer2D::load(
                        &bw.pp(format!("attentions.{j}")),
                        transformer(out_c, heads[i], tlayers[i], cross[i], only_cross[i])?,
                    )?);
                }
            }
            let downsampler = if is_final {
                None
            } else {
                Some(Downsample2D::load(
                    &bw.pp("downsamplers.0"),
                    out_c,
                    out_c,
                    c.downsample_padding,
                )?)
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        // Mid block.
        let mid_c = *c.block_out_channels.last().unwrap_or(&0);
        let mid_block = match c.mid_block_type.as_deref() {
            None => None,
            Some(kind @ ("UNetMidBlock2DCrossAttn" | "UNetMidBlock2D")) => {
                let mw = w.pp("mid_block");
                let first = ResnetBlock2D::load(
                    &mw.pp("resnets.0"),
                    resnet(mid_c, mid_c, c.mid_block_scale_factor),
                )?;
                let attn = if kind == "UNetMidBlock2DCrossAttn" {
                    let only = c.mid_block_only_cross_attention.unwrap_or(only_cross[n - 1]);
                    Some(Transformer2D::load(
                        &mw.pp("attentions.0"),
                        transformer(mid_c, heads[n - 1], tlayers[n - 1], cross[n - 1], only)?,
                    )?)
                } else {
                    None
                };
                let second = ResnetBlock2D::load(
                    &mw.pp("resnets.1"),
                    resnet(mid_c, mid_c, c.mid_block_scale_factor),
                )?;
                Some(MidBlock {
                    first,
                    rest: vec![(attn, second)],
                })
            }
            Some(other) => {
                return Err(Error::config(
                    "unet",
                    format!("mid block type `{other}` is not supported (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D)"),
                ))
            }
        };

        // Up blocks mirror the down blocks.
        let rev_channels: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = cross.iter().rev().copied().collect();
        let rev_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let rev_tlayers: Vec<Vec<usize>> = match &c.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v
                .iter()
                .enumerate()
                .map(|(i, pb)| pb.expand(rev_layers[i] + 1, "reverse_transformer_layers_per_block"))
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(Error::config(
                    "unet",
                    "`reverse_transformer_layers_per_block` needs one entry per block",
                ))
            }
            None => tlayers
                .iter()
                .rev()
                .enumerate()
                .map(|(i, &t)| vec![t; rev_layers[i] + 1])
                .collect(),
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut num_upsamplers = 0;
        let mut out_c = rev_channels[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let prev_out = out_c;
            out_c = rev_channels[i];
            let in_c = rev_channels[(i + 1).min(n - 1)];
            let with_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(Error::config(
                        "unet",
                        format!("up block type `{other}` is not supported (supported: CrossAttnUpBlock2D, UpBlock2D)"),
                    ))
                }
            };
            let bw = w.pp(format!("up_blocks.{i}"));
            let num_layers = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            // One transformer depth per layer (`rev_tlayers[i]` has num_layers entries).
            for (j, &depth) in rev_tlayers[i].iter().enumerate() {
                let skip_c = if j == num_layers - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    &bw.pp(format!("resnets.{j}")),
                    resnet(rin + skip_c, out_c, c.resnet_out_scale_factor),
                )?);
                if with_attention {
                    attentions.push(Transformer2D::load(
                        &bw.pp(format!("attentions.{j}")),
                        transformer(out_c, rev_heads[i], depth, rev_cross[i], rev_only[i])?,
                    )?);
                }
            }
            let upsampler = if is_final {
                None
            } else {
                num_upsamplers += 1;
                Some(Upsample2D::load(&bw.pp("upsamplers.0"), out_c, out_c)?)
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let conv_norm_out = if c.norm_num_groups.is_some() {
            Some(GroupNorm::load(
                &w.pp("conv_norm_out"),
                groups,
                c.block_out_channels[0],
                eps,
            )?)
        } else {
            None
        };
        let conv_out = Conv2d::load(
            &w.pp("conv_out"),
            c.block_out_channels[0],
            c.out_channels,
            c.conv_out_kernel,
            1,
            (c.conv_out_kernel - 1) / 2,
        )?;
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            act,
            num_upsamplers,
            dtype: w.dtype(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype the UNet computes in (f32, or f16 / bf16 for a model loaded
    /// in half precision).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Predict the noise (or v, or x0, per the scheduler's `prediction_type`).
    ///
    /// - `sample`: `(batch, in_channels, h, w)` latents, any `h, w ≥ 1`;
    /// - `timestep`: the scheduler's timestep (same for the whole batch);
    /// - `encoder_hidden_states`: `(batch, seq, cross_attention_dim)`;
    /// - `text_time`: SDXL's pooled embeddings and size ids (required when the
    ///   config has `addition_embed_type: text_time`).
    ///
    /// Returns `(batch, out_channels, h, w)` in `sample`'s dtype; the
    /// inputs may be of any float dtype and are cast to [`Self::dtype`],
    /// in which the UNet computes (diffusers' pipelines cast the latents to
    /// the UNet's dtype the same way).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_time: Option<TextTimeConditioning<'_>>,
    ) -> Result<Tensor> {
        if sample.dtype() == self.dtype
            && encoder_hidden_states.dtype() == self.dtype
            && text_time.is_none_or(|t| t.text_embeds.dtype() == self.dtype)
        {
            return self.forward_in_dtype(sample, timestep, encoder_hidden_states, text_time);
        }
        let text_embeds = text_time
            .map(|t| t.text_embeds.to_dtype(self.dtype))
            .transpose()?;
        let text_time = text_time
            .zip(text_embeds.as_ref())
            .map(|(t, e)| TextTimeConditioning {
                text_embeds: e,
                time_ids: t.time_ids,
            });
        let out = self.forward_in_dtype(
            &sample.to_dtype(self.dtype)?,
            timestep,
            &encoder_hidden_states.to_dtype(self.dtype)?,
            text_time,
        )?;
        Ok(out.to_dtype(sample.dtype())?)
    }

    /// [`Self::forward`] with every input already in [`Self::dtype`].
    fn forward_in_dtype(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_time: Option<TextTimeConditioning<'_>>,
    ) -> Result<Tensor> {
        let (batch, _, h, w) = sample.dims4()?;
        let device = sample.device();
        let c = &self.config;
        let overall = 1usize << self.num_upsamplers;
        let forward_upsample_size = h % overall != 0 || w % overall != 0;

        let t_emb = timestep_embedding(
            &vec![timestep; batch],
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            device,
        )?
        .to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            let tt = text_time.ok_or_else(|| {
                Error::invalid("unet", "this UNet needs text_time conditioning (SDXL)")
            })?;
            if tt.time_ids.len() != batch {
                return Err(Error::invalid(
                    "time_ids",
                    format!("{} rows for a batch of {batch}", tt.time_ids.len()),
                ));
            }
            let dim = c.addition_time_embed_dim.unwrap_or(0);
            let flat: Vec<f64> = tt.time_ids.iter().flatten().copied().collect();
            let time_embeds =
                timestep_embedding(&flat, dim, c.flip_sin_to_cos, c.freq_shift, device)?
                    .reshape((batch, ()))?
                    .to_dtype(sample.dtype())?;
            let add_embeds = Tensor::cat(&[tt.text_embeds, &time_embeds], 1)?;
            emb = (emb + add.forward(&add_embeds)?)?;
        }

        let mut h_ = self.conv_in.forward(sample)?;
        let mut skips = vec![h_.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h_, &emb, encoder_hidden_states)?;
            h_ = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            h_ = mid.forward(&h_, &emb, encoder_hidden_states)?;
        }
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let is_final = i == n_up - 1;
            let take = block.resnets.len();
            // The skip connection the *next* block starts from sets the
            // up-sampled size when the latent size is not a multiple of 2^k.
            let upsample_size = if !is_final && forward_upsample_size {
                let remaining = skips.len().checked_sub(take + 1);
                match remaining.and_then(|r| skips.get(r)) {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                }
            } else {
                None
            };
            h_ = block.forward(&h_, &mut skips, &emb, encoder_hidden_states, upsample_size)?;
        }
        match &self.conv_norm_out {
            Some(norm) => self
                .conv_out
                .forward_after(&h_, ConvPrologue::Norm(norm, self.act)),
            None => self.conv_out.forward(&h_),
        }
    }
}

impl UNet2DConditionConfig {
    /// `layers_per_block` when every down block has the same count (as in
    /// every Stable Diffusion UNet); `None` for per-block lists that differ.
    pub fn uniform_layers_per_block(&self) -> Option<usize> {
        match &self.layers_per_block {
            PerBlock::One(n) => Some(*n),
            PerBlock::Each(v) => v
                .first()
                .copied()
                .filter(|first| v.iter().all(|x| x == first)),
        }
    }
}
