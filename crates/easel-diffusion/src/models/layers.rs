//! The building blocks shared by the text encoders, the UNet and the VAE:
//! linear and convolution layers, normalisations, activations and
//! scaled dot-product attention, with PyTorch's semantics.

use std::borrow::Cow;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Module, Tensor, D};

use super::kernels;
use super::stored::StoredTensor;
use super::weights::Weights;
use crate::error::{Error, Result};

static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Floating-point operations done by the matrix-product layers (linear,
/// convolution, attention) of this process so far; a multiply-add counts
/// two. Benchmarks read it before and after a model call to report
/// effective GFLOP/s. Element-wise work (norms, activations) is not counted.
pub fn flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

fn count_flops(n: usize) {
    FLOPS.fetch_add(n as u64, Ordering::Relaxed);
}

/// The layer kinds whose wall time [`profile`] reports.
pub const PROFILE_KINDS: [&str; 6] = [
    "conv3x3",
    "conv1x1",
    "conv (other)",
    "linear",
    "attention",
    "group norm",
];
static PROFILE_NS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Wall time spent so far in each kind of layer of [`PROFILE_KINDS`], in
/// seconds, for benchmarks that break a model call down.
pub fn profile() -> Vec<(&'static str, f64)> {
    PROFILE_KINDS
        .iter()
        .zip(&PROFILE_NS)
        .map(|(k, ns)| (*k, ns.load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

fn timed<T>(kind: usize, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    PROFILE_NS[kind].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

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

static BF16_KERNEL_LAYERS: AtomicU64 = AtomicU64::new(0);
static WIDENED_LAYERS: AtomicU64 = AtomicU64::new(0);

/// How the half-precision CPU layer calls of this process so far ran:
/// `(bf16_kernels, widened)`, the calls of linear, convolution and
/// attention layers that ran on the bf16 kernels ([`kernels::linear_bf16`],
/// [`kernels::conv_bf16`], [`kernels::attention_bf16`]: bf16 products, f32
/// accumulation) and those that
/// widened their half-precision input to f32 and ran the f32 path
/// ([`half_on_cpu`]'s route: no AVX512-BF16, an f16 model, a quantized
/// weight, a layer shape the bf16 kernels do not cover). Benchmarks read it
/// before and after a run to report which compute path ran.
pub fn half_precision_paths() -> (u64, u64) {
    (
        BF16_KERNEL_LAYERS.load(Ordering::Relaxed),
        WIDENED_LAYERS.load(Ordering::Relaxed),
    )
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
            return Ok(self
                .forward(&x.to_dtype(candle_core::DType::F32)?)?
                .to_dtype(dtype)?);
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
                    self.weight
                        .with_f32(|wd| kernels::linear(xd, rows, in_f, wd, &self.bias_f32, out_f))
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
        Ok(Some(
            kernels::tensor(y, &shape)?.to_dtype(candle_core::DType::BF16)?,
        ))
    }
}

/// `torch.nn.Conv2d` with square kernels, weight `(out, in, k, k)`.
///
/// On the CPU, 3×3 stride-1 "same" convolutions run as Winograd F(2×2, 3×3)
/// ([`kernels::conv3x3_winograd`]) when channels are many, else as nine
/// shifted matrix products ([`kernels::conv3x3_same`]; see
/// [`kernels::conv3x3_prefers_winograd`]), and 1×1 convolutions as one matrix product;
/// other shapes (the stride-2 down-samplers) use candle's convolution. The
/// fast paths read the loaded weight tensor in place: no re-ordered second
/// copy is kept (it would double the memory of weights that the LoRA cache
/// also holds).
///
/// Inside a [`circular_padding`] scope a layer with `padding > 0` pads
/// circularly instead of with zeros (PyTorch's `padding_mode="circular"`):
/// see [`Conv2d::forward`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The weight as loaded, `(out, in, k, k)`, in its stored form
    /// (f16 / bf16 / fp8 / GGML blocks; see [`Weights::get_stored`]).
    weight: StoredTensor,
    /// `(out, in, k)`.
    dims: (usize, usize, usize),
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// Whether a fast CPU kernel applies (f32 / f16 / bf16 CPU weight, stride
    /// 1, 3×3 "same" or 1×1).
    fast: bool,
    bias_f32: Arc<Vec<f32>>,
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
        let weight = w.get_stored(&[out_channels, in_channels, kernel, kernel], "weight")?;
        let bias_t = w.get(&[out_channels], "bias")?;
        let bias_f32 = Arc::new(cpu_f32_values(&bias_t)?);
        let fast = weight.kernel_ready()
            && bias_f32.len() == out_channels
            && kernels::enabled()
            && stride == 1
            && matches!((kernel, padding), (3, 1) | (1, 0));
        Ok(Self {
            weight,
            dims: (out_channels, in_channels, kernel),
            bias: Some(bias_t),
            stride,
            padding,
            fast,
            bias_f32,
        })
    }

    /// `x`: `(batch, in, h, w)` → `(batch, out, h', w')` with
    /// `h' = (h + 2 padding - k) / stride + 1`.
    ///
    /// The `padding` is zeros, or, inside a [`circular_padding`] scope of
    /// this thread, the input wrapped around on both spatial axes
    /// ([`pad_circular`]) followed by the convolution without padding, as
    /// PyTorch's `Conv2d(padding_mode="circular")` computes it. On the fast
    /// 3×3 path the wrapped input runs through the same zero-padding kernel
    /// and the one-pixel output border (the only outputs that read the
    /// kernel's zeros) is cropped.
    ///
    /// Errors: an input of the wrong rank or channel count; in a circular
    /// scope, a spatial size smaller than `padding` (PyTorch refuses to wrap
    /// more than once too).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.bf16_applies(x) {
            if let Some(dtype) = half_on_cpu(x) {
                WIDENED_LAYERS.fetch_add(1, Ordering::Relaxed);
                return Ok(self
                    .forward(&x.to_dtype(candle_core::DType::F32)?)?
                    .to_dtype(dtype)?);
            }
        }
        if self.padding > 0 && circular_padding_active() {
            return self.forward_circular(x);
        }
        self.forward_padded(x)
    }

    /// `self(prologue(x))`: the convolution of `x` after the operation that
    /// precedes it in a block (a group norm and activation, or nearest ×2
    /// upsampling), equal to running them one after the other.
    ///
    /// For a 3×3 "same" convolution on the CPU kernels (outside a circular
    /// padding scope, SiLU as the activation), the prologue is applied as the
    /// kernel reads each input row ([`kernels::ConvInput`]): the normalised or
    /// upsampled input is never held whole, which at 1024² saves 0.5–1 GiB
    /// per VAE decoder layer; the values are bit for bit those of the
    /// separate operations. Elsewhere the prologue's output is computed first.
    ///
    /// Errors: as [`Conv2d::forward`]; a prologue whose output does not fit the
    /// layer's input channels.
    pub fn forward_after(&self, x: &Tensor, prologue: ConvPrologue<'_>) -> Result<Tensor> {
        if self.bf16_applies(x) {
            // bf16 kernels: the prologue's output rounded to bf16 (as
            // PyTorch's separate bf16 ops), then the bf16 convolution.
            return self.forward(&prologue.apply(x)?);
        }
        if let Some(dtype) = half_on_cpu(x) {
            return Ok(self
                .forward_after(&x.to_dtype(candle_core::DType::F32)?, prologue)?
                .to_dtype(dtype)?);
        }
        match self.forward_after_vec(x, prologue)? {
            Some((y, dims)) => kernels::tensor(y, &dims),
            None => self.forward(&prologue.apply(x)?),
        }
    }

    /// The fused path of [`Conv2d::forward_after`]: the output's data and
    /// dims, or `None` where it does not apply (then nothing was computed).
    pub(crate) fn forward_after_vec(
        &self,
        x: &Tensor,
        prologue: ConvPrologue<'_>,
    ) -> Result<Option<(Vec<f32>, [usize; 4])>> {
        let (co, in_c, k) = self.dims;
        let fused = self.fast
            && k == 3
            && kernels::applies(x)
            && x.rank() == 4
            && !circular_padding_active()
            && match prologue {
                ConvPrologue::Norm(norm, act) => act == Activation::Silu && !norm.gamma.is_empty(),
                ConvPrologue::Upsample2x => true,
            };
        if !fused {
            return Ok(None);
        }
        let (b, ci, sh, sw) = x.dims4()?;
        if ci != in_c {
            return Err(Error::invalid(
                "conv2d",
                format!("input has {ci} channels, the layer expects {in_c}"),
            ));
        }
        let y = kernels::with_f32(x, |xd| -> Result<(Vec<f32>, [usize; 4])> {
            let affine;
            let mut input = kernels::ConvInput::plain(xd, sh, sw);
            match prologue {
                ConvPrologue::Norm(norm, _) => {
                    affine = norm.plane_affine(xd, ci, sh * sw);
                    input = input.with_affine(&affine, true);
                }
                ConvPrologue::Upsample2x => input = input.upsampled_2x(),
            }
            let (h, w) = (input.h(), input.w());
            count_flops(2 * b * co * h * w * in_c * k * k);
            let y = timed(0, || {
                self.weight.with_f32(|wd| {
                    if kernels::conv3x3_prefers_winograd(ci, co) {
                        kernels::conv3x3_winograd_from(&input, b, ci, wd, &self.bias_f32, co)
                    } else {
                        kernels::conv3x3_same_from(&input, b, ci, wd, &self.bias_f32, co)
                    }
                })
            })?;
            Ok((y, [b, co, h, w]))
        })??;
        Ok(Some(y))
    }

    /// `buf = self(act(norm(buf)))` in place, for a 3×3 layer with as many
    /// output as input channels on the Winograd kernel
    /// ([`kernels::conv3x3_winograd_in_place`]); `buf` is `dims` =
    /// `(batch, channels, h, w)`. Returns `false`, with `buf` untouched, where
    /// that kernel does not apply (another kernel or layer shape, a circular
    /// padding scope, an activation other than SiLU).
    pub(crate) fn forward_in_place(
        &self,
        buf: &mut [f32],
        dims: [usize; 4],
        norm: Option<(&GroupNorm, Activation)>,
    ) -> Result<bool> {
        let (co, in_c, k) = self.dims;
        let [b, c, h, w] = dims;
        if !(co == in_c && buf.len() == b * c * h * w && self.in_place_applies(c, norm)) {
            return Ok(false);
        }
        let affine = norm.map(|(n, _)| n.plane_affine(buf, c, h * w));
        count_flops(2 * b * co * h * w * in_c * k * k);
        timed(0, || {
            self.weight.with_f32(|wd| {
                kernels::conv3x3_winograd_in_place(
                    buf,
                    b,
                    c,
                    h,
                    w,
                    affine.as_deref().map(|a| (a, true)),
                    wd,
                    &self.bias_f32,
                )
            })
        })?;
        Ok(true)
    }

    /// Output channels.
    pub(crate) fn dims_out(&self) -> usize {
        self.dims.0
    }

    /// Whether [`Conv2d::forward_in_place`] takes this layer for an input of
    /// `channels` channels read through `norm`.
    pub(crate) fn in_place_ready(
        &self,
        channels: usize,
        norm: Option<(&GroupNorm, Activation)>,
    ) -> bool {
        self.dims.0 == self.dims.1 && self.in_place_applies(channels, norm)
    }

    /// Whether the in-place Winograd kernels take this layer for an input
    /// of `channels` channels read through `norm`: a 3×3 "same" layer on the
    /// fast path and the Winograd kernel, outside a circular padding scope,
    /// SiLU as the activation.
    fn in_place_applies(&self, channels: usize, norm: Option<(&GroupNorm, Activation)>) -> bool {
        let (co, in_c, k) = self.dims;
        self.fast
            && k == 3
            && channels == in_c
            && kernels::conv3x3_prefers_winograd(in_c, co)
            && !circular_padding_active()
            && norm.is_none_or(|(n, act)| act == Activation::Silu && !n.gamma.is_empty())
    }

    /// `self(act(norm(buf)))` and the 1×1 `shortcut(buf)`, written over
    /// `buf` (`dims` = `(batch, in, h, w)`) when both fit in it
    /// ([`kernels::conv3x3_winograd_shrink_in_place`]): afterwards `buf`'s
    /// first `batch · (out + shortcut out) · h · w` values are, per image,
    /// this layer's output planes then the shortcut's. Returns `false`, with
    /// `buf` untouched, where that kernel does not apply (the outputs do not
    /// fit, another kernel or layer shape, a circular padding scope, an
    /// activation other than SiLU).
    pub(crate) fn forward_shrink_in_place(
        &self,
        buf: &mut [f32],
        dims: [usize; 4],
        norm: (&GroupNorm, Activation),
        shortcut: &Conv2d,
    ) -> Result<bool> {
        let (co, in_c, k) = self.dims;
        let (co_s, in_s, k_s) = shortcut.dims;
        let [b, c, h, w] = dims;
        let applies = buf.len() == b * c * h * w
            && self.in_place_applies(c, Some(norm))
            && shortcut.fast
            && k_s == 1
            && in_s == in_c
            && co + co_s <= in_c;
        if !applies {
            return Ok(false);
        }
        let affine = norm.0.plane_affine(buf, c, h * w);
        count_flops(2 * b * co * h * w * in_c * k * k + 2 * b * co_s * h * w * in_c);
        timed(0, || {
            self.weight.with_f32(|wd| {
                shortcut.weight.with_f32(|ws| {
                    kernels::conv3x3_winograd_shrink_in_place(
                        buf,
                        b,
                        c,
                        h,
                        w,
                        Some((&affine, true)),
                        wd,
                        &self.bias_f32,
                        co,
                        Some(kernels::Shortcut1x1 {
                            weight: ws,
                            bias: &shortcut.bias_f32,
                            co: co_s,
                        }),
                    )
                })
            })
        })??;
        Ok(true)
    }

    /// `dst += self(x)` for a 1×1 layer on the CPU kernels
    /// ([`kernels::conv1x1_add_into`]): a residual shortcut added without
    /// holding its output whole. `dst` is `(batch, out, h, w)`. Returns
    /// `false`, with `dst` untouched, where that kernel does not apply.
    pub(crate) fn add_into(&self, dst: &mut [f32], x: &Tensor) -> Result<bool> {
        let (co, in_c, k) = self.dims;
        if !(self.fast && k == 1 && kernels::applies(x) && x.rank() == 4) {
            return Ok(false);
        }
        let (b, ci, h, w) = x.dims4()?;
        if ci != in_c || dst.len() != b * co * h * w {
            return Ok(false);
        }
        count_flops(2 * b * co * h * w * in_c);
        timed(1, || {
            self.weight.with_f32(|wd| {
                kernels::with_f32(x, |xd| {
                    kernels::conv1x1_add_into(dst, xd, b, ci, h * w, wd, &self.bias_f32, co)
                })
            })
        })??;
        Ok(true)
    }

    /// [`Conv2d::forward`] with circular padding.
    fn forward_circular(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.padding;
        let wrapped = pad_circular(x, p)?;
        if self.fast && (kernels::applies(&wrapped) || self.bf16_applies(&wrapped)) {
            // `fast` with padding > 0 is the 3×3 "same" kernel (padding 1):
            // on the wrapped `(h + 2, w + 2)` input, its interior outputs
            // read wrapped values only and equal the unpadded convolution.
            let y = self.forward_padded(&wrapped)?;
            return Ok(y.narrow(2, p, h)?.narrow(3, p, w)?.contiguous()?);
        }
        self.forward_candle(&wrapped, 0)
    }

    /// Whether the bf16 kernel ([`kernels::conv_bf16`]) takes `x`: a bf16
    /// CPU input of rank 4 on a CPU with AVX512-BF16, a layer on the fast
    /// path (stride 1, 3×3 "same" or 1×1) with a bf16 weight.
    fn bf16_applies(&self, x: &Tensor) -> bool {
        self.fast
            && x.rank() == 4
            && bf16_weight(&self.weight).is_some()
            && kernels::applies_bf16(x)
    }

    /// The convolution with the layer's zero padding.
    fn forward_padded(&self, x: &Tensor) -> Result<Tensor> {
        let (co, in_c, k) = self.dims;
        if let (true, Some(wt)) = (self.bf16_applies(x), bf16_weight(&self.weight)) {
            let (b, ci, h, w) = x.dims4()?;
            if ci != in_c {
                return Err(Error::invalid(
                    "conv2d",
                    format!("input has {ci} channels, the layer expects {in_c}"),
                ));
            }
            count_flops(2 * b * co * h * w * in_c * k * k);
            BF16_KERNEL_LAYERS.fetch_add(1, Ordering::Relaxed);
            let y = timed(if k == 3 { 0 } else { 1 }, || {
                kernels::with_bf16(x, |xd| {
                    kernels::with_bf16(wt, |wd| {
                        kernels::conv_bf16(xd, b, ci, h, w, wd, &self.bias_f32, co, k)
                    })
                })
            })??;
            return Ok(kernels::tensor(y, &[b, co, h, w])?.to_dtype(candle_core::DType::BF16)?);
        }
        if self.fast && kernels::applies(x) {
            let (b, ci, h, w) = x.dims4()?;
            if ci != in_c {
                return Err(Error::invalid(
                    "conv2d",
                    format!("input has {ci} channels, the layer expects {in_c}"),
                ));
            }
            count_flops(2 * b * co * h * w * in_c * k * k);
            let y = timed(if k == 3 { 0 } else { 1 }, || {
                self.weight.with_f32(|wd| {
                    kernels::with_f32(x, |xd| {
                        if k == 3 && kernels::conv3x3_prefers_winograd(ci, co) {
                            kernels::conv3x3_winograd(xd, b, ci, h, w, wd, &self.bias_f32, co)
                        } else if k == 3 {
                            kernels::conv3x3_same(xd, b, ci, h, w, wd, &self.bias_f32, co)
                        } else {
                            kernels::conv1x1(xd, b, ci, h * w, wd, &self.bias_f32, co)
                        }
                    })
                })?
            })?;
            return kernels::tensor(y, &[b, co, h, w]);
        }
        self.forward_candle(x, self.padding)
    }

    /// candle's convolution with `padding` zeros on every side, plus the bias.
    fn forward_candle(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        let (_, in_c, k) = self.dims;
        let weight = self.weight.to_dense(x.device())?.to_dtype(x.dtype())?;
        let y = timed(2, || x.conv2d(&weight, padding, self.stride, 1, 1))?;
        count_flops(2 * y.elem_count() * in_c * k * k);
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(
                &on_device(b, y.device())?
                    .to_dtype(y.dtype())?
                    .reshape((1, (), 1, 1))?,
            )?),
            None => Ok(y),
        }
    }
}

