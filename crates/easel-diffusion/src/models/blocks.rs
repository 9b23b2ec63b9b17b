//! The 2-D building blocks the UNet and the VAE share, following diffusers'
//! `resnet.py`, `downsampling.py`, `upsampling.py`, `attention.py` and
//! `transformer_2d.py`. Each block's weight keys are diffusers' own.

use candle_core::{Tensor, D};

use rayon::prelude::*;

use super::kernels;
use super::layers::{
    add, add_per_plane, chunk2_last, merge_heads, scaled_dot_product_attention, split_heads,
    Activation, Conv2d, ConvPrologue, GroupNorm, LayerNorm, Linear,
};
use super::weights::Weights;
use crate::error::Result;

/// `ResnetBlock2D` with the default (`"default"`) time-embedding injection:
/// `norm1 → act → conv1 (+ time_emb_proj(act(temb))) → norm2 → act → conv2`,
/// plus a 1×1 `conv_shortcut` when the channel count changes, divided by
/// `output_scale_factor`. Input and output `(batch, channels, h, w)`.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// The shape parameters of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Load from `w` (keys `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
    pub fn load(w: &Weights, c: ResnetConfig) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(Conv2d::load(
                &w.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(Linear::load(
                    &w.pp("time_emb_proj"),
                    t,
                    c.out_channels,
                    true,
                )?),
                None => None,
            },
            norm2: GroupNorm::load(&w.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
            act: c.act,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `x`: `(batch, in, h, w)`, `temb`: `(batch, temb_channels)` → `(batch, out, h, w)`.
    ///
    /// On the CPU kernels the block holds one tensor besides its input:
    /// `conv1` reads `act(norm1(x))` as it goes ([`Conv2d::forward_after`]),
    /// the time embedding is added in place, `conv2` writes over `conv1`'s
    /// output ([`Conv2d::forward_in_place`], Winograd layers) and the
    /// shortcut is added into it ([`Conv2d::add_into`]). Same values as the
    /// separate operations (the shortcut's product summed in column chunks).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let norm1 = ConvPrologue::Norm(&self.norm1, self.act);
        let norm2 = ConvPrologue::Norm(&self.norm2, self.act);
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb)?)?),
            _ => None,
        };
        let Some((mut h, dims)) = self.conv1.forward_after_vec(x, norm1)? else {
            return self.forward_unfused(x, temb);
        };
        if let Some(t) = &temb {
            // `h + t` per (image, channel) plane, in place; a time embedding
            // of batch 1 applies to every image (as broadcast_add).
            let [batch, channels, hh, ww] = dims;
            let (tb, tc) = t.dims2()?;
            if tc != channels || (tb != batch && tb != 1) {
                return Err(crate::error::Error::invalid(
                    "resnet",
                    format!("time embedding {tb}x{tc} does not fit a {batch}x{channels} input"),
                ));
            }
            kernels::with_f32(t, |t| {
                h.par_chunks_mut(hh * ww)
                    .enumerate()
                    .for_each(|(p, plane)| {
                        let tv = t[p % t.len()];
                        plane.iter_mut().for_each(|v| *v += tv)
                    })
            })?;
        }
        if !self
            .conv2
            .forward_in_place(&mut h, dims, Some((&self.norm2, self.act)))?
        {
            let t = kernels::tensor(h, &dims)?;
            h = match self.conv2.forward_after_vec(&t, norm2)? {
                Some((y, _)) => y,
                None => {
                    kernels::with_f32(&self.conv2.forward(&norm2.apply(&t)?)?, <[f32]>::to_vec)?
                }
            };
        }
        // `shortcut + h`, in place.
        let added = match &self.conv_shortcut {
            Some(c) => c.add_into(&mut h, x)?,
            None => false,
        };
        if !added {
            let shortcut = match &self.conv_shortcut {
                Some(c) => c.forward(x)?,
                None => x.clone(),
            };
            kernels::with_f32(&shortcut, |s| {
                h.par_chunks_mut(1 << 14)
                    .zip(s.par_chunks(1 << 14))
                    .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, &v)| *o += v))
            })?;
        }
        if self.output_scale_factor != 1.0 {
            // As candle's tensor-by-scalar division: times the reciprocal.
            let mul = (1.0 / self.output_scale_factor) as f32;
            h.par_iter_mut().for_each(|v| *v = *v * mul + 0.0);
        }
        kernels::tensor(h, &dims)
    }

    /// [`ResnetBlock2D::forward`] on an input the caller hands over (`x`:
    /// `(batch, in, h, w)` = `dims`, row-major f32), for a block that at
    /// least halves its channels (the VAE decoder's 512 → 256 and 256 → 128
    /// blocks): `conv1` and the 1×1 shortcut are written over `x` itself
    /// ([`Conv2d::forward_shrink_in_place`]), `conv2` runs in place on each
    /// image's `conv1` planes, the shortcut is added, and `x`'s buffer is
    /// cut to the output's size. The block then holds one tensor, its
    /// input, instead of the input and the output (1 GiB instead of 1.5 GiB
    /// for the decoder's 256 → 128 block at 1024²). Same values as
    /// [`ResnetBlock2D::forward`] (the shortcut's product summed over other
    /// column blocks: within 1e-5); other blocks and kernels take
    /// [`ResnetBlock2D::forward`].
    ///
    /// Errors: as [`ResnetBlock2D::forward`]; `x` not of `dims`' size.
    pub fn forward_owned(
        &self,
        mut x: Vec<f32>,
        dims: [usize; 4],
        temb: Option<&Tensor>,
    ) -> Result<Tensor> {
        let [batch, ci, hh, ww] = dims;
        let hw = hh * ww;
        if x.len() != batch * ci * hw {
            return Err(crate::error::Error::invalid(
                "resnet",
                format!("{} values do not make a {dims:?} input", x.len()),
            ));
        }
        let co = self.conv2.dims_out();
        let in_place = match &self.conv_shortcut {
            Some(shortcut) if self.conv2.in_place_ready(co, Some((&self.norm2, self.act))) => self
                .conv1
                .forward_shrink_in_place(&mut x, dims, (&self.norm1, self.act), shortcut)?,
            _ => false,
        };
        if !in_place {
            return self.forward(&kernels::tensor(x, &dims)?, temb);
        }
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb)?)?),
            _ => None,
        };
        // Per image: planes [0, co) are conv1's output, [co, 2 co) the shortcut's.
        let planes = 2 * co;
        let image_dims = [1, co, hh, ww];
        for b in 0..batch {
            let (h, s) = x[b * planes * hw..(b + 1) * planes * hw].split_at_mut(co * hw);
            if let Some(t) = &temb {
                let (tb, tc) = t.dims2()?;
                if tc != co || (tb != batch && tb != 1) {
                    return Err(crate::error::Error::invalid(
                        "resnet",
                        format!("time embedding {tb}x{tc} does not fit a {batch}x{co} input"),
                    ));
                }
                let row = t.get(b % tb)?;
                kernels::with_f32(&row, |t| {
                    h.par_chunks_mut(hw)
                        .zip(t.par_iter())
                        .for_each(|(plane, &tv)| plane.iter_mut().for_each(|v| *v += tv))
                })?;
            }
            if !self
                .conv2
                .forward_in_place(h, image_dims, Some((&self.norm2, self.act)))?
            {
                return Err(crate::error::Error::invalid(
                    "resnet",
                    "conv2 left the in-place kernels after conv1 ran in place",
                ));
            }
            h.par_chunks_mut(1 << 14)
                .zip(s.par_chunks(1 << 14))
                .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, &v)| *o += v));
        }
        // Images side by side, then the buffer cut to the output's size
        // (glibc shrinks a large block where it lies, without a copy).
        for b in 1..batch {
            x.copy_within(b * planes * hw..(b * planes + co) * hw, b * co * hw);
        }
        x.truncate(batch * co * hw);
        x.shrink_to_fit();
        if self.output_scale_factor != 1.0 {
            let mul = (1.0 / self.output_scale_factor) as f32;
            x.par_iter_mut().for_each(|v| *v = *v * mul + 0.0);
        }
        kernels::tensor(x, &[batch, co, hh, ww])
    }

    /// Whether [`ResnetBlock2D::forward_owned`] writes over its input for an
    /// input of `channels` channels: the block has a 1×1 shortcut and at
    /// least halves the channels.
    pub fn shrinks_in_place(&self, channels: usize) -> bool {
        self.conv_shortcut.is_some() && channels >= 2 * self.conv2.dims_out()
    }

    /// [`ResnetBlock2D::forward`] one operation after the other (tensors
    /// the CPU kernels do not take); `temb` already projected.
    fn forward_unfused(&self, x: &Tensor, temb: Option<Tensor>) -> Result<Tensor> {
        let mut h = self
            .conv1
            .forward(&ConvPrologue::Norm(&self.norm1, self.act).apply(x)?)?;
        if let Some(t) = temb {
            h = add_per_plane(&h, &t)?;
        }
        let h = self
            .conv2
            .forward(&ConvPrologue::Norm(&self.norm2, self.act).apply(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// `Downsample2D` with a convolution: 3×3, stride 2, `padding` on every side
/// (diffusers pads `(0, 1, 0, 1)` explicitly when `padding` is 0, as the VAE
/// encoder does). Output size `ceil(h / 2)` for padding 1.
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// Load `conv` from `w`.
    pub fn load(w: &Weights, channels: usize, out_channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&w.pp("conv"), channels, out_channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    /// `x`: `(batch, c, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour upsampling (×2, or to an explicit size
/// when the UNet's latent size is not a multiple of its overall factor, as
/// `F.interpolate(size=...)`) followed by a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Load `conv` from `w`.
    pub fn load(w: &Weights, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&w.pp("conv"), channels, out_channels, 3, 1, 1)?,
        })
    }

    /// `x`: `(batch, c, h, w)` → `(batch, c, H, W)` with `(H, W)` = `size` or `(2h, 2w)`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if (th, tw) == (2 * h, 2 * w) {
            // Upsampled as the convolution reads its input.
            return self.conv.forward_after(x, ConvPrologue::Upsample2x);
        }
        let x = x.upsample_nearest2d(th, tw)?;
        self.conv.forward(&x)
    }

    /// [`Upsample2D::forward`] at twice the size, the output as its data
    /// and dims (`(batch, out, 2h, 2w)`) for a caller that hands it on by
    /// value ([`ResnetBlock2D::forward_owned`]); computed as `forward` does
    /// (copied out of the tensor where the fused kernel does not apply).
    pub fn forward_vec(&self, x: &Tensor) -> Result<(Vec<f32>, [usize; 4])> {
        if let Some(out) = self.conv.forward_after_vec(x, ConvPrologue::Upsample2x)? {
            return Ok(out);
        }
        let y = self.forward(x, None)?;
        let (b, c, h, w) = y.dims4()?;
        Ok((kernels::with_f32(&y, <[f32]>::to_vec)?, [b, c, h, w]))
    }
}

