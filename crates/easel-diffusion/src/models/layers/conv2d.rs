//! `torch.nn.Conv2d` ([`Conv2d`]): the engine's CPU kernels where they
//! apply (Winograd / shifted-GEMM 3×3, 1×1 as one product, fused
//! group-norm or upsampling prologues, bf16 kernels), candle's convolution
//! elsewhere, and circular padding inside a seamless-tiling scope.

use super::*;

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
                return kernels::to_half(&self.forward(&kernels::to_f32(x)?)?, dtype);
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
            return kernels::to_half(&self.forward_after(&kernels::to_f32(x)?, prologue)?, dtype);
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

    /// `x`'s `(batch, channels, height, width)` for the CPU kernels (which
    /// keep the size: stride 1, "same" padding), its channels checked
    /// against the layer's and the convolution's FLOPs counted.
    fn kernel_dims(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (co, in_c, k) = self.dims;
        let (b, ci, h, w) = x.dims4()?;
        if ci != in_c {
            return Err(Error::invalid(
                "conv2d",
                format!("input has {ci} channels, the layer expects {in_c}"),
            ));
        }
        count_flops(2 * b * co * h * w * in_c * k * k);
        Ok((b, ci, h, w))
    }

    /// The convolution with the layer's zero padding.
    fn forward_padded(&self, x: &Tensor) -> Result<Tensor> {
        let (co, _, k) = self.dims;
        if let (true, Some(wt)) = (self.bf16_applies(x), bf16_weight(&self.weight)) {
            let (b, ci, h, w) = self.kernel_dims(x)?;
            BF16_KERNEL_LAYERS.fetch_add(1, Ordering::Relaxed);
            let y = timed(if k == 3 { 0 } else { 1 }, || {
                kernels::with_bf16(x, |xd| {
                    kernels::with_bf16(wt, |wd| {
                        kernels::conv_bf16(xd, b, ci, h, w, wd, &self.bias_f32, co, k)
                    })
                })
            })??;
            return kernels::tensor(y, &[b, co, h, w]);
        }
        if self.fast && kernels::applies(x) {
            let (b, ci, h, w) = self.kernel_dims(x)?;
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