thread_local! {
    /// Whether the convolutions run on this thread pad circularly; set only
    /// through [`circular_padding`].
    static CIRCULAR_PADDING: Cell<bool> = const { Cell::new(false) };
}

/// Seamless tiling, as A1111's `tiling` option (every `nn.Conv2d` switched
/// to `padding_mode="circular"`) and stable-diffusion.cpp's `--circular`
/// do it: while the returned guard lives, every [`Conv2d`] with
/// `padding > 0` run **on this thread** pads its input by wrapping it
/// around on both axes instead of with zeros, so the left edge continues
/// the right one and the top the bottom. `false` selects zero padding (the
/// default) for the scope, e.g. inside an outer circular scope. Dropping
/// the guard restores the mode that was set before, also on unwinding.
///
/// Padding that is not a convolution's own (the VAE encoder's explicit
/// right/bottom zero pad before its stride-2 down-samplers) stays zeros,
/// as in A1111, where only the convolutions' `padding_mode` changes.
///
/// Why a scope on the calling thread rather than a flag in the model: the
/// pipelines take `&self` and may be shared between threads; a per-thread
/// scope gives each run its own mode, so two runs on one shared model
/// never see each other's setting, and the model needs no interior
/// mutability. It works because a model's layers run on the thread that
/// calls the model (the kernels fan out over worker threads below the
/// layer, on already padded inputs); the guard is not `Send`, so it cannot
/// be dropped on another thread.
#[must_use = "circular padding applies only while the guard lives"]
pub fn circular_padding(circular: bool) -> CircularPaddingGuard {
    let previous = CIRCULAR_PADDING.with(|c| c.replace(circular));
    CircularPaddingGuard {
        previous,
        _not_send: PhantomData,
    }
}

