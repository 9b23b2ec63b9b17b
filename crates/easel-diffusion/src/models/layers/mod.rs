//! The building blocks shared by the text encoders, the UNet and the VAE:
//! linear and convolution layers, normalisations, activations and
//! scaled dot-product attention, with PyTorch's semantics.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::{Module, Tensor, D};

use super::kernels;
use super::stored::StoredTensor;
use super::weights::Weights;
use crate::error::{Error, Result};

mod circular;
mod conv2d;
mod metrics;

pub use circular::{circular_padding, circular_padding_active, pad_circular, CircularPaddingGuard};
pub use conv2d::Conv2d;
use metrics::{count_flops, timed, BF16_KERNEL_LAYERS, WIDENED_LAYERS};
pub use metrics::{
    flops, half_precision_paths, measure_bf16_gemm_gflops, measure_matmul_gflops, profile,
    PROFILE_KINDS,
};

/// The half-precision dtype of a CPU tensor (`Some(F16 | BF16)`), for the
/// layers' CPU half-precision path: candle has no CPU half-precision matrix
/// product (bf16) or convolution, so on the CPU a half-precision layer
/// widens its input to f32 (exact), computes with f32 accumulation on the
/// f32 path (the engine's kernels, or candle's f32 ops with
/// `EASEL_KERNELS=off`) and rounds its output to the input's dtype: the
/// numbers of a half-precision GEMM with f32 accumulation (oneDNN's, or
/// cuBLAS' with f32 compute), a layer at a time. Not a speed-up: the
/// arithmetic is f32. Linear and 1×1 / 3×3 convolution layers with bf16
/// inputs and weights take the bf16 kernels instead where the CPU has
/// AVX512-BF16 (same numbers contract, bf16 arithmetic speed).
fn half_on_cpu(x: &Tensor) -> Option<candle_core::DType> {
    (x.device().is_cpu()
        && matches!(
            x.dtype(),
            candle_core::DType::F16 | candle_core::DType::BF16
        ))
    .then_some(x.dtype())
}

/// `t` on `device`: `t` itself when it is there already, else a copy on
/// `device` (freed when dropped). Under `--offload sequential`
/// ([`crate::pipelines::offload`]) a model's weights stay on the CPU and
/// each layer moves its own this way for its forward pass, as diffusers'
/// `enable_sequential_cpu_offload()` moves each module's parameters in its
/// pre-forward hook.
///
/// Errors: the copy failed (out of device memory).
pub fn on_device<'a>(t: &'a Tensor, device: &candle_core::Device) -> Result<Cow<'a, Tensor>> {
    Ok(if t.device().same_device(device) {
        Cow::Borrowed(t)
    } else {
        Cow::Owned(t.to_device(device)?)
    })
}

/// The weight as a bf16 CPU tensor the bf16 kernels read in place
/// (contiguous, dense), or `None` (f32 / f16 / quantized / fp8 weights).
fn bf16_weight(w: &StoredTensor) -> Option<&Tensor> {
    match w {
        StoredTensor::Dense(t)
            if t.dtype() == candle_core::DType::BF16
                && t.device().is_cpu()
                && t.is_contiguous() =>
        {
            Some(t)
        }
        _ => None,
    }
}

/// A 1-D parameter (bias, norm scale) as f32 values for the CPU kernels,
/// from any float dtype; empty when it is not on the CPU.
fn cpu_f32_values(t: &Tensor) -> Result<Vec<f32>> {
    if !t.device().is_cpu() {
        return Ok(Vec::new());
    }
    kernels::with_f32(&t.to_dtype(candle_core::DType::F32)?, <[f32]>::to_vec)
}

/// `torch.nn.Linear`: `y = x W^T + b`, `W` of shape `(out_features, in_features)`.
///
/// f32 inputs on the CPU run as one matrix product over all leading
/// dimensions with the bias fused ([`kernels::linear`]); other dtypes and
/// devices use candle's matmul.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out_features, in_features)`, as stored: f32, f16 / bf16, fp8 or
    /// GGML blocks (see [`Weights::get_stored`]); widened per call.
    weight: StoredTensor,
    bias: Option<Tensor>,
    /// The bias as f32 for the CPU kernel (empty without bias or when the
    /// weights are not f32).
    bias_f32: Arc<Vec<f32>>,
}