/// diffusers' `Attention` with separate `to_q`, `to_k`, `to_v` and
/// `to_out.0` projections (no q/k/v bias in the UNet, biases in the VAE).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `query_dim` = width of the input, `context_dim` = width of the
    /// key/value input (cross-attention), `heads * head_dim` = inner width.
    pub fn load(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `x`: `(batch, n, query_dim)`, `context`: `(batch, m, context_dim)`
    /// (self-attention when `None`) → `(batch, n, query_dim)`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        let a = scaled_dot_product_attention(&q, &k, &v, None, self.scale)?;
        self.to_out.forward(&merge_heads(&a)?)
    }
}

/// `FeedForward` with the GEGLU activation (Shazeer 2020, arXiv:2002.05202):
/// `net.2(h * gelu(g))` where `(h, g) = net.0.proj(x).chunk(2)`.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: Linear::load(&w.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: Linear::load(&w.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.proj_in.forward(x)?;
        // On the CPU kernels the gated GELU is one parallel pass (f32: the
        // same values as candle's ops below; bf16: rounded once).
        let mut dims = projected.dims().to_vec();
        let two_n = *dims.last().expect("a linear output has a last axis");
        let rows = projected.elem_count() / two_n.max(1);
        *dims.last_mut().expect("checked") = two_n / 2;
        let gated = if kernels::applies_bf16(&projected) {
            let g = kernels::with_bf16(&projected, |p| kernels::geglu_bf16(p, rows, two_n / 2))?;
            Some(kernels::tensor(g, &dims)?)
        } else if kernels::applies(&projected) {
            let g = kernels::with_f32(&projected, |p| kernels::geglu_f32(p, rows, two_n / 2))?;
            Some(kernels::tensor(g, &dims)?)
        } else {
            None
        };
        if let Some(gated) = gated {
            return self.proj_out.forward(&gated);
        }
        let (h, gate) = chunk2_last(&projected)?;
        self.proj_out.forward(&(h * gate.gelu_erf()?)?)
    }
}

