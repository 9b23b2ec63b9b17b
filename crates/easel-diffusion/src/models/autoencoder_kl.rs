//! `AutoencoderKL`, the VAE that maps images to latents and back, following
//! diffusers' `autoencoder_kl.py` and `vae.py` (Kingma & Welling 2013,
//! arXiv:1312.6114; Rombach et al. 2022, arXiv:2112.10752).
//!
//! Images are `(batch, 3, H, W)` in [-1, 1]; latents are
//! `(batch, latent_channels, H / f, W / f)` with `f = 2^(len(block_out_channels) - 1)`
//! (the VAE scale factor, 8 for every Stable Diffusion and FLUX VAE).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::blocks::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::kernels;
use super::layers::{Activation, Conv2d, ConvPrologue, GroupNorm, Linear};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;

/// The fields of a diffusers `AutoencoderKL` config the engine uses.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Native image size in pixels.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1.x/2.x).
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Subtracted before scaling after encoding (FLUX: 0.1159).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    /// Whether diffusers upcasts the VAE to f32 for fp16 runs.
    #[serde(default = "d_true")]
    pub force_upcast: bool,
}

fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_silu() -> String {
    "silu".into()
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl AutoencoderKLConfig {
    /// Read a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }

    /// The spatial factor between image pixels and latents (8 for SD and FLUX).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn check(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::config("vae", "block_out_channels is empty"));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::config(
                    "vae",
                    format!(
                        "down block type `{t}` is not supported (supported: DownEncoderBlock2D)"
                    ),
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::config(
                    "vae",
                    format!("up block type `{t}` is not supported (supported: UpDecoderBlock2D)"),
                ));
            }
        }
        Ok(())
    }
}