impl Linear {
    /// Load `weight` (and `bias` when `bias` is true) from `w`.
    pub fn load(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = w.get_stored(&[out_features, in_features], "weight")?;
        let bias = if bias {
            Some(w.get(&[out_features], "bias")?)
        } else {
            None
        };
        let bias_f32 = Arc::new(match &bias {
            Some(b) => cpu_f32_values(b)?,
            None => Vec::new(),
        });
        Ok(Self {
            weight,
            bias,
            bias_f32,
        })
    }

    /// The weight as held in memory (`(out_features, in_features)`).
    pub fn weight(&self) -> &StoredTensor {
        &self.weight
    }

    /// `x`: `(..., in_features)` → `(..., out_features)`, in `x`'s dtype.
    ///
    /// A bf16 input on a CPU with AVX512-BF16 and a bf16 weight runs on
    /// [`kernels::linear_bf16`] (bf16 products, f32 accumulation, the bias
    /// added in f32, the output rounded to bf16, as oneDNN's bf16 linear);
    /// other half-precision CPU inputs widen to f32 ([`half_on_cpu`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_bf16(x)? {
            return Ok(y);
        }
        if let Some(dtype) = half_on_cpu(x) {
            WIDENED_LAYERS.fetch_add(1, Ordering::Relaxed);
            return kernels::to_half(&self.forward(&kernels::to_f32(x)?)?, dtype);
        }
        let (out_f, in_f) = match self.weight.dims() {
            &[o, i] => (o, i),
            d => {
                return Err(Error::invalid(
                    "linear",
                    format!("weight of shape {d:?}, expected 2 dimensions"),
                ))
            }
        };
        let rows = x.elem_count() / in_f.max(1);
        count_flops(2 * rows * in_f * out_f);
        let has_bias = self.bias.is_some();
        if kernels::applies(x)
            && self.weight.kernel_ready()
            && x.dims().last() == Some(&in_f)
            && (!has_bias || self.bias_f32.len() == out_f)
        {
            let mut shape = x.dims().to_vec();
            *shape.last_mut().expect("x has a last dimension") = out_f;
            let y = timed(3, || {
                kernels::with_f32(x, |xd| {
                    self.weight.linear(xd, rows, in_f, &self.bias_f32, out_f)
                })
            })??;
            return kernels::tensor(y, &shape);
        }
        let weight = self.weight.to_dense(x.device())?.to_dtype(x.dtype())?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| {
                on_device(b, x.device())?
                    .to_dtype(x.dtype())
                    .map_err(Error::from)
            })
            .transpose()?;
        let inner = candle_nn::Linear::new(weight, bias);
        timed(3, || Ok(inner.forward(x)?))
    }

    /// The bf16 kernel path of [`Linear::forward`], or `None` where it does
    /// not apply (nothing computed then).
    fn forward_bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(w) = bf16_weight(&self.weight).filter(|_| kernels::applies_bf16(x)) else {
            return Ok(None);
        };
        let &[out_f, in_f] = w.dims() else {
            return Ok(None);
        };
        if x.dims().last() != Some(&in_f) || (self.bias.is_some() && self.bias_f32.len() != out_f) {
            return Ok(None);
        }
        let rows = x.elem_count() / in_f.max(1);
        count_flops(2 * rows * in_f * out_f);
        BF16_KERNEL_LAYERS.fetch_add(1, Ordering::Relaxed);
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("x has a last dimension") = out_f;
        let y = timed(3, || {
            kernels::with_bf16(x, |xd| {
                kernels::with_bf16(w, |wd| {
                    kernels::linear_bf16(xd, rows, in_f, wd, &self.bias_f32, out_f)
                })
            })
        })??;
        Ok(Some(kernels::tensor(y, &shape)?))
    }
}