/// `BasicTransformerBlock` (layer-norm variant): self-attention,
/// cross-attention on the text embeddings, GEGLU feed-forward, each
/// pre-normalised and residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn load(w: &Weights, c: &Transformer2DConfig) -> Result<Self> {
        let dim = c.heads * c.head_dim;
        let attn1_context = if c.only_cross_attention {
            c.cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(
                &w.pp("attn1"),
                dim,
                attn1_context,
                c.heads,
                c.head_dim,
                false,
            )?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                &w.pp("attn2"),
                dim,
                c.cross_attention_dim,
                c.heads,
                c.head_dim,
                false,
            )?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
            only_cross_attention: c.only_cross_attention,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let a = if self.only_cross_attention {
            self.attn1.forward(&n, Some(context))?
        } else {
            self.attn1.forward(&n, None)?
        };
        let x = add(x, &a)?;
        let x = add(
            &x,
            &self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
        )?;
        add(&x, &self.ff.forward(&self.norm3.forward(&x)?)?)
    }
}

/// Shape parameters of a [`Transformer2D`].
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

/// `Transformer2DModel` for continuous (latent image) input: group norm,
/// `proj_in` (1×1 conv, or linear with `use_linear_projection`), the
/// transformer blocks over the `h*w` tokens, `proj_out`, plus the residual.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Transformer2D {
    /// Load from `w` (keys `norm`, `proj_in`, `transformer_blocks.N`, `proj_out`).
    pub fn load(w: &Weights, c: Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(Linear::load(&w.pp("proj_in"), c.in_channels, inner, true)?),
                Projection::Linear(Linear::load(&w.pp("proj_out"), inner, c.in_channels, true)?),
            )
        } else {
            (
                Projection::Conv(Conv2d::load(
                    &w.pp("proj_in"),
                    c.in_channels,
                    inner,
                    1,
                    1,
                    0,
                )?),
                Projection::Conv(Conv2d::load(
                    &w.pp("proj_out"),
                    inner,
                    c.in_channels,
                    1,
                    1,
                    0,
                )?),
            )
        };
        let blocks = (0..c.num_layers)
            .map(|i| BasicTransformerBlock::load(&w.pp(format!("transformer_blocks.{i}")), &c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&w.pp("norm"), c.groups, c.in_channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// `x`: `(batch, c, h, w)`, `context`: `(batch, seq, cross_attention_dim)`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => {
                let y = conv.forward(&n)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
            Projection::Linear(lin) => {
                let c = n.dim(1)?;
                lin.forward(&n.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?
            }
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => {
                let inner = tokens.dim(D::Minus1)?;
                conv.forward(&tokens.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?)?
            }
            Projection::Linear(lin) => {
                let y = lin.forward(&tokens)?;
                let c = y.dim(D::Minus1)?;
                y.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?
            }
        };
        add(&out, x)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device};

    use super::*;
    use crate::models::kernels::testing::max_diff;
    use crate::models::kernels::{with_conv3x3_kernel, Conv3x3Kernel};
    use crate::models::weights::RandomSource;

    fn block(
        in_channels: usize,
        out_channels: usize,
        temb: Option<usize>,
        scale: f64,
    ) -> ResnetBlock2D {
        let w = Weights::new(
            Arc::new(RandomSource::new(DType::F32)),
            "vae",
            DType::F32,
            &Device::Cpu,
        );
        ResnetBlock2D::load(
            &w,
            ResnetConfig {
                in_channels,
                out_channels,
                temb_channels: temb,
                groups: 2,
                eps: 1e-6,
                act: Activation::Silu,
                output_scale_factor: scale,
            },
        )
        .unwrap()
    }

    /// The block that writes over its input gives the separate operations'
    /// values (conv1 and conv2 bit for bit; the shortcut's product over
    /// other column blocks), with and without a time embedding, for a batch
    /// and odd sizes; blocks it does not apply to take `forward`.
    #[test]
    fn forward_owned_equals_the_separate_operations() {
        let dev = Device::Cpu;
        for &(batch, ci, co, temb, h, w, scale) in &[
            (1, 8, 4, None, 9, 11, 1.0),
            (2, 8, 4, Some(6), 33, 20, 2.0),
            (3, 14, 6, Some(6), 7, 5, 1.0),
            (1, 4, 4, None, 6, 6, 1.0),
        ] {
            let r = block(ci, co, temb, scale);
            let x = Tensor::randn(0f32, 1.0, (batch, ci, h, w), &dev).unwrap();
            let t = temb.map(|t| Tensor::randn(0f32, 1.0, (batch, t), &dev).unwrap());
            assert_eq!(r.shrinks_in_place(ci), ci >= 2 * co, "{ci}->{co}");
            with_conv3x3_kernel(Conv3x3Kernel::Winograd, || {
                let projected = match (&r.time_emb_proj, &t) {
                    (Some(p), Some(t)) => Some(p.forward(&r.act.forward(t).unwrap()).unwrap()),
                    _ => None,
                };
                let want = r.forward_unfused(&x, projected).unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = r.forward_owned(xv, [batch, ci, h, w], t.as_ref()).unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "{batch}x{ci}->{co} {h}x{w}: {diff}");
            });
        }
    }
}