/// The VAE's single-head spatial self-attention with group norm and a
/// residual connection (diffusers `Attention` with `norm_num_groups`).
/// Older checkpoints name the projections `query`/`key`/`value`/`proj_attn`;
/// both layouts load.
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn load(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        let legacy = !w.contains("to_q.weight") && w.contains("query.weight");
        let name = |new: &str, old: &str| {
            if legacy {
                old.to_string()
            } else {
                new.to_string()
            }
        };
        Ok(Self {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, channels, 1e-6)?,
            to_q: Linear::load(&w.pp(name("to_q", "query")), channels, channels, true)?,
            to_k: Linear::load(&w.pp(name("to_k", "key")), channels, channels, true)?,
            to_v: Linear::load(&w.pp(name("to_v", "value")), channels, channels, true)?,
            to_out: Linear::load(
                &w.pp(name("to_out.0", "proj_attn")),
                channels,
                channels,
                true,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.group_norm.forward(x)?;
        let tokens = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
        let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
        let a =
            super::layers::scaled_dot_product_attention(&q, &k, &v, None, 1.0 / (c as f64).sqrt())?
                .squeeze(1)?;
        let out = self.to_out.forward(&a)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        super::layers::add(&out, x)
    }
}

/// `UNetMidBlock2D` of the VAE: resnet, attention, resnet.
struct VaeMidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn load(
        w: &Weights,
        channels: usize,
        groups: usize,
        act: Activation,
        attention: bool,
    ) -> Result<Self> {
        let rc = resnet_config(channels, channels, groups, act);
        Ok(Self {
            resnet0: ResnetBlock2D::load(&w.pp("resnets.0"), rc)?,
            attention: if attention {
                Some(VaeAttention::load(&w.pp("attentions.0"), channels, groups)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(&w.pp("resnets.1"), rc)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

fn resnet_config(in_c: usize, out_c: usize, groups: usize, act: Activation) -> ResnetConfig {
    ResnetConfig {
        in_channels: in_c,
        out_channels: out_c,
        temb_channels: None,
        groups,
        eps: 1e-6,
        act,
        output_scale_factor: 1.0,
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn load(w: &Weights, c: &AutoencoderKLConfig, act: Activation) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let top = ch[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = top;
        for i in 0..n {
            let prev = out_c;
            out_c = ch[n - 1 - i];
            let bw = w.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_c };
                    ResnetBlock2D::load(
                        &bw.pp(format!("resnets.{j}")),
                        resnet_config(rin, out_c, g, act),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i == n - 1 {
                None
            } else {
                Some(Upsample2D::load(&bw.pp("upsamplers.0"), out_c, out_c)?)
            };
            up_blocks.push((resnets, up));
        }
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), c.latent_channels, top, 3, 1, 1)?,
            mid_block: VaeMidBlock::load(
                &w.pp("mid_block"),
                top,
                g,
                act,
                c.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            act,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        // An upsampler's output goes to the next block's first resnet by
        // value when that block halves the channels, so the resnet writes
        // over it (`forward_owned`: 0.5 GiB less at 1024²).
        let mut owned: Option<(Vec<f32>, [usize; 4])> = None;
        for (i, (resnets, up)) in self.up_blocks.iter().enumerate() {
            for r in resnets {
                h = match owned.take() {
                    Some((x, dims)) => r.forward_owned(x, dims, None)?,
                    None => r.forward(&h, None)?,
                };
            }
            if let Some(up) = up {
                let next_shrinks = kernels::applies(&h)
                    && self.up_blocks.get(i + 1).is_some_and(|(next, _)| {
                        let channels = h.dim(1).unwrap_or(0);
                        next.first().is_some_and(|r| r.shrinks_in_place(channels))
                    });
                if next_shrinks {
                    owned = Some(up.forward_vec(&h)?);
                    h = Tensor::zeros(0, h.dtype(), h.device())?;
                } else {
                    h = up.forward(&h, None)?;
                }
            }
        }
        if let Some((x, dims)) = owned {
            h = kernels::tensor(x, &dims)?;
        }
        self.conv_out
            .forward_after(&h, ConvPrologue::Norm(&self.conv_norm_out, self.act))
    }
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn load(w: &Weights, c: &AutoencoderKLConfig, act: Activation) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &channels) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = channels;
            let bw = w.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::load(
                        &bw.pp(format!("resnets.{j}")),
                        resnet_config(rin, out_c, g, act),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i == n - 1 {
                None
            } else {
                Some(Downsample2D::load(
                    &bw.pp("downsamplers.0"),
                    out_c,
                    out_c,
                    0,
                )?)
            };
            down_blocks.push((resnets, down));
        }
        let top = ch[n - 1];
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(
                &w.pp("mid_block"),
                top,
                g,
                act,
                c.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), g, top, 1e-6)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), top, 2 * c.latent_channels, 3, 1, 1)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.down_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out
            .forward_after(&h, ConvPrologue::Norm(&self.conv_norm_out, self.act))
    }
}

/// The encoder's output distribution over latents (`DiagonalGaussianDistribution`).
pub struct DiagonalGaussian {
    /// `(batch, latent_channels, h, w)`.
    pub mean: Tensor,
    /// `(batch, latent_channels, h, w)`, `exp(0.5 * clamp(logvar, -30, 20))`.
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * ε` with ε drawn from `noise` (one draw of the latent shape).
    pub fn sample(&self, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise.randn(self.mean.dims(), self.mean.device())?;
        Ok((&self.mean + (&self.std * eps)?)?)
    }
}

/// A loaded `AutoencoderKL`. The encoder is loaded only when asked for
/// (image-to-image and inpainting), since text-to-image needs the decoder alone.
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Option<Encoder>,
    quant_conv: Option<Conv2d>,
    decoder: Decoder,
    post_quant_conv: Option<Conv2d>,
    /// The dtype the VAE computes in (its weights' [`Weights::dtype`]).
    dtype: DType,
}

impl AutoencoderKL {
    /// Build from `config` and the `vae` weights; `with_encoder` also loads
    /// the encoder half.
    pub fn load(w: &Weights, config: &AutoencoderKLConfig, with_encoder: bool) -> Result<Self> {
        config.check()?;
        let act = Activation::from_name("vae", &config.act_fn)?;
        let lc = config.latent_channels;
        let encoder = if with_encoder {
            Some(Encoder::load(&w.pp("encoder"), config, act)?)
        } else {
            None
        };
        let quant_conv = if with_encoder && config.use_quant_conv {
            Some(Conv2d::load(&w.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(&w.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            encoder,
            quant_conv,
            decoder: Decoder::load(&w.pp("decoder"), config, act)?,
            post_quant_conv,
            dtype: w.dtype(),
        })
    }

    /// The dtype the VAE computes in: f32, or f16 / bf16 for a model
    /// loaded in half precision ([`crate::loader::ModelDir::with_compute_dtype`]).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Decode latents `(batch, latent_channels, h, w)` (already divided by
    /// `scaling_factor`, and shifted for FLUX) to images `(batch, out_channels, 8h, 8w)`
    /// in about [-1, 1]. Any float dtype in; the VAE computes in
    /// [`Self::dtype`] and returns f32.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        Ok(self.decoder.forward(&z)?.to_dtype(DType::F32)?)
    }

    /// Encode images `(batch, in_channels, H, W)` in [-1, 1] to the latent
    /// distribution (f32; the encoder computes in [`Self::dtype`]). Errors
    /// when the model was loaded without its encoder.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let enc = self
            .encoder
            .as_ref()
            .ok_or_else(|| Error::invalid("vae", "the VAE was loaded without its encoder"))?;
        let mut h = enc.forward(&x.to_dtype(self.dtype)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let h = h.to_dtype(DType::F32)?;
        let lc = self.config.latent_channels;
        let mean = h.narrow(1, 0, lc)?;
        let logvar = h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }
}