/// `torch.nn.GroupNorm` over `(batch, channels, ...)`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    /// `(weight, bias)`, `(channels,)` each, for a norm on another device
    /// than its weights (`--offload sequential`: see [`on_device`]).
    params: (Tensor, Tensor),
    groups: usize,
    eps: f64,
    gamma: Arc<Vec<f32>>,
    beta: Arc<Vec<f32>>,
    /// The dtype of its weight and bias.
    dtype: candle_core::DType,
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
        let (gamma, beta) = if kernels::enabled() && weight.device().is_cpu() {
            (cpu_f32_values(&weight)?, cpu_f32_values(&bias)?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self {
            dtype: weight.dtype(),
            params: (weight.clone(), bias.clone()),
            inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            groups,
            eps,
            gamma: Arc::new(gamma),
            beta: Arc::new(beta),
        })
    }

    /// The per-plane `(scale, shift)` this norm applies to `x`
    /// (`(batch, channels, spatial)` f32 values; [`kernels::group_norm_affine`]),
    /// for the kernels that apply it as they read (`ConvInput`). Needs the
    /// f32 gamma / beta the CPU path loads.
    fn plane_affine(&self, x: &[f32], channels: usize, spatial: usize) -> Vec<(f32, f32)> {
        timed(5, || {
            kernels::group_norm_affine(
                x,
                channels,
                spatial,
                self.groups,
                self.eps,
                &self.gamma,
                &self.beta,
            )
        })
    }

    /// Normalise each group of channels to zero mean and unit variance,
    /// then scale and shift per channel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// [`GroupNorm::forward`] followed by SiLU, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    fn forward_with(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let fast = !self.gamma.is_empty() && x.rank() >= 3;
        let bf16 = fast && kernels::applies_bf16(x);
        if !bf16 {
            if let (Some(dtype), false) = (half_on_cpu(x), self.gamma.is_empty()) {
                return kernels::to_half(&self.forward_with(&kernels::to_f32(x)?, silu)?, dtype);
            }
        }
        if bf16 || (fast && kernels::applies(x)) {
            let dims = x.dims().to_vec();
            let (c, spatial) = (dims[1], dims[2..].iter().product());
            let (groups, eps, gamma, beta) = (self.groups, self.eps, &self.gamma, &self.beta);
            return timed(5, || {
                if bf16 {
                    let y = kernels::with_bf16(x, |d| {
                        kernels::group_norm_bf16(d, c, spatial, groups, eps, gamma, beta, silu)
                    })?;
                    kernels::tensor(y, &dims)
                } else {
                    let y = kernels::with_f32(x, |d| {
                        kernels::group_norm(d, c, spatial, groups, eps, gamma, beta, silu)
                    })?;
                    kernels::tensor(y, &dims)
                }
            });
        }
        // candle's group norm scales in its weight's dtype: an input of
        // another dtype (a half-precision model's layer widened to f32 on
        // the CPU) is normalised in the weight's dtype and cast back.
        let moved;
        let inner = if self.params.0.device().same_device(x.device()) {
            &self.inner
        } else {
            let (weight, bias) = &self.params;
            moved = candle_nn::GroupNorm::new(
                weight.to_device(x.device())?,
                bias.to_device(x.device())?,
                weight.dim(0)?,
                self.groups,
                self.eps,
            )?;
            &moved
        };
        let y = if x.dtype() == self.dtype {
            inner.forward(x)?
        } else {
            inner
                .forward(&x.to_dtype(self.dtype)?)?
                .to_dtype(x.dtype())?
        };
        if silu {
            Ok(candle_nn::ops::silu(&y)?)
        } else {
            Ok(y)
        }
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

    /// `x`: `(..., dim)`. Weights on another device than `x`
    /// (`--offload sequential`) are moved for the call ([`on_device`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.inner.weight();
        if weight.device().same_device(x.device()) {
            return Ok(self.inner.forward(x)?);
        }
        let (weight, eps) = (weight.to_device(x.device())?, self.inner.eps());
        let moved = match self.inner.bias() {
            Some(bias) => candle_nn::LayerNorm::new(weight, bias.to_device(x.device())?, eps),
            None => candle_nn::LayerNorm::new_no_bias(weight, eps),
        };
        Ok(moved.forward(x)?)
    }
}

/// The operation that precedes a convolution in diffusers' blocks, for
/// [`Conv2d::forward_after`].
#[derive(Clone, Copy, Debug)]
pub enum ConvPrologue<'a> {
    /// `act(norm(x))` (`ResnetBlock2D`'s `conv1(act(norm1(x)))`, the VAE
    /// decoder's `conv_out(act(conv_norm_out(x)))`).
    Norm(&'a GroupNorm, Activation),
    /// Nearest-neighbour upsampling by 2 on both spatial axes (`Upsample2D`
    /// with `scale_factor=2`).
    Upsample2x,
}

impl ConvPrologue<'_> {
    /// The prologue's output, computed whole (the unfused path).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            ConvPrologue::Norm(norm, act) => group_norm_act(norm, act, x),
            ConvPrologue::Upsample2x => {
                let (b, c, h, w) = x.dims4()?;
                if kernels::applies_bf16(x) {
                    let y = kernels::with_bf16(x, |d| kernels::upsample2x(d, h, w))?;
                    return kernels::tensor(y, &[b, c, 2 * h, 2 * w]);
                }
                Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }
}