/// Whether a [`circular_padding`] scope is active on this thread.
pub fn circular_padding_active() -> bool {
    CIRCULAR_PADDING.with(Cell::get)
}

/// Restores the padding mode of before [`circular_padding`] when dropped.
#[derive(Debug)]
pub struct CircularPaddingGuard {
    previous: bool,
    /// Thread-bound: the mode is per thread.
    _not_send: PhantomData<*const ()>,
}

impl Drop for CircularPaddingGuard {
    fn drop(&mut self) {
        CIRCULAR_PADDING.with(|c| c.set(self.previous));
    }
}

/// Pad `x`, `(batch, channels, h, w)`, by `pad` on every side with the
/// values wrapped around (PyTorch's `F.pad(x, (pad,) * 4, mode="circular")`):
/// the left pad is the last `pad` columns, the right pad the first ones,
/// and likewise for rows, so corners come from the opposite corners.
/// Returns `(batch, channels, h + 2 pad, w + 2 pad)`.
///
/// Errors: `x` not of rank 4, or `pad` larger than `h` or `w` (wrapping
/// more than once; PyTorch refuses it too).
pub fn pad_circular(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if pad > h || pad > w {
        return Err(Error::invalid(
            "tiling",
            format!(
                "circular padding of {pad} needs a feature map of at least {pad}x{pad}, got {h}x{w}"
            ),
        ));
    }
    if pad == 0 {
        return Ok(x.clone());
    }
    let x = Tensor::cat(&[&x.narrow(3, w - pad, pad)?, x, &x.narrow(3, 0, pad)?], 3)?;
    Ok(Tensor::cat(
        &[&x.narrow(2, h - pad, pad)?, &x, &x.narrow(2, 0, pad)?],
        2,
    )?)
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
        if let (Some(dtype), false) = (half_on_cpu(x), self.gamma.is_empty()) {
            return Ok(self
                .forward_with(&x.to_dtype(candle_core::DType::F32)?, silu)?
                .to_dtype(dtype)?);
        }
        if kernels::applies(x) && !self.gamma.is_empty() && x.rank() >= 3 {
            let dims = x.dims().to_vec();
            let c = dims[1];
            let spatial = dims[2..].iter().product();
            let y = timed(5, || {
                kernels::with_f32(x, |d| {
                    kernels::group_norm(
                        d,
                        c,
                        spatial,
                        self.groups,
                        self.eps,
                        &self.gamma,
                        &self.beta,
                        silu,
                    )
                })
            })?;
            return kernels::tensor(y, &dims);
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
    /// `(weight, bias)` and eps, for a norm on another device than its
    /// weights (`--offload sequential`: see [`on_device`]).
    params: (Tensor, Tensor, f64),
}

impl LayerNorm {
    /// Load `weight` and `bias` of length `dim`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&[dim], "weight")?;
        let bias = w.get(&[dim], "bias")?;
        Ok(Self {
            params: (weight.clone(), bias.clone(), eps),
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
        })
    }

    /// `x`: `(..., dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias, eps) = &self.params;
        if weight.device().same_device(x.device()) {
            return Ok(self.inner.forward(x)?);
        }
        let moved = candle_nn::LayerNorm::new(
            weight.to_device(x.device())?,
            bias.to_device(x.device())?,
            *eps,
        );
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
                let (_, _, h, w) = x.dims4()?;
                Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }
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
        return Ok(kernels::tensor(out, &[b, h, n, d])?.to_dtype(candle_core::DType::BF16)?);
    }
    if let Some(dtype) = half_on_cpu(q) {
        WIDENED_LAYERS.fetch_add(1, Ordering::Relaxed);
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let mask = mask.map(f32).transpose()?;
        return Ok(scaled_dot_product_attention(
            &f32(q)?,
            &f32(k)?,
            &f32(v)?,
            mask.as_ref(),
            scale,
        )?
        .to_dtype(dtype)?);
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
    Ok(x.transpose(1, 2)?.reshape((b, n, h * d))?)
}

