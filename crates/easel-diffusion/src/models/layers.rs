//! The building blocks shared by the text encoders, the UNet and the VAE:
//! linear and convolution layers, normalisations, activations and
//! scaled dot-product attention, with PyTorch's semantics.

use candle_core::{Module, Tensor, D};

use super::weights::Weights;
use crate::error::{Error, Result};

/// `torch.nn.Linear`: `y = x W^T + b`, `W` of shape `(out_features, in_features)`.
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Load `weight` (and `bias` when `bias` is true) from `w`.
    pub fn load(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_features, in_features], "weight")?;
        let bias = if bias {
            Some(w.get(&[out_features], "bias")?)
        } else {
            None
        };
        Ok(Self {
            inner: candle_nn::Linear::new(weight, bias),
        })
    }

    /// `x`: `(..., in_features)` → `(..., out_features)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(x)?)
    }
}

/// `torch.nn.Conv2d` with square kernels, weight `(out, in, k, k)`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Load a `kernel`×`kernel` convolution with its bias.
    pub fn load(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = w.get(&[out_channels, in_channels, kernel, kernel], "weight")?;
        let bias = Some(w.get(&[out_channels], "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// `x`: `(batch, in, h, w)` → `(batch, out, h', w')` with
    /// `h' = (h + 2 padding - k) / stride + 1`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, (), 1, 1))?)?),
            None => Ok(y),
        }
    }
}

/// `torch.nn.GroupNorm` over `(batch, channels, ...)`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// Load `weight` and `bias` of length `channels`. Errors when `channels`
    /// is not divisible by `groups`.
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(Error::config(
                "group_norm",
                format!("{channels} channels are not divisible into {groups} groups"),
            ));
        }
        let weight = w.get(&[channels], "weight")?;
        let bias = w.get(&[channels], "bias")?;
        Ok(Self {
            inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
        })
    }

    /// Normalise each group of channels to zero mean and unit variance,
    /// then scale and shift per channel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(x)?)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

impl LayerNorm {
    /// Load `weight` and `bias` of length `dim`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&[dim], "weight")?;
        let bias = w.get(&[dim], "bias")?;
        Ok(Self {
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
        })
    }

    /// `x`: `(..., dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(x)?)
    }
}

/// Activation functions by their transformers / diffusers config names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (`silu`, `swish`).
    Silu,
    /// The exact GELU, `x Φ(x)` (`gelu`).
    Gelu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (`quick_gelu`, CLIP ViT-L).
    QuickGelu,
}

impl Activation {
    /// Parse a config's `hidden_act` / `act_fn`.
    pub fn from_name(component: &str, name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "quick_gelu" => Ok(Self::QuickGelu),
            other => Err(Error::config(
                component,
                format!(
                    "activation `{other}` is not supported (supported: silu, gelu, gelu_pytorch_tanh, quick_gelu)"
                ),
            )),
        }
    }

    /// Apply element-wise.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

/// Scaled dot-product attention, `softmax(q kᵀ · scale + mask) v`.
///
/// `q`: `(batch, heads, q_len, head_dim)`, `k`/`v`: `(batch, heads, kv_len,
/// head_dim)`, `mask` broadcastable to `(batch, heads, q_len, kv_len)` (added
/// before the softmax, `-inf` masks). Returns `(batch, heads, q_len, head_dim)`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Split `(batch, len, heads * head_dim)` into `(batch, heads, len, head_dim)`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    Ok(x.reshape((b, n, heads, c / heads))?.transpose(1, 2)?)
}

/// Merge `(batch, heads, len, head_dim)` back into `(batch, len, heads * head_dim)`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, n, h * d))?)
}

/// The last-dimension half split used by GEGLU: `(..., 2n)` → two `(..., n)`.
pub fn chunk2_last(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}