/// `a + b` for two tensors of one shape: on the kernels for bf16 and f32
/// CPU tensors ([`kernels::add_bf16`], [`kernels::add_f32`]: one parallel
/// pass, the same values), else candle's `add`.
///
/// Errors: the shapes differ.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() == b.dims() && kernels::applies_bf16(a) && kernels::applies_bf16(b) {
        let y = kernels::with_bf16(a, |a| kernels::with_bf16(b, |b| kernels::add_bf16(a, b)))??;
        return kernels::tensor(y, a.dims());
    }
    if a.dims() == b.dims() && kernels::applies(a) && kernels::applies(b) {
        let y = kernels::with_f32(a, |a| kernels::with_f32(b, |b| kernels::add_f32(a, b)))??;
        return kernels::tensor(y, a.dims());
    }
    Ok((a + b)?)
}

/// `x + t` with `x` `(batch, channels, h, w)` and `t` `(batch, channels)`,
/// one value per plane (a ResnetBlock2D's projected time embedding): on
/// the bf16 kernels for bf16 CPU tensors ([`kernels::add_per_plane_bf16`]),
/// else candle's `broadcast_add` (which also takes a `t` of batch 1).
///
/// Errors: shapes that do not broadcast.
pub fn add_per_plane(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if t.dims() == [b, c] && kernels::applies_bf16(x) && kernels::applies_bf16(t) {
        let y = kernels::with_bf16(x, |x| {
            kernels::with_bf16(t, |t| kernels::add_per_plane_bf16(x, h * w, t))
        })??;
        return kernels::tensor(y, x.dims());
    }
    Ok(x.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?)
}

/// `act(norm(x))`, fused into one pass when the activation is SiLU.
pub fn group_norm_act(norm: &GroupNorm, act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Silu => norm.forward_silu(x),
        other => other.forward(&norm.forward(x)?),
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
    if mask.is_none()
        && scale > 0.0
        && kernels::applies_bf16(q)
        && kernels::applies_bf16(k)
        && kernels::applies_bf16(v)
    {
        let (b, h, n, d) = q.dims4()?;
        let m = k.dim(2)?;
        count_flops(4 * b * h * n * m * d);
        BF16_KERNEL_LAYERS.fetch_add(1, Ordering::Relaxed);
        let out = timed(4, || {
            kernels::with_bf16(q, |qd| {
                kernels::with_bf16(k, |kd| {
                    kernels::with_bf16(v, |vd| {
                        kernels::attention_bf16(qd, kd, vd, b * h, n, m, d, scale as f32)
                    })
                })
            })
        })???;
        return kernels::tensor(out, &[b, h, n, d]);
    }
    if let Some(dtype) = half_on_cpu(q) {
        WIDENED_LAYERS.fetch_add(1, Ordering::Relaxed);
        let f32 = kernels::to_f32;
        let mask = mask.map(f32).transpose()?;
        let out = scaled_dot_product_attention(&f32(q)?, &f32(k)?, &f32(v)?, mask.as_ref(), scale)?;
        return kernels::to_half(&out, dtype);
    }
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    count_flops(4 * b * h * n * m * d);
    if mask.is_none() && kernels::applies(q) && kernels::applies(k) && kernels::applies(v) {
        let out = timed(4, || {
            kernels::with_f32(q, |qd| {
                kernels::with_f32(k, |kd| {
                    kernels::with_f32(v, |vd| {
                        kernels::attention(qd, kd, vd, b * h, n, m, d, scale as f32)
                    })
                })
            })
        })???;
        return kernels::tensor(out, &[b, h, n, d]);
    }
    // The generic path (other dtypes, other devices): the scores in the
    // inputs' dtype, the mask and softmax in f32 (as PyTorch's half-precision
    // softmax accumulates in f32), the probabilities back in `v`'s dtype.
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores.to_dtype(candle_core::DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(candle_core::DType::F32)?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
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
    // The copy the reshape needs, in parallel on the CPU (kernels::contiguous).
    let t = x.transpose(1, 2)?;
    let t = if kernels::enabled() {
        kernels::contiguous(&t)?
    } else {
        t
    };
    Ok(t.reshape((b, n, h * d))?)
}

/// The last-dimension half split used by GEGLU: `(..., 2n)` → two `(..., n)`.
pub fn chunk2_last(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}