/// The last-dimension half split used by GEGLU: `(..., 2n)` → two `(..., n)`.
pub fn chunk2_last(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}

/// The machine's matrix-product throughput on the engine's own matmul path,
/// in GFLOP/s: the best of `repeats` products of two `n`×`n` matrices of
/// `dtype` (after one warm-up). Benchmarks report model speed against it.
///
/// Errors: when the dtype has no CPU matmul.
pub fn measure_matmul_gflops(dtype: candle_core::DType, n: usize, repeats: usize) -> Result<f64> {
    let device = candle_core::Device::Cpu;
    let a = Tensor::randn(0f32, 1f32, (n, n), &device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), &device)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        let c = a.matmul(&b)?;
        // Touch the result so the product is not skipped.
        let _ = c.dims();
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// The bf16 kernel's matrix-product throughput, in GFLOP/s: the best of
/// `repeats` products `A · Bᵀ` of two `n`×`n` bf16 matrices with f32
/// accumulation on [`kernels::linear_bf16`] (AVX512-BF16 `vdpbf16ps`;
/// the weight packing each call does is included), after one warm-up.
/// Benchmarks report a bf16 model's speed against it.
///
/// Errors: the CPU has no AVX512-BF16 ([`kernels::bf16_gemm_available`]).
pub fn measure_bf16_gemm_gflops(n: usize, repeats: usize) -> Result<f64> {
    if !kernels::bf16_gemm_available() {
        return Err(Error::invalid(
            "bf16 gemm",
            "this CPU has no AVX512-BF16 (vdpbf16ps)",
        ));
    }
    let values = |seed: u32| -> Vec<half::bf16> {
        (0..n * n)
            .map(|i| {
                half::bf16::from_f32(
                    ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5,
                )
            })
            .collect()
    };
    let (a, b) = (values(1), values(2));
    let _ = kernels::linear_bf16(&a, n, n, &b, &[], n);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        let c = kernels::linear_bf16(&a, n, n, &b, &[], n);
        std::hint::black_box(&c);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}
